"""S²RIC clustering recovers planted clusters; bad settings are clear errors."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from paser.errors import ConfigError
from paser.selectors.paser.clustering import cluster_embeddings, knee, knn_graph


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


def test_knn_graph_matches_brute_force():
    x, _ = planted(3, n=60)
    idx, dist = knn_graph(x, 5, block_elems=100)  # several chunks
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (np.sort(idx, 1) == np.sort(np.argsort(d, 1)[:, :5], 1)).all()
    assert np.allclose(dist, np.sort(d, 1)[:, :5], atol=1e-4)


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
