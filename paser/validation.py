"""One validation layer for a composed run config: every value is checked against ``RULES`` (type, range,
allowed values) when the components are built, before any model loads (``check_config``), and every
problem is reported at once, in a ConfigError naming each key, its value and what is allowed. Components
still refuse what only they can judge (a pruner's pattern, a selector's choice of divergence); the rules
cover the values whose wrong setting ran silently or into a traceback, some only after pruning and
selection.

``EarlyChecks``, a Hydra callback (conf/config.yaml), checks before Hydra makes the run's folder what
decides where that folder goes, and refuses a sweep that would launch no job (``-m 'seed=range(0,0)'``
exited 0 having run nothing).
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from paser.errors import ConfigError


def whole(low: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
           ) -> Callable[[object], bool]:
    """A finite real number in the interval (bounds included unless open)."""
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return ok


def optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or check(v)


def one_of(*values) -> Callable[[object], bool]:
    return lambda v: isinstance(v, str) and v in values


def boolean(v) -> bool:
    return isinstance(v, bool)


def folder_name(v) -> bool:
    """A name that makes one folder where it is used (outputs/runs/<name>): not a path out of it."""
    return isinstance(v, str | int) and not isinstance(v, bool) and str(v) not in ("", ".", "..") and \
        not any(c in str(v) for c in ("/", "\\", "\0"))


def saved_model_folder(v) -> bool:
    """A folder saved with save_pretrained: its config.json and weights whose headers read. An empty
    model.path would mean the current folder."""
    if not isinstance(v, str) or not v.strip() or v == "???":
        return False
    folder = Path(v)
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return (folder / "config.json").is_file() and bool(weights) and all(map(_readable_weights, weights))


def _readable_weights(path: Path) -> bool:
    """A safetensors file whose header parses and matches its size (truncated or garbage files fail); a
    .bin file is only checked for being non-empty."""
    if path.suffix != ".safetensors":
        return path.stat().st_size > 0
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False


def _local_model(cfg: dict) -> bool:
    return (cfg.get("model") or {}).get("kind") == "local"


@dataclass(frozen=True)
class Rule:
    keys: str                      # a dotted key; "*" matches any part of one (fnmatch): "*batch_size"
    ok: Callable[[object], bool]
    allowed: str                   # what is allowed, in words
    when: Callable[[dict], bool] = lambda cfg: True  # the rule applies to configs where this holds


RULES = (
    Rule("name", folder_name, "a plain folder name: no '/' or '\\', not '.' or '..'"),
    Rule("*seed", whole(0), "a whole number >= 0"),
    # its range depends on the pool's size: paser.budget.resolve_budget checks it
    Rule("budget", number(-math.inf), "a finite number: a fraction of the pool in (0, 1] or a count"),
    Rule("budget_unit", one_of("samples", "tokens"), "samples or tokens"),
    Rule("*batch_size", whole(1), "a whole number >= 1"),
    Rule("*.cutoff", whole(1), "a whole number of tokens >= 1"),
    Rule("recovery.lr", number(0, low_open=True), "a finite number > 0"),
    Rule("recovery.r", whole(1), "a whole number >= 1 (the LoRA rank)"),
    Rule("recovery.alpha", number(0, low_open=True), "a finite number > 0"),
    Rule("recovery.dropout", number(0, 1, high_open=True), "a number in [0, 1)"),
    Rule("recovery.epochs", whole(1), "a whole number >= 1"),
    Rule("recovery.warmup_steps", whole(0), "a whole number >= 0"),
    Rule("recovery.weight_decay", number(0), "a finite number >= 0"),
    Rule("recovery.checkpoint_every", whole(1), "a whole number of optimizer steps >= 1"),
    Rule("recovery.val_size", whole(0), "a whole number >= 0"),
    Rule("recovery.val_seed", whole(0), "a whole number >= 0"),
    Rule("recovery.eval_every", whole(0), "a whole number >= 0 (0: at the end of every epoch)"),
    Rule("recovery.keep", one_of("last", "best"), "last or best"),
    Rule("recovery.fsdp", boolean, "true or false"),
    Rule("evaluator.*.max_windows", optional(whole(1)), "null (every window) or a whole number >= 1"),
    Rule("evaluator.*.limit", optional(whole(1)), "null (every document) or a whole number >= 1"),
    Rule("evaluator.*.seq_len", whole(1), "a whole number of tokens >= 1"),
    Rule("evaluator.*.bootstrap_iters", whole(0), "a whole number >= 0"),
    Rule("model.trust_remote_code", boolean, "true or false"),
    Rule("model.path", saved_model_folder, "a folder holding a model saved with save_pretrained (config.json "
         "and readable weights); an empty path would be the current folder", when=_local_model),
    Rule("data.drop_duplicates", boolean, "true or false"),
)


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a plain config; the Hydra node is not the run's."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not (prefix == "" and k == "hydra"):
                yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def problems(cfg: DictConfig) -> list[str]:
    """'key=value: allowed ...' for every value of ``cfg`` that breaks a rule."""
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    out = []
    for key, value in _leaves(plain):
        for rule in RULES:
            if fnmatch.fnmatchcase(key, rule.keys) and rule.when(plain) and not rule.ok(value):
                out.append(f"{key}={value!r}: allowed {rule.allowed}")
    return out


def check_config(cfg: DictConfig) -> None:
    """ConfigError listing every value of ``cfg`` that breaks a rule (see the module docstring)."""
    found = problems(cfg)
    if found:
        raise ConfigError("invalid config value" + ("s" if len(found) > 1 else "") + ": " + "; ".join(found))


def empty_sweeps(overrides: list[str], params: dict | None) -> list[str]:
    """The sweep overrides (command line, then ``hydra.sweeper.params``) that give no value at all."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = list(overrides) + [f"{k}={v}" for k, v in (params or {}).items()]
    return [f"{o.input_line}" for o in OverridesParser.create().parse_overrides(given)
            if o.is_sweep_override() and not list(o.sweep_string_iterator())]


def _refuse(message: str) -> None:
    """Stop as run.py stops on a PaserError (exit status 2, no traceback): Hydra would print the traceback
    of an exception raised from a callback and exit 1."""
    print(f"ConfigError: {message}", file=sys.stderr)
    sys.exit(2)


class EarlyChecks(Callback):
    """Before Hydra makes the run's (or sweep's) folder: ``name`` is a plain folder name (``name=../../..``
    put the folder outside paths.output_dir), and a sweep launches at least one job."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check_name(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check_name(config)
        params = config.hydra.sweeper.get("params")
        empty = empty_sweeps(OmegaConf.to_container(config.hydra.overrides.task),
                             OmegaConf.to_container(params) if params is not None else {})
        if empty:
            _refuse(f"the sweep {', '.join(empty)} gives no value, so it would launch no job; give at least "
                    "one (e.g. seed=range(0,3): 0, 1, 2)")

    @staticmethod
    def _check_name(config: DictConfig) -> None:
        if not folder_name(config.get("name")):
            _refuse(f"name={config.get('name')!r}: allowed {RULES[0].allowed}")
