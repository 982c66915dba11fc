"""What a cache key must contain besides config values: the code that computes an entry and the content
of the files it reads.

Code is identified by a hash of source, not by a version number written by hand. ``code_version(obj)``
hashes the module defining ``obj`` together with every module of the same top-level package that it
imports, directly or transitively (found statically, by parsing the import statements). A key that
includes it changes whenever any of that source changes, so a fix to an algorithm invalidates the entries
the old code computed, and nobody can forget to bump a version. The price is in the safe direction: any
edit to an implementing module, even to a comment, makes its entries unreachable and they are recomputed;
``python -m paser.cache gc`` removes them. Parent packages count only when imported by name; third-party
code is covered by the library versions of each manifest, not here; data files a module reads (a word
list beside it) are not source: key them with ``file_fingerprint``.

Only computing code counts. The ``INFRASTRUCTURE`` modules (the cache and its claims, the stage runner,
tracking, reporting, config checks and composition, this module) decide where results are stored, logged
and shown, never what they are: they are neither hashed nor followed, so editing the ``gc`` command or the
W&B logger reuses every entry. Imports that one configuration of a component never runs (a baseline's S²RIC
clustering with ``cluster: null``) are left out by naming them as ``cut`` edges (importing module,
imported module); what is reached another way still counts.

Hashes are memoized per process: a long run keeps the identity of the code it started with even if the
files change on disk meanwhile. ``clear_memo()`` forgets them (for tests that edit modules).

Files (calibration sets, data) are identified by content, not path: the same file at another path hits,
different content at the same path misses.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import os
from pathlib import Path


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path) -> dict:
    """``{"sha256", "size"}`` of a file's content; rehashed only when its size or mtime changes."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return dict(_content_digest(real, st.st_size, st.st_mtime_ns))


@functools.cache
def _content_digest(real: str, size: int, mtime_ns: int) -> tuple:
    return ("sha256", file_sha256(real)), ("size", size)


def _module_name(obj) -> str:
    if isinstance(obj, str):
        return obj
    module = inspect.getmodule(obj)
    if module is None or not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)):
        module = inspect.getmodule(type(obj))  # an instance: the code is its class's
    if module is None or module.__name__ == "__main__":
        raise ValueError(f"code_version: {obj!r} is not defined in an importable module")
    return module.__name__


# where results are stored, logged, checked and shown: left out of every code version (see the docstring).
# paser.errors (exception classes) is not listed although it computes nothing: the pruners and evaluators
# import nothing else of these, so their keys, and the stored pruned models and evaluations, stay as they were.
INFRASTRUCTURE = frozenset({"paser.cache", "paser.claims", "paser.tracking", "paser.reporting",
                            "paser.config_keys", "paser.compose", "paser.fingerprint", "paser.stages.runner"})


def _source_file(name: str) -> Path | None:
    """The .py file of module ``name`` (a package's __init__.py), found without importing anything
    below the top-level package; None if there is none."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for location in spec.submodule_search_locations or ():
        base = Path(location).joinpath(*rest[:-1])
        for candidate in (base / f"{rest[-1]}.py", base / rest[-1] / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _imports(name: str, path: Path) -> set[str]:
    """Module names imported anywhere in ``path`` (including inside functions); for ``from X import y``
    both X and X.y (which exists only when y is a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    continue  # a relative import above the top-level package: not ours
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


@functools.cache
def _closure(roots: tuple[str, ...], cut: frozenset[tuple[str, str]] = frozenset()) -> tuple[str, ...]:
    tops = {r.split(".")[0] for r in roots}
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in tops or (name in INFRASTRUCTURE and name not in roots):
            continue
        path = _source_file(name)
        if path is None:
            if name in roots:
                raise ValueError(f"code_version: no source file for module {name}")
            continue  # a name imported from a module, not a module
        seen.add(name)
        todo.extend(m for m in _imports(name, path) - seen if (name, m) not in cut)
    return tuple(sorted(seen))


@functools.cache
def _hash(modules: tuple[str, ...]) -> str | None:
    h = hashlib.sha256()
    for name in sorted(modules):
        path = _source_file(name)
        if path is None:
            return None
        source = path.read_bytes()
        h.update(f"{name}\0{len(source)}\0".encode())
        h.update(source)
    return h.hexdigest()[:16]


def code_version(*objs, cut=()) -> dict:
    """``{"hash", "modules"}`` identifying the source of the modules defining ``objs`` (classes,
    functions, methods, instances or module names) and of everything they import from their package,
    except the infrastructure and the imports ``cut`` names ((importing module, imported module) pairs)."""
    modules = _closure(tuple(sorted({_module_name(o) for o in objs})), frozenset(map(tuple, cut)))
    return {"hash": _hash(modules), "modules": list(modules)}


def code_hash_of_modules(modules: list[str]) -> str | None:
    """The hash ``code_version`` recorded for ``modules``, from today's source; None if one is gone."""
    return _hash(tuple(sorted(modules)))


def clear_memo() -> None:
    for memo in (_content_digest, _closure, _hash):
        memo.cache_clear()
