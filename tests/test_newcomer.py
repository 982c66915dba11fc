"""A newcomer's first hour (#34): every run keeps its own folder and results, own data loads with one
override, a run leaves a summary and the rows it chose."""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paser import hardware, models, pipeline, progress, tracking
from paser.compose import compose
from paser.errors import ConfigError
from tests.conftest import DATA_DIR, ROOT, TINY_RUN, requires_shared_data

STAMP = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d{3}_pid\d+"


# ------------------------------------------------------------------------------------ run folders

def test_hydra_folders_are_named_to_the_millisecond_and_process():
    cfg = compose(["paths.output_dir=out"], return_hydra_config=True)
    assert re.fullmatch(rf"out/runs/default/{STAMP}", cfg.hydra.run.dir)
    assert re.fullmatch(rf"out/multirun/default/{STAMP}", cfg.hydra.sweep.dir)
    assert cfg.hydra.run.dir.endswith(f"_pid{__import__('os').getpid()}")


def test_results_are_never_written_over(tmp_path):
    tracking.write_results(tmp_path, {"run": 1})
    with pytest.raises(ConfigError, match=rf"{tmp_path}/results.json already exists: the run folder {tmp_path}"):
        tracking.write_results(tmp_path, {"run": 2})
    assert json.loads((tmp_path / "results.json").read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


@requires_shared_data()
def test_a_run_refuses_a_folder_with_results_before_any_work(compose_cfg, tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("{}")
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **kw: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="holds another run's results"):
        pipeline.run(compose_cfg(TINY_RUN), run_dir=tmp_path / "r")
    assert (tmp_path / "r" / "results.json").read_text() == "{}"


FROZEN_CLOCK = """
import datetime, runpy, sys
from paser import tracking

class Frozen(datetime.datetime):  # both processes see the same millisecond
    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5, 678000)

tracking.datetime = Frozen
sys.argv = ["run.py", *sys.argv[1:]]
runpy.run_path("run.py", run_name="__main__")
"""


@pytest.mark.slow  # two processes: ~20 s of CPU
@requires_shared_data()
def test_two_runs_started_in_the_same_millisecond_keep_both_results(tmp_path):
    """Two `python run.py` started together (as a script or a scheduler starts jobs) with Hydra's default
    folders, their clocks frozen to one millisecond: each writes its own results.json (before, both got
    outputs/runs/<name>/<second>/, and the last to finish overwrote the other's results)."""
    args = [sys.executable, "-c", FROZEN_CLOCK, *[o for o in TINY_RUN if not o.startswith("recovery.")],
            "recovery=none", "pruner=none", f"paths.data_dir={DATA_DIR}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'out'}"]
    jobs = [subprocess.Popen(args + [f"seed={seed}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for seed in (0, 1)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    folders = sorted((tmp_path / "out" / "runs" / "default").iterdir())
    assert [f.name.split("_pid")[0] for f in folders] == ["2030-01-02_03-04-05.678"] * 2
    assert sorted(json.loads((f / "results.json").read_text())["seed"] for f in folders) == [0, 1]
    log = (folders[0] / "run.log").read_text()  # the summary is in the run's log, not only on the screen
    assert "ppl/wikitext2" in log and "selected 6 of 24 samples" in log and "NOTE: a wiring check" in log


# ------------------------------------------------------------------------------------ own data

def readme_data_commands() -> dict[str, list[str]]:
    """The overrides of README's "Your own data" commands, by the file each names (as a shell splits them)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own data"):]
    section = section[:section.index("\n## ", 1)]
    commands = [shlex.split(line, comments=True) for line in section.splitlines() if line.startswith("python run.py")]
    return {next(a for a in c if a.startswith("data.path=")).split("=", 1)[1]: c[2:] for c in commands}


OWN_FILES = {  # what README's commands are for: Alpaca-style (input on some rows), LaMini-style, prompt/completion
    "pool.jsonl": lambda k: {"instruction": f"Question {k}?", **({"input": f"context {k}"} if k % 3 else {}),
                             "output": f"Answer {k}."},
    "lamini.jsonl": lambda k: {"instruction": f"Question {k}?", "response": f"Answer {k}."},
    "pairs.jsonl": lambda k: {"prompt": f"Question {k}?", "completion": f"Answer {k}."},
}


@requires_shared_data()
@pytest.mark.parametrize("name", sorted(OWN_FILES))
def test_own_data_runs_with_the_readme_override(compose_cfg, tmp_path, name):
    overrides = readme_data_commands()[name]
    assert overrides[0] == "data=jsonl" and len(overrides) == (2 if name == "pool.jsonl" else 3)  # one override
    path = tmp_path / name
    path.write_text("".join(json.dumps(OWN_FILES[name](k)) + "\n" for k in range(1, 31)))
    cfg = compose_cfg(TINY_RUN + [o if not o.startswith("data.path=") else f"data.path={path}" for o in overrides])
    results = pipeline.run(cfg, run_dir=tmp_path / "run")
    assert results["selection"]["stats"]["selected"] == 6
    pool = pipeline.build_components(cfg).pool
    assert [r["instruction"] for r in pool.rows] == [f"Question {k}?" for k in pool.lines]
    assert [r["output"] for r in pool.rows] == [f"Answer {k}." for k in pool.lines]
    assert [r["input"] for r in pool.rows] == [f"context {k}" if name == "pool.jsonl" and k % 3 else ""
                                               for k in pool.lines]


# ------------------------------------------------------------------------------------ dtype auto

@pytest.mark.parametrize("flags, expected", [(set(), "float32"), ({"avx2", "avx512f"}, "float32"),
                                             ({"avx512_bf16"}, "bfloat16"), ({"amx_bf16", "avx512_bf16"}, "bfloat16")])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_in_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.auto_dtype(torch.device("cpu")) == models.resolve_dtype("auto", "cpu") == expected
    assert hardware.auto_dtype(torch.device("cuda", 0)) == "bfloat16"  # GPUs keep bf16
    assert models.resolve_dtype("float32", "cpu") == "float32"
    with pytest.raises(ConfigError, match="model.dtype='fp8' is not supported; allowed: auto, bfloat16"):
        models.resolve_dtype("fp8", "cpu")


def test_cpu_flags_are_those_of_proc_cpuinfo():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    first = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
    assert hardware.cpu_flags() == (set(first.group(1).split()) if first else set())


@requires_shared_data()
def test_a_run_at_dtype_auto_records_and_keys_the_dtype_that_ran(compose_cfg, tmp_path, monkeypatch):
    """On a CPU without bf16 instructions, auto runs the model and LoRA in fp32: results.json says so, and
    the run shares every cache entry with one that asked for fp32; with bf16 instructions it runs in bf16,
    under other keys."""
    base = [o for o in TINY_RUN if not o.startswith("recovery.dtype")] + ["model.device=cpu"]
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512f"})
    auto = pipeline.run(compose_cfg(base + ["model.dtype=auto", "recovery.dtype=auto"]), run_dir=tmp_path / "a")
    assert auto["host"]["model_dtype"] == auto["config"]["model"]["dtype"] == "float32"
    assert auto["host"]["recovery_dtype"] == auto["config"]["recovery"]["dtype"] == "float32"
    explicit = pipeline.run(compose_cfg(base + ["model.dtype=float32", "recovery.dtype=float32"]), run_dir=tmp_path / "b")
    assert all(t["reused"] for t in explicit["timings"].values() if isinstance(t, dict))
    assert explicit["metrics"] == auto["metrics"]
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    bf16 = pipeline.run(compose_cfg(base + ["model.dtype=auto", "recovery.dtype=auto"]), run_dir=tmp_path / "c")
    assert bf16["host"]["model_dtype"] == bf16["host"]["recovery_dtype"] == "bfloat16"
    assert not any(t["reused"] for t in bf16["timings"].values() if isinstance(t, dict))
    assert bf16["metrics"]["dense"] != auto["metrics"]["dense"]


# ------------------------------------------------------------------------------------ quiet, useful logs

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_a_terminal_is_log_lines_with_the_time_left(caplog, monkeypatch):
    monkeypatch.setenv("PASER_PROGRESS_S", "0.05")
    stream = io.StringIO()  # a file, as a batch job's output is
    with caplog.at_level(logging.INFO, logger="paser.progress"):
        for _ in progress.tqdm(range(6), desc="scores", unit="sample", file=stream):
            time.sleep(0.03)
    lines = [r.getMessage() for r in caplog.records if r.name == "paser.progress"]
    assert stream.getvalue() == "" and 2 <= len(lines) <= 6, lines  # every 0.05 s, not every item
    assert re.fullmatch(r"scores: \d/6 sample \(\d+%\), 00:00 elapsed, 00:00 left, .*sample/s", lines[0])
    assert lines[-1].startswith("scores: 6/6 sample (100%)")


def test_a_short_loop_off_a_terminal_logs_nothing_and_a_terminal_gets_a_bar(caplog):
    with caplog.at_level(logging.INFO, logger="paser.progress"):
        for _ in progress.tqdm(range(3), desc="quick", file=io.StringIO()):
            pass
        terminal = Terminal()
        for _ in progress.tqdm(range(3), desc="bar", file=terminal):
            pass
    assert not [r for r in caplog.records if r.name == "paser.progress"]
    assert "bar: 100%" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_a_loop_that_redraws_every_step_logs_at_most_every_interval(caplog):
    """LoRA sets its loss as the bar's postfix every step, which redraws the bar: off a terminal that is
    held back to the interval (60 s here), so a short loop logs only its last state."""
    with caplog.at_level(logging.INFO, logger="paser.progress"):
        bar = progress.tqdm(total=4, desc="LoRA", unit="step", file=io.StringIO())
        for step in range(4):
            bar.update(1)
            bar.set_postfix(loss=f"{step:.3f}")
        bar.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "paser.progress"]
    assert len(lines) == 1 and lines[0].startswith("LoRA: 4/4 step (100%)") and lines[0].endswith("loss=3.000")


def test_faiss_loads_without_alarming_lines():
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "import paser.selectors.paser.clustering; import faiss; logging.getLogger('paser').info('loaded')")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "INFO:paser:loaded" in out.stderr, out.stderr
    assert "faiss" not in out.stderr and "ModuleNotFoundError" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------------ the smoke command

def test_the_smoke_preset_is_the_default_run_at_a_wiring_checks_size(compose_cfg):
    smoke, default = compose_cfg(["experiment=smoke"]), compose_cfg([])
    assert smoke.model.kind == "tiny" and smoke.model.dtype == "auto" and smoke.logger._target_.endswith("NullLogger")
    assert smoke.evaluator.ppl.max_windows == 8 and smoke.evaluator.get("zeroshot") is None
    for group in ("pruner", "selector"):  # every stage of the default run
        assert smoke[group] == default[group], group
    assert smoke.recovery._target_ == default.recovery._target_
    quick_start = (ROOT / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    assert "python run.py experiment=smoke" in quick_start


@pytest.mark.slow  # ~20 s of CPU
@requires_shared_data()
def test_the_smoke_command_runs_and_says_its_numbers_mean_nothing(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "experiment=smoke", f"paths.data_dir={DATA_DIR}",
                          f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}"],
                         check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (folder,) = (tmp_path / "out" / "runs" / "smoke").iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert results["summary"]["note"] == pipeline.WIRING_CHECK
    assert set(results["metrics"]) == {"dense", "pruned", "recovered"}
    assert "NOTE: a wiring check" in (folder / "run.log").read_text()
