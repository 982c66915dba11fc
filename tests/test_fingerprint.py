"""Fingerprints: the code hash follows the transitive imports of a package and nothing else; file
fingerprints follow content, not path."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from paser import fingerprint
from paser.fingerprint import code_hash_of_modules, code_version, file_fingerprint

MODULES = {
    "__init__.py": "",
    "algo.py": """
        import json
        from . import helpers
        from fppkg.sub import deep

        class Algo:
            def run(self):
                from fppkg.lazy import thing  # an import inside a function counts
                return helpers.f() + deep.g() + thing
    """,
    "helpers.py": "def f():\n    return 1\n",
    "lazy.py": "thing = 3\n",
    "sub/__init__.py": "",
    "sub/deep.py": "from ..helpers import f\n\ndef g():\n    return f()\n",
    "unrelated.py": "x = 1\n",
}


@pytest.fixture
def pkg(tmp_path, monkeypatch):
    root = tmp_path / "fppkg"
    for name, text in MODULES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    fingerprint.clear_memo()
    yield root
    fingerprint.clear_memo()
    for name in [m for m in sys.modules if m.split(".")[0] == "fppkg"]:
        del sys.modules[name]  # the next test's package lives in another folder


def _edit(path, extra="# edited\n"):
    path.write_text(path.read_text() + extra)
    fingerprint.clear_memo()


def test_closure_covers_transitive_imports_only(pkg):
    v = code_version("fppkg.algo")
    assert v["modules"] == ["fppkg", "fppkg.algo", "fppkg.helpers", "fppkg.lazy", "fppkg.sub", "fppkg.sub.deep"]
    assert len(v["hash"]) == 16 and code_hash_of_modules(v["modules"]) == v["hash"]


@pytest.mark.parametrize("module, changes", [("sub/deep.py", True), ("lazy.py", True), ("helpers.py", True),
                                             ("unrelated.py", False)])
def test_editing_a_module_changes_the_hash_iff_imported(pkg, module, changes):
    before = code_version("fppkg.algo")["hash"]
    _edit(pkg / module)
    assert (code_version("fppkg.algo")["hash"] != before) == changes


def test_objects_resolve_to_their_module(pkg):
    import fppkg.algo

    by_name = code_version("fppkg.algo")
    assert code_version(fppkg.algo.Algo) == by_name == code_version(fppkg.algo.Algo()) == \
        code_version(fppkg.algo.Algo.run)


def test_hash_of_a_vanished_module_is_none(pkg):
    modules = code_version("fppkg.algo")["modules"]
    (pkg / "lazy.py").unlink()
    fingerprint.clear_memo()
    assert code_hash_of_modules(modules) is None


def test_real_package_closure_stays_inside_paser():
    v = code_version(fingerprint.file_fingerprint)
    assert v["modules"] == ["paser.fingerprint"]


def test_file_fingerprint_is_by_content(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("calibration")
    b.write_text("calibration")
    assert file_fingerprint(a) == file_fingerprint(b) == {"sha256": file_fingerprint(a)["sha256"], "size": 11}
    before = file_fingerprint(a)
    a.write_text("calibratioN")  # same size; the mtime differs
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert file_fingerprint(a) != before


def test_a_cut_import_is_left_out_unless_reached_another_way(pkg):
    assert "fppkg.lazy" not in code_version("fppkg.algo", cut=[("fppkg.algo", "fppkg.lazy")])["modules"]
    # helpers is imported by algo and by sub.deep: cutting one edge keeps it
    assert "fppkg.helpers" in code_version("fppkg.algo", cut=[("fppkg.algo", "fppkg.helpers")])["modules"]


# ------------------------------------------------------------- the keys of real components, edited in place

SELECTORS = {"paser": [], "ifd": [], "ifd_s2ric": ["selector=ifd", "selector.cluster=s2ric"], "nuggets": [],
             "random": [], "instruction_mining": [], "full": []}
SCORING_MODULES = {"paser": "paser.selectors.paser.selector", "ifd": "paser.selectors.ifd",
                   "nuggets": "paser.selectors.nuggets", "instruction_mining": "paser.selectors.instruction_mining"}


@pytest.fixture(scope="module")
def built():
    """(config, components) of the tiny run with each selector and both evaluators: build_components reads the
    pool once per selector, so this is done once."""
    from paser.pipeline import build_components
    from tests.conftest import TINY_RUN, compose_config

    out = {}
    for name, overrides in SELECTORS.items():
        cfg = compose_config([*TINY_RUN, "evaluator=quick", *(overrides or [f"selector={name}"])])
        out[name] = (cfg, build_components(cfg))
    return out


def every_key(built) -> dict[str, str]:
    """Every stage key of every selector's run (model, pruner, selection, adapter, each evaluation) and the code
    of each selector's cached per-sample scores, as hashes."""
    from paser.cache import config_hash
    from paser.components import HYBRID_CLUSTERING
    from paser.pipeline import Keys

    fingerprint.clear_memo()
    keys = {}
    for name, (cfg, parts) in built.items():
        k = Keys.build(cfg, parts)
        stages = {"model": k.model, "pruner": k.pruner, "selection": k.selection, "adapter": k.adapter}
        for state, key in (("dense", k.model), ("pruned", k.pruned), ("recovered", k.adapter)):
            for kind, ev in parts.evaluators.items():
                stages[f"eval_{state}_{kind}"] = k.metrics(key, kind, cfg.evaluator[kind], ev)
        keys.update({f"{name}:{stage}": config_hash(key) for stage, key in stages.items()})
    for name, module in SCORING_MODULES.items():
        keys[f"{name}:scores"] = code_version(module, cut=HYBRID_CLUSTERING)["hash"]
    return keys


def edited_keys(built, monkeypatch, tmp_path, module: str) -> set[str]:
    """The keys that change when ``module``'s source gains a comment (a copy is read in its place)."""
    before = every_key(built)
    real = fingerprint._source_file
    source = real(module)
    copy = tmp_path / module / source.name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(source.read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(fingerprint, "_source_file", lambda name: copy if name == module else real(name))
    after = every_key(built)
    monkeypatch.undo()
    fingerprint.clear_memo()
    return {k for k in before if before[k] != after[k]}


@pytest.mark.parametrize("module", sorted(fingerprint.INFRASTRUCTURE))
def test_editing_an_infrastructure_module_changes_no_key(built, monkeypatch, tmp_path, module):
    assert edited_keys(built, monkeypatch, tmp_path, module) == set()


def test_editing_the_jsd_changes_exactly_pasers_keys(built, monkeypatch, tmp_path):
    changed = edited_keys(built, monkeypatch, tmp_path, "paser.selectors.paser.divergence")
    assert changed == {"paser:selection", "paser:adapter", "paser:eval_recovered_ppl", "paser:eval_recovered_zeroshot",
                       "paser:scores"}


def test_s2rics_clustering_is_in_a_key_only_where_clustering_is_used(built, monkeypatch, tmp_path):
    changed = edited_keys(built, monkeypatch, tmp_path, "paser.selectors.paser.clustering")
    selections = {k.split(":")[0] for k in changed if k.endswith(":selection")}
    # PASER and the hybrid cluster; Instruction Mining's Knn6 indicator is computed on S²RIC's kNN graph
    assert selections == {"paser", "ifd_s2ric", "instruction_mining"}
    # per-sample scores: IFD's and Nuggets' never; PASER computes its JSD in the module that clusters
    assert {k for k in changed if k.endswith(":scores")} == {"instruction_mining:scores", "paser:scores"}
    assert not {k for k in changed if k.split(":")[1] in ("model", "pruner") or "_dense_" in k or "_pruned_" in k}
