"""Calibration windows (issue #16.5): the references' sampling (Wanda lib/data.py and SparseGPT datautils.py
``get_c4``: Python's ``random`` seeded once, per window a random document drawn again until it is longer
than the window, then a random start) reproduced exactly; the hub source and its offline error; a local
file with too few long documents (an error, or the opt-in concatenation, recorded); ``seqlen`` following
the model's context; the options in the prune cache key and the report in results.json."""

from __future__ import annotations

import json
import random

import pytest
import torch

from paser import pipeline
from paser.data import C4_HUB_FILES, C4_HUB_ID, calibration_recipe, calibration_set, calibration_windows
from paser.errors import ConfigError
from tests.conftest import DATA_DIR, TINY_RUN, compose_config, requires_shared_data


class WordTokenizer:
    """Each document is a string of integers; its tokens are those integers (with a BOS-like 1 first, as
    a LLaMA tokenizer adds one), so that a window tells which document and offset it came from."""

    def __call__(self, text, return_tensors=None):
        assert return_tensors == "pt"
        return {"input_ids": torch.tensor([[1] + [int(w) for w in text.split()]])}


def synthetic_documents(n=60, seed=123) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(str(1000 * (k + 1) + j) for j in range(rng.randint(3, 45))) for k in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "url": "x"}) + "\n" for t in texts))
    return str(path)


def tokens(text) -> list[int]:
    return WordTokenizer()(text, return_tensors="pt")["input_ids"][0].tolist()


def reference_loop(texts, nsamples, seed, seqlen) -> list[list[int]]:
    """The references' get_c4 loop, written out independently: the module-level ``random`` seeded once,
    ``randint`` over all documents until one is longer than seqlen, then ``randint`` for the start."""
    state = random.getstate()
    try:
        random.seed(seed)
        out = []
        for _ in range(nsamples):
            while True:
                doc = tokens(texts[random.randint(0, len(texts) - 1)])
                if len(doc) > seqlen:
                    break
            start = random.randint(0, len(doc) - seqlen - 1)
            out.append(doc[start:start + seqlen])
        return out
    finally:
        random.setstate(state)


def recipe(**kw):
    base = {"path": None, "nsamples": 30, "seqlen": 20, "seed": 0}
    return calibration_recipe({**base, **kw})


def test_with_replacement_equals_the_reference_loop(tmp_path):
    texts = synthetic_documents()
    path = write_jsonl(tmp_path / "c4.jsonl", texts)
    for seed in (0, 7):
        windows, report = calibration_set(WordTokenizer(), recipe(path=path, seed=seed, sampling="with_replacement"))
        assert windows.tolist() == reference_loop(texts, 30, seed, 20)
        assert report["sampling"] == "with_replacement" and report["source"] == "local"
        docs = report["documents"]
        assert docs["available"] == 60 and docs["longer_than_seqlen"] == sum(len(tokens(t)) > 20 for t in texts)
        assert docs["longer_than_seqlen"] == 37  # enough (>= 30) for the reference way
        assert docs["used"] == len(set(report["document_indices"])) < 30  # documents repeat, as drawn with replacement
        assert any("local file" in d for d in report["differs_from_reference"])


def test_hub_source_loads_the_references_shard_and_draws_the_same_way(monkeypatch):
    import datasets

    texts = synthetic_documents(25, seed=5)  # 13 long documents for 30 windows: the hub shard has no such check
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return [{"text": t, "timestamp": "", "url": ""} for t in texts]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    windows, report = calibration_set(WordTokenizer(), recipe(source="hub", sampling="with_replacement"))
    assert calls == [((C4_HUB_ID,), {"data_files": {"train": C4_HUB_FILES}, "split": "train"})]
    assert (C4_HUB_ID, C4_HUB_FILES) == ("allenai/c4", "en/c4-train.00000-of-01024.json.gz")
    assert windows.tolist() == reference_loop(texts, 30, 0, 20)
    assert report["source"] == "hub" and report["from"] == f"{C4_HUB_ID} {C4_HUB_FILES}"
    assert report["differs_from_reference"] == [] and report["note"] is None


def test_hub_offline_is_a_config_error_naming_the_key(monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what datasets raises without a network (nothing is fetched here)
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"pruner\.calibration\.source=hub.*ConnectionError.*source=local"):
        calibration_set(WordTokenizer(), recipe(source="hub", sampling="with_replacement"))


def test_without_replacement_keeps_todays_windows(tmp_path):
    """The CPU editions' recipe: the documents in one seeded shuffle, a random window of each long one."""
    texts = synthetic_documents()
    path = write_jsonl(tmp_path / "c4.jsonl", texts)
    rng = random.Random(3)
    order = list(range(len(texts)))
    rng.shuffle(order)
    want = []
    for i in order:
        doc = tokens(texts[i])
        if len(doc) > 20 and len(want) < 30:
            start = rng.randint(0, len(doc) - 20 - 1)
            want.append(doc[start:start + 20])
    got = calibration_windows(WordTokenizer(), path, nsamples=30, seqlen=20, seed=3)
    assert got.tolist() == want
    _, report = calibration_set(WordTokenizer(), recipe(path=path, nsamples=30, seed=3))
    assert report["sampling"] == "without_replacement" and report["documents"]["used"] == 30
    assert report["documents"]["longer_than_seqlen"] is None  # not counted: the walk stopped early


@pytest.mark.parametrize("sampling", ["with_replacement", "without_replacement"])
def test_too_few_long_documents_is_an_error_naming_the_numbers(tmp_path, sampling):
    texts = synthetic_documents()
    path = write_jsonl(tmp_path / "c4.jsonl", texts)
    long_ones = sum(len(tokens(t)) > 30 for t in texts)
    assert 0 < long_ones < 30
    with pytest.raises(ConfigError) as e:
        calibration_set(WordTokenizer(), recipe(path=path, nsamples=40, seqlen=30, sampling=sampling))
    msg = str(e.value)
    for part in (f"only {long_ones} of 60 documents", "longer than 30 tokens", "40 windows",
                 "pruner.calibration.source=hub", "pruner.calibration.seqlen or nsamples",
                 "pruner.calibration.fallback=concatenate"):
        assert part in msg, (part, msg)


def test_concatenate_fallback_is_opt_in_and_recorded(tmp_path, caplog):
    texts = synthetic_documents()
    path = write_jsonl(tmp_path / "c4.jsonl", texts)
    with caplog.at_level("WARNING", logger="paser.data"):
        windows, report = calibration_set(WordTokenizer(), recipe(path=path, seqlen=30, sampling="with_replacement",
                                                                  fallback="concatenate", seed=2))
    stream = [t for text in texts for t in tokens(text)]  # each document as tokenised, in file order
    rng = random.Random(2)
    starts = [rng.randint(0, len(stream) - 30 - 1) for _ in range(30)]
    assert windows.tolist() == [stream[s:s + 30] for s in starts]
    assert report["sampling"] == "concatenated" and report["fallback"] == "concatenate"
    assert "joined end to end" in report["note"] and "fallback=concatenate" in report["note"]
    assert any("concatenated" in d for d in report["differs_from_reference"])
    assert 0 < report["documents"]["used"] <= 60 and report["document_indices"] is None
    assert any("joined end to end" in r.message for r in caplog.records)
    # enough long documents: the fallback is not used and the windows are the reference loop's
    windows, report = calibration_set(WordTokenizer(), recipe(path=path, sampling="with_replacement",
                                                              fallback="concatenate"))
    assert report["sampling"] == "with_replacement" and windows.tolist() == reference_loop(texts, 30, 0, 20)


def test_seqlen_follows_the_model_context_and_options_are_checked():
    assert calibration_recipe({"path": "x", "nsamples": 4, "seqlen": "model", "seed": 0}, 4096).seqlen == 4096
    with pytest.raises(ConfigError, match="seqlen=model needs model.context_length"):
        calibration_recipe({"path": "x", "nsamples": 4, "seqlen": "model", "seed": 0})
    with pytest.raises(ConfigError, match="seqlen=4096 exceeds the model context"):
        calibration_recipe({"path": "x", "nsamples": 4, "seqlen": 4096, "seed": 0}, 2048)
    for key, bad in (("source", "web"), ("sampling", "bootstrap"), ("fallback", "pad")):
        with pytest.raises(ConfigError, match=f"pruner.calibration.{key}='{bad}'; allowed"):
            calibration_recipe({"path": "x", "nsamples": 4, "seqlen": 8, "seed": 0, key: bad})
    with pytest.raises(ConfigError, match="pruner.calibration.nsamples=0"):
        calibration_recipe({"path": "x", "nsamples": 0, "seqlen": 8, "seed": 0})


@pytest.mark.parametrize("experiment, source, seqlen, sampling", [
    ("wanda_2-4", "hub", 4096, "with_replacement"),       # Wanda: the model's context (LLaMA-2)
    ("sparsegpt_50", "hub", 2048, "with_replacement"),    # SparseGPT: 2048
    ("mixtral_8x7b", "hub", 2048, "with_replacement"),
    ("table1_cpu", "local", 64, "without_replacement"),   # CPU editions as before (LLM-Pruner's 10 x 64)
])
def test_presets_calibration(tmp_path, experiment, source, seqlen, sampling):
    c = compose_config([f"experiment={experiment}"], tmp_path).pruner.calibration
    assert (c.source, c.seqlen, c.sampling, c.fallback) == (source, seqlen, sampling, "error")
    wanda_cpu = compose_config(["pruner=wanda"], tmp_path).pruner.calibration
    assert (wanda_cpu.source, wanda_cpu.seqlen, wanda_cpu.nsamples, wanda_cpu.sampling) == \
        ("local", 512, 128, "without_replacement")
    other_model = compose_config([f"experiment={experiment}", "model=llama3-8b"], tmp_path).pruner.calibration
    if experiment == "wanda_2-4":
        assert other_model.seqlen == 8192  # follows the model


# ------------------------------------------------------------------ pipeline: cache key and report

WANDA = [o for o in TINY_RUN if not o.startswith(("pruner=", "recovery."))] + [
    "recovery=none", "pruner=wanda", "pruner.calibration.nsamples=4", "pruner.calibration.seqlen=64"]


@requires_shared_data()
def test_calibration_key_covers_every_option(tmp_path):
    cfg = compose_config(WANDA, tmp_path)
    base = pipeline.calibration_key(cfg.pruner.calibration, 512)
    for change in ({"sampling": "with_replacement"}, {"fallback": "concatenate"}, {"seqlen": 32},
                   {"nsamples": 5}, {"seed": 1}, {"source": "hub"}):
        node = {**dict(cfg.pruner.calibration), **change}
        assert pipeline.calibration_key(node, 512) != base, change
    hub = {**dict(cfg.pruner.calibration), "source": "hub", "path": "/nowhere"}
    assert pipeline.calibration_key(hub, 512)["hub"] == [C4_HUB_ID, C4_HUB_FILES]  # no local file needed
    assert pipeline.calibration_key({**hub, "data_files": "en/c4-train.00001-of-01024.json.gz"}, 512) != \
        pipeline.calibration_key(hub, 512)
    model = {**dict(cfg.pruner.calibration), "seqlen": "model"}
    assert pipeline.calibration_key(model, 512) == pipeline.calibration_key({**model, "seqlen": 512}, 512)


@requires_shared_data()
def test_a_new_option_misses_the_prune_cache_and_the_report_records_the_source(tmp_path, monkeypatch):
    import datasets

    rows = [json.loads(line) for line in (DATA_DIR / "c4" / "c4-train.00000-of-01024.head.jsonl").open()][:200]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)  # the hub, offline
    first = pipeline.run(compose_config(WANDA, tmp_path), run_dir=tmp_path / "r1")
    c = first["prune"]["calibration"]
    assert (c["source"], c["sampling"], c["seqlen"], c["nsamples"]) == ("local", "without_replacement", 64, 4)
    assert c["documents"]["used"] == 4 and c["from"].endswith("c4-train.00000-of-01024.head.jsonl")
    saved = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert saved["prune"]["calibration"] == c
    again = pipeline.run(compose_config(WANDA, tmp_path), run_dir=tmp_path / "r2")
    assert again["timings"]["prune"]["reused"] and again["prune"]["calibration"] == c
    hub = pipeline.run(compose_config(WANDA + ["pruner.calibration.source=hub",
                                               "pruner.calibration.sampling=with_replacement"], tmp_path),
                       run_dir=tmp_path / "r3")
    assert not hub["timings"]["prune"]["reused"]
    h = hub["prune"]["calibration"]
    assert (h["source"], h["from"], h["sampling"]) == ("hub", f"{C4_HUB_ID} {C4_HUB_FILES}", "with_replacement")
    assert h["differs_from_reference"] == []
