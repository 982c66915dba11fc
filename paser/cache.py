"""Content-addressed stage cache, shared safely by concurrent processes (e.g. SLURM jobs on one file system).

An entry lives at ``root/<stage>/<key>/`` where key = hash of the config slice that produced it (never the
run folder), so a sweep over selectors prunes once and a rerun of a finished config does no work. Keys
should name the code computing an entry (``paser.fingerprint.code_version``) and the content of the files
it reads (``file_fingerprint``), so that a fixed algorithm or a changed file misses instead of hitting.

Writes are atomic: an entry is written into a temporary sibling folder (named after its writer's PID and
host) and renamed into place, with a ``manifest.json`` written last: the config slice, creation time,
library versions, and per file its size and sha256 (and a "sampled" digest of a few blocks, which older
versions of this module check). The first lookup of an entry in a process checks the size and sha256 of
every file, reading every byte (sha256 runs at ~1.6 GB/s on one x86 core: ~8 s for a 13 GB model, plus
reading it); later lookups in that process check the sizes and read again only a file whose stat (size,
inode, modification and change times) differs from when it was read. ``python -m paser.cache verify``
reads every byte of every entry and exits 1 if any is damaged. A damaged entry is reported, moved aside
and removed, then recomputed, never loaded. An intact entry is never removed in place: a second writer of
the same key keeps the first one, since others may be reading it.

A lookup also leases the entry to its process (a ``.lease-<pid>@<host>`` file in it), which may load it
much later (the pruned model, after selection): ``gc`` removes no entry leased by a process still running
on this host, or leased from another host (whose processes it cannot see) in the last LEASE_GRACE_S.

Between processes, ``get_or_create`` and ``array`` claim what they compute (``paser.claims``): a process
that finds a key being computed waits and takes the result, one whose holder died takes over. Long score
computations persist finished chunks under ``root/<stage>/<key>.partial/``, so a killed run resumes and
concurrent runs share the chunks. ``python -m paser.cache ls | gc | verify`` lists, prunes and checks a cache;
``gc`` also removes what killed runs left: temporary folders of writers that are gone at once, unfinished
score chunks (``.partial``) and LoRA checkpoints (``.work``) that no live claim covers once they are old.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from paser.claims import HOST, Claim, holder, is_stale, pid_exists, remove_stale, wait_until_free
from paser.errors import ConfigError, PaserError
from paser.fingerprint import code_hash_of_modules, file_sha256

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LAST_USED = ".last_used"  # touched on every hit; not part of the entry's content
LEASE = ".lease-"  # + "<pid>@<host>": touched by every lookup of that process (see the module's docstring)
LEASE_GRACE_S = 86400.0
SAMPLE_BLOCK = 64 << 10
SAMPLED_IN_FULL = 4 << 20  # files up to this size: the sampled digest is the full one
SAMPLE_BLOCKS = 8
PARTIAL_MAX_AGE_DAYS = 7.0
_CHECKED: dict[Path, dict] = {}  # entry -> its files' stat when this process last read every byte of them
UNWRITABLE = {errno.EROFS: "is on a read-only file system", errno.ENOSPC: "has no space left on its device",
              errno.EDQUOT: "is over its disk quota", errno.EACCES: "is not writable by this user",
              errno.EPERM: "is not writable by this user"}
WRITE_ONLY_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)  # errors no read gives


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


def sample_offsets(size: int) -> list[int]:
    """Where the sampled digest of a file larger than SAMPLED_IN_FULL reads its blocks: the first, the
    last, and evenly spaced between (truncation, a torn write or a zeroed region show up there)."""
    last = size - SAMPLE_BLOCK
    return sorted({round(i * last / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})


def sampled_sha256(path: Path, size: int) -> str:
    if size <= SAMPLED_IN_FULL:
        return file_sha256(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sample_offsets(size):
            f.seek(offset)
            h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def _file_record(path: Path) -> dict:
    size = path.stat().st_size
    full = file_sha256(path)
    return {"size": size, "sha256": full, "sampled": full if size <= SAMPLED_IN_FULL else sampled_sha256(path, size)}


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _problem(path: Path, recheck: bool = False) -> str | None:
    """What is wrong with the entry at ``path``, or None when it is intact: every file has the size and
    sha256 its manifest records. Every byte is read unless this process read them before and no file's
    stat changed since; ``recheck``: read every byte anyway."""
    if not (path / MANIFEST).is_file():
        return "no manifest"
    manifest = _read_manifest(path)
    if manifest is None:
        return "unreadable manifest"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(r, dict) and {"size", "sha256", "sampled"} <= r.keys()
                                              for r in files.values()):
        return "manifest of an unknown format"
    stats = {}
    for name, record in files.items():
        try:  # an entry can vanish while it is read (gc, or another process found it damaged)
            st = (path / name).stat()
        except FileNotFoundError:
            return f"missing file {name}"
        if not stat.S_ISREG(st.st_mode):
            return f"missing file {name}"
        if st.st_size != record["size"]:
            return f"{name} has {st.st_size} bytes, the manifest says {record['size']}"
        stats[name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if not recheck and _CHECKED.get(path) == stats:
        return None
    for name, record in files.items():
        try:
            if file_sha256(path / name) != record["sha256"]:
                return f"content hash of {name} does not match"
        except FileNotFoundError:
            return f"missing file {name}"
    _CHECKED[path] = stats
    return None


def _remove(path: Path, unless: Callable[[Path], bool] | None = None) -> bool:
    """Move ``path`` aside first, so that it vanishes at once and no process sees a half-removed entry;
    then delete it, unless ``unless(moved folder)`` (a lookup leased the entry while gc decided): then it
    goes back. False if it was gone already or went back."""
    trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return False
    if unless is not None and unless(trash):
        try:
            os.replace(trash, path)
            return False
        except OSError:  # an entry was stored there meanwhile: it serves the lookup
            pass
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _lease(path: Path) -> bool:
    """Mark the entry as used by this process, and touch its last use; False if it vanished meanwhile."""
    try:
        (path / LAST_USED).touch()
        (path / f"{LEASE}{os.getpid()}@{HOST}").touch()
    except FileNotFoundError:
        return False
    except OSError:
        pass  # a read-only cache: the use is only unknown to gc
    return True


def _leases(path: Path, now: float) -> tuple[list[str], list[Path]]:
    """(holders of the entry's live leases, lease files of processes that are gone): a lease is live while
    its process runs on this host (a reused PID only keeps the entry longer), or for LEASE_GRACE_S when it
    was taken on another host."""
    live, gone = [], []
    for f in path.glob(LEASE + "*"):
        who = f.name[len(LEASE):]
        pid, _, host = who.partition("@")
        try:
            alive = pid_exists(int(pid)) if host == HOST and pid.isdigit() else \
                now - f.stat().st_mtime < LEASE_GRACE_S
        except FileNotFoundError:
            continue
        if alive:
            live.append(who)
        else:
            gone.append(f)
    return live, gone


def _discard(path: Path, problem: str) -> None:
    if _remove(path):
        log.warning("cache entry %s was damaged (%s): removed it, to be recomputed", path, problem)


class StageCache:
    def __init__(self, root: str | Path, *, poll_s: float = 1.0):
        self.root = Path(root)
        self.poll_s = poll_s  # how often a waiting process looks at another one's claim
        # per stage: "computed" here, "cached" (found there), "other" (computed by another process while we
        # waited); entries for get_or_create, chunks for array
        self.counts: dict[str, dict[str, int]] = {}

    def entry_dir(self, stage: str, slice_) -> Path:
        return self.root / stage / config_hash(slice_)

    def _count(self, stage: str, how: str, n: int = 1) -> None:
        self.counts.setdefault(stage, {"computed": 0, "cached": 0, "other": 0})[how] += n

    def lookup(self, stage: str, slice_) -> Path | None:
        """The entry's folder, leased to this process, if it exists and is intact (see ``_problem``), else
        None (a damaged entry is removed)."""
        path = self.entry_dir(stage, slice_)
        if not path.exists() or not _lease(path):  # leased before it is checked: gc then leaves it alone
            return None
        problem = _problem(path)
        if problem is not None:
            _discard(path, problem)
            return None
        return path

    def store(self, stage: str, slice_, write: Callable[[Path], None]) -> Path:
        """Run ``write(tmpdir)`` and move the folder into place with its manifest. Returns the entry."""
        final = self.entry_dir(stage, slice_)
        final.parent.mkdir(parents=True, exist_ok=True)
        # named after its writer, so that gc removes it as soon as a killed writer is known to be gone
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{os.getpid()}@{HOST}-"))
        try:
            write(tmp)
            files = {str(p.relative_to(tmp)): _file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {"stage": stage, "config": to_plain(slice_), "created": time.time(),
                        "versions": library_versions(), "files": files}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
            while True:
                try:
                    os.replace(tmp, final)
                    return final
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                problem = _problem(final)
                if problem is None:  # another process finished first; it may be reading its entry
                    log.info("cache entry %s was stored by another process meanwhile: keeping it", final)
                    return final
                _discard(final, problem)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def _writing(self):
        """An error of a cache that cannot be written (read-only on a miss, a full disk, no permission) as a
        ConfigError naming paths.cache_dir. An OSError counts when it is about a path below the cache or about
        none (a write that found the disk full); a library's own I/O error (safetensors: "... (os error 28)")
        when its errno only comes from writes. Any other error goes on as it is."""
        try:
            yield
        except PaserError:  # said already (by a stage computed inside this one)
            raise
        except Exception as e:
            if isinstance(e, OSError):
                code = e.errno
                paths = [Path(os.path.abspath(f)) for f in (e.filename, e.filename2) if f is not None]
                root = Path(os.path.abspath(self.root))
                ours = not paths or any(p.is_relative_to(root) for p in paths)
            else:
                found = re.search(r"\(os error (\d+)\)", str(e))
                code = int(found.group(1)) if found else None
                ours = code in WRITE_ONLY_ERRNOS
            if code not in UNWRITABLE or not ours:
                raise
            full = code in (errno.ENOSPC, errno.EDQUOT)
            raise ConfigError(f"paths.cache_dir={self.root} {UNWRITABLE[code]} ({e}); set paths.cache_dir (or "
                              f"PASER_CACHE_DIR) to a folder this user can write{', with room' if full else ''}"
                              f"{' (or free space in this one)' if full else ''}") from e

    def claimed_elsewhere(self, stage: str, slice_) -> bool:
        """Another live process is computing this entry: its claim is held and not stale, and the entry is
        not stored yet. (This process holds no claim outside ``get_or_create`` and ``array``.)"""
        entry = self.entry_dir(stage, slice_)
        claim = entry.with_suffix(".claim")
        return not entry.exists() and holder(claim) is not None and not is_stale(claim)

    def _wait(self, claim_path: Path, waited: list) -> None:
        """Wait until another process's claim goes away or goes stale; the first wait of a call is logged."""
        def announce(info):
            if not waited:
                log.info("waiting for %s:%s computing %s", info.get("host", "?"), info.get("pid", "?"),
                         info.get("what") or claim_path)
            waited.append(info)
        wait_until_free(claim_path, poll=self.poll_s, on_wait=announce)

    def _get_or_create(self, stage: str, slice_, write: Callable[[Path], None]) -> tuple[Path, str]:
        claim_path = self.entry_dir(stage, slice_).with_suffix(".claim")
        how, waited = "cache", []
        while True:
            hit = self.lookup(stage, slice_)
            if hit is not None:
                return hit, how
            how = "other"  # from now on, an entry that appears was computed by someone else
            claim = Claim.acquire(claim_path, what=f"{stage} {claim_path.stem}")
            if claim is None:
                self._wait(claim_path, waited)
                continue
            with claim:
                hit = self.lookup(stage, slice_)
                return (hit, how) if hit is not None else (self.store(stage, slice_, write), "computed")

    def get_or_create(self, stage: str, slice_, write: Callable[[Path], None]) -> tuple[Path, str]:
        """(entry folder, how): "computed" by this process, found in the "cache", or computed by an
        "other" process while this one waited."""
        with self._writing():
            entry, how = self._get_or_create(stage, slice_, write)
        self._count(stage, "cached" if how == "cache" else how)
        if how != "computed":
            log.info("stage '%s': reusing %s result %s", stage, "cached" if how == "cache" else "another process's",
                     entry)
        return entry, how

    # ------------------------------------------------------------------ arrays of per-sample scores

    def array(self, stage: str, slice_, n_items: int, compute: Callable[[int, int], np.ndarray],
              chunk_size: int = 1024, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """An array over ``n_items`` items, computed ``chunk_size`` items at a time by
        ``compute(start, end)``. Finished chunks persist, so an interrupted computation resumes, and
        concurrent processes share the work: each computes the chunks it can claim, then waits for the
        ones claimed by others. ``counts[stage]`` counts chunks."""
        with self._writing():
            return self._array(stage, slice_, n_items, compute, chunk_size, progress)

    def _array(self, stage: str, slice_, n_items: int, compute, chunk_size: int, progress) -> np.ndarray:
        spans = [(s, min(s + chunk_size, n_items)) for s in range(0, n_items, chunk_size)]
        entry = self.lookup(stage, slice_)
        if entry is not None:
            log.info("scores '%s': reusing cached %s", stage, entry)
            self._count(stage, "cached", len(spans))
            return np.load(entry / "scores.npy")
        partial = self.entry_dir(stage, slice_).with_suffix(".partial")
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write_text(partial / "config.json", json.dumps(to_plain(slice_), default=str))
        chunks, busy, waited = {}, [], []
        for wait, todo in ((False, spans), (True, busy)):
            for span in todo:
                chunk, how = self._chunk(stage, slice_, partial, span, compute, wait, waited)
                if how == "busy":
                    busy.append(span)
                    continue
                if how == "done":  # another process stored the whole array (and removed the chunks)
                    left = [s for s in spans if s not in chunks]
                    self._count(stage, "other", len(left))
                    if progress:
                        progress(sum(e - s for s, e in left))
                    return np.load(chunk / "scores.npy")
                chunks[span] = chunk
                self._count(stage, how)
                if progress:
                    progress(span[1] - span[0])
        result = np.concatenate([chunks[s] for s in spans]) if spans else np.zeros(0)
        _, how = self._get_or_create(stage, slice_, lambda d: np.save(d / "scores.npy", result))
        if how == "computed":
            shutil.rmtree(partial, ignore_errors=True)
        return result

    def _chunk(self, stage, slice_, partial: Path, span: tuple[int, int], compute, wait: bool, waited: list):
        """One chunk as (array, "cached" | "computed" | "other"), or (None, "busy") when another process
        computes it and ``wait`` is false, or (final entry, "done") when the whole array is stored."""
        start, end = span
        path = partial / f"{start:09d}-{end:09d}.npy"
        claim_path = path.with_suffix(".claim")
        how = "other" if wait else "cached"  # waiting for a chunk: it was claimed by another process
        while True:
            chunk = self._load_chunk(path, end - start)
            if chunk is not None:
                return chunk, how
            how = "other"
            entry = self.lookup(stage, slice_)
            if entry is not None:
                return entry, "done"
            claim = Claim.acquire(claim_path, what=f"{stage} items {start}-{end}")
            if claim is None:
                if not wait:
                    return None, "busy"
                self._wait(claim_path, waited)
                continue
            with claim:
                chunk = self._load_chunk(path, end - start)
                if chunk is not None:
                    return chunk, "other"
                entry = self.lookup(stage, slice_)
                if entry is not None:
                    return entry, "done"
                chunk = np.asarray(compute(start, end))
                if len(chunk) != end - start:
                    raise RuntimeError(f"{stage}: compute({start}, {end}) returned {len(chunk)} items")
                atomic_save_npy(path, chunk)
                return chunk, "computed"

    @staticmethod
    def _load_chunk(path: Path, n: int) -> np.ndarray | None:
        try:
            chunk = np.load(path)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError) as e:
            log.warning("partial chunk %s unreadable (%s): recomputing", path, e)
            return None
        if len(chunk) != n:
            log.warning("partial chunk %s has %d items, not %d: recomputing", path, len(chunk), n)
            return None
        return chunk


# ---------------------------------------------------------------------- command line: ls, gc, verify


def _scan(root: Path) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    """(entries, leftover .tmp/.trash folders, unfinished .partial/.work folders, claim files) below ``root``."""
    entries, leftovers, unfinished, claims = [], [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if MANIFEST in filenames and here != root:
            entries.append(here)
            dirnames.clear()
            continue
        claims += [here / f for f in filenames if f.endswith(".claim")]
        for d in sorted(dirnames):
            if d.startswith(".") and (".tmp" in d or ".trash-" in d):
                leftovers.append(here / d)
            elif d.endswith((".partial", ".work")):
                unfinished.append(here / d)
            else:
                continue
            dirnames.remove(d)
    return sorted(entries), leftovers, unfinished, claims


def _claims_of(path: Path) -> list[Path]:
    """The claims an unfinished folder is written under: a .tmp folder (".<key>.tmp...") and a .work one
    (the recovery checkpoints of "<key>", paser.stages.recover) under their entry's, a .partial one under its chunks'."""
    if path.name.endswith(".partial"):
        return list(path.glob("*.claim"))
    if path.name.endswith(".work"):
        return [path.with_suffix(".claim")]
    return [path.with_name(path.name[1:].split(".tmp")[0] + ".claim")]


def _writer_gone(path: Path) -> bool:
    """A .tmp folder whose writer (named in it by ``store``: ".<key>.tmp-<pid>@<host>-<random>") ran on this
    host and is not running any more."""
    pid, _, host = path.name.partition(".tmp-")[2].rpartition("-")[0].partition("@")
    return host == HOST and pid.isdigit() and not pid_exists(int(pid))


def _stats(path: Path) -> list[os.stat_result]:
    """lstat of ``path`` and of everything below it, skipping what vanishes meanwhile."""
    out = []
    for p in [path, *path.rglob("*")]:
        try:
            out.append(p.lstat())
        except FileNotFoundError:
            pass
    return out


def _size(path: Path) -> int:
    return sum(st.st_size for st in _stats(path) if stat.S_ISREG(st.st_mode))


def _newest_mtime(path: Path) -> float:
    return max((st.st_mtime for st in _stats(path)), default=0.0)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _last_used(path: Path, manifest: dict | None) -> float:
    """When the entry was last hit, else when it was created."""
    try:
        return (path / LAST_USED).stat().st_mtime
    except FileNotFoundError:
        return (manifest or {}).get("created") or (path / MANIFEST).stat().st_mtime


def _summary(config, width: int = 60) -> str:
    """The components (``_target_``) and models (``name``) a key names, e.g. 'smollm2-135m,Wanda'."""
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("_target_", "name") and isinstance(v, str):
                    found.append(v.rsplit(".", 1)[-1])
                else:
                    walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(config)
    text = ",".join(dict.fromkeys(found)) or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _code_records(obj, under_code: bool = False):
    """The ``{"hash", "modules"}`` dicts found below keys named "code"."""
    if isinstance(obj, dict):
        if under_code and {"hash", "modules"} <= obj.keys():
            yield obj
            return
        for k, v in obj.items():
            yield from _code_records(v, under_code or k == "code")
    elif isinstance(obj, list):
        for v in obj:
            yield from _code_records(v, under_code)


def _unreachable(config) -> str | None:
    """Why no current code computes this key (its recorded code hash differs from today's), or None."""
    for record in _code_records(config):
        modules = record["modules"]
        if not isinstance(modules, list) or code_hash_of_modules(modules) != record["hash"]:
            return f"code changed ({', '.join(map(str, modules))[:60]})"
    return None


def _cmd_ls(root: Path, args) -> None:
    entries = _scan(root)[0]
    rows = [("stage", "key", "summary", "size", "created", "last used")]
    total = 0
    for path in entries:
        manifest = _read_manifest(path) or {}
        size = _size(path)
        total += size
        used = (path / LAST_USED).stat().st_mtime if (path / LAST_USED).exists() else None
        rows.append((str(path.parent.relative_to(root)), path.name, _summary(manifest.get("config")),
                     _human(size), _when(manifest.get("created")), _when(used)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(entries)} entries, {_human(total)}")


def _cmd_gc(root: Path, args) -> None:
    entries, leftovers, unfinished, claims = _scan(root)
    now = time.time()
    max_age = (args.older_than if args.older_than is not None else PARTIAL_MAX_AGE_DAYS) * 86400
    doomed = []  # (path, reason)
    for path in entries:
        manifest = _read_manifest(path)
        reason = "unreadable manifest" if manifest is None else _unreachable(manifest.get("config"))
        if reason is None and args.older_than is not None and now - _last_used(path, manifest) > max_age:
            reason = f"unused for more than {args.older_than:g} days"
        live, gone = _leases(path, now)
        if reason and live:
            print(f"kept {path.relative_to(root)} ({reason}): in use by {', '.join(live)}")
        elif reason:
            doomed.append((path, reason))
        if not args.dry_run:
            for lease in gone:
                lease.unlink(missing_ok=True)
    doomed += [(p, "removed entry") for p in leftovers if ".trash-" in p.name]
    for path in [p for p in leftovers if ".trash-" not in p.name] + unfinished:
        if ".tmp" in path.name and _writer_gone(path):
            doomed.append((path, "unfinished, its writer is gone"))
        elif not any(c.exists() and not is_stale(c) for c in _claims_of(path)) and \
                now - _newest_mtime(path) > max_age:
            doomed.append((path, "unfinished, abandoned"))
    freed = 0
    for path, reason in doomed:
        size = _size(path)
        if not args.dry_run and not _remove(path, unless=lambda moved: bool(_leases(moved, now)[0])):
            continue  # leased meanwhile, or removed by another process
        freed += size
        print(f"{'would remove' if args.dry_run else 'removed'} {path.relative_to(root)} ({_human(size)}): {reason}")
    stale = [c for c in claims if is_stale(c)]
    if not args.dry_run:
        stale = [c for c in stale if remove_stale(c)]
    print(f"{'would free' if args.dry_run else 'freed'} {_human(freed)} in {len(doomed)} folders"
          f" ({len(stale)} stale claims)")


def _cmd_verify(root: Path, args) -> int:
    """1 when an entry was damaged (and removed), else 0."""
    entries = _scan(root)[0]
    damaged = 0
    for path in entries:
        problem = _problem(path, recheck=True)
        if problem is not None:
            damaged += 1
            print(f"damaged: {path.relative_to(root)}: {problem} (removed)")
            _remove(path)
    print(f"{len(entries)} entries verified, {damaged} damaged")
    return 1 if damaged else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paser.cache", description="Inspect and prune the stage cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "ls": (_cmd_ls, "list the entries: stage, key, what the key names, size, created, last used"),
        "gc": (_cmd_gc, ("remove entries no current code computes and old unused ones (unless a live process "
                         "looked them up), and abandoned leftovers")),
        "verify": (_cmd_verify, "check every byte of every entry; remove the damaged ones (exit status 1 if any)"),
    }
    for name, (_, help_) in commands.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--root", default=os.environ.get("PASER_CACHE_DIR", ".cache/paser"),
                       help="the cache folder (default: $PASER_CACHE_DIR or .cache/paser)")
        if name == "gc":
            p.add_argument("--older-than", type=float, metavar="DAYS",
                           help="also remove entries not used for DAYS days (and leftovers older than that, "
                                f"default {PARTIAL_MAX_AGE_DAYS:g} days)")
            p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"no cache at {root}: nothing to do", file=sys.stderr)
        return 0
    try:
        return commands[args.command][0](root, args) or 0
    except OSError as e:  # e.g. no permission to remove another user's entry
        print(f"paser.cache {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
