"""scripts/eval_table.py re-rendering saved results: the table, the subset notice and the time scaling."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def task(n, n_total, acc, acc_norm, metric, wall):
    return {"n": n, "n_total": n_total, "acc": acc, "acc_stderr": 0.01, "acc_norm": acc_norm,
            "acc_norm_stderr": 0.02, "metric": metric, "score": acc if metric == "acc" else acc_norm,
            "wall_time_s": wall}


def test_render_from_json(tmp_path):
    zs = {"lm_eval_version": "0.4.13", "source": "local", "share_context": True, "subset": True, "limit": 100,
          "limit_mode": "random", "seed": 0, "mean": 0.5, "mean_over": ["piqa", "arc_easy"], "wall_time_s": 240,
          "tasks": {"piqa": task(100, 1000, 0.60, 0.55, "acc", 60), "arc_easy": task(100, 400, 0.40, 0.45, "acc", 180)}}
    calib = {"preset": "quick", "batch_size": 16, "load_before": "0.1", "load_after": "1.9", "cpu": "Test CPU",
             "tok_s_before": 1300, "tok_s_after": 1400, "tok_s_now": 1350}
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps({"results": {"zeroshot": zs}, "calibration": calib}))
    out = tmp_path / "t.md"
    proc = subprocess.run([sys.executable, "scripts/eval_table.py", "evaluator=quick", "--from-json", str(saved),
                           "--out", str(out)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = out.read_text()
    # the command named is the evaluation that wrote the JSON, not the re-rendering
    assert f"`python scripts/eval_table.py evaluator=quick --out {out} --json {saved}`" in md
    assert "a seeded random (seed 0) 100 documents per task" in md
    assert "| piqa | 100/1000 | 60.00 | 1.00 | 55.00 | 2.00 | acc | **60.00** | 60 | 600 |" in md
    assert "| arc_easy | 100/400 | 40.00 | 1.00 | 45.00 | 2.00 | acc | **40.00** | 180 | 720 |" in md
    # all examples: 600 + 720 s = 22 min; reference host 2700 tok/s vs 1350 now: x 0.50 -> 11 min
    assert "about 22 min" in md and "times x 0.50): about **11 min**" in md
    assert "Host: Test CPU" in md
