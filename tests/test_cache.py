"""The stage cache: keys from config slices, atomic entries, damaged entries recomputed, chunk resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from paser.cache import StageCache, config_hash


def test_key_depends_on_content_not_order_or_container():
    a = config_hash({"x": 1, "y": {"z": [1, 2]}})
    assert a == config_hash(OmegaConf.create({"y": {"z": [1, 2]}, "x": 1}))
    assert a != config_hash({"x": 2, "y": {"z": [1, 2]}})


def test_store_then_lookup_and_manifest(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.store("stage", {"k": 1}, lambda d: (d / "a.txt").write_text("hello"))
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["config"] == {"k": 1} and "a.txt" in manifest["files"] and manifest["versions"]["torch"]
    assert cache.lookup("stage", {"k": 1}) == entry
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


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_manifest", "delete_file"])
def test_damaged_entry_is_detected_and_removed(tmp_path, damage, caplog):
    cache = StageCache(tmp_path)
    entry = cache.store("stage", {"k": 1}, lambda d: (d / "w.bin").write_bytes(bytes(range(200))))
    if damage == "truncate":
        (entry / "w.bin").write_bytes(bytes(range(100)))
    elif damage == "flip":
        (entry / "w.bin").write_bytes(bytes([1]) + bytes(range(1, 200)))
    elif damage == "delete_manifest":
        (entry / "manifest.json").unlink()
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
