"""Claims: "this process is computing X", so that other processes sharing the cache wait instead of
computing X again.

A claim is a small JSON file ``{host, pid, started, what, token}`` created with ``O_CREAT | O_EXCL``, so
exactly one process creates it. While it is held, a daemon thread refreshes its mtime every
``stale_after / 5`` seconds. A claim is stale, and may be taken over, when its mtime is older than
``stale_after`` seconds (default 600, env ``PASER_CLAIM_STALE_S``; generous, so that clock skew between
cluster nodes and file-system hiccups do not break live claims), or at once when its content says its
holder is gone: made on this host by a process that no longer exists, or by this process's PID but not
held by it (a previous life of a restarted container, which got the same PID), or empty or unreadable for
longer than a claim takes to write (a write that failed, e.g. on a full disk).

Why a heartbeat file and not ``flock``: SLURM jobs on different nodes share the cache on NFS or Lustre,
where advisory locks are unreliable (not propagated, or silently local, depending on mount options), and
a lock held by a killed node may never be released. A file with an mtime works on any file system that
has atomic exclusive create and rename, and a crashed holder is recognised by its age.

Removing a claim (a takeover of a stale one, or a release) happens under a short-lived mutex file
``<claim>.takeover``, itself created with ``O_EXCL``: without it, a process that judged a claim stale could
remove the fresh claim another process had just created in its place, and both would hold it. A mutex
left by a process killed inside that critical section (a few file operations) is broken after
``MUTEX_STALE_S``.

Claims only save work; correctness never depends on them. If two processes ever compute the same thing
(a claim judged stale while its holder is only very slow), the cache keeps one intact result.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Self

from paser.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_STALE_S = 600.0
MUTEX_STALE_S = 30.0
UNWRITTEN_GRACE_S = 10.0  # an empty claim younger than this may be one whose creator is writing it now
HOST = socket.gethostname()
_HELD: set[str] = set()  # tokens of the claims this process holds


def default_stale_after() -> float:
    """``PASER_CLAIM_STALE_S`` if set, else 600: it must be a number of seconds > 0 (the heartbeat runs
    every fifth of it, so 0 or less would spin)."""
    raw = os.environ.get("PASER_CLAIM_STALE_S")
    if raw is None:
        return DEFAULT_STALE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"PASER_CLAIM_STALE_S={raw!r} is not allowed: give a number of seconds > 0 "
                          f"(default {DEFAULT_STALE_S:g}), or unset it")
    return value


def holder(path) -> dict | None:
    """The claim's JSON content; None when there is no claim. ``{}`` while its creator has not written it
    yet (or it is unreadable): held, by someone unknown, until it is older than ``UNWRITTEN_GRACE_S``."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _holder_gone(info: dict) -> bool:
    """The claim was made on this host by a process that is not running, or by this process's PID in a
    previous life (a restarted container): a claim this process holds has its token in ``_HELD``."""
    if info.get("host") != HOST or not isinstance(info.get("pid"), int):
        return False
    if info["pid"] == os.getpid():
        return info.get("token") not in _HELD
    return not pid_exists(info["pid"])


def is_stale(path, stale_after: float | None = None) -> bool:
    """True when a claim exists and its holder is gone: no heartbeat for ``stale_after`` seconds, its
    content says so (``_holder_gone``), or it has been empty or unreadable for ``UNWRITTEN_GRACE_S``."""
    stale_after = default_stale_after() if stale_after is None else stale_after
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if age > stale_after:
        return True
    info = holder(path)
    if info is None:
        return False
    return age > UNWRITTEN_GRACE_S if not info else _holder_gone(info)


def _create(path: Path, content: str, make_parents: bool = False) -> bool:
    """Create ``path`` unless it exists. ``make_parents``: also (re)create its folder, which another
    process may remove meanwhile (a finished computation's folder of chunks)."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not make_parents:
                raise
            path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
    except OSError:  # e.g. a full disk: leave no empty claim behind
        path.unlink(missing_ok=True)
        raise
    return True


class _Mutex:
    """The ``<claim>.takeover`` file guarding removals of a claim."""

    def __init__(self, claim: Path):
        self.path = claim.with_name(claim.name + ".takeover")

    def acquire(self, wait: bool) -> bool:
        """False when ``wait`` is false and another process holds it, or when the claim's folder is gone
        (then so is the claim: nothing to guard)."""
        while True:
            try:
                if _create(self.path, f"{HOST}:{os.getpid()}"):
                    return True
            except FileNotFoundError:
                return False
            try:
                if time.time() - os.stat(self.path).st_mtime > MUTEX_STALE_S:
                    self.path.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if not wait:
                return False
            time.sleep(0.01)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


class Claim:
    """A held claim; release it (or use it as a context manager) when the work is done."""

    def __init__(self, path: Path, token: str, stale_after: float):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, args=(stale_after / 5,), daemon=True,
                                        name=f"claim heartbeat {path.name}")
        self._thread.start()

    @classmethod
    def acquire(cls, path, what: str = "", stale_after: float | None = None) -> Claim | None:
        """The claim, or None when a live process holds it (or is taking it over right now)."""
        path = Path(path)
        stale_after = default_stale_after() if stale_after is None else stale_after
        token = uuid.uuid4().hex
        content = json.dumps({"host": HOST, "pid": os.getpid(), "started": time.time(), "what": what,
                              "token": token})
        _HELD.add(token)  # before the claim exists: another thread of this process must not judge it stale
        won = False
        try:
            # Lost the race, or the holder is gone: then remove its claim and race again for the place.
            won = _create(path, content, make_parents=True) or (
                is_stale(path, stale_after) and remove_stale(path, stale_after)
                and _create(path, content, make_parents=True))
        finally:
            if not won:
                _HELD.discard(token)
        return cls(path, token, stale_after) if won else None

    def _is_mine(self) -> bool:
        return (holder(self.path) or {}).get("token") == self.token

    def _heartbeat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self._is_mine():
                log.warning("claim %s was removed, or taken over by another process that judged it stale",
                            self.path)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        mutex = _Mutex(self.path)
        if mutex.acquire(wait=True):  # else its folder was removed, with the claim
            try:
                if self._is_mine():
                    self.path.unlink()
            finally:
                mutex.release()
        _HELD.discard(self.token)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale(path, stale_after: float | None = None) -> bool:
    """Remove the claim at ``path`` if it is stale; False if it is not, or is being taken over now."""
    path = Path(path)
    mutex = _Mutex(path)
    if not mutex.acquire(wait=False):
        return False
    try:
        # Only mutex holders remove claims, so the file judged here is the one removed.
        if not is_stale(path, stale_after):
            return False
        info = holder(path) or {}
        log.info("removing stale claim %s of %s:%s", path, info.get("host"), info.get("pid"))
        path.unlink(missing_ok=True)
        return True
    finally:
        mutex.release()


def wait_until_free(path, poll: float = 1.0, on_wait=None, stale_after: float | None = None) -> None:
    """Return once the claim at ``path`` is gone or stale; ``on_wait(holder)`` is called once if it is
    not free at the first look."""
    first = True
    while os.path.exists(path) and not is_stale(path, stale_after):
        if first and on_wait is not None:
            on_wait(holder(path) or {})
        first = False
        time.sleep(poll)
