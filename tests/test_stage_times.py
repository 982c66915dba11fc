"""scripts/stage_times.py on hand-made results: each recovered evaluation set against the one computed
pruned evaluation of its group (same model, pruner, evaluator, host), never across hosts or evaluators."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

AMD = {"device": "cpu", "cpu": "AMD EPYC", "amx_bf16": False, "torch_threads": 1, "cuda": None, "gpu_count": 0,
       "world_size": 1}


def stage(seconds: float | None) -> dict:
    """A timings entry: computed in ``seconds``, or served from the cache (None)."""
    return {"reused": seconds is None, "seconds": 0.001 if seconds is None else seconds}


def result(pruned: tuple, recovered: tuple, host: dict = AMD, evaluator: str = "full") -> dict:
    (pp, pz), (rp, rz) = pruned, recovered
    return {"config": {"model": {"name": "m"}, "pruner": {"ratio": 0.25}, "evaluator": {"name": evaluator}},
            "host": host,
            "timings": {"select": stage(5.0), "recover": stage(50.0),
                        "eval_pruned_ppl": stage(pp), "eval_pruned_zeroshot": stage(pz),
                        "eval_recovered_ppl": stage(rp), "eval_recovered_zeroshot": stage(rz), "total_s": 1.0}}


def test_ratios_pair_each_recovered_evaluation_with_its_groups_computed_pruned_one(tmp_path):
    runs = {"a_first": result((100.0, 200.0), (110.0, 190.0)),            # computes the pruned evaluation
            "b_later": result((None, None), (120.0, 240.0)),               # pruned from the cache
            "c_other_host": result((None, None), (50.0, 50.0), host={**AMD, "torch_threads": 2}),
            "d_other_eval": result((None, None), (50.0, 50.0), evaluator="quick"),
            "e_ppl_cached": result((None, None), (None, 220.0))}                # only zero-shot computed
    for name, r in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    out = subprocess.run([sys.executable, "scripts/stage_times.py", str(tmp_path), "--out", str(tmp_path / "t.md")],
                         check=True, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    # columns: run, host, select, recover, eval pruned ppl/zeroshot, eval recovered ppl/zeroshot, ratios ppl/zs/all
    assert [c.strip(" |") for c in rows["a_first"][-3:]] == ["1.100", "0.950", "1.000"]   # 110/100, 190/200, 300/300
    assert [c.strip(" |") for c in rows["b_later"][-3:]] == ["1.200", "1.200", "1.200"]   # against a_first's times
    assert [c.strip(" |") for c in rows["b_later"][4:6]] == ["100.0", "200.0"]
    for other in ("c_other_host", "d_other_eval"):  # no computed pruned evaluation in their group
        assert [c.strip(" |") for c in rows[other][-3:]] == ["–", "–", "–"]
    assert [c.strip(" |") for c in rows["e_ppl_cached"][-3:]] == ["–", "1.100", "–"]  # no total from a part
    assert "AMD EPYC, 1 thread(s), 2 run(s): mean 1.100, sd 0.141 (range 1.000–1.200)" in out
    assert (tmp_path / "t.md").read_text() == out


def test_each_session_sets_its_runs_against_its_own_pruned_evaluation(tmp_path):
    """Runs of two sessions (each with an empty cache, so each computed the pruned evaluation once): a run is
    set against the latest computation started no later than itself, by its run.log's first timestamp."""
    runs = {"a_s0": (result((100.0, 200.0), (110.0, 210.0)), "2026-12-05 06:56:40"),   # session 1 computes
            "b_s1": (result((None, None), (120.0, 220.0)), "2026-12-05 08:00:00"),     # session 1, cached
            "c_s2": (result((None, None), (150.0, 300.0)), "2026-12-06 22:02:25"),     # session 2, cached
            "d_s3": (result((130.0, 250.0), (140.0, 260.0)), "2026-12-06 22:02:05")}   # session 2 computes
    for name, (r, begun) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
        (tmp_path / name / "run.log").write_text(f"[{begun},879][HYDRA] Launching 1 jobs locally\n")
    out = subprocess.run([sys.executable, "scripts/stage_times.py", str(tmp_path)],
                         check=True, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert [c.strip(" |") for c in rows["b_s1"][4:6]] == ["100.0", "200.0"]
    assert [c.strip(" |") for c in rows["c_s2"][4:6]] == ["130.0", "250.0"]
    assert [c.strip(" |") for c in rows["c_s2"][-3:]] == [f"{150 / 130:.3f}", "1.200", f"{450 / 380:.3f}"]


def test_started_at_in_results_json_orders_runs_with_those_known_only_by_run_log(tmp_path):
    """New runs say when they started (results.json started_at, with its UTC offset); old ones only by run.log's
    first line (local time). Both kinds are set against the computation of their own session."""
    import datetime as dt

    def local(text: str) -> str:  # run.log's local time, as a UTC-offset timestamp two hours east
        when = dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").astimezone()
        return when.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()

    runs = {"a_old": (result((100.0, 200.0), (110.0, 210.0)), "2026-12-05 06:56:40", None),   # session 1 computes
            "b_new": (result((None, None), (120.0, 220.0)), None, local("2026-12-05 08:00:00")),  # session 1, cached
            "c_new": (result((130.0, 250.0), (140.0, 260.0)), None, local("2026-12-06 22:02:05")),  # session 2
            "d_old": (result((None, None), (150.0, 300.0)), "2026-12-06 22:02:25", None)}     # session 2, cached
    for name, (r, logged, started_at) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({**r, "started_at": started_at} if started_at else r))
        if logged:
            (tmp_path / name / "run.log").write_text(f"[{logged},879][HYDRA] Launching 1 jobs locally\n")
    out = subprocess.run([sys.executable, "scripts/stage_times.py", str(tmp_path)],
                         check=True, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert [c.strip(" |") for c in rows["b_new"][4:6]] == ["100.0", "200.0"]
    assert [c.strip(" |") for c in rows["d_old"][4:6]] == ["130.0", "250.0"]
