"""Content-addressed stage cache.

An entry lives at ``root/<stage>/<key>/`` where key = hash of the config slice that produced it (never the
run folder), so a sweep over selectors prunes once and a rerun of a finished config does no work.

Writes are atomic: an entry is written into a temporary sibling folder and renamed into place, with a
``manifest.json`` (config slice, sha256 of every file, library versions) written last. On lookup the
manifest is checked against the files; a truncated or corrupted entry is reported, removed and recomputed,
never loaded. Long score computations persist finished chunks under ``root/<stage>/<key>.partial/`` so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def to_plain(obj):
    """Config slices (DictConfig or nested dicts) as plain JSON-able data."""
    if isinstance(obj, DictConfig):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def config_hash(slice_) -> str:
    text = json.dumps(to_plain(slice_), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("paser", "torch", "transformers", "peft", "lm_eval", "sentence-transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class StageCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def entry_dir(self, stage: str, slice_) -> Path:
        return self.root / stage / config_hash(slice_)

    def lookup(self, stage: str, slice_) -> Path | None:
        """The entry's folder if it exists and is intact, else None (a damaged entry is removed)."""
        if not self.enabled:
            return None
        path = self.entry_dir(stage, slice_)
        if not path.exists():
            return None
        problem = self._verify(path)
        if problem is None:
            return path
        log.warning("cache entry %s is damaged (%s): removing it and recomputing", path, problem)
        shutil.rmtree(path, ignore_errors=True)
        return None

    @staticmethod
    def _verify(path: Path) -> str | None:
        manifest = path / MANIFEST
        if not manifest.is_file():
            return "no manifest"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError) as e:
            return f"unreadable manifest ({e})"
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                return f"missing file {name}"
            if file_sha256(f) != digest:
                return f"content hash of {name} does not match"
        return None

    def store(self, stage: str, slice_, write: Callable[[Path], None]) -> Path:
        """Run ``write(tmpdir)`` and move the folder into place with its manifest. Returns the entry."""
        final = self.entry_dir(stage, slice_)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
        try:
            write(tmp)
            files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"stage": stage, "config": to_plain(slice_), "files": files,
                        "versions": library_versions()}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
            if final.exists():  # a concurrent or damaged leftover: the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def get_or_create(self, stage: str, slice_, write: Callable[[Path], None]) -> tuple[Path, bool]:
        """(entry folder, reused?)"""
        hit = self.lookup(stage, slice_)
        if hit is not None:
            log.info("stage '%s': reusing cached result %s", stage, hit)
            return hit, True
        return self.store(stage, slice_, write), False

    # ------------------------------------------------------------------ arrays of per-sample scores

    def array(self, stage: str, slice_, n_items: int, compute: Callable[[int, int], np.ndarray],
              chunk_size: int = 1024, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """An array over ``n_items`` items, computed ``chunk_size`` items at a time by
        ``compute(start, end)``; finished chunks persist, so an interrupted computation resumes."""
        hit = self.lookup(stage, slice_)
        if hit is not None:
            log.info("scores '%s': reusing cached %s", stage, hit)
            return np.load(hit / "scores.npy")
        partial = self.entry_dir(stage, slice_).with_suffix(".partial")
        if self.enabled:
            partial.mkdir(parents=True, exist_ok=True)
            atomic_write_text(partial / "config.json", json.dumps(to_plain(slice_), default=str))
        chunks = []
        for start in range(0, n_items, chunk_size):
            end = min(start + chunk_size, n_items)
            path = partial / f"{start:09d}-{end:09d}.npy"
            if self.enabled and path.is_file():
                try:
                    chunks.append(np.load(path))
                    if progress:
                        progress(end - start)
                    continue
                except (ValueError, OSError) as e:
                    log.warning("partial chunk %s unreadable (%s): recomputing", path, e)
            chunk = np.asarray(compute(start, end))
            if len(chunk) != end - start:
                raise RuntimeError(f"{stage}: compute({start}, {end}) returned {len(chunk)} items")
            if self.enabled:
                atomic_save_npy(path, chunk)
            chunks.append(chunk)
        result = np.concatenate(chunks) if chunks else np.zeros(0)
        if self.enabled:
            self.store(stage, slice_, lambda d: np.save(d / "scores.npy", result))
            shutil.rmtree(partial, ignore_errors=True)
        return result
