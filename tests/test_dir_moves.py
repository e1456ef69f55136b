"""A directory renamed on the master is renamed whole on the replica (MoveDir): one rename,
whatever it holds, instead of a link, a rename and an unlink per file.

What must hold: the replica ends equal to the master in the same run; the moved files keep
their inodes (nothing is read from the master or copied); a file changed on the replica since
its scan stops the move (nothing moves, nothing is lost, the next run converges); entries the
run does not manage (excluded ones) go along with their directory, never deleted; a directory
whose content changed on the master, or with --backup-dir, is moved file by file as before;
the agent takes the move over SSH, and refuses a malformed one.
"""

from __future__ import annotations

import json
import os

import pytest

try:
    import treecmp
    from helpers import (build_tree, random_bytes, read, run_cli, settle, stray_temps, sync_in_process, sync_json,
                         tmp_entries, write)
    from strategies import file_entry, simulate
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import (build_tree, random_bytes, read, run_cli, settle, stray_temps, sync_in_process,
                               sync_json, tmp_entries, write)
    from tests.strategies import file_entry, simulate

from dirsync.errors import ProtocolError
from dirsync.manifest import DirEntry, Manifest
from dirsync.plan import CopyOp, Delete, MoveDir, PlanOptions, WriteFile, diff, move_size
from dirsync.transport import proto


def _tree() -> dict:
    return {
        "photos": {
            "2023": {f"img{i:02d}.jpg": random_bytes(30_000 + i, i) for i in range(12)},
            "2024": {"raw": {f"r{i}.cr2": random_bytes(50_000, 100 + i) for i in range(3)}, "empty": {}},
            "notes.txt": "trip\n",
            "zero.bin": b"",
        },
        "archive": {"old.txt": "old\n"},
        "top.txt": "top\n",
    }


def _inodes(root) -> dict[str, int]:
    out = {}
    for d, _dirs, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_ino
    return out


def _pair(tmp_path, spec=None):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, spec or _tree())
    os.symlink("notes.txt", m / "photos" / "notes.lnk")
    settle(m)
    sync_json(m, r)
    settle(r)
    sync_json(m, r)  # (the replica's copies now trusted by its cache: a move need not read them)
    return m, r


def test_a_renamed_directory_is_one_rename_on_the_replica(tmp_path):
    m, r = _pair(tmp_path)
    before = _inodes(r / "photos")
    os.rename(m / "photos", m / "archive" / "photos-2023-2024")
    _, out = sync_json(m, r)
    rep = out["replicas"][0]
    assert (rep["dirs_moved"], rep["files_written"], rep["files_deleted"], rep["bytes_sent"]) == (1, 0, 0, 0), rep
    treecmp.assert_trees_equal(m, r)
    assert _inodes(r / "archive" / "photos-2023-2024") == before
    assert not os.path.lexists(r / "photos")
    assert tmp_entries(r) == [] and stray_temps(r) == []
    cp = run_cli("plan", m, r)
    assert cp.returncode == 0 and cp.stdout.splitlines()[:-1] == [], cp.stdout


def test_the_plan_shows_the_move_as_one_line(tmp_path):
    m, r = _pair(tmp_path)
    os.rename(m / "photos", m / "pictures")
    cp = run_cli("plan", m, r)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == "move    photos/ -> pictures/  (22 entries in it)", lines
    assert not [x for x in lines if x.startswith(("write", "delete", "mkdir"))], lines
    assert lines[-1].endswith(", 1 dirs moved"), lines


def test_status_and_a_json_plan_count_the_move(tmp_path):
    m, r = _pair(tmp_path)
    os.rename(m / "photos", m / "pictures")
    cp = run_cli("status", m, r)
    assert cp.returncode == 1 and "BEHIND (0 to write, 0 to delete, 1 dirs to move," in cp.stdout, cp.stdout
    cp = run_cli("plan", "--json", m, r)
    assert cp.returncode == 0, cp.stderr
    plan = json.loads(cp.stdout)["replicas"][0]["plan"]
    assert (plan["dir_moves"], plan["writes"], plan["deletes"]) == (1, 0, 0), plan


def test_replica_copies_not_yet_trusted_are_read_and_still_moved(tmp_path):
    """Right after the first copy the replica's files were written within the racy window of its
    scan (not trusted by stat facts): the move reads and hashes them, then renames."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    sync_json(m, r)
    before = _inodes(r / "photos")
    os.rename(m / "photos", m / "pictures")
    _, out = sync_json(m, r)
    assert out["replicas"][0]["dirs_moved"] == 1, out
    treecmp.assert_trees_equal(m, r)
    assert _inodes(r / "pictures") == before


def test_a_renamed_directory_with_entries_edited_or_gone_moves_then_changes_them(tmp_path):
    """Renamed, with one file edited, one touched (mtime only), one deleted and the link
    retargeted: the directory still moves whole (most of it is unchanged), then the edit is
    written over the moved file (reusing its bytes), the rest fixed in place."""
    m, r = _pair(tmp_path)
    before = _inodes(r / "photos")
    os.rename(m / "photos", m / "pictures")
    with open(m / "pictures" / "2023" / "img05.jpg", "r+b") as f:
        f.seek(1000)
        f.write(b"edited in the middle")
    os.utime(m / "pictures" / "notes.txt", ns=(T, T))
    os.unlink(m / "pictures" / "2024" / "raw" / "r1.cr2")
    os.unlink(m / "pictures" / "notes.lnk")
    os.symlink("zero.bin", m / "pictures" / "notes.lnk")
    _, out = sync_json(m, r)
    rep = out["replicas"][0]
    assert (rep["dirs_moved"], rep["files_written"], rep["files_deleted"]) == (1, 1, 1), rep
    assert 0 < rep["bytes_sent"] < 10_000 and rep["bytes_reused"] > 20_000, rep
    treecmp.assert_trees_equal(m, r)
    after = _inodes(r / "pictures")
    same = {k for k in after if after[k] == before.get(k)}
    assert same == set(before) - {"2023/img05.jpg", "2024/raw/r1.cr2", "notes.lnk"}, sorted(set(before) - same)


def test_a_renamed_directory_mostly_rewritten_moves_file_by_file(tmp_path):
    m, r = _pair(tmp_path)
    os.rename(m / "photos", m / "pictures")
    for i in range(9):  # 9 of its 17 files: fewer than half are left as they were
        write(m / "pictures" / "2023" / f"img{i:02d}.jpg", random_bytes(30_000, 500 + i))
    _, out = sync_json(m, r)
    rep = out["replicas"][0]
    assert rep["dirs_moved"] == 0 and rep["files_deleted"] > 0, rep
    treecmp.assert_trees_equal(m, r)


def test_new_files_in_a_renamed_directory_are_written_after_the_move(tmp_path):
    m, r = _pair(tmp_path)
    os.rename(m / "photos", m / "pictures")
    write(m / "pictures" / "2024" / "new.jpg", random_bytes(9_000, 77))
    os.makedirs(m / "pictures" / "2025")
    write(m / "pictures" / "2025" / "a.jpg", random_bytes(5_000, 78))
    _, out = sync_json(m, r)
    rep = out["replicas"][0]
    assert rep["dirs_moved"] == 1 and rep["files_written"] == 2 and rep["files_deleted"] == 0, rep
    treecmp.assert_trees_equal(m, r)


def test_excluded_entries_go_with_their_directory(tmp_path):
    """The replica's excluded file in a renamed directory is neither deleted nor left behind:
    it goes with the directory, as it did on the master."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    write(m / "photos" / "cache.tmp", "master's scratch\n")
    settle(m)
    sync_json(m, r, args=("--exclude", "*.tmp"))
    write(r / "photos" / "2023" / "thumbs.tmp", "replica's own\n")
    settle(r)
    sync_json(m, r, args=("--exclude", "*.tmp"))
    os.rename(m / "photos", m / "pictures")
    _, out = sync_json(m, r, args=("--exclude", "*.tmp"))
    assert out["replicas"][0]["dirs_moved"] == 1, out
    assert read(r / "pictures" / "2023" / "thumbs.tmp") == b"replica's own\n"
    assert not os.path.lexists(r / "photos")
    assert not os.path.lexists(r / "pictures" / "cache.tmp")


def test_backups_keep_the_file_by_file_move(tmp_path):
    m, r = _pair(tmp_path)
    os.rename(m / "photos", m / "pictures")
    _, out = sync_json(m, r, args=("--backup-dir", str(tmp_path / "bak")))
    rep = out["replicas"][0]
    assert rep["dirs_moved"] == 0 and rep["files_deleted"] > 0, rep
    treecmp.assert_trees_equal(m, r)


# -- the writer, driven in-process: a replica that changed between scan and apply ---------------


def _plan_then(m, r, between):
    """Scan both, plan with directory moves, run `between`, apply, close. (summary, actions)."""
    return sync_in_process(m, r, between, PlanOptions(dir_moves=1 << 40))


@pytest.mark.parametrize("change", ["edited", "replaced-by-link", "gone"])
def test_a_file_changed_on_the_replica_since_its_scan_stops_the_move(tmp_path, change):
    m, r = _pair(tmp_path)
    os.rename(m / "photos", m / "pictures")
    victim = r / "photos" / "2023" / "img03.jpg"

    def meddle():
        if change == "edited":
            write(victim, b"the replica's own edit")
        elif change == "replaced-by-link":
            os.unlink(victim)
            os.symlink("img04.jpg", victim)
        else:
            os.unlink(victim)

    summary, actions = _plan_then(m, r, meddle)
    assert [a.__class__ for a in actions if isinstance(a, (MoveDir, WriteFile, Delete))] == [MoveDir]
    assert [(e.path, e.op) for e in summary.errors][:1] == [("photos/2023/img03.jpg", "move")], summary.errors
    assert summary.dirs_moved == 0
    assert os.path.isdir(r / "photos") and not os.path.lexists(r / "pictures")  # nothing moved
    if change == "edited":
        assert read(victim) == b"the replica's own edit"
    assert len(_inodes(r / "photos")) == 18 - (change == "gone")
    settle(r)
    _, out = sync_json(m, r)  # the next run sees the change and converges
    assert out["replicas"][0]["errors"] == []
    treecmp.assert_trees_equal(m, r)


def test_a_directory_made_at_the_new_name_since_the_scan_stops_the_move(tmp_path):
    m, r = _pair(tmp_path)
    os.rename(m / "photos", m / "pictures")

    def meddle():
        os.makedirs(r / "pictures" / "mine")
        write(r / "pictures" / "mine" / "keep.txt", "someone else's\n")

    summary, _ = _plan_then(m, r, meddle)
    assert [(e.path, e.op, e.code) for e in summary.errors][:1] == [("pictures", "move", "CONFLICT")], summary.errors
    assert read(r / "pictures" / "mine" / "keep.txt") == b"someone else's\n"
    assert len(_inodes(r / "photos")) == 18


# -- over the wire ----------------------------------------------------------------------------


def test_the_agent_decodes_a_move_and_refuses_malformed_ones():
    a = MoveDir("photos", "archive/pictures", ("", "/2023", "/2023/x.jpg"))
    assert proto.dec_action(proto.enc_action(a)) == a
    bad = [
        {"t": "mvdir", "s": b"photos", "p": b"photos/inner", "m": [b""]},  # into itself
        {"t": "mvdir", "s": b"a/b", "p": b"a", "m": [b""]},  # onto its own parent
        {"t": "mvdir", "s": b"photos", "p": b"x", "m": [b"/2023"]},  # not starting with itself
        {"t": "mvdir", "s": b"photos", "p": b"x", "m": [b"", b"2023"]},  # a suffix without "/"
        {"t": "mvdir", "s": b"photos", "p": b"x", "m": [b"", b"/../../etc"]},  # escapes
        {"t": "mvdir", "s": b"photos", "p": b".dirsync/x", "m": [b""]},  # into the state folder
        {"t": "mvdir", "s": b"/etc", "p": b"x", "m": [b""]},  # absolute
        {"t": "mvdir", "s": b"photos", "p": b"x", "m": []},
    ]
    for msg in bad:
        with pytest.raises(ProtocolError):
            proto.dec_action(msg)


# -- the planner's choices (pure) -------------------------------------------------------------

T = 1_000_000_000
ON = PlanOptions(dir_moves=1 << 40)


def _m(*entries) -> Manifest:
    return Manifest({"": DirEntry("", 0o755, T), **{e.path: e for e in entries}})


def _d(p):
    return DirEntry(p, 0o755, T)


def _f(p, chunks=(0, 1)):
    return file_entry(p, chunks, 0o644, T)


def test_a_copy_of_a_moved_file_elsewhere_reads_it_at_its_new_path_and_does_not_link_it():
    replica = _m(_d("s"), _f("s/x"), _f("s/y", (2,)))
    master = _m(_d("d"), _f("d/x"), _f("d/y", (2,)), _d("z"), _f("z/x"))  # s renamed to d, and a copy of x
    plan = diff(master, replica, ON)
    assert [(a.src, a.path) for a in plan.actions if isinstance(a, MoveDir)] == [("s", "d")]
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert w.path == "z/x" and not w.move and {o.src for o in w.ops if isinstance(o, CopyOp)} == {"d/x"}
    assert Manifest(simulate(plan, master, replica)).keys() == master.keys()


def test_no_move_into_a_new_parent_under_protection_or_over_the_size_limit():
    replica = _m(_d("s"), _f("s/x"), _f("s/y", (2,)))
    into_new = _m(_d("n"), _d("n/d"), _f("n/d/x"), _f("n/d/y", (2,)))
    assert not [a for a in diff(into_new, replica, ON).actions if isinstance(a, MoveDir)]
    renamed = _m(_d("d"), _f("d/x"), _f("d/y", (2,)))
    assert [a for a in diff(renamed, replica, ON).actions if isinstance(a, MoveDir)]
    shielded = PlanOptions(dir_moves=1 << 40, protect=frozenset({"s/y"}))
    assert not [a for a in diff(renamed, replica, shielded).actions if isinstance(a, MoveDir)]
    need = move_size(("", "/x", "/y"))
    assert [a for a in diff(renamed, replica, PlanOptions(dir_moves=need)).actions if isinstance(a, MoveDir)]
    assert not [a for a in diff(renamed, replica, PlanOptions(dir_moves=need - 1)).actions
                if isinstance(a, MoveDir)]
    assert not [a for a in diff(renamed, replica, PlanOptions(dir_moves=1 << 40, delete=False)).actions
                if isinstance(a, MoveDir)]  # (without deletes the old directory stays: copies)


def test_the_outermost_renamed_directory_moves_and_a_split_one_moves_in_parts():
    replica = _m(_d("s"), _d("s/a"), _f("s/a/x"), _d("s/b"), _f("s/b/y", (2,)), _d("keep"))
    whole = _m(_d("keep"), _d("keep/t"), _d("keep/t/a"), _f("keep/t/a/x"), _d("keep/t/b"), _f("keep/t/b/y", (2,)))
    assert [(a.src, a.path) for a in diff(whole, replica, ON).actions if isinstance(a, MoveDir)] == [("s", "keep/t")]
    split = _m(_d("keep"), _d("keep/a"), _f("keep/a/x"), _d("b2"), _f("b2/y", (2,)))
    plan = diff(split, replica, ON)
    assert sorted((a.src, a.path) for a in plan.actions if isinstance(a, MoveDir)) == [("s/a", "keep/a"), ("s/b", "b2")]
    assert [a.path for a in plan.actions if isinstance(a, Delete)] == ["s"]
    assert Manifest(simulate(plan, split, replica)).keys() == split.keys()
