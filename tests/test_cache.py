"""The stage cache: keys from config slices, atomic entries, damaged entries recomputed (every byte read at
a process's first lookup), chunk resume, concurrent processes sharing work, leases that keep gc off the
entries live runs looked up, and the ls/gc/verify commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import paser.cache
from paser.cache import LEASE, LEASE_GRACE_S, SAMPLE_BLOCK, SAMPLED_IN_FULL, StageCache, config_hash, sample_offsets
from paser.claims import HOST, Claim
from paser.fingerprint import code_version

ROOT = Path(__file__).resolve().parents[1]


def test_key_depends_on_content_not_order_or_container():
    a = config_hash({"x": 1, "y": {"z": [1, 2]}})
    assert a == config_hash(OmegaConf.create({"y": {"z": [1, 2]}, "x": 1}))
    assert a != config_hash({"x": 2, "y": {"z": [1, 2]}})


def test_store_then_lookup_and_manifest(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.store("stage", {"k": 1}, lambda d: (d / "a.txt").write_text("hello"))
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["config"] == {"k": 1} and manifest["versions"]["torch"] and manifest["created"] > 0
    assert manifest["files"] == {"a.txt": {"size": 5, "sha256": manifest["files"]["a.txt"]["sha256"],
                                           "sampled": manifest["files"]["a.txt"]["sha256"]}}
    assert cache.lookup("stage", {"k": 1}) == entry and (entry / ".last_used").is_file()
    assert (entry / f"{LEASE}{os.getpid()}@{HOST}").is_file()
    assert cache.lookup("stage", {"k": 1}) == entry  # the marker and the lease are not part of the content
    assert cache.lookup("stage", {"k": 2}) is None


def test_failed_write_leaves_nothing_behind(tmp_path):
    cache = StageCache(tmp_path)

    def broken(d):
        (d / "half.bin").write_bytes(b"123")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.store("stage", {"k": 1}, broken)
    assert cache.lookup("stage", {"k": 1}) is None
    assert list((tmp_path / "stage").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_file", "old_format"])
def test_damaged_entry_is_detected_and_removed(tmp_path, damage, caplog):
    cache = StageCache(tmp_path)
    entry = cache.store("stage", {"k": 1}, lambda d: (d / "w.bin").write_bytes(bytes(range(200))))
    if damage == "truncate":
        (entry / "w.bin").write_bytes(bytes(range(100)))
    elif damage == "flip":
        (entry / "w.bin").write_bytes(bytes([1]) + bytes(range(1, 200)))
    elif damage == "delete_manifest":
        (entry / "manifest.json").unlink()
    elif damage == "old_format":  # files mapped to a bare sha256: recomputed rather than trusted
        (entry / "manifest.json").write_text(json.dumps({"files": {"w.bin": "0" * 64}}))
    else:
        (entry / "w.bin").unlink()
    assert cache.lookup("stage", {"k": 1}) is None
    assert "damaged" in caplog.text and not entry.exists()


def test_chunked_array_resumes_after_interruption(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def compute(start, end):
        calls.append((start, end))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed in the third chunk
        return np.arange(start, end, dtype=float)

    with pytest.raises(KeyboardInterrupt):
        cache.array("scores/x", {"k": 1}, 10, compute, chunk_size=4)
    calls.clear()
    result = cache.array("scores/x", {"k": 1}, 10, lambda s, e: (calls.append((s, e)), np.arange(s, e, dtype=float))[1],
                         chunk_size=4)
    assert calls == [(8, 10)]  # the two finished chunks were not recomputed
    assert result.tolist() == list(range(10))
    calls.clear()
    again = cache.array("scores/x", {"k": 1}, 10, lambda s, e: calls.append(1), chunk_size=4)
    assert calls == [] and again.tolist() == list(range(10))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _big_entry(cache, key):
    data = os.urandom(9 << 20)
    assert len(data) > SAMPLED_IN_FULL
    return cache.store("stage", key, lambda d: (d / "big.bin").write_bytes(data)), len(data)


def test_cheap_check_detects_a_flip_in_a_sampled_block_of_a_large_file(tmp_path, caplog):
    cache = StageCache(tmp_path)
    entry, size = _big_entry(cache, {"k": 1})
    _flip(entry / "big.bin", sample_offsets(size)[3] + 100)
    assert cache.lookup("stage", {"k": 1}) is None and "damaged" in caplog.text and not entry.exists()


def _unsampled_offset(size):
    offset = sample_offsets(size)[1] + SAMPLE_BLOCK + 1000
    assert all(not o <= offset < o + SAMPLE_BLOCK for o in sample_offsets(size))
    return offset


def test_a_flip_between_the_sampled_blocks_is_found_at_a_processs_first_lookup(tmp_path, caplog):
    cache = StageCache(tmp_path)
    entry, size = _big_entry(cache, {"k": 1})
    _flip(entry / "big.bin", _unsampled_offset(size))
    assert cache.lookup("stage", {"k": 1}) is None
    assert "content hash of big.bin does not match" in caplog.text and not entry.exists()
    assert cache.get_or_create("stage", {"k": 1}, lambda d: (d / "big.bin").write_bytes(b"again"))[1] == "computed"


def test_later_lookups_read_every_byte_again_only_when_a_file_changed(tmp_path, monkeypatch, caplog):
    cache = StageCache(tmp_path)
    entry, size = _big_entry(cache, {"k": 1})
    reads = []
    sha256 = paser.cache.file_sha256
    monkeypatch.setattr(paser.cache, "file_sha256", lambda path: (reads.append(path.name), sha256(path))[1])
    assert cache.lookup("stage", {"k": 1}) == entry and reads == ["big.bin"]
    assert StageCache(tmp_path).lookup("stage", {"k": 1}) == entry and reads == ["big.bin"]  # this process read it
    _flip(entry / "big.bin", _unsampled_offset(size))
    assert cache.lookup("stage", {"k": 1}) is None and "damaged" in caplog.text


def test_storing_twice_keeps_the_first_intact_entry(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.store("stage", {"k": 1}, lambda d: (d / "a.txt").write_text("first"))
    before = (entry.stat().st_ino, (entry / "a.txt").stat().st_ino, (entry / "manifest.json").stat().st_mtime_ns)
    assert cache.store("stage", {"k": 1}, lambda d: (d / "a.txt").write_text("second")) == entry
    after = (entry.stat().st_ino, (entry / "a.txt").stat().st_ino, (entry / "manifest.json").stat().st_mtime_ns)
    assert after == before and (entry / "a.txt").read_text() == "first"
    assert [p.name for p in (tmp_path / "stage").iterdir()] == [entry.name]  # no temporary folder left


def test_storing_over_a_damaged_entry_replaces_it(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.store("stage", {"k": 1}, lambda d: (d / "a.txt").write_text("first"))
    (entry / "a.txt").write_text("firs")
    assert cache.store("stage", {"k": 1}, lambda d: (d / "a.txt").write_text("second")) == entry
    assert (entry / "a.txt").read_text() == "second" and cache.lookup("stage", {"k": 1}) == entry
    assert [p.name for p in (tmp_path / "stage").iterdir()] == [entry.name]  # the trash is gone too


def test_get_or_create_reports_how_and_counts(tmp_path):
    cache = StageCache(tmp_path)
    calls = []
    write = lambda d: (calls.append(1), (d / "a.txt").write_text("x"))
    entry, how = cache.get_or_create("stage", {"k": 1}, write)
    assert how == "computed" and (entry / "a.txt").read_text() == "x"
    assert cache.get_or_create("stage", {"k": 1}, write) == (entry, "cache") and calls == [1]
    assert cache.counts == {"stage": {"computed": 1, "cached": 1, "other": 0}}
    assert not entry.with_suffix(".claim").exists()


def _dead_claim(path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": HOST, "pid": proc.pid, "started": 0, "what": "killed"}))


def test_claims_of_a_dead_process_are_taken_over(tmp_path):
    cache = StageCache(tmp_path, poll_s=0.01)
    entry = cache.entry_dir("stage", {"k": 1})
    _dead_claim(entry.with_suffix(".claim"))
    assert cache.get_or_create("stage", {"k": 1}, lambda d: (d / "a").write_text(""))[1] == "computed"
    partial = cache.entry_dir("scores/x", {"k": 1}).with_suffix(".partial")
    _dead_claim(partial / "000000000-000000004.claim")
    result = cache.array("scores/x", {"k": 1}, 6, lambda s, e: np.arange(s, e), chunk_size=4)
    assert result.tolist() == list(range(6)) and cache.counts["scores/x"]["computed"] == 2


def test_claimed_elsewhere_only_while_a_live_holder_computes_a_missing_entry(tmp_path):
    cache = StageCache(tmp_path)
    claim_path = cache.entry_dir("stage", {"k": 1}).with_suffix(".claim")
    assert not cache.claimed_elsewhere("stage", {"k": 1})  # nobody
    claim = Claim.acquire(claim_path, what="another job")
    assert cache.claimed_elsewhere("stage", {"k": 1})
    claim.release()
    _dead_claim(claim_path)
    assert not cache.claimed_elsewhere("stage", {"k": 1})  # its holder is gone: taking it over is no wait
    claim_path.unlink()
    cache.store("stage", {"k": 1}, lambda d: (d / "a").write_text(""))
    claim = Claim.acquire(claim_path, what="a late claim")
    assert not cache.claimed_elsewhere("stage", {"k": 1})  # the entry is there to read
    claim.release()


def test_waiting_reader_falls_back_to_the_final_entry_when_chunks_vanish(tmp_path):
    cache = StageCache(tmp_path, poll_s=0.01)
    key = {"k": 1}
    partial = cache.entry_dir("scores/x", key).with_suffix(".partial")
    other = Claim.acquire(partial / "000000000-000000005.claim")  # "another process" computes chunk 0-5
    calls, out = [], {}
    reader = threading.Thread(target=lambda: out.update(result=cache.array(
        "scores/x", key, 10, lambda s, e: (calls.append((s, e)), np.zeros(e - s))[1], chunk_size=5)))
    reader.start()
    while not (partial / "000000005-000000010.npy").exists():
        time.sleep(0.01)
    # the other process finishes: stores the whole array and removes the chunks
    StageCache(tmp_path).store("scores/x", key, lambda d: np.save(d / "scores.npy", np.arange(10.0)))
    shutil.rmtree(partial)
    reader.join(10)
    other.release()
    assert calls == [(5, 10)] and out["result"].tolist() == list(range(10))
    assert cache.counts["scores/x"] == {"computed": 1, "cached": 0, "other": 1}


# ------------------------------------------------------------------ two real processes at once

PREAMBLE = """
import json, os, sys, time
from pathlib import Path
import numpy as np
from paser.cache import StageCache
root, log, go, me = sys.argv[1:5]
Path(go + ".ready" + me).touch()
while not os.path.exists(go):
    time.sleep(0.005)
cache = StageCache(root, poll_s=0.05)
def note(text):
    with open(log, "a") as f:
        f.write(text + "\\n")
"""

ARRAY_WORKER = PREAMBLE + """
def compute(s, e):
    time.sleep(0.2)
    note(f"{s}-{e} {os.getpid()}")
    return np.arange(s, e) * 1.5
result = cache.array("scores/x", {"k": 1}, 37, compute, chunk_size=5)
print(json.dumps({"array": result.tolist(), "counts": cache.counts["scores/x"]}))
"""

CREATE_WORKER = PREAMBLE + """
def write(d):
    time.sleep(1.0)
    note(str(os.getpid()))
    (d / "out.txt").write_text("result")
entry, how = cache.get_or_create("stage", {"k": 1}, write)
print(json.dumps({"how": how, "text": (entry / "out.txt").read_text(), "counts": cache.counts["stage"]}))
"""


def _run_together(tmp_path, script, n=2):
    """Start ``n`` processes running ``script`` and release them at the same moment; their JSON outputs."""
    root, log, go = tmp_path / "cache", tmp_path / "log.txt", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(log), str(go), str(i)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.time() + 60
    while not all(Path(f"{go}.ready{i}").exists() for i in range(n)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs], log.read_text().splitlines()


def test_two_processes_share_the_chunks_of_one_array(tmp_path):
    (a, b), lines = _run_together(tmp_path, ARRAY_WORKER)
    spans = [f"{s}-{min(s + 5, 37)}" for s in range(0, 37, 5)]
    assert sorted(line.split()[0] for line in lines) == sorted(spans)  # every chunk computed exactly once
    assert len({line.split()[1] for line in lines}) == 2  # by both processes
    assert a["array"] == b["array"] == (np.arange(37) * 1.5).tolist()
    assert a["counts"]["computed"] + b["counts"]["computed"] == len(spans)
    assert all(sum(c["counts"].values()) == len(spans) for c in (a, b))
    assert not list((tmp_path / "cache" / "scores").glob("*.partial"))


def test_two_processes_create_one_entry_once(tmp_path):
    (a, b), lines = _run_together(tmp_path, CREATE_WORKER)
    assert len(lines) == 1 and a["text"] == b["text"] == "result"
    assert sorted([a["how"], b["how"]]) == ["computed", "other"]
    assert sorted([a["counts"], b["counts"]], key=lambda c: c["other"]) == [
        {"computed": 1, "cached": 0, "other": 0}, {"computed": 0, "cached": 0, "other": 1}]


# ------------------------------------------------------------------ python -m paser.cache ls | gc | verify


def _cli(root, *args, status=0):
    out = subprocess.run([sys.executable, "-m", "paser.cache", *args, "--root", str(root)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == status, out.stderr
    return out.stdout


def test_ls_lists_entries_with_what_their_key_names(tmp_path):
    cache = StageCache(tmp_path)
    key = {"model": {"name": "tiny-llama"}, "pruner": {"_target_": "paser.pruners.wanda.Wanda"}}
    entry = cache.store("pruned", key, lambda d: (d / "w.bin").write_bytes(b"0" * (3 << 20)))
    out = _cli(tmp_path, "ls")
    row = next(line for line in out.splitlines() if entry.name in line)
    assert row.startswith("pruned") and "tiny-llama,Wanda" in row and "3.0 MiB" in row
    assert "1 entries" in out


def test_gc_removes_entries_of_changed_code_and_unused_ones(tmp_path):
    cache = StageCache(tmp_path)
    write = lambda d: (d / "a.txt").write_text("x")
    stale_code = cache.store("s", {"pruner": {"code": {"hash": "0" * 16, "modules": ["paser.claims"]}}}, write)
    gone_module = cache.store("s", {"code": {"hash": "0" * 16, "modules": ["paser.no_such_module"]}}, write)
    current = cache.store("s", {"pruner": {"code": code_version("paser.claims")}, "n": 1}, write)
    unused = cache.store("s", {"n": 2}, write)
    cache.lookup("s", {"n": 2})
    _lease_of_a_dead_process(unused)
    old = time.time() - 10 * 86400
    os.utime(unused / ".last_used", (old, old))
    abandoned = tmp_path / "s" / ".abc.tmpxyz"
    abandoned.mkdir()
    os.utime(abandoned, (old, old))
    fresh_partial = tmp_path / "s" / "def.partial"
    fresh_partial.mkdir()

    assert "would remove" in _cli(tmp_path, "gc", "--dry-run") and stale_code.exists()
    out = _cli(tmp_path, "gc")
    assert not stale_code.exists() and not gone_module.exists() and not abandoned.exists()
    assert current.exists() and unused.exists() and fresh_partial.exists()
    assert "code changed" in out and "freed" in out
    out = _cli(tmp_path, "gc", "--older-than", "5")
    assert not unused.exists() and current.exists() and "unused for more than 5 days" in out


def test_verify_removes_entries_damaged_outside_the_sampled_blocks(tmp_path):
    cache = StageCache(tmp_path)
    entry, size = _big_entry(cache, {"k": 1})
    intact = cache.store("stage", {"k": 2}, lambda d: (d / "a.txt").write_text("x"))
    _flip(entry / "big.bin", _unsampled_offset(size))
    out = _cli(tmp_path, "verify", status=1)
    assert "damaged: stage/" + entry.name in out and "2 entries verified, 1 damaged" in out
    assert not entry.exists() and intact.exists()
    assert "1 entries verified, 0 damaged" in _cli(tmp_path, "verify", status=0)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lease_of_a_dead_process(entry):
    """This process's lease on ``entry`` as if a process that has exited had taken it."""
    os.replace(entry / f"{LEASE}{os.getpid()}@{HOST}", entry / f"{LEASE}{_dead_pid()}@{HOST}")


def test_gc_older_than_0_leaves_the_entry_a_live_run_looked_up_and_has_not_loaded(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.store("pruned", {"n": 1}, lambda d: (d / "model.bin").write_text("weights"))
    assert cache.lookup("pruned", {"n": 1}) == entry
    _cli(tmp_path, "gc", "--older-than", "0")
    assert (entry / "model.bin").read_text() == "weights"


def test_gc_leaves_entries_leased_by_live_runs(tmp_path):
    """A run looked its pruned model up and loads it later: gc --older-than 0 must not remove it meanwhile.
    A lease counts while its process runs here, or for LEASE_GRACE_S when it was taken on another host."""
    cache = StageCache(tmp_path)
    write = lambda d: (d / "a.txt").write_text("x")
    mine, theirs, old_theirs, dead = (cache.store("s", {"n": n}, write) for n in range(4))
    for n in range(4):
        assert cache.lookup("s", {"n": n}) is not None  # this (live) process leases all four
    for entry, age in ((theirs, 60), (old_theirs, LEASE_GRACE_S + 60)):
        lease = entry / f"{LEASE}4242@another-node"
        os.replace(entry / f"{LEASE}{os.getpid()}@{HOST}", lease)
        os.utime(lease, (time.time() - age, time.time() - age))
    _lease_of_a_dead_process(dead)

    out = _cli(tmp_path, "gc", "--older-than", "0")
    assert mine.exists() and theirs.exists() and not old_theirs.exists() and not dead.exists()
    assert f"in use by {os.getpid()}@{HOST}" in out and "in use by 4242@another-node" in out
    _lease_of_a_dead_process(mine)  # the run ended
    _cli(tmp_path, "gc", "--older-than", "0")
    assert not mine.exists() and not list(mine.parent.glob(".*trash*"))


def test_gc_removes_the_leases_of_exited_processes_from_kept_entries(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.store("s", {"n": 1}, lambda d: (d / "a.txt").write_text("x"))
    cache.lookup("s", {"n": 1})
    _lease_of_a_dead_process(entry)
    cache.lookup("s", {"n": 1})
    _cli(tmp_path, "gc")
    assert [p.name for p in entry.glob(LEASE + "*")] == [f"{LEASE}{os.getpid()}@{HOST}"]


def test_gc_puts_back_an_entry_leased_while_it_was_being_removed(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    entry = cache.store("s", {"n": 1}, lambda d: (d / "a.txt").write_text("x"))
    replace = os.replace

    def lookup_meanwhile(src, dst):  # gc moves the entry aside just as a live run leases it
        if Path(src) == entry:
            (entry / f"{LEASE}{os.getpid()}@{HOST}").touch()
        replace(src, dst)

    monkeypatch.setattr(paser.cache.os, "replace", lookup_meanwhile)
    paser.cache.main(["gc", "--older-than", "0", "--root", str(tmp_path)])
    monkeypatch.undo()
    assert cache.lookup("s", {"n": 1}) == entry and (entry / "a.txt").read_text() == "x"


def test_gc_removes_temporary_folders_of_gone_writers_at_once(tmp_path):
    cache = StageCache(tmp_path)
    seen = []
    cache.store("s", {"n": 1}, lambda d: seen.append(d.name))
    assert f".tmp-{os.getpid()}@{HOST}-" in seen[0]  # store names its temporary folder after its writer
    key = config_hash({"n": 2})
    killed = tmp_path / "s" / f".{key}.tmp-{_dead_pid()}@{HOST}-abc123"
    writing = tmp_path / "s" / f".{key}.tmp-{os.getpid()}@{HOST}-def456"
    elsewhere = tmp_path / "s" / f".{key}.tmp-4242@another-node-ghi789"
    for folder in (killed, writing, elsewhere):
        folder.mkdir()
        (folder / "w.bin").write_bytes(b"0" * 100)
    out = _cli(tmp_path, "gc")
    assert not killed.exists() and writing.exists() and elsewhere.exists()
    assert "its writer is gone" in out


def test_gc_removes_old_lora_checkpoints_no_live_run_uses(tmp_path):
    """LoRA checkpoints live in "<adapter key>.work" beside the entry until it is stored (paser.pipeline),
    written under the entry's claim; a killed run's folder is a rerun's resume point until it is old."""
    old = time.time() - 10 * 86400
    work = {}
    for name in ("abandoned", "recent", "running"):
        work[name] = tmp_path / "adapter" / f"{config_hash({name: 1})}.work"
        (work[name] / "checkpoint").mkdir(parents=True)
        (work[name] / "checkpoint" / "adapter.safetensors").write_bytes(b"0" * 100)
    for name in ("abandoned", "running"):
        for p in (work[name], work[name] / "checkpoint", work[name] / "checkpoint" / "adapter.safetensors"):
            os.utime(p, (old, old))
    claim = Claim.acquire(work["running"].with_suffix(".claim"), what="adapter")
    try:
        out = _cli(tmp_path, "gc")
    finally:
        claim.release()
    assert not work["abandoned"].exists() and work["recent"].exists() and work["running"].exists()
    assert "adapter/" + work["abandoned"].name in out
    _cli(tmp_path, "gc", "--older-than", "0")
    assert not work["recent"].exists() and not work["running"].exists()
