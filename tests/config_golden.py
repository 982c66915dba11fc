"""The resolved config of every shipped preset, for tests/test_configs.py's golden test.

A preset is composed the way run.py composes it (``config`` + ``<group>=<option>``), with the paths fixed
so that the result does not depend on the machine or the environment, and fully resolved. Kept per preset:
the config, the sweep it declares (``hydra.sweeper.params`` as ordered [key, values] pairs: the first key is
the outer loop of the sweep) and the option chosen in each top-level group (``hydra.runtime.choices``).

    python -m tests.config_golden --write    # regenerate tests/data/resolved_configs.json from conf/

The stored file was written from conf/ as it was at commit e963ddf, before the YAML files were
de-duplicated (issue #15): ``git archive e963ddf conf | tar -x -C /tmp/orig &&
python -m tests.config_golden --conf /tmp/orig/conf --write``.

Regenerate only when a change of resolved values is intended (say so in the commit): the file is the
record that refactoring the YAML files changed nothing that a run sees.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from paser.compose import compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GOLDEN = ROOT / "tests" / "data" / "resolved_configs.json"
GROUPS = ("experiment", "evaluator", "model", "pruner", "data", "logger")
FIXED_PATHS = ["paths.data_dir=/DATA", "paths.cache_dir=/CACHE", "paths.output_dir=/OUT"]
EXTRA = {("model", "local"): ["model.path=/models/local"], ("data", "jsonl"): ["data.path=/pool.jsonl"]}


def options(group: str, conf: Path = CONF) -> list[str]:
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def presets(conf: Path = CONF) -> list[tuple[str, str]]:
    return [("config", "default")] + [(g, o) for g in GROUPS for o in options(g, conf)]


def resolved(group: str, option: str, conf: Path = CONF) -> dict:
    """One preset, composed and resolved: {config, sweep, choices}."""
    overrides = list(FIXED_PATHS)
    if group != "config":
        overrides += [f"{group}={option}", *EXTRA.get((group, option), [])]
    cfg = compose(overrides, conf_dir=conf, return_hydra_config=True)
    hydra_node = cfg.hydra
    params = hydra_node.sweeper.params
    sweep = [[k, v] for k, v in OmegaConf.to_container(params, resolve=True).items()] if params else []
    choices = {k: v for k, v in OmegaConf.to_container(hydra_node.runtime.choices).items() if "/" not in k}
    with open_dict(cfg):
        del cfg["hydra"]
    return {"config": OmegaConf.to_container(cfg, resolve=True), "sweep": sweep, "choices": choices}


def compute_all(conf: Path = CONF) -> dict:
    return {f"{group}={option}": resolved(group, option, conf) for group, option in presets(conf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {GOLDEN.relative_to(ROOT)}")
    ap.add_argument("--conf", type=Path, default=CONF, help="the config folder to compose (default: conf/)")
    args = ap.parse_args()
    data = compute_all(args.conf.resolve())
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if args.write:
        GOLDEN.write_text(text)
        print(f"wrote {len(data)} presets to {GOLDEN}")
    else:
        print(text)


if __name__ == "__main__":
    main()
