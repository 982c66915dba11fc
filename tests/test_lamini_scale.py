"""LaMini scale (#33): PASER's clustering is computed once (resumed from the cache, shared between
processes)."""

from __future__ import annotations

import io
import multiprocessing

import numpy as np
import pytest

from paser.budget import Budget
from paser.cache import StageCache
from paser.components import SelectionContext
from paser.selectors.clustered import cached_clustering, clustering_block
from paser.selectors.paser import clustering as s2ric
from paser.selectors.paser.selector import PaserSelector
from tests.test_paser_selector import SMALL, SMALL_CLUSTERING, StubEmbedder, make_ctx, make_pool


def count_calls(monkeypatch, calls: list) -> None:
    """Record every kNN graph and diffusion map S²RIC computes."""
    for name in ("knn_graph", "diffusion_map"):
        real = getattr(s2ric, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(s2ric, name, counted)


class Killed(RuntimeError):
    pass


def test_a_resumed_selection_reuses_the_clustering(models, tmp_path, monkeypatch):
    calls: list[str] = []
    count_calls(monkeypatch, calls)
    pool = make_pool()
    killed = make_ctx(models, tmp_path)

    def kill():
        raise Killed("killed after the clustering")

    killed._factories["original_model"] = kill  # the JSD stage, which comes after the clustering
    with pytest.raises(Killed):
        PaserSelector(**SMALL).select(pool, Budget.samples(10), killed)
    assert calls == ["knn_graph", "diffusion_map"]
    resumed_ctx = make_ctx(models, tmp_path)  # a new process's context on the same cache
    resumed = PaserSelector(**SMALL).select(pool, Budget.samples(10), resumed_ctx)
    assert calls == ["knn_graph", "diffusion_map"]  # no second kNN graph or eigensolver
    assert resumed_ctx.cache.counts["results/paser_clustering"] == {"computed": 0, "cached": 1, "other": 0}
    cold = PaserSelector(**SMALL).select(pool, Budget.samples(10), make_ctx(models, tmp_path / "fresh"))
    assert resumed.indices == cold.indices
    untimed = [{k: v for k, v in s.diagnostics["clustering"].items() if not k.startswith("time_")}
               for s in (resumed, cold)]
    assert untimed[0] == untimed[1]
    arrays = [np.load(io.BytesIO(s.artifacts["paser_samples.npz"])) for s in (resumed, cold)]
    assert all(np.array_equal(arrays[0][k], arrays[1][k]) for k in ("labels", "xy", "selected"))
    assert len(calls) == 4  # the fresh cache computed it again


def test_the_clustering_key_names_what_changes_it(models, tmp_path, monkeypatch):
    calls: list[str] = []
    count_calls(monkeypatch, calls)
    pool, block = make_pool(), clustering_block(SMALL_CLUSTERING)
    ctx = make_ctx(models, tmp_path)
    labels, coords, _ = cached_clustering(ctx, pool, block)
    assert labels.shape == (len(pool),) and coords.shape == (len(pool), 4)
    cached_clustering(ctx, pool, block)
    assert len(calls) == 2
    cached_clustering(ctx, pool, block, with_input=False)  # other embeddings
    cached_clustering(ctx, pool, {**block, "n_components": 3})
    cached_clustering(make_ctx(models, tmp_path, seed=1), pool, block)
    assert len(calls) == 8
    cached_clustering(ctx, pool, {**block, "allocation": "equal"})  # not a clustering knob
    assert len(calls) == 8


def _cluster_in_a_process(cache_dir, start, calls_file):
    """One of two processes: wait for the other, then ask for the same clustering."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        count_calls(mp, calls)
        ctx = SelectionContext(tokenizer=None, original_model=None, pruned_model=None, embedder=StubEmbedder,
                               embedder_name="stub", cache=StageCache(cache_dir, poll_s=0.05),
                               cache_key={"pool": "paser-test-pool"}, seed=0)
        start.wait()
        labels, _, _ = cached_clustering(ctx, make_pool(), clustering_block(SMALL_CLUSTERING))
    with open(calls_file, "a") as f:
        f.write("".join(f"{c}\n" for c in calls))
    return labels.tolist(), ctx.cache.counts["results/paser_clustering"]


def test_two_processes_compute_the_clustering_once(tmp_path):
    """Two processes on one cache folder (as two torchrun ranks are): one computes, the other waits on its
    claim and reads the stored entry."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, spawn.Pool(2) as workers:
        start = manager.Barrier(2)
        args = (tmp_path / "cache", start, tmp_path / "calls.txt")
        (a, ca), (b, cb) = workers.starmap(_cluster_in_a_process, [args, args])
    assert a == b
    assert (tmp_path / "calls.txt").read_text().split() == ["knn_graph", "diffusion_map"]
    # the second reads it after waiting on the claim ("other"), or after it was stored ("cached")
    assert sorted([ca["computed"], cb["computed"]]) == [0, 1] and sum(ca.values()) == sum(cb.values()) == 1
    assert np.bincount(a).min() > 0
