"""Directories a run creates are built under a temp name and renamed into place once what was
committed in them is durable (Replica.publish): the files inside are written at their own
names, which saves a rename per file on an initial copy.

What must hold: nothing is visible at a final path before publish; a directory that appears
at the same name meanwhile is merged without replacing anything (a clash is a conflict, the
replica's entry wins); a file that appears there wins outright; a run killed with -9 leaves only
temp-named directories, which the next run removes without following symlinks in them; and
the cache a run saves describes exactly the published tree. Real files, no mocks.
"""

from __future__ import annotations

import os
import signal

import pytest

from dirsync.apply import MasterReader
from dirsync.errors import ConflictError
from dirsync.plan import Commit, MakeDir, PlanOptions, SetMeta, WriteFile, diff
from dirsync.replica import Replica
from dirsync.scan import TMP_PREFIX, Excluder, scan_tree

try:
    import treecmp
    from helpers import build_tree, kill_group, popen_cli, random_bytes, read, run_cli, stray_temps, sync_json, \
        tmp_entries, wait_for, write
except ImportError:
    from tests import treecmp
    from tests.helpers import build_tree, kill_group, popen_cli, random_bytes, read, run_cli, stray_temps, \
        sync_json, tmp_entries, wait_for, write


def _fresh_names(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith(TMP_PREFIX))


def _stage_and_commit(m, r) -> Replica:
    """Open replica r, carry out the plan from master m up to (not including) publish: every
    MakeDir, WriteFile and Commit, stopping at the first other action."""
    mscan = scan_tree(str(m))
    rep = Replica(str(r))
    rep.open(init=True)
    rscan = rep.manifest(Excluder())
    plan = diff(mscan.manifest, rscan.manifest, PlanOptions())
    reader = MasterReader(str(m))
    for a in plan.actions:
        if isinstance(a, MakeDir):
            rep.make_dir(a)
        elif isinstance(a, WriteFile):
            rep.stage(a, reader.sends(a))
        elif isinstance(a, Commit):
            assert all(err is None for _, err in rep.commit(a.paths))
        else:
            assert isinstance(a, SetMeta), a
            break
    return rep


def _open_and_stage(m, r, paths: tuple[str, ...]) -> Replica:
    """Open replica r, make the plan's directories (from master m) and stage `paths`, committing
    nothing."""
    mscan = scan_tree(str(m))
    rep = Replica(str(r))
    rep.open(init=True)
    plan = diff(mscan.manifest, rep.manifest(Excluder()).manifest, PlanOptions())
    writes = {a.path: a for a in plan.actions if isinstance(a, WriteFile)}
    for a in plan.actions:
        if isinstance(a, MakeDir):
            rep.make_dir(a)
    reader = MasterReader(str(m))
    for p in paths:
        rep.stage(writes[p], reader.sends(writes[p]))
    return rep


def test_new_directories_appear_only_when_published(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"top.txt": b"t", "d": {"f": b"one", "e": {"g": random_bytes(3 << 20, 1)}}, "d2": {"h": b"h"}})
    rep = _stage_and_commit(m, r)
    try:
        assert read(r / "top.txt") == b"t"  # a file in an existing directory: committed in place
        assert not os.path.lexists(r / "d") and not os.path.lexists(r / "d2")
        fresh = _fresh_names(r)
        assert len(fresh) == 2  # d and d2; d/e is made inside d's temp under its own name
        inside = {n: sorted(os.listdir(r / n)) for n in fresh}
        assert sorted(inside.values()) == [["e", "f"], ["h"]]
        assert rep.publish() == []
        assert _fresh_names(r) == []
        assert read(r / "d" / "f") == b"one" and read(r / "d" / "e" / "g") == random_bytes(3 << 20, 1)
        assert read(r / "d2" / "h") == b"h"
        assert {"d", "d/f", "d/e", "d/e/g", "d2", "d2/h"} <= set(rep.current)
    finally:
        rep.close()
    # The cache the run saved is the tree: a sync now only sets directory metadata, writes nothing.
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 0
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == []


def test_a_directory_that_appears_meanwhile_is_merged_and_keeps_its_entries(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"d": {"ours": b"ours", "both": b"master's", "sub": {"deep": b"deep"}}})
    rep = _stage_and_commit(m, r)
    try:
        build_tree(r / "d", {"both": b"someone else's", "theirs": b"theirs", "sub": {"x": b"x"}})
        failed = rep.publish()
        assert [p for p, _ in failed] == ["d/both"] and isinstance(failed[0][1], ConflictError)
        assert read(r / "d" / "ours") == b"ours" and read(r / "d" / "sub" / "deep") == b"deep"
        assert read(r / "d" / "both") == b"someone else's" and read(r / "d" / "theirs") == b"theirs"
        assert read(r / "d" / "sub" / "x") == b"x"
        assert _fresh_names(r) == []
        assert "d/ours" in rep.current and "d/sub/deep" in rep.current and "d/both" not in rep.current
        # Later writes into d go to the directory now there, not to the removed temp.
        assert os.fstat(rep._dirfd("d")).st_ino == os.stat(r / "d").st_ino
        assert os.fstat(rep._dirfd("d/sub")).st_ino == os.stat(r / "d" / "sub").st_ino
    finally:
        rep.close()


def test_a_file_that_appears_at_the_directorys_name_wins(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"d": {"f": b"f", "e": {"g": b"g"}}})
    rep = _stage_and_commit(m, r)
    try:
        write(r / "d", b"a file took the name")
        failed = rep.publish()
        assert [p for p, _ in failed] == ["d"]
        assert read(r / "d") == b"a file took the name"
        assert _fresh_names(r) == []
        assert not [p for p in rep.current if p == "d" or p.startswith("d/")]
    finally:
        rep.close()


def test_a_file_staged_but_not_committed_is_never_published(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"d": {"a": b"a", "b": b"b"}})
    rep = _open_and_stage(m, r, ("d/a", "d/b"))
    assert rep.commit(("d/a",)) == [("d/a", None)]
    try:
        assert [p for p, _ in rep.publish()] == ["d/b"]
        assert sorted(os.listdir(r / "d")) == ["a"]
        assert "d/b" not in rep.current and "d/b" not in rep.staged
    finally:
        rep.close()


def test_close_without_publish_puts_committed_files_in_place_and_drops_the_rest(tmp_path):
    """An interrupted run: what was committed is published by close, a file staged but not
    committed is never seen."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"d": {"a": b"a", "b": b"b"}})
    rep = _open_and_stage(m, r, ("d/a", "d/b"))
    assert rep.commit(("d/a",)) == [("d/a", None)]
    rep.close()
    assert sorted(os.listdir(r / "d")) == ["a"] and read(r / "d" / "a") == b"a"
    assert _fresh_names(r) == [] and tmp_entries(r) == []
    cp = run_cli("sync", m, r)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, r)


@pytest.mark.slow
def test_kill_9_mid_initial_copy_shows_nothing_half_done_and_the_next_run_converges(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {f"d{i:02d}": {f"f{j:03d}.txt": f"{i} {j}\n".encode() * (j % 7 + 1) for j in range(150)}
                   for i in range(40)})
    p = popen_cli("sync", m, r)
    try:
        wait_for(lambda: (os.path.isdir(r) and _fresh_names(r)) or p.poll() is not None, 60,
                 what="a directory under its temp name")
        assert p.poll() is None, f"sync ended before it could be killed: {p.communicate()}"
        kill_group(p, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            kill_group(p)
            p.wait(10)
    # A directory the run made is either not there or there whole (published only once every
    # file in it was committed): never a partly filled one.
    for d in (n for n in os.listdir(r) if not n.startswith(".dirsync")):
        assert sorted(os.listdir(r / d)) == sorted(os.listdir(m / d)), f"{d} is visible half-filled"
        assert all(read(r / d / f) == read(m / d / f) for f in os.listdir(m / d))
    cp = run_cli("sync", m, r)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == [] and tmp_entries(r) == []


def test_a_crashed_runs_temp_directory_is_removed_without_following_its_symlinks(tmp_path):
    m, r, outside = tmp_path / "m", tmp_path / "r", tmp_path / "outside"
    build_tree(m, {"keep.txt": b"k"})
    build_tree(outside, {"precious": b"p"})
    sync_json(m, r)
    stale = r / f"{TMP_PREFIX}d7-deadbeef"
    build_tree(stale, {"sub": {"f": b"half"}})
    os.symlink(outside, stale / "sub" / "link")
    os.symlink(outside, stale / "link")
    cp = run_cli("sync", m, r)
    assert cp.returncode == 0, cp.stderr
    assert not os.path.lexists(stale)
    assert read(outside / "precious") == b"p"
    treecmp.assert_trees_equal(m, r)


def test_watch_ignores_everything_inside_a_directory_under_a_temp_name(tmp_path):
    """A replica can be another run's master: the files a run writes inside a directory not
    yet in place must not look like changes to a watcher of that tree."""
    import queue
    from types import SimpleNamespace

    from dirsync.watch import _make_handler

    q: queue.SimpleQueue = queue.SimpleQueue()
    root = str(tmp_path)
    h = _make_handler(root, q, ())
    for rel in (f"{TMP_PREFIX}d1-ab/f", f"a/{TMP_PREFIX}d2-ab/b/c", f"a/{TMP_PREFIX}9-ab", "a/b.txt"):
        h.dispatch(SimpleNamespace(src_path=f"{root}/{rel}"))
    seen = []
    while not q.empty():
        seen.append(q.get())
    assert seen == ["a/b.txt"]


def test_a_failed_file_that_cannot_be_removed_keeps_its_new_directory_out_of_sight(tmp_path):
    """A file built at its own name in a new directory failed and could not be removed (here:
    made immutable, which even root cannot unlink): the directory is never put in place, so the
    file is never seen at its final path."""
    import subprocess

    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"d": {"ok": b"ok", "bad": b"bad"}})
    rep = _open_and_stage(m, r, ("d/ok", "d/bad"))
    (fresh,) = _fresh_names(r)
    bad = r / fresh / "bad"
    try:
        if subprocess.run(["chattr", "+i", str(bad)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
        rep.discard("d/bad")  # (what a write whose master file changed meanwhile gets)
        assert os.path.exists(bad)
        assert rep.commit(("d/ok",)) == [("d/ok", None)]
        failed = rep.publish()
        assert [p for p, _ in failed] == ["d"]
        assert not os.path.lexists(r / "d")
        assert "d" not in rep.current and "d/ok" not in rep.current
    finally:
        subprocess.run(["chattr", "-i", str(bad)], capture_output=True)
        rep.close()
    cp = run_cli("sync", m, r)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == []
