"""Stage cache keys at the pipeline level: a neutral knob hits, a relevant change misses, a new version of
the implementing code misses, calibration files count by content, evaluators are cached one by one, and a
cold and a warm run of one config write the same results.json."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from paser import pipeline
from tests.conftest import DATA_DIR, TINY_RUN, requires_shared_data

pytestmark = requires_shared_data()
WANDA = [o for o in TINY_RUN if not o.startswith("pruner=")] + [
    "pruner=wanda", "pruner.calibration.nsamples=4", "pruner.calibration.seqlen=64"]
STAGES = ("eval_dense", "prune", "eval_pruned", "select", "recover", "eval_recovered")


def reused(results) -> dict:
    return {k: results["timings"][k]["reused"] for k in STAGES}


@pytest.fixture
def first(compose_cfg, tmp_path):
    return pipeline.run(compose_cfg(WANDA), run_dir=tmp_path / "first")


def test_neutral_knobs_reuse_every_stage(first, compose_cfg, tmp_path):
    neutral = ["pruner.batch_size=1", "recovery.checkpoint_every=1", "evaluator.ppl.batch_size=1",
               "model.name=renamed", "model.device=cpu", "scoring.batch_size=3", "scoring.cutoff=64",
               "scoring.embedder=another"]  # random selection reads no scoring knob
    again = pipeline.run(compose_cfg(WANDA + neutral), run_dir=tmp_path / "again")
    assert all(reused(again).values()), reused(again)
    assert again["metrics"] == first["metrics"]


@pytest.mark.parametrize("change, recomputed", [
    ("pruner.sparsity=0.4", {"prune", "eval_pruned", "select", "recover", "eval_recovered"}),
    ("pruner.calibration.seed=1", {"prune", "eval_pruned", "select", "recover", "eval_recovered"}),
    ("recovery.lr=2e-4", {"recover", "eval_recovered"}),
    ("evaluator.ppl.seq_len=64", {"eval_dense", "eval_pruned", "eval_recovered"}),
    # the model's evaluation default reaches the metrics key only, through evaluator.ppl.bos
    ("model.ppl_bos=per_window", {"eval_dense", "eval_pruned", "eval_recovered"}),
    ("seed=1", {"select", "recover", "eval_recovered"}),
])
def test_a_relevant_change_recomputes_exactly_what_depends_on_it(first, compose_cfg, tmp_path, change, recomputed):
    again = pipeline.run(compose_cfg(WANDA + [change]), run_dir=tmp_path / "again")
    assert {k for k, hit in reused(again).items() if not hit} == recomputed


@pytest.mark.parametrize("component, recomputed", [
    ("paser.pruners.wanda.WandaPruner", {"prune", "eval_pruned", "select", "recover", "eval_recovered"}),
    ("paser.selectors.basic.RandomSelector", {"select", "recover", "eval_recovered"}),
    ("paser.recovery.LoraRecovery", {"recover", "eval_recovered"}),
    ("paser.evaluation.perplexity.PerplexityEvaluator", {"eval_dense", "eval_pruned", "eval_recovered"}),
])
def test_new_code_of_a_component_recomputes_its_stage(first, compose_cfg, tmp_path, monkeypatch, component,
                                                       recomputed):
    real = pipeline.code_version

    def bumped(*objs, **kwargs):  # as if the component's module had been edited
        version = real(*objs, **kwargs)
        edited = any(f"{o.__module__}.{o.__qualname__}" == component for o in objs if isinstance(o, type))
        return {**version, "hash": "edited" + version["hash"][6:]} if edited else version

    monkeypatch.setattr(pipeline, "code_version", bumped)
    again = pipeline.run(compose_cfg(WANDA), run_dir=tmp_path / "again")
    assert {k for k, hit in reused(again).items() if not hit} == recomputed


def test_calibration_is_keyed_by_content_not_path(compose_cfg, tmp_path):
    rows = [json.loads(line) for line in (DATA_DIR / "c4" / "c4-train.00000-of-01024.head.jsonl").open()][:40]
    a, b = tmp_path / "a" / "c4.jsonl", tmp_path / "b" / "c4.jsonl"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(a, b)
    pipeline.run(compose_cfg(WANDA + [f"pruner.calibration.path={a}"]), run_dir=tmp_path / "r1")
    moved = pipeline.run(compose_cfg(WANDA + [f"pruner.calibration.path={b}"]), run_dir=tmp_path / "r2")
    assert moved["timings"]["prune"]["reused"]  # the same content elsewhere
    b.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # other content, same path
    changed = pipeline.run(compose_cfg(WANDA + [f"pruner.calibration.path={b}"]), run_dir=tmp_path / "r3")
    assert not changed["timings"]["prune"]["reused"]


def test_adding_an_evaluator_reuses_the_others(compose_cfg, tmp_path):
    base = [o for o in TINY_RUN if not o.startswith("recovery.")] + ["recovery=none"]
    pipeline.run(compose_cfg(base), run_dir=tmp_path / "a")
    both = base + ["+evaluator.zeroshot._target_=paser.evaluation.zeroshot.ZeroShotEvaluator",
                   "+evaluator.zeroshot.tasks=[piqa]", "+evaluator.zeroshot.limit=4",
                   "+evaluator.zeroshot.bootstrap_iters=0", f"+evaluator.zeroshot.data_dir={DATA_DIR}"]
    again = pipeline.run(compose_cfg(both), run_dir=tmp_path / "b")
    t = again["timings"]
    assert t["eval_dense_ppl"]["reused"] and not t["eval_dense_zeroshot"]["reused"]
    assert again["metrics"]["dense"]["zeroshot"]["tasks"]["piqa"]


def _without_timings(results: dict) -> dict:
    """results.json without what legitimately differs between runs: timings and start time, the run folder,
    the cache folder given on the command line."""
    out = json.loads(json.dumps(results))
    for k in ("timings", "started_at", "run_dir"):
        out.pop(k)
    out["config"]["paths"].pop("cache_dir")
    (out.get("recovery") or {}).pop("train_time_s", None)
    out["prune"].pop("prune_time_s", None)
    return _drop_times(out)


def _drop_times(d):
    """Without the wall times selectors record in their diagnostics (time_s, stage_times_s, time_nmf_s)."""
    if isinstance(d, dict):
        return {k: _drop_times(v) for k, v in d.items() if not re.search(r"(^|_)times?(_|$)", k)}
    return [_drop_times(v) for v in d] if isinstance(d, list) else d


@pytest.mark.parametrize("overrides", [
    [o for o in TINY_RUN if not o.startswith(("pruner=", "selector="))],  # llm_pruner + paser
    TINY_RUN + ["selector=ifd", "selector.cluster=s2ric"],
    TINY_RUN + ["selector=nuggets_cpu", "selector.n_anchors=3", "selector.prefilter=8"],
])
def test_results_do_not_depend_on_what_the_cache_held(compose_cfg, tmp_path, overrides):
    """A config run in an empty cache, and run again after a run that shared its scores and clusters (a
    different budget) and then once more fully cached, writes the same results.json."""
    pipeline.run(compose_cfg(overrides + [f"paths.cache_dir={tmp_path / 'c1'}"]), run_dir=tmp_path / "cold")
    shared = overrides + [f"paths.cache_dir={tmp_path / 'c2'}"]
    pipeline.run(compose_cfg(shared + ["budget=8"]), run_dir=tmp_path / "other_budget")
    pipeline.run(compose_cfg(shared), run_dir=tmp_path / "scores_cached")
    pipeline.run(compose_cfg(shared), run_dir=tmp_path / "warm")
    runs = {d: json.loads((tmp_path / d / "results.json").read_text()) for d in ("cold", "scores_cached", "warm")}
    assert all(v["reused"] for v in runs["warm"]["timings"].values() if isinstance(v, dict))
    for name in ("scores_cached", "warm"):
        assert _without_timings(runs[name]) == _without_timings(runs["cold"]), name


def test_over_budget_selection_is_not_stored(compose_cfg, tmp_path, monkeypatch):
    from paser.components import Selection
    from paser.selectors.basic import RandomSelector

    monkeypatch.setattr(RandomSelector, "select", lambda self, pool, budget, ctx: Selection(list(range(budget.size + 1))))
    with pytest.raises(RuntimeError, match="budget"):
        pipeline.run(compose_cfg(TINY_RUN), run_dir=tmp_path / "r")
    assert not (tmp_path / "cache" / "selection").exists() or not any(
        (tmp_path / "cache" / "selection").glob("*/manifest.json"))


def test_a_local_model_is_keyed_by_its_files_not_its_folder(compose_cfg, tmp_path):
    from paser.models import save_model, tiny_llama

    a, b = tmp_path / "a", tmp_path / "b"
    save_model(*tiny_llama(seed=0), a)
    shutil.copytree(a, b)
    run = [o for o in TINY_RUN if not o.startswith("model=")] + ["model=local", "model.dtype=float32",
                                                                  "recovery=none"]
    run = [o for o in run if not o.startswith("recovery.")]
    pipeline.run(compose_cfg(run + [f"model.path={a}"]), run_dir=tmp_path / "r1")
    moved = pipeline.run(compose_cfg(run + [f"model.path={b}"]), run_dir=tmp_path / "r2")
    assert moved["timings"]["prune"]["reused"] and moved["timings"]["eval_dense"]["reused"]
    save_model(*tiny_llama(seed=1), b)  # another checkpoint in the same folder
    replaced = pipeline.run(compose_cfg(run + [f"model.path={b}"]), run_dir=tmp_path / "r3")
    assert not replaced["timings"]["eval_dense"]["reused"]


def test_evaluation_corpora_count_by_content_not_folder(compose_cfg, tmp_path):
    """The same corpora in another folder hit; a changed corpus file misses."""
    data = tmp_path / "data"
    for name in ("wikitext2", "ptb"):
        shutil.copytree(DATA_DIR / name, data / name)
    base = [o for o in TINY_RUN if not o.startswith("recovery.")] + ["recovery=none", "pruner=none"]
    pipeline.run(compose_cfg(base), run_dir=tmp_path / "a")
    moved = pipeline.run(compose_cfg(base + [f"evaluator.ppl.data_dir={data}"]), run_dir=tmp_path / "b")
    assert moved["timings"]["eval_dense"]["reused"]
    ptb = data / "ptb" / "ptb.valid.txt"
    ptb.chmod(0o644)
    ptb.write_text("a different corpus\n" + ptb.read_text())
    changed = pipeline.run(compose_cfg(base + [f"evaluator.ppl.data_dir={data}"]), run_dir=tmp_path / "c")
    assert not changed["timings"]["eval_dense"]["reused"]
