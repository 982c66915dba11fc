"""CDAIS divergences: hand-computed values and the properties a divergence must have."""

import math

import numpy as np
import pytest
import torch

from paser.errors import ConfigError
from paser.selectors.paser.divergence import (
    SlicedWasserstein,
    divergences_to,
    jsd,
    kl,
    make_divergence,
    sample_divergences,
    span_bounds,
)


def logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()  # log 0 = -inf: a "hard zero" logit


def test_jsd_hand_computed():
    # P = (1/2, 1/2, 0), Q = (0, 1/2, 1/2): M = (1/4, 1/2, 1/4),
    # KL(P‖M) = 1/2·ln 2 + 1/2·ln 1 = ln2 / 2 = KL(Q‖M)  →  JSD = ln2 / 2
    assert jsd(logits([[0.5, 0.5, 0.0]]), logits([[0.0, 0.5, 0.5]])).item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    # P = (0.9, 0.1), Q = (0.5, 0.5): M = (0.7, 0.3)
    want = 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)) + \
        0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
    assert jsd(logits([[0.9, 0.1]]), logits([[0.5, 0.5]])).item() == pytest.approx(want, abs=1e-6)


def test_jsd_properties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 500, generator=g) * 4, torch.randn(16, 500, generator=g) * 4
    assert torch.allclose(jsd(a, a), torch.zeros(16), atol=1e-6)
    assert torch.allclose(jsd(a, b), jsd(b, a), atol=1e-6)
    assert (jsd(a, b) > 0).all()
    disjoint = jsd(logits([[1.0, 0.0, 0.0]]), logits([[0.0, 0.5, 0.5]]))
    assert disjoint.item() == pytest.approx(math.log(2), abs=1e-6)  # the maximum, for disjoint supports
    assert (jsd(a * 50, b * 50) <= math.log(2) + 1e-6).all()


def test_divergences_finite_with_zeros():
    p, q = logits([[0.0, 0.0, 1.0], [0.2, 0.0, 0.8]]), logits([[0.0, 0.3, 0.7], [0.0, 0.0, 1.0]])
    for fn in (jsd, kl, SlicedWasserstein(torch.randn(3, 4))):
        assert torch.isfinite(fn(p, q)).all()
    assert kl(p, p).abs().max().item() < 1e-6


def test_kl_hand_computed():
    want = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl(logits([[0.9, 0.1]]), logits([[0.5, 0.5]])).item() == pytest.approx(want, abs=1e-6)


def test_sliced_wasserstein_one_dimensional_is_exact():
    # tokens on a line at 0, 1, 3: any unit direction in 1-D is ±1, so sliced W1 = W1 = |0 − 3| = 3
    sw = SlicedWasserstein(torch.tensor([[0.0], [1.0], [3.0]]), n_projections=4)
    assert sw(logits([[1.0, 0.0, 0.0]]), logits([[0.0, 0.0, 1.0]])).item() == pytest.approx(3.0, abs=1e-5)
    assert sw(logits([[0.5, 0.5, 0.0]]), logits([[0.0, 0.5, 0.5]])).item() == pytest.approx(1.5, abs=1e-5)


def test_bad_choices_are_config_errors():
    with pytest.raises(ConfigError, match="allowed"):
        make_divergence("hellinger")
    with pytest.raises(ConfigError, match="span"):
        span_bounds([3], [1], "prompt")


def test_sample_divergences_on_tiny_models(models):
    model, pruned, tok = models
    seqs = [tok(t)["input_ids"] for t in ("The quick brown fox", "Eat a balanced diet and sleep well.", "Red")]
    bounds = span_bounds([len(s) for s in seqs], [2, 3, 1], "full")
    same = sample_divergences(model, model, seqs, bounds, jsd, batch_size=2, pad_id=tok.pad_token_id)
    assert np.allclose(same, 0, atol=1e-6)
    mean = sample_divergences(model, pruned, seqs, bounds, jsd, batch_size=2, pad_id=tok.pad_token_id)
    total = sample_divergences(model, pruned, seqs, bounds, jsd, "sum", batch_size=1, pad_id=tok.pad_token_id)
    assert (mean[:2] > 0).all() and np.isfinite(mean).all()
    counts = np.array([e - f for f, e in bounds])
    assert np.allclose(total, mean * np.maximum(counts, 1), rtol=1e-4)  # batching does not change results
    # each sample alone gives the same value as in a padded batch
    alone = [sample_divergences(model, pruned, [s], [b], jsd, pad_id=tok.pad_token_id)[0]
             for s, b in zip(seqs, bounds)]
    assert np.allclose(alone, mean, rtol=1e-4, atol=1e-7)
    # several models against one original in one pass: each row is that model's own sample_divergences
    both = divergences_to(model, [pruned, model], seqs, bounds, jsd, batch_size=2, pad_id=tok.pad_token_id)
    assert both.shape == (2, 3) and np.array_equal(both[0], mean) and np.array_equal(both[1], same)


def reference_jsd(a, b, dtype=torch.float32):
    """Straightforward JSD in ``dtype``: ½KL(P‖M) + ½KL(Q‖M), the terms where p (q) = 0 dropped."""
    lp, lq = torch.log_softmax(a.to(dtype), -1), torch.log_softmax(b.to(dtype), -1)
    p, q = lp.exp(), lq.exp()
    lm = ((p + q) / 2).log()
    return 0.5 * (torch.where(p > 0, p * (lp - lm), 0).sum(-1) + torch.where(q > 0, q * (lq - lm), 0).sum(-1))


# nats per position, fp32 maths on bf16 or fp32 logits. Measured on 256 rows: the fused jsd is within
# 4.3e-7 of fp64 at every JSD from 1e-6 to ln 2, the straightforward fp32 computation within 4e-6 (at ~ln 2)
JSD_ATOL_FP32, JSD_ATOL_FP64 = 5e-6, 6e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noise", [0.001, 0.01, 0.3, 3.0])  # JSD ~1e-6 (nearly equal models) .. ~ln 2
def test_jsd_equals_straightforward_references(dtype, noise):
    # LM-head-like logits over SmolLM2's vocabulary (49,152): a rank-64 head of random hidden states
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(49152, 64, generator=g) * 0.4, torch.randn(48, 64, generator=g)
    a, b = (h @ w.T).to(dtype), ((h + noise * torch.randn(h.shape, generator=g)) @ w.T).to(dtype)
    got = jsd(a, b).double()
    assert torch.equal(a, (h @ w.T).to(dtype))  # the inputs are left as they were
    assert (got - reference_jsd(a, b).double()).abs().max() <= JSD_ATOL_FP32
    assert (got - reference_jsd(a, b, torch.float64)).abs().max() <= JSD_ATOL_FP64


def reference_divergences(model, pruned, seqs, bounds, reduction):
    """Each sample alone, whole-sequence logits, the straightforward JSD."""
    out = []
    for seq, (first, end) in zip(seqs, bounds):
        ids = torch.tensor([seq])
        with torch.no_grad():
            v = reference_jsd(model(input_ids=ids).logits[0, first:end], pruned(input_ids=ids).logits[0, first:end])
        out.append(0.0 if end <= first else float(v.mean() if reduction == "mean" else v.sum()))
    return np.array(out)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sample_divergences_equal_the_whole_logits_reference(models, reduction, monkeypatch):
    from paser import scoring

    monkeypatch.setattr(scoring, "HEAD_ROWS", 5)  # several head blocks and ragged maths chunks per batch
    model, pruned, tok = models
    texts = ("The quick brown fox jumps", "Eat a balanced diet and sleep well.", "Red", "Two words")
    seqs = [tok(t)["input_ids"] for t in texts]
    for span, prompts in (("full", [2, 3, 1, 1]), ("response", [2, 3, 9, 1]), ("instruction", [0] * 4)):
        bounds = span_bounds([len(s) for s in seqs], prompts, span)
        got = sample_divergences(model, pruned, seqs, bounds, jsd, reduction, batch_size=3,
                                 pad_id=tok.pad_token_id, rows_per_chunk=3)
        want = reference_divergences(model, pruned, seqs, bounds, reduction)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-7), span
