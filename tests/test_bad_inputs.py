"""Bad input, named: every case a user or a run folder can supply that once ran silently, wrongly or into a
traceback ends in a ConfigError or DataError that names the key, file or line (most before any model
loads), or is handled as stated (duplicate rows dropped and counted, one huge row tokenised in bounded time).

Cases are checked in-process through ``pipeline.build_components`` / ``pipeline.run`` where that is the code
path, and through ``python run.py`` for what only the command line does (exit status 2, the message on
stderr). Not repeated here: unknown options and keys and an out-of-range sparsity through run.py
(tests/test_cli.py), impossible budgets and malformed pool lines (tests/test_pipeline.py), cutoffs beyond
the context, fp16 recovery and a missing pool (tests/test_reliability.py, which also kills runs with
SIGKILL and reruns them), non-boolean trust_remote_code (tests/test_trust.py), claims and
PASER_CLAIM_STALE_S (tests/test_claims.py), damaged cache entries and gc (tests/test_cache.py), damaged
LoRA checkpoints (tests/test_recovery.py), a run folder that already holds results
(tests/test_newcomer.py), crafted results.json configs (tests/test_capability_recovery.py) and unequal
model and recovery dtypes (tests/test_cold_warm.py).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys

import pytest

from paser import pipeline
from paser.data import pool_from_config
from paser.errors import ConfigError, DataError
from tests.conftest import DATA_DIR, ROOT, TINY_RUN, requires_shared_data

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


# ------------------------------------------------------------- config values: one validation layer


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(pipeline, "load_model", refuse)
    monkeypatch.setattr(pipeline, "load_tokenizer", refuse)


@pytest.mark.parametrize("override,named", [
    ("budget=nan", "budget=nan"), ("budget=inf", "budget=inf"),
    ("seed=abc", "seed='abc'"), ("seed=1.5", "seed=1.5"), ("seed=-1", "seed=-1"),
    ("recovery.lr=nan", "recovery.lr=nan"), ("recovery.lr=inf", "recovery.lr=inf"), ("recovery.lr=0", "recovery.lr=0"),
    ("recovery.lr=-1e-4", "recovery.lr=-0.0001"),
    ("scoring.batch_size=0", "scoring.batch_size=0"), ("recovery.batch_size=0", "recovery.batch_size=0"),
    ("recovery.micro_batch_size=-2", "recovery.micro_batch_size=-2"),
    ("evaluator.ppl.batch_size=0", "evaluator.ppl.batch_size=0"),
    ("recovery.r=0", "recovery.r=0"), ("recovery.dropout=1.5", "recovery.dropout=1.5"),
    ("recovery.dropout=1.0", "recovery.dropout=1.0"), ("recovery.dropout=-0.1", "recovery.dropout=-0.1"),
    ("recovery.checkpoint_every=0", "recovery.checkpoint_every=0"),
    ("evaluator.ppl.max_windows=-1", "evaluator.ppl.max_windows=-1"),
    ("evaluator.ppl.max_windows=0", "evaluator.ppl.max_windows=0"),
    ("name=../../..", "name='../../..'"), ("name=.", "name='.'"), ("name=a/b", "name='a/b'"),
    ("data.drop_duplicates=maybe", "data.drop_duplicates='maybe'"),
])
def test_a_bad_value_is_named_before_any_model_loads(compose_cfg, tmp_path, monkeypatch, override, named):
    """Each once ran into a traceback, some only after pruning and selection, or ran wrongly:
    scoring.batch_size=0 scored in one batch, max_windows=-1 evaluated all windows but one and called it a
    subset, name=../../.. wrote outside paths.output_dir (issue #30)."""
    no_model_loads(monkeypatch)
    with pytest.raises(ConfigError, match="invalid config value") as caught:
        pipeline.run(compose_cfg(TINY_RUN + [override]), run_dir=tmp_path / "r")
    assert f"{named}: allowed " in str(caught.value)
    assert not (tmp_path / "cache").exists()


def test_every_bad_value_is_named_at_once(compose_cfg):
    from paser.validation import problems

    found = problems(compose_cfg(TINY_RUN + ["seed=-1", "recovery.r=0", "evaluator.ppl.max_windows=-1"]))
    assert [p.split(":")[0] for p in found] == ["seed=-1", "recovery.r=0", "recovery.seed=-1",
                                                "evaluator.ppl.max_windows=-1"]


def test_every_preset_passes_the_rules():
    """The rules refuse no value a shipped preset sets (model=local has no path until one is given)."""
    from paser.validation import RULES, problems
    from tests.conftest import CONF, compose_config

    unset = [f"model.path='???': allowed {next(r.allowed for r in RULES if r.keys == 'model.path')}"]
    for group in ("experiment", "model", "pruner", "selector", "recovery", "evaluator", "data", "logger"):
        for option in sorted(f.stem for f in (CONF / group).glob("*.yaml")):
            found = problems(compose_config([f"{group}={option}"]))
            assert found == (unset if option == "local" else []), (group, option)


def local_model(tmp_path, what: str):
    """A model=local folder: missing, empty, or with a config.json and a damaged safetensors file."""
    folder = tmp_path / "model"
    if what != "missing":
        folder.mkdir()
    if what == "damaged":
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    return folder


@pytest.mark.parametrize("what", ["missing", "empty", "damaged", "blank"])
def test_a_local_model_folder_that_holds_no_model_is_named(compose_cfg, tmp_path, monkeypatch, what):
    """model.path= (blank) meant the current folder; a missing or empty folder, or damaged weights, raised
    from transformers or safetensors when the model was loaded."""
    no_model_loads(monkeypatch)
    path = "" if what == "blank" else str(local_model(tmp_path, what))
    overrides = [o for o in TINY_RUN if not o.startswith("model=")] + ["model=local", f"model.path={path}"]
    with pytest.raises(ConfigError, match=rf"model\.path='{path}': allowed a folder holding a model saved"):
        pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "r")


def test_a_saved_model_folder_passes(tmp_path):
    from paser.models import save_model, tiny_llama
    from paser.validation import saved_model_folder

    model, tok = tiny_llama()
    save_model(model, tok, tmp_path / "saved")
    assert saved_model_folder(str(tmp_path / "saved"))


# ------------------------------------------------------------------------------ files and folders


def test_a_pool_line_that_is_not_utf8_is_named_with_file_and_line(tmp_path):
    path = tmp_path / "pool.jsonl"
    good = json.dumps({"instruction": "a", "input": "", "output": "b"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:3: not UTF-8 text \(byte 21 of the line is b'\\xe9'\)"):
        pool_from_config(path=str(path))


def test_a_read_only_cache_on_a_miss_names_paths_cache_dir(compose_cfg, tmp_path, monkeypatch):
    """A claim file that cannot be created (EROFS, as on a read-only mount): the error names
    paths.cache_dir instead of a raw OSError about a .claim file."""
    from paser import cache

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(cache.Claim, "acquire", read_only)
    with pytest.raises(ConfigError, match=rf"paths\.cache_dir={tmp_path / 'cache'} is on a read-only file system"):
        pipeline.run(compose_cfg(TINY_RUN), run_dir=tmp_path / "r")


def test_a_full_disk_names_paths_cache_dir(compose_cfg, tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error ("... (os error 28)"), not as an OSError."""
    from safetensors import SafetensorError

    from paser.stages import prune

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(prune, "save_model", full)
    with pytest.raises(ConfigError, match=rf"paths\.cache_dir={tmp_path / 'cache'} has no space left on its device"):
        pipeline.run(compose_cfg(TINY_RUN), run_dir=tmp_path / "r")


def test_an_unreadable_file_elsewhere_is_not_blamed_on_the_cache(tmp_path):
    from paser.cache import StageCache

    def unreadable(folder):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "pool.jsonl"))

    with pytest.raises(PermissionError):
        StageCache(tmp_path / "cache").get_or_create("x", {"k": 1}, unreadable)


# ------------------------------------------------------------------------------ through run.py


def run_py(tmp_path, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *flags, *TINY_RUN, f"paths.data_dir={DATA_DIR}",
                           f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}", *args],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_run_py_refuses_a_sweep_of_no_job(tmp_path):
    """-m 'seed=range(0,0)' launched nothing and exited 0."""
    out = run_py(tmp_path, "seed=range(0,0)", flags=("-m",))
    assert out.returncode == 2
    assert "the sweep seed=range(0,0) gives no value" in out.stderr
    assert not (tmp_path / "out").exists()


def test_run_py_refuses_a_name_that_leaves_output_dir_before_hydra_makes_a_folder(tmp_path):
    out = run_py(tmp_path / "a" / "b", "name=../../..")
    assert out.returncode == 2 and "name='../../..': allowed a plain folder name" in out.stderr
    assert list(tmp_path.rglob("*")) == []


def test_run_py_names_a_bad_seed(tmp_path):
    out = run_py(tmp_path, "seed=abc")
    assert out.returncode == 2 and "seed='abc': allowed a whole number >= 0" in out.stdout + out.stderr
    assert not (tmp_path / "cache").exists()


def test_sweeps_that_give_values_pass():
    from paser.validation import empty_sweeps

    assert empty_sweeps(["seed=range(0,3)", "budget=0.1,0.2", "name=x"], {"selector": "random,paser"}) == []
    assert empty_sweeps(["seed=range(0,0)"], {"budget": "range(5,5)"}) == ["seed=range(0,0)", "budget=range(5,5)"]
