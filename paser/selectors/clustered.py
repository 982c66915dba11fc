"""What the score-then-rank baselines (IFD, Nuggets, Instruction Mining) share: keep the best-scored
samples of the whole pool, or, with ``cluster: s2ric``, cluster the pool with PASER's S²RIC, give each
cluster a share of the budget and keep the best-scored samples inside each cluster (the hybrids the
PASER rebuttal compares).

A subclass implements ``score(pool, ctx) -> Scored``: its natural per-sample score (IFD, golden score,
predicted loss) and a ranking key where higher is better and NaN marks an ineligible sample.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from paser.cache import to_plain
from paser.components import HYBRID_CLUSTERING, Selection
from paser.errors import ConfigError

log = logging.getLogger(__name__)

CLUSTER_MODES = (None, "s2ric")
CLUSTERING_KNOBS = ("reducer", "n_components", "n_neighbors", "n_clusters", "diffusion_time", "k_range",
                    "min_cluster_size", "row_normalize", "nmf_input", "landmarks_above", "landmarks")  # s2ric_clusters'
# with "allocation" and "method" (s2ric or an alternative of clustering_methods.py), the block's keys
CLUSTERING_KEYS = (*CLUSTERING_KNOBS, "allocation", "method")


def clustering_defaults() -> dict:
    """The ``clustering:`` block's defaults where a selector is built without one: ``s2ric_clusters``' own
    defaults (written once, there), proportional allocation and S²RIC itself."""
    import inspect

    from paser.selectors.paser.clustering import s2ric_clusters

    params = inspect.signature(s2ric_clusters).parameters
    return {**{k: params[k].default for k in CLUSTERING_KNOBS}, "allocation": "proportional", "method": "s2ric"}


def clustering_block(clustering: dict | None) -> dict:
    """The ``selector.clustering`` block of PASER and the hybrids, checked and completed with the defaults:
    S²RIC's knobs and the rule that turns cluster weights (PASER: CDS; hybrids: sizes) into budget shares."""
    from paser.selectors.clustering_methods import check_method
    from paser.selectors.paser.allocation import RULES
    from paser.selectors.paser.clustering import NMF_INPUTS, REDUCERS, check_landmarks, check_min_cluster_size

    given = to_plain(clustering or {})
    extra = set(given) - set(CLUSTERING_KEYS)
    if extra:
        raise ConfigError(f"selector.clustering has unknown key(s) {sorted(extra)}; allowed: {sorted(CLUSTERING_KEYS)}")
    block = {**clustering_defaults(), **given}
    check_method(block["method"], block["min_cluster_size"])
    for key, allowed in (("reducer", REDUCERS), ("nmf_input", NMF_INPUTS), ("allocation", RULES)):
        if block[key] not in allowed:
            raise ConfigError(f"selector.clustering.{key}={block[key]!r} is unknown; allowed: {list(allowed)}")
    k = block["n_clusters"]
    fixed_k = isinstance(k, int) and not isinstance(k, bool) and k >= 1
    if k != "auto" and not fixed_k:
        raise ConfigError(f"selector.clustering.n_clusters={k!r} must be 'auto' or an integer >= 1")
    if block["nmf_input"] == "gram" and not fixed_k:
        raise ConfigError(f"selector.clustering.nmf_input=gram needs an integer selector.clustering.n_clusters, "
                          f"got {k!r}")
    block["k_range"] = [int(v) for v in block["k_range"]]
    if len(block["k_range"]) != 2:
        raise ConfigError(f"selector.clustering.k_range={block['k_range']} must be [min, max]")
    check_min_cluster_size(block["min_cluster_size"], "selector.clustering.min_cluster_size")
    check_landmarks(block["landmarks_above"], block["landmarks"])
    return block


@dataclass
class Scored:
    scores: np.ndarray            # the method's own score, one per pool sample (Selection.scores)
    rank_key: np.ndarray          # higher is better; NaN = not eligible
    diagnostics: dict = field(default_factory=dict)


def describe(x: np.ndarray) -> dict:
    """JSON-able summary of a score distribution (NaNs counted, not summarised)."""
    x = np.asarray(x, dtype=np.float64)
    finite = x[np.isfinite(x)]
    out = {"n": int(x.size), "n_nan": int(np.isnan(x).sum())}
    if finite.size:
        q = np.percentile(finite, [0, 10, 25, 50, 75, 90, 100])
        out.update({"mean": float(finite.mean()), "std": float(finite.std()),
                    **{k: float(v) for k, v in zip(("min", "p10", "p25", "median", "p75", "p90", "max"), q)}})
    return out


def ranked(rank_key: np.ndarray, candidates: np.ndarray | None = None) -> np.ndarray:
    """Eligible candidates (all samples by default) best first; ties broken by pool index, so the order
    is deterministic."""
    idx = np.arange(len(rank_key)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    idx = idx[~np.isnan(rank_key[idx])]
    return idx[np.lexsort((idx, -rank_key[idx]))]


def select_within_clusters(rank_key: np.ndarray, labels: np.ndarray, budget,
                           rule: str = "proportional") -> tuple[np.ndarray, dict]:
    """Best-ranked samples inside each cluster, n_k units of the budget each, with n_k from PASER's
    ``allocate_budget``.

    A cluster's weight is its size (its share of the pool); its capacity is the cost of its eligible
    samples (in the budget's unit), and what a cluster cannot fill is redistributed by ``allocate_budget``. Units that rounding
    (or, in tokens, the last sample that did not fit) leaves over go to the best-ranked remaining samples of
    the whole pool (counted as ``topped_up``).
    """
    from paser.selectors.paser.allocation import allocate_budget

    clusters = np.unique(labels)
    eligible = ~np.isnan(rank_key)
    sizes = np.array([(labels == c).sum() for c in clusters])
    capacity = np.array([budget.cost(np.flatnonzero(eligible & (labels == c))) for c in clusters])
    n_k = np.asarray(allocate_budget(sizes.astype(float), capacity, min(budget.size, int(capacity.sum())),
                                     rule=rule, redistribute=True), dtype=np.int64)
    chosen = []
    for c, n in zip(clusters, n_k):
        chosen.extend(budget.fill(ranked(rank_key, np.flatnonzero(labels == c)), int(n)).tolist())
    taken = np.zeros(len(rank_key), dtype=bool)
    taken[chosen] = True
    rest = ranked(rank_key)
    topped_up = budget.fill(rest[~taken[rest]], budget.size - budget.cost(chosen)).tolist()
    indices = np.array(chosen + topped_up, dtype=np.int64)
    per_cluster = {
        str(int(c)): {"size": int(s), "eligible": int(e), "allotted": int(n),
                      "selected": int((labels[indices] == c).sum())}
        for c, s, e, n in zip(clusters, sizes, capacity, n_k)
    }
    return indices, {"n_clusters": len(clusters), "allocation": rule, "topped_up": len(topped_up),
                     "per_cluster": per_cluster}


def s2ric_labels(ctx, pool, clustering: dict) -> tuple[np.ndarray, dict]:
    """S²RIC cluster labels of the pool's instruction embeddings and the clustering's diagnostics, cached
    together per (pool, embedder, knobs): a warm run reports the same diagnostics as a cold one. Another
    ``clustering.method`` (TF-IDF NMF/LDA/KMeans, spectral) comes from ``clustering_methods.method_labels``."""
    from paser.embedding import embed_pool, embedding_dependencies
    from paser.selectors.clustering_methods import method_labels
    from paser.selectors.paser.clustering import cluster_embeddings

    if clustering["method"] != "s2ric":
        return method_labels(ctx, pool, clustering)
    knobs = {k: clustering[k] for k in CLUSTERING_KNOBS}

    def compute() -> dict:
        labels, diag = cluster_embeddings(embed_pool(ctx, pool.rows), seed=ctx.seed, device=ctx.device,
                                          **{**knobs, "k_range": tuple(knobs["k_range"])})
        return {"labels": np.asarray(labels, dtype=np.int64).tolist(), "diagnostics": _json_scalars(diag)}

    out = ctx.cached_result("s2ric_labels", embedding_dependencies(ctx.embedder_name),
                            {"embedder": ctx.embedder_name, "seed": ctx.seed, **knobs}, compute)
    return np.asarray(out["labels"], dtype=np.int64), out["diagnostics"]


def cached_clustering(ctx, pool, clustering: dict, with_input: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """PASER's S²RIC clustering of the pool: (labels, reduced coordinates, diagnostics), one cache entry
    per (pool, embedder, embedded fields, seed, knobs, code). Computed once: a resumed selection reads it
    back instead of redoing the kNN graph and the eigensolver, and of several processes on one cache
    (torchrun ranks, concurrent jobs) one computes it while the others wait on its claim and read it.
    A cold and a warm call return the same diagnostics (both come through JSON)."""
    from paser.embedding import embed_pool, embedding_dependencies
    from paser.fingerprint import code_version
    from paser.selectors.paser import clustering as s2ric

    knobs = {k: clustering[k] for k in CLUSTERING_KNOBS}
    key = {"name": "paser_clustering", **{k: ctx.cache_key[k] for k in embedding_dependencies(ctx.embedder_name)},
           "params": {"embedder": ctx.embedder_name, "with_input": with_input, "seed": ctx.seed, **knobs},
           "code": code_version(s2ric, embed_pool)}

    def write(folder) -> None:
        labels, coords, diag = s2ric.s2ric_clusters(embed_pool(ctx, pool.rows, with_input=with_input),
                                                    seed=ctx.seed, device=ctx.device,
                                                    **{**knobs, "k_range": tuple(knobs["k_range"])})
        np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
        np.save(folder / "coords.npy", np.asarray(coords, dtype=np.float32))
        (folder / "diagnostics.json").write_text(json.dumps(to_plain(diag)))

    entry, _ = ctx.cache.get_or_create("results/paser_clustering", key, write)
    return (np.load(entry / "labels.npy"), np.load(entry / "coords.npy"),
            json.loads((entry / "diagnostics.json").read_text()))


def _json_scalars(d) -> dict:
    return {k: v for k, v in to_plain(dict(d)).items()
            if isinstance(v, (int, float, str, bool)) or v is None} if d else {}


class ScoredSelector:
    """Base of the baselines: ``score`` the pool, then keep the top ``budget`` (globally, or per S²RIC
    cluster). Selection.diagnostics carries the score distributions, eligibility and stage times."""

    uses_budget = True
    name = "scored"

    def __init__(self, cluster: str | None = None, clustering: dict | None = None):
        if cluster not in CLUSTER_MODES:
            raise ConfigError(f"selector.cluster={cluster!r} is unknown; allowed: null (rank the whole pool) "
                              "or s2ric (rank inside S²RIC clusters)")
        self.cluster = cluster
        self.clustering = clustering_block(clustering)

    def unused_imports(self) -> tuple:
        """Ranking the whole pool runs none of the clustering: it stays out of the selection's cache key."""
        return HYBRID_CLUSTERING if self.cluster is None else ()

    def score(self, pool, ctx) -> Scored:
        raise NotImplementedError

    def select(self, pool, budget, ctx) -> Selection:
        t0 = time.perf_counter()
        scored = self.score(pool, ctx)
        t_score = time.perf_counter() - t0
        diag: dict = {"selector": self.name, "budget": budget.key(),
                      "eligible": int((~np.isnan(scored.rank_key)).sum()), **scored.diagnostics}
        if self.cluster is None:
            indices = budget.fill(ranked(scored.rank_key))
            t_cluster = 0.0
        else:
            t1 = time.perf_counter()
            labels, info = s2ric_labels(ctx, pool, self.clustering)
            indices, alloc = select_within_clusters(scored.rank_key, labels, budget,
                                                    rule=self.clustering["allocation"])
            t_cluster = time.perf_counter() - t1
            diag["clustering"] = {"method": "s2ric", **{k: self.clustering[k] for k in CLUSTERING_KEYS},
                                  **info, **alloc}
        if len(indices) == diag["eligible"] and budget.cost(indices) < budget.size:
            log.warning("%s: only %d samples are eligible, fewer than the budget of %s; selecting them all",
                        self.name, diag["eligible"], budget)
        diag.update({
            "selected": len(indices), "cost": budget.cost(indices),
            "score": describe(scored.scores),
            "selected_score": describe(scored.scores[indices]),
            "time_s": {**diag.get("time_s", {}), "score": round(t_score, 3), "cluster": round(t_cluster, 3),
                       "total": round(time.perf_counter() - t0, 3)},
        })
        return Selection(indices=sorted(int(i) for i in indices), diagnostics=diag, scores=scored.scores)
