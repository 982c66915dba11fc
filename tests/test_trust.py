"""Remote code runs only when a model config says ``trust_remote_code: true`` with a real boolean, and a
cached pruned model of a remote-code preset reloads with the flag it was loaded with."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from paser.errors import ConfigError
from paser.models import apply_layer_shapes, layer_shapes, load_model, load_saved, save_model, tiny_llama

EVIL = "from pathlib import Path\nPath({marker!r}).write_text('remote code ran')\n"


@pytest.fixture
def remote_code_folder(tmp_path):
    """A saved tiny Llama whose config.json maps AutoConfig to Python beside it, which leaves a marker file
    when it is imported: what a checkpoint with an ``auto_map`` runs under trust_remote_code."""
    folder, marker = tmp_path / "model", tmp_path / "marker"
    save_model(*tiny_llama(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return folder, marker


@pytest.mark.parametrize("value", ["false", "${oc.env:PASER_TEST_UNSET_TRUST,false}", "true", 0, None])
def test_a_non_boolean_trust_remote_code_is_refused_and_no_code_runs(remote_code_folder, value):
    folder, marker = remote_code_folder
    cfg = OmegaConf.create({"name": "local", "kind": "local", "path": str(folder), "dtype": "float32",
                            "trust_remote_code": value})
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code=.* is not a boolean; allowed: true or false"):
        load_model(cfg)
    assert not marker.exists()


def test_load_saved_refuses_a_string_flag(remote_code_folder):
    folder, marker = remote_code_folder
    with pytest.raises(ConfigError, match=r"model\.trust_remote_code='false'"):
        load_saved(folder, trust_remote_code="false")
    assert not marker.exists()


def test_false_loads_the_folder_with_the_library_code(remote_code_folder):
    folder, marker = remote_code_folder
    cfg = OmegaConf.create({"name": "local", "kind": "local", "path": str(folder), "dtype": "float32",
                            "trust_remote_code": False})
    model, _ = load_model(cfg)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()


@pytest.mark.parametrize("structured", [False, True])
def test_a_cached_pruned_model_reloads_with_the_models_trust_remote_code(tmp_path, monkeypatch, structured):
    """Both ways load_saved reads a pruned entry: from_pretrained, and from_config for structured shapes."""
    import transformers

    from paser.pipeline import Models

    model, tok = tiny_llama()
    if structured:
        apply_layer_shapes(model, [{**s, "intermediate": 64} for s in layer_shapes(model)])
    save_model(model, tok, tmp_path / "entry" / "model")
    seen = []

    def recording(cls, name):
        original = getattr(cls, name)

        def call(*args, **kwargs):
            seen.append((f"{cls.__name__}.{name}", kwargs.get("trust_remote_code")))
            return original(*args, **kwargs)
        monkeypatch.setattr(cls, name, call)

    recording(transformers.AutoModelForCausalLM, "from_pretrained")
    recording(transformers.AutoModelForCausalLM, "from_config")
    recording(transformers.AutoConfig, "from_pretrained")
    recording(transformers.AutoTokenizer, "from_pretrained")
    cfg = OmegaConf.create({"model": {"dtype": "float32", "trust_remote_code": True}})
    pruned = Models(cfg, cache=None, device=torch.device("cpu")).load_pruned(tmp_path / "entry")
    loaded = {name for name, _ in seen}
    assert ("AutoModelForCausalLM.from_config" in loaded) == structured
    assert ("AutoModelForCausalLM.from_pretrained" in loaded) != structured
    assert seen and all(flag is True for _, flag in seen), seen
    assert layer_shapes(pruned) == layer_shapes(model)
