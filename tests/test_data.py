"""Prompt template, tokenisation with response masks, budgets, pool loading and calibration windows."""

from __future__ import annotations

import json

import pytest

from paser.budget import resolve_budget
from paser.data import (
    PROMPT_NO_INPUT,
    alpaca_prompt,
    calibration_windows,
    encode_sample,
    load_pool,
    pool_from_config,
    ppl_corpus_text,
)
from paser.errors import ConfigError, DataError
from paser.models import tiny_tokenizer
from tests.conftest import DATA_DIR, requires_shared_data


def test_alpaca_prompt_with_and_without_input():
    with_input = alpaca_prompt({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert "paired with an input" in with_input
    without = alpaca_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert without == PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in without


def test_encode_sample_marks_where_the_response_starts():
    tok = tiny_tokenizer()
    sample = {"instruction": "Name a color.", "input": "", "output": "Red."}
    enc = encode_sample(tok, sample, cutoff=1000)
    prompt_ids = tok(alpaca_prompt(sample))["input_ids"]
    assert enc.input_ids[:enc.prompt_len] == prompt_ids
    assert tok.decode(enc.input_ids[enc.prompt_len:-1]) == "Red."
    assert enc.input_ids[-1] == tok.eos_token_id and not enc.truncated
    short = encode_sample(tok, sample, cutoff=10)
    assert len(short.input_ids) == 10 and short.truncated and short.prompt_len == 10


@pytest.mark.parametrize("budget,size,expected", [(0.2, 100, 20), (1.0, 7, 7), (5, 10, 5), (0.001, 100, 1),
                                                  (10, 10, 10)])
def test_budget_resolution(budget, size, expected):
    assert resolve_budget(budget, size) == expected


@pytest.mark.parametrize("budget", [0, -1, 0.0, 11, 3.5, "many", True])
def test_impossible_budgets(budget):
    with pytest.raises(ConfigError, match="budget"):
        resolve_budget(budget, 10)


def test_pool_subsample_is_seeded_and_ordered(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"i{k}", "input": "", "output": f"o{k}"}) + "\n"
                            for k in range(50)))
    a = load_pool(str(path), subsample=10, seed=3)
    b = load_pool(str(path), subsample=10, seed=3)
    c = load_pool(str(path), subsample=10, seed=4)
    assert a.rows == b.rows and a.fingerprint == b.fingerprint and a.rows != c.rows
    numbers = [int(r["instruction"][1:]) for r in a.rows]
    assert numbers == sorted(numbers) and len(a) == 10
    with pytest.raises(ConfigError, match="data.subsample=51"):
        load_pool(str(path), subsample=51)


def test_empty_pool_and_missing_pool(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_pool(str(empty))
    with pytest.raises(DataError, match="not found"):
        load_pool(str(tmp_path / "missing.jsonl"), hub_id=None)


def test_field_map_for_pools_without_input(tmp_path):
    path = tmp_path / "lamini.jsonl"
    path.write_text(json.dumps({"instruction": "q", "response": "a"}) + "\n")
    pool = load_pool(str(path), field_map={"input": None, "output": "response"})
    assert pool.rows == [{"instruction": "q", "input": "", "output": "a"}]


def test_input_is_optional_and_rows_keep_their_line_numbers(tmp_path):
    """Rows without input (or with a null one) get an empty input; blank lines are skipped, and each row's
    line in the file survives the seeded subsample."""
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"instruction": "i1", "output": "o1"}), "",
             json.dumps({"instruction": "i3", "input": None, "output": "o3"}),
             json.dumps({"instruction": "i4", "input": "x4", "output": "o4"}), "   ",
             json.dumps({"instruction": "i6", "output": "o6"})]
    path.write_text("\n".join(lines) + "\n")
    pool = load_pool(str(path))
    assert pool.rows == [{"instruction": "i1", "input": "", "output": "o1"},
                         {"instruction": "i3", "input": "", "output": "o3"},
                         {"instruction": "i4", "input": "x4", "output": "o4"},
                         {"instruction": "i6", "input": "", "output": "o6"}]
    assert pool.lines == (1, 3, 4, 6)
    sub = load_pool(str(path), subsample=2, seed=1)
    for row, line in zip(sub.rows, sub.lines):  # the line holds the row: its instruction is i<line>
        assert row["instruction"] == f"i{line}"
    with pytest.raises(DataError, match=r"p.jsonl:1: field\(s\) \['input'\] must be strings"):
        path.write_text(json.dumps({"instruction": "i", "input": 3, "output": "o"}) + "\n")
        load_pool(str(path))


def test_a_missing_field_points_at_field_map(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: missing field\(s\) \['instruction', 'output'\]; every row needs "
                                        r"\['instruction', 'output'\] and this one has \['prompt', 'completion'\]\. "
                                        r"If your file names them differently, map them to ours with one override, "
                                        r"e.g. data.field_map='\{instruction: prompt, output: completion\}'"):
        load_pool(str(path))
    pool = load_pool(str(path), field_map={"instruction": "prompt", "output": "completion"})
    assert pool.rows == [{"instruction": "q", "input": "", "output": "a"}]


def test_pool_from_config_is_load_pool_with_the_data_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"i{k}", "response": f"o{k}"}) + "\n" for k in range(20)))
    field_map = {"input": None, "output": "response"}
    pool = pool_from_config(name="mine", path=str(path), hub_id=None, split="train", subsample=5, subsample_seed=2,
                            field_map=field_map)
    assert pool == load_pool(str(path), None, "train", 5, 2, field_map=field_map)
    with pytest.raises(ConfigError, match=r"data\.subsampel is not a key of the data config \(mine\); "
                                          r"allowed: path, hub_id, split, subsample, subsample_seed, field_map, drop_duplicates, name"):
        pool_from_config(name="mine", path=str(path), subsampel=5)
    with pytest.raises(ConfigError, match=r"data\.path is not set \(data=jsonl\)"):
        pool_from_config(name="jsonl", path=None)
    with pytest.raises(ConfigError, match=r"data\.field_map: \['ouptut'\] are not fields"):
        pool_from_config(path=str(path), field_map={"ouptut": "response"})
    for bad in (2.5, True, "3"):
        with pytest.raises(ConfigError, match="data.subsample="):
            pool_from_config(path=str(path), field_map=field_map, subsample=bad)


@requires_shared_data()
def test_calibration_windows_are_seeded_slices_of_c4():
    tok = tiny_tokenizer()
    path = str(DATA_DIR / "c4" / "c4-train.00000-of-01024.head.jsonl")
    a = calibration_windows(tok, path, nsamples=4, seqlen=32, seed=0)
    b = calibration_windows(tok, path, nsamples=4, seqlen=32, seed=0)
    c = calibration_windows(tok, path, nsamples=4, seqlen=32, seed=1)
    assert a.shape == (4, 32) and a.equal(b) and not a.equal(c)
    with pytest.raises(ConfigError, match="longer than 1000000 tokens, but 4 windows"):
        calibration_windows(tok, path, nsamples=4, seqlen=10**6)


@requires_shared_data()
def test_ppl_corpora_follow_llm_pruner():
    wiki = ppl_corpus_text("wikitext2", str(DATA_DIR))
    rows = [json.loads(line)["text"] for line in (DATA_DIR / "wikitext2" / "test.rows.jsonl").read_text().splitlines()]
    assert wiki == "\n\n".join(rows)
    ptb = ppl_corpus_text("ptb", str(DATA_DIR))
    assert ptb.startswith("consumers may want to move") and "\n\n" in ptb
    with pytest.raises(ConfigError, match="allowed: wikitext2, ptb"):
        ppl_corpus_text("c4", str(DATA_DIR))


# ------------------------------------------------------------------ compact token ids (#33)

def test_encoded_ids_are_compact_shared_and_read_only():
    """encode_pool keeps a batch's ids in one 2-byte array (tiny vocabulary) that its samples view: about
    2 bytes a token instead of a Python int's 28 and a list slot's 8; the ids still read as a list."""
    import numpy as np

    from paser.data import TokenIds, encode_pool

    tok = tiny_tokenizer()
    rows = [{"instruction": f"Say {i} twice.", "input": "" if i % 2 else "loud", "output": f"{i} {i}"}
            for i in range(40)]
    enc = encode_pool(tok, rows, 512)
    arrays = {id(e.input_ids.array.base) for e in enc}
    assert len(arrays) == 1  # one batch, one array
    flat = enc[0].input_ids.array.base
    assert flat.dtype == np.uint16 and flat.nbytes == 2 * sum(len(e.input_ids) for e in enc)
    for e, r in zip(enc, rows):
        full = tok(alpaca_prompt(r) + r["output"])["input_ids"] + [tok.eos_token_id]
        assert isinstance(e.input_ids, TokenIds) and e.input_ids == full and full == e.input_ids
        assert e.input_ids[: e.prompt_len] == full[: e.prompt_len] and list(e.input_ids) == full
        assert np.asarray(e.input_ids).dtype == np.int64 and np.asarray(e.input_ids).tolist() == full
    with pytest.raises(ValueError, match="read-only"):
        enc[0].input_ids.array[0] = 1
    assert encode_sample(tok, rows[3], 512) == enc[3] and enc[3] != enc[4]


class WideVocabulary:
    """A slow tokenizer whose ids pass 65,536 (LLaMA-3 has 128K): whitespace words, each id 70,000 + a
    word's length."""

    eos_token_id = 70_000
    is_fast = False

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [70_000 + len(w) for w in text.split()]}


def test_ids_past_65536_are_stored_in_four_bytes():
    import numpy as np

    from paser.data import encode_pool

    row = {"instruction": "a bb ccc", "input": "", "output": "dddd"}
    enc = encode_pool(WideVocabulary(), [row], 512)
    assert enc[0].input_ids.array.dtype == np.int32
    assert enc[0].input_ids == [70_000 + len(w) for w in (alpaca_prompt(row) + row["output"]).split()] + [70_000]
