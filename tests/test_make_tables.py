"""scripts/make_tables.py on hand-made results: labels, mean ± std, best and ties, LaTeX, and the paired
differences from per-sample files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

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


def make_table(tmp_path, runs: list[dict], per_sample: dict | None = None, args: tuple[str, ...] = ()) -> str:
    """Writes each run's results.json (and per_sample/<name>.npz from ``per_sample[k]``), runs the script on
    them, returns table.md."""
    for k, r in enumerate(runs):
        (tmp_path / str(k)).mkdir(exist_ok=True)
        (tmp_path / str(k) / "results.json").write_text(json.dumps(r))
        for name, arrays in (per_sample or {}).get(k, {}).items():
            (tmp_path / str(k) / "per_sample").mkdir(exist_ok=True)
            np.savez_compressed(tmp_path / str(k) / "per_sample" / f"{name}.npz", **arrays)
    out = subprocess.run([sys.executable, "scripts/make_tables.py", str(tmp_path), "--out", str(tmp_path / "t"), *args],
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
    assert "No paired statistics" in md  # these runs saved no per-sample files
    tex = (tmp_path / "t" / "table.tex").read_text()
    assert r"\textbf{15.50 $\pm$ 0.71}" in tex and r"\begin{tabular}" in tex
    assert (tmp_path / "t" / "recovery_loss.png").stat().st_size > 1000
    assert (tmp_path / "t" / "cluster_map.png").read_bytes() == b"cluster map of run 3"


def test_budget_curve_when_the_budget_varies(tmp_path):
    runs = [result(sel, 0, wiki, 0.6, 0.01, budget=b) for sel, b, wiki in
            [("RandomSelector", 0.2, 21.0), ("PaserSelector", 0.2, 19.0),
             ("RandomSelector", 0.05, 25.0), ("PaserSelector", 0.05, 24.0), ("RandomSelector", 0.1, 23.0)]]
    md = make_table(tmp_path, runs)
    assert (tmp_path / "t" / "budget_curve.png").stat().st_size > 1000
    rows = [line.split("|")[1].strip() for line in md.split("\n\n", 2)[1].splitlines()[2:]]
    # the varying knob labels the rows; one method's rows stay together, in order of budget
    assert rows[2:] == ["Random (budget=0.05)", "Random (budget=0.1)", "Random (budget=0.2)",
                        "PASER (budget=0.05)", "PASER (budget=0.2)"]


def test_reduced_instruction_mining_gets_its_own_row(tmp_path):
    runs = [result("InstructionMiningSelector", 0, 20.0, 0.62, 0.01),
            result("InstructionMiningSelector", 0, 23.0, 0.60, 0.01)]
    runs[0]["selection"]["diagnostics"]["method"] = "instruction_mining"
    runs[1]["selection"]["diagnostics"]["method"] = "instruction_mining_no_reward"  # offline: no reward model
    rows = {line.split("|")[1].strip() for line in make_table(tmp_path, runs).splitlines() if line.startswith("| ")}
    assert {"Instruction Mining", "Instruction Mining w/o reward"} <= rows


def per_sample_files(rng, seed_shift: float, shift: float, acc_gain: float) -> dict:
    """The per-sample files of one run on shared windows and documents: its pruned model and its recovered
    model ``shift`` nats per token better and ``acc_gain`` more documents right."""
    base = np.random.default_rng(0)  # the same windows and documents in every run
    difficulty, u = 127 * (4 + 0.3 * base.standard_normal(300)), base.random(400)
    tokens = np.full(300, 127)
    recovered = difficulty - 127 * (shift + seed_shift + 0.02 * rng.standard_normal(300))
    zs = lambda p: {"piqa/doc_id": np.arange(400), "piqa/acc": (u < p).astype(np.int8),
                    "piqa/acc_norm": (u < p).astype(np.int8)}
    return {"pruned_ppl": {"wikitext2/nll": difficulty, "wikitext2/tokens": tokens},
            "recovered_ppl": {"wikitext2/nll": recovered, "wikitext2/tokens": tokens},
            "pruned_zeroshot": zs(0.5), "recovered_zeroshot": zs(0.5 + acc_gain)}


def test_paired_differences_against_random_and_without_recovery(tmp_path):
    runs = [result("RandomSelector", 0, 20.0, 0.62, 0.01), result("RandomSelector", 1, 22.0, 0.64, 0.01),
            result("PaserSelector", 0, 15.0, 0.63, 0.01), result("PaserSelector", 1, 16.0, 0.65, 0.01)]
    for r in runs:
        r["metrics"]["pruned"]["zeroshot"]["mean_over"] = ["piqa"]
        r["metrics"]["recovered"]["zeroshot"]["mean_over"] = ["piqa"]
    rng = np.random.default_rng(1)
    # Random recovers 0.3 nats/token and 2 points; PASER 0.1 nats/token more and the same accuracy
    files = {0: per_sample_files(rng, 0.0, 0.3, 0.02), 1: per_sample_files(rng, 0.01, 0.3, 0.02),
             2: per_sample_files(rng, 0.0, 0.4, 0.02), 3: per_sample_files(rng, 0.01, 0.4, 0.02)}
    md = make_table(tmp_path, runs, files)
    vs_random = md.split("Paired difference vs Random")[1].split("Paired difference vs w/o recovery")[0]
    vs_pruned = md.split("Paired difference vs w/o recovery")[1]
    cells = lambda text, row: next(line for line in text.splitlines() if line.startswith(f"| {row} |")).split("|")[2:-1]
    paser = cells(vs_random, "PASER")
    assert paser[0].strip().startswith("-") and paser[0].strip().endswith("*")  # better perplexity, significant
    assert paser[1].strip() == "+0.00 [+0.00, +0.00]" and paser[2].strip() == paser[1].strip()  # PIQA, mean
    assert "| Random |" not in vs_random  # no row against itself
    random = cells(vs_pruned, "Random")
    assert random[0].strip().endswith("*") and random[1].strip().startswith("+2.00 [") and random[1].strip()[-1] == "*"
    assert "| w/o recovery |" not in vs_pruned
    paired = json.loads((tmp_path / "t" / "table.json").read_text())["paired"]
    cell = paired["Random"]["PASER"]["ppl/wikitext2"]
    assert cell["seeds"] == 2 and cell["units"] == [300] and cell["lo"] < cell["diff"] < cell["hi"] < 0
    # w/o recovery against Random: the same seed's Random run, the other way round
    assert paired["Random"]["w/o recovery"]["zs/piqa"]["diff"] == -2.0


def test_paired_differences_against_a_named_row(tmp_path):
    """A stage ablation pairs each variant against the full method: PASER without S²RIC is 0.1 nats/token
    worse than PASER on the same windows, seed by seed; Random is not needed for that table."""
    runs = [result("PaserSelector", s, 15.0 + s, 0.63, 0.01, use_s2ric=True) for s in (0, 1)] + \
           [result("PaserSelector", s, 17.0 + s, 0.63, 0.01, use_s2ric=False) for s in (0, 1)]
    for r in runs:
        for state in ("pruned", "recovered"):
            r["metrics"][state]["zeroshot"]["mean_over"] = ["piqa"]
    rng = np.random.default_rng(2)
    files = {0: per_sample_files(rng, 0.0, 0.4, 0.02), 1: per_sample_files(rng, 0.01, 0.4, 0.02),
             2: per_sample_files(rng, 0.0, 0.3, 0.02), 3: per_sample_files(rng, 0.01, 0.3, 0.02)}
    md = make_table(tmp_path, runs, files, ("--against", "PASER (use_s2ric=True)"))
    assert "Paired difference vs Random" not in md
    vs_full = md.split("Paired difference vs PASER (use_s2ric=True)")[1]
    row = next(line for line in vs_full.splitlines() if line.startswith("| PASER (use_s2ric=False) |")).split("|")
    assert row[2].strip().startswith("+") and row[2].strip().endswith("*")  # worse perplexity, significant
    assert "| PASER (use_s2ric=True) |" not in vs_full  # no row against itself
    paired = json.loads((tmp_path / "t" / "table.json").read_text())["paired"]
    cell = paired["PASER (use_s2ric=True)"]["PASER (use_s2ric=False)"]["ppl/wikitext2"]
    assert cell["seeds"] == 2 and 0 < cell["lo"] < cell["diff"] < cell["hi"]
    # the difference is exp of the 0.1 nats/token gap on every window's ppl, computed by hand per seed
    base = np.random.default_rng(0)
    difficulty = 127 * (4 + 0.3 * base.standard_normal(300))
    by_hand = np.mean([np.exp((difficulty.sum() - 127 * 300 * (0.3 + d)) / (127 * 300))
                       - np.exp((difficulty.sum() - 127 * 300 * (0.4 + d)) / (127 * 300)) for d in (0.0, 0.01)])
    assert abs(cell["diff"] - by_hand) < 0.05 * by_hand


def test_against_an_unknown_row_names_the_rows(tmp_path):
    runs = [result("PaserSelector", 0, 15.0, 0.63, 0.01)]
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(json.dumps(runs[0]))
    out = subprocess.run([sys.executable, "scripts/make_tables.py", str(tmp_path), "--out", str(tmp_path / "t"),
                          "--against", "PASER (full)"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "PASER (full)" in out.stderr and "'PASER'" in out.stderr


def test_pairs_across_hosts_are_marked(tmp_path):
    """A PASER run from an AMX host paired with an AMD host's Random run carries ‡ (and the count of such
    seed pairs); the same run against its own pruned model does not, and the header lists the hosts."""
    runs = [result("RandomSelector", s, 20.0, 0.62, 0.01) for s in (0, 1)] + \
           [result("PaserSelector", s, 15.0, 0.63, 0.01) for s in (0, 1)]
    for r in runs:
        r["host"] = {"cpu": "AMD EPYC", "amx_bf16": False}
    runs[3]["host"] = {"cpu": "Intel Xeon", "amx_bf16": True}
    rng = np.random.default_rng(3)
    files = {k: per_sample_files(rng, 0.0, 0.3 + 0.1 * (k >= 2), 0.0) for k in range(4)}
    md = make_table(tmp_path, runs, files)
    assert "hosts: AMD EPYC (3 runs), Intel Xeon (AMX) (1 run)" in md
    vs_random = md.split("Paired difference vs Random")[1].split("Paired difference vs w/o recovery")[0]
    vs_pruned = md.split("Paired difference vs w/o recovery")[1]
    assert next(line for line in vs_random.splitlines() if line.startswith("| PASER |")).count("‡") == 2
    assert "‡" not in vs_pruned.split("\n", 1)[1]  # the same run's pruned model: one host (the title aside)
    paired = json.loads((tmp_path / "t" / "table.json").read_text())["paired"]
    assert paired["Random"]["PASER"]["ppl/wikitext2"]["cross_host_pairs"] == 1
    assert paired["w/o recovery"]["PASER"]["ppl/wikitext2"]["cross_host_pairs"] == 0
