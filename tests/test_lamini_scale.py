"""LaMini scale (#33): PASER's clustering is computed once (resumed from the cache, shared between
processes); data=lamini reads the dataset's own fields from a local file or the hub."""

from __future__ import annotations

import io
import json
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


# ------------------------------------------------------------------------------ data=lamini

LAMINI_ROWS = [  # the hub dataset's own fields
    {"instruction": "List three primary colours.", "response": "Red, yellow and blue.",
     "instruction_source": "generated_flan"},
    {"instruction": "What is the capital of France?", "response": "Paris.", "instruction_source": "alpaca"},
    {"instruction": "Write a haiku about rain.", "response": "Soft rain on the roof\nwhispers ...",
     "instruction_source": "self_instruct_with_topic"},
]


def lamini_pool(overrides, tmp_path):
    """The data node of ``data=lamini`` (whole pool) and its pool, built as a run builds it."""
    from paser.pipeline import _instantiate
    from tests.conftest import compose_config

    cfg = compose_config(["data=lamini", "data.subsample=null", *overrides], tmp_path)
    return cfg.data, _instantiate(cfg.data)


def test_lamini_reads_its_own_fields_from_a_local_file(tmp_path):
    path = tmp_path / "lamini.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in LAMINI_ROWS))
    node, pool = lamini_pool([f"data.path={path}"], tmp_path)
    assert node.hub_id == "MBZUAI/LaMini-instruction"
    assert pool.source == str(path) and len(pool) == 3
    assert pool.rows == [{"instruction": r["instruction"], "input": "", "output": r["response"]} for r in LAMINI_ROWS]
    # by default the file is looked for under paths.data_dir
    assert compose_config_data_path(tmp_path).endswith("/lamini/lamini.jsonl")


def compose_config_data_path(tmp_path) -> str:
    from tests.conftest import DATA_DIR, compose_config

    path = compose_config(["data=lamini"], tmp_path).data.path
    assert path.startswith(str(DATA_DIR))
    return path


def test_lamini_row_without_a_response_names_file_line_and_field(tmp_path):
    from paser.errors import DataError

    path = tmp_path / "lamini.jsonl"
    path.write_text(json.dumps(LAMINI_ROWS[0]) + "\n" + json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    with pytest.raises(DataError, match=r"lamini\.jsonl:2: missing field\(s\) \['response'\]"):
        lamini_pool([f"data.path={path}"], tmp_path)


def test_lamini_from_the_hub_when_there_is_no_file(tmp_path, monkeypatch):
    import datasets

    asked = {}

    def load_dataset(hub_id, split):
        asked.update(hub_id=hub_id, split=split)
        return LAMINI_ROWS

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _, pool = lamini_pool([f"data.path={tmp_path / 'absent.jsonl'}"], tmp_path)
    assert asked == {"hub_id": "MBZUAI/LaMini-instruction", "split": "train"}
    assert pool.source == "MBZUAI/LaMini-instruction"
    assert [r["output"] for r in pool.rows] == [r["response"] for r in LAMINI_ROWS]
    assert all(r["input"] == "" for r in pool.rows)
