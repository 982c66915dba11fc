"""S²RIC: semantic-structural clustering of instruction embeddings.

Pipeline: kNN graph on the (L2-normalised) embeddings (FAISS: exact up to ``KNN_EXACT_MAX`` rows, IVF
above, with its recall@k measured; candidates re-ranked with exact distances) → a dimension reducer
(default: diffusion map on that sparse graph) → NMF clustering of the reduced coordinates, with K fixed or
chosen by the elbow of the NMF error curve.

Device: the kNN graph, the one step that grows faster than N, runs in FAISS on the host, or on the GPU
with a GPU build of FAISS; on a device FAISS cannot use (e.g. CUDA without GPU FAISS) the exact torch
search runs on that device, and only its [N, k] result comes to the host. The eigensolver (scipy,
sparse) and the reducers other than the diffusion map stay on the host, and so does NMF: it factors the
N×2d reduced coordinates, small.

Diffusion map: Gaussian affinity W_ij = exp(-‖x_i − x_j‖² / ε) on the symmetrised kNN graph, ε = median of
the squared kNN distances; symmetric normalisation A = D^-1/2 W D^-1/2; the top d non-trivial eigenvectors
v_i of A (LOBPCG orthogonal to the trivial one, ∝ D^1/2·1), mapped to right eigenvectors ψ_i = D^-1/2 v_i of the
random walk and scaled by λ_i^t. The diffusion time t comes from the spectral gap: with j* = argmax_j
(λ_j − λ_j+1) over λ_1..λ_d+1, t is the smallest integer with (λ_j*+1 / λ_j*)^t ≤ 0.1, i.e. the directions
past the gap are damped at least ten times more than those before it. Instruction embeddings rarely have a
gap: their spectrum decays smoothly (Alpaca, 1,000 samples: λ 0.900, 0.871, 0.835, ... 0.665), the largest
difference is a ratio of 1.04, and that rule gave t = 56 (t = 100, the old cap, on 52K): λ^t then leaves
one or two coordinates, and NMF on them put 616 of 1,000 samples in one cluster and 1 in another. So a gap
counts only if it damps tenfold within ``MAX_GAP_DIFFUSION_TIME`` (20) steps, i.e. λ_j*/λ_j*+1 ≥ 1.122
(three disconnected blobs: λ 1, 1, 0.83, a ratio of 1.21, t = 13); otherwise the spectrum has no gap and
t = 1 (the diagnostics say which rule applied).

The eigensolver's record (iterations, the residual ‖A v − λ v‖ of each eigenvector, whether all reached
``EIGEN_TOL`` within ``EIGEN_MAXITER`` iterations) is in the diagnostics; one that did not converge is logged
as a warning.

Landmark diffusion map (pools of more than ``landmarks_above`` rows, default 200,000: the exact path's kNN
graph and eigensolver grow faster than N, 8.8 min at 520K on 2 cores, experiments/paser_benchmark.md): the
Nyström extension of the diffusion map (Coifman & Lafon 2006, "Geometric harmonics"; Bengio et al. 2004,
out-of-sample extension of spectral embeddings). m = ``landmarks`` rows drawn uniformly (seeded), so that
they sample the pool's density as the pool does; the diffusion map above on their own kNN graph (bandwidth
ε from their kNN distances) gives the random walk's eigenpairs P_L ψ = λ ψ; every other row x takes
ψ(x) = (1/λ) Σ_l p(x,l) ψ(l) over its k nearest landmarks, p(x,·) ∝ exp(−‖x − l‖²/ε) summing to 1 (the
same kernel, so a landmark's own row of P_L would give back ψ(l)); landmarks keep ψ(l). The rest (unit
columns, λ^t, t from the landmarks' spectrum) is as above. Cost: a kNN graph of m rows, an eigensolver of
m nodes, and one IVF search of k nearest landmarks per row. What it cannot resolve: structure finer than
the landmarks' spacing, e.g. a cluster smaller than about N/m rows may draw no landmark and is then placed
by the landmarks of its neighbours; the share of rows farther from every landmark than the landmark graph
reaches is reported (``extension_far_share``) and, above 1%, logged as a warning.

NMF clustering: each sample's reduced coordinates are first scaled to unit length (``row_normalize``, the
Ng-Jordan-Weiss step: a sample's place is its direction, while its length says how strongly it loads on
the coordinates; on all of Alpaca at d = 16, without it one NMF cluster held 37% of the pool, with it the
largest holds 25%, see experiments/s2ric_health_52k.md). The coordinates Y
(N×d, signed) are then made non-negative as X = [max(Y,0), max(−Y,0)]
(N×2d); X Xᵀ is then a non-negative affinity, and factoring X ≈ W H gives X Xᵀ ≈ W (H Hᵀ) Wᵀ without ever
forming the N×N matrix (the official code factors a dense |Y Yᵀ|). A sample goes to argmax_k W_ik·‖H_k‖,
which does not depend on NMF's arbitrary per-component scaling.

Adaptive K ("auto"): fit NMF for every K in k_range (on a seeded subsample of 10,000 rows, whose
components then assign every row), take the relative error e(K) = ‖X − WH‖_F / ‖X‖_F, normalise K and e to [0, 1] and pick the knee: argmax_K (1 − K̂ − ê), the point furthest below the chord
from the first to the last point of the (decreasing) curve. Raw error always falls with K, so it cannot be
minimised directly.

The official code's dense path (``selector=paser_official``): ``reducer=laplacian`` (Gaussian affinity over
all pairs with the median distance, eigenvectors of the random-walk Laplacian, ``laplacian_eigenvectors``)
and ``nmf_input=gram`` (scikit-learn NMF of the dense |Y Yᵀ|, ``gram_nmf_labels``). Both build N×N
matrices, so pools above ``DENSE_OFFICIAL_MAX`` are refused before anything is computed.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import lobpcg

from paser.errors import ConfigError
from paser.progress import tqdm
from paser.scoring import to_host

log = logging.getLogger(__name__)
REDUCERS = ("diffusion", "laplacian", "umap", "pca", "tsne")
NMF_INPUTS = ("coordinates", "gram")
DEFAULT_K_RANGE = (2, 32)
DENSE_MAX = 512  # pools up to this size get a dense eigendecomposition
KNN_EXACT_MAX = 100_000  # larger pools get an approximate (IVF) kNN graph
IVF_LISTS_PER_SQRT_N = 4  # IVF lists = 4·√N (FAISS's guideline range is 4-16·√N)
IVF_TRAIN_PER_LIST = 40  # k-means training rows per list (FAISS warns below 39)
IVF_KMEANS_ITERATIONS = 10  # FAISS's default 25 cost 2.6x the training time for +0.001 recall@10 at 520K
IVF_NPROBE = 16  # lists searched per query
RECALL_QUERIES = 1000  # query rows on which an approximate graph's recall@k is measured
K_SEARCH_ROWS = 10000  # rows used for the NMF error curve of the auto-K rule
MAX_GAP_DIFFUSION_TIME = 20  # a "gap" that needs more diffusion steps to damp tenfold is no gap (t = 1)
LANDMARKS_ABOVE = 200_000  # pools larger than this get the landmark (Nyström) diffusion map
LANDMARKS = 20_000  # its landmarks
EIGEN_TOL = 1e-5  # LOBPCG's target residual ‖A v − λ v‖ of each (unit) eigenvector
EIGEN_MAXITER = 500
LANDMARK_FAR_WARN = 0.01  # share of the pool beyond the landmark graph's reach that is logged as a warning
DENSE_OFFICIAL_MAX = 10_000  # the official code's dense N×N path: 0.75 GB per float64 matrix at this size


def _fast_bf16(device: torch.device) -> bool:
    """Whether the torch kNN candidates are computed in bf16 on ``device``: on a CUDA GPU with native bf16
    (Ampere or later), and on the CPU (2-3x faster than fp32 on CPUs with bf16 units)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def knn_graph(x: np.ndarray, n_neighbors: int, block_elems: int = 1 << 25, margin: int = 16,
              device: torch.device | str | None = None, exact_max: int = KNN_EXACT_MAX,
              nprobe: int = IVF_NPROBE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """k nearest neighbours (Euclidean, self excluded): (indices [N,k] int64, distances [N,k] float32,
    diagnostics), rows sorted by distance.

    FAISS on the host (on the GPU with a GPU build of FAISS and a CUDA ``device``): an exact flat index up
    to ``exact_max`` rows, above it an IVF-Flat index (``IVF_LISTS_PER_SQRT_N``·√N lists, seeded k-means,
    ``nprobe`` lists searched per query) whose recall@k against exact search is measured on a seeded sample
    of ``RECALL_QUERIES`` rows and reported. Either way the best k + ``margin`` candidates are re-ranked
    with exact fp32 distances ‖a−b‖, so the distances do not carry the cancellation error of
    ‖a‖² + ‖b‖² − 2a·b. On another device (CUDA without GPU FAISS, or any other accelerator) the exact
    torch search ``knn_torch`` runs there instead, whatever N.

    Determinism: flat and IVF results are a function of the data and ``seed`` on one machine with one
    thread count; the BLAS products behind the candidates (and behind IVF's k-means and list assignment)
    may round differently with another thread count or BLAS, which can swap a neighbour at a near-tie or
    move a point near a list boundary.
    """
    n = len(x)
    if not 1 <= n_neighbors < n:
        raise ConfigError(f"selector.clustering.n_neighbors={n_neighbors} must be in 1..{n - 1} (pool of {n} samples)")
    device = torch.device(device or "cpu")
    if device.type != "cpu" and not _faiss_gpu(device):
        idx, dist = knn_torch(x, n_neighbors, block_elems, margin, device)
        return idx, dist, {"knn_index": "torch_exact"}
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n_cand = min(n - 1, n_neighbors + margin)
    info: dict = {}
    if n > exact_max:
        n_lists = max(1, min(int(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // IVF_TRAIN_PER_LIST))
        index = faiss.index_factory(x.shape[1], f"IVF{n_lists},Flat")
        index.cp.seed, index.cp.niter = seed, IVF_KMEANS_ITERATIONS
        # k-means on a seeded sample of IVF_TRAIN_PER_LIST rows per list (all rows would cost ~5x more)
        train = np.sort(np.random.default_rng(seed).choice(n, min(n, IVF_TRAIN_PER_LIST * n_lists), replace=False))
        index.train(x[train])
        index.nprobe = nprobe
        index.add(x)
        # queries list by list: consecutive queries probe mostly the same lists, which then stay in cache
        # (1.6x faster at 520K than in row order)
        lists = index.invlists
        order = np.concatenate([faiss.rev_swig_ptr(lists.get_ids(j), lists.list_size(j))
                                for j in range(n_lists) if lists.list_size(j)]).astype(np.int64)
        info.update(knn_index="faiss_ivf_flat", knn_lists=n_lists, knn_nprobe=nprobe)
    else:
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        order = np.arange(n)
        info["knn_index"] = "faiss_flat"
    index = _faiss_on(index, device)
    chunk = max(1, block_elems // (n_cand * x.shape[1]))  # rows whose candidates are re-ranked at once
    idx, dist = np.empty((n, n_neighbors), dtype=np.int64), np.empty((n, n_neighbors), dtype=np.float32)
    for s in range(0, n, chunk):
        rows = order[s:s + chunk]
        idx[rows], dist[rows] = _rerank(x, rows, index.search(x[rows], n_cand + 1)[1], n_neighbors)
    if info["knn_index"] != "faiss_flat":
        info.update(_recall(x, idx, dist, margin, seed))
    return idx, dist, info


def _faiss_gpu(device: torch.device) -> bool:
    """Whether FAISS can search on ``device``: a CUDA device and a GPU build of FAISS that sees a GPU."""
    import faiss

    return device.type == "cuda" and faiss.get_num_gpus() > 0


def _faiss_on(index, device: torch.device):
    if device.type != "cuda":
        return index
    import faiss

    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)


def _rerank(x: np.ndarray, rows: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of each row's FAISS candidates [r, c+1] by exact distance, the row itself removed: it
    is dropped where it appears, else the last candidate is (a row with more than c exact duplicates may
    not find itself among them). Rows whose probed IVF lists held fewer than k candidates are searched
    exactly instead."""
    own = cand == rows[:, None]
    own[~own.any(1), -1] = True
    c = torch.from_numpy(cand[~own].reshape(len(rows), -1))
    xt = torch.from_numpy(x)
    d2 = (xt[torch.from_numpy(rows), None, :] - xt[c.clamp_min(0)]).square_().sum(-1)
    d2[c < 0] = float("inf")  # FAISS pads missing candidates with -1
    vals, pos = torch.topk(d2, k, dim=1, largest=False)
    idx, dist = c.gather(1, pos).numpy(), vals.sqrt_().numpy()
    short = np.flatnonzero((idx < 0).any(1))
    if len(short):
        idx[short], dist[short] = faiss_exact(x, rows[short], k, cand.shape[1] - 1 - k)
    return idx, dist


def faiss_exact(x: np.ndarray, rows: np.ndarray, k: int, margin: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows of ``x[rows]``: FAISS brute force (no index copy) for the best k + margin,
    re-ranked with exact distances."""
    import faiss

    return _rerank(x, rows, faiss.knn(x[rows], x, min(len(x), k + margin + 1))[1], k)


def _recall(x: np.ndarray, idx: np.ndarray, dist: np.ndarray, margin: int, seed: int) -> dict:
    """recall@k of an approximate graph on a seeded sample of query rows: the share of its neighbours that
    are no farther than the exact k-th neighbour (so exact ties count as found)."""
    rows = np.sort(np.random.default_rng(seed + 1).choice(len(x), min(len(x), RECALL_QUERIES), replace=False))
    kth = faiss_exact(x, rows, idx.shape[1], margin)[1][:, -1]
    hit = dist[rows] <= kth[:, None] * (1 + 1e-6)
    return {"knn_recall": round(float(hit.mean()), 5), "knn_recall_queries": len(rows)}


def knn_torch(x: np.ndarray, n_neighbors: int, block_elems: int = 1 << 25, margin: int = 16,
              device: torch.device | str | None = None,
              candidate_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact brute-force kNN in torch on ``device`` (the reference for the FAISS path, and the path on
    devices FAISS cannot use): (indices [N,k] int64, distances [N,k] float32).

    Candidates come from a matmul (‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b) in ``candidate_dtype`` (default: bf16
    where it is fast, else fp32) in row chunks of about ``block_elems`` entries of the N×N matrix; the best
    k + ``margin`` candidates are then re-ranked with exact fp32 distances, so only neighbours that bf16
    rounding pushes more than ``margin`` places down could be missed. The results come back to the host
    once.
    """
    n = len(x)
    device = torch.device(device or "cpu")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    xb = xt.to(candidate_dtype or (torch.bfloat16 if _fast_bf16(device) else torch.float32))
    sq = (xt * xt).sum(1)
    n_cand = min(n - 1, n_neighbors + margin)
    chunk = max(1, block_elems // n)
    idx, dist = [], []
    with torch.no_grad():
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            score = (xb[s:e] @ xb.T).float().mul_(-2.0).add_(sq[None, :])  # ‖b‖² − 2a·b: ‖a‖² is constant
            rows = torch.arange(e - s, device=device)
            score[rows, rows + s] = float("inf")  # never your own neighbour
            cand = torch.topk(score, n_cand, dim=1, largest=False).indices
            d2 = ((xt[s:e, None, :] - xt[cand]) ** 2).sum(-1)  # exact, [rows, n_cand]
            vals, pos = torch.topk(d2, n_neighbors, dim=1, largest=False)
            idx.append(cand.gather(1, pos))
            dist.append(vals.sqrt())
    return to_host(torch.cat(idx)), to_host(torch.cat(dist))


def gaussian_affinity(idx: np.ndarray, dist: np.ndarray) -> tuple[sp.csr_matrix, float]:
    """Symmetric sparse W (max of the two directions) with W_ij = exp(−d_ij²/ε), ε = median d²."""
    n, k = idx.shape
    d2 = dist.astype(np.float64) ** 2
    eps = float(np.median(d2))
    if eps <= 0:  # (almost) all neighbours are duplicates: any scale works
        eps = 1.0
    w = sp.csr_matrix((np.exp(-d2 / eps).ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    return w.maximum(w.T).tocsr(), eps


def diffusion_eigen(w: sp.csr_matrix, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """The top ``n_components`` + 1 non-trivial eigenpairs of the random walk on the graph ``w``: eigenvalues
    λ (decreasing) and right eigenvectors ψ = D^-1/2 v (columns) from the symmetric D^-1/2 W D^-1/2, and
    the eigensolver's record: iterations, the residual ‖A v − λ v‖ of each vector, whether all reached
    ``EIGEN_TOL``. One that did not is logged as a warning (its coordinates are approximate)."""
    n = w.shape[0]
    if not 1 <= n_components <= n - 3:
        raise ConfigError(f"selector.clustering.n_components={n_components} must be in 1..{n - 3} for a pool of {n}")
    deg = np.asarray(w.sum(1)).ravel()
    inv_sqrt = 1.0 / np.sqrt(deg)
    a = sp.diags(inv_sqrt) @ w @ sp.diags(inv_sqrt)
    u0 = np.sqrt(deg) / np.linalg.norm(np.sqrt(deg))
    # a block solver, iterating orthogonally to the trivial eigenvector: Lanczos (eigsh) misses copies of a
    # repeated eigenvalue, which a graph with several (nearly) disconnected parts has
    if n <= DENSE_MAX:  # small pools: exact dense solver (LOBPCG needs n >> block size)
        vals, vecs = np.linalg.eigh(a.toarray() - np.outer(u0, u0))
        vals, vecs = vals[-(n_components + 1):], vecs[:, -(n_components + 1):]
        record: dict = {"eigen_solver": "dense", "eigen_iterations": None}
    else:
        x0 = np.random.default_rng(seed).standard_normal((n, n_components + 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "tolerance not reached": judged below from the residuals
            vals, vecs, history = lobpcg(a, x0, Y=u0[:, None], largest=True, tol=EIGEN_TOL, maxiter=EIGEN_MAXITER,
                                         retResidualNormsHistory=True)
        record = {"eigen_solver": "lobpcg", "eigen_iterations": min(len(history) - 1, EIGEN_MAXITER)}
    # on the operator solved (the trivial eigenvector deflated): a small pool's dense solve may keep that
    # vector itself (eigenvalue 0 there, when fewer non-trivial ones are positive), exact there, not on ``a``
    residuals = np.linalg.norm(a @ vecs - np.outer(u0, u0 @ vecs) - vecs * vals[None, :], axis=0)
    record.update(eigen_residuals=[float(f"{r:.3g}") for r in residuals], eigen_residual_max=float(residuals.max()),
                  eigen_tolerance=EIGEN_TOL, eigen_converged=bool(residuals.max() <= EIGEN_TOL))
    if not record["eigen_converged"]:
        log.warning("S²RIC eigensolver did not converge on %d nodes: largest residual %.3g after %s iterations "
                    "(tolerance %g); the diffusion coordinates are approximate", n, residuals.max(),
                    record["eigen_iterations"], EIGEN_TOL)
    order = np.argsort(-vals)
    return vals[order], vecs[:, order] * inv_sqrt[:, None], record


def diffusion_coordinates(vals: np.ndarray, psi: np.ndarray, n_components: int,
                          diffusion_time: int | str = "auto") -> tuple[np.ndarray, dict]:
    """λ_i^t ψ_i for the first ``n_components`` eigenpairs, each ψ_i scaled to a unit column first (so scale
    comes from λ^t only), t from the spectral gap of ``vals`` (see the module docstring) or given."""
    gaps = vals[:-1] - vals[1:]
    j = int(np.argmax(gaps))  # gap between vals[j] and vals[j+1] (0-based)
    rule = "fixed"
    if diffusion_time == "auto":
        lo, hi = vals[j + 1], vals[j]
        t = math.ceil(math.log(10.0) / math.log(hi / lo)) if 0 < lo < hi else None
        # no real gap (the spectrum decays smoothly, see the module docstring): t = 1
        t, rule = (t, "spectral_gap") if t is not None and t <= MAX_GAP_DIFFUSION_TIME else (1, "no_gap")
    elif isinstance(diffusion_time, int) and diffusion_time >= 0:
        t = diffusion_time
    else:
        raise ConfigError(f"selector.clustering.diffusion_time={diffusion_time!r} must be 'auto' or an integer >= 0")
    lam = np.clip(vals[:n_components], 0.0, None)
    psi = psi[:, :n_components] / np.linalg.norm(psi[:, :n_components], axis=0, keepdims=True)
    coords = psi * (lam ** t)[None, :]
    diag = {"eigenvalues": [round(float(v), 6) for v in vals], "spectral_gap_index": j + 1,
            "diffusion_time": t, "diffusion_time_rule": rule}
    return coords.astype(np.float32), diag


def diffusion_map(w: sp.csr_matrix, n_components: int, diffusion_time: int | str = "auto",
                  seed: int = 0) -> tuple[np.ndarray, dict]:
    """Diffusion coordinates [N, d] of the graph ``w`` and a diagnostics dict (see the module docstring)."""
    vals, psi, record = diffusion_eigen(w, n_components, seed)
    coords, diag = diffusion_coordinates(vals, psi, n_components, diffusion_time)
    return coords, {**diag, **record}


def check_landmarks(landmarks_above, landmarks) -> None:
    if landmarks_above is not None and (isinstance(landmarks_above, bool) or not isinstance(landmarks_above, int)
                                        or landmarks_above < 0):
        raise ConfigError(f"selector.clustering.landmarks_above={landmarks_above!r} must be null (always the exact "
                          "diffusion map) or an integer >= 0 (pools larger than it use landmarks)")
    if isinstance(landmarks, bool) or not isinstance(landmarks, int) or landmarks < 100:
        raise ConfigError(f"selector.clustering.landmarks={landmarks!r} must be an integer >= 100")


def knn_to_landmarks(x: np.ndarray, landmarks: np.ndarray, k: int, seed: int = 0, nprobe: int = IVF_NPROBE,
                     device: torch.device | str | None = None,
                     chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, dict]:
    """Each row's k nearest landmarks other than itself: (positions in ``landmarks`` [N,k] int64, squared
    distances [N,k] float32, diagnostics with the recall@k measured on ``RECALL_QUERIES`` seeded rows).

    FAISS IVF-Flat over the landmarks (``IVF_TRAIN_PER_LIST`` landmarks per list, all of them training
    its k-means, ``nprobe`` lists searched), on the GPU with a GPU build of FAISS: a query costs
    nprobe·40 + #lists distances instead of m, and IVF-Flat's distances are exact fp32 ‖a−b‖². Rows whose
    probed lists hold fewer than k other landmarks are searched exactly."""
    import faiss

    xl = np.ascontiguousarray(x[landmarks], dtype=np.float32)
    m = len(xl)
    n_lists = max(1, min(int(IVF_LISTS_PER_SQRT_N * math.sqrt(m)), m // IVF_TRAIN_PER_LIST))
    index = faiss.index_factory(xl.shape[1], f"IVF{n_lists},Flat")
    index.cp.seed, index.cp.niter = seed, IVF_KMEANS_ITERATIONS
    index.train(xl)
    index.add(xl)
    index.nprobe = nprobe
    device = torch.device(device or "cpu")
    index = _faiss_on(index, device) if _faiss_gpu(device) else index
    own = np.full(len(x), -1, dtype=np.int64)
    own[landmarks] = np.arange(m)
    idx, d2 = np.empty((len(x), k), dtype=np.int64), np.empty((len(x), k), dtype=np.float32)

    def drop_self(rows: np.ndarray, dist: np.ndarray, cand: np.ndarray) -> None:
        keep = cand != own[rows, None]
        keep[keep.all(1), -1] = False  # not among its own candidates (not a landmark): the farthest goes
        idx[rows], d2[rows] = cand[keep].reshape(len(rows), k), dist[keep].reshape(len(rows), k)

    for s in range(0, len(x), chunk):
        rows = np.arange(s, min(s + chunk, len(x)))
        dist, cand = index.search(np.ascontiguousarray(x[rows], dtype=np.float32), k + 1)
        drop_self(rows, dist, cand)
    short = np.flatnonzero((idx < 0).any(1))  # FAISS pads missing candidates with -1
    if len(short):
        drop_self(short, *faiss.knn(np.ascontiguousarray(x[short], dtype=np.float32), xl, k + 1))
    probe = np.sort(np.random.default_rng(seed + 1).choice(len(x), min(len(x), RECALL_QUERIES), replace=False))
    exact = np.empty((len(probe), k), dtype=np.float32)
    dist, cand = faiss.knn(np.ascontiguousarray(x[probe], dtype=np.float32), xl, k + 1)
    keep = cand != own[probe, None]
    keep[keep.all(1), -1] = False
    exact[:] = dist[keep].reshape(len(probe), k)
    recall = float((d2[probe] <= exact[:, -1:] * (1 + 1e-5) + 1e-12).mean())
    return idx, d2, {"extension_index": f"faiss_ivf_flat ({n_lists} lists, nprobe {nprobe})",
                     "extension_knn_recall": round(recall, 5)}


def nystrom_extend(psi_l: np.ndarray, vals: np.ndarray, idx: np.ndarray, d2: np.ndarray, eps: float,
                   chunk: int = 1 << 16) -> np.ndarray:
    """The Nyström extension of the landmark random walk's right eigenvectors ``psi_l`` [m, d] (eigenvalues
    ``vals`` [d]) to points given by their k nearest landmarks (``idx`` [N,k] positions, ``d2`` squared
    distances): ψ(x) = (1/λ) Σ_l p(x,l) ψ(l), with p(x,·) the Gaussian affinities exp(−d²/ε) of x to its
    landmarks normalised to sum 1 (computed as a softmax, so a point far from all of them does not divide
    by an underflowed 0). For a landmark whose neighbours are its row of the landmark graph this gives
    back ψ(l) (P ψ = λ ψ). λ <= 0 (never among the leading eigenvalues of a kNN graph) is left undivided."""
    out = np.empty((len(idx), psi_l.shape[1]), dtype=np.float64)
    inv = 1.0 / np.where(vals > 0, vals, 1.0)
    for s in range(0, len(idx), chunk):
        logits = -d2[s:s + chunk].astype(np.float64) / eps
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[s:s + chunk] = np.einsum("nk,nkd->nd", p, psi_l[idx[s:s + chunk]]) * inv[None, :]
    return out


def landmark_diffusion_map(x: np.ndarray, n_components: int, n_neighbors: int, landmarks: int,
                           diffusion_time: int | str = "auto", seed: int = 0,
                           device: torch.device | str | None = None) -> tuple[np.ndarray, dict]:
    """Diffusion coordinates [N, d] from ``landmarks`` rows drawn uniformly (seeded): the diffusion map of
    their own kNN graph (``diffusion_eigen``, bandwidth ε from the landmarks' kNN distances), extended to
    every other row by the Nyström formula over its k nearest landmarks with the same Gaussian kernel
    (``nystrom_extend``); landmarks keep their own eigenvector entries. See the module docstring."""
    n = len(x)
    land = np.sort(np.random.default_rng(seed).choice(n, landmarks, replace=False))
    t0 = time.perf_counter()
    lidx, ldist, kdiag = knn_graph(x[land], n_neighbors, device=device, seed=seed)
    w, eps = gaussian_affinity(lidx, ldist)
    t1 = time.perf_counter()
    vals, psi_l, record = diffusion_eigen(w, n_components, seed)
    t2 = time.perf_counter()
    idx, d2, xdiag = knn_to_landmarks(x, land, n_neighbors, seed, device=device)
    t3 = time.perf_counter()
    psi = nystrom_extend(psi_l[:, :n_components], vals[:n_components], idx, d2, eps)
    psi[land] = psi_l[:, :n_components]
    # how many points lie farther from every landmark than landmarks lie from their k-th neighbour: the
    # graph does not reach them, and their coordinates copy those of landmarks in other regions
    far = float(np.mean(d2[:, 0] > float(np.quantile(ldist[:, -1], 0.99)) ** 2))
    if far > LANDMARK_FAR_WARN:
        log.warning("S²RIC landmarks: %.1f%% of the pool lies farther from every landmark than the landmark graph "
                    "reaches; raise selector.clustering.landmarks (now %d)", 100 * far, landmarks)
    coords, diag = diffusion_coordinates(vals, psi, n_components, diffusion_time)
    t4 = time.perf_counter()
    return coords, {**diag, **record, "diffusion_map": "landmarks_nystrom", "landmarks": landmarks,
                    "landmark_knn_index": kdiag["knn_index"], "bandwidth": eps, "graph_edges": int(w.nnz // 2),
                    **xdiag, "extension_far_share": round(far, 6),
                    "time_knn_s": round(t1 - t0 + t3 - t2, 3), "time_eigen_s": round(t2 - t1, 3),
                    "time_extend_s": round(t4 - t3, 3)}


def check_dense_size(n: int, what: str) -> None:
    """Refuse a pool too large for the official code's dense N×N matrices, before anything is computed."""
    max_rows = DENSE_OFFICIAL_MAX
    if n > max_rows:
        raise ConfigError(
            f"{what} builds dense {n}×{n} matrices ({n * n * 8 / 2**30:.1f} GB each in float64) for a pool of "
            f"{n} samples; it is limited to {max_rows} samples. Use a smaller pool (data.subsample <= {max_rows}) "
            f"or S²RIC's sparse path (selector=paser: reducer=diffusion, nmf_input=coordinates)")


def laplacian_eigenvectors(x: np.ndarray, n_components: int) -> tuple[np.ndarray, dict]:
    """The official code's reducer, dense: Gaussian affinity A_ij = exp(−‖x_i − x_j‖² / 2σ²) over all pairs,
    σ = the median of the full distance matrix (its zero diagonal included), the random-walk Laplacian
    L = I − D⁻¹A and its ``n_components`` eigenvectors of smallest eigenvalue, unit columns, unscaled.

    L is not symmetric, and the official code hands it to ``eigsh``, a solver for symmetric matrices. Here
    its eigenvectors are computed exactly: ψ = D^-1/2 v for the eigenvectors v of the symmetric
    I − D^-1/2 A D^-1/2 (same eigenvalues), by a dense solver."""
    n = len(x)
    check_dense_size(n, "selector.clustering.reducer=laplacian")
    if not 1 <= n_components < n:
        raise ConfigError(f"selector.clustering.n_components={n_components} must be in 1..{n - 1} for a pool of {n}")
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    m = x @ x.T  # becomes the distances, then the affinity, then D^-1/2 A D^-1/2, in place
    m *= -2.0
    m += sq[:, None]
    m += sq[None, :]
    np.maximum(m, 0.0, out=m)
    np.fill_diagonal(m, 0.0)
    np.sqrt(m, out=m)
    sigma = float(np.median(m))
    m **= 2
    m /= -2.0 * sigma**2 if sigma > 0 else -1.0
    np.exp(m, out=m)
    inv_sqrt = 1.0 / np.sqrt(m.sum(1))
    m *= inv_sqrt[:, None]
    m *= inv_sqrt[None, :]
    vals, vecs = scipy.linalg.eigh(m, subset_by_index=[n - n_components, n - 1], overwrite_a=True)
    order = np.argsort(-vals, kind="stable")  # largest of D^-1/2 A D^-1/2 = smallest of L
    psi = vecs[:, order] * inv_sqrt[:, None]
    psi /= np.linalg.norm(psi, axis=0, keepdims=True)
    diag = {"sigma": sigma, "laplacian_eigenvalues": [round(float(1.0 - v), 6) for v in vals[order]]}
    return psi.astype(np.float32), diag


def gram_nmf_labels(coords: np.ndarray, k: int) -> np.ndarray:
    """The official code's clustering: NMF of the dense |Y Yᵀ| (scikit-learn, K components, random
    initialisation with random_state 0 whatever the run's seed, as there); a sample goes to argmax_k W_ik."""
    from sklearn.decomposition import NMF

    check_dense_size(len(coords), "selector.clustering.nmf_input=gram")
    y = np.asarray(coords, dtype=np.float64)
    w = NMF(n_components=k, init="random", random_state=0).fit_transform(np.abs(y @ y.T))
    return w.argmax(1)


def reduce_embeddings(embeddings: np.ndarray, reducer: str = "diffusion", n_components: int = 16,
                      n_neighbors: int = 10, seed: int = 0, diffusion_time: int | str = "auto",
                      device: torch.device | str | None = None, knn_exact_max: int = KNN_EXACT_MAX,
                      landmarks_above: int | None = LANDMARKS_ABOVE,
                      landmarks: int = LANDMARKS) -> tuple[np.ndarray, dict]:
    """Reduced coordinates [N, d'] and diagnostics (with per-step timings in seconds); the diffusion
    map's kNN graph is built on ``device``, exactly up to ``knn_exact_max`` rows (see ``knn_graph``); a
    pool of more than ``landmarks_above`` rows gets the landmark diffusion map (``landmark_diffusion_map``,
    ``landmarks`` rows) instead, when there are more rows than landmarks."""
    if reducer not in REDUCERS:
        raise ConfigError(f"selector.clustering.reducer='{reducer}' is unknown; allowed: {list(REDUCERS)}")
    check_landmarks(landmarks_above, landmarks)
    x = np.asarray(embeddings, dtype=np.float32)
    diag: dict = {"reducer": reducer, "n_components": n_components}
    t0 = time.perf_counter()
    if reducer == "diffusion" and landmarks_above is not None and len(x) > max(landmarks_above, landmarks):
        coords, ddiag = landmark_diffusion_map(x, n_components, n_neighbors, landmarks, diffusion_time, seed, device)
        diag.update(ddiag, n_neighbors=n_neighbors)
    elif reducer == "diffusion":
        idx, dist, kdiag = knn_graph(x, n_neighbors, device=device, exact_max=knn_exact_max, seed=seed)
        w, eps = gaussian_affinity(idx, dist)
        diag.update(kdiag, diffusion_map="exact", n_neighbors=n_neighbors, bandwidth=eps,
                    graph_edges=int(w.nnz // 2), time_knn_s=round(time.perf_counter() - t0, 3))
        t1 = time.perf_counter()
        coords, ddiag = diffusion_map(w, n_components, diffusion_time, seed)
        diag.update(ddiag, time_eigen_s=round(time.perf_counter() - t1, 3))
    elif reducer == "laplacian":
        coords, ddiag = laplacian_eigenvectors(x, n_components)
        diag.update(ddiag)
    elif reducer == "pca":
        from sklearn.decomposition import PCA

        coords = PCA(n_components=n_components, random_state=seed).fit_transform(x)
    elif reducer == "tsne":
        from sklearn.manifold import TSNE

        dims = min(n_components, 3)  # Barnes-Hut t-SNE supports at most 3 dimensions
        if dims != n_components:
            log.warning("t-SNE: using %d dimensions instead of %d (Barnes-Hut limit)", dims, n_components)
        coords = TSNE(n_components=dims, init="pca", random_state=seed,
                      perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))).fit_transform(x)
        diag["n_components_used"] = dims
    else:  # umap
        try:
            import umap
        except ImportError:
            raise ConfigError("selector.clustering.reducer=umap needs the optional package umap-learn "
                              "(pip install umap-learn); allowed without it: diffusion, pca, tsne") from None
        coords = umap.UMAP(n_components=n_components, n_neighbors=n_neighbors,
                           random_state=seed).fit_transform(x)
    diag["time_reduce_s"] = round(time.perf_counter() - t0, 3)
    return np.asarray(coords, dtype=np.float32), diag


def _nonnegative(coords: np.ndarray) -> np.ndarray:
    y = coords / max(float(np.abs(coords).max()), 1e-12)  # a global scale: geometry unchanged
    return np.hstack([np.clip(y, 0, None), np.clip(-y, 0, None)]).astype(np.float32)


def _nndsvda(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD initialisation (Boutsidis & Gallopoulos 2008), zeros filled with the mean of X ("a")."""
    u, sv, vt = torch.linalg.svd(x, full_matrices=False)
    w = torch.zeros(x.shape[0], k, dtype=x.dtype)
    h = torch.zeros(k, x.shape[1], dtype=x.dtype)
    w[:, 0], h[0] = sv[0].sqrt() * u[:, 0].abs(), sv[0].sqrt() * vt[0].abs()
    for j in range(1, k):
        a, b = u[:, j], vt[j]
        ap, an, bp, bn = a.clamp_min(0), (-a).clamp_min(0), b.clamp_min(0), (-b).clamp_min(0)
        pos, neg = ap.norm() * bp.norm(), an.norm() * bn.norm()
        a, b, m = (ap, bp, pos) if pos > neg else (an, bn, neg)
        scale = (sv[j] * m).sqrt()
        w[:, j], h[j] = scale * a / a.norm().clamp_min(1e-12), scale * b / b.norm().clamp_min(1e-12)
    fill = x.mean()
    return w.masked_fill_(w == 0, fill), h.masked_fill_(h == 0, fill)


def _nmf(x: np.ndarray, k: int, seed: int, n_iter: int = 400, tol: float = 1e-4,
         h_fixed: torch.Tensor | None = None) -> tuple[np.ndarray, float, torch.Tensor]:
    """(labels before compaction, relative error ‖X − WH‖_F / ‖X‖_F, H) of a rank-k NMF of X; with
    ``h_fixed`` only W is fitted (the rows are assigned to given components).

    Multiplicative updates (Lee & Seung) in fp32 torch: each iteration is a few N×F×k matmuls, so the
    whole pool factors in seconds (sklearn's coordinate-descent solver takes minutes at 52K × 32).
    Initialised by NNDSVDa when k <= min(N, F), else by seeded uniform noise scaled to X's mean; stops when
    10 iterations improve the error by less than ``tol`` (relative).
    """
    xt = torch.from_numpy(x)
    if h_fixed is not None:
        h = h_fixed.clone()
        w = torch.full((x.shape[0], k), float((xt.mean() / k).sqrt()), dtype=xt.dtype)
    elif k <= min(x.shape):
        w, h = _nndsvda(xt, k)
    else:
        g = torch.Generator().manual_seed(seed)
        scale = (xt.mean() / k).sqrt()
        w = torch.rand(x.shape[0], k, generator=g, dtype=xt.dtype) * scale
        h = torch.rand(k, x.shape[1], generator=g, dtype=xt.dtype) * scale
    eps, norm, err = 1e-10, float(xt.norm().clamp_min(1e-12)), float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small matmuls: thread barriers cost more than they gain (x20 on a busy CPU)
    # the updates drive entries towards 0, and arithmetic on denormal floats is ~10x slower on x86: flushing
    # them to 0 made the auto-K search 12x faster (labels identical, errors within 1e-5)
    torch.set_flush_denormal(True)
    try:
        for it in range(1, n_iter + 1):
            if h_fixed is None:
                h *= (w.T @ xt) / ((w.T @ w) @ h + eps)
            w *= (xt @ h.T) / (w @ (h @ h.T) + eps)
            if it % 10 == 0 or it == n_iter:
                prev, err = err, float((xt - w @ h).norm()) / norm
                if prev - err < tol * prev:
                    break
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    strength = w * h.norm(dim=1)[None, :]
    return strength.argmax(1).numpy(), err, h


def _compact(labels: np.ndarray, by_size: bool = True) -> np.ndarray:
    """Relabel to 0..K'-1 by decreasing size (ties: lower old label first), or keeping the components'
    order (``by_size=False``); empty components vanish."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))] if by_size else ids
    remap = np.empty(labels.max() + 1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels]


def check_min_cluster_size(value, key: str = "selector.clustering.min_cluster_size") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} must be an integer >= 1 (1: keep every NMF cluster)")
    return value


def merge_small_clusters(labels: np.ndarray, coords: np.ndarray, min_size: int,
                         by_size: bool = True) -> tuple[np.ndarray, list[dict]]:
    """Fold every cluster smaller than ``min_size`` into the cluster whose centroid (in ``coords``, the
    reduced coordinates) is nearest, smallest first, until none is smaller or one is left; then relabel
    (``_compact``). Returns the labels and what was merged (sizes before each merge)."""
    labels = labels.copy()
    merges = []
    while True:
        sizes = np.bincount(labels)
        present = np.flatnonzero(sizes)
        small = [int(k) for k in present if sizes[k] < min_size]
        if not small or len(present) == 1:
            return _compact(labels, by_size), merges
        k = min(small, key=lambda c: (sizes[c], c))
        centroid = coords[labels == k].mean(0)
        into = min((int(c) for c in present if c != k),
                   key=lambda c: (float(np.linalg.norm(coords[labels == c].mean(0) - centroid)), c))
        merges.append({"size": int(sizes[k]), "into_size": int(sizes[into])})
        labels[labels == k] = into


def knee(ks: list[int], errors: list[float]) -> int:
    """The elbow of a decreasing error curve: the K furthest below the first-to-last chord (normalised)."""
    if len(ks) < 3:
        return ks[int(np.argmin(errors))]
    k = np.asarray(ks, dtype=float)
    e = np.asarray(errors, dtype=float)
    kn = (k - k[0]) / (k[-1] - k[0])
    span = e.max() - e.min()
    en = (e - e.min()) / span if span > 0 else np.zeros_like(e)
    return ks[int(np.argmax(1.0 - kn - en))]


def nmf_clusters(coords: np.ndarray, n_clusters: int | str = "auto", seed: int = 0,
                 k_range: tuple[int, int] = DEFAULT_K_RANGE, min_cluster_size: int = 1,
                 row_normalize: bool = True, nmf_input: str = "coordinates") -> tuple[np.ndarray, dict]:
    """Labels 0..K-1 from NMF, and diagnostics. ``nmf_input=coordinates`` factors the non-negative
    coordinates [Y+, Y−] and labels largest cluster first; ``gram`` is the official code's NMF of the
    dense |Y Yᵀ| (``gram_nmf_labels``; fixed K), labelled in NMF component order, as the code walks them.
    With ``row_normalize`` each sample's coordinates are scaled to unit length first (the Ng-Jordan-Weiss
    step of spectral clustering: a sample is placed by its direction, not by how strongly it loads on the
    leading eigenvectors; see the module docstring). Clusters smaller than ``min_cluster_size`` are folded
    into their nearest (``merge_small_clusters``; 1, the default and the paper's rule, merges none)."""
    check_min_cluster_size(min_cluster_size)
    if nmf_input not in NMF_INPUTS:
        raise ConfigError(f"selector.clustering.nmf_input={nmf_input!r} is unknown; allowed: {list(NMF_INPUTS)}")
    t0 = time.perf_counter()
    if row_normalize:
        coords = coords / np.maximum(np.linalg.norm(coords, axis=1, keepdims=True), 1e-12)
    x = _nonnegative(coords)
    n = len(x)
    diag: dict = {"nmf_input": nmf_input}
    by_size = nmf_input == "coordinates"
    if nmf_input == "gram":
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or not 1 <= n_clusters <= n:
            raise ConfigError(f"selector.clustering.nmf_input=gram needs an integer selector.clustering.n_clusters in 1..{n} (the "
                              f"official K = 10), got {n_clusters!r}: 'auto' would factor a dense N×N matrix per K")
        k = n_clusters
        labels = gram_nmf_labels(coords, k)
        diag["k_rule"] = "fixed"
    elif n_clusters == "auto":
        lo, hi = int(k_range[0]), min(int(k_range[1]), n - 1)
        if not 2 <= lo < hi:
            raise ConfigError(f"selector.clustering.k_range={list(k_range)} must be [min, max] with 2 <= min < max < N={n}")
        ks = list(range(lo, hi + 1))
        # the error curve is read on a seeded subsample (its shape does not need every row)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, K_SEARCH_ROWS), replace=False))
        fits = [_nmf(x[rows], kk, seed) for kk in tqdm(ks, desc="NMF K search", leave=False)]
        errors = [f[1] for f in fits]
        k = knee(ks, errors)
        # all rows against the components found on the subsample (W only: a convex problem per row)
        labels = _nmf(x, k, seed, h_fixed=fits[ks.index(k)][2])[0] if len(rows) < n else fits[ks.index(k)][0]
        diag.update(k_rule="nmf_error_elbow", k_search={str(kk): round(e, 5) for kk, e in zip(ks, errors)})
    elif isinstance(n_clusters, int) and not isinstance(n_clusters, bool) and 1 <= n_clusters <= n:
        k = n_clusters
        labels = np.zeros(n, dtype=np.int64) if k == 1 else _nmf(x, k, seed)[0]
        diag["k_rule"] = "fixed"
    else:
        raise ConfigError(f"selector.clustering.n_clusters={n_clusters!r} must be 'auto' or an integer in 1..{n}")
    labels, merges = merge_small_clusters(_compact(labels, by_size), coords, min_cluster_size, by_size)
    if min_cluster_size > 1:
        diag.update(min_cluster_size=min_cluster_size, merged_clusters=merges)
    diag.update(n_clusters_requested=k, n_clusters=int(labels.max()) + 1,
                label_order="size" if by_size else "nmf_component",
                cluster_sizes=np.bincount(labels).tolist(), time_nmf_s=round(time.perf_counter() - t0, 3))
    return labels, diag


def s2ric_clusters(embeddings: np.ndarray, reducer: str = "diffusion", n_components: int = 16,
                   n_neighbors: int = 10, n_clusters: int | str = "auto", seed: int = 0,
                   diffusion_time: int | str = "auto", k_range: tuple[int, int] = DEFAULT_K_RANGE,
                   device: torch.device | str | None = None, knn_exact_max: int = KNN_EXACT_MAX,
                   min_cluster_size: int = 1, row_normalize: bool = True, nmf_input: str = "coordinates",
                   landmarks_above: int | None = LANDMARKS_ABOVE,
                   landmarks: int = LANDMARKS) -> tuple[np.ndarray, np.ndarray, dict]:
    """S²RIC, the one implementation PASER and the hybrids share: (labels 0..K-1, cluster 0 the largest
    unless ``nmf_input=gram``; the reduced coordinates; diagnostics). See the module docstring."""
    if nmf_input == "gram":  # refuse a pool too large before the reducer runs
        check_dense_size(len(embeddings), "selector.clustering.nmf_input=gram")
    coords, diag = reduce_embeddings(embeddings, reducer, n_components, n_neighbors, seed, diffusion_time,
                                     device, knn_exact_max, landmarks_above, landmarks)
    labels, cdiag = nmf_clusters(coords, n_clusters, seed, k_range, min_cluster_size, row_normalize, nmf_input)
    diag.update(cdiag)
    return labels, coords, diag


def cluster_embeddings(embeddings: np.ndarray, **knobs) -> tuple[np.ndarray, dict]:
    """``s2ric_clusters`` without the coordinates: (labels, diagnostics)."""
    labels, _, diag = s2ric_clusters(embeddings, **knobs)
    return labels, diag
