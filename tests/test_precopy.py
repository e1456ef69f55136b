"""A large file edited in place is rebuilt over a copy made while the master was being hashed.

Replica.precopy copies the replica's version into a temp on a thread as soon as the master scan
is about to hash a large file again at its old size; stage() then writes only the sent chunks
over that copy (Replica._claim_precopy), when the copy is whole, of the very entry the plan
reuses (stat facts unchanged before, during and after), and every reused chunk keeps its
offset. What must hold: the replica ends equal to the master, a copy that does not fit is
never built over (chunks moved, the replica file written before or during the copy), and no
temp outlives the run, whatever happened to it (not needed, dropped, interrupted).

Files here are 3 MiB with PRECOPY_MIN lowered to 1 MiB (the threshold only saves time). The
write during the copy is a real write to the real file, made from inside the copy's first
copy_file_range call so that it lands while the copy runs.
"""

from __future__ import annotations

import os
import threading

import pytest

try:
    import sshd as _sshd_plugin
    import treecmp
    from helpers import build_tree, random_bytes, read, settle, spy_calls, stray_temps, tmp_entries, wait_for
    from remote_helpers import ssh_options, ssh_spec
except ImportError:  # tests/ imported as a package
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import (build_tree, random_bytes, read, settle, spy_calls, stray_temps, tmp_entries,
                               wait_for)
    from tests.remote_helpers import ssh_options, ssh_spec

from dirsync import replica as replica_mod
from dirsync import scan as scan_mod
from dirsync.apply import MasterReader, ReplicaSummary, apply_actions
from dirsync.errors import ConflictError
from dirsync.manifest import FileEntry
from dirsync.plan import CopyOp, PlanOptions, WriteFile, diff
from dirsync.replica import Replica
from dirsync.scan import Excluder, scan_tree
from dirsync.transport.remote import RemoteTransport

pytest_plugins = [_sshd_plugin.__name__]

SIZE = 3 << 20


@pytest.fixture(autouse=True)
def small_precopies(monkeypatch):
    monkeypatch.setattr(scan_mod, "PRECOPY_MIN", 1 << 20)  # (the scan's hook)
    monkeypatch.setattr(replica_mod, "PRECOPY_MIN", 1 << 20)  # (the writer's own check)


@pytest.fixture
def claims(monkeypatch) -> list:
    """What each _claim_precopy returned (a temp: built over the copy; None: not)."""
    return spy_calls(monkeypatch, Replica, "_claim_precopy", lambda tmp, *a: tmp)


@pytest.fixture
def started(monkeypatch) -> list:
    """The paths a copy ahead was started for (Replica.precopy calls that made one)."""
    got: list = []
    real = Replica.precopy

    def spy(self, rel, size):
        real(self, rel, size)
        if rel in self._precopies:
            got.append(rel)

    monkeypatch.setattr(Replica, "precopy", spy)
    return got


def _pair(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"big.img": random_bytes(SIZE, seed=7), "small.txt": "s\n"})
    settle(m)
    summary, _ = _sync(m, r, precopy=False)
    assert not summary.errors
    settle(m, r)
    return m, r


def _sync(m, r, *, precopy: bool = True, before_plan=None) -> tuple[ReplicaSummary, list]:
    """One in-process sync of m to r, with the copy ahead a run starts for each file the master
    scan hashes again at its cached size (here: every file the replica holds at the master's size
    whose master stat changed; the run's own hook is tested end-to-end below)."""
    ms = scan_tree(str(m))
    rep = Replica(str(r))
    rep.open(init=True)
    summary = ReplicaSummary(replica=str(r))
    try:
        rs = rep.manifest(Excluder())
        if precopy:
            for rel, e in ms.manifest.entries.items():
                old = rs.manifest.entries.get(rel)
                if isinstance(e, FileEntry) and isinstance(old, FileEntry) and e.size == old.size \
                        and e.mtime_ns != old.mtime_ns:
                    rep.precopy(rel, e.size)
        if before_plan is not None:
            before_plan()
        plan = diff(ms.manifest, rs.manifest, PlanOptions())
        apply_actions(rep, plan.actions, MasterReader(str(m), None, ms.held).local_sends, summary, lambda: False)
    finally:
        rep.close()
    return summary, plan.actions


def _edit_in_place(p, edits=((100_000, b"x" * 1000), (1_500_000, b"y" * 3000), (SIZE - 500, b"z" * 500))):
    with open(p, "r+b") as f:
        for off, data in edits:
            f.seek(off)
            f.write(data)


def _no_temps(r) -> None:
    assert tmp_entries(r) == [] and stray_temps(r) == []
    assert not [t for t in threading.enumerate() if t.name == "dirsync-precopy"]


def test_an_in_place_edit_is_built_over_the_copy_made_ahead(tmp_path, claims, started):
    m, r = _pair(tmp_path)
    _edit_in_place(m / "big.img")
    settle(m)
    summary, actions = _sync(m, r)
    assert not summary.errors
    assert started == ["big.img"] and len(claims) == 1 and claims[0] is not None
    (w,) = [a for a in actions if isinstance(a, WriteFile)]
    assert any(isinstance(op, CopyOp) for op in w.ops)
    assert summary.bytes_sent < SIZE // 8
    treecmp.assert_trees_equal(m, r)
    _no_temps(r)
    # and the next run has nothing to do
    summary, actions = _sync(m, r)
    assert not actions and not summary.errors


def test_moved_chunks_are_not_built_over_the_copy(tmp_path, claims, started):
    """Same size, content shifted by 100 bytes: the reused chunks sit at other offsets."""
    m, r = _pair(tmp_path)
    data = read(m / "big.img")
    (m / "big.img").write_bytes(data[100:] + data[:100])
    settle(m)
    summary, _ = _sync(m, r)
    assert not summary.errors
    assert started == ["big.img"] and claims == [None]
    treecmp.assert_trees_equal(m, r)
    _no_temps(r)


def test_a_replica_file_written_after_its_scan_is_not_built_over(tmp_path, claims, started, monkeypatch):
    """Written between the replica's scan and the copy: the copy is of other bytes than the
    entry the plan reuses (its stat facts differ), so the build copies from the file itself,
    whose check fails: the write is refused this run, the replica's file left as it is."""
    m, r = _pair(tmp_path)
    _edit_in_place(m / "big.img")
    settle(m)
    tampered = random_bytes(SIZE, seed=99)
    tampered_once: list = []
    real = Replica.precopy

    def tamper_first(self, rel, size):
        if not tampered_once:
            with open(r / rel, "r+b") as f:
                f.write(tampered)
            settle(r)  # (old enough for a copy to start at all)
            tampered_once.append(rel)
        real(self, rel, size)

    monkeypatch.setattr(Replica, "precopy", tamper_first)
    summary, _ = _sync(m, r)
    assert [e.path for e in summary.errors] == ["big.img"]
    assert isinstance(summary.errors[0], ConflictError)
    assert claims == [None]
    assert read(r / "big.img") == tampered
    _no_temps(r)
    summary, _ = _sync(m, r)
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)


def test_a_replica_file_written_during_its_copy_is_not_built_over(tmp_path, claims, started, monkeypatch):
    m, r = _pair(tmp_path)
    _edit_in_place(m / "big.img")
    settle(m)
    real = replica_mod._copy_file_range
    wrote: list = []

    def copy_with_a_write(sfd, fd, n, off):
        if not wrote and threading.current_thread().name == "dirsync-precopy":
            with open(r / "big.img", "r+b") as f:  # a real write to the file being copied
                f.seek(SIZE // 2)
                f.write(b"W" * 10)
            wrote.append(off)
        return real(sfd, fd, n, off)

    monkeypatch.setattr(replica_mod, "_copy_file_range", copy_with_a_write)
    summary, _ = _sync(m, r)
    assert wrote == [0] and started == ["big.img"] and claims == [None]
    assert [e.path for e in summary.errors] == ["big.img"]
    got = read(r / "big.img")
    assert got[SIZE // 2:SIZE // 2 + 10] == b"W" * 10  # the replica's own write, not overwritten
    _no_temps(r)
    summary, _ = _sync(m, r)
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)


def _run(m, r, **kw):
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync

    return run_sync(SyncConfig(master=str(m), replicas=(str(r),), **kw), Reporter(quiet=True))


def test_a_sync_starts_the_copy_during_the_master_scan_and_builds_over_it(tmp_path, claims, started):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"big.img": random_bytes(SIZE, seed=7), "small.txt": "s\n"})
    settle(m)
    assert _run(m, r, init=True).exit_code == 0
    settle(m, r)
    _edit_in_place(m / "big.img")
    settle(m)
    run = _run(m, r)
    assert run.exit_code == 0
    assert started == ["big.img"] and len(claims) == 1 and claims[0] is not None
    treecmp.assert_trees_equal(m, r)
    _no_temps(r)


def test_a_copy_no_write_needs_is_dropped(tmp_path, claims, started, monkeypatch):
    """Only the mtime changed: the master scan hashes the file again (a copy starts), the plan
    sets the mtime and writes nothing: the copy is stopped and removed when the apply starts."""
    left: list = []
    real_settle = Replica.settle

    def settle_spy(self):
        left.append(len(self._precopies))
        return real_settle(self)

    monkeypatch.setattr(Replica, "settle", settle_spy)
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"big.img": random_bytes(SIZE, seed=7)})
    settle(m)
    assert _run(m, r, init=True).exit_code == 0
    st = os.stat(m / "big.img")
    os.utime(m / "big.img", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    settle(m, r)
    run = _run(m, r)
    assert run.exit_code == 0
    assert started == ["big.img"] and claims == [] and left and not any(left)
    treecmp.assert_trees_equal(m, r)
    _no_temps(r)


@pytest.mark.parametrize("how", ["dry-run", "two replicas"])
def test_no_copy_is_made_ahead_for_a_dry_run_or_a_fan_out(tmp_path, started, how):
    m, r, r2 = tmp_path / "m", tmp_path / "r", tmp_path / "r2"
    build_tree(m, {"big.img": random_bytes(SIZE, seed=7)})
    settle(m)
    assert _run(m, r, init=True).exit_code == 0
    if how == "two replicas":
        from dirsync.progress import Reporter
        from dirsync.sync import SyncConfig, run_sync

        assert run_sync(SyncConfig(master=str(m), replicas=(str(r2),), init=True), Reporter(quiet=True)).exit_code == 0
    _edit_in_place(m / "big.img")
    settle(m, r)
    if how == "dry-run":
        assert _run(m, r, dry_run=True).exit_code == 0
        assert read(r / "big.img") != read(m / "big.img")
    else:
        from dirsync.progress import Reporter
        from dirsync.sync import SyncConfig, run_sync

        run = run_sync(SyncConfig(master=str(m), replicas=(str(r), str(r2))), Reporter(quiet=True))
        assert run.exit_code == 0
        treecmp.assert_trees_equal(m, r2)
    assert started == []
    _no_temps(r)


def test_an_interrupted_scan_leaves_no_copy_behind(tmp_path, started, monkeypatch):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"big.img": random_bytes(SIZE, seed=7)})
    settle(m)
    assert _run(m, r, init=True).exit_code == 0
    before = read(r / "big.img")
    _edit_in_place(m / "big.img")
    settle(m, r)
    from dirsync.transport.local import LocalTransport

    real = LocalTransport.precopy

    def then_interrupt(self, rel, size):
        real(self, rel, size)
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalTransport, "precopy", then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(m, r)
    assert started == ["big.img"]
    assert read(r / "big.img") == before
    _no_temps(r)


@pytest.mark.ssh
@pytest.mark.parametrize("others", [0, 40], ids=["alone", "among-40-files"])
def test_over_ssh_the_agent_copies_ahead_and_builds_over_it(sshd, tmp_path, monkeypatch, others):
    """The hint reaches the agent during the master scan (queued until the agent is open, as
    here the scan starts before the agent is up): its replica's .dirsync/tmp then holds a copy
    of the file, and the file the run leaves is that very inode (held by a second name outside
    the replica, so that its number cannot be reused by another temp meanwhile). Among 40
    unchanged files, the master's walk child (a remote replica's) would hash the file itself:
    it leaves that to this process, whose hook tells the agent."""
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync
    from dirsync.transport.remote import PRECOPY_MIN  # (the real one: the agent is another process)

    size = PRECOPY_MIN
    m, r, hold = tmp_path / "m", tmp_path / "r", tmp_path / "hold"
    build_tree(m, {"big.img": random_bytes(size, seed=3), "small.txt": "s\n"}
               | {f"d/f{i:02d}.txt": f"{i}\n" for i in range(others)})
    settle(m)

    def run():
        return run_sync(SyncConfig(master=str(m), replicas=(ssh_spec(sshd, r),), transport=ssh_options(sshd),
                                   init=True), Reporter(quiet=True))

    assert run().exit_code == 0
    _edit_in_place(m / "big.img", ((5 << 20, b"e" * 4096), (size - 70_000, b"f" * 20_000)))
    settle(m, r)
    real = RemoteTransport.precopy
    temps: list = []

    def spy(self, rel, sz):
        real(self, rel, sz)
        got = wait_for(lambda: [n for n in tmp_entries(r) if os.stat(r / ".dirsync" / "tmp" / os.fsdecode(n)).st_size
                                == size], timeout=20, what="the agent's copy ahead")
        os.link(r / ".dirsync" / "tmp" / os.fsdecode(got[0]), hold)
        temps.append(os.stat(hold).st_ino)

    monkeypatch.setattr(RemoteTransport, "precopy", spy)
    res = run()
    assert res.exit_code == 0
    assert len(temps) == 1 and os.stat(r / "big.img").st_ino == temps[0]
    os.unlink(hold)
    treecmp.assert_trees_equal(m, r)
    assert tmp_entries(r) == [] and stray_temps(r) == []
