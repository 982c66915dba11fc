"""LLM-Pruner block-wise: parameter counts from the kept heads/channels, valid GQA layouts, importance
checked against an independent computation, forward/generate, save -> load, untouched layers."""

from __future__ import annotations

import copy

import pytest
import torch

from paser.errors import ConfigError
from paser.models import decoder_layers, load_saved, save_model, tiny_llama
from paser.pruners.llm_pruner import LLMPruner, default_layer_range
from paser.pruners.llm_pruner_channel import LLMPrunerChannel
from tests.conftest import TINY_RUN, compose_config, requires_shared_data

# tiny_llama: hidden 96, 6 query heads / 2 KV heads of head_dim 16, MLP width 128, 4 layers
HIDDEN, HD = 96, 16


def _layer_params(q_heads, kv_heads, inter):
    attn = 2 * HIDDEN * q_heads * HD + 2 * HIDDEN * kv_heads * HD   # q, o + k, v (no biases)
    return attn + 3 * HIDDEN * inter + 2 * HIDDEN                     # gate, up, down + two norms


def _calib(tok, n=2, seqlen=16):
    return torch.randint(3, len(tok), (n, seqlen), generator=torch.Generator().manual_seed(1))


def _dense_with_gradients(model, calib):
    """An independent copy of ``model`` holding the LM-loss gradients on ``calib`` (the reference values)."""
    dense = copy.deepcopy(model)
    dense.zero_grad()
    dense(calib, labels=calib).loss.backward()
    return dense


@pytest.mark.parametrize("gqa, ratio, shape", [("kv_groups", 0.5, (3, 1, 64)),
                                                ("query_heads", 0.34, (4, 2, 84))])
def test_param_count_and_layout(gqa, ratio, shape):
    model, tok = tiny_llama()
    before = sum(p.numel() for p in model.parameters())
    report = LLMPruner(ratio=ratio, gqa=gqa, attention_layers=[1, 3], mlp_layers=[1, 3]).prune(model, _calib(tok))
    # 128 * 0.5 = 64 channels; 128 * 0.34 = 43.5 -> 44 pruned, 84 kept
    expected = before - 2 * (_layer_params(6, 2, 128) - _layer_params(*shape))
    assert report["params"] == expected == sum(p.numel() for p in model.parameters())
    assert report["params_before"] == before
    assert report["param_reduction"] == pytest.approx(1 - expected / before)
    for i, layer in enumerate(decoder_layers(model)):
        q, kv = report["layer_shapes"][i]["q_heads"], report["layer_shapes"][i]["kv_heads"]
        assert q % kv == 0 and layer.self_attn.num_key_value_groups == q // kv
        assert (q, kv, report["layer_shapes"][i]["intermediate"]) == (shape if i in (1, 2) else (6, 2, 128))


def test_kv_groups_removes_the_weak_group_with_its_query_heads():
    model, _tok = tiny_llama()
    attn = decoder_layers(model)[1].self_attn
    with torch.no_grad():  # KV head 0 and its query heads 0..2 made negligible
        for w in (attn.k_proj.weight[:HD], attn.v_proj.weight[:HD], attn.q_proj.weight[:3 * HD],
                  attn.o_proj.weight[:, :3 * HD]):
            w.mul_(1e-3)
    dense = copy.deepcopy(attn)
    LLMPruner(ratio=0.5, importance="l2", attention_layers=[1, 2], mlp_layers=[0, 0]).prune(model, None)
    attn = decoder_layers(model)[1].self_attn
    assert torch.equal(attn.k_proj.weight, dense.k_proj.weight[HD:])
    assert torch.equal(attn.v_proj.weight, dense.v_proj.weight[HD:])
    assert torch.equal(attn.q_proj.weight, dense.q_proj.weight[3 * HD:])
    assert torch.equal(attn.o_proj.weight, dense.o_proj.weight[:, 3 * HD:])


# ---------------------------------------------------------------- GQA grouping: hf (default) vs llama3
# 12 query heads on 4 KV heads (g = 3) of head_dim 8: HF pairs query head h with KV head h // 3, while the
# reference's llama3.py credits its importance to KV head h % 4 (torch_pruning folds the q/o score vectors
# onto k_proj's channels by position). Either way KV head j is removed with query heads 3j, 3j+1, 3j+2.
NQ, NKV, HD8 = 12, 4, 8
G = NQ // NKV


def _gqa_llama(seed=0):
    return tiny_llama(seed=seed, num_attention_heads=NQ, num_key_value_heads=NKV)


def _l2(lin, dim):
    return lin.weight.detach().pow(2).sum(dim)


def _taylor(lin, dim):
    return (lin.weight * lin.weight.grad).detach().abs().sum(dim)


def _reference_llama3_kept_kv(attn, n_drop, score):
    """The reference's rule channel by channel, as llama3.py + its torch_pruning run it: the group rooted at
    k_proj holds k/v output channels (n_kv*hd), q output and o input channels (n_q*hd); a longer score
    vector is aligned to the shortest by view(-1, shortest).sum(0); the rows are summed (grouping 'sum'),
    then each KV head's head_dim consecutive channels (consecutive_groups); the lowest heads go."""
    vectors = [score(attn.k_proj, 1), score(attn.v_proj, 1), score(attn.q_proj, 1), score(attn.o_proj, 0)]
    shortest = min(len(v) for v in vectors)
    aligned = [v.view(len(v) // shortest, shortest).sum(0) for v in vectors]
    per_head = torch.stack(aligned).sum(0).view(-1, HD8).sum(1)
    pruned = per_head.argsort()[:n_drop].tolist()
    return [j for j in range(len(per_head)) if j not in pruned]


def _hf_kept_kv(attn, n_drop, score):
    """Today's default, head by head: query head h's q rows and o columns count for KV head h // g."""
    kv = (score(attn.k_proj, 1) + score(attn.v_proj, 1)).view(NKV, HD8).sum(1)
    q = (score(attn.q_proj, 1) + score(attn.o_proj, 0)).view(NQ, HD8).sum(1)
    credit = [float(kv[j]) for j in range(NKV)]
    for h in range(NQ):
        credit[h // G] += float(q[h])
    pruned = sorted(range(NKV), key=credit.__getitem__)[:n_drop]
    return [j for j in range(NKV) if j not in pruned]


def _assert_kept(attn, dense, kept_kv):
    """The pruned projections are exactly the dense rows/columns of ``kept_kv`` and their HF query heads."""
    kv_rows = torch.cat([torch.arange(j * HD8, (j + 1) * HD8) for j in kept_kv])
    q_rows = torch.cat([torch.arange(h * HD8, (h + 1) * HD8) for j in kept_kv for h in range(j * G, (j + 1) * G)])
    assert torch.equal(attn.k_proj.weight, dense.k_proj.weight.detach()[kv_rows])
    assert torch.equal(attn.v_proj.weight, dense.v_proj.weight.detach()[kv_rows])
    assert torch.equal(attn.q_proj.weight, dense.q_proj.weight.detach()[q_rows])
    assert torch.equal(attn.o_proj.weight, dense.o_proj.weight.detach()[:, q_rows])


@pytest.mark.parametrize("grouping", ["hf", "llama3"])
def test_gqa_grouping_credits_query_heads_to_the_right_kv_head(grouping):
    model, _tok = _gqa_llama()
    attn = decoder_layers(model)[1].self_attn
    with torch.no_grad():  # strong query heads 0, 4, 8 (all on KV head 0 mod 4) and 3, 7, 11 (KV head 3 mod 4)
        for h in (0, 4, 8, 3, 7, 11):
            attn.q_proj.weight[h * HD8:(h + 1) * HD8] *= 3
            attn.o_proj.weight[:, h * HD8:(h + 1) * HD8] *= 3
    dense = copy.deepcopy(attn)
    golden = {"llama3": _reference_llama3_kept_kv(dense, 2, _l2), "hf": _hf_kept_kv(dense, 2, _l2)}
    # by hand: mod 4 each of KV heads 0 and 3 gets three strong heads; // 3 (heads 0-2, 3-5, 6-8, 9-11)
    # KV heads 1 and 2 get two each, 0 and 3 one each: the groupings keep disjoint sets
    assert golden == {"llama3": [0, 3], "hf": [1, 2]}
    LLMPruner(ratio=0.5, importance="l2", gqa_grouping=grouping, attention_layers=[1, 2],
              mlp_layers=[0, 0]).prune(model, None)
    _assert_kept(decoder_layers(model)[1].self_attn, dense, golden[grouping])


def test_gqa_grouping_llama3_matches_the_reference_on_taylor_importance():
    model, tok = _gqa_llama(seed=2)
    calib = _calib(tok)
    dense = _dense_with_gradients(model, calib)
    golden = [_reference_llama3_kept_kv(layer.self_attn, 2, _taylor) for layer in decoder_layers(dense)]
    hf = [_hf_kept_kv(layer.self_attn, 2, _taylor) for layer in decoder_layers(dense)]
    assert golden != hf  # seed 2: the groupings disagree on some layers, so the option is exercised
    LLMPruner(ratio=0.5, importance="param_first", gqa_grouping="llama3", attention_layers=[0, 4],
              mlp_layers=[0, 0]).prune(model, calib)
    for layer, ref, kept in zip(decoder_layers(model), decoder_layers(dense), golden):
        _assert_kept(layer.self_attn, ref.self_attn, kept)


def test_gqa_grouping_llama3_shapes_forward_save_load(tmp_path):
    model, tok = _gqa_llama(seed=2)
    calib = _calib(tok)
    report = LLMPruner(ratio=0.5, gqa_grouping="llama3", attention_layers=[1, 3],
                       mlp_layers=[1, 3]).prune(model, calib)
    for i, layer in enumerate(decoder_layers(model)):
        q, kv = (6, 2) if i in (1, 2) else (NQ, NKV)
        a = layer.self_attn
        assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features) == (q * HD8, kv * HD8, kv * HD8)
        assert (a.o_proj.in_features, a.o_proj.out_features) == (q * HD8, HIDDEN)
        assert a.num_key_value_groups == G
        assert report["layer_shapes"][i] == {"q_heads": q, "kv_heads": kv, "intermediate": 64 if i in (1, 2) else 128}
    with torch.no_grad():
        logits = model(calib).logits
    assert logits.shape == (*calib.shape, model.config.vocab_size) and torch.isfinite(logits).all()
    assert model.generate(calib[:1, :6], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 10)
    save_model(model, tok, tmp_path / "m")
    reloaded, _ = load_saved(tmp_path / "m")
    assert [a.self_attn.k_proj.out_features for a in decoder_layers(reloaded)] == [32, 16, 16, 32]
    with torch.no_grad():
        assert torch.equal(reloaded(calib).logits, logits)


def test_gqa_groupings_agree_without_grouped_queries():
    """Multi-head attention (one query head per KV head): the two groupings are the same ranking."""
    kept = []
    for grouping in ("hf", "llama3"):
        model, tok = tiny_llama(num_key_value_heads=6)
        LLMPruner(ratio=0.5, gqa_grouping=grouping, attention_layers=[0, 4], mlp_layers=[0, 0]).prune(
            model, _calib(tok))
        kept.append([layer.self_attn.k_proj.weight for layer in decoder_layers(model)])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


@requires_shared_data()
def test_gqa_grouping_enters_the_pruner_cache_key(tmp_path):
    from paser.pipeline import Keys, build_components

    base = [o for o in TINY_RUN if not o.startswith("pruner=")] + ["pruner=llm_pruner"]
    keys = {}
    for grouping in (None, "hf", "llama3"):
        cfg = compose_config(base + ([f"pruner.gqa_grouping={grouping}"] if grouping else []), tmp_path)
        parts = build_components(cfg)
        assert parts.pruner.gqa_grouping == (grouping or "hf")
        keys[grouping] = Keys.build(cfg, parts)
    assert keys[None].pruner == keys["hf"].pruner and keys[None].pruner["config"]["gqa_grouping"] == "hf"
    assert keys["llama3"].pruner != keys["hf"].pruner
    assert {k: v for k, v in keys["llama3"].pruner["config"].items() if k != "gqa_grouping"} == \
        {k: v for k, v in keys["hf"].pruner["config"].items() if k != "gqa_grouping"}
    assert keys["llama3"].pruned != keys["hf"].pruned and keys["llama3"].selection != keys["hf"].selection


def test_query_heads_mode_keeps_every_kv_head():
    model, _tok = tiny_llama()
    attn = decoder_layers(model)[2].self_attn
    with torch.no_grad():  # the weakest query head of group 0 is head 1, of group 1 head 5
        for h in (1, 5):
            attn.q_proj.weight[h * HD:(h + 1) * HD] *= 1e-3
            attn.o_proj.weight[:, h * HD:(h + 1) * HD] *= 1e-3
    dense = copy.deepcopy(attn)
    LLMPruner(ratio=0.34, importance="l1", gqa="query_heads", attention_layers=[2, 3],
              mlp_layers=[0, 0]).prune(model, None)
    attn = decoder_layers(model)[2].self_attn
    kept = [0, 2, 3, 4]
    rows = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in kept])
    assert torch.equal(attn.q_proj.weight, dense.q_proj.weight[rows])
    assert torch.equal(attn.k_proj.weight, dense.k_proj.weight)
    assert attn.num_key_value_groups == 2


def test_param_first_matches_independent_taylor_importance():
    model, tok = tiny_llama()
    calib = _calib(tok)
    dense = _dense_with_gradients(model, calib)
    mlp = decoder_layers(dense)[2].mlp
    imp = ((mlp.gate_proj.weight * mlp.gate_proj.weight.grad).abs().sum(1)
           + (mlp.up_proj.weight * mlp.up_proj.weight.grad).abs().sum(1)
           + (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs().sum(0))
    keep = imp.argsort(descending=True)[:96].sort().values
    LLMPruner(ratio=0.25, importance="param_first", attention_layers=[0, 0], mlp_layers=[2, 3]).prune(model, calib)
    pruned = decoder_layers(model)[2].mlp
    assert torch.equal(pruned.gate_proj.weight, mlp.gate_proj.weight.detach()[keep])
    assert torch.equal(pruned.down_proj.weight, mlp.down_proj.weight.detach()[:, keep])


@pytest.mark.parametrize("importance", ["param_first", "param_second", "param_mix", "vectorize", "l1", "l2",
                                        "random"])
def test_forward_generate_save_load(importance, tmp_path):
    model, tok = tiny_llama()
    dense = copy.deepcopy(model)
    calib = _calib(tok)
    pruner = LLMPruner(ratio=0.5, importance=importance, attention_layers=[1, 3], mlp_layers=[1, 3])
    assert pruner.needs_calibration == importance.startswith(("param", "vector"))
    pruner.prune(model, calib if pruner.needs_calibration else None)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(calib).logits
    assert torch.isfinite(logits).all()
    out = model.generate(calib[:1, :6], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 12)
    # layers outside the range are untouched
    for i in (0, 3):
        for (k, v), (k2, v2) in zip(decoder_layers(model)[i].state_dict().items(),
                                    decoder_layers(dense)[i].state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    save_model(model, tok, tmp_path / "m")
    reloaded, _ = load_saved(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(reloaded(calib).logits, logits)


def test_bf16_model_keeps_its_dtype():
    model, tok = tiny_llama()
    model.to(torch.bfloat16)
    LLMPruner(attention_layers=[1, 3], mlp_layers=[1, 3]).prune(model, _calib(tok))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_default_range_scales_the_reference():
    assert default_layer_range(32) == (4, 30)
    assert default_layer_range(30) == (4, 28)   # SmolLM2-135M


@pytest.mark.parametrize("kwargs, key", [({"ratio": 1.0}, "pruner.ratio"), ({"ratio": 0}, "pruner.ratio"),
                                         ({"importance": "taylor"}, "pruner.importance"),
                                         ({"gqa": "heads"}, "pruner.gqa"),
                                         ({"gqa_grouping": "mod"}, r"pruner\.gqa_grouping.*\['hf', 'llama3'\]"),
                                         ({"gqa_grouping": "llama3", "gqa": "query_heads"}, "pruner.gqa_grouping")])
def test_bad_arguments(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LLMPruner(**kwargs)


def test_bad_layer_range_and_missing_calibration():
    model, tok = tiny_llama()
    with pytest.raises(ConfigError, match="pruner.attention_layers"):
        LLMPruner(attention_layers=[2, 9]).prune(model, _calib(tok))
    with pytest.raises(ConfigError, match="calibration"):
        LLMPruner(attention_layers=[1, 2], mlp_layers=[1, 2]).prune(model, None)


# ---------------------------------------------------------------- channel-wise (hidden size)

def _untied_tiny_llama():
    from transformers import LlamaForCausalLM

    model, tok = tiny_llama()
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval(), tok


def test_channel_wise_param_count_and_shapes():
    model, tok = tiny_llama()
    vocab = model.config.vocab_size
    report = LLMPrunerChannel(ratio=0.25).prune(model, _calib(tok))
    h = 72  # 96 hidden channels, 24 removed; heads (6 q / 2 kv of 16) and MLP width 128 unchanged
    per_layer = 2 * h * 6 * HD + 2 * h * 2 * HD + 3 * h * 128 + 2 * h
    expected = vocab * h + 4 * per_layer + h  # tied embeddings/lm_head, 4 layers, final norm
    assert report["params"] == expected == sum(p.numel() for p in model.parameters())
    assert report["hidden_size"] == model.config.hidden_size == h
    assert model.config.head_dim == HD and model.config.num_attention_heads == 6
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(s == {"q_heads": 6, "kv_heads": 2, "intermediate": 128} for s in report["layer_shapes"])


def test_channel_wise_matches_independent_group_taylor_importance():
    model, tok = tiny_llama()
    calib = _calib(tok)
    dense = _dense_with_gradients(model, calib)

    def taylor(p):
        return (p * p.grad).abs()

    imp = taylor(dense.model.embed_tokens.weight).sum(0) + taylor(dense.model.norm.weight)
    for layer in dense.model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            imp = imp + taylor(lin.weight).sum(0)           # columns read the hidden state
        for lin in (a.o_proj, m.down_proj):
            imp = imp + taylor(lin.weight).sum(1)           # rows write it
        imp = imp + taylor(layer.input_layernorm.weight) + taylor(layer.post_attention_layernorm.weight)
    keep = imp.argsort(descending=True)[:72].sort().values
    LLMPrunerChannel(ratio=0.25).prune(model, calib)
    d = dense.model.layers[3]
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight.detach()[:, keep])
    assert torch.equal(model.model.layers[3].self_attn.k_proj.weight, d.self_attn.k_proj.weight.detach()[:, keep])
    assert torch.equal(model.model.layers[3].mlp.down_proj.weight, d.mlp.down_proj.weight.detach()[keep])
    assert torch.equal(model.model.layers[3].input_layernorm.weight, d.input_layernorm.weight.detach()[keep])


@pytest.mark.parametrize("untied", [False, True])
@pytest.mark.parametrize("importance", ["param_second", "vectorize", "l2", "random"])
def test_channel_wise_forward_generate_save_load(untied, importance, tmp_path):
    model, tok = _untied_tiny_llama() if untied else tiny_llama()
    calib = _calib(tok)
    pruner = LLMPrunerChannel(ratio=0.5, importance=importance)
    pruner.prune(model, calib if pruner.needs_calibration else None)
    assert model.lm_head.weight.shape == (model.config.vocab_size, 48)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) != untied
    with torch.no_grad():
        logits = model(calib).logits
    assert torch.isfinite(logits).all()
    assert model.generate(calib[:1, :6], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 10)
    save_model(model, tok, tmp_path / "m")
    reloaded, _ = load_saved(tmp_path / "m")
    assert reloaded.config.hidden_size == 48
    with torch.no_grad():
        assert torch.equal(reloaded(calib).logits, logits)


def test_channel_wise_bad_input_changes_nothing():
    with pytest.raises(ConfigError, match="pruner.importance"):
        LLMPrunerChannel(importance="element")
    model, _tok = tiny_llama()
    decoder_layers(model)[1].mlp.extra = torch.nn.Linear(HIDDEN, 8)  # a layout the pruner does not know
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.extra\.weight"):
        LLMPrunerChannel(importance="l1").prune(model, None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
