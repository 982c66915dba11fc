"""Claims: "this process is computing X", so that other processes sharing the cache wait instead of
computing X again.

A claim is a small JSON file ``{host, pid, started, what, token}`` created with ``O_CREAT | O_EXCL``, so
exactly one process creates it. While it is held, a daemon thread refreshes its mtime every
``stale_after / 5`` seconds. A claim is stale, and may be taken over, when its mtime is older than
``stale_after`` seconds (default 600, env ``PASER_CLAIM_STALE_S``; generous, so that clock skew between
cluster nodes and file-system hiccups do not break live claims), or at once when it was made on this
host by a process that no longer exists.

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
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

DEFAULT_STALE_S = 600.0
MUTEX_STALE_S = 30.0
HOST = socket.gethostname()


def default_stale_after() -> float:
    return float(os.environ.get("PASER_CLAIM_STALE_S", DEFAULT_STALE_S))


def holder(path) -> dict | None:
    """The claim's JSON content; None when there is no claim. ``{}`` while its creator has not written it
    yet (or it is unreadable): held, by someone unknown."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def is_stale(path, stale_after: float | None = None) -> bool:
    """True when a claim exists and its holder is gone: no heartbeat for ``stale_after`` seconds, or its
    process on this host has exited."""
    stale_after = default_stale_after() if stale_after is None else stale_after
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return False
    if age > stale_after:
        return True
    info = holder(path) or {}
    return info.get("host") == HOST and isinstance(info.get("pid"), int) and not _pid_exists(info["pid"])


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
    with os.fdopen(fd, "w") as f:
        f.write(content)
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
        # Lost the race, or the holder is gone: then remove its claim and race again for the place.
        if not _create(path, content, make_parents=True) and not (
                is_stale(path, stale_after) and remove_stale(path, stale_after)
                and _create(path, content, make_parents=True)):
            return None
        return cls(path, token, stale_after)

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
        if not mutex.acquire(wait=True):
            return  # its folder was removed, with the claim
        try:
            if self._is_mine():
                self.path.unlink()
        finally:
            mutex.release()

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
