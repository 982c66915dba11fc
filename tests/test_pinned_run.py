"""One tiny end-to-end run whose key numbers are pinned: the samples it selects, its recovery loss curve and
the perplexity of every model state.

These are a **regression pin**, not values obtained by an independent means: tests/data/pinned_tiny_run.json
holds what this code computed for the run below (on the CPU, fp32, tiny random Llama, magnitude 50%, Random
selection of 6 of 24 Alpaca samples, 3 LoRA steps, 2 perplexity windows per corpus), when the pin was
written. The other tests check properties (shapes, caching, agreement with references); this one fails when
any number a run produces moves at all, so that a change to data loading, templating, seeding, pruning,
selection, the LoRA loop or the evaluation cannot change results silently. When a change moves them on
purpose, regenerate the pin and say why in the commit:

    python -m tests.test_pinned_run --write      # rewrites tests/data/pinned_tiny_run.json (~10 s)

The tolerance (relative 1e-6) covers summation order only (thread counts), on the host and versions that wrote
the pin. Other versions or another CPU move the last digits: transformers 5.24 -> 5.25 moved the loss curve by a
relative 1.2e-5, and a CI host other than the AMD EPYC (AVX-512) that wrote the pin moved the third loss by
5e-5 (its fp32 kernels sum in another order). Perplexity amplifies that by the NLL (~6 nats here), so there
the numbers are compared at relative 1e-3: a fresh install picks up new releases and runs on whatever CPU it
gets, and the strict check still runs wherever the pin was written. The failure message names both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, compose_config, requires_shared_data

PIN = Path(__file__).resolve().parent / "data" / "pinned_tiny_run.json"
OVERRIDES = [*TINY_RUN, "model.device=cpu"]  # the pin is a CPU fp32 result, also on a machine with a GPU
REL = 1e-6
REL_OTHER_HOST = 1e-3


def kernel_identity(results: dict) -> dict:
    """What decides a run's fp32 summation order besides the thread count, from what it recorded: library
    versions and the CPU whose kernels ran it."""
    return {"torch": results["versions"]["torch"], "transformers": results["versions"]["transformers"],
            **{k: results["host"][k] for k in ("cpu", "cpu_capability", "amx_bf16")}}


def tolerance(pinned: dict, running: dict) -> float:
    """Strict on the versions and host that wrote the pin, loose elsewhere (see the module docstring)."""
    return REL if pinned == running else REL_OTHER_HOST


def key_numbers(overrides=OVERRIDES, workdir: Path | None = None) -> dict:
    """Run the pipeline once on a cold cache and return the numbers the pin holds."""
    from paser import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        results = pipeline.run(compose_config(list(overrides), root), run_dir=root / "run")
        selected = json.loads((root / "run" / "selected_indices.json").read_text())
    recovery = results["recovery"]
    return {
        "overrides": list(overrides),
        "pool_fingerprint": results["selection"]["pool_fingerprint"],
        "selected_indices": selected,
        "sparsity": results["prune"]["sparsity"],
        "recovery_steps": recovery["steps"],
        "loss_curve": [step["loss"] for step in recovery["loss_curve"]],
        "final_loss": recovery["final_loss"],
        "ppl": {state: {corpus: m["ppl"] for corpus, m in metrics["ppl"].items()}
                for state, metrics in results["metrics"].items()},
        "versions": kernel_identity(results),
    }


@requires_shared_data()
def test_tiny_run_reproduces_its_pinned_numbers(tmp_path):
    pin = json.loads(PIN.read_text())
    got = key_numbers(pin["overrides"], tmp_path)
    where = f"(pinned with {pin['versions']}, running {got['versions']}; see the module docstring to regenerate)"
    rel = tolerance(pin["versions"], got["versions"])
    assert got["pool_fingerprint"] == pin["pool_fingerprint"], where
    assert got["selected_indices"] == pin["selected_indices"], where
    assert got["recovery_steps"] == pin["recovery_steps"], where
    assert got["sparsity"] == pytest.approx(pin["sparsity"], rel=rel), where
    assert got["loss_curve"] == pytest.approx(pin["loss_curve"], rel=rel, abs=1e-9), where
    assert got["final_loss"] == pytest.approx(pin["final_loss"], rel=rel), where
    for state, corpora in pin["ppl"].items():
        assert got["ppl"][state] == pytest.approx(corpora, rel=rel), (state, where)
    assert got["ppl"].keys() == pin["ppl"].keys()


def test_tolerance_is_strict_only_where_the_pin_was_written():
    here = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "cpu": "AMD EPYC", "cpu_capability": "AVX512",
            "amx_bf16": False}
    assert tolerance(here, dict(here)) == REL
    for key, other in (("cpu", "Intel Xeon"), ("cpu_capability", "AVX2"), ("amx_bf16", True), ("transformers", "5.26.0")):
        assert tolerance(here, {**here, key: other}) == REL_OTHER_HOST, key
    assert tolerance({"torch": "2.13.0+cpu", "transformers": "5.25.0"}, here) == REL_OTHER_HOST  # a pin without a host


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {PIN.name}; otherwise print the numbers")
    args = ap.parse_args()
    import subprocess

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False,
                            cwd=PIN.parent).stdout.strip()
    numbers = {"note": f"regression pin, not independent values: what the code at {commit} computed; "
                       "regenerate with `python -m tests.test_pinned_run --write` (tests/test_pinned_run.py)",
               **key_numbers()}
    text = json.dumps(numbers, indent=1) + "\n"
    if args.write:
        PIN.write_text(text)
        print(f"wrote {PIN}")
    else:
        print(text)


if __name__ == "__main__":
    main()
