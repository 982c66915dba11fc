"""PaserSelector end to end on the tiny random Llama with a magnitude-pruned copy and a stub embedder."""

import copy
import io
import json

import numpy as np
import pytest

from paser.budget import Budget
from paser.cache import StageCache
from paser.components import SelectionContext
from paser.data import Pool
from paser.errors import ConfigError
from paser.selectors.paser.selector import PaserSelector

TOPICS = {
    "cooking": ("Explain how to bake bread with whole wheat flour.", "Knead the dough, let it rise, bake it."),
    "astronomy": ("Describe the orbit of Mars around the sun.", "Mars follows an elliptical orbit."),
    "coding": ("Write a python function that reverses a string.", "def rev(s): return s[::-1]"),
}


def make_pool(n_per_topic=12) -> Pool:
    rows = []
    for topic, (instruction, output) in TOPICS.items():
        for i in range(n_per_topic):
            rows.append({"instruction": f"{instruction} Variant {i} about {topic}.",
                         "input": "" if i % 3 else f"context {i}", "output": f"{output} " + "detail " * (i % 5)})
    return Pool(rows=rows, source="test", fingerprint="paser-test-pool")


class StubEmbedder:
    """Deterministic bag-of-words vectors: samples of one topic share most words, so they cluster."""

    def encode(self, texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, sum(map(ord, word)) % 64] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_ctx(models, tmp_path, seed=0, calls=None):
    model, pruned, tok = models

    def factory(m, name):
        def f():
            if calls is not None:
                calls.append(name)
            return m
        return f

    return SelectionContext(tokenizer=tok, original_model=factory(model, "original"),
                            pruned_model=factory(pruned, "pruned"), embedder=StubEmbedder,
                            embedder_name="stub", cache=StageCache(tmp_path / "cache"),
                            cache_key={"model": "tiny", "pruner": "mag50", "pool": "paser-test-pool"},
                            seed=seed, cutoff=64, batch_size=4)


SMALL_CLUSTERING = {"n_components": 4, "n_neighbors": 5, "k_range": [2, 6]}
SMALL = {"clustering": SMALL_CLUSTERING}


def small(**clustering) -> dict:
    return {"clustering": {**SMALL_CLUSTERING, **clustering}}


def test_end_to_end_diagnostics_and_files(models, tmp_path):
    pool = make_pool()
    sel = PaserSelector(**SMALL).select(pool, Budget.samples(12), make_ctx(models, tmp_path))
    d = sel.diagnostics
    assert 0 < len(sel.indices) <= 12 and len(set(sel.indices)) == len(sel.indices)
    assert sel.indices == sorted(sel.indices) and max(sel.indices) < len(pool)
    assert d["selected"] == len(sel.indices) and d["allocated"] <= 12
    assert sum(c["size"] for c in d["clusters"]) == len(pool)
    assert all(c["selected"] <= c["n_k"] <= c["size"] for c in d["clusters"])
    assert d["clustering"]["n_clusters"] == 3  # the three planted topics
    # each cluster is named by its topic's phrases (RAKE over instruction + input)
    tops = {" | ".join(c["top_concepts"]) for c in d["clusters"]}
    assert all(any(t in named for named in tops) for t in ("cooking", "astronomy", "coding")), tops
    assert 0 <= d["jsd"]["min"] <= d["jsd"]["max"] <= np.log(2)
    assert d["ccg"]["accepted"] == len(sel.indices) and d["ccg"]["concepts"] > 0
    assert set(d["stage_times_s"]) >= {"s2ric", "cdais", "ntm"}
    json.dumps(d)  # JSON-able for results.json
    png = sel.artifacts["paser_clusters.png"]
    assert png.startswith(b"\x89PNG") and len(png) > 1000 and d["files"] == sorted(sel.artifacts)
    arrays = np.load(io.BytesIO(sel.artifacts["paser_samples.npz"]))
    assert arrays["selected"].sum() == len(sel.indices) and arrays["labels"].shape == (len(pool),)
    assert np.allclose(arrays["divergence"], sel.scores)


def test_same_seed_same_selection_and_cached_scores(models, tmp_path):
    pool = make_pool()
    calls: list[str] = []
    a = PaserSelector(**SMALL).select(pool, Budget.samples(10), make_ctx(models, tmp_path, calls=calls))
    assert "original" in calls
    calls.clear()
    # an allocation ablation reuses the cached JSD: no model is touched
    b = PaserSelector(**small(allocation="equal")).select(pool, Budget.samples(10), make_ctx(models, tmp_path, calls=calls))
    assert calls == [] and np.array_equal(a.scores, b.scores)
    c = PaserSelector(**SMALL).select(pool, Budget.samples(10), make_ctx(models, tmp_path / "fresh"))
    assert a.indices == c.indices


def test_budget_is_filled_by_default_and_short_with_the_bare_formula(models, tmp_path):
    pool = make_pool()  # three clusters of 12; a budget of 10 floors to 3 per cluster (9)
    kw = {**SMALL, "use_ntm": False}
    filled = PaserSelector(**kw).select(pool, Budget.samples(10), make_ctx(models, tmp_path))
    assert len(filled.indices) == 10 and filled.diagnostics["unfilled"] == 0
    bare = PaserSelector(**kw, redistribute=False).select(pool, Budget.samples(10), make_ctx(models, tmp_path))
    assert sum(c["n_k"] for c in bare.diagnostics["clusters"]) < 10 and len(bare.indices) < 10


def test_ablation_switches(models, tmp_path):
    pool = make_pool()
    calls: list[str] = []
    no_cdais = PaserSelector(**SMALL, use_cdais=False).select(pool, Budget.samples(9), make_ctx(models, tmp_path, calls=calls))
    assert calls == [] and no_cdais.scores is None  # no model is run
    assert [c["n_k"] for c in no_cdais.diagnostics["clusters"]] == [3, 3, 3]  # by size: 12 each
    one = PaserSelector(**SMALL, use_s2ric=False, use_ntm=False).select(pool, Budget.samples(9), make_ctx(models, tmp_path))
    assert one.diagnostics["clustering"]["n_clusters"] == 1 and "ccg" not in one.diagnostics
    # no clustering, no NTM: the global top 9 by IES
    arrays = np.load(io.BytesIO(one.artifacts["paser_samples.npz"]))
    assert sorted(np.argsort(-arrays["ies"], kind="stable")[:9].tolist()) == one.indices
    for kw in (small(reducer="pca"), {**SMALL, "divergence": "kl"},
               {**SMALL, "divergence": "wasserstein", "span": "response"},
               {**small(allocation="sqrt"), "redistribute": True, "cluster_order": "cds"}, small(n_clusters=2)):
        sel = PaserSelector(**kw).select(pool, Budget.samples(9), make_ctx(models, tmp_path))
        assert 0 < len(sel.indices) <= 9


@pytest.mark.parametrize("kw, key", [
    ({"clustering": {"reducer": "lle"}}, "clustering.reducer"), ({"divergence": "tv"}, "divergence"),
    ({"clustering": {"allocation": "cubic"}}, "clustering.allocation"), ({"span": "all"}, "span"),
    ({"clustering": {"n_clusters": "ten"}}, "clustering.n_clusters"), ({"concept_fields": ["title"]}, "concept"),
    ({"clustering": {"n_componets": 4}}, "unknown key.*n_componets"), ({"concepts": "yake"}, "concepts")])
def test_bad_config(kw, key):
    with pytest.raises(ConfigError, match=key):
        PaserSelector(**kw)


@pytest.mark.slow
def test_real_smollm_and_minilm(tmp_path):
    """SmolLM2-135M and its 50% magnitude-pruned copy, the real MiniLM embedder, 40 Alpaca samples."""
    from omegaconf import OmegaConf

    from paser.data import load_pool
    from paser.embedding import load_embedder
    from paser.models import load_model
    from paser.pruners.magnitude import MagnitudePruner
    from tests.conftest import CONF, DATA_DIR

    cache = StageCache(tmp_path.parent / "paser-slow-cache")
    model, tok = load_model(OmegaConf.load(CONF / "model" / "smollm2-135m.yaml"), cache)
    pruned = copy.deepcopy(model)
    MagnitudePruner(0.5).prune(pruned)
    pool = load_pool(str(DATA_DIR / "alpaca" / "alpaca_data.jsonl"), subsample=40, seed=0)
    ctx = SelectionContext(tokenizer=tok, original_model=lambda: model, pruned_model=lambda: pruned,
                           embedder=load_embedder, embedder_name="all-MiniLM-L6-v2", cache=cache,
                           cache_key={"model": "smollm2", "pruner": "mag50", "pool": pool.fingerprint},
                           seed=0, cutoff=128, batch_size=8)
    sel = PaserSelector(clustering={"n_components": 4, "n_neighbors": 5, "k_range": [2, 8]}).select(pool, Budget.samples(8), ctx)
    assert 0 < len(sel.indices) <= 8
    assert 0.0 < sel.diagnostics["jsd"]["mean"] < np.log(2)
