"""Perplexity (LLM-Pruner protocol) against a plain per-token loop written out here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from paser.evaluation.perplexity import PerplexityEvaluator, corpus_windows, perplexity
from paser.models import tiny_llama

TEXT = ("The quick brown fox jumps over the lazy dog. Give three tips for staying healthy. "
        "What are the three primary colors? Red, blue and yellow. Describe the structure of an atom.")


def hand_perplexity(model, tok, text: str, seq_len: int, max_windows: int | None = None) -> tuple[float, int]:
    """Non-overlapping seq_len-token windows of the tokenised text (tail dropped); every next-token NLL
    summed one position at a time."""
    ids = tok(text)["input_ids"]
    starts = list(range(0, len(ids) - seq_len + 1, seq_len))[:max_windows]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in starts:
            window = ids[s:s + seq_len]
            logits = model(torch.tensor([window])).logits[0].double()
            for t in range(seq_len - 1):
                total -= torch.log_softmax(logits[t], dim=-1)[window[t + 1]].item()
                count += 1
    return math.exp(total / count), count


def test_perplexity_equals_token_loop():
    model, tok = tiny_llama()
    expected, count = hand_perplexity(model, tok, TEXT, seq_len=16)
    got = perplexity(model, corpus_windows(tok, TEXT, 16), batch_size=3)
    assert got["tokens"] == count
    assert got["ppl"] == pytest.approx(expected, rel=1e-5)


def test_evaluator_reads_corpora_and_limits_windows(tmp_path):
    rows = ["", " = Title = \n", "", TEXT + "\n", " " + TEXT.upper() + "\n"]
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.rows.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    (tmp_path / "ptb").mkdir()
    ptb_lines = ["the quick brown fox", " jumps over the lazy dog ", "three tips for staying healthy"] * 3
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("\n".join(ptb_lines) + "\n")
    model, tok = tiny_llama()
    res = PerplexityEvaluator(corpora=["wikitext2", "ptb"], seq_len=16, batch_size=2,
                              data_dir=str(tmp_path)).evaluate(model, tok)
    assert res["wikitext2"]["ppl"] == pytest.approx(hand_perplexity(model, tok, "\n\n".join(rows), 16)[0], rel=1e-5)
    ptb_text = "\n\n".join(line.strip() for line in ptb_lines)
    assert res["ptb"]["ppl"] == pytest.approx(hand_perplexity(model, tok, ptb_text, 16)[0], rel=1e-5)
    assert not res["ptb"]["subset"]
    limited = PerplexityEvaluator(corpora=["wikitext2"], seq_len=16, max_windows=2,
                                  data_dir=str(tmp_path)).evaluate(model, tok)["wikitext2"]
    assert limited["windows"] == 2 and limited["subset"]
    assert limited["ppl"] == pytest.approx(hand_perplexity(model, tok, "\n\n".join(rows), 16, 2)[0], rel=1e-5)
