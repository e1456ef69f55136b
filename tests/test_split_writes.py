"""A second writer process (apply._Helper): a plan that writes many new files hands a share of
them to a forked helper, which writes and commits them while the parent writes the rest.

What must hold: the helper gets only files nothing else in the plan depends on, in whole
directories; everything it commits reaches the parent's record of the replica (so the cache
saved at close is exact); a helper that dies leaves no file at its final name that is not the
master's, and its unwritten files are reported, not silently lost; a parent that stops early
stops the helper too; the helper's item errors reach the parent's summary.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

try:
    import treecmp
    from helpers import (build_tree, files_match_master, popen_cli, random_bytes, settle, stray_temps, sync_json,
                         text_lines, wait_for, write)
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import (build_tree, files_match_master, popen_cli, random_bytes, settle, stray_temps,
                               sync_json, text_lines, wait_for, write)

from dirsync import apply as apply_mod
from dirsync import replica as replica_mod
from dirsync.apply import MasterReader, ReplicaSummary, apply_actions
from dirsync.manifest import parent_of
from dirsync.plan import Commit, CopyOp, MakeDir, PlanOptions, WriteFile, diff
from dirsync.replica import Replica
from dirsync.scan import Excluder, scan_tree

N = apply_mod.SPLIT_MIN + 400  # enough new files to share


def _tree(n: int = N, dirs: int = 12) -> dict:
    return {f"d{i % dirs:02d}/f{i:05d}.txt": f"file {i}\n" * (1 + i % 40) for i in range(n)}


class _Spy:
    """Records the helpers apply_actions starts (their pids)."""

    def __init__(self, monkeypatch) -> None:
        self.pids: list[int] = []
        real = apply_mod._Helper.start.__func__

        def start(cls, *a, **kw):
            h = real(cls, *a, **kw)
            if h is not None:
                self.pids.append(h.pid)
            return h

        monkeypatch.setattr(apply_mod._Helper, "start", classmethod(start))


def _open(m, r):
    """The master's scan, an opened replica, its scan and the plan between them."""
    ms = scan_tree(str(m), hold=64 << 20)
    rep = Replica(str(r))
    rep.open(init=True)
    rs = rep.manifest(Excluder())
    return ms, rep, diff(ms.manifest, rs.manifest)


def _apply(m, r, sends=None, should_stop=lambda: False) -> tuple[ReplicaSummary, Replica, object]:
    ms, rep, plan = _open(m, r)
    reader = MasterReader(str(m), None, ms.held)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, sends or reader.local_sends, summary, should_stop, split=True)
    return summary, rep, plan


def _cached_inodes(r) -> dict[str, int]:
    from dirsync.chunking import CHUNKER_ID
    from dirsync.state import load_manifest_file

    load = load_manifest_file(os.path.join(r, ".dirsync", "manifest"), CHUNKER_ID)
    return {p: e.ino for p, e in load.manifest.entries.items() if e.kind == "f"}


# -- the share --------------------------------------------------------------------------


def test_the_helper_gets_whole_directories_of_new_files_that_nothing_else_depends_on(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    spec = _tree()
    spec["d11/replaced.bin"] = random_bytes(5000, 1)
    spec["d11/copied.bin"] = random_bytes(300_000, 2) + b"tail"  # reuses the replica's old.bin
    build_tree(m, spec)
    build_tree(r, {"d11/replaced.bin": random_bytes(5000, 3), "old.bin": random_bytes(300_000, 2)})
    ms, rep, plan = _open(m, r)
    rep.close(save=False)
    actions = plan.actions
    share = apply_mod._split_share(actions)
    assert share is not None
    mine, theirs, start, wait_at = share
    n = len(actions)
    end = n - len(mine) + wait_at  # where the shared stretch ends in the plan
    assert mine[:start] == list(actions[:start]) and all(isinstance(a, MakeDir) for a in actions[:start])
    assert mine[wait_at:] == list(actions[end:])
    writes = [a for a in actions if isinstance(a, WriteFile)]
    mw = [a for a in mine if isinstance(a, WriteFile)]
    tw = [a for a in theirs if isinstance(a, WriteFile)]
    assert sorted(a.path for a in mw + tw) == sorted(a.path for a in writes)  # each once
    assert len(tw) >= apply_mod.SPLIT_MIN // 3 and len(mw) >= apply_mod.SPLIT_MIN // 3
    for a in tw:  # new paths, sent bytes only
        assert a.expect is None and not a.move and not any(isinstance(o, CopyOp) for o in a.ops)
    by_path = {a.path: a for a in writes}
    assert by_path["d11/replaced.bin"] in mw and by_path["d11/copied.bin"] in mw
    assert any(isinstance(o, CopyOp) for o in by_path["d11/copied.bin"].ops)
    # Whole directories: no directory has new files of the shareable kind in both shares.
    assert not {parent_of(a.path) for a in tw} & {parent_of(a.path) for a in mw if apply_mod._independent(a)}
    # Each side commits exactly its own files, each once.
    for side, ws in ((mine, mw), (theirs, tw)):
        committed = [p for a in side if isinstance(a, Commit) for p in a.paths]
        assert sorted(committed) == sorted(a.path for a in ws)
        for i, a in enumerate(side):  # and a file is staged before its commit
            if isinstance(a, Commit):
                staged = {b.path for b in side[:i] if isinstance(b, WriteFile)}
                assert set(a.paths) <= staged


def test_a_plan_with_few_new_files_is_not_shared(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree(apply_mod.SPLIT_MIN - 1))
    ms, rep, plan = _open(m, r)
    rep.close(save=False)
    assert apply_mod._split_share(plan.actions) is None


# -- the helper at work ------------------------------------------------------------------


def test_an_initial_copy_shared_with_a_helper_converges_and_its_cache_is_exact(tmp_path, monkeypatch):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    spy = _Spy(monkeypatch)
    summary, rep, _ = _apply(m, r)
    rep.close()
    assert len(spy.pids) == 1 and spy.pids[0] != os.getpid()
    assert summary.errors == [] and summary.files_written == N
    assert summary.bytes_sent == sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(m) for f in fs)
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == []
    # The cache the parent saved holds the helper's files as they are on disk.
    inodes = _cached_inodes(str(r))
    assert len(inodes) == N
    for p, ino in inodes.items():
        assert os.lstat(os.path.join(r, p)).st_ino == ino, p
    settle(m, r)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 0


def test_the_cli_shares_an_initial_copy_and_the_next_run_writes_nothing(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == N and out["replicas"][0]["errors"] == []
    treecmp.assert_trees_equal(m, r)
    settle(m, r)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 0


def _helper_faulted(tmp_path, monkeypatch, at: int, fault) -> tuple:
    """An initial copy shared with a helper that meets fault(reader, write) at the at-th file it
    writes (in its own process); returns (master, replica, the run's summary)."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    ms, rep, plan = _open(m, r)
    reader = MasterReader(str(m), None, ms.held)
    parent = os.getpid()
    count = [0]

    def sends(w):
        if os.getpid() != parent:
            count[0] += 1
            if count[0] == at:
                fault(reader, w)
        return reader.local_sends(w)

    spy = _Spy(monkeypatch)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, sends, summary, split=True)
    rep.close()
    assert len(spy.pids) == 1
    return m, r, summary


def test_a_helper_killed_midway_leaves_only_whole_master_files_and_its_losses_reported(tmp_path, monkeypatch):
    def die(reader, w):  # mid-share, with a file's bytes read
        next(iter(reader.local_sends(w)), None)
        os.kill(os.getpid(), signal.SIGKILL)

    m, r, summary = _helper_faulted(tmp_path, monkeypatch, 300, die)
    died = [e for e in summary.errors if "writer process died" in str(e)]
    assert died and len(died) == len(summary.errors)
    assert summary.files_written + len(died) == N
    # Whatever is on the replica is the master's, whole; nothing half-made is left anywhere.
    assert files_match_master(m, r) == summary.files_written
    assert stray_temps(r) == [] or all(b"/.dirsync/tmp/" in p for p in stray_temps(r))
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == len(died)
    treecmp.assert_trees_equal(m, r)


def test_a_helper_that_fails_as_a_whole_has_its_unfinished_files_reported(tmp_path, monkeypatch):
    def bug(reader, w):
        raise RuntimeError("a bug in the helper")

    m, r, summary = _helper_faulted(tmp_path, monkeypatch, 250, bug)
    assert summary.errors and all("failed before committing it (RuntimeError: a bug in the helper)" in str(e)
                                  for e in summary.errors)
    assert summary.files_written + len(summary.errors) == N
    assert files_match_master(m, r) == summary.files_written
    assert stray_temps(r) == []
    _, out = sync_json(m, r)
    treecmp.assert_trees_equal(m, r)


def test_a_parent_that_stops_early_stops_its_helper_too(tmp_path, monkeypatch):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    parent = os.getpid()
    asked = [0]

    def should_stop():
        if os.getpid() == parent:
            asked[0] += 1
        return asked[0] > 200  # (the helper's own should_stop is its SIGTERM flag)

    ms, rep, plan = _open(m, r)
    reader = MasterReader(str(m), None, ms.held)
    slow = threading.Event()

    def sends(w):  # the helper takes its time, so the parent's stop finds it still at work
        if os.getpid() != parent:
            slow.wait(0.002)
        return reader.local_sends(w)

    spy = _Spy(monkeypatch)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, sends, summary, should_stop, split=True)
    rep.close()
    assert len(spy.pids) == 1
    try:
        os.waitpid(spy.pids[0], os.WNOHANG)
        raise AssertionError("the helper was not reaped")
    except ChildProcessError:
        pass
    # (as when one process stops: files staged but not yet committed are dropped, and said so)
    assert all("not committed before its directory was put in place" in str(e) for e in summary.errors)
    theirs = [a for a in apply_mod._split_share(plan.actions)[1] if isinstance(a, WriteFile)]
    assert summary.files_written < len(theirs) // 2  # the helper stopped well before its share's end
    assert files_match_master(m, r) == summary.files_written
    assert stray_temps(r) == []
    _, out = sync_json(m, r)
    treecmp.assert_trees_equal(m, r)


def test_ctrl_c_stops_the_run_and_its_helper_and_the_next_run_converges(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    n = 24_000
    build_tree(m, {f"d{i % 40:02d}/f{i:05d}.txt": f"{i}\n" * (1 + i % 30) for i in range(n)})

    def written() -> list[int]:  # indexes of the files on the replica, in new directories or not
        out = []
        for d, dirs, files in os.walk(r):
            dirs[:] = [x for x in dirs if x != ".dirsync"]
            out += [int(f[1:6]) for f in files if f.startswith("f")]
        return out

    p = popen_cli("sync", "-q", m, r)
    try:
        # (the helper takes directories d20..d39: files i with i % 40 >= 20)
        wait_for(lambda: len([i for i in written() if i % 40 >= 20]) >= 5000 and len(written()) >= 10000,
                 timeout=60, what="both writers past their first commit batch")
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole group: the run and its helper
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert b"Traceback" not in err, err
    try:  # nothing of the run is left: the helper was stopped and reaped
        os.killpg(p.pid, 0)
        raise AssertionError("a process of the run outlived it")
    except ProcessLookupError:
        pass
    got = written()  # (what was committed stays; what was only staged is gone)
    assert len(got) < n
    assert stray_temps(r) == []
    assert files_match_master(m, r) == len(got)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == n - len(got)
    treecmp.assert_trees_equal(m, r)


def test_a_file_the_helper_finds_changed_on_the_master_is_reported_and_left_out(tmp_path, monkeypatch):
    m, r = tmp_path / "m", tmp_path / "r"
    spec = _tree()
    spec["d11/zz-big.bin"] = random_bytes(200_000, 5)  # not held by the scan: read again when sent
    build_tree(m, spec)
    ms, rep, plan = _open(m, r)
    share = apply_mod._split_share(plan.actions)
    assert any(isinstance(a, WriteFile) and a.path == "d11/zz-big.bin" for a in share[1])
    write(m / "d11" / "zz-big.bin", random_bytes(200_001, 6))  # changed since the scan
    reader = MasterReader(str(m), None, ms.held)
    spy = _Spy(monkeypatch)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, reader.local_sends, summary, split=True)
    rep.close()
    assert len(spy.pids) == 1
    assert [e.path for e in summary.errors] == ["d11/zz-big.bin"]
    assert "changed" in str(summary.errors[0])
    assert not (r / "d11" / "zz-big.bin").exists()
    assert summary.files_written == len(spec) - 1
    assert files_match_master(m, r) == len(spec) - 1


def test_no_helper_is_forked_while_another_thread_runs_and_the_copy_still_converges(tmp_path, monkeypatch):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    spy = _Spy(monkeypatch)
    done = threading.Event()
    t = threading.Thread(target=done.wait)
    t.start()
    try:
        summary, rep, _ = _apply(m, r)
        rep.close()
    finally:
        done.set()
        t.join()
    assert spy.pids == [] and summary.errors == [] and summary.files_written == N
    treecmp.assert_trees_equal(m, r)


def test_fan_out_workers_write_alone(tmp_path, monkeypatch):
    m = tmp_path / "m"
    build_tree(m, _tree())
    rs = [tmp_path / "r1", tmp_path / "r2"]
    _, out = sync_json(m, *rs)
    for rep in out["replicas"]:
        assert rep["files_written"] == N
    for r in rs:
        treecmp.assert_trees_equal(m, r)
    # (the worker side of it: the module switch a worker turns off)
    from dirsync import fanout

    seen = []
    monkeypatch.setattr(apply_mod, "split_writers", True)

    def turn(spec, opened, rep):
        seen.append(apply_mod.split_writers)
        return ReplicaSummary(replica=spec)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fanout._work(w, "x", {}, turn)
            os.write(w, b"1" if seen == [False] else b"0")
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert data.endswith(b"1")


def test_an_interrupt_between_creating_a_file_and_guarding_it_leaves_nothing_at_its_name(tmp_path, monkeypatch):
    """The window stage() guards with `building`: a new file is created at its own name in a
    new directory, and the interrupt lands before the writer's cleanup covers it (it did: Ctrl-C
    during an initial copy left an empty file at its final name, published by close())."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"d/f1.txt": "one\n", "d/f2.txt": "two\n", "d/f3.txt": "three\n"})
    monkeypatch.setattr(replica_mod, "_files", None)  # stage() one by one (the next test: stage_new)
    ms, rep, plan = _open(m, r)
    real_open = os.open

    def open_then_interrupt(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if path == "f2.txt" and flags & os.O_CREAT:
            os.close(fd)
            raise KeyboardInterrupt  # as if Ctrl-C came right after open() returned
        return fd

    monkeypatch.setattr(os, "open", open_then_interrupt)
    reader = MasterReader(str(m), None, ms.held)
    try:
        apply_actions(rep, plan.actions, reader.local_sends, ReplicaSummary(replica=str(r)))
        raise AssertionError("the interrupt did not reach the loop")
    except KeyboardInterrupt:
        pass
    finally:
        monkeypatch.setattr(os, "open", real_open)
    rep.close()
    assert not (r / "d" / "f2.txt").exists()
    assert files_match_master(m, r) == 0  # (f1 was staged, never committed: gone too)
    assert stray_temps(r) == []
    _, out = sync_json(m, r)
    treecmp.assert_trees_equal(m, r)


@pytest.mark.skipif(replica_mod._files is None, reason="dirsync/_files.c is not built")
def test_an_interrupt_as_a_batch_of_new_files_is_written_leaves_nothing_at_their_names(tmp_path, monkeypatch):
    """The same window for Replica.stage_new (many new small files written by one C call): the
    interrupt lands as the call returns, before any of its files is staged."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {f"d/f{i}.txt": f"{i}\n" * i for i in range(1, 7)})
    ms, rep, plan = _open(m, r)
    real = replica_mod._files
    calls = []

    class Interrupting:
        API = real.API

        @staticmethod
        def write_new(items, hash):
            codes = real.write_new(items, hash)
            calls.append(codes)
            raise KeyboardInterrupt  # as if Ctrl-C came right after the call returned

    monkeypatch.setattr(replica_mod, "_files", Interrupting)
    reader = MasterReader(str(m), None, ms.held)
    with pytest.raises(KeyboardInterrupt):
        apply_actions(rep, plan.actions, reader.local_sends, ReplicaSummary(replica=str(r)))
    assert calls == [[0] * 6]  # all six were written by the call, then the interrupt
    rep.close()
    assert files_match_master(m, r) == 0  # (the directory itself may be published, empty)
    assert not (r / "d").exists() or list((r / "d").iterdir()) == []
    assert stray_temps(r) == []
    _, out = sync_json(m, r)
    treecmp.assert_trees_equal(m, r)


def test_a_full_disk_under_both_writers_loses_nothing_and_room_again_converges(tmp_path):
    """Both writers run out of space: each file either arrives whole or is reported, the
    cache stays usable, and once there is room the next run writes exactly the rest."""
    import subprocess

    try:
        from test_faults import tiny_tmpfs
    except ImportError:
        from tests.test_faults import tiny_tmpfs

    m = tmp_path / "m"
    build_tree(m, _tree())  # N small files: N pages of tmpfs, more than it holds
    with tiny_tmpfs("3m") as r:
        _, out = sync_json(m, r, expect=None)
        rep = out["replicas"][0]
        assert out["exit_code"] == 23, out
        failed = {e["path"] for e in rep["errors"] if e["path"].startswith("d")}
        assert failed and all("No space left on device" in e["message"] for e in rep["errors"]), rep["errors"][:3]
        assert rep["files_written"] + len(failed) == N
        assert files_match_master(m, r) == rep["files_written"]
        assert stray_temps(r) == []
        subprocess.run(["mount", "-o", "remount,size=64m", r], check=True)
        _, out = sync_json(m, r)
        assert out["replicas"][0]["files_written"] == len(failed)
        treecmp.assert_trees_equal(m, r)


def test_the_names_a_helper_made_are_flushed_again_by_the_parent_when_its_own_flush_failed(tmp_path, monkeypatch):
    """The helper's flush at its end (end_helper) reports a write error: the parent's next
    flush after it is a syncfs, which covers the names the helper made (they are not in the
    parent's own notes), before anything is published."""
    import errno

    from dirsync import replica as replica_mod

    parent = os.getpid()
    events: list[str] = []
    real_flush, real_syncfs, real_joined = Replica._flush_entries, replica_mod._syncfs, Replica.helper_joined

    def flush(self):
        if self._helper:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_flush(self)

    def syncfs(fd):
        if os.getpid() == parent:
            events.append("syncfs")
        return real_syncfs(fd)

    def joined(self):
        events.append("joined")
        return real_joined(self)

    monkeypatch.setattr(Replica, "_flush_entries", flush)
    monkeypatch.setattr(replica_mod, "_syncfs", syncfs)
    monkeypatch.setattr(Replica, "helper_joined", joined)
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    spy = _Spy(monkeypatch)
    summary, rep, _ = _apply(m, r)
    rep.close()
    assert len(spy.pids) == 1
    assert "joined" in events and "syncfs" in events[events.index("joined"):], events
    assert not summary.errors
    treecmp.assert_trees_equal(m, r)


# -- files that replace others (a release step's edits) ---------------------------------------
# A write that replaces the file at its own path, reusing bytes of that file only, which no
# other write of the stretch reads, goes to the helper too (apply._replaces_alone), when there
# are SPLIT_MIN_EDITS of them and the replica keeps no backups.

E = apply_mod.SPLIT_MIN_EDITS + 40


def _edits_tree(n: int = E, dirs: int = 8) -> dict:
    return {f"e{i % dirs}/s{i:04d}.py": text_lines(9000 + 37 * i, seed=i) for i in range(n)}


def _edit(m, paths) -> None:
    for i, p in enumerate(paths):
        with open(m / p, "r+b") as f:  # in place, mid-file: the rest of the file is reused
            f.seek(4000)
            f.write(b"# edited %05d\n" % i)


def _synced(tmp_path, spec: dict):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, spec)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["errors"] == []
    settle(m, r)
    return m, r


def test_edits_of_many_files_are_shared_and_every_replaced_file_reaches_the_parents_record(tmp_path, monkeypatch):
    spec = _edits_tree()
    m, r = _synced(tmp_path, spec)
    # In every directory (so in the helper's half too, wherever it is cut): a new file that
    # reads an edited file's old version, and an edited file that takes another's old text.
    read = [f"e{d}/s{d:04d}.py" for d in range(8)]
    taker = [f"e{d}/s{d + 8:04d}.py" for d in range(8)]
    olds = {p: (m / p).read_bytes() for p in read + [f"e{d}/s{d + 16:04d}.py" for d in range(8)]}
    _edit(m, sorted(spec))
    for d in range(8):
        (m / f"e{d}" / "zz-copy.py").write_bytes(olds[read[d]] + b"# a copy of an old text\n")
        (m / taker[d]).write_bytes(olds[f"e{d}/s{d + 16:04d}.py"] + b"# another file's old text\n")
    settle(m)
    ms, rep, plan = _open(m, r)
    actions = plan.actions
    assert apply_mod._split_share(actions) is None  # (new files only: too few)
    share = apply_mod._split_share(actions, replaces=True)
    assert share is not None
    mine, theirs = share[0], share[1]
    tw = [a for a in theirs if isinstance(a, WriteFile)]
    mw = [a for a in mine if isinstance(a, WriteFile)]
    assert len(tw) >= E // 3 and len(mw) >= E // 3
    by_path = {a.path: a for a in actions if isinstance(a, WriteFile)}
    for d in range(8):
        copy, took = by_path[f"e{d}/zz-copy.py"], by_path[taker[d]]
        assert any(isinstance(o, CopyOp) and o.src == read[d] for o in copy.ops)
        assert any(isinstance(o, CopyOp) and o.src != took.path for o in took.ops)
        assert copy in mw and by_path[read[d]] in mw  # read by another write: the parent's
        assert took in mw  # reads another file: the parent's
    for a in tw:  # each replaces its own path's file, reusing that file alone
        assert a.expect is not None and a.expect[0] == "f" and not a.move
        assert any(isinstance(o, CopyOp) for o in a.ops)
        assert all(o.src == a.path for o in a.ops if isinstance(o, CopyOp))
    spy = _Spy(monkeypatch)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, actions, MasterReader(str(m), None, ms.held).local_sends, summary, split=True)
    rep.close()
    assert len(spy.pids) == 1 and spy.pids[0] != os.getpid()
    assert summary.errors == [] and summary.files_written == E + 8
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == []
    # The cache the parent saved holds every replaced file as it now is (the helper's too).
    inodes = _cached_inodes(str(r))
    assert len(inodes) == E + 8
    for p, ino in inodes.items():
        assert os.lstat(os.path.join(r, p)).st_ino == ino, p
    settle(m, r)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 0


def test_edits_are_not_shared_with_a_replica_that_keeps_backups(tmp_path, monkeypatch):
    from dirsync.replica import BackupOptions

    spec = _edits_tree()
    m, r = _synced(tmp_path, spec)
    _edit(m, sorted(spec))
    settle(m)
    ms = scan_tree(str(m), hold=64 << 20)
    rep = Replica(str(r), backup=BackupOptions(str(tmp_path / "bk")))
    rep.open()
    rs = rep.manifest(Excluder())
    plan = diff(ms.manifest, rs.manifest)
    assert apply_mod._split_share(plan.actions, replaces=True) is not None  # (so only the backups stop it)
    spy = _Spy(monkeypatch)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, MasterReader(str(m), None, ms.held).local_sends, summary, split=True)
    rep.close()
    assert spy.pids == []
    assert summary.errors == [] and summary.files_written == E
    treecmp.assert_trees_equal(m, r)
    kept = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "bk") for f in fs]
    assert len(kept) == E  # every replaced version kept, once


def test_fewer_edits_than_split_min_edits_are_not_shared(tmp_path):
    spec = _edits_tree()
    m, r = _synced(tmp_path, spec)
    _edit(m, sorted(spec)[:apply_mod.SPLIT_MIN_EDITS - 1])
    settle(m)
    ms, rep, plan = _open(m, r)
    rep.close(save=False)
    assert sum(isinstance(a, WriteFile) for a in plan.actions) == apply_mod.SPLIT_MIN_EDITS - 1
    assert apply_mod._split_share(plan.actions, replaces=True) is None


def test_a_file_changed_on_the_replica_before_the_helper_replaces_it_is_kept_and_reread_next(tmp_path, monkeypatch):
    """The helper's commit finds the replica's file changed since the scan (a real write, made
    in the helper process just before it stages that file): it is left alone and reported, and
    the parent's record no longer trusts that file's entry (the next scan reads it again)."""
    spec = _edits_tree()
    m, r = _synced(tmp_path, spec)
    _edit(m, sorted(spec))
    settle(m)
    ms, rep, plan = _open(m, r)
    theirs = [a for a in apply_mod._split_share(plan.actions, replaces=True)[1] if isinstance(a, WriteFile)]
    victim = theirs[len(theirs) // 2].path
    parent = os.getpid()
    real_stage = Replica.stage

    def stage(self, w, sends):
        if w.path == victim and os.getpid() != parent:
            with open(r / victim, "ab") as f:
                f.write(b"# the replica's own line\n")
        return real_stage(self, w, sends)

    monkeypatch.setattr(Replica, "stage", stage)
    spy = _Spy(monkeypatch)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, MasterReader(str(m), None, ms.held).local_sends, summary, split=True)
    assert len(spy.pids) == 1
    assert [e.path for e in summary.errors] == [victim] and "changed on the replica" in str(summary.errors[0])
    assert rep.current[victim].trusted is False
    rep.close()
    assert (r / victim).read_bytes().endswith(b"# the replica's own line\n")
    assert summary.files_written == E - 1
    assert stray_temps(r) == []


def test_edits_a_killed_helper_committed_unreported_are_found_in_place_and_reported_written(tmp_path, monkeypatch):
    """The helper dies as its first commit returns (its files renamed into place, no outcome of
    them sent): the parent finds each of them at its path, exactly its target, and reports it
    written (recorded, not trusted: the next scan reads it again); every other file of the
    helper's is reported failed and left as it was; the next run converges."""
    import signal

    spec = _edits_tree()
    m, r = _synced(tmp_path, spec)
    before = {p: (m / p).read_bytes() for p in spec}
    _edit(m, sorted(spec))
    settle(m)
    real = Replica.commit_finish

    def commit_finish(self, c):
        out = real(self, c)
        if self._helper:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    monkeypatch.setattr(Replica, "commit_finish", commit_finish)
    ms = scan_tree(str(m), hold=64 << 20)
    rep = Replica(str(r))
    rep.open()
    plan = diff(ms.manifest, rep.manifest(Excluder()).manifest, PlanOptions(commit_replaced=16))
    assert sum(isinstance(a, Commit) for a in plan.actions) > 4
    spy = _Spy(monkeypatch)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, MasterReader(str(m), None, ms.held).local_sends, summary, split=True)
    assert len(spy.pids) == 1
    new = [p for p in spec if (r / p).read_bytes() == (m / p).read_bytes()]
    old = [p for p in spec if (r / p).read_bytes() == before[p]]
    assert len(new) + len(old) == E  # every file whole: new or as it was
    assert old and summary.files_written == len(new)
    assert sorted(e.path for e in summary.errors) == sorted(old)
    assert all("writer process died" in str(e) for e in summary.errors)
    for p in new:
        e = rep.current[p]
        assert e.ino == os.lstat(r / p).st_ino and e.digest == ms.manifest.entries[p].digest
    assert any(rep.current[p].trusted is False for p in new)  # (those found in place)
    rep.close()
    settle(m, r)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == len(old)
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == []
