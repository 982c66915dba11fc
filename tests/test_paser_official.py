"""selector=paser_official selects what the official PASER code (BokwaiHo/PASER, paser.py) selects.

The reference below is written in this test from the official algorithm's description, step by step and
with other tools than paser uses (scipy's general eigensolver on the non-symmetric random-walk Laplacian,
per-sample unbatched forwards, networkx for the graph): MiniLM-style embeddings of the raw instruction →
Gaussian affinity with the median distance → the K smallest eigenvectors of L = I − D⁻¹A → NMF of |V Vᵀ|
(scikit-learn, init='random', random_state=0) → argmax; CDS = mean over a cluster of the JSD summed over
the instruction's positions; n_k = int(B·CDS_k/ΣCDS); clusters walked in component-id order, samples by
IES = JSD / log((instruction tokens + output characters)²) descending; a sample is skipped when two of its
rake_nltk phrases are nodes of the graph without an edge; accepted samples add edges between all their
phrases. NLTK's data cannot be downloaded here, so the test installs a small stop-word list and an empty
(untrained) punkt model in a temporary NLTK data folder (conftest.make_nltk_data), which rake_nltk reads
through NLTK as usual. The graph's lone-concept rule is tested on its own (the pool does not reach it).
"""

import io
import os

import networkx as nx
import nltk
import numpy as np
import pytest
import scipy.linalg
import torch
from omegaconf import OmegaConf
from scipy.spatial.distance import cdist
from sklearn.decomposition import NMF

from paser.budget import Budget
from paser.data import Pool
from paser.errors import ConfigError
from paser.selectors.paser import clustering
from paser.selectors.paser.concepts import ConceptGraph
from paser.selectors.paser.selector import PaserSelector
from tests.conftest import ROOT, compose_config, make_nltk_data
from tests.test_paser_selector import StubEmbedder, make_ctx

STOPWORDS = ["a", "an", "the", "of", "to", "and", "in", "for", "on", "with", "is", "are", "be", "this", "that", "it", "how", "what", "your", "its", "by", "from", "as"]
SUBJECTS = ["bread dough", "mars orbit", "python function", "tax policy", "jazz piano", "river delta"]
ACTIONS = ["Explain", "Summarize", "Describe", "Compare", "List facts about", "Write a poem on"]
EXTRAS = ["solar wind", "whole wheat", "string reversal", "interest rates", "blue notes", "sediment flow"]


def make_rows(n=42):
    rows = []
    for i in range(n):
        s, a, e = SUBJECTS[i % 6], ACTIONS[(i * 5 + i // 6) % 6], EXTRAS[(i * 7 + 3) % 6]
        rows.append({"instruction": f"{a} the {s} in {i % 4 + 1} sentences.",
                     "input": "" if i % 3 else f"Mention {e}.",
                     "output": f"The {s} relates to {e}; " + "more detail. " * (i % 5)})
        if i % 7 == 3:  # a sample with a single concept: a vertex of the paper's graph, not of the code's
            rows.append({"instruction": s.capitalize(), "input": "", "output": f"{s}."})
    return rows


@pytest.fixture(scope="module")
def nltk_data(tmp_path_factory):
    """One NLTK data folder for the module: NLTK keeps a corpus reader once loaded, with its folder."""
    root = make_nltk_data(tmp_path_factory.mktemp("nltk") / "nltk_data")
    saved = list(nltk.data.path)
    nltk.data.path[:] = [str(root)]
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    yield root
    nltk.data.path[:] = saved
    nltk.tokenize._get_punkt_tokenizer.cache_clear()


def official_jsd(pruned, original, ids) -> float:
    with torch.no_grad():
        p = torch.softmax(pruned(input_ids=ids).logits.double(), -1)
        q = torch.softmax(original(input_ids=ids).logits.double(), -1)
    m = 0.5 * (p + q)
    return float(0.5 * ((p * torch.log(p / m)).sum() + (q * torch.log(q / m)).sum()))


def official_selection(rows, models, budget, k=10):
    from rake_nltk import Rake

    original, pruned, tok = models
    emb = StubEmbedder().encode([r["instruction"] for r in rows]).astype(np.float64)
    dist = cdist(emb, emb)
    sigma = np.median(dist)
    a = np.exp(-dist**2 / (2 * sigma**2))
    lap = np.eye(len(rows)) - np.diag(1.0 / a.sum(1)) @ a
    vals, vecs = scipy.linalg.eig(lap)
    v = vecs[:, np.argsort(vals.real)[:k]].real
    v /= np.linalg.norm(v, axis=0)
    w = NMF(n_components=k, init="random", random_state=0).fit_transform(np.abs(v @ v.T))
    clusters = w.argmax(1)

    ids = [torch.tensor([tok(r["instruction"])["input_ids"]]) for r in rows]
    jsd = [official_jsd(pruned, original, x) for x in ids]
    ies = [jsd[i] / np.log((ids[i].shape[1] + len(rows[i]["output"])) ** 2) for i in range(len(rows))]
    cds = {c: np.mean([jsd[i] for i in range(len(rows)) if clusters[i] == c]) for c in sorted(set(clusters))}
    total = sum(cds.values())
    budgets = {c: int(budget * (x / total)) for c, x in cds.items()}

    rake, ccg, selected = Rake(), nx.Graph(), []

    def concepts(r):
        rake.extract_keywords_from_text(r["instruction"] + " " + r.get("input", "") + " " + r.get("output", ""))
        return set(rake.get_ranked_phrases())

    for c, n_c in budgets.items():
        members = sorted([i for i in range(len(rows)) if clusters[i] == c], key=lambda i: ies[i], reverse=True)
        taken = 0
        for i in members:
            if taken >= n_c:
                break
            cs = concepts(rows[i])
            if any(x != y and x in ccg.nodes and y in ccg.nodes and not ccg.has_edge(x, y) for x in cs for y in cs):
                continue
            selected.append(i)
            taken += 1
            ccg.add_edges_from((x, y) for x in cs for y in cs if x != y)
    return clusters, budgets, sorted(selected)


def official_selector(**overrides):
    """The preset as the pipeline composes it (its _target_ checked), built directly so errors stay unwrapped."""
    knobs = OmegaConf.to_container(compose_config(["selector=paser_official", "selector.plot=false"]).selector)
    assert knobs.pop("_target_") == "paser.selectors.paser.selector.PaserSelector"
    return PaserSelector(**{**knobs, **overrides})


def test_paser_official_selects_what_the_official_algorithm_selects(models, tmp_path, nltk_data):
    rows = make_rows()
    pool = Pool(rows=rows, source="test", fingerprint="official-pool")
    clusters, budgets, expected = official_selection(rows, models, budget=22)
    sel = official_selector().select(pool, Budget.samples(22), make_ctx(models, tmp_path))

    labels = np.load(io.BytesIO(sel.artifacts["paser_samples.npz"]))["labels"]
    present = sorted(set(clusters))  # our labels: the NMF components that hold samples, in id order
    assert labels.tolist() == [present.index(c) for c in clusters]
    assert [c["n_k"] for c in sel.diagnostics["clusters"]] == list(budgets.values())
    assert len(present) > 2 and 0 < len(expected) < 22  # a real walk: several clusters, the floor loses budget
    assert sel.diagnostics["ccg"]["rejected"] > 0  # and the graph rejects samples
    assert sel.indices == expected


def test_our_defaults_differ_from_the_official_selection(models, tmp_path, nltk_data):
    """The preset's knobs matter: with our S²RIC path and RAKE the same pool gives another selection."""
    rows = make_rows()
    pool = Pool(rows=rows, source="test", fingerprint="official-pool")
    official = official_selector().select(pool, Budget.samples(14), make_ctx(models, tmp_path))
    ours = official_selector(clustering={"n_components": 4, "n_neighbors": 5}, concepts="rake",
                             ccg_vertices="concepts").select(pool, Budget.samples(14), make_ctx(models, tmp_path))
    assert ours.indices != official.indices


def test_lone_concepts_enter_the_graph_only_in_the_official_variant():
    paper, official = ConceptGraph(), ConceptGraph(edges_only=True)
    for g in (paper, official):
        g.add(["mars"])
    assert paper.n_concepts == 1 and official.n_concepts == 0
    # a later sample naming mars with another known concept: a conflict only where mars is a vertex
    for g in (paper, official):
        g.add(["venus", "orbit"])
    assert paper.conflict(["mars", "venus"]) == ("mars", "venus") and official.conflict(["mars", "venus"]) is None


def test_pools_too_large_for_the_dense_path_are_refused_before_any_model_runs(models, tmp_path, nltk_data,
                                                                             monkeypatch):
    monkeypatch.setattr(clustering, "DENSE_OFFICIAL_MAX", 30)
    calls: list[str] = []
    rows = make_rows()
    with pytest.raises(ConfigError, match=r"48×48 .*limited to 30 samples.*data.subsample"):
        official_selector().select(Pool(rows=rows, source="test", fingerprint="p"), Budget.samples(14),
                                   make_ctx(models, tmp_path, calls=calls))
    assert calls == []


def test_the_gram_path_needs_a_fixed_k():
    with pytest.raises(ConfigError, match="nmf_input=gram needs an integer"):
        official_selector(clustering={"reducer": "laplacian", "nmf_input": "gram", "n_clusters": "auto"},
                          concepts="rake")


def test_without_nltk_data_rake_nltk_uses_the_shipped_substitute(tmp_path):
    """No NLTK data installed: the shipped stop words (NLTK's 179) and untrained punkt model are used, and
    its phrases are those of rake_nltk with no sentence splitting at all (RAKE cuts phrases at punctuation,
    where Punkt ends sentences): the trained punkt model, which only moves sentence ends, could not change
    them either. In a fresh process: NLTK caches its corpus readers, and this module's fixture installed
    other data."""
    import subprocess
    import sys

    check = """
import nltk
from rake_nltk import Rake
from paser.selectors.paser.concepts import SHIPPED_NLTK_DATA, concept_extractor, nltk_data_files
names = {p.name for p in nltk_data_files()}
assert {"english", "collocations.tab", "sent_starters.txt"} <= names, names
assert str(SHIPPED_NLTK_DATA) in nltk.data.path
words = (SHIPPED_NLTK_DATA / "corpora" / "stopwords" / "english").read_text().split()
assert len(words) == len(set(words)) == 179 and {"i", "m", "don", "shouldn't"} <= set(words)
text = ("Dr. Smith moved to Washington D.C. in 1990... He said: e.g. the U.S. economy grows 3.5% a year! "
        "Why? Because Mr. Jones, the C.E.O., invested in solar panels and wind farms.")
unsplit = Rake(sentence_tokenizer=lambda t: [t])
unsplit.extract_keywords_from_text(text)
row = {"instruction": text, "input": "", "output": ""}
assert concept_extractor("rake_nltk", top_k=None, max_words=None)(row) == list(dict.fromkeys(unsplit.get_ranked_phrases()))
print("ok")
"""
    env = {**os.environ, "NLTK_DATA": str(tmp_path / "empty"), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", check], check=False, env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
