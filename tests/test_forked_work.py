"""Work handed to forked children so that it overlaps the parent's: a local replica's tree walk
beside the master's (scan.Prewalk), and the master cache's save beside the replicas' work
(state.save_manifest_file_forked).

A prewalk child lists and lstats, and given the cache classifies the walk against it when few
files need reading. A prewalked scan must equal a plain scan for every kind of change (entries,
walk order, fingerprint, and the parent's own cache objects where a plain scan reuses them), a
child that meets a problem must leave the walk (and the report) to the parent, and no child may outlive the run it served, even when the run
stops. A cache saved by a child is complete when the run returns, and a failed save is reported.
"""

from __future__ import annotations

import os
import threading

import pytest

try:
    import sshd as _sshd_plugin
    import treecmp
    from helpers import Link, build_tree, overwrite_same_size_and_mtime, read, settle, sync_json, write
    from remote_helpers import ssh_options, ssh_spec
    from test_fingerprint import MUTATIONS, TREE, saved_scan
except ImportError:  # tests/ imported as a package
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import Link, build_tree, overwrite_same_size_and_mtime, read, settle, sync_json, write
    from tests.remote_helpers import ssh_options, ssh_spec
    from tests.test_fingerprint import MUTATIONS, TREE, saved_scan

pytest_plugins = [_sshd_plugin.__name__]

from dirsync import scan as scan_mod
from dirsync.chunking import CHUNKER_ID
from dirsync.manifest import SavedManifest
from dirsync.scan import Excluder, Prewalk, scan_tree


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_unchanged_tree_sends_only_the_fingerprint(tmp_path):
    root = tmp_path / "t"
    build_tree(root, TREE)
    first, saved = saved_scan(root)
    pw = Prewalk.start(str(root), Excluder(), saved.fingerprint, saved)
    assert pw is not None
    assert not pw.first_news()  # no classifying to wait for: the cache need not be decoded
    fp, items, temps, links = pw.result()
    assert fp == first.fingerprint and items is None and temps == []
    assert _reaped(pw.pid)
    pw2 = Prewalk.start(str(root), Excluder(), saved.fingerprint)
    res = scan_tree(str(root), cache=saved, walked=pw2)
    assert res.unchanged and not res.decoded and res.fingerprint == first.fingerprint


@pytest.mark.parametrize("mutate", MUTATIONS, ids=[m.__name__.strip("_") for m in MUTATIONS])
def test_prewalked_scan_sees_every_change(tmp_path, mutate):
    root = tmp_path / "t"
    build_tree(root, TREE)
    first, saved = saved_scan(root)
    mutate(root)
    pw = Prewalk.start(str(root), Excluder(), saved.fingerprint)
    assert pw is not None
    res = scan_tree(str(root), cache=saved, walked=pw)
    plain = scan_tree(str(root), cache=saved)
    assert res.manifest == plain.manifest == scan_tree(str(root)).manifest
    assert res.fingerprint == plain.fingerprint != first.fingerprint
    assert not res.unchanged
    assert _reaped(pw.pid)


@pytest.mark.parametrize("mutate", [m for m in MUTATIONS if m.__name__ != "_fifo"],
                         ids=[m.__name__.strip("_") for m in MUTATIONS if m.__name__ != "_fifo"])
def test_child_given_the_cache_classifies_and_the_parent_keeps_its_own_entries(tmp_path, mutate):
    """With the cache, the child also classifies (few files to read) and sends the paths and
    only the entries that are not the cache's: the parent's scan must equal a plain one in
    entries, walk order, fingerprint and reads, with the parent's own cache objects wherever a
    plain scan reuses them (saving and the two-way scope rely on that identity)."""
    root = tmp_path / "t"
    build_tree(root, TREE)
    _, saved = saved_scan(root)
    mutate(root)
    pw = Prewalk.start(str(root), Excluder(), saved.fingerprint, saved)
    assert pw.first_news()  # it says so before it classifies (the parent decodes meanwhile)
    got = pw.result()
    assert got is not None and got[0] == "classified"
    pw = Prewalk.start(str(root), Excluder(), saved.fingerprint, saved)
    res = scan_tree(str(root), cache=saved, walked=pw)
    plain = scan_tree(str(root), cache=saved)
    assert res.manifest == plain.manifest == scan_tree(str(root)).manifest
    assert list(res.manifest.entries) == list(plain.manifest.entries)
    assert (res.fingerprint, res.unchanged, res.files_read, res.bytes_read) == \
        (plain.fingerprint, plain.unchanged, plain.files_read, plain.bytes_read)
    cached = saved.manifest.entries
    reused = [p for p, e in res.manifest.entries.items() if cached.get(p) is e]
    assert reused and reused == [p for p, e in plain.manifest.entries.items() if cached.get(p) is e]
    assert _reaped(pw.pid)


def test_a_cache_whose_rows_do_not_decode_is_reported_once(tmp_path):
    """A cache that passes its checksum but whose rows do not decode (only by tampering): the
    child cannot classify and hands over the stats, the parent's early decode stays quiet, and
    the scan reports it once, reads every file and takes nothing from it."""
    root = tmp_path / "t"
    build_tree(root, TREE)
    settle(root)
    bad = SavedManifest(CHUNKER_ID, "g", b"\0" * 24, 3, b"\x93\xa1x\xc1", own=True)
    pw = Prewalk.start(str(root), Excluder(), bad.fingerprint, bad)
    assert pw.first_news()
    res = scan_tree(str(root), cache=bad, walked=pw)
    assert res.cache_failed and [w for w in res.warnings if "scan cache unusable" in w] == res.warnings
    assert len(res.warnings) == 1
    plain = scan_tree(str(root))
    assert res.manifest == plain.manifest and res.files_read == plain.files_read == 4
    assert _reaped(pw.pid)


def test_child_leaves_a_mostly_changed_tree_to_the_parent(tmp_path):
    """More than an eighth of the files to read (a cold or stale cache): the child reads none
    and sends the stats, and the parent reads them (with its progress), as before."""
    root = tmp_path / "t"
    tree = {f"d{i}/f{j}.txt": f"{i} {j}\n" for i in range(4) for j in range(8)}
    build_tree(root, tree)
    _, saved = saved_scan(root)
    for name in list(tree)[:8]:
        write(root / name, "changed\n")
    pw = Prewalk.start(str(root), Excluder(), saved.fingerprint, saved)
    fp, items, temps, links = pw.result()
    assert items is not None and len(items) == 1 + 4 + 32
    pw = Prewalk.start(str(root), Excluder(), saved.fingerprint, saved)
    res = scan_tree(str(root), cache=saved, walked=pw)
    assert res.manifest == scan_tree(str(root)).manifest and res.files_read == 8


def test_excluded_paths_stay_out(tmp_path):
    root = tmp_path / "t"
    build_tree(root, {**TREE, "skip/me.txt": "x\n", "keep.log": "y\n"})
    ex = Excluder(["skip/", "*.log"])
    pw = Prewalk.start(str(root), ex, b"")
    res = scan_tree(str(root), excluder=ex, walked=pw)
    assert res.manifest == scan_tree(str(root), excluder=Excluder(["skip/", "*.log"])).manifest
    assert "skip" not in res.manifest.entries and "keep.log" not in res.manifest.entries


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 directory")
def test_unreadable_directory_is_left_to_the_parent(tmp_path):
    root = tmp_path / "t"
    build_tree(root, {**TREE, "locked/x.txt": "x\n"})
    os.chmod(root / "locked", 0)
    try:
        pw = Prewalk.start(str(root), Excluder(), b"")
        assert pw is not None and pw.result() is None  # the child reports nothing: no decision there
        pw = Prewalk.start(str(root), Excluder(), b"")
        res = scan_tree(str(root), walked=pw)
        assert [e.path for e in res.errors] == ["locked"] and "locked" in res.protect
    finally:
        os.chmod(root / "locked", 0o755)


def test_special_file_is_left_to_the_parent(tmp_path):
    root = tmp_path / "t"
    build_tree(root, TREE)
    os.mkfifo(root / "sub/pipe")
    pw = Prewalk.start(str(root), Excluder(), b"")
    assert pw is not None and pw.result() is None
    pw = Prewalk.start(str(root), Excluder(), b"")
    res = scan_tree(str(root), walked=pw)
    assert "sub/pipe" not in res.manifest.entries and res.warnings  # skipped with a warning, as ever


def test_child_that_dies_leaves_the_walk_to_the_parent(tmp_path):
    root = tmp_path / "t"
    build_tree(root, TREE)
    pw = Prewalk.start(str(root), Excluder(), b"")
    os.kill(pw.pid, 9)  # whatever it had written is discarded unless it is whole
    res = scan_tree(str(root), walked=pw)
    assert res.manifest == scan_tree(str(root)).manifest
    assert _reaped(pw.pid)


def test_cancel_kills_and_reaps(tmp_path):
    root = tmp_path / "t"
    build_tree(root, {f"d{i}/f{j}": "x" for i in range(30) for j in range(30)})
    pw = Prewalk.start(str(root), Excluder(), b"")  # 900 entries: more than a pipe holds, so it waits
    pw.cancel()
    assert _reaped(pw.pid) and pw.result() is None


def test_not_forked_while_other_threads_run(tmp_path):
    build_tree(tmp_path / "t", TREE)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert Prewalk.start(str(tmp_path / "t"), Excluder(), b"") is None
    finally:
        stop.set()
        t.join()


@pytest.fixture
def spy_prewalks(monkeypatch):
    """Record every Prewalk a run starts (the real ones: nothing is replaced)."""
    started: list[Prewalk] = []
    real = Prewalk.start.__func__

    def start(cls, *a, **kw):
        pw = real(cls, *a, **kw)
        if pw is not None:
            started.append(pw)
        return pw

    monkeypatch.setattr(scan_mod.Prewalk, "start", classmethod(start))
    return started


def test_sync_walks_local_replicas_in_children_and_converges(tmp_path, spy_prewalks):
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync

    m, r1, r2 = tmp_path / "m", tmp_path / "r1", tmp_path / "r2"
    build_tree(m, TREE)
    cfg = SyncConfig(master=str(m), replicas=(str(r1), str(r2)), init=True)
    if threading.active_count() != 1:
        pytest.skip("another thread runs in this test process: no fork")
    run = run_sync(cfg, Reporter(quiet=True))
    assert [s.exit_code for s in run.replicas] == [0, 0]
    cfg = SyncConfig(master=str(m), replicas=(str(r1), str(r2)))
    assert len(spy_prewalks) == 2 and all(_reaped(p.pid) for p in spy_prewalks)
    # A change made on a replica behind the master's back is seen through the child's walk.
    settle(m, r1, r2)
    write(r1 / "a.txt", "tampered\n")
    os.unlink(r2 / "sub/b.txt")
    run = run_sync(cfg, Reporter(quiet=True))
    assert [s.exit_code for s in run.replicas] == [0, 0]
    assert read(r1 / "a.txt") == read(m / "a.txt") and read(r2 / "sub/b.txt") == read(m / "sub/b.txt")
    assert len(spy_prewalks) == 4 and all(_reaped(p.pid) for p in spy_prewalks)


def test_interrupted_master_scan_reaps_children_and_unlocks(tmp_path, spy_prewalks, monkeypatch):
    from dirsync import sync as sync_mod
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync

    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    sync_json(m, r, args=("--init",))
    if threading.active_count() != 1:
        pytest.skip("another thread runs in this test process: no fork")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(sync_mod, "scan_master", interrupted)  # the fault: Ctrl-C mid master scan
    with pytest.raises(KeyboardInterrupt):
        run_sync(SyncConfig(master=str(m), replicas=(str(r),)), Reporter(quiet=True))
    assert len(spy_prewalks) == 1 and _reaped(spy_prewalks[0].pid)
    monkeypatch.undo()
    _, out = sync_json(m, r)  # the replica and pair locks were released
    assert out["replicas"][0]["exit_code"] == 0


def test_master_cache_saved_by_a_child_is_complete_when_the_run_returns(tmp_path, monkeypatch):
    from dirsync import chunking, state
    from dirsync import sync as sync_mod
    from dirsync.progress import Reporter
    from dirsync.scan import scan_tree as plain_scan
    from dirsync.sync import SyncConfig, run_sync

    if threading.active_count() != 1:
        pytest.skip("another thread runs in this test process: no fork")
    pending: list = []
    real = state.save_manifest_file_forked

    def spy(*a, **kw):
        p = real(*a, **kw)
        pending.append(p)
        return p

    monkeypatch.setattr(sync_mod, "save_manifest_file_forked", spy)
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    run = run_sync(SyncConfig(master=str(m), replicas=(str(r),), init=True), Reporter(quiet=True))
    assert run.replicas[0].exit_code == 0
    assert len(pending) == 1 and pending[0] is not None and _reaped(pending[0].pid)
    got = state.load_manifest_file(state.master_cache_path(str(m.resolve())), chunking.CHUNKER_ID)
    assert got.status == "ok"
    got.manifest.entries.pop(".dirsync", None)
    assert got.manifest == plain_scan(str(m)).manifest


def test_failed_save_in_the_child_is_reported(tmp_path):
    import io

    from dirsync import state
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync

    if threading.active_count() != 1:
        pytest.skip("another thread runs in this test process: no fork")
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    cache = state.master_cache_path(str(m.resolve()))
    os.makedirs(os.path.join(cache, "in-the-way"))  # a non-empty directory: the rename must fail
    err = io.StringIO()
    run = run_sync(SyncConfig(master=str(m), replicas=(str(r),), init=True), Reporter(err))
    assert run.replicas[0].exit_code == 0 and read(r / "a.txt") == read(m / "a.txt")
    assert "could not save the master cache" in err.getvalue()
    assert os.listdir(os.path.dirname(cache)) == [os.path.basename(cache)]  # no temp left behind


def test_with_a_remote_replica_the_master_is_walked_by_a_child(sshd, tmp_path, spy_prewalks):
    # The master's walk overlaps the import of paramiko and the SSH connect; every change on
    # the master still arrives, even one that keeps size and mtime.
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync

    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    if threading.active_count() != 1:
        pytest.skip("another thread runs in this test process: no fork")
    spec = ssh_spec(sshd, r)
    cfg = SyncConfig(master=str(m), replicas=(spec,), init=True, transport=ssh_options(sshd))
    run = run_sync(cfg, Reporter(quiet=True))
    assert run.replicas[0].exit_code == 0 and read(r / "sub/b.txt") == read(m / "sub/b.txt")
    assert [p for p in spy_prewalks] and all(_reaped(p.pid) for p in spy_prewalks)
    settle(m, r)
    overwrite_same_size_and_mtime(m / "sub/b.txt", b"BETA\n")
    cfg = SyncConfig(master=str(m), replicas=(spec,), transport=ssh_options(sshd))
    if threading.active_count() != 1:
        pytest.skip("the first run left a thread behind: no fork")
    n = len(spy_prewalks)
    run = run_sync(cfg, Reporter(quiet=True))
    assert run.replicas[0].exit_code == 0 and read(r / "sub/b.txt") == b"BETA\n"
    assert len(spy_prewalks) == n + 1 and _reaped(spy_prewalks[-1].pid)


def test_a_run_pauses_the_garbage_collector_and_restores_it(tmp_path):
    """runtime.gc_paused around run_sync: off while the run works, as it was afterwards."""
    import gc

    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync

    m = tmp_path / "m"
    build_tree(m, TREE)
    seen: list[bool] = []

    def should_stop() -> bool:
        seen.append(gc.isenabled())
        return False

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            run = run_sync(SyncConfig(master=str(m), replicas=(str(tmp_path / f"r{enabled}"),), init=True),
                           Reporter(quiet=True), should_stop)
            assert run.replicas[0].exit_code == 0 and seen and not any(seen)
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
        seen.clear()


def test_a_progress_bar_starts_no_thread(tmp_path):
    """A terminal's progress bar must not start tqdm's monitor thread: a second thread rules
    out every forked child (walks, parallel chunking, cache saves) for the rest of the process."""
    import io

    from dirsync.progress import TqdmReporter

    before = threading.active_count()
    rep = TqdmReporter(io.StringIO())
    rep.begin("replica", 1 << 20)
    try:
        rep.advance(1 << 19)
        assert threading.active_count() == before
    finally:
        rep.close()


# -- the agent's walk with two processes (scan._Scanner.gather_split) --------------------------

SPLIT_TREE = {
    **TREE,
    **{f"top{i}/d{j}/f{k}.txt": f"{i} {j} {k}\n" for i in range(5) for j in range(3) for k in range(4)},
    "top1/d0/ln": Link("f0.txt"),
    "top3/.dirsync-tmp-3-abcd": "a temp a crashed run left\n",
    "top4/d2/empty": {},
}


def _walk(root, split: bool):
    s = scan_mod._Scanner(str(root), Excluder(), None)
    s.split = split
    items, fp = s.walk_root()
    return s, items, fp


def _same_walk(root) -> None:
    one, items1, fp1 = _walk(root, False)
    two, items2, fp2 = _walk(root, True)
    assert sorted(items2) == sorted(items1) and len(items2) == len(items1)
    pos = {rel: i for i, (rel, _) in enumerate(items2)}
    assert all(pos[rel.rpartition("/")[0]] < pos[rel] for rel in pos if rel)  # a directory before its contents
    assert fp2 == fp1 and two.links == one.links and sorted(two.result.temps) == sorted(one.result.temps)
    assert [e.path for e in two.result.errors] == [e.path for e in one.result.errors] and two.fp_ok == one.fp_ok


@pytest.mark.parametrize("mutate", [None, *MUTATIONS], ids=["as-is", *(m.__name__.strip("_") for m in MUTATIONS)])
def test_a_split_walk_finds_what_one_process_finds(tmp_path, mutate):
    root = tmp_path / "t"
    build_tree(root, SPLIT_TREE)
    if mutate is not None:
        mutate(root)
    _same_walk(root)
    _, items, _ = _walk(root, True)
    assert "top3/.dirsync-tmp-3-abcd" not in dict(items)


def _count_forks(monkeypatch) -> list[bool]:
    """scan's forks from now on: True for each child forked, False for each refused."""
    forks: list[bool] = []
    real = scan_mod.fork_answering

    def counting(work, threads_ok=False):
        got = real(work, threads_ok)
        forks.append(got is not None)
        return got

    monkeypatch.setattr(scan_mod, "fork_answering", counting)
    return forks


def test_a_split_walk_forks_beside_another_thread_and_survives_its_child_dying(tmp_path, monkeypatch):
    """The agent's pinger thread runs while it scans: the split walk forks all the same (its
    child takes no lock). A child that dies before answering leaves its share to the parent."""
    root = tmp_path / "t"
    build_tree(root, SPLIT_TREE)
    forks = _count_forks(monkeypatch)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        _same_walk(root)
        assert forks == [True]
        monkeypatch.setattr(scan_mod._Scanner, "_walk_child", lambda self, dirs, w, dumps: os.kill(os.getpid(), 9))
        _same_walk(root)
        assert forks == [True, True]
    finally:
        stop.set()
        t.join()


def test_scan_tree_splits_only_a_large_tree_and_only_when_asked(tmp_path, monkeypatch):
    root = tmp_path / "t"
    build_tree(root, SPLIT_TREE)
    first, saved = saved_scan(root)
    calls = []
    real = scan_mod._Scanner.gather_split
    monkeypatch.setattr(scan_mod._Scanner, "gather_split", lambda self, items: calls.append(1) or real(self, items))
    write(root / "top0/d0/f0.txt", "changed\n")
    assert scan_tree(str(root), cache=saved, split=True).manifest == scan_tree(str(root), cache=saved).manifest
    assert calls == []  # fewer entries than SPLIT_MIN: one process
    monkeypatch.setattr(scan_mod, "SPLIT_MIN", 10)
    res = scan_tree(str(root), cache=saved, split=True)
    assert calls == [1] and res.manifest == scan_tree(str(root), cache=saved).manifest
    assert res.manifest.entries["top0/d0/f0.txt"].size == len("changed\n")


# -- the master scan's reads with two processes (scan._Scanner._read_share) ------------------------

def _entries_equal(a, b) -> None:
    assert list(a.manifest.entries) == list(b.manifest.entries)  # the same paths, in walk order
    for p, e in a.manifest.entries.items():
        f = b.manifest.entries[p]
        assert e == f and getattr(e, "trusted", None) == getattr(f, "trusted", None), p


def _held_ok(res, root, limit) -> None:
    assert sum(len(buf) for _, buf in res.held.values()) <= limit
    for rel, (whole, buf) in res.held.items():
        assert buf == read(root / rel) and whole == res.manifest.entries[rel].digest


@pytest.fixture
def small_split(monkeypatch):
    monkeypatch.setattr(scan_mod, "READ_SPLIT_MIN", 8)


def test_split_reads_give_the_entries_one_process_gives(tmp_path, small_split):
    root = tmp_path / "t"
    build_tree(root, SPLIT_TREE)
    os.mkfifo(root / "top2/pipe")
    settle(root)
    plain = scan_tree(str(root), hold=1 << 20)
    split = scan_tree(str(root), hold=1 << 20, split_reads=True)
    _entries_equal(plain, split)
    assert (split.files_read, split.bytes_read) == (plain.files_read, plain.bytes_read) and split.files_read > 60
    assert split.warnings == plain.warnings and len(split.warnings) == 1  # the FIFO, once
    _held_ok(split, root, 1 << 20)
    assert set(split.held) == set(plain.held)  # (everything fits)
    small = scan_tree(str(root), hold=5000, split_reads=True)  # a budget both processes share
    _held_ok(small, root, 5000)
    assert small.held


def test_split_reads_report_files_replaced_while_scanned_in_either_share(tmp_path, small_split):
    root = tmp_path / "t"
    build_tree(root, SPLIT_TREE)
    s = scan_mod._Scanner(str(root), Excluder(), None)
    s.split_reads = True
    items, _ = s.walk_root()
    files = [rel for rel, st in items if st[0] & 0o170000 == 0o100000]
    swapped = files[10:12] + files[-12:-10]  # two in each process's share (the first half, the second)
    for rel in swapped:  # a new inode under the walked name: "replaced while being scanned"
        write(root / (rel + ".new"), "new\n")
        os.replace(root / (rel + ".new"), root / rel)
    s.classify(items)
    assert sorted(e.path for e in s.result.errors) == sorted(swapped)
    assert set(swapped) <= s.result.protect and not set(swapped) & set(s.entries)
    assert len(s.entries) == len(items) - len(swapped)


def test_split_reads_fork_beside_a_thread_and_survive_their_child_dying(tmp_path, small_split, monkeypatch):
    root = tmp_path / "t"
    build_tree(root, SPLIT_TREE)
    settle(root)
    plain = scan_tree(str(root), hold=1 << 20)
    forks = _count_forks(monkeypatch)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)  # as when a remote replica was connected first
    t.start()
    try:
        _entries_equal(plain, scan_tree(str(root), hold=1 << 20, split_reads=True))
        monkeypatch.setattr(scan_mod._Scanner, "_read_child", lambda *a: os.kill(os.getpid(), 9))
        exact = sum(len(buf) for _, buf in plain.held.values())  # just enough to hold every small file
        again = scan_tree(str(root), hold=exact, split_reads=True)
        _entries_equal(plain, again)
        _held_ok(again, root, exact)
        # the dead child's half of the budget came back (the parent's own half holds at most half)
        assert sum(len(buf) for _, buf in again.held.values()) > exact // 2
    finally:
        stop.set()
        t.join()
    assert forks == [True, True]


def test_an_initial_copy_of_many_files_read_by_two_processes_converges(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    n = scan_mod.READ_SPLIT_MIN + 200
    build_tree(m, {f"d{i % 7}/f{i:05d}.txt": f"file {i}\n" * (i % 50) for i in range(n)})
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == n and out["master_scan"]["files_hashed"] == n
    treecmp.assert_trees_equal(m, r)
