"""The ablations the paper reports beyond the stage switches: clustering alternatives (Table 12), LLM
hidden-state embeddings, the negative-transfer alternatives and the put-back ablation, the authors' stated
concept settings, and the paraphrased-conflict pool. Each runs on the tiny model and the planted-topic pool
of tests/test_paser_selector.py; expected values are worked out by hand or by an independent computation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

from paser.budget import Budget
from paser.embedding import embed_pool, instruction_text
from paser.errors import ConfigError
from paser.selectors import clustering_methods
from paser.selectors.clustered import clustering_block, s2ric_labels
from paser.selectors.paser.concepts import ConceptGraph, ConceptSimilarity, rake
from paser.selectors.paser.selector import CosineScreen, KeywordScreen, PaserSelector, ntm_walk
from tests.conftest import TINY_RUN, requires_shared_data
from tests.test_paser_selector import SMALL, SMALL_CLUSTERING, make_ctx, make_pool

ALTERNATIVES = ["nmf_tfidf", "lda_tfidf", "kmeans_tfidf", "spectral"]
TOPICS = np.repeat(np.arange(3), 12)  # make_pool: 12 samples of each of three topics, in order


def arrays(selection) -> dict:
    return dict(np.load(io.BytesIO(selection.artifacts["paser_samples.npz"])))


# ------------------------------------------------------------------------------ clustering alternatives

@pytest.mark.parametrize("method", ALTERNATIVES)
def test_each_clustering_method_finds_the_planted_topics_and_paser_selects_within_budget(models, tmp_path, method):
    sel = PaserSelector(clustering={**SMALL_CLUSTERING, "method": method}).select(
        make_pool(), Budget.samples(12), make_ctx(models, tmp_path))
    d = sel.diagnostics
    assert 0 < len(sel.indices) <= 12 and d["cost"] <= 12
    assert d["clustering"]["method"] == method and d["clustering"]["k_rule"] == "error_elbow"
    assert d["clustering"]["n_clusters"] == 3 and adjusted_rand_score(TOPICS, arrays(sel)["labels"]) == 1.0
    assert d["ntm"]["method"] == "ccg" and d["ccg"]["examined"] >= len(sel.indices)
    assert "paser_clusters.png" not in sel.artifacts  # no reduced coordinates to draw


def test_auto_k_is_the_elbow_of_the_reported_error_curve(models, tmp_path):
    _, d = clustering_methods.method_labels(make_ctx(models, tmp_path), make_pool(),
                                            clustering_block({"method": "kmeans_tfidf", "k_range": [2, 8]}))
    ks = np.array([int(k) for k in d["k_search"]], dtype=float)
    errors = np.array(list(d["k_search"].values()))
    # by hand: both axes scaled to [0, 1]; the elbow is the point furthest below the first-to-last chord
    scaled = (ks - ks[0]) / (ks[-1] - ks[0]) + (errors - errors.min()) / (errors.max() - errors.min())
    assert d["n_clusters_requested"] == int(ks[np.argmin(scaled)])
    assert d["error_measure"] == "relative_within_cluster_ss" and np.all(np.diff(errors) <= 1e-9)


def test_the_fitting_errors_are_what_they_say():
    texts = [instruction_text(r) for r in make_pool().rows]
    x = clustering_methods.tfidf(texts)
    labels, error = clustering_methods.fit("kmeans_tfidf", x, 3, seed=0)
    dense = x.toarray()
    within = sum(((dense[labels == k] - dense[labels == k].mean(0)) ** 2).sum() for k in range(3))
    assert error == pytest.approx(within / ((dense - dense.mean(0)) ** 2).sum())
    from sklearn.decomposition import NMF

    _, error = clustering_methods.fit("nmf_tfidf", x, 3, seed=0)
    model = NMF(n_components=3, init="nndsvda", random_state=0, max_iter=400)
    w = model.fit_transform(x)
    assert error == pytest.approx(np.linalg.norm(dense - w @ model.components_) / sp.linalg.norm(x), rel=1e-6)


def test_a_fixed_k_and_the_hybrids(models, tmp_path):
    from paser.selectors.instruction_mining import InstructionMiningSelector

    labels, d = clustering_methods.method_labels(make_ctx(models, tmp_path), make_pool(),
                                                 clustering_block({"method": "nmf_tfidf", "n_clusters": 2}))
    assert d["k_rule"] == "fixed" and d["n_clusters"] == 2 and "k_search" not in d
    assert sorted(np.bincount(labels).tolist()) == sorted(d["cluster_sizes"]) and np.bincount(labels)[0] == 24
    for method in ("lda_tfidf", "spectral"):
        sel = InstructionMiningSelector(coefficients={"output_length": 1.0}, cluster="s2ric",
                                        clustering={**SMALL_CLUSTERING, "method": method}).select(
            make_pool(), Budget.samples(9), make_ctx(models, tmp_path))
        info = sel.diagnostics["clustering"]
        assert len(sel.indices) == 9 and info["method"] == method and info["n_clusters"] == 3
        assert sum(c["selected"] for c in info["per_cluster"].values()) == 9


def test_clusterings_of_different_methods_never_share_a_cache_entry(models, tmp_path, monkeypatch):
    ctx, pool = make_ctx(models, tmp_path), make_pool()
    fitted = []
    real_fit = clustering_methods.fit
    monkeypatch.setattr(clustering_methods, "fit", lambda method, *a, **k: fitted.append(method) or real_fit(method, *a, **k))
    block = clustering_block({**SMALL_CLUSTERING, "n_clusters": 3})
    first, _ = s2ric_labels(ctx, pool, {**block, "method": "kmeans_tfidf"})
    assert fitted == ["kmeans_tfidf"]
    _, info = s2ric_labels(ctx, pool, block)  # S²RIC itself, not the k-means entry
    assert fitted == ["kmeans_tfidf"] and "reducer" in info
    s2ric_labels(ctx, pool, {**block, "method": "nmf_tfidf"})
    assert fitted == ["kmeans_tfidf", "nmf_tfidf"]
    again, _ = s2ric_labels(ctx, pool, {**block, "method": "kmeans_tfidf"})  # read back, not refitted
    assert fitted == ["kmeans_tfidf", "nmf_tfidf"] and np.array_equal(first, again)


@pytest.mark.parametrize("block, message", [
    ({"method": "dbscan"}, r"selector\.clustering\.method='dbscan' is unknown"),
    ({"method": "kmeans_tfidf", "min_cluster_size": 3}, r"min_cluster_size=3 works with method=s2ric only"),
    ({"method": "spectral", "n_clusters": 0}, r"n_clusters=0"),
])
def test_a_bad_clustering_block_names_its_key(block, message):
    with pytest.raises(ConfigError, match=message):
        PaserSelector(clustering=block)


# ------------------------------------------------------------------------------ LLM hidden-state embeddings

def test_model_hidden_is_the_mean_of_the_llms_last_hidden_states_without_bos(models, tmp_path):
    model, _, tok = models
    ctx = make_ctx(models, tmp_path)
    ctx.embedder_name = "model_hidden"
    rows = make_pool().rows[::7]  # texts of different lengths: one padded batch
    got = embed_pool(ctx, rows)
    lengths = []
    for row, vector in zip(rows, got):  # one text at a time, through the causal LM's own hidden_states
        ids = tok(instruction_text(row), return_tensors="pt", truncation=True, max_length=ctx.cutoff)["input_ids"]
        assert ids[0, 0] == tok.bos_token_id
        lengths.append(len(tok(instruction_text(row))["input_ids"]))
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 1:]
        mean = states.mean(0)
        np.testing.assert_allclose(vector, (mean / mean.norm()).numpy(), atol=1e-5)
    assert max(lengths) > ctx.cutoff > min(lengths)  # texts cut at scoring.cutoff, and texts not cut


def test_model_hidden_embeddings_are_cached_per_model_state(models, tmp_path):
    rows = make_pool().rows[:6]

    def embed(name, pruner):
        calls: list[str] = []
        ctx = make_ctx(models, tmp_path, calls=calls)
        ctx.embedder_name, ctx.cache_key = name, {**ctx.cache_key, "pruner": pruner}
        return embed_pool(ctx, rows), calls

    original, calls = embed("model_hidden", "mag50")
    assert calls == ["original"]
    assert embed("model_hidden", "other")[1] == []  # the original model's states do not depend on the pruner
    pruned, calls = embed("model_hidden_pruned", "mag50")
    assert calls == ["pruned"] and not np.allclose(pruned, original)
    assert embed("model_hidden_pruned", "other")[1] == ["pruned"]  # another pruning: computed again


def test_spectral_clustering_on_model_hidden_states(models, tmp_path):
    ctx = make_ctx(models, tmp_path)
    ctx.embedder_name = "model_hidden"
    sel = PaserSelector(clustering={**SMALL_CLUSTERING, "method": "spectral", "n_clusters": 3}).select(
        make_pool(), Budget.samples(12), ctx)
    d = sel.diagnostics["clustering"]
    assert d["embedder"] == "model_hidden" and d["n_clusters"] == 3 and 0 < len(sel.indices) <= 12


# ------------------------------------------------------------------------------ negative-transfer alternatives

def walk_rows(screen, concepts: list[list[str]], keep_rejected=False, n=None):
    """ntm_walk over rows whose concepts are given, taken in index order (key decreasing) in one cluster."""
    rows = [{"concepts": c} for c in concepts]
    n = len(rows) if n is None else n
    return ntm_walk(rows, np.zeros(len(rows), dtype=np.int64), -np.arange(len(rows), dtype=float),
                    np.array([n]), [0], concepts_of=lambda row: row["concepts"], screen=screen,
                    keep_rejected=keep_rejected)


def test_keyword_filtering_by_hand():
    concepts = [["red apple", "green tree"],    # words {red, apple, green, tree}: accepted
                ["red apple", "blue sky"],      # vs 0: 2 shared of 6 = 0.33 < 0.5: accepted
                ["apple red", "green"],         # vs 0: 3 of 4 = 0.75: rejected
                ["blue sky", "apple"],          # vs 1: 3 of 4 = 0.75: rejected (vs 0: 1 of 6)
                ["tree", "sky", "dog"]]         # vs 0: 1 of 6; vs 1: 1 of 6: accepted
    walk = walk_rows(KeywordScreen(np.zeros(5, dtype=np.int64), 0.5), concepts)
    assert walk["selected"] == [0, 1, 4] and walk["rejected"] == [2, 3]
    assert [(e["index"], e["with"], e["jaccard"]) for e in walk["rejected_examples"]] == [(2, 0, 0.75), (3, 1, 0.75)]
    assert dict(walk["rejected_concepts"]) == {"apple red": 1, "green": 1, "blue sky": 1, "apple": 1}
    # other clusters are not compared: sample 2 alone in its cluster is accepted
    walk = ntm_walk([{"c": c} for c in concepts], np.array([0, 0, 1, 0, 0]), -np.arange(5.0), np.array([5, 5]),
                    [0, 1], concepts_of=lambda row: row["c"], screen=KeywordScreen(np.array([0, 0, 1, 0, 0]), 0.5))
    assert walk["rejected"] == [3]


def test_cosine_thresholding_by_hand():
    angle = np.deg2rad([0, 20, 60, 10, 80])  # cosines to sample 0: 0.94, 0.5, 0.98, 0.17
    x = np.stack([np.cos(angle), np.sin(angle)], 1)
    labels = np.array([0, 0, 0, 1, 0])
    walk = ntm_walk([{"c": []}] * 5, labels, -np.arange(5.0), np.array([5, 5]), [0, 1],
                    concepts_of=lambda row: ["x"], screen=CosineScreen(labels, x, 0.9))
    # 1 is within 20° of 0 (cos 0.94 >= 0.9): rejected; 2 at 60°/40° accepted; 3 is alone in cluster 1;
    # 4 is 20° from 2 (cos 0.94): rejected
    assert walk["selected"] == [0, 2, 3] and walk["rejected"] == [1, 4]
    assert [e["with"] for e in walk["rejected_examples"]] == [0, 2]
    assert walk["rejected_examples"][0]["cosine"] == pytest.approx(np.cos(np.deg2rad(20)), abs=1e-4)


def test_put_back_takes_the_rejected_samples_and_still_reports_them():
    concepts = [["a", "b"], ["c", "d"], ["a", "c"], ["e"], ["f"]]  # 2 links a and c, both known: conflict
    kept = walk_rows(None, concepts, keep_rejected=True, n=3)
    assert kept["selected"] == [0, 1, 2] and kept["rejected"] == [2]  # what the walk without NTM takes
    assert kept["rejected_examples"][0]["conflict"] == ["a", "c"]
    assert walk_rows(None, concepts, n=3)["selected"] == [0, 1, 3]


@pytest.mark.parametrize("kw", [{"ntm": "keyword"}, {"ntm": "cosine", "ntm_threshold": 0.9},
                                {"ntm": "ccg", "ntm_keep_rejected": True}, {"ntm": "keyword", "ntm_keep_rejected": True},
                                {"ntm": "none"}])
def test_each_ntm_option_selects_within_a_token_budget_with_its_diagnostics(models, tmp_path, kw):
    pool = make_pool()
    costs = np.random.default_rng(0).integers(1, 40, len(pool))
    budget = Budget.tokens(int(costs.sum() * 0.3), costs)
    sel = PaserSelector(**SMALL, **kw).select(pool, budget, make_ctx(models, tmp_path))
    d = sel.diagnostics
    assert costs[sel.indices].sum() == d["cost"] <= budget.size
    if kw["ntm"] == "none":
        assert "ntm" not in d and "ccg" not in d
        return
    ntm = d["ntm"]
    assert ntm["method"] == kw["ntm"] and ntm["rejected"] > 0
    assert ntm["rejection_rate"] == pytest.approx(ntm["rejected"] / ntm["examined"])
    assert all(e["concepts"] for e in ntm["rejected_examples"]) and ntm["rejected_concepts"][0][1] >= 1
    rejected = np.flatnonzero(arrays(sel)["rejected"]).tolist()
    assert len(rejected) == ntm["rejected"]
    assert set(rejected) <= set(sel.indices) if kw.get("ntm_keep_rejected") else not set(rejected) & set(sel.indices)
    if not kw.get("ntm_keep_rejected"):  # a token budget is spent to within one sample
        assert budget.size - d["cost"] < costs.max() or ntm["examined"] == len(pool)


def test_put_back_selects_what_no_ntm_selects(models, tmp_path):
    pool, ctx = make_pool(), make_ctx(models, tmp_path)
    kept = PaserSelector(**SMALL, ntm_keep_rejected=True).select(pool, Budget.samples(12), ctx)
    assert kept.indices == PaserSelector(**SMALL, use_ntm=False).select(pool, Budget.samples(12), ctx).indices
    assert kept.indices == PaserSelector(**SMALL, ntm="none").select(pool, Budget.samples(12), ctx).indices
    assert kept.diagnostics["ntm"]["rejected"] > 0 and kept.diagnostics["ntm"]["keep_rejected"] is True


@pytest.mark.parametrize("kw, message", [
    ({"ntm": "bloom"}, r"selector\.ntm='bloom'"),
    ({"use_ntm": False, "ntm": "cosine"}, r"use_ntm=false contradicts selector\.ntm=cosine"),
    ({"ntm": "ccg", "ntm_threshold": 0.5}, r"ntm_threshold=0\.5 applies to ntm=keyword\|cosine"),
    ({"ntm": "cosine", "ntm_threshold": 1.5}, r"ntm_threshold=1\.5 must be a number in \(0, 1\]"),
    ({"ntm": "none", "ntm_keep_rejected": True}, r"ntm_keep_rejected=true puts back"),
])
def test_a_bad_ntm_setting_names_its_key(kw, message):
    with pytest.raises(ConfigError, match=message):
        PaserSelector(**kw)


# ------------------------------------------------------------------------------ the authors' concept settings

def test_key_phrases_of_two_to_four_words():
    text = "Quantum chromodynamics and lattice gauge theory of the strong nuclear force binding energy scale, and bread."
    # candidates, cut at stop words and punctuation, RAKE score = sum of degree/frequency (each word once):
    # "strong nuclear force binding energy scale" 6 x 6 = 36, "lattice gauge theory" 3 x 3 = 9,
    # "quantum chromodynamics" 2 x 2 = 4, "bread" 1
    assert rake(text, max_words=4, min_words=2) == ["lattice gauge theory", "quantum chromodynamics"]
    assert rake(text, max_words=6, min_words=2)[0] == "strong nuclear force binding energy scale"
    assert rake(text, max_words=4) == ["lattice gauge theory", "quantum chromodynamics", "bread"]


def similarity(vectors: dict[str, tuple[float, float]], threshold=0.75) -> ConceptSimilarity:
    x = np.array(list(vectors.values()), dtype=np.float32)
    return ConceptSimilarity(list(vectors), x / np.linalg.norm(x, axis=1, keepdims=True), threshold)


def test_similar_concepts_are_one_vertex_of_the_graph():
    angle = {"gauge theory": 0, "gauge theories": 40, "gauge thing": 42, "bread": 90, "oven": 135}
    vectors = {k: (np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))) for k, a in angle.items()}
    # cos 40° = 0.766 >= 0.75: "gauge theories" is the vertex "gauge theory"; cos 42° = 0.743 < 0.75: not
    graph = ConceptGraph(similarity=similarity(vectors))
    assert graph.try_add(["gauge theory", "oven"]) is None and graph.try_add(["bread"]) is None
    assert graph.conflict(["gauge theories", "bread"]) == ("gauge theory", "bread")
    assert graph.conflict(["gauge thing", "bread"]) is None
    assert ConceptGraph().conflict(["gauge theories", "bread"]) is None  # without similarity: unknown concept
    assert graph.try_add(["gauge theories", "oven"]) is None  # linked through "gauge theory": accepted
    assert graph.n_concepts == 3 and graph.vertices_of(["gauge theories", "oven"]) == ["gauge theory", "oven"]
    graph.add(["gauge thing", "bread"])  # a new vertex, matched from then on
    assert graph.vertices_of(["gauge thing"]) == ["gauge thing"] and graph.n_concepts == 4


def test_paser_paper_settings_select_within_budget(models, tmp_path, compose_cfg):
    import hydra
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(compose_cfg(["selector=paser_paper"]).selector, resolve=True)
    node["clustering"].update(SMALL_CLUSTERING)
    sel = hydra.utils.instantiate(node, _convert_="all").select(make_pool(), Budget.samples(12),
                                                                make_ctx(models, tmp_path))
    ntm = sel.diagnostics["ntm"]
    assert 0 < len(sel.indices) <= 12 and ntm["method"] == "ccg" and ntm["concept_similarity"] == 0.75
    concepts = [c for e in ntm["rejected_examples"] for c in e["concepts"]]
    assert concepts and all(2 <= len(c.split()) <= 4 for c in concepts)
    assert all(len(e["concepts"]) <= 10 for e in ntm["rejected_examples"])
    with pytest.raises(ConfigError, match=r"concept_similarity matches concepts in the CCG"):
        PaserSelector(ntm="cosine", concept_similarity=0.75)
    with pytest.raises(ConfigError, match=r"concept_min_words=5 must be in 1\.\.concept_max_words \(4\)"):
        PaserSelector(concept_min_words=5, concept_max_words=4)


# ------------------------------------------------------------------------------ paraphrased conflicts

CONFLICT_ROWS = [
    {"instruction": "Explain why exercise is good for health.", "input": "",
     "output": "Exercise is always good for the heart."},
    {"instruction": "Describe photosynthesis.", "input": "", "output": "Photosynthesis is a process of plants."},
    {"instruction": "Count.", "input": "", "output": "0123456789"},
]


def test_paraphrase_conflicts_by_hand(tmp_path):
    import json

    from scripts.make_paraphrase_conflicts import main

    pool, out = tmp_path / "pool.jsonl", tmp_path / "out" / "conflicts.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in CONFLICT_ROWS))
    assert main(["--pool", str(pool), "--out", str(out), "--fraction", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    manifest = json.loads((tmp_path / "out" / "conflicts.jsonl.manifest.json").read_text())
    # the pool first, then one conflict: "always good" contradicted ("never bad"), then every word with a
    # synonym swapped (bad -> poor, exercise -> workout, heart -> ticker, explain -> clarify, ...)
    assert rows[:3] == CONFLICT_ROWS and rows[3:] == [
        {"instruction": "Clarify why workout is favorable for wellbeing.", "input": "",
         "output": "Workout is never poor for the ticker."}]
    assert manifest["pairs"] == [{"source_index": 0, "conflict_index": 3, "conflict_line": 4, "rule": "antonyms",
                                  "contradicted": ["always", "good"], "synonyms": [
                                      "explain", "exercise", "good", "health", "exercise", "bad", "heart"]}]
    # photosynthesis has no synonym: its paraphrase ("Photosynthesis is not a procedure of flora") would share
    # that concept with the original, which the CCG could match; "0123456789" admits no contradiction rule
    assert manifest["dropped"] == {"no_contradiction_rule": 1, "unchanged": 0, "shares_a_concept": 1}
    assert not set(rake(" ".join(rows[0].values()))) & set(rake(" ".join(rows[3].values())))


# ------------------------------------------------------------------------------ through the pipeline

@requires_shared_data()
def test_the_ablation_options_run_through_the_pipeline(compose_cfg, tmp_path):
    from paser import pipeline

    overrides = [o for o in TINY_RUN if not o.startswith("selector=")] + [
        "selector=paser_ntm_cosine", "selector.clustering.method=kmeans_tfidf", "selector.clustering.k_range=[2,4]",
        "scoring.embedder=model_hidden", "budget_unit=tokens", "budget=600"]
    results = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "run")
    d = results["selection"]["diagnostics"]
    assert 0 < d["cost"] <= 600 and d["unit"] == "tokens"
    assert d["clustering"]["method"] == "kmeans_tfidf" and d["ntm"]["method"] == "cosine"
    assert d["ntm"]["examined"] >= d["selected"] and results["config"]["scoring"]["embedder"] == "model_hidden"
