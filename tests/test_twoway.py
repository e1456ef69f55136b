"""Two-way sync: the pure reconciler on hand-made manifests, then scenarios on real directories
(in-process run_twoway and the real CLI), including kill -9 mid-run followed by a clean rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat

import pytest
import xxhash

from dirsync.errors import ExitCode, RefusedError
from dirsync.manifest import DirEntry, FileEntry, LinkEntry, Manifest
from dirsync.progress import Reporter
from dirsync.twoway import (
    A,
    B,
    BaseRecord,
    ReconcileOptions,
    TwoWayConfig,
    conflict_name,
    decode_base,
    encode_base,
    is_conflict_copy,
    pair_id,
    reconcile,
    run_twoway,
    settled_base,
    side_plans,
)

try:
    import treecmp
    from helpers import (File, Unprivileged, build_tree, can_drop_to, kill_group, popen_cli, read, run_cli,
                         stray_temps, wait_for, world_dir, write)
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import (File, Unprivileged, build_tree, can_drop_to, kill_group, popen_cli, read,
                               run_cli, stray_temps, wait_for, world_dir, write)

S = 1_000_000_000
T0 = 1_700_000_000 * S


# -- manifests by hand ---------------------------------------------------------------------------


def F(path: str, data: bytes | str, mode: int = 0o644, mtime: int = T0) -> FileEntry:
    data = data.encode() if isinstance(data, str) else data
    d = xxhash.xxh3_128_digest(data)
    return FileEntry(path, len(data), mode, mtime, d, 0, (len(data),) if data else (), d if data else b"")


def D(path: str, mode: int = 0o755, mtime: int = T0) -> DirEntry:
    return DirEntry(path, mode, mtime)


def L(path: str, target: str, mtime: int = T0) -> LinkEntry:
    return LinkEntry(path, target, mtime)


def M(*entries) -> Manifest:
    out = {"": D("")}
    for e in entries:
        out[e.path] = e
    return Manifest(out)


def keys(m: Manifest) -> dict:
    return {p: k for p, k in m.keys().items() if p}


def content(m: Manifest, p: str):
    e = m.entries.get(p)
    return (e.size, e.digest) if isinstance(e, FileEntry) else e


def copies(m: Manifest) -> list[str]:
    return sorted(p for p in m.entries if is_conflict_copy(p))


# -- reconciler -----------------------------------------------------------------------------------


def test_one_sided_changes_propagate_both_ways():
    base = M(F("x", "1"), F("y", "1"), F("z", "1"))
    a = M(F("x", "2", mtime=T0 + S), F("y", "1"), F("z", "1"), F("new", "n"))
    b = M(F("x", "1"), F("y", "3", mtime=T0 + 2 * S), F("z", "1"))
    dec = reconcile(base, a, b)
    t = dec.target
    assert content(t, "x") == content(a, "x") and content(t, "y") == content(b, "y") and "new" in t.entries
    acts = {d.path: d.action for d in dec.decisions}
    assert acts == {"x": "a>b", "y": "b>a", "new": "a>b"}
    assert dec.conflicts == []


def test_identical_change_on_both_sides_is_in_sync():
    base = M(F("x", "1"))
    a = M(F("x", "2", mtime=T0 + S))
    b = M(F("x", "2", mtime=T0 + S))
    dec = reconcile(base, a, b)
    assert dec.decisions == [] and dec.conflicts == [] and keys(dec.target) == keys(a)


def test_different_changes_conflict_newer_keeps_name_older_kept_as_copy():
    base = M(F("doc.txt", "v0"))
    a = M(F("doc.txt", "a-edit", mtime=T0 + 10 * S))
    b = M(F("doc.txt", "b-edit", mtime=T0 + 20 * S))
    dec = reconcile(base, a, b)
    assert content(dec.target, "doc.txt") == content(b, "doc.txt")
    (c,) = dec.conflicts
    assert c.winner == B and c.copy == conflict_name("doc.txt", T0 + 10 * S, "a")
    assert c.copy.startswith("doc.sync-conflict-2023") and c.copy.endswith("-a.txt")
    assert content(dec.target, c.copy) == content(a, "doc.txt")
    assert dec.target.entries[c.copy].mtime_ns == T0 + 10 * S  # the loser keeps its mtime
    assert dec.origin[c.copy] == (A, "doc.txt")
    assert [d.action for d in dec.decisions if d.path == "doc.txt"] == ["conflict"]


def test_conflict_tie_break_does_not_depend_on_side_order():
    base = M(F("f", "0"))
    a = M(F("f", "one", mtime=T0 + S))
    b = M(F("f", "two", mtime=T0 + S))
    d1 = reconcile(base, a, b)
    d2 = reconcile(base, b, a, ReconcileOptions(labels=("b", "a")))
    assert keys(d1.target) == keys(d2.target)


def test_modify_beats_delete_both_ways_and_chmod_counts_as_modify():
    base = M(F("x", "1"), F("y", "1"), F("z", "1"))
    a = M(F("x", "2", mtime=T0 + S), F("z", "1", mode=0o755))  # edited x, deleted y, chmod z
    b = M(F("y", "3", mtime=T0 + S))  # deleted x and z, edited y
    dec = reconcile(base, a, b)
    t = dec.target
    assert content(t, "x") == content(a, "x") and content(t, "y") == content(b, "y")
    assert t.entries["z"].mode == 0o755
    assert dec.conflicts == []
    assert {d.path: d.action for d in dec.decisions} == {"x": "a>b", "y": "b>a", "z": "a>b"}


def test_one_sided_delete_propagates_and_both_deleted_is_nothing():
    base = M(F("x", "1"), F("y", "1"), D("d"), F("d/f", "1"))
    a = M(F("y", "1"))  # deleted x, d, d/f
    b = M(F("x", "1"), D("d"), F("d/f", "1"))  # deleted y
    dec = reconcile(base, a, b)
    assert keys(dec.target) == {}
    acts = {d.path: d.action for d in dec.decisions}
    assert acts == {"x": "del-b", "d": "del-b", "d/f": "del-b", "y": "del-a"}
    dec2 = reconcile(base, M(), M())  # deleted on both
    assert dec2.decisions == []


def test_first_run_union_identical_linked_differing_conflict_nothing_deleted():
    empty = Manifest()
    a = M(F("same", "s"), F("only-a", "a"), F("diff", "aa", mtime=T0 + 5 * S), D("dir"), F("dir/x", "x"))
    b = M(F("same", "s"), F("only-b", "b"), F("diff", "bb", mtime=T0), D("dir"), F("dir/y", "y"))
    dec = reconcile(empty, a, b)
    t = dec.target
    for p in ("same", "only-a", "only-b", "diff", "dir", "dir/x", "dir/y"):
        assert p in t.entries
    assert content(t, "diff") == content(a, "diff")
    assert [c.copy for c in dec.conflicts] == [conflict_name("diff", T0, "b")]
    assert not any(d.action.startswith("del") for d in dec.decisions)
    assert "same" not in {d.path for d in dec.decisions}


def test_dir_replaced_by_file_on_one_side_while_other_edits_inside():
    base = M(D("d"), F("d/keep", "k"), F("d/edit", "e0"))
    a = M(F("d", "now a file", mtime=T0 + S))
    b = M(D("d"), F("d/keep", "k"), F("d/edit", "e1", mtime=T0 + 2 * S))
    dec = reconcile(base, a, b)
    t = dec.target
    assert isinstance(t.entries["d"], DirEntry)
    assert content(t, "d/edit") == content(b, "d/edit")
    assert "d/keep" not in t.entries  # unchanged on b, deleted on a: the delete propagates
    (c,) = dec.conflicts
    assert c.path == "d" and c.winner == B and content(t, c.copy) == content(a, "d")


def test_dir_replaced_by_file_with_nothing_changed_inside_propagates():
    base = M(D("d"), F("d/x", "x"))
    a = M(F("d", "file", mtime=T0 + S))
    b = base
    dec = reconcile(base, a, b)
    assert keys(dec.target) == keys(a) and dec.conflicts == []


def test_first_run_dir_against_file_directory_keeps_the_name():
    dec = reconcile(Manifest(), M(D("p"), F("p/in", "i")), M(F("p", "file", mtime=T0 + 99 * S)))
    t = dec.target
    assert isinstance(t.entries["p"], DirEntry) and "p/in" in t.entries
    (c,) = dec.conflicts
    assert c.winner == A and content(t, c.copy) == content(M(F("p", "file")), "p")


def test_deleted_dir_kept_when_other_side_added_inside():
    base = M(D("d"), F("d/old", "o"))
    a = M()
    b = M(D("d"), F("d/old", "o"), F("d/new", "n"))
    dec = reconcile(base, a, b)
    assert set(keys(dec.target)) == {"d", "d/new"}
    assert dec.conflicts == []


def test_symlinks_change_and_conflict():
    base = M(L("l", "t0"), L("m", "t0"))
    a = M(L("l", "t1", mtime=T0 + S), L("m", "ta", mtime=T0 + S))
    b = M(L("l", "t0"), L("m", "tb", mtime=T0 + 2 * S))
    dec = reconcile(base, a, b)
    t = dec.target
    assert t.entries["l"].target == "t1" and t.entries["m"].target == "tb"
    (c,) = dec.conflicts
    assert isinstance(t.entries[c.copy], LinkEntry) and t.entries[c.copy].target == "ta"


def test_permission_only_change_is_not_a_content_conflict():
    base = M(F("s.sh", "echo 1", mode=0o644))
    a = M(F("s.sh", "echo 1", mode=0o755))
    b = M(F("s.sh", "echo 2", mode=0o644, mtime=T0 + S))
    dec = reconcile(base, a, b)
    e = dec.target.entries["s.sh"]
    assert dec.conflicts == [] and e.mode == 0o755 and content(dec.target, "s.sh") == content(b, "s.sh")
    assert [d.action for d in dec.decisions] == ["both"]


def test_metadata_only_changes_merge():
    base = M(F("f", "x", mode=0o644, mtime=T0))
    dec = reconcile(base, M(F("f", "x", mode=0o600, mtime=T0)), M(F("f", "x", mode=0o644, mtime=T0 + 7 * S)))
    e = dec.target.entries["f"]
    assert (e.mode, e.mtime_ns) == (0o600, T0 + 7 * S) and dec.conflicts == []


@pytest.mark.parametrize("prefer,winner", [("a", "A"), ("b", "B"), ("newer", "B")])
def test_prefer_resolves_without_copies(prefer, winner):
    base = M(F("f", "0"))
    a = M(F("f", "A", mtime=T0 + S))
    b = M(F("f", "B", mtime=T0 + 2 * S))
    dec = reconcile(base, a, b, ReconcileOptions(prefer=prefer))
    assert copies(dec.target) == []
    assert content(dec.target, "f") == content(a if winner == "A" else b, "f")
    (c,) = dec.conflicts
    assert c.copy is None


def test_prefer_file_over_new_directory_drops_its_contents():
    dec = reconcile(Manifest(), M(F("p", "file")), M(D("p"), F("p/x", "x"), D("p/q"), F("p/q/y", "y")),
                    ReconcileOptions(prefer="a"))
    assert keys(dec.target) == {"p": keys(M(F("p", "file")))["p"]}
    acts = {d.path: d.action for d in dec.decisions}
    assert acts["p/x"] == "del-b" and acts["p/q/y"] == "del-b" and acts["p"] == "conflict"


def test_modify_beats_delete_even_with_prefer():
    dec = reconcile(M(F("f", "0")), M(), M(F("f", "1", mtime=T0 + S)), ReconcileOptions(prefer="a"))
    assert "f" in dec.target.entries


def test_protected_paths_left_alone():
    base = M(D("d"), F("d/x", "1"), F("y", "1"))
    a = M(D("d"), F("d/x", "2", mtime=T0 + S))  # d unreadable on a in this run; y deleted
    b = M(D("d"), F("d/x", "3", mtime=T0 + 2 * S), F("y", "1"))
    dec = reconcile(base, a, b, ReconcileOptions(protect=frozenset({"d"})))
    assert "d" not in dec.target.entries and "d/x" not in dec.target.entries
    assert {d.path for d in dec.decisions} == {"y"}
    pa, pb = side_plans(dec, a, b)
    assert all(not getattr(x, "path", "").startswith("d") for x in pa.actions + pb.actions)


def test_copy_left_by_interrupted_run_is_reused_not_duplicated():
    base = M(F("f", "0"))
    a = M(F("f", "A", mtime=T0 + S))
    b = M(F("f", "B", mtime=T0 + 2 * S))
    first = reconcile(base, a, b)
    (c,) = first.conflicts
    # a was fully applied before the kill: it holds b's winner and its own loser as the copy.
    a2 = M(F("f", "B", mtime=T0 + 2 * S), F(c.copy, "A", mtime=T0 + S))
    again = reconcile(base, a2, b)
    assert again.conflicts == [] and copies(again.target) == [c.copy]
    # only b was applied (same copy name on b), a untouched
    b2 = M(F("f", "B", mtime=T0 + 2 * S), F(c.copy, "A", mtime=T0 + S))
    again = reconcile(base, a, b2)
    assert copies(again.target) == [c.copy] and content(again.target, "f") == content(b, "f")


def test_copy_name_taken_by_other_content_gets_a_number():
    base = M(F("f", "0"))
    taken = conflict_name("f", T0 + S, "a")
    a = M(F("f", "A", mtime=T0 + S), F(taken, "unrelated"))
    b = M(F("f", "B", mtime=T0 + 2 * S), F(taken, "unrelated"))
    dec = reconcile(base, a, b)
    (c,) = dec.conflicts
    assert c.copy == conflict_name("f", T0 + S, "a", 1) and c.copy.endswith("-a-2") and is_conflict_copy(c.copy)
    assert content(dec.target, taken) == content(a, taken)


def test_conflict_names():
    t = 1_700_000_000 * S  # 2023-11-14 22:13:20 UTC
    assert conflict_name("notes.txt", t, "a") == "notes.sync-conflict-20231114-221320-a.txt"
    assert conflict_name("d/e/a.tar.gz", t, "b") == "d/e/a.tar.sync-conflict-20231114-221320-b.gz"
    assert conflict_name(".bashrc", t, "a") == ".bashrc.sync-conflict-20231114-221320-a"
    assert conflict_name("Makefile", t, "b", 2) == "Makefile.sync-conflict-20231114-221320-b-3"
    for n in ("notes.sync-conflict-20231114-221320-a.txt", "Makefile.sync-conflict-20231114-221320-b-3"):
        assert is_conflict_copy(n)
    assert not is_conflict_copy("notes.txt") and not is_conflict_copy("x.sync-conflict-.txt")
    for long in ("é" * 127 + ".txt", "n" * 255, "a." + "x" * 250):
        c = conflict_name("d/" + long, t, "a")
        assert c.startswith("d/") and len(os.fsencode(c[2:])) <= 255 and is_conflict_copy(c)
        os.fsencode(c).decode("utf-8")  # not cut inside a character


def test_settled_base_keeps_old_entry_where_actions_did_not_complete():
    base = M(F("x", "1"), F("y", "1"))
    a = M(F("x", "2", mtime=T0 + S))  # edited x, deleted y
    b = base
    dec = reconcile(base, a, b)
    nb = settled_base(base, dec, {"x"})
    assert content(nb, "x") == content(base, "x") and "y" not in nb.entries
    # next run with b still old at x: decides a>b again, no conflict
    again = reconcile(nb, a, M(F("x", "1")))
    assert [d.action for d in again.decisions] == ["a>b"] and again.conflicts == []


def test_base_record_round_trip_and_pair_id():
    m = M(F("x", "1"), D("d"), L("d/l", "x"))
    rec = BaseRecord(3, "abcd", {"id1": "/p/a", "id2": "host:b"}, m)
    out = decode_base(encode_base(rec, "c1"), "c1")
    assert (out.seq, out.gen, out.specs, out.manifest.keys()) == (3, "abcd", rec.specs, m.keys())
    with pytest.raises(ValueError):
        decode_base(encode_base(rec, "c1"), "c2")
    with pytest.raises(ValueError):
        decode_base(b"garbage", "c1")
    assert pair_id("u", "v") == pair_id("v", "u") != pair_id("u", "w")


# -- real directories ------------------------------------------------------------------------------


def tw(a, b, **kw):
    """One in-process two-way run; returns the summary."""
    return run_twoway(TwoWayConfig(str(a), str(b), **kw), Reporter(quiet=True))


def equal_sides(a, b) -> None:
    treecmp.assert_trees_equal(a, b)
    assert stray_temps(a) == [] and stray_temps(b) == []


def put(p, data, mtime_s: int | None = None, mode: int | None = None) -> None:
    os.makedirs(os.path.dirname(p), exist_ok=True)
    write(p, data)
    if mode is not None:
        os.chmod(p, mode)
    if mtime_s is not None:
        os.utime(p, ns=(T0 + mtime_s * S, T0 + mtime_s * S))


def names(root) -> set[str]:
    out = set()
    for dp, dn, fn in os.walk(root):
        dn[:] = [d for d in dn if d != ".dirsync"]
        for n in dn + fn:
            out.add(os.path.relpath(os.path.join(dp, n), root))
    return out


@pytest.fixture
def pair(tmp_path):
    """Two sides already synced once from a small common tree."""
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"doc.txt": File(b"version 0\n", mtime_ns=T0), "keep.txt": File(b"keep\n", mtime_ns=T0),
                   "sub": {"inner.txt": File(b"inner\n" * 500, mtime_ns=T0)},
                   "big.bin": File(os.urandom(300_000), mtime_ns=T0)})
    s = tw(a, b)
    assert s.exit_code == 0
    equal_sides(a, b)
    return a, b


def test_first_real_run_needs_init_for_two_nonempty_dirs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"x": b"x"})
    build_tree(b, {"y": b"y"})
    with pytest.raises(RefusedError):
        tw(a, b)
    assert not (a / ".dirsync" / "replica.json").exists() or not (b / ".dirsync").exists()
    s = tw(a, b, init=True)
    assert s.exit_code == 0 and names(a) == names(b) == {"x", "y"}
    equal_sides(a, b)


def test_base_is_identical_on_both_sides_and_no_pending(pair):
    a, b = pair
    ba = sorted(n for n in os.listdir(a / ".dirsync") if n.startswith("twoway-") and not n.endswith(".tie"))
    bb = sorted(n for n in os.listdir(b / ".dirsync") if n.startswith("twoway-") and not n.endswith(".tie"))
    # the record, and (two local sides) its snapshot in a file of its own
    assert ba == bb and [n.rsplit(".", 1)[1][:4] for n in ba] == ["base", "snap"]
    for n in ba:
        assert read(a / ".dirsync" / n) == read(b / ".dirsync" / n)


def test_noop_run_writes_no_state(pair):
    a, b = pair
    (name,) = [n for n in os.listdir(a / ".dirsync") if n.endswith(".base")]
    before = [os.stat(side / ".dirsync" / name).st_mtime_ns for side in (a, b)]
    s = tw(a, b)
    assert s.exit_code == 0 and s.decisions.decisions == [] and all(p.empty for p in s.plans)
    assert [os.stat(side / ".dirsync" / name).st_mtime_ns for side in (a, b)] == before


def test_edit_edit_conflict_keeps_both_versions(pair):
    a, b = pair
    put(a / "doc.txt", b"edited on a\n", mtime_s=100)
    put(b / "doc.txt", b"edited on b\n", mtime_s=200)
    s = tw(a, b)
    assert s.exit_code == ExitCode.CONFLICTS == 4
    copy = conflict_name("doc.txt", T0 + 100 * S, "a")
    for side in (a, b):
        assert read(side / "doc.txt") == b"edited on b\n" and read(side / copy) == b"edited on a\n"
    equal_sides(a, b)
    assert tw(a, b).exit_code == 0 and tw(a, b).decisions.decisions == []


def test_edit_delete_restores_the_edit(pair):
    a, b = pair
    put(a / "doc.txt", b"edited\n", mtime_s=5)
    os.unlink(b / "doc.txt")
    os.unlink(a / "keep.txt")
    put(b / "keep.txt", b"keep, edited on b\n", mtime_s=6)
    s = tw(a, b)
    assert s.exit_code == 0
    for side in (a, b):
        assert read(side / "doc.txt") == b"edited\n" and read(side / "keep.txt") == b"keep, edited on b\n"
    equal_sides(a, b)


def test_delete_delete_and_delete_propagates_exactly_once(pair):
    a, b = pair
    os.unlink(a / "doc.txt")
    os.unlink(b / "doc.txt")
    os.unlink(a / "keep.txt")
    shutil.rmtree(b / "sub")
    s = tw(a, b)
    assert s.exit_code == 0
    assert names(a) == names(b) == {"big.bin"}
    equal_sides(a, b)
    for _ in range(2):  # never resurrected later
        assert tw(a, b).decisions.decisions == []
        assert names(a) == names(b) == {"big.bin"}


def test_delete_held_back_by_max_delete_is_redone_next_run_not_resurrected(pair):
    a, b = pair
    os.unlink(a / "doc.txt")
    put(a / "new.txt", b"new\n")
    s = tw(a, b, max_delete=0)
    assert s.exit_code == ExitCode.DELETE_LIMIT
    assert (b / "doc.txt").exists() and read(b / "new.txt") == b"new\n"  # the rest synced
    assert not (a / "doc.txt").exists()  # and nothing came back
    s = tw(a, b)
    assert s.exit_code == 0 and not (b / "doc.txt").exists() and not (a / "doc.txt").exists()
    equal_sides(a, b)


def test_rename_on_one_side_is_a_move_sending_nothing(pair):
    a, b = pair
    os.rename(a / "big.bin", a / "sub" / "moved.bin")
    s = tw(a, b)
    assert s.exit_code == 0
    assert s.sides[1].bytes_sent == 0 and s.sides[1].bytes_reused >= 300_000
    equal_sides(a, b)


def test_rename_on_one_side_and_edit_on_the_other_keeps_both(pair):
    a, b = pair
    os.rename(a / "sub" / "inner.txt", a / "renamed.txt")
    put(b / "sub" / "inner.txt", b"inner\n" * 500 + b"edited on b\n", mtime_s=50)
    s = tw(a, b)
    assert s.exit_code == 0
    for side in (a, b):
        assert read(side / "renamed.txt") == b"inner\n" * 500
        assert read(side / "sub" / "inner.txt").endswith(b"edited on b\n")
    equal_sides(a, b)


def test_first_run_with_overlapping_differing_trees(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"same.txt": File(b"same\n", mtime_ns=T0), "both": {"x": File(b"ax", mtime_ns=T0 + S)},
                   "only-a": b"a", "p": b"file on a"})
    build_tree(b, {"same.txt": File(b"same\n", mtime_ns=T0), "both": {"x": File(b"bx", mtime_ns=T0 + 2 * S),
                   "y": b"y"}, "only-b": b"b", "p": {"in": b"dir on b"}})
    s = tw(a, b, init=True)
    assert s.exit_code == 4
    got = names(a)
    assert {"same.txt", "only-a", "only-b", "both/x", "both/y", "p/in"} <= got
    assert read(a / "both" / "x") == b"bx"
    assert read(a / conflict_name("both/x", T0 + S, "a")) == b"ax"
    (pcopy,) = [n for n in got if n.startswith("p.sync-conflict-")]
    assert read(a / pcopy) == b"file on a"
    assert len(s.conflicts) == 2
    equal_sides(a, b)
    assert tw(a, b).exit_code == 0


def test_type_changes_and_symlinks(pair):
    a, b = pair
    shutil.rmtree(a / "sub")
    put(a / "sub", b"sub is a file now\n")
    os.symlink("doc.txt", b / "link")
    os.unlink(b / "keep.txt")
    os.mkdir(b / "keep.txt")
    put(b / "keep.txt" / "x", b"x")
    s = tw(a, b)
    assert s.exit_code == 0
    assert os.path.isfile(b / "sub") and os.readlink(a / "link") == "doc.txt" and os.path.isdir(a / "keep.txt")
    equal_sides(a, b)


def test_chmod_on_one_side_edit_on_the_other(pair):
    a, b = pair
    os.chmod(a / "doc.txt", 0o700)
    put(b / "doc.txt", b"new content\n", mtime_s=9)
    s = tw(a, b)
    assert s.exit_code == 0 and s.conflicts == []
    for side in (a, b):
        assert stat.S_IMODE(os.stat(side / "doc.txt").st_mode) == 0o700 and read(side / "doc.txt") == b"new content\n"
    equal_sides(a, b)


def test_marker_vanished_refuses_then_init_unions(pair):
    a, b = pair
    shutil.rmtree(a / ".dirsync")
    for p in list(os.listdir(a)):  # looks like an empty mount point
        q = a / p
        shutil.rmtree(q) if q.is_dir() else q.unlink()
    before = treecmp.snapshot(b)
    with pytest.raises(RefusedError, match="marker is missing"):
        tw(a, b)
    assert treecmp.snapshot(b) == before
    s = tw(a, b, init=True)
    assert s.exit_code == 0 and names(a) == names(b) and "doc.txt" in names(b)


def test_emptied_side_refused_before_any_deletion(pair):
    a, b = pair
    for p in list(os.listdir(a)):
        if p != ".dirsync":
            q = a / p
            shutil.rmtree(q) if q.is_dir() else q.unlink()
    before = treecmp.snapshot(b)
    with pytest.raises(RefusedError, match="empty"):
        tw(a, b)
    assert treecmp.snapshot(b) == before
    s = tw(a, b, allow_mass_delete=True)
    assert s.exit_code == 0 and names(b) == set()


def test_newer_base_wins_when_a_crash_left_the_two_records_different(pair):
    a, b = pair
    (name,) = [n for n in os.listdir(b / ".dirsync") if n.endswith(".base")]
    old = read(b / ".dirsync" / name)
    put(a / "doc.txt", b"v1\n", mtime_s=1)
    assert tw(a, b).exit_code == 0
    write(b / ".dirsync" / name, old)  # as if the run died between writing a's and b's base
    put(a / "doc.txt", b"v2\n", mtime_s=2)
    s = tw(a, b)
    assert s.exit_code == 0 and s.conflicts == [] and read(b / "doc.txt") == b"v2\n"
    assert read(a / ".dirsync" / name) == read(b / ".dirsync" / name)


# -- the CLI ------------------------------------------------------------------------------------------


def test_cli_plan_shows_decisions_and_changes_nothing(pair):
    a, b = pair
    put(a / "doc.txt", b"a\n", mtime_s=1)
    put(b / "doc.txt", b"b\n", mtime_s=2)
    put(a / "new-a", b"n")
    put(b / "new-b", b"n")
    os.unlink(a / "keep.txt")
    snap = treecmp.snapshot(a), treecmp.snapshot(b)
    cp = run_cli("plan", "--two-way", a, b)
    assert cp.returncode == 4, cp.stderr
    out = cp.stdout
    assert "a → b     new-a" in out and "a ← b     new-b" in out and "delete b  keep.txt" in out
    assert "conflict  doc.txt" in out and "doc.sync-conflict-" in out
    assert (treecmp.snapshot(a), treecmp.snapshot(b)) == snap
    cp = run_cli("sync", "--two-way", "--json", a, b)
    assert cp.returncode == 4, cp.stderr
    j = json.loads(cp.stdout)
    assert j["two_way"] and j["decisions"]["conflicts"] == 1 and j["decisions"]["deleted_on_b"] == 1
    assert j["conflicts"][0]["winner"] == "b" and j["conflicts"][0]["copy"].startswith("doc.sync-conflict-")
    equal_sides(a, b)


@pytest.mark.parametrize("prefer,want", [("a", b"a\n"), ("b", b"b\n"), ("newer", b"b\n")])
def test_prefer(pair, prefer, want):
    a, b = pair
    put(a / "doc.txt", b"a\n", mtime_s=1)
    put(b / "doc.txt", b"b\n", mtime_s=2)
    if prefer == "newer":  # once through the CLI
        cp = run_cli("sync", "--two-way", "--prefer", prefer, a, b)
        assert cp.returncode == 0, cp.stderr
    else:
        assert tw(a, b, prefer=prefer).exit_code == 0
    assert read(a / "doc.txt") == read(b / "doc.txt") == want
    assert not any(is_conflict_copy(n) for n in names(a))
    equal_sides(a, b)


def test_cli_usage_errors(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_cli("sync", "--two-way", a, b, c).returncode == 2
    assert run_cli("sync", "--prefer", "a", a, b).returncode == 2
    assert run_cli("sync", "--two-way", "--prefer", "z", a, b).returncode == 2
    assert run_cli("sync", "--two-way", a, a / "inner").returncode == 12


def test_unreadable_directory_on_one_side_is_left_alone_on_both():
    reason = can_drop_to("nobody")
    if reason:
        pytest.skip(reason)
    with world_dir() as d:
        u = Unprivileged(d)
        a, b = u.path("a"), u.path("b")
        build_tree(a, {"secret": {"k1": b"1\n", "k2": b"2\n"}, "open.txt": b"o\n", "gone.txt": b"g\n"})
        u.own(a)
        assert u.run("sync", "--two-way", a, b).returncode == 0
        os.unlink(os.path.join(b, "secret", "k1"))  # changes under the directory a cannot read now
        write(os.path.join(b, "secret", "k2"), b"2, edited on b\n")
        os.unlink(os.path.join(a, "gone.txt"))  # and ordinary changes elsewhere
        write(os.path.join(b, "open.txt"), b"o, edited on b\n")
        u.own(a, b)
        os.chmod(os.path.join(a, "secret"), 0)
        try:
            cp = u.run("sync", "--two-way", a, b)
        finally:
            os.chmod(os.path.join(a, "secret"), 0o755)
        assert cp.returncode == ExitCode.PARTIAL, cp.stderr
        assert "secret" in cp.stderr and "Permission denied" in cp.stderr
        assert read(os.path.join(a, "secret", "k1")) == b"1\n"  # nothing under it touched, on either side
        assert not os.path.exists(os.path.join(b, "secret", "k1"))
        assert read(os.path.join(a, "open.txt")) == b"o, edited on b\n" and not os.path.exists(os.path.join(b, "gone.txt"))
        cp = u.run("sync", "--two-way", a, b)  # readable again: b's changes there propagate, no conflict
        assert cp.returncode == 0, cp.stderr
        assert not os.path.exists(os.path.join(a, "secret", "k1"))
        assert read(os.path.join(a, "secret", "k2")) == b"2, edited on b\n"
        equal_sides(a, b)


# -- kill -9 mid-run, then a clean rerun ----------------------------------------------------------------


def _scenario(root) -> tuple:
    """Two synced sides with changes on both (edits, deletes, a rename, a conflict); big files
    flowing one way so a throttled run is slow enough to be killed while it writes."""
    a, b = root / "a", root / "b"
    base = {f"f{i}.txt": File(f"file {i}\n".encode() * 50, mtime_ns=T0) for i in range(6)}
    base["conf.txt"] = File(b"conflict base\n", mtime_ns=T0)
    base["dir"] = {"moved.txt": File(b"to be moved\n" * 100, mtime_ns=T0)}
    build_tree(a, base)
    assert tw(a, b).exit_code == 0
    put(a / "conf.txt", b"conflict: a's version\n", mtime_s=10)
    put(b / "conf.txt", b"conflict: b's version\n", mtime_s=20)
    put(a / "f0.txt", b"edited on a\n", mtime_s=11)
    put(b / "f1.txt", b"edited on b\n", mtime_s=12)
    os.unlink(a / "f2.txt")
    os.unlink(b / "f3.txt")
    os.rename(b / "dir" / "moved.txt", b / "moved-here.txt")
    return a, b


@pytest.mark.parametrize("victim", ["a", "b"])
def test_kill_9_mid_run_then_rerun_converges_like_an_uninterrupted_run(tmp_path, victim):
    ctl, run = tmp_path / "control", tmp_path / "killed"
    ctl.mkdir()
    a0, b0 = _scenario(ctl)
    shutil.copytree(ctl, run, symlinks=True)  # same trees, same markers, same base: the same pair
    a, b = run / "a", run / "b"
    big_to = a if victim == "a" else b
    for i in range(8):  # new on the other side: sent to the victim, slowly
        src = (b if victim == "a" else a) / f"big{i}.bin"
        put(src, os.urandom(256 * 1024), mtime_s=30 + i)
        shutil.copy2(src, (b0 if victim == "a" else a0) / f"big{i}.bin")

    rc_control = tw(a0, b0).exit_code
    assert rc_control == 4

    p = popen_cli("sync", "--two-way", "--bwlimit", "1M", a, b)
    try:
        # A temp being staged on the victim: with b as the victim, a is done and b is mid-way.
        def staging() -> bool:
            if p.poll() is not None:
                raise AssertionError(f"the run ended (exit {p.returncode}) before it could be killed:\n"
                                     + p.stderr.read().decode(errors="replace"))
            return bool(stray_temps(big_to))  # in .dirsync/tmp, or beside the target for small files

        wait_for(staging, timeout=60, interval=0.005, what="a staged temp on the victim")
        kill_group(p, signal.SIGKILL)
    finally:
        kill_group(p, signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    pending = [n for n in os.listdir(a / ".dirsync") if n.endswith(".pending")]
    assert pending, "the killed run left its pending marker"

    cp = run_cli("sync", "--two-way", "--json", a, b)
    assert cp.returncode == rc_control, cp.stdout + cp.stderr
    j = json.loads(cp.stdout)
    assert any("interrupted" in w for w in j["warnings"])
    equal_sides(a, b)
    # Same result as the uninterrupted run: no spurious conflicts, nothing lost or duplicated.
    want = treecmp.snapshot(a0)
    got = treecmp.snapshot(a)
    assert treecmp.diff_snapshots(want, got, check_dir_mtimes=False) == []
    assert not [n for n in os.listdir(a / ".dirsync") if n.endswith(".pending")]
    assert tw(a, b).decisions.decisions == []


def test_run_pauses_the_collector_and_leaves_it_as_it_found_it(pair, tmp_path):
    import gc

    a, b = pair
    put(str(a / "doc.txt"), b"version 1\n", mtime_s=5)
    seen: list[bool] = []
    assert gc.isenabled()
    s = run_twoway(TwoWayConfig(str(a), str(b)), Reporter(quiet=True),
                   should_stop=lambda: seen.append(gc.isenabled()) or False)
    assert s.exit_code == 0 and read(b / "doc.txt") == b"version 1\n"
    assert seen and not any(seen)  # paused while the plans were applied
    assert gc.isenabled() and gc.get_freeze_count() == 0  # survivors handed back, none left frozen
    gc.disable()
    try:
        tw(a, b)
        assert not gc.isenabled()  # a caller that had it off gets it off
    finally:
        gc.enable()
    x, y = tmp_path / "x", tmp_path / "y"
    build_tree(x, {"1": b"1"})
    build_tree(y, {"2": b"2"})
    with pytest.raises(RefusedError):  # a run that raises restores it too
        tw(x, y)
    assert gc.isenabled() and gc.get_freeze_count() == 0
