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

import io
import json
import logging
import time

import numpy as np
import torch

from paser.components import Selection
from paser.data import encode_pool
from paser.errors import ConfigError
from paser.selectors.clustered import cached_clustering, clustering_block
from paser.selectors.paser.allocation import allocate_budget
from paser.selectors.paser.concepts import (
    CONCEPT_METHODS,
    STOPWORDS_FILE,
    ConceptGraph,
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


def ntm_walk(rows: list[dict], labels: np.ndarray, key: np.ndarray, n_k: np.ndarray, order, use_ntm: bool = True,
             concepts_of=sample_concepts, edges_only: bool = False, costs: np.ndarray | None = None,
             top_up: int | None = None) -> dict:
    """Walk the clusters in ``order`` and each cluster's samples by decreasing ``key`` (IES), taking
    samples until the next one would exceed the cluster's n_k units of budget (``costs``: one unit per sample
    by default, or its tokens); with ``use_ntm`` a sample whose concepts (``concepts_of(row)``) conflict
    with the Concept Consistency Graph is rejected (and kept in the list of rejections) instead of taken.

    ``top_up`` (a token budget's total): what the clusters leave unspent (each stops short of its n_k by
    less than one sample) goes to the samples no cluster walk reached, in one global ``key`` order."""
    costs = np.ones(len(labels), dtype=np.int64) if costs is None else costs
    graph = ConceptGraph(edges_only) if use_ntm else None
    selected, rejected, examples = [], [], []
    examined = np.zeros(len(labels), dtype=bool)
    seen = 0

    def walk(candidates, limit: int) -> int:
        nonlocal seen
        spent = 0
        for i in candidates:
            if spent + costs[i] > limit:
                break
            examined[i] = True
            if graph is not None:
                concepts = concepts_of(rows[i])
                seen += len(concepts)
                pair = graph.try_add(concepts)
                if pair is not None:
                    rejected.append(int(i))
                    if len(examples) < 10:
                        examples.append({"index": int(i), "conflict": list(pair)})
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
    return {"selected": selected, "rejected": rejected, "graph": graph, "rejected_examples": examples,
            "concepts_seen": seen, "topped_up": topped_up}


class PaserSelector:
    uses_budget = True

    def __init__(self, use_s2ric: bool = True, use_cdais: bool = True, use_ntm: bool = True,
                 embed_input: bool = True, clustering: dict | None = None, divergence: str = "jsd",
                 span: str = "full", reduction: str = "mean", redistribute: bool = True, allocate: bool = True,
                 ies_log: bool = True, ies_length: str = "tokens", cluster_order: str = "index",
                 concept_top_k: int | None = 5, concept_max_words: int | None = 3,
                 concept_fields=FIELDS, plot: bool = True, concepts: str = "rake",
                 ccg_vertices: str = "concepts"):
        self.use_s2ric, self.use_cdais, self.use_ntm = bool(use_s2ric), bool(use_cdais), bool(use_ntm)
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
        self.concept_fields = tuple(concept_fields)
        bad = [f for f in self.concept_fields if f not in FIELDS]
        if bad or not self.concept_fields:
            raise ConfigError(f"selector.concept_fields={list(self.concept_fields)}: choose from {list(FIELDS)}")
        self.concepts = check_choice("concepts", concepts, CONCEPT_METHODS)
        self.ccg_vertices = check_choice("ccg_vertices", ccg_vertices, CCG_VERTICES)
        if self.use_ntm and self.concepts == "rake_nltk":
            nltk_data_files()  # fail now, not after the scoring, when NLTK's data is missing
        self.plot = bool(plot)

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
                                        self.concept_max_words) if self.use_ntm else None
        walk = ntm_walk(pool.rows, walk_labels, key, n_k, order, self.use_ntm, concepts_of,
                        self.ccg_vertices == "edges", costs=budget.unit_costs(len(pool)),
                        top_up=None if budget.in_samples or not self.redistribute else budget.size)
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
                         "allocate": self.allocate, "ies_length": self.ies_length},
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
        if graph is not None:
            examined = len(selected) + len(rejected)
            diag["ccg"] = {"concepts": graph.n_concepts, "edges": graph.n_edges, "examined": examined,
                           "rejected": len(rejected), "accepted": len(selected),
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
