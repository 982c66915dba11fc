"""Experiment tracking: the local results record (always) and W&B (``logger=wandb``)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from paser.errors import ConfigError

log = logging.getLogger(__name__)

ARTIFACT_KINDS = ("selection", "adapter")  # what logger.artifacts may upload


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_stamp() -> str:
    """A run folder's name: local time to the millisecond and this process's id, so that two runs (or
    sweeps) started in the same second, as jobs of a script or a scheduler are, get folders of their own."""
    now = datetime.now()
    return f"{now:%Y-%m-%d_%H-%M-%S}.{now.microsecond // 1000:03d}_pid{os.getpid()}"


# conf/config.yaml names the Hydra run and sweep folders with it; cached, so every read of one config's
# folder (Hydra reads it again in each sweep job) gives the same name
OmegaConf.register_new_resolver("paser.run_stamp", run_stamp, use_cache=True, replace=True)


def _taken(path: Path) -> str:
    return (f"{path} already exists: the run folder {path.parent} holds another run's results. Run again "
            "(each run gets a folder of its own) or point hydra.run.dir (run_dir) at a new folder")


def check_fresh(run_dir: Path) -> None:
    """Refuse a run folder that already holds results, before any work is done."""
    path = Path(run_dir) / "results.json"
    if path.exists():
        raise ConfigError(_taken(path))


def write_results(run_dir: Path, results: dict) -> Path:
    """results.json, written whole (a temporary file, fsync'ed, then linked in) and never over another
    run's: the link fails when the name exists, where a rename would replace it."""
    path = Path(run_dir) / "results.json"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(results, indent=1, default=str))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigError(_taken(path)) from None
        except OSError:  # a file system without hard links: check, then rename
            check_fresh(run_dir)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _auto_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    try:  # reads the stored credentials; no prompt, no network
        return "online" if wandb.login(prompt=False, verify=False) else "offline"
    except Exception:  # noqa: BLE001 -- any trouble reading credentials: stay offline, never block
        return "offline"


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a/b': 1}, numbers only (what W&B charts)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


class NullLogger:
    """logger=none: nothing beyond results.json."""

    def start(self, config: dict, run_dir: Path, name: str, tags: list[str]) -> None:
        pass

    def log(self, metrics: dict) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def log_image(self, key: str, path: Path) -> None:
        pass

    def log_artifact(self, name: str, kind: str, files: list[Path], metadata: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases; ``mode=auto`` is online when the user has credentials by any standard means
    (``wandb login``, WANDB_API_KEY, a netrc entry) and offline otherwise, so a machine without network
    never blocks (sync later with ``wandb sync``). WANDB_MODE, when set, wins."""

    def __init__(self, project: str = "paser", entity: str | None = None, mode: str = "auto",
                 group: str | None = None, artifacts: list[str] = ()):
        for kind in artifacts:
            if kind not in ARTIFACT_KINDS:
                raise ConfigError(f"logger.artifacts: {kind!r} is not an artifact kind; allowed: any of "
                                  f"{', '.join(ARTIFACT_KINDS)} (or [] for none)")
        self.project, self.entity, self.group, self.artifacts = project, entity, group, list(artifacts)
        self.mode = _auto_mode() if mode == "auto" else mode
        self.run = None

    def start(self, config, run_dir, name, tags) -> None:
        import wandb

        self.run = wandb.init(project=self.project, entity=self.entity, group=self.group, name=name,
                              tags=tags, config=config, dir=str(run_dir), mode=self.mode, reinit="finish_previous")
        # each kind of curve has its own x-axis, carried in the logged dict, so that progress logged while a
        # stage runs never moves W&B's global step past the LoRA steps that come later (W&B drops logs to a
        # step below the current one)
        for axis, series in X_AXES.items():
            self.run.define_metric(axis)
            self.run.define_metric(series, step_metric=axis)
        log.info("W&B run %s (%s mode)", self.run.id, self.mode)

    def log(self, metrics) -> None:
        self.run.log(flatten(metrics))

    def log_table(self, key, columns, rows) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key, path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def log_artifact(self, name, kind, files, metadata) -> None:
        """Upload ``files`` (a folder's contents at the artifact's root) if logger.artifacts has ``kind``."""
        if kind not in self.artifacts:
            return
        import wandb

        artifact = wandb.Artifact(name=re.sub(r"[^A-Za-z0-9._-]", "-", name), type=kind, metadata=metadata)
        for path in files:
            if path.is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, summary) -> None:
        self.run.summary.update(flatten(summary))
        self.run.finish()


# The logger of the run in progress, so that long stages (scoring, LoRA steps) report while they run.
_ACTIVE: list = [NullLogger()]
_STARTED = [time.time()]
X_AXES = {"recovery/step": "recovery/*", "progress/elapsed_s": "progress/*"}  # x-axis -> the series it carries


def set_active(logger) -> None:
    _ACTIVE[0] = logger
    _STARTED[0] = time.time()


def live(metrics: dict) -> None:
    """Log ``metrics`` to the run in progress now (a no-op outside a run or with logger=none); a series
    under one of ``X_AXES`` carries its x value in the same dict (e.g. ``recovery/step``)."""
    _ACTIVE[0].log(metrics)


def progress(name: str, done: int, total: int) -> None:
    """A long stage's progress, live: ``progress/<name>`` = done / total against seconds since the run began."""
    live({"progress/elapsed_s": round(time.time() - _STARTED[0], 1), f"progress/{name}": done / max(total, 1)})
