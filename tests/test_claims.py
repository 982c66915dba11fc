"""Claims between processes: a live holder blocks, a dead or silent one is taken over (and one whose content
says it is gone, at once), and of several processes racing for a stale claim exactly one wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from paser.claims import HOST, UNWRITTEN_GRACE_S, Claim, default_stale_after, holder, is_stale, wait_until_free
from paser.errors import ConfigError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _fake_claim(path, host, pid, age_s=0.0):
    path.write_text(json.dumps({"host": host, "pid": pid, "started": 0, "what": "x", "token": "theirs"}))
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))


def test_live_claim_blocks_until_released(tmp_path):
    path = tmp_path / "a.claim"
    first = Claim.acquire(path, what="stage a")
    assert first is not None and holder(path)["pid"] == os.getpid() and holder(path)["what"] == "stage a"
    assert Claim.acquire(path) is None and not is_stale(path)
    first.release()
    assert not path.exists()
    with Claim.acquire(path) as again:
        assert again is not None and path.exists()
    assert not path.exists()


def test_claim_of_live_process_elsewhere_blocks(tmp_path):
    path = tmp_path / "a.claim"
    _fake_claim(path, "other-node", 1)
    assert Claim.acquire(path) is None


def test_dead_local_holder_is_taken_over(tmp_path):
    path = tmp_path / "a.claim"
    _fake_claim(path, HOST, _dead_pid())
    assert is_stale(path)
    claim = Claim.acquire(path)
    assert claim is not None and holder(path)["pid"] == os.getpid()
    claim.release()


def test_silent_holder_is_taken_over_after_stale_after(tmp_path):
    path = tmp_path / "a.claim"
    _fake_claim(path, "other-node", 1, age_s=20)
    assert Claim.acquire(path, stale_after=60) is None
    assert Claim.acquire(path, stale_after=10) is not None


def test_heartbeat_keeps_claim_fresh(tmp_path):
    path = tmp_path / "a.claim"
    claim = Claim.acquire(path, stale_after=0.5)
    old = time.time() - 10
    os.utime(path, (old, old))
    time.sleep(0.3)  # the heartbeat runs every 0.1 s
    assert not is_stale(path, stale_after=0.5)
    claim.release()


def test_racing_for_stale_claim_exactly_one_wins(tmp_path):
    dead = _dead_pid()
    for round_ in range(20):
        path = tmp_path / f"{round_}.claim"
        _fake_claim(path, HOST, dead)
        barrier = threading.Barrier(6)
        won = []

        def race(path, barrier, won):
            barrier.wait()
            claim = Claim.acquire(path)
            if claim is not None:
                won.append(claim)

        threads = [threading.Thread(target=race, args=(path, barrier, won)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, f"round {round_}: {len(won)} winners"
        won[0].release()


def test_wait_until_free_returns_on_release_and_reports_holder(tmp_path):
    path = tmp_path / "a.claim"
    claim = Claim.acquire(path, what="w")
    seen = []
    threading.Timer(0.2, claim.release).start()
    start = time.time()
    wait_until_free(path, poll=0.05, on_wait=seen.append)
    assert 0.15 < time.time() - start < 2 and [s["what"] for s in seen] == ["w"]


def _aged(path, age_s):
    old = time.time() - age_s
    os.utime(path, (old, old))


@pytest.mark.parametrize("content", ["", "{\"host\": \"node", "[1, 2]"])
def test_an_empty_or_unreadable_claim_is_stale_without_waiting(tmp_path, content):
    """A claim whose write failed (a full disk) holds nothing: a rerun takes it over at once, without
    waiting the stale time for ``?:?``; only a claim young enough to be being written is left alone."""
    path = tmp_path / "a.claim"
    path.write_text(content)
    assert not is_stale(path)  # its creator may be writing it right now
    _aged(path, UNWRITTEN_GRACE_S + 1)
    assert is_stale(path)
    seen = []
    wait_until_free(path, poll=0.01, on_wait=seen.append)
    assert seen == []
    claim = Claim.acquire(path)
    assert claim is not None and holder(path)["pid"] == os.getpid()
    claim.release()


def test_a_claim_of_this_pid_in_a_previous_life_is_stale(tmp_path):
    """A restarted container: the rerun has the PID its killed predecessor had on this host."""
    path = tmp_path / "a.claim"
    _fake_claim(path, HOST, os.getpid())
    assert is_stale(path)
    claim = Claim.acquire(path, what="rerun")
    assert claim is not None and holder(path)["what"] == "rerun"
    assert not is_stale(path) and Claim.acquire(path) is None  # the claim this process holds now is live
    claim.release()


def test_a_failed_claim_write_leaves_no_empty_claim(tmp_path, monkeypatch):
    import paser.claims

    class FullDisk:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(paser.claims.os, "fdopen", FullDisk)
    with pytest.raises(OSError, match="No space"):
        Claim.acquire(tmp_path / "a.claim")
    assert not (tmp_path / "a.claim").exists()


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf"])
def test_an_invalid_stale_time_is_an_error_naming_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv("PASER_CLAIM_STALE_S", value)
    with pytest.raises(ConfigError, match=f"PASER_CLAIM_STALE_S='{value}'.*> 0"):
        Claim.acquire(tmp_path / "a.claim")
    assert not (tmp_path / "a.claim").exists()


def test_a_valid_stale_time_from_the_environment_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PASER_CLAIM_STALE_S", "5")
    path = tmp_path / "a.claim"
    _fake_claim(path, "other-node", 1, age_s=6)
    assert default_stale_after() == 5.0 and is_stale(path)
