"""Bad input, named: every case a user or a run folder can supply that once ran silently, wrongly or into a
traceback ends in a ConfigError or DataError that names the key, file or line (most before any model
loads), or is handled as stated (duplicate rows dropped and counted, one huge row tokenised in bounded time).

Cases are checked in-process through ``pipeline.build_components`` / ``pipeline.run`` where that is the code
path, and through ``python run.py`` for what only the command line does (exit status 2, the message on
stderr). Not repeated here: unknown options and keys and an out-of-range sparsity through run.py
(tests/test_cli.py), impossible budgets and malformed pool lines (tests/test_pipeline.py), cutoffs beyond
the context, fp16 recovery and a missing pool (tests/test_reliability.py, which also kills runs with
SIGKILL and reruns them), non-boolean trust_remote_code (tests/test_trust.py), claims and
PASER_CLAIM_STALE_S (tests/test_claims.py), damaged cache entries and gc (tests/test_cache.py), a run
folder that already holds results (tests/test_newcomer.py) and crafted results.json configs
(tests/test_capability_recovery.py).
"""

from __future__ import annotations

import json
import logging

import pytest

from paser import pipeline
from paser.data import pool_from_config
from paser.errors import ConfigError
from tests.conftest import TINY_RUN, requires_shared_data

pytestmark = requires_shared_data()


def write_pool(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def distinct_rows(n: int) -> list[dict]:
    return [{"instruction": f"Name the number {i}.", "input": "" if i % 2 else f"context {i}",
             "output": f"It is {i}."} for i in range(n)]


# ------------------------------------------------------------------------------------------ duplicates


def test_every_row_twice_gives_each_row_once_and_says_so(tmp_path, caplog):
    rows = distinct_rows(24)
    copies = [{k: f"  {v}\n" for k, v in r.items()} for r in rows]  # the same up to surrounding whitespace
    path = write_pool(tmp_path / "pool.jsonl", rows + copies)
    with caplog.at_level(logging.WARNING, logger="paser.data"):
        pool = pool_from_config(path=str(path))
    assert pool.rows == rows
    assert pool.lines == tuple(range(1, 25))
    assert "(24 duplicate rows dropped)" in pool.source
    assert "24 of its 48 rows repeat an earlier one" in caplog.text and "25: 1, 26: 2" in caplog.text

    kept = pool_from_config(path=str(path), drop_duplicates=False)
    assert len(kept) == 48 and "(24 duplicate rows kept)" in kept.source


def test_a_row_differing_inside_a_field_is_no_duplicate(tmp_path):
    rows = distinct_rows(3)
    rows.append({**rows[0], "output": rows[0]["output"].replace(" ", "  ")})
    assert len(pool_from_config(path=str(write_pool(tmp_path / "pool.jsonl", rows)))) == 4


def test_no_validation_row_is_a_copy_of_a_candidate(compose_cfg, tmp_path):
    """Duplicates are dropped before the validation rows are drawn: with every row twice, 12 of 20 validation
    rows were copies of training rows (issue #30), so keep=best chose on leaked data."""
    rows = distinct_rows(40)
    path = write_pool(tmp_path / "pool.jsonl", rows + rows)
    parts = pipeline.build_components(compose_cfg(TINY_RUN + [
        "data=jsonl", f"data.path={path}", "data.subsample=null", "recovery.val_size=20", "recovery.keep=best", "budget=10"]))
    validation = {json.dumps(parts.pool.rows[i]) for i in parts.validation}
    assert len(parts.pool) == 40 and len(validation) == 20
    assert not validation & {json.dumps(r) for r in parts.candidates.rows}


def test_drop_duplicates_must_be_a_boolean(tmp_path):
    path = write_pool(tmp_path / "pool.jsonl", distinct_rows(2))
    with pytest.raises(ConfigError, match="data.drop_duplicates='no' is not a boolean"):
        pool_from_config(path=str(path), drop_duplicates="no")


# ------------------------------------------------------------------------------- one huge row

WORDS = "The quick brown fox jumps over the lazy dog, 0123456789 times. "


def sample_texts() -> list[str]:
    """Texts around and far beyond the cut (keep=16: 640 characters), with what moves a tokenizer's seams:
    whitespace runs, long vocabulary words (one token per 12 characters: the cut text is too short and
    is cut again longer), non-Latin scripts and emoji."""
    import random

    rng = random.Random(0)
    pieces = ["word", " ", "  ", "\n\n", "\t", " instruction", "漢字", "😀", "naïve", "-", "0123", "Response:"]
    texts = ["".join(rng.choice(pieces) for _ in range(n)) for n in (50, 200, 330, 400, 1000, 5000)]
    return texts + [" instruction" * 400, " " * 3000 + "x", WORDS * 300]


@pytest.mark.parametrize("chars_per_token", [8, 1])
def test_a_cut_text_gives_the_ids_of_the_whole_text(monkeypatch, chars_per_token):
    """Encodings of a text cut where tokenise_heads cuts it equal those of the whole text (CHARS_PER_TOKEN
    made huge: nothing is cut, the code as before), for a byte-level BPE, a SentencePiece-like one and a
    slow tokenizer, with the text in each field; and so do the baselines' joined encodings and text_heads.
    At 1 character per token the first cut is too short for most texts, which are cut again, longer."""
    from paser import data
    from paser.models import tiny_tokenizer
    from paser.selectors.lm_scores import joined_encoding
    from tests.test_tokenisation import SlowView, sentencepiece_tokenizer

    keep, texts = 16, sample_texts()
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", chars_per_token)
    rows = [{"instruction": "Say it.", "input": "", "output": t} for t in texts] + \
        [{"instruction": t, "input": "", "output": "ok"} for t in texts] + \
        [{"instruction": "Say it.", "input": t, "output": "ok"} for t in texts]
    for tok in (tiny_tokenizer(), sentencepiece_tokenizer(), SlowView(tiny_tokenizer())):
        cut = data._encode(tok, rows, keep, add_eos=True)
        cut_joined = joined_encoding(tok, texts, texts, keep=keep)
        heads = data.text_heads(tok, texts, keep) if tok.is_fast else texts
        with monkeypatch.context() as m:
            m.setattr(data, "CHARS_PER_TOKEN", 10**12)
            whole = data._encode(tok, rows, keep, add_eos=True)
        assert cut == whole
        assert [(ids[:keep], min(s, keep)) for ids, s in cut_joined] == \
            [(ids[:keep], min(s, keep)) for ids, s in joined_encoding(tok, texts, texts)]
        assert [tok(h)["input_ids"][:keep] for h in heads] == [tok(t)["input_ids"][:keep] for t in texts]
    if chars_per_token == 8:
        sp_heads = data.text_heads(sentencepiece_tokenizer(), texts, keep)
        assert [len(h) for h in sp_heads[-3:]] == [4 * 640, 640, 640]  # " instruction" is cut again, longer


@pytest.mark.parametrize("field", ["output", "instruction"])
def test_a_row_of_megabytes_encodes_in_well_under_a_second(monkeypatch, field):
    """A 4 MB row took ~25 s and 1.6 GB (5 MB: 30 s; issue #30: 50 MB, 243 s and 14.5 GB in PASER). Its ids
    are those of the old, whole-text encoding of its first 100,000 characters (the same first tokens)."""
    import time

    from paser import data
    from paser.models import tiny_tokenizer

    tok = tiny_tokenizer()
    row = {"instruction": "Summarise.", "input": "", "output": "Done.", field: (WORDS * 70_000)[:4_000_000]}
    start = time.process_time()  # CPU time: other processes on the core do not count
    [huge] = data.encode_pool(tok, [row], 256)
    assert time.process_time() - start < 0.5
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 10**12)
    assert huge == data._encode(tok, [{**row, field: row[field][:100_000]}], 256, add_eos=True)[0]
    assert huge.truncated and len(huge.input_ids) == 256


def test_embeddings_of_a_huge_instruction_are_those_of_the_whole_text(monkeypatch):
    """The sentence embedder (all-MiniLM-L6-v2, 256 tokens) and the LLM's own hidden states (cutoff tokens)
    read a cut text as they read the whole one: the same vectors, bit for bit."""
    import numpy as np

    from paser import data
    from paser.embedding import load_embedder, mean_hidden_states
    from paser.models import tiny_llama

    texts = ["Name a colour.", (WORDS * 200)[:10_000], "naïve 😀 " * 1000]
    embedder = load_embedder()
    heads = data.text_heads(embedder.tokenizer, texts, embedder.max_seq_length)
    assert [len(h) < len(t) for h, t in zip(heads, texts)] == [False, True, True]
    assert np.array_equal(embedder.encode(heads), embedder.encode(texts))
    model, tok = tiny_llama()
    cut = mean_hidden_states(model, tok, texts, cutoff=64)
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 10**12)
    assert np.array_equal(cut, mean_hidden_states(model, tok, texts, cutoff=64))
