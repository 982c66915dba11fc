"""Perplexity (LLM-Pruner protocol, and with a BOS before every window) against plain per-token loops
written out here; the BOS convention per model config and in the metrics cache key."""

from __future__ import annotations

import json
import math

import pytest
import torch

from paser.errors import ConfigError
from paser.evaluation.perplexity import BOS_MODES, PerplexityEvaluator, corpus_windows, perplexity
from paser.models import tiny_llama
from tests.conftest import CONF, TINY_RUN, compose_config, requires_shared_data

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


# ------------------------------------------------------------------------ BOS before every window

def hand_per_window(model, tok, text: str, seq_len: int) -> tuple[list[float], int]:
    """The per-window-BOS protocol written out: the text tokenised without special tokens, cut into
    consecutive runs of seq_len - 1 tokens (tail dropped), each run scored after a BOS one token at a time;
    (summed NLL per window, scored tokens)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = seq_len - 1
    sums, count = [], 0
    with torch.no_grad():
        for s in range(0, len(ids) - body + 1, body):
            window = [tok.bos_token_id] + ids[s:s + body]
            logits = model(torch.tensor([window])).logits[0].double()
            total = 0.0
            for t in range(seq_len - 1):  # position t predicts token t + 1: every corpus token, never the BOS
                total -= torch.log_softmax(logits[t], dim=-1)[window[t + 1]].item()
                count += 1
            sums.append(total)
    return sums, count


def test_per_window_bos_windows_tile_the_corpus():
    _, tok = tiny_llama()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    windows = corpus_windows(tok, TEXT, 16, bos="per_window")
    assert windows.shape == (len(ids) // 15, 16)
    assert (windows[:, 0] == tok.bos_token_id).all()
    assert windows[:, 1:].reshape(-1).tolist() == ids[: windows.shape[0] * 15]  # no overlap, no gap
    plain = corpus_windows(tok, TEXT, 16)  # the LLaMA-paper convention: one BOS, before the corpus
    assert plain[0, 0] == tok.bos_token_id and (plain[1:, 0] != tok.bos_token_id).all()


def test_per_window_bos_equals_hand_loop(tmp_path):
    (tmp_path / "ptb").mkdir()
    lines = ["the quick brown fox", " jumps over the lazy dog ", "three tips for staying healthy"] * 4
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("\n".join(lines) + "\n")
    text = "\n\n".join(line.strip() for line in lines)
    model, tok = tiny_llama()
    sums, count = hand_per_window(model, tok, text, 16)
    ev = PerplexityEvaluator(corpora=["ptb"], seq_len=16, batch_size=3, data_dir=str(tmp_path), bos="per_window")
    metrics, samples = ev.evaluate_with_samples(model, tok)
    res = metrics["ptb"]
    assert res["bos"] == "per_window" and res["tokens"] == count and res["windows"] == len(sums)
    assert res["ppl"] == pytest.approx(math.exp(sum(sums) / count), rel=1e-5)
    assert samples["ptb/nll"] == pytest.approx(sums, rel=1e-5)
    assert samples["ptb/tokens"].tolist() == [15] * len(sums)
    plain = PerplexityEvaluator(corpora=["ptb"], seq_len=16, data_dir=str(tmp_path)).evaluate(model, tok)["ptb"]
    assert plain["bos"] == "none" and plain["ppl"] != pytest.approx(res["ppl"], rel=1e-3)
    assert plain["ppl"] == pytest.approx(hand_perplexity(model, tok, text, 16)[0], rel=1e-5)


def test_per_window_samples_sum_to_the_perplexity(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_text((TEXT + "\n") * 3)
    model, tok = tiny_llama()
    metrics, samples = PerplexityEvaluator(corpora=["ptb"], seq_len=16, data_dir=str(tmp_path)) \
        .evaluate_with_samples(model, tok)
    nll, tokens = samples["ptb/nll"], samples["ptb/tokens"]
    assert nll.dtype.name == "float64" and len(nll) == metrics["ptb"]["windows"]
    assert math.exp(nll.sum() / tokens.sum()) == pytest.approx(metrics["ptb"]["ppl"], rel=1e-9)


def test_bos_values_are_checked():
    with pytest.raises(ConfigError, match=r"evaluator.ppl.bos='first'.*allowed: \['none', 'per_window'\]"):
        PerplexityEvaluator(bos="first")
    _, tok = tiny_llama()
    tok.bos_token = None
    with pytest.raises(ConfigError, match="per_window needs a BOS token"):
        corpus_windows(tok, TEXT, 16, bos="per_window")


@pytest.mark.parametrize("preset", ["ppl", "quick", "full", "cpu_table"])
def test_the_model_config_picks_the_bos_convention(preset):
    assert compose_config([f"evaluator={preset}"]).evaluator.ppl.bos == "none"  # SmolLM2: LLaMA convention
    cfg = compose_config([f"evaluator={preset}", "model.ppl_bos=per_window"])
    assert cfg.evaluator.ppl.bos == "per_window"
    assert compose_config([f"evaluator={preset}", "model.ppl_bos=per_window",
                           "evaluator.ppl.bos=none"]).evaluator.ppl.bos == "none"  # an explicit choice wins


def test_every_model_preset_states_a_valid_bos_convention():
    import yaml

    for path in sorted((CONF / "model").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["ppl_bos"] in BOS_MODES, path.name


@requires_shared_data()
def test_bos_enters_the_metrics_cache_key_and_results(compose_cfg, tmp_path):
    from paser import pipeline

    base = [o for o in TINY_RUN if not o.startswith("recovery.")] + ["recovery=none", "pruner=none"]
    first = pipeline.run(compose_cfg(base), run_dir=tmp_path / "a")
    assert first["metrics"]["dense"]["ppl"]["wikitext2"]["bos"] == "none"
    neutral = pipeline.run(compose_cfg(base + ["evaluator.ppl.batch_size=1"]), run_dir=tmp_path / "b")
    assert neutral["timings"]["eval_dense"]["reused"] and neutral["metrics"] == first["metrics"]
    bos = pipeline.run(compose_cfg(base + ["evaluator.ppl.bos=per_window"]), run_dir=tmp_path / "c")
    t = bos["timings"]
    assert not t["eval_dense"]["reused"] and t["prune"]["reused"] and t["select"]["reused"]
    assert bos["metrics"]["dense"]["ppl"]["wikitext2"]["bos"] == "per_window"
    assert bos["config"]["evaluator"]["ppl"]["bos"] == "per_window"
    assert bos["metrics"]["dense"]["ppl"] != first["metrics"]["dense"]["ppl"]
