"""Shortcuts a replica on this machine takes, where sending a byte costs only a read of the master.

A small file changed on the master is rebuilt from the bytes the master scan read
(apply.MasterReader.local_sends: WholeSends with the write's ops), not by also copying the
chunks it keeps from the replica's old version. What must hold: the replica ends equal to the
master; the writer never opens the old version as a reuse source for such a file; the plan's
accounting (sent and reused bytes) is what it was; with --bwlimit (throttled sends), without
held bytes, or for a file of DIRECT_MIN bytes or more, the copy from the old version is still
made; an edit made on the replica after its scan is still refused at commit (the written bytes
never came from it, but the file they replace must still be the one the plan saw); iterating
such sends yields only the send ops' bytes.

And the plan for a local replica says so (PlanOptions.local: chunks are looked for in other
replica files only when enough are wanted; see test_plan.py), an SSH replica's does not.
"""

from __future__ import annotations

import os

import pytest

try:
    import treecmp
    from helpers import build_tree, random_bytes, settle, spy_calls, stray_temps, text_lines, tmp_entries
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import build_tree, random_bytes, settle, spy_calls, stray_temps, text_lines, tmp_entries

from dirsync.apply import DIRECT_MIN, MasterReader, WholeSends
from dirsync.manifest import FileEntry
from dirsync.plan import CopyOp, SendOp, WriteFile
from dirsync.progress import Reporter
from dirsync.replica import Replica
from dirsync.sync import SyncConfig, run_sync

KiB = 1 << 10


@pytest.fixture
def sources(monkeypatch) -> list:
    """The reuse sources the writer opened (Replica._open_source calls), as relpaths."""
    return spy_calls(monkeypatch, Replica, "_open_source", lambda _, self, w, src, *a: src)


@pytest.fixture
def staged(monkeypatch) -> list:
    """Every WriteFile staged, with what its sends were (type, and `whole` when it had one)."""
    return spy_calls(monkeypatch, Replica, "stage",
                     lambda _, self, w, sends: (w, type(sends).__name__, getattr(sends, "whole", None)))


def _run(m, r, **kw):
    return run_sync(SyncConfig(master=str(m), replicas=(str(r),), **kw), Reporter(quiet=True))


def _middle_edit(p, at: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(at)
        f.write(data)


def _pair(tmp_path, files: dict):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, files)
    settle(m)
    run = _run(m, r, init=True)
    assert run.exit_code == 0
    settle(m, r)
    return m, r


def _clean(r) -> None:
    assert tmp_entries(r) == [] and stray_temps(r) == []


def test_a_small_edit_is_written_from_the_master_bytes_alone(tmp_path, sources, staged):
    m, r = _pair(tmp_path, {"a.txt": text_lines(40 * KiB, seed=1), "d": {"b.bin": random_bytes(30 * KiB, seed=2)}})
    staged.clear()
    _middle_edit(m / "a.txt", 20 * KiB, b"EDITED" * 10)
    _middle_edit(m / "d" / "b.bin", 100, b"\x00" * 64)
    settle(m)
    run = _run(m, r)
    assert run.exit_code == 0
    s = run.replicas[0]
    writes = {w.path: (w, kind, whole) for w, kind, whole in staged}
    assert set(writes) == {"a.txt", "d/b.bin"}
    for path, (w, kind, whole) in writes.items():
        # The plan still reuses most of each file (so the shortcut is what spares the copy) ...
        assert any(o.__class__ is CopyOp for o in w.ops) and any(o.__class__ is SendOp for o in w.ops), path
        assert (kind, whole) == ("WholeSends", True), path
    assert sources == []  # ... and no old version was opened to copy it
    # The plan's accounting stands: only the changed chunks count as sent.
    assert 0 < s.bytes_sent < s.bytes_reused
    assert s.bytes_sent + s.bytes_reused == os.path.getsize(m / "a.txt") + os.path.getsize(m / "d" / "b.bin")
    treecmp.assert_trees_equal(m, r)
    _clean(r)


@pytest.mark.parametrize("case", ["throttled", "direct-min"])
def test_the_old_version_is_still_copied_from_when_throttled_or_large(tmp_path, sources, staged, case):
    """--bwlimit (throttled sends), or a file of DIRECT_MIN bytes or more (never held)."""
    if case == "throttled":
        path, data, at, kw = "a.txt", text_lines(40 * KiB, seed=1), 20 * KiB, {"bwlimit": 1 << 30}
    else:
        path, data, at, kw = "big.bin", random_bytes(DIRECT_MIN + 8 * KiB, seed=3), DIRECT_MIN // 2, {}
    m, r = _pair(tmp_path, {path: data})
    staged.clear()
    _middle_edit(m / path, at, b"EDITED" * 10)
    settle(m)
    run = _run(m, r, **kw)
    assert run.exit_code == 0
    assert [(w.path, whole) for w, _, whole in staged] == [(path, None)]
    assert sources == [path]
    treecmp.assert_trees_equal(m, r)
    _clean(r)


def test_an_edit_made_on_the_replica_after_its_scan_is_still_refused(tmp_path, staged, monkeypatch):
    """The bytes written never come from the replica's file, but committing must still find it
    as the plan saw it: a change made there meanwhile is left alone and reported."""
    m, r = _pair(tmp_path, {"a.txt": text_lines(40 * KiB, seed=1)})
    _middle_edit(m / "a.txt", 20 * KiB, b"EDITED" * 10)
    settle(m)
    theirs = b"the replica's own newer text\n"
    real = Replica.stage

    def edit_then_stage(self, w, sends):
        with open(r / "a.txt", "ab") as f:  # a real write by someone else, after the scan
            f.write(theirs)
        return real(self, w, sends)

    monkeypatch.setattr(Replica, "stage", edit_then_stage)
    run = _run(m, r)
    s = run.replicas[0]
    assert run.exit_code != 0 and len(s.errors) == 1 and s.errors[0].path == "a.txt"
    assert (r / "a.txt").read_bytes().endswith(theirs)  # kept, not overwritten
    _clean(r)


def test_whole_sends_iterate_only_the_send_ops_bytes():
    data = bytes(range(256)) * 40
    t = FileEntry("x", len(data), 0o644, 0, b"\0" * 16, 0, (len(data),), b"\0" * 16)
    ops = (CopyOp("x", 0, 1000), SendOp(1000, 500), CopyOp("x", 1500, 6000), SendOp(7500, 2740))
    w = WriteFile(t, ops, None)
    assert list(WholeSends(data, w.ops)) == [data[1000:1500], data[7500:10240]]
    assert WholeSends(data, w.ops).take_all() == data
    assert list(WholeSends(data)) == [data]  # (a new file's one send op: all of it)


def test_local_sends_offers_the_whole_file_only_for_held_bytes(tmp_path):
    """No held bytes for the path, or held bytes of another content: the plain sends."""
    m = tmp_path / "m"
    build_tree(m, {"a.txt": text_lines(20 * KiB, seed=4)})
    data = (m / "a.txt").read_bytes()
    import xxhash

    t = FileEntry("a.txt", len(data), 0o644, os.stat(m / "a.txt").st_mtime_ns, xxhash.xxh3_128_digest(data), 0,
                  (len(data),), xxhash.xxh3_128_digest(data))
    w = WriteFile(t, (CopyOp("a.txt", 0, 1000), SendOp(1000, len(data) - 1000)), None)
    assert getattr(MasterReader(str(m)).local_sends(w), "whole", False) is False
    stale = {"a.txt": (xxhash.xxh3_128_digest(b"other"), data)}
    assert getattr(MasterReader(str(m), None, stale).local_sends(w), "whole", False) is False
    held = {"a.txt": (t.digest, data)}
    got = MasterReader(str(m), None, held).local_sends(w)
    assert got.whole is True and got.take_all() == data


def test_the_plan_for_a_local_replica_is_made_as_for_one_on_this_machine(tmp_path, monkeypatch):
    import dirsync.sync as sync_mod

    seen = spy_calls(monkeypatch, sync_mod, "diff", lambda _, master, replica, opts, *a: opts)
    m, r = _pair(tmp_path, {"a.txt": text_lines(40 * KiB, seed=1)})
    _middle_edit(m / "a.txt", 20 * KiB, b"EDITED" * 10)
    settle(m)
    assert _run(m, r).exit_code == 0
    assert seen and all(o.local is True for o in seen)
    treecmp.assert_trees_equal(m, r)
