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
