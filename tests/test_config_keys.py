"""Unknown top-level config keys stop the run before anything loads, with the allowed keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from paser.config_keys import TOP_LEVEL_KEYS, check_top_level_keys
from paser.errors import ConfigError
from tests.conftest import CONF, ROOT, TINY_RUN, compose_config


def test_the_allowed_keys_are_the_groups_and_the_roots_own_keys():
    root = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    groups = [g for d in root.pop("defaults") if isinstance(d, dict) for g in d if g != "experiment"]
    assert set(TOP_LEVEL_KEYS) == {*groups, *root}  # the root's own keys include its hydra node


@pytest.mark.parametrize("experiment", [None, *sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))])
def test_every_shipped_preset_passes(experiment):
    check_top_level_keys(compose_config([f"experiment={experiment}"] if experiment else []))


def test_an_unknown_key_fails_before_any_model_loads(tmp_path, monkeypatch):
    from paser import models, pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(pipeline, "load_model", no_model)
    cfg = compose_config([*TINY_RUN, "+budget_tokens=50000", "+sede=1"], tmp_path)
    with pytest.raises(ConfigError, match=r"unknown top-level config keys 'budget_tokens' \(did you mean "
                                          r"'budget_unit'\?\), 'sede' \(did you mean 'seed'\?\).*allowed: paths, "
                                          r"model, data, pruner, selector, recovery, evaluator, logger, name, seed, "
                                          r"budget, budget_unit, scoring, hydra"):
        pipeline.run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_run_py_refuses_it_with_the_allowed_keys(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "+budget_tokens=50000", "logger=none",
                          f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}",
                          f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "ConfigError: unknown top-level config key 'budget_tokens'" in out.stderr + out.stdout
    assert "allowed: paths, model, data" in out.stderr + out.stdout
