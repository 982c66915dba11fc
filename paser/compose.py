"""The run config composed as ``python run.py <overrides>`` composes it, for scripts and tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: Iterable[str] = (), config_name: str = "config", conf_dir: str | Path = CONF,
            return_hydra_config: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` with Hydra's command-line ``overrides``; ``config_name`` may also name one
    option (``recovery/lora``: that option alone). Any Hydra state of an earlier composition is cleared."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
