"""The whole pipeline on the tiny random Llama: results, caching across a sweep, bad input."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from paser import pipeline
from paser.claims import Claim
from paser.errors import ConfigError, DataError
from tests.conftest import TINY_RUN, requires_shared_data

pytestmark = requires_shared_data()


def test_tiny_run_writes_complete_results(compose_cfg, tmp_path):
    cfg = compose_cfg(TINY_RUN)
    results = pipeline.run(cfg, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"].keys() == {"dense", "pruned", "recovered"}
    for state in ("dense", "pruned", "recovered"):
        assert saved["metrics"][state]["ppl"]["wikitext2"]["ppl"] > 1
        assert saved["metrics"][state]["ppl"]["wikitext2"]["windows"] == 2
    assert saved["prune"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert saved["selection"]["stats"]["selected"] == 6 and saved["selection"]["pool_size"] == 24
    assert len(json.loads((tmp_path / "run" / "selected_indices.json").read_text())) == 6
    assert {"eval_dense", "prune", "select", "recover", "eval_recovered"} <= saved["timings"].keys()
    assert saved["versions"]["torch"] and "git_commit" in saved
    assert saved["config"]["model"]["name"] == "tiny-llama"
    assert results["recovery"]["steps"] == 3  # 6 samples, batch 2, one epoch
    summary = saved["summary"]
    assert summary["selection"]["samples"] == 6 and summary["selection"]["pool"] == 24
    assert summary["selection"]["tokens"] == saved["selection"]["stats"]["tokens"]["total"] > 0
    wiki = summary["metrics"]["ppl/wikitext2"]
    assert [wiki[s] for s in ("dense", "pruned", "recovered")] == [saved["metrics"][s]["ppl"]["wikitext2"]["ppl"]
                                                                   for s in ("dense", "pruned", "recovered")]
    assert summary["pruning"]["zero_weights_pct"] == pytest.approx(50, abs=1)
    assert "wiring check" in summary["note"] and "mean nothing" in summary["note"]


def test_selected_rows_name_their_line_in_the_source_file(compose_cfg, tmp_path):
    """selected.jsonl holds each chosen row with its line in the pool file (the pool is a seeded subsample
    of it), in the order of selected_indices.json."""
    cfg = compose_cfg(TINY_RUN)
    pipeline.run(cfg, run_dir=tmp_path / "run")
    chosen = [json.loads(line) for line in (tmp_path / "run" / "selected.jsonl").read_text().splitlines()]
    assert [c["pool_index"] for c in chosen] == json.loads((tmp_path / "run" / "selected_indices.json").read_text())
    source = Path(cfg.data.path).read_text(encoding="utf-8").splitlines()  # line n is source[n - 1]
    assert len(chosen) == 6 and len({c["line"] for c in chosen}) == 6
    for c in chosen:
        row = json.loads(source[c["line"] - 1])
        assert {k: c[k] for k in ("instruction", "input", "output")} == \
            {k: row[k] for k in ("instruction", "input", "output")}
    assert max(c["line"] for c in chosen) > 24  # lines of the file, not positions in the 24-row pool


def test_default_components_llm_pruner_and_paser(compose_cfg, tmp_path):
    overrides = [o for o in TINY_RUN if not o.startswith(("pruner=", "selector="))]
    results = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "run")
    assert results["config"]["pruner"]["_target_"].endswith("LLMPruner")
    prune = results["prune"]
    assert prune["params_after"] < prune["params_before"]
    # structured pruning removes parameters: the zeros left in the rest are not called its sparsity
    assert "sparsity" not in prune and prune["zero_fraction"] < 0.01 and prune["param_reduction"] > 0.1
    assert results["summary"]["pruning"]["params_removed_pct"] == pytest.approx(
        100 * (1 - prune["params_after"] / prune["params_before"]))
    assert 0 < results["selection"]["stats"]["selected"] <= 6
    assert results["selection"]["diagnostics"]["clusters"]  # PASER's per-cluster diagnostics
    assert (tmp_path / "run" / "paser_clusters.png").exists()
    again = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "again")
    assert again["timings"]["select"]["reused"]
    assert (tmp_path / "again" / "paser_clusters.png").exists()  # copied from the cached selection


def test_second_selector_reuses_pruned_model(compose_cfg, tmp_path, caplog):
    pipeline.run(compose_cfg(TINY_RUN + ["selector=random"]), run_dir=tmp_path / "a")
    with caplog.at_level(logging.INFO):
        second = pipeline.run(compose_cfg(TINY_RUN + ["selector=full"]), run_dir=tmp_path / "b")
    t = second["timings"]
    assert t["prune"]["reused"] and t["eval_dense"]["reused"] and t["eval_pruned"]["reused"]
    assert not t["select"]["reused"] and not t["recover"]["reused"]
    assert "stage prune" in caplog.text and "(reused from cache)" in caplog.text
    # each stage's first line says what it is about
    assert "stage prune: pruning with MagnitudePruner" in caplog.text
    assert "stage eval_dense: the dense model's perplexity on wikitext2, ptb (first 2 windows of 128 tokens)" \
        in caplog.text
    assert "stage select: FullSelector selects budget=6 (samples) from the pool" in caplog.text
    assert "stage recover: LoraRecovery on the selection (r=8, 1 epochs, effective batch 2)" in caplog.text
    assert "this run is a wiring check: model=tiny-llama is a random model" in caplog.text
    assert second["selection"]["stats"]["selected"] == 24


def test_an_evaluation_another_job_is_computing_is_put_off(compose_cfg, tmp_path):
    """Jobs of a sweep share the dense and pruned evaluations: while another process holds the dense
    evaluation's claim, this run evaluates the pruned model first instead of waiting. The stand-in for the
    other job lets go once the pruned evaluation is stored (or after 30 s: then a run that waited first
    evaluates dense first, and the order check fails)."""
    cfg = compose_cfg(TINY_RUN)
    run = pipeline.Run(cfg, pipeline.build_components(cfg), tmp_path / "run", torch.device("cpu"))
    (kind, ev), = run.parts.evaluators.items()
    dense_key = run.keys.metrics(run.keys.model, kind, cfg.evaluator[kind], ev)
    dense_claim = run.cache.entry_dir("metrics", dense_key).with_suffix(".claim")
    pruned_key = run.keys.metrics(run.keys.pruned, kind, cfg.evaluator[kind], ev)
    claim = Claim.acquire(dense_claim, what="the other job")

    def other_job():
        deadline = time.time() + 30
        while run.cache.lookup("metrics", pruned_key) is None and time.time() < deadline:
            time.sleep(0.05)
        claim.release()

    releaser = threading.Thread(target=other_job)
    releaser.start()
    out = run()
    releaser.join()
    order = list(run.timer.stages)
    assert order.index("prune") < order.index("eval_pruned") < order.index("eval_dense")
    assert run.timer.stages["eval_dense"]["source"] == "computed"  # released without an entry: computed here
    assert out["metrics"]["dense"][kind]["wikitext2"]["ppl"] < out["metrics"]["pruned"][kind]["wikitext2"]["ppl"]


def test_rerun_of_finished_config_does_no_work(compose_cfg, tmp_path):
    first = pipeline.run(compose_cfg(TINY_RUN), run_dir=tmp_path / "a")
    again = pipeline.run(compose_cfg(TINY_RUN), run_dir=tmp_path / "b")
    stages = {k: v for k, v in again["timings"].items() if isinstance(v, dict)}
    assert all(v["reused"] for v in stages.values()), stages
    assert again["metrics"] == first["metrics"]


def test_no_recovery_and_no_pruning(compose_cfg, tmp_path):
    overrides = [o for o in TINY_RUN if not o.startswith("recovery.")] + ["recovery=none", "pruner=none"]
    results = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "r")
    assert "recovered" not in results["metrics"] and results["recovery"] is None
    assert results["metrics"]["pruned"] == results["metrics"]["dense"]
    assert results["prune"]["sparsity"] == 0.0


def test_channel_wise_llm_pruner_through_the_pipeline(compose_cfg, tmp_path):
    """A model with a smaller hidden size is cached, reloaded, LoRA-recovered and evaluated."""
    overrides = [o for o in TINY_RUN if not o.startswith("pruner=")] + ["pruner=llm_pruner_channel"]
    results = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "a")
    assert results["prune"]["hidden_size"] == 72  # tiny Llama: 96 hidden channels, 25% removed
    assert results["metrics"]["recovered"]["ppl"]["wikitext2"]["ppl"] > 1
    again = pipeline.run(compose_cfg(overrides + ["seed=1"]), run_dir=tmp_path / "b")  # pruned model from cache
    assert again["timings"]["prune"]["reused"] and again["metrics"]["pruned"] == results["metrics"]["pruned"]


def test_cached_dense_only_run_loads_no_model(compose_cfg, tmp_path, monkeypatch):
    overrides = [o for o in TINY_RUN if not o.startswith("recovery.")] + ["recovery=none", "pruner=none"]
    first = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "a")

    def no_loading(*args, **kwargs):
        raise AssertionError("a fully cached run loaded the model")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    again = pipeline.run(compose_cfg(overrides), run_dir=tmp_path / "b")
    assert again["prune"] == first["prune"] and again["metrics"] == first["metrics"]


@pytest.mark.parametrize("budget,message", [(0, "must be > 0"), (-3, "must be > 0"),
                                            (1000, "larger than the pool"), (2.5, "neither a fraction")])
def test_impossible_budget_is_a_clear_error(compose_cfg, tmp_path, budget, message):
    cfg = compose_cfg(TINY_RUN + [f"budget={budget}"])
    with pytest.raises(ConfigError, match=message):
        pipeline.run(cfg, run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "results.json").exists()


def test_malformed_pool_line_names_file_and_line(compose_cfg, tmp_path):
    pool = tmp_path / "pool.jsonl"
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    pool.write_text(f"{good}\n{good}\n{{not json\n")
    cfg = compose_cfg(TINY_RUN + ["data=jsonl", f"data.path={pool}", "data.subsample=null", "budget=1"])
    with pytest.raises(DataError, match=rf"{pool}:3: not valid JSON"):
        pipeline.run(cfg, run_dir=tmp_path / "r")


def test_pool_row_missing_a_field(compose_cfg, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n"
                    + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    cfg = compose_cfg(TINY_RUN + ["data=jsonl", f"data.path={pool}", "data.subsample=null", "budget=1"])
    with pytest.raises(DataError, match=r"pool.jsonl:2: missing field\(s\) \['instruction', 'output'\]; every row "
                                        r"needs \['instruction', 'output'\] and this one has \['prompt', 'completion'\]\. "
                                        r"If your file names them differently.*data\.field_map="):
        pipeline.run(cfg, run_dir=tmp_path / "r")


def test_selector_artifacts_must_be_plain_file_names(tmp_path):
    from paser.stages.select import write_files

    write_files(tmp_path / "run", {"map.png": b"png"})
    assert (tmp_path / "run" / "map.png").read_bytes() == b"png"
    for name in ("../escape.txt", "sub/x.txt", ""):
        with pytest.raises(ValueError, match="plain file name"):
            write_files(tmp_path / "run", {name: b"x"})
    assert not (tmp_path / "escape.txt").exists()


def test_summary_says_how_much_of_each_gap_recovery_closed():
    from paser.reporting import gap_closed, metric_table, summary_table

    def zs(piqa, mean):
        return {"tasks": {"piqa": {"metric": "acc", "score": piqa}}, "mean": mean}

    metrics = {"dense": {"ppl": {"wikitext2": {"ppl": 50.0}, "ptb": {"ppl": 100.0}}, "zeroshot": zs(0.70, 0.62)},
               "pruned": {"ppl": {"wikitext2": {"ppl": 250.0}, "ptb": {"ppl": 300.0}}, "zeroshot": zs(0.60, 0.50)},
               "recovered": {"ppl": {"wikitext2": {"ppl": 200.0}, "ptb": {"ppl": 310.0}}, "zeroshot": zs(0.65, 0.59)}}
    assert gap_closed(metrics) == {"wikitext2": 0.25, "ptb": -0.05}  # (250-200)/(250-50), (300-310)/(300-100)
    assert gap_closed({k: v for k, v in metrics.items() if k != "recovered"}) == {}
    table = metric_table(metrics)
    assert table["ppl/wikitext2"] == {"unit": "perplexity", "dense": 50.0, "pruned": 250.0, "recovered": 200.0,
                                      "gap_closed_pct": 25.0}
    assert table["ppl/ptb"]["gap_closed_pct"] == pytest.approx(-5.0)
    # accuracies in percent, as the tables give them: (50 - 59) / (50 - 62) = 75% of the gap
    assert table["zeroshot/mean"] == pytest.approx({"unit": "accuracy %", "dense": 62.0, "pruned": 50.0,
                                                    "recovered": 59.0, "gap_closed_pct": 75.0})
    assert table["zeroshot/piqa"]["unit"] == "acc %" and table["zeroshot/piqa"]["gap_closed_pct"] == pytest.approx(50)
    assert "gap_closed_pct" not in metric_table({k: v for k, v in metrics.items() if k != "recovered"})["ppl/ptb"]
    text = summary_table({"summary": {"metrics": table, "selection": {"samples": 1, "pool": 2, "tokens": 300},
                                      "pruning": {"params_removed_pct": None, "zero_weights_pct": 50.0}},
                          "timings": {}, "run_dir": "r"})
    assert "ppl/wikitext2" in text and "25.0%" in text and "-5.0%" in text and "zeroshot/mean (accuracy %)" in text
    assert "pruning zeroed 50.0% of the decoder weights" in text and "selected 1 of 2 samples (300 trained tokens)" in text
    assert "NOTE" not in text
