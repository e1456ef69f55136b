"""How a run makes what it wrote durable (Replica.commit_start/commit_finish, publish, close).

What must hold: a file's data is on disk before the file appears at its final name (an fsync
of each file in a small batch, one syncfs for a large one); the entries a run makes (renames,
new directories, symlinks) are on disk before the cache that records them is saved, and a
moved file's new name before its old name is unlinked. When those entries are in a few
directories, each directory is fsynced, not the whole file system (a syncfs also writes out
every other program's dirty data there); a move done by hard links flushes no file data.
A flush that reports a write error keeps what it covered out of place.

The calls are observed by recording wrappers around os.fsync and the syncfs helper (both still
run). The write error is the one fault here that cannot be caused for real (this sandbox has
no device-mapper): there the syncfs helper raises EIO.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest

try:
    import treecmp
    from helpers import build_tree, random_bytes, settle, stray_temps, sync_in_process
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import build_tree, random_bytes, settle, stray_temps, sync_in_process

from dirsync import replica as replica_mod
from dirsync.apply import MasterReader, ReplicaSummary, apply_actions
from dirsync.errors import ItemIOError
from dirsync.plan import REPLACED_BATCH, Commit, CopyOp, Delete, MoveDir, PlanOptions, SendOp, WriteFile, expect_of
from dirsync.replica import DIR_FSYNC_MAX, Replica
from dirsync.scan import Excluder, scan_tree


class _Calls:
    """Records, in order: ("fsync", inode, is_dir, final names present), ("syncfs", final names
    present), ("unlink", name), ("save",). "Final names present": how many of `watch` exist."""

    def __init__(self, monkeypatch, watch: list[str] = ()) -> None:
        self.events: list[tuple] = []
        self.watch = list(watch)
        real_fsync, real_syncfs = os.fsync, replica_mod._syncfs
        real_unlink, real_save = os.unlink, replica_mod.save_manifest_file

        def fsync(fd):
            st = os.fstat(fd)
            self.events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode), self._present()))
            return real_fsync(fd)

        def syncfs(fd):
            self.events.append(("syncfs", self._present()))
            return real_syncfs(fd)

        def unlink(name, *, dir_fd=None):
            self.events.append(("unlink", os.fsdecode(os.path.basename(name))))
            return real_unlink(name, dir_fd=dir_fd)

        def save(*a, **kw):
            self.events.append(("save",))
            return real_save(*a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(replica_mod, "_syncfs", syncfs)
        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(replica_mod, "save_manifest_file", save)

    def _present(self) -> int:
        return sum(os.path.lexists(p) for p in self.watch)

    def kinds(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]

    def before(self, kind: str, names: set[str] | None = None) -> list[tuple]:
        """The events before the first of `kind` (an "unlink" of one of `names`)."""
        i = next(i for i, e in enumerate(self.events) if e[0] == kind and (names is None or e[1] in names))
        return self.events[:i]


def _sync(m, r, calls_factory=None, opts: PlanOptions = PlanOptions()) -> tuple[ReplicaSummary, list]:
    """One in-process sync of m to r (spies set up by calls_factory after the plan)."""
    return sync_in_process(m, r, calls_factory, opts)


def _synced_pair(tmp_path, spec: dict) -> tuple:
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, spec)
    settle(m)  # old mtimes: the replica's copies are trusted by its cache (what a move links from)
    summary, _ = _sync(m, r)
    assert not summary.errors
    return m, r


def _ino(p) -> int:
    return os.lstat(p).st_ino


def _payload(n: int = 20) -> dict:
    return {f"payload/p{i % 2}/f{i:02d}.bin": random_bytes(4096, seed=i) for i in range(n)} | {"keep/x.txt": "x\n"}


def test_a_moved_directory_is_linked_and_its_new_names_flushed_by_directory_before_the_old_go(tmp_path, monkeypatch):
    m, r = _synced_pair(tmp_path, _payload())
    inodes = {f"p{i % 2}/f{i:02d}.bin": _ino(r / "payload" / f"p{i % 2}" / f"f{i:02d}.bin") for i in range(20)}
    os.makedirs(m / "archive")
    os.rename(m / "payload", m / "archive" / "payload-2")
    calls: list[_Calls] = []
    summary, actions = _sync(m, r, lambda: calls.append(_Calls(monkeypatch)))
    c = calls[0]
    assert not summary.errors
    assert sum(isinstance(a, WriteFile) and a.move for a in actions) == 20
    treecmp.assert_trees_equal(m, r)
    for rel, ino in inodes.items():
        assert _ino(r / "archive" / "payload-2" / rel) == ino  # linked, not copied
    assert not c.kinds("syncfs")
    run = [e for e in c.before("save") if e[0] == "fsync"]  # (the cache's own save fsyncs it)
    assert all(is_dir for _, _, is_dir, _ in run), "a link's data needs no fsync"
    # New directories (their inodes and entries) and the root that took the published one:
    flushed = {e[1] for e in c.before("unlink", {os.path.basename(p) for p in inodes}) if e[0] == "fsync"}
    need = {_ino(p) for p in (r, r / "archive", r / "archive" / "payload-2", r / "archive" / "payload-2" / "p0",
                              r / "archive" / "payload-2" / "p1")}
    assert need <= flushed
    assert len(run) == len(need)  # each once
    summary, actions = _sync(m, r)
    assert not [a for a in actions if not isinstance(a, Delete) or a.path != "payload"] and not summary.errors


def test_a_directory_moved_whole_is_one_rename_flushed_in_both_parents_before_the_cache(tmp_path, monkeypatch):
    """With directory moves on (PlanOptions.dir_moves: what sync.py sets for a local replica),
    the same rename is one MoveDir: the files keep their inodes, no file data and no file is
    flushed, and the two directories whose entries changed are fsynced before the cache that
    records the move is saved."""
    m, r = _synced_pair(tmp_path, _payload())
    inodes = {f"p{i % 2}/f{i:02d}.bin": _ino(r / "payload" / f"p{i % 2}" / f"f{i:02d}.bin") for i in range(20)}
    os.rename(m / "payload", m / "keep" / "payload-2")
    calls: list[_Calls] = []
    summary, actions = _sync(m, r, lambda: calls.append(_Calls(monkeypatch)), PlanOptions(dir_moves=1 << 40))
    assert not summary.errors and summary.dirs_moved == 1
    assert [(a.src, a.path) for a in actions if isinstance(a, MoveDir)] == [("payload", "keep/payload-2")]
    assert not [a for a in actions if isinstance(a, (WriteFile, Delete))]
    treecmp.assert_trees_equal(m, r)
    for rel, ino in inodes.items():
        assert _ino(r / "keep" / "payload-2" / rel) == ino
    before_save = calls[0].before("save")
    flushed = {e[1] for e in before_save if e[0] == "fsync"}
    assert {_ino(r), _ino(r / "keep")} <= flushed and not calls[0].kinds("syncfs")
    assert all(e[2] for e in before_save if e[0] == "fsync"), "a move flushes no file"
    summary, actions = _sync(m, r, opts=PlanOptions(dir_moves=1 << 40))
    assert not actions and not summary.errors


def test_a_file_moved_into_an_existing_directory_is_flushed_there_before_its_old_name_goes(tmp_path, monkeypatch):
    m, r = _synced_pair(tmp_path, _payload())
    before = _ino(r / "payload" / "p0" / "f00.bin")
    os.rename(m / "payload" / "p0" / "f00.bin", m / "keep" / "f00.bin")
    calls: list[_Calls] = []
    summary, _ = _sync(m, r, lambda: calls.append(_Calls(monkeypatch)))
    c = calls[0]
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)
    assert _ino(r / "keep" / "f00.bin") == before
    assert not c.kinds("syncfs")
    assert _ino(r / "keep") in {e[1] for e in c.before("unlink", {"f00.bin"}) if e[0] == "fsync"}
    assert [e for e in c.before("save") if e[0] == "fsync" and not e[2]] == []


def test_a_few_written_files_are_fsynced_before_they_appear_and_their_directory_before_the_cache(tmp_path,
                                                                                                  monkeypatch):
    m, r = _synced_pair(tmp_path, _payload())
    names = [f"new{i}.bin" for i in range(5)]
    for i, n in enumerate(names):
        (m / "keep" / n).write_bytes(random_bytes(3000, seed=100 + i))
    calls: list[_Calls] = []
    summary, _ = _sync(m, r, lambda: calls.append(_Calls(monkeypatch, [str(r / "keep" / n) for n in names])))
    c = calls[0]
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)
    files = [e for e in c.before("save") if e[0] == "fsync" and not e[2]]
    assert len(files) == len(names)
    assert all(present == 0 for *_, present in files), "a file was at its final name before its data was flushed"
    assert _ino(r / "keep") in {e[1] for e in c.before("save") if e[0] == "fsync"}
    assert not c.kinds("syncfs")


def test_a_large_batch_is_flushed_by_one_syncfs_before_any_file_appears(tmp_path, monkeypatch):
    m, r = _synced_pair(tmp_path, _payload())
    names = [f"keep/big{i:02d}.bin" for i in range(30)]
    for i, n in enumerate(names):
        (m / n).write_bytes(random_bytes(2000, seed=200 + i))
    calls: list[_Calls] = []
    summary, _ = _sync(m, r, lambda: calls.append(_Calls(monkeypatch, [str(r / n) for n in names])))
    c = calls[0]
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)
    syncs = c.kinds("syncfs")
    assert syncs and syncs[0][1] == 0, "a file was at its final name before the batch's data was flushed"
    assert not [e for e in c.before("save") if e[0] == "fsync" and not e[2]]


def test_entries_in_many_directories_are_flushed_by_one_syncfs_before_the_cache(tmp_path, monkeypatch):
    n = DIR_FSYNC_MAX + 4
    m, r = _synced_pair(tmp_path, {f"d{i:02d}/x.txt": "x\n" for i in range(n)})
    for i in range(n):
        os.symlink("x.txt", m / f"d{i:02d}" / "link")
    calls: list[_Calls] = []
    summary, _ = _sync(m, r, lambda: calls.append(_Calls(monkeypatch)))
    c = calls[0]
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)
    assert [e[0] for e in c.before("save") if e[0] != "unlink"] == ["syncfs"]


def _fail_syncfs_once(monkeypatch) -> list[int]:
    """The next syncfs reports EIO (after flushing for real); the ones after it succeed."""
    real = replica_mod._syncfs
    failed: list[int] = []

    def syncfs(fd):
        real(fd)
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(replica_mod, "_syncfs", syncfs)
    return failed


def test_a_commit_whose_flush_reports_a_write_error_puts_none_of_its_files_in_place(tmp_path, monkeypatch):
    m, r = _synced_pair(tmp_path, _payload())
    names = [f"keep/new{i:02d}.bin" for i in range(30)]
    for i, n in enumerate(names):
        (m / n).write_bytes(random_bytes(2000, seed=300 + i))
    failed = _fail_syncfs_once(monkeypatch)
    summary, _ = _sync(m, r)
    assert failed
    assert sorted(e.path for e in summary.errors) == sorted(names)
    assert all("Input/output error" in str(e) for e in summary.errors)
    assert not any(os.path.lexists(r / n) for n in names)
    assert stray_temps(r) == []
    summary, _ = _sync(m, r)  # the disk is well again
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)


@pytest.mark.parametrize("flush", ["syncfs", "fsync"])  # many new directories, or a few
def test_new_directories_whose_flush_reports_a_write_error_are_not_put_in_place(tmp_path, monkeypatch, flush):
    m, r = _synced_pair(tmp_path, _payload())
    for i in range(3):
        build_tree(m / "fresh" / f"s{i}", {f"f{i:02d}.txt": f"file {i}\n"})
    if flush == "syncfs":
        for i in range(DIR_FSYNC_MAX + 1):
            os.makedirs(m / "fresh" / "empty" / f"e{i:02d}")
        failed = _fail_syncfs_once(monkeypatch)
    else:
        real, failed = os.fsync, []

        def fsync(fd):  # the first directory's
            real(fd)
            if not failed and stat.S_ISDIR(os.fstat(fd).st_mode):
                failed.append(fd)
                raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", fsync)
    summary, _ = _sync(m, r)
    assert failed
    assert [e.path for e in summary.errors] == ["fresh"]
    assert "Input/output error" in str(summary.errors[0])
    assert not os.path.lexists(r / "fresh")
    assert stray_temps(r) == []
    assert not [n for n in os.listdir(r) if n.startswith(".dirsync-")], "a temp directory was left"
    monkeypatch.undo()
    summary, _ = _sync(m, r)  # the disk is well again
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)


def test_a_file_system_that_cannot_fsync_a_directory_is_flushed_whole_instead(tmp_path, monkeypatch):
    m, r = _synced_pair(tmp_path, _payload())
    os.makedirs(m / "archive")
    os.rename(m / "payload", m / "archive" / "payload-2")
    real = os.fsync

    def fsync(fd):  # as some FUSE and network file systems answer for a directory
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd)

    calls: list[_Calls] = []

    def spy():
        monkeypatch.setattr(os, "fsync", fsync)
        calls.append(_Calls(monkeypatch))

    summary, _ = _sync(m, r, spy)
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)
    assert calls[0].kinds("syncfs")


def test_a_write_error_flushing_the_runs_names_at_close_saves_no_cache_and_the_next_run_converges(tmp_path,
                                                                                                    monkeypatch):
    m, r = _synced_pair(tmp_path, _payload())
    for i in range(3):
        (m / "keep" / f"new{i}.bin").write_bytes(random_bytes(3000, seed=400 + i))
    cache = r / ".dirsync" / "manifest"
    before = cache.read_bytes()
    real, failed = os.fsync, []

    def fsync(fd):  # the directory's flush at close
        real(fd)
        if not failed and stat.S_ISDIR(os.fstat(fd).st_mode):
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(ItemIOError, match="Input/output error"):
        _sync(m, r)
    assert failed and cache.read_bytes() == before
    monkeypatch.undo()
    summary, actions = _sync(m, r)
    assert not summary.errors and not [a for a in actions if isinstance(a, WriteFile)]
    treecmp.assert_trees_equal(m, r)


def test_files_replacing_others_go_in_place_in_batches_each_flushed_first(tmp_path, monkeypatch):
    """Files that replace replica files committed 32 at a time (as the sync plans them where
    freed inodes linger, see plan.REPLACED_BATCH): no file of a batch is at its final name before
    that batch's flush, and the next batch's files (copying from their own old versions) are
    staged while it runs."""
    names = [f"payload/p{i % 2}/f{i:02d}.bin" for i in range(80)]
    m, r = _synced_pair(tmp_path, {n: random_bytes(4096, seed=i) for i, n in enumerate(names)})
    old = {n: _ino(r / n) for n in names}
    for n in names:
        with open(m / n, "ab") as fh:
            fh.write(b"appended\n")
    at_flush: list[int] = []  # how many new versions were in place as each flush began
    staged_at_finish: list[int] = []  # files staged (not yet in place) as each commit finished
    real_syncfs, real_finish = replica_mod._syncfs, Replica.commit_finish

    def syncfs(fd):
        at_flush.append(sum(_ino(r / n) != old[n] for n in names))
        return real_syncfs(fd)

    def commit_finish(self, c):
        staged_at_finish.append(len(self.staged))
        return real_finish(self, c)

    def spy():
        monkeypatch.setattr(replica_mod, "_syncfs", syncfs)
        monkeypatch.setattr(Replica, "commit_finish", commit_finish)

    summary, actions = _sync(m, r, spy, PlanOptions(commit_replaced=REPLACED_BATCH))
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)
    assert [len(a.paths) for a in actions if a.__class__.__name__ == "Commit"] == [32, 32, 16]
    assert at_flush[:3] == [0, 32, 64]
    assert staged_at_finish == [64, 48, 16]  # (batch 1 and 2, batch 2 and 3, batch 3)


def test_a_file_copying_from_one_a_running_commit_puts_in_place_waits_for_it(tmp_path):
    """A plan may copy from a file an earlier commit of it put in place: the copy must get the
    new version, even while that commit's flush is still running."""
    m, r = _synced_pair(tmp_path, {"a.bin": random_bytes(5000, seed=1)})
    (m / "a.bin").write_bytes(random_bytes(5000, seed=2))
    (m / "b.bin").write_bytes((m / "a.bin").read_bytes())
    ms = scan_tree(str(m))
    rep = Replica(str(r))
    rep.open()
    rs = rep.manifest(Excluder())
    ma, mb = ms.manifest.entries["a.bin"], ms.manifest.entries["b.bin"]
    actions = [WriteFile(ma, (SendOp(0, ma.size),), expect_of(rs.manifest.entries["a.bin"])), Commit(("a.bin",)),
               WriteFile(mb, (CopyOp("a.bin", 0, mb.size),), None), Commit(("b.bin",))]
    summary = ReplicaSummary(replica=str(r))
    try:
        apply_actions(rep, actions, MasterReader(str(m), None, ms.held).local_sends, summary, lambda: False)
    finally:
        rep.close()
    assert not summary.errors
    assert (r / "a.bin").read_bytes() == (r / "b.bin").read_bytes() == (m / "a.bin").read_bytes()


def _journaled(path) -> bool | None:
    """Is `path` on an ext4 with a journal (a jbd2 entry for its device), or None: not ext4."""
    st = os.stat(path)
    try:
        dev = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
    except OSError:  # no block device (tmpfs, overlay...)
        return None
    if not os.path.isdir(f"/sys/fs/ext4/{dev}"):
        return None
    return any(n.startswith(dev + "-") for n in os.listdir("/proc/fs/jbd2")) if os.path.isdir("/proc/fs/jbd2") else False


def test_replacing_files_are_planned_in_small_batches_only_where_freed_inodes_linger(tmp_path):
    """The sync asks for small batches of replacing files on ext2/3/4 without a journal (told by
    its sysfs entry; the test asks jbd2's list instead), and plans as before elsewhere."""
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync

    names = [f"d/f{i:03d}.bin" for i in range(80)]
    m, r = _synced_pair(tmp_path, {n: random_bytes(3000, seed=i) for i, n in enumerate(names)})
    for i, n in enumerate(names):
        (m / n).write_bytes(random_bytes(3000, seed=1000 + i))
    fd = os.open(r, os.O_RDONLY)
    try:
        linger = replica_mod.frees_linger(fd)
    finally:
        os.close(fd)
    journaled = _journaled(r)
    assert linger == (journaled is False)
    run = run_sync(SyncConfig(master=str(m), replicas=(str(r),), dry_run=True), Reporter(quiet=True))
    (_, plan), = run.plans
    commits = [a for a in plan.actions if isinstance(a, Commit)]
    assert [len(c.paths) for c in commits] == ([32, 32, 16] if linger else [80])
