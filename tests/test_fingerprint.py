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
