"""What all pruners share: argument errors, embeddings/lm_head untouched, the layer-wise runner, MoE
(a tiny random Mixtral built here), and one slow check on the real SmolLM2-135M."""

from __future__ import annotations

import copy

import pytest
import torch

from paser.errors import ConfigError
from paser.models import decoder_layers, tiny_llama
from paser.pruners.common import parse_nm, prunable_weights, resolve_sparsity, sparsity_report
from paser.pruners.layerwise import prune_layerwise
from paser.pruners.llm_pruner import LLMPruner
from paser.pruners.magnitude import MagnitudePruner
from paser.pruners.sparsegpt import SparseGPTPruner
from paser.pruners.wanda import SquaredNorms, WandaPruner

PRUNERS = {
    "magnitude": lambda: MagnitudePruner(0.5),
    "wanda": lambda: WandaPruner(0.5),
    "wanda_2-4": lambda: WandaPruner(None, "2:4"),
    "sparsegpt": lambda: SparseGPTPruner(0.5),
    "sparsegpt_2-4": lambda: SparseGPTPruner(None, "2:4"),
    "llm_pruner": lambda: LLMPruner(0.5, attention_layers=[1, 3], mlp_layers=[1, 3]),
}


@pytest.mark.parametrize("sparsity", [0, 1, 1.5, -0.1, "0.5", True])
def test_bad_sparsity(sparsity):
    for cls in (MagnitudePruner, WandaPruner, SparseGPTPruner):
        with pytest.raises(ConfigError, match="pruner.sparsity"):
            cls(sparsity)


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "2:4:8", "a:b"])
def test_bad_pattern(pattern):
    with pytest.raises(ConfigError, match="pruner.pattern"):
        parse_nm(pattern)


def test_sparsity_must_agree_with_pattern():
    assert resolve_sparsity(None, "1:4") == (0.25, (1, 4))
    assert resolve_sparsity(0.5, "2:4") == (0.5, (2, 4))
    with pytest.raises(ConfigError, match="pruner.sparsity=0.3 contradicts"):
        WandaPruner(0.3, "2:4")
    with pytest.raises(ConfigError, match="pruner.sparsity is null"):
        MagnitudePruner(None, "unstructured")


def test_nm_needs_divisible_widths():
    model, _tok = tiny_llama(hidden_size=90, num_attention_heads=5, num_key_value_heads=1)  # 90 % 4 != 0
    with pytest.raises(ConfigError, match="divisible by 4"):
        MagnitudePruner(None, "2:4").prune(model)
    with pytest.raises(ConfigError, match="pruner.blocksize"):
        SparseGPTPruner(0.5, blocksize=0)


def test_calibration_required():
    model, _tok = tiny_llama()
    for pruner in (WandaPruner(0.5), SparseGPTPruner(0.5)):
        with pytest.raises(ConfigError, match="pruner.calibration"):
            pruner.prune(model, None)


def test_model_without_decoder_layers():
    with pytest.raises(ConfigError, match="Llama-family"):
        MagnitudePruner(0.5).prune(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_embeddings_norms_and_lm_head_untouched(name):
    model, tok = tiny_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    dense = copy.deepcopy(model)
    report = PRUNERS[name]().prune(model, torch.randint(3, len(tok), (2, 16)))
    for attr in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(model.get_parameter(attr), dense.get_parameter(attr)), attr
    for layer, dlayer in zip(decoder_layers(model), decoder_layers(dense)):
        assert torch.equal(layer.input_layernorm.weight, dlayer.input_layernorm.weight)
    assert report["params"] <= report["params_before"]


def test_layerwise_runner_reproduces_the_dense_model():
    """With nothing pruned, the layer-by-layer pass gives the model's own final hidden states."""
    model, tok = tiny_llama()
    calib = torch.randint(3, len(tok), (3, 20))
    seen = []
    prune_layerwise(model, calib, SquaredNorms, lambda target: seen.append(target.name), batch_size=2)
    assert seen[:7] == [f"layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                  "mlp.down_proj")]
    assert len(seen) == 4 * 7
    last = []
    h = model.model.norm.register_forward_pre_hook(lambda m, a: last.append(a[0]))
    with torch.no_grad():
        model(calib, use_cache=False)
    h.remove()
    outs = []
    h = decoder_layers(model)[3].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    prune_layerwise(model, calib, SquaredNorms, lambda target: None, batch_size=2)
    h.remove()
    # outs: 2 batches while collecting statistics + 2 after "pruning" layer 3
    assert torch.allclose(torch.cat(outs[-2:]), last[0], atol=1e-5)


def test_report_per_layer():
    model, _tok = tiny_llama()
    report = MagnitudePruner(0.25).prune(model)
    assert set(report["sparsity_per_layer"]) == {f"layers.{i}" for i in range(4)}
    assert all(v == pytest.approx(0.25) for v in report["sparsity_per_layer"].values())
    assert report["params_nonzero"] < report["params"] == report["params_before"]


# ------------------------------------------------------------------------------------------- MoE

def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["magnitude", "wanda", "wanda_2-4", "sparsegpt", "sparsegpt_2-4"])
def test_moe_experts_are_pruned(name):
    model = tiny_mixtral()
    dense = copy.deepcopy(model)
    calib = torch.randint(0, 256, (4, 32))
    report = PRUNERS[name]().prune(model, calib)
    names = [n for n, _ in prunable_weights(model)]
    assert "layers.1.mlp.experts.3.gate_up_proj" in names and "layers.1.mlp.experts.3.down_proj" in names
    experts = decoder_layers(model)[0].mlp.experts
    for e in range(4):
        for w in (experts.gate_up_proj[e], experts.down_proj[e]):
            assert (w == 0).float().mean().item() == pytest.approx(0.5)
    assert report["sparsity"] == pytest.approx(0.5)
    router, dense_router = decoder_layers(model)[0].mlp.gate, decoder_layers(dense)[0].mlp.gate
    assert torch.equal(router.weight, dense_router.weight)
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()


def test_moe_wanda_uses_routed_tokens():
    """An expert's statistics come only from the tokens routed to it."""
    model = tiny_mixtral()
    calib = torch.randint(0, 256, (2, 16))
    stats = {}

    def keep(target):
        stats[target.name] = target.stat

    prune_layerwise(model, calib, SquaredNorms, keep)
    counts = [stats[f"layers.0.mlp.experts.{e}.gate_up_proj"].tokens for e in range(4)]
    assert sum(counts) == 2 * 16 * 2  # every token goes to top-2 experts
    assert stats["layers.0.mlp.experts.0.down_proj"].sum.shape == (96,)
    assert sparsity_report(model)["sparsity"] == 0


def test_moe_llm_pruner_prunes_attention_only():
    model = tiny_mixtral()
    report = LLMPruner(0.5, attention_layers=[0, 2], mlp_layers=[0, 2]).prune(model, torch.randint(0, 256, (2, 16)))
    assert [s["kv_heads"] for s in report["layer_shapes"]] == [1, 1]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()


# ------------------------------------------------------------------------------------ real model

@pytest.mark.slow
def test_smollm2_wanda_2_4_and_llm_pruner():
    from omegaconf import OmegaConf

    from paser.cache import StageCache
    from paser.data import calibration_windows
    from paser.evaluation.perplexity import perplexity
    from paser.models import load_model
    from tests.conftest import CONF, DATA_DIR

    model, tok = load_model(OmegaConf.load(CONF / "model" / "smollm2-135m.yaml"), StageCache(".cache/paser"))
    calib = calibration_windows(tok, str(DATA_DIR / "c4" / "c4-train.00000-of-01024.head.jsonl"), 8, 128)
    text = calibration_windows(tok, str(DATA_DIR / "c4" / "c4-validation.00000-of-00008.head.jsonl"), 8, 128)
    dense_ppl = perplexity(model, text)["ppl"]
    wanda = copy.deepcopy(model)
    assert WandaPruner(None, "2:4").prune(wanda, calib)["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert dense_ppl < perplexity(wanda, text)["ppl"] < 20 * dense_ppl
    report = LLMPruner(0.25).prune(model, calib[:4, :64])
    assert report["attention_layers"] == [4, 28]
    assert report["layer_shapes"][10] == {"q_heads": 6, "kv_heads": 2, "intermediate": 1152}
    assert dense_ppl < perplexity(model, text)["ppl"] < 1000


# ------------------------------------------------------------------------------------ ties at the cut

def _lowest_by_hand(values: list[float], k: int) -> set[int]:
    """The k lowest of a list, ties to the lower index: the rule of Wanda's reference (a stable sort)."""
    return set(sorted(range(len(values)), key=lambda j: (values[j], j))[:k])


def _tied_scores(rows=24, cols=32, levels=3, seed=0):
    # few distinct values, as |W| of bf16 (here Q4-derived) weights: the cut falls inside a run of ties
    return torch.randint(0, levels, (rows, cols), generator=torch.Generator().manual_seed(seed)).float()


def test_prune_mask_breaks_ties_by_index():
    # topk leaves the order of ties to the device and kernel (CPU and CUDA pruned different bf16 weights
    # of SmolLM2 with it); the mask must be the same function of the scores everywhere
    from paser.pruners.common import prune_mask

    score = _tied_scores()
    mask = prune_mask(score, 0.5, None)
    for r, row in enumerate(score.tolist()):
        assert set(torch.nonzero(mask[r]).flatten().tolist()) == _lowest_by_hand(row, 16), r
    mask = prune_mask(score, 0.5, (2, 4))
    for r, row in enumerate(score.tolist()):
        for b in range(0, 32, 4):
            got = set((torch.nonzero(mask[r, b:b + 4]).flatten()).tolist())
            assert got == _lowest_by_hand(row[b:b + 4], 2), (r, b)


def test_magnitude_on_bf16_ties():
    model, _ = tiny_llama(seed=0)
    model.to(torch.bfloat16)
    for i, (_, w) in enumerate(prunable_weights(model)):  # values -1, 0, 1: |W| ties everywhere
        w.data.copy_(_tied_scores(*w.shape, seed=i) - 1)
    weights = [w.float().abs() for _, w in prunable_weights(model)]
    MagnitudePruner(0.5).prune(model)
    for (name, w), before in zip(prunable_weights(model), weights):
        k = int(w.shape[1] * 0.5)
        for r in range(0, w.shape[0], 7):
            pruned = set(torch.nonzero(w[r] == 0).flatten().tolist())
            assert pruned == _lowest_by_hand(before[r].tolist(), k) | set(torch.nonzero(before[r] == 0)
                                                                          .flatten().tolist()), (name, r)


def test_sparsegpt_ties_without_correlations():
    # identity Hessian: no error feedback, so SparseGPT keeps the block's highest w^2 and, among equal
    # ones, the mask is the flattened block's lowest indices (row-major), as a stable sort gives
    from paser.pruners.sparsegpt import sparsegpt_prune

    w = _tied_scores(rows=6, cols=8, seed=2) + 1  # 1, 2, 3: no zero weights
    out = sparsegpt_prune(w, torch.eye(8), sparsity=0.5, blocksize=8, percdamp=0.0)
    pruned = set(torch.nonzero((out == 0).flatten()).flatten().tolist())
    assert pruned == _lowest_by_hand(w.pow(2).flatten().tolist(), 24)
