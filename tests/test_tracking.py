"""W&B: the mode (online when the user is logged in by any standard means, offline otherwise, WANDB_MODE
wins), live series on their own x-axes, and the selection and adapter as optional artifacts."""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types
from pathlib import Path

import pytest
import wandb

from paser import pipeline
from paser.errors import ConfigError
from paser.selectors.basic import RandomSelector
from paser.tracking import WandbLogger
from tests.conftest import TINY_RUN, requires_shared_data


@pytest.mark.parametrize("logged_in, env, expected", [
    (True, None, "online"), (False, None, "offline"), (True, "offline", "offline"), (False, "online", "online"),
])
def test_auto_mode(monkeypatch, logged_in, env, expected):
    monkeypatch.setattr(wandb, "login", lambda **kw: logged_in)
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert WandbLogger().mode == expected


def test_unreadable_credentials_mean_offline(monkeypatch):
    def broken(**kw):
        raise RuntimeError("netrc unreadable")

    monkeypatch.setattr(wandb, "login", broken)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert WandbLogger().mode == "offline"


class FakeRun:
    def __init__(self):
        self.axes, self.logged, self.id = {}, [], "fake"
        self.artifacts, self.summary = [], {}

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, data, **kwargs):
        assert "step" not in kwargs  # W&B's global step is never set by hand (see X_AXES)
        self.logged.append(data)

    def log_artifact(self, artifact):
        self.artifacts.append(artifact)

    def finish(self):
        pass


def test_live_series_have_their_own_x_axes(monkeypatch, tmp_path):
    from paser import tracking

    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    logger = WandbLogger(mode="offline")
    logger.start({}, tmp_path, "r", [])
    assert run.axes["recovery/*"] == "recovery/step" and run.axes["progress/*"] == "progress/elapsed_s"
    tracking.set_active(logger)
    try:  # progress logged first (scoring), LoRA steps after: both kept, each against its own axis
        tracking.progress("scores/jsd", 512, 1024)
        tracking.live({"recovery/step": 1, "recovery/loss": 2.5})
    finally:
        tracking.set_active(tracking.NullLogger())
    assert run.logged[0]["progress/scores/jsd"] == 0.5 and "progress/elapsed_s" in run.logged[0]
    assert run.logged[1] == {"recovery/step": 1, "recovery/loss": 2.5}


def test_cached_scores_report_progress_live(tmp_path, live_calls):
    import numpy as np
    import torch

    from paser.cache import StageCache
    from paser.components import SelectionContext

    ctx = SelectionContext(tokenizer=None, original_model=lambda: torch.nn.Linear(2, 2),
                           pruned_model=lambda: torch.nn.Linear(2, 2), embedder=lambda: None, embedder_name="x",
                           cache=StageCache(tmp_path), cache_key={"pool": "p"}, seed=0)
    ctx.cached_scores("len", ("pool",), {}, 10, lambda s, e: np.arange(s, e, dtype=np.float64), chunk_size=4)
    assert [c["progress/scores/len"] for c in live_calls] == [0.4, 0.8, 1.0]


# ------------------------------------------------------------------------ artifacts: selection, adapter

class FakeArtifact:
    def __init__(self, name, type, metadata=None):
        self.name, self.type, self.metadata, self.files = name, type, metadata, []

    def add_file(self, path):
        self.files.append(Path(path).name)

    def add_dir(self, path):
        self.files += sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file())


class RandomWithNotes(RandomSelector):
    """Random selection plus a file of its own, as PASER adds its cluster map."""

    def select(self, pool, budget, ctx):
        selection = super().select(pool, budget, ctx)
        selection.artifacts = {"notes.txt": b"drawn at random"}
        return selection


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module that records instead of uploading; returns the run it hands out."""
    run = FakeRun()
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe find_spec("wandb")
    fake.init, fake.Artifact, fake.Table, fake.Image = lambda **kw: run, FakeArtifact, lambda **kw: kw, str
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return run


def run_logged(compose_cfg, tmp_path, *overrides, base=TINY_RUN):
    """A tiny run logged to the fake W&B (``fake_wandb``), with a selector that writes a file."""
    cfg = compose_cfg([o for o in base if o != "logger=none"] + [
        "logger=wandb", "logger.mode=offline", "selector._target_=tests.test_tracking.RandomWithNotes", *overrides])
    return pipeline.run(cfg, run_dir=tmp_path / "run")


@requires_shared_data()
def test_selection_and_adapter_artifacts(compose_cfg, tmp_path, fake_wandb):
    results = run_logged(compose_cfg, tmp_path, "logger.artifacts=[selection,adapter]")
    by_kind = {a.type: a for a in fake_wandb.artifacts}
    assert len(fake_wandb.artifacts) == 2 and by_kind.keys() == {"selection", "adapter"}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", a.name) for a in fake_wandb.artifacts)
    selection, adapter = by_kind["selection"], by_kind["adapter"]
    assert selection.files == ["selected_indices.json", "selected.jsonl", "notes.txt"]
    assert selection.metadata == {"selector": "RandomWithNotes", "budget": 6, "selected": 6,
                                  "pool_fingerprint": results["selection"]["pool_fingerprint"]}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter.files)
    assert adapter.metadata["r"] == results["config"]["recovery"]["r"] and adapter.metadata["steps"] == 3
    assert adapter.metadata["final_loss"] == results["recovery"]["final_loss"]


@requires_shared_data()
def test_no_artifacts_by_default(compose_cfg, tmp_path, fake_wandb):
    run_logged(compose_cfg, tmp_path)
    assert fake_wandb.logged and fake_wandb.artifacts == []  # the run was logged, without artifacts


@requires_shared_data()
def test_no_adapter_artifact_without_recovery(compose_cfg, tmp_path, fake_wandb):
    run_logged(compose_cfg, tmp_path, "recovery=none", "logger.artifacts=[selection,adapter]",
               base=[o for o in TINY_RUN if not o.startswith("recovery.")])
    assert [a.type for a in fake_wandb.artifacts] == ["selection"]


@pytest.mark.usefixtures("fake_wandb")  # were the check missing, the run would still not reach W&B
def test_unknown_artifact_kind_fails_before_any_model_loads(compose_cfg, monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **kw: pytest.fail("a model was loaded"))
    cfg = compose_cfg([o for o in TINY_RUN if o != "logger=none"] + ["logger=wandb", "logger.artifacts=[weights]"])
    with pytest.raises(ConfigError, match=r"logger\.artifacts.*'weights'.*selection, adapter"):
        pipeline.run(cfg)
