"""docs/extending.md, "Adding a pruner / a selector / an evaluator": each needs exactly one Python module with
a class and one YAML file in its config group. This test writes those two files per kind in a temporary folder
(outside the package), composes them through Hydra's search path and runs the whole pipeline."""

from __future__ import annotations

import json
import textwrap

from paser import pipeline
from tests.conftest import TINY_RUN, compose_config, requires_shared_data

pytestmark = requires_shared_data()

MODULE = '''
import torch
from paser.components import Selection


class FirstRowsPruner:
    """Zeroes the first ``rows`` output rows of every MLP down-projection."""
    needs_calibration = False
    neutral_knobs = ("verbose",)

    def __init__(self, rows: int = 1, verbose: bool = False):
        self.rows = rows

    def prune(self, model, calib):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.down_proj.weight[: self.rows] = 0
        return {"rows_zeroed": self.rows}


class LongestSelector:
    """The budget's longest responses."""
    uses_scoring = False

    def select(self, pool, budget, ctx):
        order = sorted(range(len(pool)), key=lambda i: (-len(pool.rows[i]["output"]), i))
        chosen = sorted(budget.fill(order).tolist())  # the longest prefix that fits, samples or tokens
        return Selection(indices=chosen, diagnostics={"rule": "longest output"},
                         artifacts={"chosen.txt": " ".join(map(str, chosen)).encode()})


class ZeroFraction:
    """Share of exactly-zero weights of the model."""

    def evaluate(self, model, tokenizer):
        params = [p for p in model.parameters()]
        return {"zero_fraction": sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)}
'''


def test_a_new_pruner_selector_and_evaluator_need_one_module_and_one_yaml_each(tmp_path, monkeypatch):
    (tmp_path / "toy_parts.py").write_text(MODULE)
    conf = tmp_path / "conf"
    for group, text in {
        "pruner/first_rows.yaml": "_target_: toy_parts.FirstRowsPruner\nrows: 2\nverbose: false\n",
        "selector/longest.yaml": "_target_: toy_parts.LongestSelector\n",
        "evaluator/zeros.yaml": "ppl: null\nzeros:\n  _target_: toy_parts.ZeroFraction\n",
    }.items():
        (conf / group).parent.mkdir(parents=True, exist_ok=True)
        (conf / group).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [o for o in TINY_RUN if not o.startswith(("pruner=", "selector=", "evaluator."))] + [
        f"hydra.searchpath=[file://{conf}]", "pruner=first_rows", "selector=longest", "evaluator=zeros"]
    results = pipeline.run(compose_config(overrides, tmp_path), run_dir=tmp_path / "run")
    assert results["prune"]["rows_zeroed"] == 2
    m = results["metrics"]
    assert m["pruned"]["zeros"]["zero_fraction"] > m["dense"]["zeros"]["zero_fraction"]
    assert results["selection"]["diagnostics"] == {"rule": "longest output"}
    assert results["selection"]["stats"]["selected"] == 6
    # the declared neutral knob is not in the key: the pruned model is reused
    again = pipeline.run(compose_config(overrides + ["pruner.verbose=true"], tmp_path), run_dir=tmp_path / "b")
    assert again["timings"]["prune"]["reused"]
    # the selector's returned files reach the run folder, also from the cached selection
    chosen = " ".join(map(str, json.loads((tmp_path / "run" / "selected_indices.json").read_text())))
    assert (tmp_path / "run" / "chosen.txt").read_text() == chosen
    assert again["timings"]["select"]["reused"] and (tmp_path / "b" / "chosen.txt").read_text() == chosen
