"""Clustering alternatives to S²RIC (the paper's Table 12), for PASER and the S²RIC hybrids alike.

``selector.clustering.method`` picks how the pool is cut into clusters; everything after the labels
(CDAIS allocation, IES ranking, the NTM; or a hybrid's per-cluster ranking) is unchanged:

    method        clusters                                     with (scikit-learn)
    s2ric         the embeddings (``scoring.embedder``)        S²RIC, paser/selectors/paser/clustering.py (default)
    nmf_tfidf     TF-IDF vectors of the embedded text           NMF; a sample goes to argmax_k W_ik·‖H_k‖
    lda_tfidf     TF-IDF vectors of the embedded text           LatentDirichletAllocation; a sample goes to
                                                                its most probable topic
    kmeans_tfidf  TF-IDF vectors of the embedded text           KMeans (k-means++, 3 initialisations)
    spectral      the embeddings (``scoring.embedder``: a       SpectralClustering on the symmetrised
                  sentence-transformers model, or model_hidden  kNN graph (``n_neighbors``), labels by k-means
                  for the LLM's mean-pooled hidden states)      on the spectral embedding

The embedded text is the one S²RIC embeds (instruction, plus input with PASER's ``embed_input``). TF-IDF:
``TfidfVectorizer`` with scikit-learn's English stop words and at most ``TFIDF_MAX_TERMS`` terms.

K: a fixed ``n_clusters``, or ``auto``, S²RIC's rule: each K of ``k_range`` is fitted on the same seeded
subsample of ``K_SEARCH_ROWS`` rows, and K is the elbow (``knee``, the function S²RIC uses) of an error
curve: NMF's reconstruction error relative to ‖X‖_F (S²RIC's own measure); for the others the
within-cluster sum of squares of the rows they cluster relative to the total (KMeans' own objective, its
inertia; LDA's perplexity rose with K on TF-IDF input, so it has no elbow, and spectral clustering
minimises no error over the data). The whole pool is then clustered at that K. Labels are numbered largest cluster first, as S²RIC's.

S²RIC's own knobs (reducer, n_components, diffusion_time, row_normalize, nmf_input) do not apply to the
other methods; ``min_cluster_size`` must stay 1 (merging needs S²RIC's reduced coordinates).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from paser.errors import ConfigError, DataError

METHODS = ("s2ric", "nmf_tfidf", "lda_tfidf", "kmeans_tfidf", "spectral")
TFIDF_METHODS = ("nmf_tfidf", "lda_tfidf", "kmeans_tfidf")
TFIDF_MAX_TERMS = 20000
ERROR_MEASURES = {"nmf_tfidf": "relative_reconstruction_error", "lda_tfidf": "relative_within_cluster_ss",
                  "kmeans_tfidf": "relative_within_cluster_ss", "spectral": "relative_within_cluster_ss"}


def check_method(method, min_cluster_size: int = 1) -> str:
    if method not in METHODS:
        raise ConfigError(f"selector.clustering.method={method!r} is unknown; allowed: {list(METHODS)}")
    if method != "s2ric" and min_cluster_size != 1:
        raise ConfigError(f"selector.clustering.min_cluster_size={min_cluster_size} works with method=s2ric only "
                          f"(it merges in S²RIC's reduced coordinates); method={method} needs 1")
    return method


def tfidf(texts: list[str]) -> sp.csr_matrix:
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        return TfidfVectorizer(stop_words="english", max_features=TFIDF_MAX_TERMS).fit_transform(texts).tocsr()
    except ValueError as e:  # "empty vocabulary": every text is stop words or punctuation
        raise DataError(f"selector.clustering.method: TF-IDF of the pool's {len(texts)} instructions failed: {e}") from None


def _scatter(rows) -> float:
    """Σ_i ‖x_i − μ‖² of dense or sparse rows."""
    squares = rows.multiply(rows).sum() if sp.issparse(rows) else np.square(rows).sum()
    mean = np.asarray(rows.mean(0)).ravel()
    return float(squares) - rows.shape[0] * float(mean @ mean)


def _within_cluster_ss(x, labels: np.ndarray) -> float:
    """Σ_k Σ_{i∈k} ‖x_i − μ_k‖² / Σ_i ‖x_i − μ‖² (1: the clusters explain nothing; 0: each is one point)."""
    total = _scatter(x)
    return sum(_scatter(x[labels == k]) for k in np.unique(labels)) / total if total > 0 else 0.0


def fit(method: str, x, k: int, seed: int, n_neighbors: int = 10) -> tuple[np.ndarray, float]:
    """(labels, fitting error) of one method at K = k on the rows ``x`` (see the module docstring)."""
    if method == "nmf_tfidf":
        from sklearn.decomposition import NMF

        model = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=400)
        w = model.fit_transform(x)
        labels = (w * np.linalg.norm(model.components_, axis=1)[None, :]).argmax(1)
        return labels, float(model.reconstruction_err_) / max(float(sp.linalg.norm(x)), 1e-12)
    if method == "lda_tfidf":
        from sklearn.decomposition import LatentDirichletAllocation

        labels = LatentDirichletAllocation(n_components=k, random_state=seed).fit_transform(x).argmax(1)
        return labels, _within_cluster_ss(x, labels)
    if method == "kmeans_tfidf":
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=k, random_state=seed, n_init=3).fit(x)
        total = _scatter(x)
        return model.labels_, float(model.inertia_) / total if total > 0 else 0.0
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        if not 1 <= n_neighbors < x.shape[0]:
            raise ConfigError(f"selector.clustering.n_neighbors={n_neighbors} must be in 1..{x.shape[0] - 1} "
                              f"(spectral clustering of {x.shape[0]} samples)")
        labels = SpectralClustering(n_clusters=k, affinity="nearest_neighbors", n_neighbors=n_neighbors,
                                    random_state=seed).fit_predict(x)
        return labels, _within_cluster_ss(x, labels)
    raise ConfigError(f"selector.clustering.method={method!r} has no scikit-learn fit; allowed: {list(METHODS[1:])}")


def cluster_features(method: str, x, n_clusters: int | str = "auto", k_range=(2, 32), seed: int = 0,
                     n_neighbors: int = 10) -> tuple[np.ndarray, dict]:
    """(labels 0..K-1, largest cluster first; diagnostics) of ``method`` on the rows ``x`` (TF-IDF vectors or
    embeddings), K fixed or chosen by S²RIC's elbow rule (see the module docstring)."""
    from paser.selectors.paser.clustering import K_SEARCH_ROWS, _compact, knee

    t0 = time.perf_counter()
    n = x.shape[0]
    diag: dict = {"method": method, "error_measure": ERROR_MEASURES[method]}
    if n_clusters == "auto":
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, K_SEARCH_ROWS), replace=False))
        lo, hi = int(k_range[0]), min(int(k_range[1]), len(rows) - 1)
        if not 2 <= lo < hi:
            raise ConfigError(f"selector.clustering.k_range={list(k_range)} must be [min, max] with "
                              f"2 <= min < max < {len(rows)} (the rows of the K search)")
        ks = list(range(lo, hi + 1))
        fits = [fit(method, x[rows], kk, seed, n_neighbors) for kk in ks]
        k = knee(ks, [e for _, e in fits])
        # the subsample is the whole pool up to K_SEARCH_ROWS rows: its fit at K is the answer
        labels = fits[ks.index(k)][0] if len(rows) == n else fit(method, x, k, seed, n_neighbors)[0]
        diag.update(k_rule="error_elbow", k_search={str(kk): round(e, 5) for kk, (_, e) in zip(ks, fits)})
    elif isinstance(n_clusters, int) and not isinstance(n_clusters, bool) and 1 <= n_clusters <= n:
        k = n_clusters
        labels = np.zeros(n, dtype=np.int64) if k == 1 else fit(method, x, k, seed, n_neighbors)[0]
        diag["k_rule"] = "fixed"
    else:
        raise ConfigError(f"selector.clustering.n_clusters={n_clusters!r} must be 'auto' or an integer in 1..{n}")
    labels = _compact(np.asarray(labels, dtype=np.int64))
    diag.update(n_clusters_requested=int(k), n_clusters=int(labels.max()) + 1,
                cluster_sizes=np.bincount(labels).tolist(), time_cluster_s=round(time.perf_counter() - t0, 3))
    return labels, diag


def method_labels(ctx, pool, clustering: dict, with_input: bool = True) -> tuple[np.ndarray, dict]:
    """Labels and diagnostics of ``clustering["method"]`` (any but s2ric) on the pool, cached together
    under their own name (S²RIC's are ``s2ric_labels``) per (pool, method, text, K knobs, seed; for
    spectral also the embedder, and the model behind a model_hidden embedder, and n_neighbors)."""
    from paser.embedding import embed_pool, embedding_dependencies, instruction_text

    method = clustering["method"]
    params = {"method": method, "with_input": with_input, "seed": ctx.seed, "n_clusters": clustering["n_clusters"],
              "k_range": [int(v) for v in clustering["k_range"]]}
    depends_on: tuple[str, ...] = ("pool",)
    if method == "spectral":
        params.update(embedder=ctx.embedder_name, n_neighbors=clustering["n_neighbors"])
        depends_on = embedding_dependencies(ctx.embedder_name)

    def compute() -> dict:
        if method == "spectral":
            x, extra = embed_pool(ctx, pool.rows, with_input=with_input), {"embedder": ctx.embedder_name}
        else:
            x = tfidf([instruction_text(r, with_input) for r in pool.rows])
            extra = {"tfidf_terms": int(x.shape[1])}
        labels, diag = cluster_features(method, x, clustering["n_clusters"], clustering["k_range"], ctx.seed,
                                        clustering["n_neighbors"])
        return {"labels": labels.tolist(), "diagnostics": {**diag, **extra}}

    out = ctx.cached_result("clustering_labels", depends_on, params, compute)
    return np.asarray(out["labels"], dtype=np.int64), out["diagnostics"]
