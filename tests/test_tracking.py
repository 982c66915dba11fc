"""W&B mode: online when the user is logged in by any standard means, offline otherwise, WANDB_MODE wins."""

from __future__ import annotations

import pytest
import wandb

from paser.tracking import WandbLogger


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

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, data, **kwargs):
        assert "step" not in kwargs  # W&B's global step is never set by hand (see X_AXES)
        self.logged.append(data)


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
