"""scripts/make_tables.py on hand-made results: labels, mean ± std, best and ties, LaTeX."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def result(selector: str, seed: int, wiki: float, piqa: float, piqa_se: float, budget=0.1, **knobs) -> dict:
    zs = lambda acc: {"tasks": {"piqa": {"metric": "acc", "score": acc, "acc": acc, "acc_stderr": piqa_se}},
                      "mean": acc, "subset": False}
    return {"name": "t", "seed": seed,
            "config": {"seed": seed, "budget": budget, "model": {"name": "m"},
                       "pruner": {"_target_": "paser.pruners.llm_pruner.LLMPruner"},
                       "selector": {"_target_": f"paser.selectors.x.{selector}", **knobs},
                       "evaluator": {"ppl": {"max_windows": None}}, "paths": {"cache_dir": f"/c{seed}"}},
            "metrics": {"dense": {"ppl": {"wikitext2": {"ppl": 10.0}}, "zeroshot": zs(0.70)},
                        "pruned": {"ppl": {"wikitext2": {"ppl": 30.0}}, "zeroshot": zs(0.60)},
                        "recovered": {"ppl": {"wikitext2": {"ppl": wiki}}, "zeroshot": zs(piqa)}},
            "selection": {"pool_size": 100, "pool_source": "pool", "budget": 10, "diagnostics": {}},
            "recovery": {"loss_curve": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]}}


def make_table(tmp_path, runs: list[dict]) -> str:
    """Writes each run's results.json, runs the script on them, returns table.md."""
    for k, r in enumerate(runs):
        (tmp_path / str(k)).mkdir(exist_ok=True)
        (tmp_path / str(k) / "results.json").write_text(json.dumps(r))
    out = subprocess.run([sys.executable, "scripts/make_tables.py", str(tmp_path), "--out", str(tmp_path / "t")],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return (tmp_path / "t" / "table.md").read_text()


def test_table_from_a_sweep(tmp_path):
    runs = [result("RandomSelector", 0, 20.0, 0.62, 0.01), result("RandomSelector", 1, 22.0, 0.64, 0.01),
            result("PaserSelector", 0, 15.0, 0.63, 0.01, use_ntm=True),
            result("PaserSelector", 1, 16.0, 0.65, 0.01, use_ntm=True),
            result("PaserSelector", 0, 18.0, 0.50, 0.01, use_ntm=False)]
    runs[1]["config"]["pruner"]["strategy"] = "block"  # an option added to the config between two runs
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "paser_clusters.png").write_bytes(b"cluster map of run 3")  # only a later PASER run has one
    md = make_table(tmp_path, runs)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Method")}
    assert rows["Dense"] == ["10.00", "70.00", "70.00"]  # WikiText-2, PIQA, mean (no PTB in these runs)
    assert rows["w/o recovery"] == ["30.00", "60.00", "60.00"]
    # mean ± sample std over the two seeds: (20, 22) -> 21 ± 1.41; (15, 16) -> 15.5 ± 0.71
    assert rows["Random"][0] == "21.00 ± 1.41"
    assert rows["PASER (use_ntm=True)"][0] == "**15.50 ± 0.71**"
    # PIQA: PASER 64 ± 1.41 is best; Random 63 ± 1.41 lies within 2 SE (seed spread + lm-eval stderr)
    assert rows["PASER (use_ntm=True)"][1] == "**64.00 ± 1.41**"
    assert rows["Random"][1] == "63.00 ± 1.41 †"
    # the single-seed ablation row: 50 is far below the best
    assert rows["PASER (use_ntm=False)"][1] == "50.00"
    tex = (tmp_path / "t" / "table.tex").read_text()
    assert r"\textbf{15.50 $\pm$ 0.71}" in tex and r"\begin{tabular}" in tex
    assert (tmp_path / "t" / "recovery_loss.png").stat().st_size > 1000
    assert (tmp_path / "t" / "cluster_map.png").read_bytes() == b"cluster map of run 3"


def test_budget_curve_when_the_budget_varies(tmp_path):
    runs = [result(sel, 0, wiki, 0.6, 0.01, budget=b) for sel, b, wiki in
            [("RandomSelector", 0.05, 25.0), ("RandomSelector", 0.2, 21.0),
             ("PaserSelector", 0.05, 24.0), ("PaserSelector", 0.2, 19.0)]]
    md = make_table(tmp_path, runs)
    assert (tmp_path / "t" / "budget_curve.png").stat().st_size > 1000
    assert "budget=0.05" in md and "budget=0.2" in md  # the varying knob labels the rows


def test_reduced_instruction_mining_gets_its_own_row(tmp_path):
    runs = [result("InstructionMiningSelector", 0, 20.0, 0.62, 0.01),
            result("InstructionMiningSelector", 0, 23.0, 0.60, 0.01)]
    runs[0]["selection"]["diagnostics"]["method"] = "instruction_mining"
    runs[1]["selection"]["diagnostics"]["method"] = "instruction_mining_no_reward"  # offline: no reward model
    rows = {line.split("|")[1].strip() for line in make_table(tmp_path, runs).splitlines() if line.startswith("| ")}
    assert {"Instruction Mining", "Instruction Mining w/o reward"} <= rows
