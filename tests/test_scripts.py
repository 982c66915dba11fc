"""Every script in scripts/ runs: ``--help``, and a smoke run at a tiny size, so that a change to the package
cannot silently break a benchmark or a table. A script without a smoke run here states why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA_DIR, ROOT, TINY_RUN, compose_config, requires_shared_data

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
TINY = "tiny-llama"


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    command = ["bash" if name.endswith(".sh") else sys.executable, f"scripts/{name}", *map(str, args)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{name} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.parametrize("name", [*SCRIPTS, "gpu_smoke.sh"])
def test_help(name):
    assert "usage:" in run_script(name, "--help")


def test_shell_scripts_parse():
    for name in ("gpu_smoke.sh", "install.sh"):  # install.sh installs packages: only its syntax is checked here
        subprocess.run(["bash", "-n", f"scripts/{name}"], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory) -> Path:
    """40 rows of the offline Alpaca pool."""
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    with open(DATA_DIR / "alpaca" / "alpaca_data.jsonl") as f:
        path.write_text("".join(next(f) for _ in range(40)))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The folder of one tiny pipeline run (results.json, per_sample/, selected_indices.json)."""
    from paser import pipeline

    tmp = tmp_path_factory.mktemp("run")  # the run folder under paths.output_dir, as run.py puts it
    pipeline.run(compose_config(TINY_RUN, tmp), run_dir=tmp / "out" / "runs" / "random_s0")
    return tmp / "out" / "runs"


# scripts whose smoke run lives elsewhere, or cannot run here
ELSEWHERE = {
    "capability_recovery.py": "tests/test_capability_recovery.py runs it on a PASER and a Random run",
    "gpu_scale_check.py": "tests/test_gpu_scale_check.py runs it with --device cpu --shape tiny",
    "make_paraphrase_conflicts.py": "tests/test_ablations.py runs it on a small pool",
}

SMOKE = {  # script -> arguments (``{pool}``, ``{tmp}``, ``{data}`` filled in); slow ones take over ~20 s of CPU
    "bench_dtype.py": ["--repeats", "1", "--batch", "1", "--tokens", "16"],
    "bench_paser.py": ["--stages", "jsd", "--model", TINY, "--data", "{pool}", "--jsd-subset", "8", "--repeats", "1",
                       "--cache", "{tmp}/cache"],
    "bench_recovery.py": ["--steps", "1", "--model", TINY, "--data-dir", "{data}"],
    "bench_selectors.py": ["--model", TINY, "--pool", "{pool}", "--n", "40", "--budget", "8", "--selectors",
                           "random,instruction_mining,instruction_mining+s2ric,ifd,paser,nuggets", "--score-subset",
                           "40", "--nuggets-candidates", "2", "--anchors", "6", "--cheap-anchors", "4",
                           "--cheap-prefilter", "10", "--cache-dir", "{tmp}/cache", "--json", "{tmp}/rows.json"],
    "eval_table.py": [f"model={TINY}", "evaluator=quick", "evaluator.ppl.max_windows=2",
                      "evaluator.zeroshot.tasks=[piqa,arc_easy]", "evaluator.zeroshot.limit=4",
                      "evaluator.zeroshot.bootstrap_iters=0", "paths.data_dir={data}", "paths.cache_dir={tmp}/cache",
                      "--out", "{tmp}/eval.md"],
    "gpu_smoke.py": ["--device", "cpu", "--quick", "--units", "prune:magnitude", "--data-dir", "{data}",
                     "--out", "{tmp}/smoke"],
    "mask_ties.py": [f"model={TINY}", "paths.cache_dir={tmp}/cache"],
    "profile_device.py": ["--device", "cpu", "--layers", "1", "--windows", "4", "--samples", "4", "--steps", "1",
                          "--out", "{tmp}/profile.json"],
    "prune_table.py": ["--model", TINY, "--pruners", "magnitude", "wanda", "llm_pruner", "--calib-windows", "4",
                       "--calib-seqlen", "32", "--eval-windows", "2", "--data-dir", "{data}", "--cache-dir",
                       "{tmp}/cache", "--out", "{tmp}/pruners.md"],
    "s2ric_health.py": ["--pool", "120", "--dims", "4", "8", "--seeds", "0", "1", "--k", "3", "--data-dir", "{data}",
                        "--cache", "{tmp}/cache", "--out", "{tmp}/health.md"],
    "sparsegpt_sensitivity.py": [f"model={TINY}", "windows=2", "paths.data_dir={data}", "paths.cache_dir={tmp}/cache"],
}
SLOW = {"profile_device.py"}
EXPECT = {  # what each smoke run must print (or write) to count as having run
    "bench_dtype.py": "bf16/fp32 throughput ratio:",
    "bench_paser.py": "JSD stage (8 samples)",
    "bench_recovery.py": "train/forward throughput ratio:",
    "bench_selectors.py": "| paser |",
    "eval_table.py": "# Zero-shot evaluation: tiny-llama",
    "gpu_smoke.py": "1/1 units passed",
    "mask_ties.py": "tied at the cut",
    "profile_device.py": "| stage | batch | tok/s",
    "prune_table.py": "| llm_pruner | 10 x 64 C4 tokens |",
    "s2ric_health.py": "# S²RIC cluster health",
    "sparsegpt_sensitivity.py": "zero masks differ at",
}
ON_A_RUN = ("stage_times.py", "keep_run.py", "make_tables.py")  # smoke runs on finished_run, below


def test_every_script_has_a_smoke_run_or_a_reason():
    assert sorted([*SMOKE, *ELSEWHERE, *ON_A_RUN]) == SCRIPTS


@requires_shared_data()
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in SMOKE])
def test_smoke(name, tmp_path, pool_file):
    args = [a.format(pool=pool_file, tmp=tmp_path, data=DATA_DIR) for a in SMOKE[name]]
    out = run_script(name, *args)
    written = "".join(p.read_text() for p in tmp_path.glob("*.md"))
    assert EXPECT[name] in out + written


@requires_shared_data()
def test_the_run_folder_scripts_on_a_finished_run(finished_run, tmp_path):
    results = json.loads((finished_run / "random_s0" / "results.json").read_text())
    assert results["started_at"][:4].isdigit() and "T" in results["started_at"]
    times = run_script("stage_times.py", finished_run)
    assert "| random_s0 |" in times
    run_script("make_tables.py", finished_run, "--out", tmp_path / "tables")
    assert "Random" in (tmp_path / "tables" / "table.md").read_text()
    run_script("keep_run.py", finished_run / "random_s0", tmp_path / "kept" / "random_s0")
    assert json.loads((tmp_path / "kept" / "random_s0" / "results.json").read_text())["started_at"] == \
        results["started_at"]


@requires_shared_data()
def test_prune_only_reuses_the_runs_pruned_model(finished_run):
    """scripts/prune_table.py's entry point goes through the run's stage cache: the pruned model a run stored
    is loaded, not pruned again (and the report is the run's)."""
    from paser.pipeline import prune_only
    from paser.pruners.common import sparsity_report

    tmp = finished_run.parents[1]
    entries = sorted((tmp / "cache" / "pruned").iterdir())
    model, _, report = prune_only(compose_config(TINY_RUN, tmp), device="cpu")
    assert sorted((tmp / "cache" / "pruned").iterdir()) == entries
    run = json.loads((finished_run / "random_s0" / "results.json").read_text())
    assert report["prune_time_s"] == run["prune"]["prune_time_s"] and report["sparsity"] == run["prune"]["sparsity"]
    assert sparsity_report(model)["sparsity"] == pytest.approx(run["prune"]["sparsity"])  # the pruned model
    assert run["prune"]["sparsity"] > 0.4


def test_tables_name_a_selector_by_its_declared_display_name(monkeypatch):
    """A selector class may declare ``display_name``; make_tables labels its rows with it (the built-in table of
    names is the fallback), importing only paser's own modules to find it."""
    from paser.components import display_name
    from paser.selectors.basic import RandomSelector
    from scripts.make_tables import method_name

    config = {"selector._target_": "paser.selectors.basic.RandomSelector"}
    assert method_name({}, config) == "Random"
    monkeypatch.setattr(RandomSelector, "display_name", "Uniform draw", raising=False)
    assert method_name({}, config) == "Uniform draw"
    assert display_name("paser.selectors.nonexistent.Selector") is None
    assert display_name("json.JSONDecoder") is None and display_name(None) is None
    assert method_name({}, {"selector._target_": "my_lab.selectors.Mine"}) == "my_lab.selectors.Mine"
