"""Keep a finished run in the repository: copy its small files into experiments/ without machine paths.

    python scripts/keep_run.py outputs/multirun/table1_cpu/<time>/0 experiments/table1_cpu_edition/runs/full_s1
    python scripts/keep_run.py --check experiments          # list committed files that still hold one

A run folder holds what make_tables.py, stage_times.py and capability_recovery.py read: results.json,
per_sample/*.npz, selected_indices.json, and run.log for the record; the rest (.hydra/, adapters) stays
behind. Text files are copied with every absolute path replaced by a placeholder: the run's own folders
(config.paths: data_dir, cache_dir, output_dir) by <data_dir>, <cache_dir>, <output_dir>, which
capability_recovery.py's --data-dir/--cache-dir move like any other value; the Python install's packages by
<site-packages>; the folder the run was started from by '.'. Any other absolute path is an error, named
with its file and line, so that nothing leaves a machine unseen. The copy lands whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

KEPT = ("results.json", "selected_indices.json", "run.log", "per_sample")
TEXT_SUFFIXES = {".json", ".log", ".txt", ".md", ".yaml", ".csv"}
# An absolute path under a top-level folder of a machine, not inside a URL or a relative path.
MACHINE_PATH = re.compile(r"(?<![\w.~/<>:-])/(?:tmp|root|home|work|Users|mnt|scratch|var|opt|private)/[^\s\"',;)\]]*")


def replacements(results: dict, started_in: str | None) -> list[tuple[str, str]]:
    """(absolute prefix, placeholder), longest prefix first so that a folder inside another gets its own."""
    pairs = [(str(value), f"<{key}>") for key, value in (results.get("config", {}).get("paths") or {}).items()
             if isinstance(value, str) and value.startswith("/")]
    packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    pairs += [(p, "<site-packages>") for p in packages]
    if started_in:
        pairs.append((started_in, "."))
    return sorted({(old.rstrip("/"), new) for old, new in pairs if old.rstrip("/")}, key=lambda p: -len(p[0]))


def scrub(text: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        text = re.sub(re.escape(old) + r"(?=[/\s\"',;)\]]|$)", new, text)
    return text


def machine_paths(text: str) -> list[tuple[int, str]]:
    return [(n, m.group()) for n, line in enumerate(text.splitlines(), 1) for m in MACHINE_PATH.finditer(line)]


def started_in(results: dict, src: Path) -> str | None:
    """The folder the run was started from: where the run folder sits, minus the run_dir it recorded
    (relative to that folder, or absolute under a relative output_dir)."""
    run_dir = results.get("run_dir")
    if not isinstance(run_dir, str):
        return None
    if not run_dir.startswith("/"):
        here = src.resolve().as_posix()
        tail = "/" + os.path.normpath(run_dir)
        return here[:-len(tail)] if here.endswith(tail) else None
    output_dir = (results.get("config", {}).get("paths") or {}).get("output_dir")
    if isinstance(output_dir, str) and not output_dir.startswith("/"):
        marker = "/" + os.path.normpath(output_dir) + "/"
        if marker in run_dir:
            return run_dir[:run_dir.index(marker)]
    return None


def keep(src: Path, dest: Path) -> list[Path]:
    if not (src / "results.json").is_file():
        raise SystemExit(f"{src}: no results.json (not a finished run folder)")
    if dest.exists():
        raise SystemExit(f"{dest} exists: keep each run in a new folder (remove it first to replace it)")
    results = json.loads((src / "results.json").read_text())
    pairs = replacements(results, started_in(results, src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name in KEPT:
            if (src / name).is_dir():
                shutil.copytree(src / name, staging / name)
            elif (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        problems = []
        for f in sorted(p for p in staging.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
            text = scrub(f.read_text(), pairs)
            f.write_text(text)
            problems += [f"{src / f.relative_to(staging)}:{n}: {path}" for n, path in machine_paths(text)]
        if problems:
            raise SystemExit("absolute paths with no placeholder (add the folder to config.paths or remove the "
                             "line):\n  " + "\n  ".join(problems))
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(p for p in dest.rglob("*") if p.is_file())


def check(roots: list[Path]) -> list[str]:
    found = []
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            if f.suffix in TEXT_SUFFIXES:
                found += [f"{f}:{n}: {path}" for n, path in machine_paths(f.read_text(errors="replace"))]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="SRC DEST, or with --check the folders to scan")
    parser.add_argument("--check", action="store_true", help="list text files that hold a machine path")
    args = parser.parse_args(argv)
    if args.check:
        found = check(args.paths)
        print("\n".join(found) if found else "no machine paths")
        return 1 if found else 0
    if len(args.paths) != 2:
        parser.error("give the run folder and the destination (SRC DEST)")
    for f in keep(*args.paths):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
