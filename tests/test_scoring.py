"""Logits at chosen positions only: the same numbers as the full logits, for plain and post-processed heads."""

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from paser import scoring
from paser.models import tiny_llama
from paser.scoring import (
    answer_nll_sums,
    iter_logits,
    logits_at,
    pad_right,
    span_index,
    token_nll,
    window_token_nll,
)

SEQS = [[1, 5, 9, 13, 17, 21, 25], [4, 8, 12, 16, 20], [7, 11, 15], [3, 6]]
STARTS = [3, 1, 0, 2]  # start 0 scores from the second token (the first has no context); row 4 scores nothing


def tiny_gemma2():
    """A random Gemma 2: logits soft-capped after the LM head."""
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5)).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()[0].eval()


@pytest.mark.parametrize("which", ["llama", "gemma2"])
@torch.no_grad()
def test_logits_at_equal_the_full_logits(which, llama):
    model = llama if which == "llama" else tiny_gemma2()
    ids, mask = pad_right(SEQS, 0)
    full = model(input_ids=ids, attention_mask=mask).logits
    rows, cols = span_index([range(6), range(2, 4), range(0), range(1, 2)], "cpu")
    got = logits_at(model, ids, mask)(rows, cols)
    assert torch.allclose(got, full[rows, cols], atol=1e-5)
    if which == "gemma2":  # the bare head differs: the fallback is what makes them equal
        raw = model.get_output_embeddings()(model.model(input_ids=ids, attention_mask=mask).last_hidden_state)
        assert (raw[rows, cols] - full[rows, cols]).abs().max() > 1e-2


def test_iter_logits_chunks_cover_every_position_once(monkeypatch):
    monkeypatch.setattr(scoring, "HEAD_ROWS", 5)  # head blocks of 5, maths chunks of 3: ragged edges
    rows = torch.arange(13)
    calls = []

    def fn(r, c):
        calls.append(len(r))
        return (r * 10 + c)[:, None].float()

    seen = []
    for chunk, (a, b) in iter_logits((fn, fn), rows, rows, 3):
        assert torch.equal(a[:, 0], (rows[chunk] * 11).float()) and torch.equal(a, b)
        seen += rows[chunk].tolist()
    assert seen == list(range(13)) and calls == [5, 5, 5, 5, 3, 3]


@pytest.mark.parametrize("which", ["llama", "gemma2"])
@torch.no_grad()
def test_answer_nll_sums_equal_the_full_logits_loss(which, llama, monkeypatch):
    monkeypatch.setattr(scoring, "HEAD_ROWS", 4)
    model = llama if which == "llama" else tiny_gemma2()
    ids, mask = pad_right(SEQS, 0)
    nll = token_nll(model(input_ids=ids, attention_mask=mask).logits, ids)  # [B, T-1], target t+1
    want = [float(nll[b, max(s, 1) - 1:len(seq) - 1].double().sum()) for b, (seq, s) in enumerate(zip(SEQS, STARTS))]
    got = answer_nll_sums(model, ids, mask, [len(s) for s in SEQS], STARTS, rows_per_chunk=3)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("which", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_window_token_nll_equals_the_full_logits_nll(which, dtype, llama, monkeypatch):
    """The perplexity windows' NLL from head chunks and logsumexp equals log_softmax of the full logits."""
    monkeypatch.setattr(scoring, "HEAD_ROWS", 5)  # head blocks that do not divide a window
    model = copy.deepcopy(llama if which == "llama" else tiny_gemma2()).to(dtype)
    ids = torch.randint(3, 120, (3, 9), generator=torch.Generator().manual_seed(0))
    want = token_nll(model(ids, use_cache=False).logits, ids)
    got = window_token_nll(model, ids)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, 8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the head's products blocked differently
    assert torch.allclose(got, want, rtol=tol, atol=tol)
