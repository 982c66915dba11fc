"""S²RIC clustering recovers planted clusters; bad settings are clear errors."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from paser.errors import ConfigError
from paser.selectors.paser.clustering import cluster_embeddings, knee, knn_graph, knn_torch


def planted(k, n=500, dim=64, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    truth = rng.integers(0, k, n)
    x = centres[truth] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


@pytest.mark.parametrize("k", [3, 6])
@pytest.mark.parametrize("reducer", ["diffusion", "pca"])
def test_recovers_planted_clusters_with_auto_k(k, reducer):
    x, truth = planted(k, n=800, seed=k)  # > DENSE_MAX: the sparse LOBPCG path
    labels, diag = cluster_embeddings(x, reducer=reducer, n_components=8, n_clusters="auto", seed=0)
    assert adjusted_rand_score(truth, labels) >= 0.9
    assert diag["n_clusters"] == k
    assert sorted(np.unique(labels)) == list(range(diag["n_clusters"]))
    assert diag["cluster_sizes"] == sorted(diag["cluster_sizes"], reverse=True)


def test_fixed_k_and_overlapping_clusters():
    x, truth = planted(5, noise=0.6, seed=3)
    labels, diag = cluster_embeddings(x, n_components=16, n_clusters=5, seed=0)
    assert diag["k_rule"] == "fixed" and diag["n_clusters"] == 5
    assert adjusted_rand_score(truth, labels) >= 0.9
    assert 1 <= diag["diffusion_time"] <= 100


def test_deterministic():
    x, _ = planted(4, seed=1)
    a, _ = cluster_embeddings(x, n_components=8, seed=0)
    b, _ = cluster_embeddings(x, n_components=8, seed=0)
    assert (a == b).all()


def brute_force(x, k):
    """Exact kNN in float64 numpy: (sorted neighbour sets, distances ascending)."""
    d = np.linalg.norm(x[:, None].astype(np.float64) - x[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(np.argsort(d, 1, kind="stable")[:, :k], 1), np.sort(d, 1)[:, :k]


@pytest.mark.parametrize("candidates", [torch.bfloat16, torch.float32])
def test_torch_reference_matches_brute_force(candidates):
    x, _ = planted(3, n=60)
    idx, dist = knn_torch(x, 5, block_elems=100, candidate_dtype=candidates)  # several chunks
    sets, d = brute_force(x, 5)
    assert (np.sort(idx, 1) == sets).all()
    assert np.allclose(dist, d, atol=1e-5)


def test_faiss_exact_equals_the_torch_reference():
    x, _ = planted(8, n=3000, dim=32, noise=0.5)
    idx, dist, info = knn_graph(x, 10, block_elems=20000)  # several query chunks
    ref_idx, ref_dist = knn_torch(x, 10)
    assert info == {"knn_index": "faiss_flat"}
    assert np.abs(dist - ref_dist).max() <= 1e-5
    # the same neighbour sets, up to ties: a differing neighbour lies at the k-th distance
    differ = np.sort(idx, 1) != np.sort(ref_idx, 1)
    assert np.abs(dist[differ.any(1), -1] - ref_dist[differ.any(1), -1]).max(initial=0) <= 1e-5
    assert differ.mean() < 1e-3
    assert (np.diff(dist, axis=1) >= 0).all()


def test_approximate_graph_reports_its_measured_recall():
    x, _ = planted(8, n=3000, dim=32, noise=0.5)
    idx, dist, info = knn_graph(x, 10, exact_max=1000, nprobe=2, seed=3)
    assert info["knn_index"] == "faiss_ivf_flat" and info["knn_recall_queries"] == 1000
    _, exact = brute_force(x, 10)
    rows = np.sort(np.random.default_rng(4).choice(3000, 1000, replace=False))  # the seed + 1 sample
    recall = (dist[rows] <= exact[rows, -1:] + 1e-6).mean()
    assert info["knn_recall"] == pytest.approx(recall, abs=1e-4)
    assert 0.5 < recall < 1  # 2 of 46 lists: approximate, and measured so
    again = knn_graph(x, 10, exact_max=1000, nprobe=2, seed=3)
    assert (again[0] == idx).all() and (again[1] == dist).all()  # seeded: the same graph on a rerun
    # every list probed: the IVF search is exhaustive and equals the exact graph
    full = knn_graph(x, 10, exact_max=1000, nprobe=info["knn_lists"])
    assert full[2]["knn_recall"] == 1.0 and np.abs(full[1] - exact).max() <= 1e-5


@pytest.mark.parametrize("exact_max", [100, 10000])
def test_duplicates_are_neighbours_and_never_oneself(exact_max):
    x, _ = planted(3, n=20)
    x = np.repeat(x, 40, axis=0)  # 40 identical copies of every row: more ties than the k + margin + 1 found
    idx, dist, _ = knn_graph(x, 5, exact_max=exact_max, nprobe=64)
    assert not (idx == np.arange(len(x))[:, None]).any()
    assert (idx // 40 == np.arange(len(x))[:, None] // 40).all() and (dist == 0).all()


def test_knee():
    assert knee([2, 3, 4, 5, 6, 7], [1.0, 0.7, 0.4, 0.05, 0.04, 0.03]) == 5
    assert knee([2, 3], [0.5, 0.4]) == 3


def test_errors():
    x, _ = planted(3, n=50)
    with pytest.raises(ConfigError, match="allowed"):
        cluster_embeddings(x, reducer="isomap")
    with pytest.raises(ConfigError, match="n_clusters"):
        cluster_embeddings(x, n_clusters="many")
    with pytest.raises(ConfigError, match="n_neighbors"):
        cluster_embeddings(x, n_neighbors=50)
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="umap-learn"):
            cluster_embeddings(x, reducer="umap")


def test_rows_whose_probed_lists_are_too_small_are_searched_exactly(monkeypatch):
    from paser.selectors.paser import clustering

    monkeypatch.setattr(clustering, "IVF_TRAIN_PER_LIST", 4)  # 80 lists of ~5 rows, one probed: < k rows
    x, _ = planted(4, n=400, dim=16)
    idx, dist, info = knn_graph(x, 30, exact_max=100, nprobe=1)
    assert info["knn_lists"] == 80 and info["knn_recall"] == 1.0
    ref_idx, ref_dist = knn_torch(x, 30)
    assert np.abs(dist - ref_dist).max() <= 1e-5 and (np.sort(idx, 1) == np.sort(ref_idx, 1)).mean() > 0.99


def test_nmf_flushes_denormals_without_changing_its_result(monkeypatch):
    from paser.selectors.paser.clustering import _nmf, _nonnegative, reduce_embeddings

    x, _ = planted(6, n=800, noise=0.6, seed=2)
    coords = _nonnegative(reduce_embeddings(x, n_components=16, seed=0)[0])
    tiny = torch.finfo(torch.float32).tiny
    flushed = [_nmf(coords, k, 0) for k in (6, 20)]
    assert torch.tensor([tiny / 4]).mul(1.0).item() > 0  # the flush mode is restored afterwards
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: False)  # the same updates without flushing
    for (labels, err, h), k in zip(flushed, (6, 20)):
        ref_labels, ref_err, ref_h = _nmf(coords, k, 0)
        assert ((ref_h > 0) & (ref_h < tiny)).any()  # this input does produce denormals
        assert (labels == ref_labels).all() and err == pytest.approx(ref_err, abs=1e-6)


# ------------------------------------------------------------------------------------ min_cluster_size

def test_small_clusters_fold_into_the_nearest_centroid():
    from paser.selectors.paser.clustering import merge_small_clusters

    # clusters: A (5 points near 0), B (4 points near 10), C (1 point at 8, nearest to B), D (2 near -3)
    coords = np.array([[0.0], [0.1], [0.2], [0.3], [0.4], [10.0], [10.1], [10.2], [10.3], [8.0], [-3.0], [-3.1]])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3])
    same, merges = merge_small_clusters(labels, coords, 1)
    assert merges == [] and same.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 3, 2, 2]  # relabelled largest first
    out, merges = merge_small_clusters(labels, coords, 2)  # C (1) goes to B
    assert merges == [{"size": 1, "into_size": 4}]
    assert np.bincount(out).tolist() == [5, 5, 2] and len(set(out[5:10])) == 1 and out[5] != out[0]
    out, merges = merge_small_clusters(labels, coords, 3)  # C to B, then D (2) to A, its nearest
    assert [m["size"] for m in merges] == [1, 2] and np.bincount(out).tolist() == [7, 5]
    assert len(set(out[[0, 10, 11]])) == 1
    out, _ = merge_small_clusters(labels, coords, 100)  # never fewer than one cluster
    assert np.bincount(out).tolist() == [12]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_min_cluster_size_is_checked_before_any_work(bad):
    from paser.selectors.ifd import IFDSelector
    from paser.selectors.paser.selector import PaserSelector

    with pytest.raises(ConfigError, match="selector.clustering.min_cluster_size"):
        PaserSelector(clustering={"min_cluster_size": bad})
    with pytest.raises(ConfigError, match="selector.clustering.min_cluster_size"):
        IFDSelector(cluster="s2ric", clustering={"min_cluster_size": bad})


# ------------------------------------------------------------------------------------ diffusion time

def _graph(x, k=10):
    from paser.selectors.paser.clustering import gaussian_affinity

    idx, dist = knn_torch(x.astype(np.float32), k)
    return gaussian_affinity(idx, dist)[0]


def test_diffusion_time_from_a_real_gap():
    from paser.selectors.paser.clustering import diffusion_map

    rng = np.random.default_rng(0)  # three far-apart blobs: two eigenvalues near 1, then a gap
    x = np.concatenate([rng.normal(c, 0.3, (100, 4)) for c in (0.0, 10.0, 20.0)])
    _, d = diffusion_map(_graph(x), 8)
    lam = d["eigenvalues"]
    assert d["diffusion_time_rule"] == "spectral_gap" and d["spectral_gap_index"] == 2
    # the smallest t with (λ3/λ2)^t <= 0.1, by hand
    t = next(t for t in range(1, 100) if (lam[2] / lam[1]) ** t <= 0.1)
    assert d["diffusion_time"] == t > 1


def test_no_gap_means_t_1():
    from paser.selectors.paser.clustering import MAX_GAP_DIFFUSION_TIME, diffusion_map

    theta = np.linspace(0, 2 * np.pi, 400, endpoint=False)  # a ring: the spectrum decays smoothly
    x = np.stack([np.cos(theta), np.sin(theta)], 1)
    _, d = diffusion_map(_graph(x), 16)
    lam = np.array(d["eigenvalues"])
    j = int(np.argmax(-np.diff(lam)))  # the largest difference
    ratio = lam[j] / lam[j + 1]
    # the largest gap would need more than MAX_GAP_DIFFUSION_TIME steps to damp tenfold: no gap, t = 1
    assert np.log(10) / np.log(ratio) > MAX_GAP_DIFFUSION_TIME
    assert d["diffusion_time_rule"] == "no_gap" and d["diffusion_time"] == 1


def test_row_normalised_nmf_places_samples_by_direction():
    from paser.selectors.paser.clustering import nmf_clusters

    rng = np.random.default_rng(0)  # three overlapping directions
    coords = np.concatenate([d + rng.normal(0, 0.2, (40, 4)) for d in np.eye(4)[:3] + 1.0]).astype(np.float32)
    scaled = coords * rng.uniform(0.01, 100, (len(coords), 1)).astype(np.float32)  # how strongly each loads
    labels = nmf_clusters(coords, 3, 0)[0]
    assert adjusted_rand_score(nmf_clusters(scaled, 3, 0)[0], labels) == 1.0  # direction alone decides
    assert adjusted_rand_score(labels, np.repeat([0, 1, 2], 40)) > 0.9
    # without it, a sample's magnitude moves it to another cluster
    plain = [nmf_clusters(c, 3, 0, row_normalize=False)[0] for c in (coords, scaled)]
    assert adjusted_rand_score(*plain) < 0.95  # 0.90 here


# ------------------------------------------------------------------ the eigensolver's record; landmarks (#33)

def test_eigensolver_records_iterations_and_residuals_and_warns_when_short(monkeypatch, caplog):
    import scipy.sparse as sp

    from paser.selectors.paser import clustering

    x, _ = planted(4, n=800, dim=16)  # > DENSE_MAX: LOBPCG
    w = _graph(x)
    vals, _, rec = clustering.diffusion_eigen(w, 6, seed=0)
    assert rec["eigen_solver"] == "lobpcg" and rec["eigen_converged"] and 1 <= rec["eigen_iterations"] <= 500
    assert rec["eigen_residual_max"] <= 1e-5 and len(rec["eigen_residuals"]) == 7
    # against a dense eigendecomposition of the same matrix: the top non-trivial eigenvalues
    d = np.asarray(w.sum(1)).ravel()
    dense = np.linalg.eigvalsh((sp.diags(d ** -0.5) @ w @ sp.diags(d ** -0.5)).toarray())[::-1]
    assert np.allclose(vals, dense[1:8], atol=1e-6)
    monkeypatch.setattr(clustering, "EIGEN_MAXITER", 3)
    with caplog.at_level("WARNING", logger=clustering.__name__):
        _, _, short = clustering.diffusion_eigen(w, 6, seed=0)
    assert not short["eigen_converged"] and short["eigen_iterations"] == 3 and short["eigen_residual_max"] > 1e-5
    assert "did not converge" in caplog.text and "after 3 iterations" in caplog.text


def test_a_small_pools_dense_solve_is_converged_when_it_keeps_the_trivial_direction(caplog):
    """A dense solve of a pool of 19 with more components than positive non-trivial eigenvalues keeps the
    deflated trivial eigenvector (eigenvalue 0 of the operator solved): its residual is 0 there, and no
    warning is logged (the residual on the undeflated matrix was 1: 'did not converge ... after None')."""
    from paser.selectors.paser import clustering

    x, _ = planted(3, n=19, dim=8)
    w = _graph(x)
    with caplog.at_level("WARNING", logger=clustering.__name__):
        vals, _, rec = clustering.diffusion_eigen(w, 16, seed=0)
    assert rec["eigen_solver"] == "dense" and (vals <= 1e-12).sum() >= 2  # the 0 and a negative one kept
    assert rec["eigen_converged"] and rec["eigen_residual_max"] < 1e-10
    assert "did not converge" not in caplog.text


def test_nystrom_extension_gives_back_the_landmark_eigenvectors():
    """With every other landmark as a landmark's neighbours, the extension is the random walk's row, so
    (1/λ) P ψ = ψ; the eigenpairs themselves agree with a dense general eigensolver of P = D⁻¹W."""
    import scipy.linalg

    from paser.selectors.paser.clustering import diffusion_eigen, gaussian_affinity, nystrom_extend

    x, _ = planted(3, n=60, dim=8, noise=0.5)
    m = len(x)
    idx, dist = knn_torch(x, m - 1)  # the complete graph
    w, eps = gaussian_affinity(idx, dist)
    vals, psi, _ = diffusion_eigen(w, 5)
    p = w.toarray() / w.toarray().sum(1, keepdims=True)
    ev, vec = scipy.linalg.eig(p)
    top = np.argsort(-ev.real)[1:7]
    assert np.allclose(vals, ev.real[top], atol=1e-8)
    cos = np.abs((vec[:, top].real / np.linalg.norm(vec[:, top].real, axis=0)) *
                 (psi / np.linalg.norm(psi, axis=0))).sum(0)
    assert np.allclose(cos, 1.0, atol=1e-6)
    extended = nystrom_extend(psi, vals, idx, dist.astype(np.float64) ** 2, eps, chunk=7)
    assert np.allclose(extended, psi, atol=1e-9)


def test_landmark_diffusion_map_agrees_with_the_exact_path():
    """Five well-separated clusters, 3,000 rows, 600 landmarks: the same clustering as the exact path (and
    as the truth). Bound: ARI >= 0.95 (1.0 here)."""
    x, truth = planted(5, n=3000, dim=32, noise=0.5, seed=2)
    knobs = {"n_components": 8, "n_clusters": 5, "seed": 0}
    exact, de = cluster_embeddings(x, landmarks_above=None, **knobs)
    approx, da = cluster_embeddings(x, landmarks_above=1000, landmarks=600, **knobs)
    assert de["diffusion_map"] == "exact" and da["diffusion_map"] == "landmarks_nystrom" and da["landmarks"] == 600
    assert adjusted_rand_score(exact, approx) >= 0.95 and adjusted_rand_score(truth, approx) >= 0.95
    assert da["extension_knn_recall"] >= 0.9 and da["extension_far_share"] < 0.01 and da["eigen_converged"]
    assert set(da) >= {"time_knn_s", "time_eigen_s", "time_extend_s", "eigen_iterations", "eigen_residuals"}
    # at or below the threshold (or with no more rows than landmarks) the exact path runs
    for above, m in ((3000, 600), (1000, 3000)):
        assert cluster_embeddings(x, landmarks_above=above, landmarks=m, **knobs)[1]["diffusion_map"] == "exact"


def test_a_cluster_without_landmarks_is_reported(caplog):
    """What the approximation cannot do: a cluster that draws no landmark is placed by landmarks of other
    clusters. The share of such rows is measured and logged as a warning."""
    from paser.selectors.paser import clustering

    x, _ = planted(3, n=2000, dim=32, noise=0.3, seed=5)
    small, _ = planted(1, n=60, dim=32, noise=0.1, seed=9)  # 3% of the pool, far from the rest
    x = np.concatenate([x, small])
    seed = next(s for s in range(100)  # a seed whose landmark draw misses the small cluster
                if (np.random.default_rng(s).choice(len(x), 120, replace=False) < 2000).all())
    with caplog.at_level("WARNING", logger=clustering.__name__):
        _, d = cluster_embeddings(x, n_components=4, n_clusters=4, seed=seed, landmarks_above=0, landmarks=120)
    assert d["extension_far_share"] == pytest.approx(60 / 2060, abs=0.005)
    assert "farther from every landmark" in caplog.text


@pytest.mark.parametrize("knobs", [{"landmarks_above": -1}, {"landmarks_above": 1.5}, {"landmarks": 10},
                                   {"landmarks": True}, {"landmarks_above": "big"}])
def test_bad_landmark_knobs_are_config_errors(knobs):
    from paser.selectors.clustered import clustering_block

    x, _ = planted(3, n=200)
    with pytest.raises(ConfigError, match="selector.clustering.landmarks"):
        cluster_embeddings(x, **knobs)
    with pytest.raises(ConfigError, match="selector.clustering.landmarks"):
        clustering_block(knobs)
