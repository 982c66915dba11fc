"""The top-level keys a run's config may have: a misspelt or invented one (``+budget_tokens=50000``) would
otherwise be ignored silently. Keys inside a component's node are checked by the component itself."""

from __future__ import annotations

import difflib

from omegaconf import DictConfig

from paser.errors import ConfigError

# the config groups (conf/<group>/), conf/config.yaml's own keys, and Hydra's own node
TOP_LEVEL_KEYS = ("paths", "model", "data", "pruner", "selector", "recovery", "evaluator", "logger",
                  "name", "seed", "budget", "budget_unit", "scoring", "hydra")


def check_top_level_keys(cfg: DictConfig) -> None:
    """Raise ConfigError naming every top-level key of ``cfg`` the pipeline does not read, with the allowed
    ones (and the closest allowed key for a typo)."""
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(f"unknown top-level config key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: "
                      f"nothing reads it; allowed: {', '.join(TOP_LEVEL_KEYS)}. A component's settings go "
                      "under its group, e.g. recovery.lr=1e-4")
