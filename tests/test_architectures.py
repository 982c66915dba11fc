"""Every architecture the configs name, on a tiny random twin built in-process (no download).

Families: Llama-2 (multi-head attention), Llama-3 (GQA), Qwen2.5 (q/k/v biases), Mistral (sliding window),
Mixtral (MoE, fused expert banks), Gemma-3 (scaled embeddings, q/k norms, four norms per layer, mixed
sliding/full layers, final-logit soft-capping) and Baichuan2 (fused ``W_pack`` attention, remote code: a
stand-in module written here with Baichuan2-7B's layout, registered with the Auto classes in-process, as
``trust_remote_code`` would register it).

For each family: every pruner through its Python class on a few calibration windows (achieved sparsity or
shapes, finite logits, save -> load round trip as the pipeline stores a pruned model); where a family cannot
be supported the pruner refuses before any weight is modified, naming the layer; the model-scoring paths of
the selectors (PASER's divergence, IFD's answer losses, Nuggets with and without the reused prefix cache,
Instruction Mining's perplexity) against a plain full-logits forward; one LoRA recovery step; and (slow) one
full tiny pipeline run.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from paser.budget import Budget
from paser.errors import ConfigError
from paser.models import decoder_layers, layer_shapes, load_saved, save_model, tiny_tokenizer
from paser.pruners.common import prunable_weights
from paser.pruners.llm_pruner import LLMPruner
from paser.pruners.llm_pruner_channel import LLMPrunerChannel
from paser.pruners.magnitude import MagnitudePruner
from paser.pruners.sparsegpt import SparseGPTPruner
from paser.pruners.wanda import WandaPruner
from tests.test_selectors_baselines import ROWS as BASELINE_ROWS

HIDDEN, HEADS, KV, HD, INTER, LAYERS = 64, 4, 2, 16, 128, 2
TOK = tiny_tokenizer()
VOCAB = len(TOK)


# ------------------------------------------------------------------------------ Baichuan2 stand-in
# transformers has no Baichuan class (the hub checkpoint ships modeling_baichuan.py). This mirrors the
# layout of Baichuan2-7B's code: model.layers[i].self_attn.W_pack (one Linear, 3 x hidden outputs: q, k, v
# rows stacked), o_proj, RoPE, multi-head attention; mlp.gate_proj/up_proj/down_proj; RMSNorms; an untied
# lm_head that is a NormHead (a row-normalised weight, not an nn.Linear); decoder layers that return tuples
# and a cache taken as ``past_key_values``. Unlike Baichuan's code, the model passes the mask and positions to
# its layers positionally (as some remote code does), which the layer-wise pruners must forward too.

def _baichuan_classes():
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

    class BaichuanTwinConfig(PretrainedConfig):
        model_type = "baichuan_twin"

        def __init__(self, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, rms_norm_eps=1e-6,
                     max_position_embeddings=512, initializer_range=0.02, tie_word_embeddings=False, **kw):
            self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
            self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
            self.rms_norm_eps, self.max_position_embeddings = rms_norm_eps, max_position_embeddings
            self.initializer_range = initializer_range
            super().__init__(tie_word_embeddings=tie_word_embeddings, **kw)

    class RMSNorm(nn.Module):
        def __init__(self, size, eps):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

        def forward(self, x):
            var = x.float().pow(2).mean(-1, keepdim=True)
            return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)

    def rotate_half(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat((-b, a), dim=-1)

    class Attention(nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.hidden_size, self.num_heads = config.hidden_size, config.num_attention_heads
            self.head_dim, self.layer_idx = self.hidden_size // self.num_heads, layer_idx
            self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
            self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None):
            b, t, _ = hidden_states.shape
            proj = self.W_pack(hidden_states)
            proj = proj.unflatten(-1, (3, self.hidden_size)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            q, k, v = (p.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for p in proj)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, device=q.device).float() / self.head_dim))
            freqs = position_ids[:, None, :, None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if past_key_value is not None:
                k, v = past_key_value.update(k, v, self.layer_idx)
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.hidden_size))

    class MLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
            self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
            self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class DecoderLayer(nn.Module):
        def __init__(self, config, layer_idx):
            super().__init__()
            self.self_attn = Attention(config, layer_idx)
            self.mlp = MLP(config)
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None):
            h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_ids,
                                               past_key_value)
            return (h + self.mlp(self.post_attention_layernorm(h)),)

    class NormHead(nn.Module):
        def __init__(self, hidden_size, vocab_size):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

        def forward(self, hidden_states):
            return nn.functional.linear(hidden_states, nn.functional.normalize(self.weight))

    class BaichuanTwinPreTrained(PreTrainedModel):
        config_class = BaichuanTwinConfig
        base_model_prefix = "model"
        _no_split_modules = ("DecoderLayer",)

        def _init_weights(self, module):
            std = self.config.initializer_range
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    class BaichuanTwinModel(BaichuanTwinPreTrained):
        def __init__(self, config):
            super().__init__(config)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_init()

        def get_input_embeddings(self):
            return self.embed_tokens

        def set_input_embeddings(self, value):
            self.embed_tokens = value

        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False,
                    inputs_embeds=None, **kwargs):
            from transformers import DynamicCache

            h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            b, t = h.shape[:2]
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache()
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(t, device=h.device) + past).unsqueeze(0).expand(b, -1)
            keys = torch.arange(past + t, device=h.device)
            mask = (keys[None, :] <= position_ids[0][:, None]).unsqueeze(0).unsqueeze(0)  # causal [1,1,t,past+t]
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, :].bool()
            for layer in self.layers:
                h = layer(h, mask, position_ids, past_key_values if use_cache else None)[0]
            return BaseModelOutputWithPast(last_hidden_state=self.norm(h),
                                           past_key_values=past_key_values if use_cache else None)

    class BaichuanTwinForCausalLM(BaichuanTwinPreTrained, GenerationMixin):
        def __init__(self, config):
            super().__init__(config)
            self.model = BaichuanTwinModel(config)
            self.lm_head = NormHead(config.hidden_size, config.vocab_size)
            self.post_init()

        def get_input_embeddings(self):
            return self.model.embed_tokens

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=False,
                    labels=None, inputs_embeds=None, **kwargs):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                             use_cache=use_cache, inputs_embeds=inputs_embeds)
            logits = self.lm_head(out.last_hidden_state)
            loss = None
            if labels is not None:
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                   ignore_index=-100)
            return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    return BaichuanTwinConfig, BaichuanTwinForCausalLM


def _register_baichuan():
    from transformers import AutoConfig, AutoModelForCausalLM

    config_cls, model_cls = _baichuan_classes()
    try:
        AutoConfig.register(config_cls.model_type, config_cls)
        AutoModelForCausalLM.register(config_cls, model_cls)
    except ValueError:  # already registered (module imported twice)
        config_cls = AutoConfig.for_model(config_cls.model_type).__class__
        model_cls = AutoModelForCausalLM._model_mapping[config_cls]
    return config_cls, model_cls


BAICHUAN_CONFIG, BAICHUAN_MODEL = _register_baichuan()


# -------------------------------------------------------------------------------------------- twins

def _common(**extra):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=512,
                bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
                **extra)


def _build(family: str):
    import transformers as tf

    if family == "llama2":  # multi-head attention, untied head (Llama-2-7B)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_common(tie_word_embeddings=False) | {"num_key_value_heads": HEADS}))
    if family == "llama3":  # GQA, large RoPE base (Llama-3-8B)
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_common(tie_word_embeddings=False, rope_theta=500000.0)))
    if family == "qwen2":  # q/k/v biases, tied embeddings (Qwen2.5-0.5B)
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_common(tie_word_embeddings=True)))
    if family == "mistral":  # sliding-window attention, shorter than the windows used here
        return tf.MistralForCausalLM(tf.MistralConfig(**_common(sliding_window=8, tie_word_embeddings=False)))
    if family == "mixtral":  # 4 experts, top-2 routing, fused expert banks
        return tf.MixtralForCausalLM(tf.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2,
                                                                tie_word_embeddings=False)))
    if family == "gemma3":  # sqrt(hidden)-scaled embeddings, q/k norms, 4 norms per layer, sliding + full layers
        config = tf.Gemma3TextConfig(**_common(head_dim=HD, query_pre_attn_scalar=HD, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"],
                                               final_logit_softcapping=5.0, tie_word_embeddings=True))
        return tf.Gemma3ForCausalLM(config)
    if family == "baichuan2":
        return BAICHUAN_MODEL(BAICHUAN_CONFIG())
    raise KeyError(family)


FAMILIES = ["llama2", "llama3", "qwen2", "mistral", "mixtral", "gemma3", "baichuan2"]
_TWINS: dict[str, nn.Module] = {}


def twin(family: str) -> nn.Module:
    """A fresh copy of the family's seeded random twin (fp32, eval mode)."""
    if family not in _TWINS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = _build(family).eval()
        # random weights of std 0.02 give near-uniform predictions; larger ones (embeddings and heads: std
        # 0.5, logits of a few units) make pruning and Gemma's soft-capping visible
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.mul_(25 if "embed" in name or "lm_head" in name else 4)
        _TWINS[family] = model
    return copy.deepcopy(_TWINS[family])


def calib(n: int = 4, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits_of(model, ids=None) -> torch.Tensor:
    ids = calib(2, 20, seed=5) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def round_trip(model, tmp_path) -> None:
    """save_model -> load_saved (the pipeline's pruned-model cache entry) gives the same logits."""
    expected = logits_of(model)
    save_model(model, TOK, tmp_path / "saved")
    loaded, _ = load_saved(tmp_path / "saved", dtype="float32")
    assert layer_shapes(loaded) == layer_shapes(model)
    torch.testing.assert_close(logits_of(loaded), expected, rtol=1e-4, atol=1e-4)


def test_twins_are_the_families_they_claim():
    assert type(twin("gemma3")).__name__ == "Gemma3ForCausalLM"
    gemma = twin("gemma3")
    assert len(set(gemma.config.layer_types)) == 2 and gemma.config.final_logit_softcapping
    assert float(gemma.model.embed_tokens.embed_scale) == pytest.approx(HIDDEN ** 0.5)
    assert twin("qwen2").model.layers[0].self_attn.q_proj.bias is not None
    assert decoder_layers(twin("baichuan2"))[0].self_attn.W_pack.out_features == 3 * HIDDEN
    for family in FAMILIES:
        assert torch.isfinite(logits_of(twin(family))).all(), family


# ------------------------------------------------------------------------------------------ pruners

UNSTRUCTURED = {
    "magnitude": lambda: MagnitudePruner(0.5),
    "magnitude_2-4": lambda: MagnitudePruner(None, "2:4"),
    "wanda": lambda: WandaPruner(0.5, batch_size=2),
    "wanda_2-4": lambda: WandaPruner(None, "2:4", batch_size=2),
    "sparsegpt": lambda: SparseGPTPruner(0.5, batch_size=2),
    "sparsegpt_2-4": lambda: SparseGPTPruner(None, "2:4", batch_size=2),
}
SLOW = {"sparsegpt_2-4"}  # ~1 s a family: the column sweep is a Python loop


def _pruner_params():
    return [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p for p in sorted(UNSTRUCTURED)]


@pytest.mark.parametrize("pruner", _pruner_params())
@pytest.mark.parametrize("family", FAMILIES)
def test_unstructured_pruners(family, pruner, tmp_path):
    model = twin(family)
    report = UNSTRUCTURED[pruner]().prune(model, calib())
    assert report["sparsity"] == pytest.approx(0.5)
    for name, w in prunable_weights(model):
        assert (w == 0).float().mean().item() == pytest.approx(0.5), name
        if pruner.endswith("2-4"):
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name
    assert torch.isfinite(logits_of(model)).all()
    round_trip(model, tmp_path)


# LLM-Pruner at ratio 0.5 on both layers: a KV group of 2 (GQA: with its 2 query heads) and half of the MLP
BLOCK_SHAPES = {"llama2": {"q_heads": 2, "kv_heads": 2, "intermediate": 64},
                "mixtral": {"q_heads": 2, "kv_heads": 1}}  # MoE experts stay dense (no gate/up/down Linear)
BLOCK_REFUSED = {"baichuan2": "model.layers.0.self_attn.W_pack"}


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_pruner_block(family, tmp_path):
    model = twin(family)
    pruner = LLMPruner(0.5, attention_layers=[0, LAYERS], mlp_layers=[0, LAYERS])
    if family in BLOCK_REFUSED:
        before = weights(model)
        with pytest.raises(ConfigError, match=BLOCK_REFUSED[family]):
            pruner.prune(model, calib())
        assert_unchanged(model, before)
        return
    report = pruner.prune(model, calib())
    expected = BLOCK_SHAPES.get(family, {"q_heads": 2, "kv_heads": 1, "intermediate": 64})
    assert report["layer_shapes"] == [expected] * LAYERS == layer_shapes(model)
    assert report["params"] == sum(p.numel() for p in model.parameters()) < report["params_before"]
    assert torch.isfinite(logits_of(model)).all()
    round_trip(model, tmp_path)


def test_llm_pruner_mlp_only_on_fused_attention(tmp_path):
    """Baichuan's fused W_pack keeps its heads, but its MLP channels can go (and reload)."""
    model = twin("baichuan2")
    report = LLMPruner(0.5, attention_layers=[0, 0], mlp_layers=[0, LAYERS]).prune(model, calib())
    assert report["layer_shapes"] == [{"q_heads": HEADS, "kv_heads": HEADS, "intermediate": 64}] * LAYERS
    assert torch.isfinite(logits_of(model)).all()
    round_trip(model, tmp_path)


CHANNEL_REFUSED = {"mixtral": "model.layers.0.mlp", "baichuan2": "model.layers.0.self_attn.W_pack"}


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_pruner_channel(family, tmp_path):
    model = twin(family)
    pruner = LLMPrunerChannel(0.25)
    if family in CHANNEL_REFUSED:
        before = weights(model)
        with pytest.raises(ConfigError, match=CHANNEL_REFUSED[family]):
            pruner.prune(model, calib())
        assert_unchanged(model, before)
        assert model.config.hidden_size == HIDDEN
        return
    shapes = layer_shapes(model)
    report = pruner.prune(model, calib())
    assert report["hidden_size"] == model.config.hidden_size == 48
    assert model.get_input_embeddings().weight.shape == (VOCAB, 48)
    assert report["layer_shapes"] == shapes  # heads and MLP widths stay
    assert torch.isfinite(logits_of(model)).all()
    round_trip(model, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_runner_reproduces_the_dense_model(family):
    """With nothing pruned, the layer-by-layer pass ends in the model's own last hidden states: every layer
    gets the arguments the model gives it (Gemma-3's full-attention layer its own mask and rotary
    embeddings; the Baichuan stand-in's positional mask and positions)."""
    from paser.pruners.layerwise import prune_layerwise
    from paser.pruners.wanda import SquaredNorms

    model, ids = twin(family), calib(3, 20)
    last, outs = [], []
    h = model.model.norm.register_forward_pre_hook(lambda m, a: last.append(a[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    h = decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    prune_layerwise(model, ids, SquaredNorms, lambda target: None, batch_size=2)
    h.remove()
    torch.testing.assert_close(torch.cat(outs[-2:]), last[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- selectors

# the first eight rows of the baselines' pool (shared fixture rows); every selector picks 3 of them
ROWS = BASELINE_ROWS[:8]
_PRUNED: dict[str, nn.Module] = {}


def pruned_twin(family: str) -> nn.Module:
    """The twin after block-wise LLM-Pruner (fewer heads and channels per layer), or, where that is refused
    (Baichuan), after 50% magnitude pruning."""
    if family not in _PRUNED:
        model = twin(family)
        if family in BLOCK_REFUSED:
            MagnitudePruner(0.5).prune(model)
        else:
            LLMPruner(0.5, attention_layers=[0, LAYERS], mlp_layers=[0, LAYERS]).prune(model, calib())
        _PRUNED[family] = model.eval()
    return _PRUNED[family]


def full_logits_nll(model, ids: list[int], start: int) -> float:
    """Mean NLL of ids[t], t >= max(start, 1), from one plain whole-model forward (soft-capping included)."""
    logp = torch.log_softmax(logits_of(model, torch.tensor([ids]))[0].double(), -1)
    return float(np.mean([-logp[t - 1, ids[t]].item() for t in range(max(start, 1), len(ids))]))


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_losses_equal_the_whole_model_forward(family):
    """IFD's and Instruction Mining's answer losses (the LM head applied at the scored positions only,
    or the whole model for post-processed logits) equal a plain forward's."""
    from paser.selectors.lm_scores import answer_sequences, mean_answer_nll

    model = pruned_twin(family)
    for conditioned in (True, False):
        seqs, starts = answer_sequences(TOK, ROWS[:4], 128, conditioned, prefix="### Response:")
        got = mean_answer_nll(model, seqs, starts, batch_size=3, pad_id=TOK.pad_token_id)
        expected = [full_logits_nll(model, s, st) for s, st in zip(seqs, starts)]
        np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_paser_divergence_equals_the_whole_model_forward(family):
    from paser.selectors.paser.divergence import jsd, sample_divergences, span_bounds

    model, pruned = twin(family), pruned_twin(family)
    seqs = [TOK(t)["input_ids"] for t in ("The quick brown fox jumps over the lazy dog.", "Red, blue", "Eat well.")]
    bounds = span_bounds([len(s) for s in seqs], [3, 2, 1], "full")
    got = sample_divergences(model, pruned, seqs, bounds, jsd, batch_size=2, pad_id=TOK.pad_token_id)
    expected = []
    for s, (first, end) in zip(seqs, bounds):
        p, q = (logits_of(m, torch.tensor([s]))[0, first:end] for m in (model, pruned))
        expected.append(float(jsd(p, q).mean()))
    assert (np.asarray(expected) > 0).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_nuggets_prefix_cache_equals_the_full_pass(family):
    """Nuggets' one-shot pass through the demonstration's reused key/value cache (the model's own cache
    argument: ``cache`` in transformers 5, ``past_key_values`` in remote code) scores like the full pass,
    also past Mistral's and Gemma-3's 8-token sliding windows."""
    from paser.selectors.nuggets import AnchorSet, encode_demonstration

    model = pruned_twin(family)
    anchors = AnchorSet(TOK, ROWS[:3], cutoff=128, prompt_format="alpaca")
    demo = encode_demonstration(TOK, ROWS[3], 128, "alpaca")
    assert len(demo) > 8 and np.isfinite(anchors.zero_shot(model, 2)).all()
    reused = anchors.one_shot(model, demo, batch_size=2, reuse_prefix_kv=True)
    full = anchors.one_shot(model, demo, batch_size=2, reuse_prefix_kv=False)
    np.testing.assert_allclose(reused, full, rtol=1e-4)


class _Embedder:
    """Seeded pseudo-random unit vectors per text (no sentence model)."""

    def encode(self, texts, **kwargs):
        import hashlib

        out = np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=8)
                        for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_selector_selects(family, tmp_path):
    from paser.cache import StageCache
    from paser.components import SelectionContext
    from paser.data import Pool
    from paser.selectors.ifd import IFDSelector
    from paser.selectors.instruction_mining import InstructionMiningSelector
    from paser.selectors.nuggets import NuggetsSelector
    from paser.selectors.paser.selector import PaserSelector

    original, pruned = twin(family), pruned_twin(family)
    ctx = SelectionContext(tokenizer=TOK, original_model=lambda: original, pruned_model=lambda: pruned,
                           embedder=_Embedder, embedder_name="stub", cache=StageCache(tmp_path / "cache"),
                           cache_key={"model": family, "pruner": "p", "pool": "rows"}, seed=0,
                           cutoff=128, batch_size=4)
    pool = Pool(rows=[dict(r) for r in ROWS], source="test", fingerprint="rows")
    selectors = {
        "paser": PaserSelector(clustering={"n_components": 2, "n_neighbors": 3, "k_range": [2, 3]}, plot=False),
        "ifd": IFDSelector(drop_above_one=False),
        "nuggets": NuggetsSelector(n_anchors=2, prefilter=3),  # 3 candidates x 2 anchors
        "instruction_mining": InstructionMiningSelector(coefficients={"perplexity": 1.0, "output_length": 1e-3}),
    }
    for name, selector in selectors.items():
        sel = selector.select(pool, Budget.samples(3), ctx)
        assert len(sel.indices) == len(set(sel.indices)) == 3, name
        if name != "paser":  # Nuggets scores only its prefiltered candidates
            assert np.isfinite(sel.scores[sel.indices]).all(), name


# ------------------------------------------------------------------------------------------ recovery

LORA_TARGETS = {"baichuan2": ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # its experts are 3-D parameters
SAMPLES = [{"instruction": f"Repeat the word number {k}.", "input": "", "output": f"word {k} " * (1 + k)}
           for k in range(2)]


def response_loss(model, samples) -> float:
    """Mean NLL over the response tokens (+ EOS), from plain whole-model forwards."""
    from paser.data import encode_sample

    total, count = 0.0, 0
    for s in samples:
        e = encode_sample(TOK, s, 128)
        logp = torch.log_softmax(logits_of(model, torch.tensor([e.input_ids]))[0].double(), -1)
        for t in range(e.prompt_len, len(e.input_ids)):
            total -= logp[t - 1, e.input_ids[t]].item()
            count += 1
    return total / count


@pytest.mark.parametrize("family", FAMILIES)
def test_one_lora_step(family, tmp_path):
    from paser.recovery import LoraRecovery, merged

    model = copy.deepcopy(pruned_twin(family))
    expected = response_loss(model, SAMPLES)
    rec = LoraRecovery(r=4, alpha=8, dropout=0.0, lr=1e-2, epochs=1, batch_size=2, micro_batch_size=2, cutoff=128,
                       dtype="float32", checkpoint_every=10, warmup_steps=0, val_size=0, keep="last", target_modules=LORA_TARGETS.get(
                           family, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft_model, report = rec.recover(model, TOK, SAMPLES, tmp_path)
    assert report["steps"] == 1
    assert report["final_loss"] == pytest.approx(expected, rel=1e-4)
    adapted = {n.split(".lora_")[0] for n, p in peft_model.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    for target in rec.target_modules:
        if family != "mixtral" or target not in ("gate_proj", "up_proj", "down_proj"):  # Mixtral: 3-D expert banks
            assert any(a.endswith(target) for a in adapted), target
    after = merged(peft_model)
    assert torch.isfinite(logits_of(after)).all()
    assert response_loss(after, SAMPLES) < expected


# ------------------------------------------------------------------------------------------ pipeline

@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_run(family, compose_cfg, tmp_path):
    """One whole run per family on its twin saved as a local model: prune (structured where the family
    allows it), select, recover, evaluate; the pruned model goes through the stage cache (save -> load)."""
    from paser import pipeline
    from tests.conftest import TINY_RUN, requires_shared_data

    if requires_shared_data().args[0]:
        pytest.skip("../shared/data is not beside the repository")
    save_model(twin(family), TOK, tmp_path / "twin")
    overrides = [o for o in TINY_RUN if not o.startswith(("model=", "pruner="))]
    overrides += ["model=local", f"model.path={tmp_path / 'twin'}", "model.dtype=float32",
                  "pruner=magnitude" if family in BLOCK_REFUSED else "pruner=llm_pruner"]
    if family not in BLOCK_REFUSED:
        overrides += ["pruner.calibration.nsamples=2", "pruner.calibration.seqlen=32"]
    if family in LORA_TARGETS:
        overrides.append(f"recovery.target_modules=[{','.join(LORA_TARGETS[family])}]")
    results = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "run")
    for state in ("dense", "pruned", "recovered"):
        assert math.isfinite(results["metrics"][state]["ppl"]["wikitext2"]["ppl"]), state
    assert results["recovery"]["steps"] == 3
