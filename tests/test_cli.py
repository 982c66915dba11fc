"""run.py as a user types it: unknown options and keys fail with Hydra's message listing what exists."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_unknown_option_lists_the_available_ones():
    out = run_cli("pruner=does_not_exist")
    assert out.returncode != 0
    assert "Could not find 'pruner/does_not_exist'" in out.stderr
    assert "magnitude" in out.stderr  # Hydra lists the available options


def test_misspelled_key_is_rejected():
    out = run_cli("pruner.sparsty=0.3", "--cfg", "job")
    assert out.returncode != 0 and "sparsty" in out.stderr


def test_sparsity_out_of_range_is_a_clear_error(tmp_path):
    out = run_cli("model=tiny-llama", "logger=none", "pruner=magnitude", "pruner.sparsity=1.5", "data.subsample=8", "budget=2",
                  f"paths.cache_dir={tmp_path}/c", f"paths.output_dir={tmp_path}/o")
    assert out.returncode == 2
    assert "pruner.sparsity=1.5 must be a fraction strictly between 0 and 1" in out.stderr + out.stdout
