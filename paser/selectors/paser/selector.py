"""The PASER selector: S²RIC clusters → CDAIS budget per cluster and IES ranking → NTM (CCG) filtering.

Ablation switches (each "off" replaces one stage, the rest run unchanged):
    use_s2ric=false   no clustering: the whole pool is one cluster, so selection is a single global IES
                      ranking (with the CCG) and allocation is trivial.
    use_cdais=false   no models are run: clusters get budget in proportion to their size (stratified
                      sampling) and samples inside a cluster are taken in a seeded random order.
    use_ntm=false     no Concept Consistency Graph: each cluster takes its top n_k samples by IES.

Per-sample divergences are cached per (model, pruner config, pool, divergence settings) through
``ctx.cached_scores``, so ablations of clustering, allocation or NTM never recompute them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter

import numpy as np
import torch

from paser.components import Selection
from paser.data import encode_pool
from paser.errors import ConfigError
from paser.selectors.clustered import cached_clustering, clustering_block
from paser.selectors.clustering_methods import method_labels
from paser.selectors.paser.allocation import allocate_budget
from paser.selectors.paser.concepts import (
    CONCEPT_METHODS,
    STOPWORDS_FILE,
    ConceptGraph,
    ConceptSimilarity,
    cluster_top_concepts,
    concept_extractor,
    nltk_data_files,
    sample_concepts,
)
from paser.selectors.paser.divergence import (
    DIVERGENCES,
    REDUCTIONS,
    SPANS,
    check_choice,
    make_divergence,
    sample_divergences,
    span_bounds,
)

log = logging.getLogger(__name__)
IES_LENGTHS = ("tokens", "official", "none")
CLUSTER_ORDERS = ("index", "cds")
CCG_VERTICES = ("concepts", "edges")
FIELDS = ("instruction", "input", "output")
NTM_METHODS = ("ccg", "keyword", "cosine", "none")
NTM_THRESHOLDS = {"keyword": 0.5, "cosine": 0.9}  # defaults of selector.ntm_threshold (null)


def ntm_choice(ntm: str, use_ntm: bool = True, threshold: float | None = None) -> tuple[str, float | None]:
    """(NTM method, its threshold) from ``selector.ntm``, ``use_ntm`` (false is ntm=none, the older switch)
    and ``selector.ntm_threshold`` (keyword and cosine only; null: their default)."""
    ntm = check_choice("ntm", ntm, NTM_METHODS)
    if not use_ntm:
        if ntm not in ("ccg", "none"):
            raise ConfigError(f"selector.use_ntm=false contradicts selector.ntm={ntm}: set one of them "
                              "(use_ntm=false is ntm=none)")
        ntm = "none"
    if ntm not in NTM_THRESHOLDS:
        if threshold is not None:
            raise ConfigError(f"selector.ntm_threshold={threshold} applies to ntm=keyword|cosine, not ntm={ntm}")
        return ntm, None
    threshold = NTM_THRESHOLDS[ntm] if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(f"selector.ntm_threshold={threshold!r} must be a number in (0, 1] (ntm={ntm})")
    return ntm, float(threshold)


def ies(divergence: np.ndarray, lengths: np.ndarray, use_log: bool = True) -> np.ndarray:
    """Instruction Efficiency Score: divergence / log(L²) (``use_log``) or divergence / L², L = |x|+|y|."""
    cost = np.maximum(np.asarray(lengths, dtype=np.float64), 2.0) ** 2  # L >= 2 keeps log(L²) > 0
    return np.asarray(divergence, dtype=np.float64) / (np.log(cost) if use_log else cost)


def rank_in_cluster(members: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Members sorted by decreasing key (ties: lower pool index first)."""
    return members[np.lexsort((members, -key[members]))]


def summary(values: np.ndarray, bins: int = 20) -> dict:
    v = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(v, bins=bins)
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]),
            "q95": float(q[4]), "histogram": {"counts": counts.tolist(), "edges": [float(e) for e in edges]}}


class GraphScreen:
    """ntm=ccg, the paper's NTM: the Concept Consistency Graph (``concepts.ConceptGraph``) rejects a sample
    two of whose concepts are both in the graph but not linked; an accepted sample links all its concepts.
    ``similarity``: concepts match similar vertices (``concepts.ConceptSimilarity``)."""

    needs_concepts = True

    def __init__(self, edges_only: bool = False, similarity: ConceptSimilarity | None = None):
        self.graph = ConceptGraph(edges_only, similarity)

    def conflict(self, i: int, concepts: list[str]) -> dict | None:
        pair = self.graph.conflict(concepts)
        return None if pair is None else {"conflict": list(pair)}

    def accept(self, i: int, concepts: list[str]) -> None:
        self.graph.add(concepts)


class KeywordScreen:
    """ntm=keyword, "simple keyword filtering" (our reading: the paper names it without defining it). A
    sample's keywords are the words of its concepts (RAKE's content words, the same extractor and settings
    as the CCG's). It is rejected when the Jaccard overlap |A ∩ B| / |A ∪ B| of its keywords A with those B
    of one accepted sample of its cluster is at least ``threshold``: it repeats what the cluster already
    has, whether it agrees or not. A sample without keywords is accepted."""

    needs_concepts = True

    def __init__(self, labels: np.ndarray, threshold: float):
        self.labels, self.threshold = labels, threshold
        self.postings: dict[tuple[int, str], list[int]] = {}  # (cluster, keyword) -> accepted samples
        self.keywords: dict[int, frozenset[str]] = {}

    def conflict(self, i: int, concepts: list[str]) -> dict | None:
        words = frozenset(w for c in concepts for w in c.split())
        shared = Counter(j for w in words for j in self.postings.get((int(self.labels[i]), w), ()))
        for j, n in sorted(shared.items(), key=lambda jn: (-jn[1], jn[0])):
            jaccard = n / (len(words) + len(self.keywords[j]) - n)
            if jaccard >= self.threshold:
                return {"with": int(j), "jaccard": round(jaccard, 4)}
        return None

    def accept(self, i: int, concepts: list[str]) -> None:
        words = frozenset(w for c in concepts for w in c.split())
        self.keywords[i] = words
        for w in words:
            self.postings.setdefault((int(self.labels[i]), w), []).append(i)


class CosineScreen:
    """ntm=cosine, "cosine-similarity thresholding" (our reading: the paper names it without defining it):
    a sample is rejected when the cosine similarity of its embedding (S²RIC's: ``scoring.embedder``, L2-
    normalised) with that of an accepted sample of its cluster is at least ``threshold``."""

    needs_concepts = False

    def __init__(self, labels: np.ndarray, embeddings: np.ndarray, threshold: float):
        self.labels, self.x, self.threshold = labels, embeddings, threshold
        self.accepted: dict[int, list[int]] = {}

    def conflict(self, i: int, concepts) -> dict | None:
        members = self.accepted.get(int(self.labels[i]))
        if not members:
            return None
        sims = self.x[members] @ self.x[i]
        j = int(np.argmax(sims))
        return {"with": members[j], "cosine": round(float(sims[j]), 4)} if sims[j] >= self.threshold else None

    def accept(self, i: int, concepts) -> None:
        self.accepted.setdefault(int(self.labels[i]), []).append(i)


def ntm_walk(rows: list[dict], labels: np.ndarray, key: np.ndarray, n_k: np.ndarray, order, use_ntm: bool = True,
             concepts_of=sample_concepts, edges_only: bool = False, costs: np.ndarray | None = None,
             top_up: int | None = None, screen=None, keep_rejected: bool = False) -> dict:
    """Walk the clusters in ``order`` and each cluster's samples by decreasing ``key`` (IES), taking
    samples until the next one would exceed the cluster's n_k units of budget (``costs``: one unit per sample
    by default, or its tokens). With ``use_ntm`` each sample is first put to the ``screen`` (default: the
    Concept Consistency Graph, ``GraphScreen(edges_only)``; ``concepts_of(row)`` gives its concepts): one it
    rejects is listed in the rejections, with its concepts and the reason, instead of taken.
    ``keep_rejected`` (the put-back ablation): a rejected sample is listed but taken all the same (it never
    enters the screen), so the selection is the walk without NTM's, and the list says which of its samples
    the screen objects to.

    ``top_up`` (a token budget's total): what the clusters leave unspent (each stops short of its n_k by
    less than one sample) goes to the samples no cluster walk reached, in one global ``key`` order."""
    costs = np.ones(len(labels), dtype=np.int64) if costs is None else costs
    screen = (screen or GraphScreen(edges_only)) if use_ntm else None
    selected, rejected, examples = [], [], []
    rejected_concepts: Counter = Counter()
    examined = np.zeros(len(labels), dtype=bool)
    seen = 0

    def walk(candidates, limit: int) -> int:
        nonlocal seen
        spent = 0
        for i in candidates:
            if spent + costs[i] > limit:
                break
            examined[i] = True
            if screen is not None:
                concepts = concepts_of(rows[i]) if screen.needs_concepts else None
                seen += len(concepts or ())
                reason = screen.conflict(int(i), concepts)
                if reason is None:
                    screen.accept(int(i), concepts)
                else:
                    concepts = concepts_of(rows[i]) if concepts is None else concepts
                    rejected.append(int(i))
                    rejected_concepts.update(concepts)
                    if len(examples) < 10:
                        examples.append({"index": int(i), "concepts": list(concepts), **reason})
                    if not keep_rejected:
                        continue
            selected.append(int(i))
            spent += int(costs[i])
        return spent

    spent = sum(walk(rank_in_cluster(np.flatnonzero(labels == k), key), int(n_k[k])) for k in order)
    topped_up = 0
    if top_up is not None:
        before = len(selected)
        everyone = np.arange(len(labels))
        walk(rank_in_cluster(everyone[~examined], key), top_up - spent)
        topped_up = len(selected) - before
    return {"selected": selected, "rejected": rejected, "graph": getattr(screen, "graph", None),
            "rejected_examples": examples, "rejected_concepts": rejected_concepts.most_common(20),
            "concepts_seen": seen, "examined": int(examined.sum()), "topped_up": topped_up}


class PaserSelector:
    uses_budget = True

    def __init__(self, use_s2ric: bool = True, use_cdais: bool = True, use_ntm: bool = True,
                 embed_input: bool = True, clustering: dict | None = None, divergence: str = "jsd",
                 span: str = "full", reduction: str = "mean", redistribute: bool = True, allocate: bool = True,
                 ies_log: bool = True, ies_length: str = "tokens", cluster_order: str = "index",
                 concept_top_k: int | None = 5, concept_max_words: int | None = 3,
                 concept_fields=FIELDS, plot: bool = True, concepts: str = "rake",
                 ccg_vertices: str = "concepts", ntm: str = "ccg", ntm_threshold: float | None = None,
                 ntm_keep_rejected: bool = False, concept_min_words: int | None = None,
                 concept_similarity: float | None = None):
        self.use_s2ric, self.use_cdais = bool(use_s2ric), bool(use_cdais)
        self.ntm, self.ntm_threshold = ntm_choice(ntm, bool(use_ntm), ntm_threshold)
        self.use_ntm = self.ntm != "none"
        self.ntm_keep_rejected = bool(ntm_keep_rejected)
        if self.ntm_keep_rejected and not self.use_ntm:
            raise ConfigError("selector.ntm_keep_rejected=true puts back the samples an NTM rejects: it needs "
                              "selector.ntm=ccg|keyword|cosine (and use_ntm=true)")
        self.embed_input = bool(embed_input)
        self.clustering = clustering_block(clustering)  # S²RIC's knobs and the allocation rule, as the hybrids'
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.span = check_choice("span", span, SPANS)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.redistribute, self.allocate = bool(redistribute), bool(allocate)
        self.ies_log = bool(ies_log)
        self.ies_length = check_choice("ies_length", ies_length, IES_LENGTHS)
        self.cluster_order = check_choice("cluster_order", cluster_order, CLUSTER_ORDERS)
        self.concept_top_k = None if concept_top_k is None else int(concept_top_k)
        self.concept_max_words = None if concept_max_words is None else int(concept_max_words)
        self.concept_min_words = None if concept_min_words is None else int(concept_min_words)
        if self.concept_min_words is not None and not 1 <= self.concept_min_words <= (self.concept_max_words or
                                                                                      self.concept_min_words):
            raise ConfigError(f"selector.concept_min_words={concept_min_words} must be in 1..concept_max_words "
                              f"({self.concept_max_words})")
        self.concept_similarity = concept_similarity
        if concept_similarity is not None:
            if isinstance(concept_similarity, bool) or not isinstance(concept_similarity, (int, float)) or \
                    not 0 < concept_similarity <= 1:
                raise ConfigError(f"selector.concept_similarity={concept_similarity!r} must be null or a number in "
                                  "(0, 1]")
            if self.ntm in ("keyword", "cosine"):
                raise ConfigError(f"selector.concept_similarity matches concepts in the CCG (ntm=ccg), not in "
                                  f"ntm={self.ntm}")
        self.concept_fields = tuple(concept_fields)
        bad = [f for f in self.concept_fields if f not in FIELDS]
        if bad or not self.concept_fields:
            raise ConfigError(f"selector.concept_fields={list(self.concept_fields)}: choose from {list(FIELDS)}")
        self.concepts = check_choice("concepts", concepts, CONCEPT_METHODS)
        self.ccg_vertices = check_choice("ccg_vertices", ccg_vertices, CCG_VERTICES)
        if self.use_ntm and self.concepts == "rake_nltk":
            nltk_data_files()  # fail now, not after the scoring, when NLTK's data is missing
        self.plot = bool(plot)

    def screen(self, pool, ctx, labels: np.ndarray, concepts_of):
        """The NTM's screen (None: ntm=none), over the S²RIC clusters ``labels``."""
        if self.ntm == "ccg":
            return GraphScreen(self.ccg_vertices == "edges", self.similar_concepts(pool, ctx, concepts_of))
        if self.ntm == "keyword":
            return KeywordScreen(labels, self.ntm_threshold)
        if self.ntm == "cosine":
            from paser.embedding import embed_pool

            return CosineScreen(labels, embed_pool(ctx, pool.rows, with_input=self.embed_input), self.ntm_threshold)
        return None

    def similar_concepts(self, pool, ctx, concepts_of) -> ConceptSimilarity | None:
        """With ``concept_similarity``: every concept of the pool, embedded by ``scoring.embedder`` (cached
        per set of phrases), for the CCG to match a concept to a similar vertex."""
        if self.concept_similarity is None:
            return None
        from paser.embedding import embed_texts

        phrases = sorted({c for row in pool.rows for c in concepts_of(row)})
        if not phrases:
            return None
        digest = hashlib.sha256("\n".join(phrases).encode()).hexdigest()
        return ConceptSimilarity(phrases, embed_texts(ctx, phrases, "concept_embeddings", {"phrases": digest}),
                                 float(self.concept_similarity))

    def input_files(self) -> list:
        """The NTM stop words (and NLTK's sentence model) are data, not code: keyed by content."""
        if not self.use_ntm:
            return []
        return [STOPWORDS_FILE] if self.concepts == "rake" else nltk_data_files()

    # ------------------------------------------------------------------ stages

    def cluster(self, pool, ctx) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """(labels, reduced coordinates or None, diagnostics); the clustering is a cache entry of its own
        (``cached_clustering``), computed once per pool and knobs."""
        if not self.use_s2ric:
            return np.zeros(len(pool), dtype=np.int64), None, {"n_clusters": 1, "reducer": None}
        if self.clustering["method"] != "s2ric":  # the paper's Table 12 alternatives: no reduced coordinates
            labels, diag = method_labels(ctx, pool, self.clustering, with_input=self.embed_input)
            return labels, None, diag
        return cached_clustering(ctx, pool, self.clustering, with_input=self.embed_input)

    def sequences(self, pool, ctx) -> tuple[list[list[int]], list[tuple[int, int]], np.ndarray | None]:
        """(token sequences, per-sample position bounds, lengths L = |x|+|y| for the IES; None with
        ies_length=none, which ranks by the divergence alone)."""
        tok = ctx.tokenizer
        enc = encode_pool(tok, pool.rows, ctx.cutoff) if self.span != "instruction" or \
            self.ies_length == "tokens" else None
        if self.span == "instruction":
            seqs = [tok(r["instruction"])["input_ids"] for r in pool.rows]
            bounds = span_bounds([len(s) for s in seqs], [0] * len(seqs), self.span)
        else:
            seqs = [e.input_ids for e in enc]
            bounds = span_bounds([len(s) for s in seqs], [e.prompt_len for e in enc], self.span)
        if self.ies_length == "none":
            lengths = None
        elif self.ies_length == "tokens":  # tokens of the templated sample, as trained on
            lengths = np.array([len(e.input_ids) for e in enc])
        else:  # the official code: raw instruction tokens + response *characters*
            lengths = np.array([len(tok(r["instruction"])["input_ids"]) + len(r["output"]) for r in pool.rows])
        return seqs, bounds, lengths

    def divergences(self, pool, ctx, seqs, bounds) -> np.ndarray:
        params = {"divergence": self.divergence, "span": self.span, "reduction": self.reduction,
                  "cutoff": None if self.span == "instruction" else ctx.cutoff}
        if self.divergence == "wasserstein":
            params["seed"] = ctx.seed
        state: dict = {}

        def compute(start: int, end: int) -> np.ndarray:
            if "fn" not in state:
                state["fn"] = make_divergence(self.divergence, ctx.original_model, ctx.seed)
            return sample_divergences(ctx.original_model, ctx.pruned_model, seqs[start:end], bounds[start:end],
                                      state["fn"], self.reduction, ctx.batch_size,
                                      ctx.tokenizer.pad_token_id or 0, desc=f"{self.divergence} {start}-{end}")

        name = "jsd" if self.divergence == "jsd" else f"divergence_{self.divergence}"
        with torch.inference_mode():
            return ctx.cached_scores(name, ("model", "pruner", "pool"), params, len(pool), compute)

    # ------------------------------------------------------------------ select

    def select(self, pool, budget, ctx) -> Selection:
        times: dict[str, float] = {}
        t = time.perf_counter()
        labels, coords, cdiag = self.cluster(pool, ctx)
        times["s2ric"] = time.perf_counter() - t
        n_clusters = int(labels.max()) + 1
        sizes = np.bincount(labels, minlength=n_clusters)
        # the budget is split over the clusters (allocate) or walked as one global ranking
        walk_labels = labels if self.allocate else np.zeros_like(labels)
        capacity = np.bincount(walk_labels, weights=budget.unit_costs(len(pool)), minlength=n_clusters).astype(np.int64)[
            : n_clusters if self.allocate else 1]

        t = time.perf_counter()
        if self.use_cdais:
            seqs, bounds, lengths = self.sequences(pool, ctx)
            div = self.divergences(pool, ctx, seqs, bounds)
            key = div.astype(np.float64) if lengths is None else ies(div, lengths, self.ies_log)
            cds = np.array([div[labels == k].mean() for k in range(n_clusters)])
            weights = cds if self.allocate else np.ones(1)
            n_k = allocate_budget(weights, capacity, budget.size, self.clustering["allocation"], self.redistribute)
        else:
            div = cds = None
            key = np.random.default_rng(ctx.seed).permutation(len(pool)).astype(np.float64)
            n_k = allocate_budget(capacity, capacity, budget.size, "proportional", self.redistribute)
        times["cdais"] = time.perf_counter() - t

        t = time.perf_counter()
        order = list(range(len(n_k)))
        if self.cluster_order == "cds" and cds is not None and self.allocate:
            order = [int(k) for k in np.lexsort((np.arange(n_clusters), -cds))]
        concepts_of = concept_extractor(self.concepts, self.concept_fields, self.concept_top_k,
                                        self.concept_max_words, self.concept_min_words) if self.use_ntm else None
        walk = ntm_walk(pool.rows, walk_labels, key, n_k, order, self.use_ntm, concepts_of,
                        self.ccg_vertices == "edges", costs=budget.unit_costs(len(pool)),
                        top_up=None if budget.in_samples or not self.redistribute else budget.size,
                        screen=self.screen(pool, ctx, labels, concepts_of), keep_rejected=self.ntm_keep_rejected)
        selected, rejected, graph = walk["selected"], walk["rejected"], walk["graph"]
        times["ntm"] = time.perf_counter() - t
        taken = np.bincount(labels[selected], minlength=n_clusters)
        rejected_k = np.bincount(labels[rejected], minlength=n_clusters)

        topics = cluster_top_concepts(pool.rows, labels, seed=ctx.seed) if self.use_s2ric else [[]]
        cost = budget.cost(selected)
        diag = {
            "budget": budget.key(), "unit": budget.unit, "selected": len(selected), "cost": cost,
            "unfilled": int(budget.size - cost), "topped_up": walk["topped_up"],
            "switches": {"use_s2ric": self.use_s2ric, "use_cdais": self.use_cdais, "use_ntm": self.use_ntm,
                         "ntm": self.ntm, "allocate": self.allocate, "ies_length": self.ies_length},
            "clustering": cdiag,
            "clusters": [{"cluster": k, "size": int(sizes[k]), "top_concepts": topics[k],
                          "cds": None if cds is None else float(cds[k]),
                          "n_k": int(n_k[k]) if self.allocate else None, "selected": int(taken[k]),
                          "rejected": int(rejected_k[k])}
                         for k in range(n_clusters)],
            "allocated": int(n_k.sum()),
        }
        if div is not None:
            diag[self.divergence] = summary(div)
        examined = walk["examined"]
        if self.use_ntm:
            diag["ntm"] = {"method": self.ntm, "threshold": self.ntm_threshold,
                           "concept_similarity": self.concept_similarity if self.ntm == "ccg" else None,
                           "keep_rejected": self.ntm_keep_rejected, "examined": examined,
                           "rejected": len(rejected), "rejection_rate": len(rejected) / max(examined, 1),
                           "rejected_concepts": [[c, n] for c, n in walk["rejected_concepts"]],
                           "rejected_examples": walk["rejected_examples"]}
        if graph is not None:
            diag["ccg"] = {"concepts": graph.n_concepts, "edges": graph.n_edges, "examined": examined,
                           "rejected": len(rejected), "accepted": examined - len(rejected),
                           "mean_concepts_per_sample": walk["concepts_seen"] / max(examined, 1),
                           "rejected_examples": walk["rejected_examples"]}
        t = time.perf_counter()
        artifacts = self.artifacts(labels, coords, div, key if self.use_cdais else None, selected, rejected, cds,
                                   topics)
        times["artifacts"] = time.perf_counter() - t
        diag["files"] = sorted(artifacts)
        diag["stage_times_s"] = {k: round(v, 3) for k, v in times.items()}
        log.info("PASER: %d samples (%d of %s) selected from %d clusters; stage times %s", len(selected), cost,
                 budget, n_clusters, diag["stage_times_s"])
        return Selection(indices=sorted(selected), diagnostics=diag,
                         scores=None if div is None else div.astype(np.float64), artifacts=artifacts)

    # ------------------------------------------------------------------ artifacts

    def artifacts(self, labels, coords, div, ies_values, selected, rejected, cds, topics) -> dict[str, bytes]:
        """paser_samples.npz (per-sample arrays) and, with ``plot``, paser_clusters.png, as file contents."""
        n = len(labels)
        sel = np.zeros(n, dtype=bool)
        sel[selected] = True
        rej = np.zeros(n, dtype=bool)
        rej[rejected] = True
        arrays = {"labels": labels, "selected": sel, "rejected": rej}
        if div is not None:
            arrays.update(divergence=div, ies=ies_values)
        xy = None
        if coords is not None:
            xy = coords[:, :2] if coords.shape[1] <= 2 else _pca2(coords)
            arrays["xy"] = xy.astype(np.float32)
        npz = io.BytesIO()
        np.savez_compressed(npz, **arrays)
        files = {"paser_samples.npz": npz.getvalue()}
        if self.plot and xy is not None:
            files["paser_clusters.png"] = plot_clusters(xy, labels, cds, topics, title=json.dumps(
                {"reducer": self.clustering["reducer"], "d": self.clustering["n_components"], "K": int(labels.max()) + 1}))
        return files


def _pca2(coords: np.ndarray) -> np.ndarray:
    centred = coords - coords.mean(0)
    _, _, vt = np.linalg.svd(centred[:: max(1, len(centred) // 20000)], full_matrices=False)
    return centred @ vt[:2].T


def plot_clusters(xy: np.ndarray, labels: np.ndarray, cds: np.ndarray | None, topics: list[list[str]],
                  title: str = "", max_points: int = 30000) -> bytes:
    """PNG of the clusters in 2-D (first two principal axes of the reduced coordinates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = np.random.default_rng(0).permutation(len(xy))[:max_points]
    fig, ax = plt.subplots(figsize=(8, 6.5), dpi=110)
    cmap = plt.get_cmap("tab20")
    for k in range(int(labels.max()) + 1):
        m = keep[labels[keep] == k]
        lab = f"c{k} (n={int((labels == k).sum())}" + (f", CDS={cds[k]:.4f})" if cds is not None else ")")
        lab += (": " + ", ".join(topics[k])) if topics[k] else ""
        ax.scatter(xy[m, 0], xy[m, 1], s=2, color=cmap(k % 20), label=lab, rasterized=True)
    ax.legend(fontsize=6, markerscale=4, loc="best", ncol=1 + int(labels.max()) // 16)
    ax.set_title(f"PASER clusters {title}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()
