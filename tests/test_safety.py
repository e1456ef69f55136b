"""Safety guards, each with its exit code, on real trees through the real CLI.

Guards: a missing / non-directory / unreadable master, a never-synced non-empty replica,
overlapping roots, mass deletion (emptied master, more than half, --max-delete), read errors
under a master directory, corrupt caches, the replica's `.dirsync/` folder, excludes, special
files, and a replica directory swapped for a symlink that points outside the root.
Tests that need "permission denied" drop root privileges (root ignores chmod 000).
"""

from __future__ import annotations

import os
import socket
import stat

import pytest

try:
    import treecmp
    from helpers import (
        J, Link, build_tree, raw_snapshot, read, remove, run_cli, settle, sync_json,
        tmp_entries, write,
    )
except ImportError:
    from tests import treecmp
    from tests.helpers import (
        J, Link, build_tree, raw_snapshot, read, remove, run_cli, settle, sync_json,
        tmp_entries, write,
    )

from dirsync.apply import MasterReader, ReplicaSummary
from dirsync.errors import ExitCode
from dirsync.plan import PlanOptions, diff
from dirsync.manifest import fingerprint
from dirsync.scan import scan_tree
from dirsync.state import master_cache_path
from dirsync.transport.local import LocalTransport

REFUSED, DELETE_LIMIT, PARTIAL = int(ExitCode.REFUSED), int(ExitCode.DELETE_LIMIT), int(ExitCode.PARTIAL)

TREE = {
    "a.txt": b"alpha\n",
    "b.txt": b"bravo\n",
    "docs": {"guide.md": b"guide\n", "notes.md": b"notes\n"},
    "src": {"main.py": b"print('hi')\n", "lib": {"util.py": b"x = 1\n"}},
    "link": Link("a.txt"),
}


def synced_pair(tmp_path, tree=TREE):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, tree)
    sync_json(m, r)
    treecmp.assert_trees_equal(m, r)
    return m, r


def one_line_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# -- the master ---------------------------------------------------------------------


def test_master_missing_is_refused_and_replica_untouched(tmp_path):
    m, r = synced_pair(tmp_path)
    before = raw_snapshot(r)
    remove(m)
    cp = run_cli("sync", m, r)
    assert cp.returncode == REFUSED, cp.stderr
    assert "does not exist" in cp.stderr and str(m) in cp.stderr
    assert raw_snapshot(r) == before


def test_master_not_a_directory_is_refused(tmp_path):
    m, r = synced_pair(tmp_path)
    before = raw_snapshot(r)
    remove(m)
    write(m, b"a file where the master was\n")
    cp = run_cli("sync", m, r)
    assert cp.returncode == REFUSED and "not a directory" in cp.stderr, cp.stderr
    assert raw_snapshot(r) == before


def test_master_unreadable_root_is_refused(unpriv):
    m, r = unpriv.path("m"), unpriv.path("r")
    build_tree(m, TREE)
    unpriv.own(m)
    cp = unpriv.run("sync", m, r)
    assert cp.returncode == 0, cp.stderr
    unpriv.own(r)
    before = raw_snapshot(r)
    os.chmod(m, 0)
    try:
        cp = unpriv.run("sync", m, r)
    finally:
        os.chmod(m, 0o755)
    assert cp.returncode == REFUSED, cp.stderr
    assert "unreadable" in cp.stderr or "Permission denied" in cp.stderr, cp.stderr
    assert raw_snapshot(r) == before


def test_master_through_a_symlink_works(tmp_path):
    m = tmp_path / "real-master"
    build_tree(m, TREE)
    os.symlink(m, tmp_path / "master-link")
    r = tmp_path / "r"
    sync_json(tmp_path / "master-link", r)
    treecmp.assert_trees_equal(m, r)


# -- the replica root ------------------------------------------------------------------


def test_nonempty_never_synced_replica_needs_init(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    build_tree(r, {"precious.txt": b"someone's data\n", "a.txt": b"other\n"})
    before = raw_snapshot(r)
    cp = run_cli("sync", m, r)
    assert cp.returncode == REFUSED, cp.stderr
    assert "never synced" in cp.stderr and "--init" in cp.stderr
    assert raw_snapshot(r) == before, "a refused replica was changed"

    cp = run_cli("plan", m, r)  # plan refuses the same way and changes nothing
    assert cp.returncode == REFUSED and raw_snapshot(r) == before

    sync_json(m, r, args=("--init",))
    treecmp.assert_trees_equal(m, r)
    # Marked now: no --init needed any more.
    write(m / "a.txt", b"changed\n")
    sync_json(m, r)
    treecmp.assert_trees_equal(m, r)


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_new_or_empty_replica_is_initialised_automatically(tmp_path, how):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    if how == "empty":
        os.mkdir(r)
    sync_json(m, r)
    treecmp.assert_trees_equal(m, r)
    assert os.path.isfile(r / ".dirsync/replica.json")


def test_replica_whose_parent_is_missing_is_a_usage_error(tmp_path):
    m = tmp_path / "m"
    build_tree(m, TREE)
    cp = run_cli("sync", m, tmp_path / "no" / "such" / "r")
    assert cp.returncode == int(ExitCode.USAGE), cp.stderr
    assert "parent directory does not exist" in cp.stderr
    assert not os.path.exists(tmp_path / "no")


@pytest.mark.parametrize("case", ["same", "replica-inside", "master-inside", "symlink-to-master",
                                  "symlink-into-master", "master-symlink-into-replica", "dotdot"])
def test_overlapping_roots_are_refused(tmp_path, case):
    m = tmp_path / "m"
    build_tree(m, TREE)
    os.mkdir(tmp_path / "other")
    master, replica = m, None
    if case == "same":
        replica = m
    elif case == "replica-inside":
        replica = m / "src" / "r"
    elif case == "master-inside":
        master, replica = m / "src", m
    elif case == "symlink-to-master":
        os.symlink(m, tmp_path / "alias")
        replica = tmp_path / "alias"
    elif case == "symlink-into-master":
        os.symlink(m / "docs", tmp_path / "alias")
        replica = tmp_path / "alias"
    elif case == "master-symlink-into-replica":
        os.symlink(m / "src", tmp_path / "alias")
        master, replica = tmp_path / "alias", m
    elif case == "dotdot":
        replica = f"{tmp_path}/other/../m/docs/"
    before = raw_snapshot(tmp_path)
    cp = run_cli("sync", master, replica)
    assert cp.returncode == REFUSED, cp.stderr
    assert "overlaps" in cp.stderr
    assert raw_snapshot(tmp_path) == before, "a refused run changed something"


@pytest.mark.parametrize("case", ["nested", "nested-reversed", "nested-through-symlink", "same-twice"])
def test_replicas_overlapping_each_other_are_refused(tmp_path, case):
    """One replica inside another: each run the outer one deleted the inner one (its files and
    its .dirsync/ state) and the inner one rewrote everything, forever, with exit 0."""
    m = tmp_path / "m"
    build_tree(m, TREE)
    outer = tmp_path / "r"
    if case == "nested":
        replicas = (outer, outer / "sub")
    elif case == "nested-reversed":
        replicas = (outer / "sub", outer)
    elif case == "nested-through-symlink":
        os.mkdir(outer)
        os.symlink(outer, tmp_path / "alias")
        replicas = (outer, tmp_path / "alias" / "inner")
    else:
        replicas = (outer, outer)
    before = raw_snapshot(tmp_path)
    cp = run_cli("sync", m, *replicas)
    assert cp.returncode == REFUSED, cp.stderr
    assert "overlap" in cp.stderr, cp.stderr
    assert raw_snapshot(tmp_path) == before, "a refused run changed something"


def test_overlap_refusal_happens_before_any_replica_is_touched(tmp_path):
    m = tmp_path / "m"
    build_tree(m, TREE)
    good = tmp_path / "good"
    cp = run_cli("sync", m, good, m / "docs")
    assert cp.returncode == REFUSED
    assert not os.path.exists(good), "the good replica was created although the run was refused"


# -- mass deletion ---------------------------------------------------------------------


def many_files(n: int) -> dict:
    return {f"f{i:03d}.txt": f"file {i}\n".encode() for i in range(n)}


def test_emptied_master_is_refused_and_nothing_deleted(tmp_path):
    m, r = synced_pair(tmp_path, {**TREE, "more": many_files(20)})
    before = raw_snapshot(r)
    for name in os.listdir(m):
        remove(m / name)
    cp, out = sync_json(m, r, expect=REFUSED)
    assert "empty" in cp.stderr and "--allow-mass-delete" in cp.stderr
    assert raw_snapshot(r) == before
    rep = out["replicas"][0]
    assert rep["status"] == "refused" and rep["files_deleted"] == 0

    sync_json(m, r, args=("--allow-mass-delete",))
    assert [n for n in os.listdir(r) if n != ".dirsync"] == []


def test_default_guard_deleting_over_half_exits_25_and_deletes_nothing(tmp_path):
    m, r = synced_pair(tmp_path, many_files(30))
    for i in range(25):
        remove(m / f"f{i:03d}.txt")
    write(m / "new.txt", b"a new file still arrives\n")
    write(m / "f029.txt", b"an edit still arrives\n")
    cp, out = sync_json(m, r, expect=DELETE_LIMIT)
    assert all(os.path.exists(r / f"f{i:03d}.txt") for i in range(25)), "something was deleted"
    assert read(r / "new.txt") == read(m / "new.txt") and read(r / "f029.txt") == read(m / "f029.txt")
    rep = out["replicas"][0]
    assert rep["exit_code"] == DELETE_LIMIT and rep["files_deleted"] == 0 and rep["files_written"] == 2
    assert "nothing was deleted" in cp.stderr

    sync_json(m, r, args=("--allow-mass-delete",))
    treecmp.assert_trees_equal(m, r)


def test_max_delete_exceeded_exits_25_and_deletes_nothing(tmp_path):
    m, r = synced_pair(tmp_path, {**TREE, "more": many_files(8)})
    for i in range(4):
        remove(m / f"more/f{i:03d}.txt")
    remove(m / "docs")
    write(m / "added.txt", b"other changes proceed\n")
    before = raw_snapshot(r)
    cp, out = sync_json(m, r, args=("--max-delete", "5"), expect=DELETE_LIMIT)
    after = raw_snapshot(r)
    lost = [p for p in before if p not in after and not p.startswith(b".dirsync")]
    assert lost == [], f"deleted although the guard tripped: {lost}"
    assert read(r / "added.txt") == b"other changes proceed\n"
    assert out["replicas"][0]["files_deleted"] == 0
    assert "--max-delete 5" in cp.stderr

    _, out = sync_json(m, r, args=("--max-delete", "7"))  # 4 files + docs/ and its 2 files = 7
    assert out["replicas"][0]["files_deleted"] == 7
    treecmp.assert_trees_equal(m, r)


def test_max_delete_zero_with_no_deletes_is_fine(tmp_path):
    m, r = synced_pair(tmp_path)
    write(m / "a.txt", b"edited\n")
    sync_json(m, r, args=("--max-delete", "0"))
    treecmp.assert_trees_equal(m, r)


# -- read errors on the master --------------------------------------------------------------


def test_unreadable_master_subdir_disables_deletes_under_it(unpriv):
    m, r = unpriv.path("m"), unpriv.path("r")
    build_tree(m, {**TREE, "secret": {"keep1.txt": b"1\n", "keep2.txt": b"2\n", "inner": {"k3": b"3\n"}}})
    unpriv.own(m)
    assert unpriv.run("sync", m, r).returncode == 0
    treecmp.assert_trees_equal(m, r)
    # The master loses files both inside the unreadable dir and elsewhere, and gains one.
    remove(J(m, "secret/keep1.txt"))
    remove(J(m, "b.txt"))
    write(J(m, "new.txt"), b"new\n")
    unpriv.own(m)
    os.chmod(J(m, "secret"), 0)
    try:
        cp = unpriv.run("sync", "--json", m, r)
    finally:
        os.chmod(J(m, "secret"), 0o755)
    assert cp.returncode == PARTIAL, cp.stderr
    errs = one_line_errors(cp.stderr)
    assert any("secret" in ln and "Permission denied" in ln for ln in errs), cp.stderr
    # Nothing under the unreadable directory was deleted or changed ...
    for p in ("secret/keep1.txt", "secret/keep2.txt", "secret/inner/k3"):
        assert os.path.isfile(J(r, p)), f"{p} was deleted under an unreadable master directory"
    assert stat.S_IMODE(os.stat(J(r, "secret")).st_mode) == 0o755
    # ... while the rest of the tree was synced (deletes included).
    assert not os.path.exists(J(r, "b.txt"))
    assert read(J(r, "new.txt")) == b"new\n"

    unpriv.own(m)
    assert unpriv.run("sync", m, r).returncode == 0
    treecmp.assert_trees_equal(m, r)


def test_unreadable_master_file_keeps_old_replica_copy(unpriv):
    m, r = unpriv.path("m"), unpriv.path("r")
    build_tree(m, TREE)
    unpriv.own(m)
    assert unpriv.run("sync", m, r).returncode == 0
    write(J(m, "a.txt"), b"new content nobody can read\n")
    write(J(m, "b.txt"), b"readable edit\n")
    unpriv.own(m)
    os.chmod(J(m, "a.txt"), 0)
    try:
        cp = unpriv.run("sync", m, r)
    finally:
        os.chmod(J(m, "a.txt"), 0o644)
    assert cp.returncode == PARTIAL, cp.stderr
    assert any("a.txt" in ln and "Permission denied" in ln for ln in one_line_errors(cp.stderr)), cp.stderr
    assert read(J(r, "a.txt")) == b"alpha\n"
    assert read(J(r, "b.txt")) == b"readable edit\n"


# -- caches ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "future-version", "flipped-byte", "missing", "empty"])
def test_damaged_replica_cache_rescans_and_defers_deletes(tmp_path, damage):
    m, r = synced_pair(tmp_path)
    cache = r / ".dirsync" / "manifest"
    data = read(cache)
    if damage == "garbage":
        write(cache, os.urandom(500))
    elif damage == "truncated":
        write(cache, data[: len(data) // 2])
    elif damage == "future-version":
        write(cache, data[:7] + bytes([data[7] + 1]) + data[8:])
    elif damage == "flipped-byte":
        write(cache, data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif damage == "missing":
        os.unlink(cache)
    else:
        write(cache, b"")
    remove(m / "b.txt")
    write(m / "a.txt", b"edited after the cache broke\n")
    _, out = sync_json(m, r)
    rep = out["replicas"][0]
    assert any("cache" in w and "no deletions" in w for w in rep["warnings"]), rep
    assert os.path.exists(r / "b.txt"), "deleted in a run whose replica cache was unusable"
    assert read(r / "a.txt") == b"edited after the cache broke\n"
    assert rep["files_deleted"] == 0 and rep["exit_code"] == 0
    # The cache is good again: the next run deletes, without a warning.
    cp = run_cli("sync", m, r)
    assert cp.returncode == 0 and "warning" not in cp.stderr, cp.stderr
    assert not os.path.exists(r / "b.txt")
    treecmp.assert_trees_equal(m, r)


def test_damaged_master_cache_rescans_and_defers_deletes(tmp_path):
    m, r = synced_pair(tmp_path)
    cache = master_cache_path(os.path.realpath(m))
    assert os.path.isfile(cache), "master cache not where state.py says"
    write(cache, b"DSYNCMF" + os.urandom(64))
    remove(m / "a.txt")
    cp = run_cli("sync", m, r)  # not --json: that is quiet on stderr
    assert cp.returncode == 0, cp.stderr
    assert "warning" in cp.stderr and "master cache" in cp.stderr and "no deletions" in cp.stderr, cp.stderr
    assert os.path.exists(r / "a.txt")
    sync_json(m, r)
    treecmp.assert_trees_equal(m, r)


# -- what is never synced ------------------------------------------------------------------


def test_replica_state_folder_is_never_synced_or_deleted(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {**TREE, ".dirsync": {"junk": b"master-side state must not travel\n", "tmp": {}}})
    sync_json(m, r)
    assert not os.path.exists(r / ".dirsync" / "junk")
    marker = read(r / ".dirsync" / "replica.json")
    treecmp.assert_trees_equal(m, r)  # (ignores .dirsync on both sides)
    # The replica's own state survives a master that has no .dirsync and every later run.
    remove(m / ".dirsync")
    write(m / "a.txt", b"x\n")
    sync_json(m, r)
    assert read(r / ".dirsync" / "replica.json") == marker
    assert os.path.isfile(r / ".dirsync" / "manifest")
    assert os.path.isdir(r / ".dirsync" / "tmp") and tmp_entries(r) == []
    # The master's own .dirsync was left alone by the runs.
    assert not os.path.exists(m / ".dirsync")


def test_nested_dirsync_named_directories_are_ordinary(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"sub": {".dirsync": {"x": b"only the root's .dirsync is special\n"}}})
    sync_json(m, r)
    treecmp.assert_trees_equal(m / "sub", r / "sub", ignore=())
    assert read(r / "sub/.dirsync/x") == b"only the root's .dirsync is special\n"


def test_excluded_paths_are_neither_sent_nor_deleted(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {**TREE, ".dirsyncignore": b"# comment\n*.log\nbuild/\n",
                   "app.log": b"log\n", "build": {"out.o": b"obj\n"}, "cache": {"c.bin": b"c\n"},
                   "src": {"main.py": b"print()\n", "debug.log": b"dbg\n"}})
    sync_json(m, r, args=("--exclude", "cache/", "--exclude", "*.tmp"))
    for p in ("app.log", "build", "cache", "src/debug.log"):
        assert not os.path.lexists(r / p), f"excluded {p} was sent"
    assert os.path.isfile(r / ".dirsyncignore")
    # Replica-side files matching the excludes are never deleted, even as the master lacks them.
    build_tree(r, {"local.log": b"replica's own log\n", "build": {"x": b"replica build\n"},
                   "cache": {"keep": b"k\n"}, "scratch.tmp": b"t\n"})
    remove(m / "b.txt")
    cp, out = sync_json(m, r, args=("--exclude", "cache/", "--exclude", "*.tmp"))
    for p in ("local.log", "build/x", "cache/keep", "scratch.tmp"):
        assert os.path.isfile(r / p), f"excluded replica file {p} was deleted"
    assert not os.path.exists(r / "b.txt")
    assert out["replicas"][0]["files_deleted"] == 1
    # Without the --exclude, cache/ and *.tmp are the master's business again: deleted.
    sync_json(m, r)
    assert not os.path.exists(r / "cache/keep") and not os.path.exists(r / "scratch.tmp")
    assert read(r / "cache/c.bin") == b"c\n"
    assert os.path.isfile(r / "local.log") and os.path.isfile(r / "build/x")


def test_excludes_hold_under_directories_with_a_newline_in_their_name(tmp_path):
    """gitignore regexes use '.', which does not match a newline: a parent directory named
    'a\\nb' made '*.keep' miss, so an excluded replica file there was deleted."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"odd\nname": {"x.keep": b"master-side, excluded\n", "f": b"f\n", "build": {"o": b"o\n"}}})
    sync_json(m, r, args=("--exclude", "*.keep", "--exclude", "build/"))
    assert not os.path.exists(r / "odd\nname" / "x.keep"), "an excluded master file was sent"
    assert not os.path.exists(r / "odd\nname" / "build"), "an excluded master directory was sent"
    write(r / "odd\nname" / "mine.keep", b"replica-side, excluded\n")
    _, out = sync_json(m, r, args=("--exclude", "*.keep", "--exclude", "build/"))
    assert read(r / "odd\nname" / "mine.keep") == b"replica-side, excluded\n", "an excluded replica file was deleted"
    assert out["replicas"][0]["files_deleted"] == 0


def test_special_files_are_skipped_with_a_warning_and_never_opened(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    os.mkfifo(m / "fifo")
    os.mkfifo(m / "docs" / "pipe")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(m / "sock"))
    dev = False
    if os.geteuid() == 0:
        try:
            os.mknod(m / "null-dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
            dev = True
        except OSError:
            pass
    try:
        # A FIFO opened for reading blocks forever: a hang here (timeout) means it was opened.
        cp = run_cli("sync", m, r, timeout=60)
        _, out = sync_json(m, r, timeout=60)  # again, with the caches in place
    finally:
        sock.close()
    assert cp.returncode == 0, cp.stderr
    specials = ("fifo", "docs/pipe", "sock") + (("null-dev",) if dev else ())
    for name in specials:
        assert f"warning: skipping special file {name}" in cp.stderr, cp.stderr
        assert any(f"skipping special file {name}" in w for w in out["master_scan"]["warnings"]), out
        assert not os.path.lexists(r / name)
    assert "fifo" in cp.stderr and "socket" in cp.stderr
    assert read(r / "a.txt") == b"alpha\n"
    assert out["replicas"][0]["errors"] == []


def test_replica_entries_of_special_type_are_replaced_by_master_files(tmp_path):
    m, r = synced_pair(tmp_path)
    remove(r / "a.txt")
    os.mkfifo(r / "a.txt")  # someone put a FIFO where a file should be on the replica
    cp = run_cli("sync", m, r, timeout=60)
    assert cp.returncode in (0, PARTIAL), cp.stderr
    st = os.lstat(r / "a.txt")
    if cp.returncode == 0:
        assert stat.S_ISREG(st.st_mode) and read(r / "a.txt") == b"alpha\n"
    else:  # refused to touch it: reported, still a FIFO
        assert "a.txt" in cp.stderr and stat.S_ISFIFO(st.st_mode)


# -- symlinks on the replica side ----------------------------------------------------------------


def test_replica_dir_swapped_for_symlink_between_runs_writes_nothing_outside(tmp_path):
    m, r = synced_pair(tmp_path, {**TREE, "d": {"f.txt": b"one\n", "sub": {"g.txt": b"two\n"}}})
    outside = tmp_path / "outside"
    build_tree(outside, {"f.txt": b"outside file\n", "sub": {"g.txt": b"outside g\n"}, "victim.txt": b"v\n"})
    os.chmod(outside / "f.txt", 0o600)
    before = raw_snapshot(outside)
    os.rename(r / "d", tmp_path / "d-moved-away")
    os.symlink(outside, r / "d")
    write(m / "d/f.txt", b"one, edited\n")
    write(m / "d/new.txt", b"new\n")
    remove(m / "d/sub/g.txt")
    os.chmod(m / "d", 0o700)
    sync_json(m, r, args=("--allow-mass-delete",), expect=None)
    assert raw_snapshot(outside) == before, "dirsync wrote through a replica symlink"
    # The link was replaced by a real directory; the replica converges.
    sync_json(m, r)
    assert raw_snapshot(outside) == before
    treecmp.assert_trees_equal(m, r)


def test_replica_dir_swapped_for_symlink_during_apply_writes_nothing_outside(tmp_path):
    """Deterministic TOCTOU: swap the directory after the replica scan and plan, before apply."""
    m, r = synced_pair(tmp_path, {**TREE, "d": {"f.txt": b"one\n", "sub": {"g.txt": b"two\n"}, "h": b"h\n"}})
    outside = tmp_path / "outside"
    build_tree(outside, {"f.txt": b"outside f\n", "sub": {"g.txt": b"outside g\n"}, "h": b"outside h\n"})
    before = raw_snapshot(outside)
    write(m / "d/f.txt", b"one, edited\n")
    write(m / "d/sub/g.txt", b"two, edited\n")
    write(m / "d/new.txt", b"new\n")
    remove(m / "d/h")
    os.chmod(m / "d", 0o711)
    os.symlink("f.txt", m / "d/newlink")

    mscan = scan_tree(str(m))
    t = LocalTransport(str(r))
    t.open()
    try:
        rscan = t.scan([])
        plan = diff(mscan.manifest, rscan.manifest, PlanOptions())
        assert plan.actions
        os.rename(r / "d", tmp_path / "d-real")
        os.symlink(outside, r / "d")  # the attacker's swap, between plan and apply
        summary = ReplicaSummary(str(r))
        t.apply(plan.actions, MasterReader(str(m)), summary)
    finally:
        t.close()
    assert raw_snapshot(outside) == before, "dirsync wrote through a replica symlink"
    assert summary.errors, "the swapped directory went unnoticed"
    assert all(e.path == "d" or e.path.startswith("d/") for e in summary.errors), summary.errors
    assert tmp_entries(r) == []
    # A normal run afterwards replaces the link by a real directory and converges.
    cp, _ = sync_json(m, r, expect=None)
    assert cp.returncode == 0, cp.stderr
    assert raw_snapshot(outside) == before
    treecmp.assert_trees_equal(m, r)


def test_replica_root_through_a_symlink_is_fine(tmp_path):
    m = tmp_path / "m"
    build_tree(m, TREE)
    os.mkdir(tmp_path / "disk")
    os.symlink(tmp_path / "disk", tmp_path / "backup")
    sync_json(m, tmp_path / "backup")
    treecmp.assert_trees_equal(m, tmp_path / "disk")
    assert os.path.islink(tmp_path / "backup")
    # The root is the directory the link leads to (not a link entry), and the scan's
    # fingerprint is that of the entries it returns, so the next run can find the pair in step.
    res = scan_tree(str(tmp_path / "backup"))
    root = res.manifest.entries[""]
    assert root.kind == "d" and root.mode == stat.S_IMODE(os.stat(tmp_path / "disk").st_mode)
    assert res.fingerprint in (b"", fingerprint(res.manifest.entries))
    settle(m, tmp_path / "disk")
    sync_json(m, tmp_path / "backup")  # notes the pair in step
    _, again = sync_json(m, tmp_path / "backup")
    assert again["replicas"][0]["planned"] is False


def test_warnings_about_odd_names_stay_on_one_line(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    os.mkfifo(m / "pipe\nwith newline")
    cp = run_cli("sync", m, r, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "warning: skipping special file pipe\\nwith newline (fifo)" in cp.stderr.splitlines(), cp.stderr


@pytest.mark.parametrize("target", ["copied-state", "dir-with-tmp", "fresh-replica"])
def test_replica_state_folder_swapped_for_a_symlink_is_refused(tmp_path, target):
    """REPLICA/.dirsync pointing outside must not receive the lock, marker, cache or temps, and
    the stale-temp cleanup must never empty some other directory's tmp/."""
    m, r = synced_pair(tmp_path)
    outside = tmp_path / "outside"
    if target == "copied-state":
        os.makedirs(outside)
        os.rename(r / ".dirsync", outside / "state")
        link_to = outside / "state"
    else:
        build_tree(outside, {"tmp": {"victim.txt": b"not dirsync's\n", ".dirsync-tmp-1-abcd": b"nor this\n"}})
        link_to = outside
        remove(r / ".dirsync")
        if target == "fresh-replica":
            for n in os.listdir(r):
                remove(r / n)
    os.symlink(link_to, r / ".dirsync")
    write(m / "a.txt", b"changed\n")
    before_outside, before_r = raw_snapshot(outside), raw_snapshot(r)
    cp = run_cli("sync", m, r)
    assert cp.returncode == REFUSED, cp.stderr
    assert ".dirsync" in cp.stderr
    assert raw_snapshot(outside) == before_outside, "dirsync wrote through REPLICA/.dirsync"
    assert raw_snapshot(r) == before_r
