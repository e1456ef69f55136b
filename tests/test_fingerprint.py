"""Tree fingerprints and the no-op shortcuts built on them (real files in tmp dirs).

A scan sums one hash per entry over its stat facts; a saved cache carries the fingerprint of
the tree it describes when every file in it is racy-clean. A walk that matches it takes the
cache whole without decoding it, and a sync whose master and replica both match what the last
run found "in step" skips planning. Every change a per-file check would notice must also break
the fingerprint, or the shortcut would hide it.
"""

from __future__ import annotations

import json
import os
import pytest

try:
    import treecmp
    from helpers import (Link, build_tree, overwrite_same_size_and_mtime, read, run_cli, settle, sync_json,
                         touch, write)
    from strategies import changed_paths
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import (Link, build_tree, overwrite_same_size_and_mtime, read, run_cli, settle, sync_json,
                               touch, write)
    from tests.strategies import changed_paths

from dirsync import chunking
from dirsync.manifest import FileEntry, fingerprint, fingerprint_update, load, to_bytes
from dirsync.scan import Excluder, scan_tree
from dirsync.status import load_in_step

CHUNKER = chunking.CHUNKER_ID


TREE = {
    "a.txt": "alpha\n",
    "big.bin": os.urandom(300_000),
    "sub/b.txt": "beta\n",
    "sub/deeper/c.txt": "gamma\n",
    "sub/link": Link("b.txt"),
    "empty": {},
}


def saved_scan(root):
    """Scan root fresh (after it settles) and return (result, SavedManifest of its cache)."""
    settle(root)
    res = scan_tree(str(root))
    assert res.fingerprint, "a settled tree must get a fingerprint"
    saved = load(to_bytes(res.manifest, CHUNKER, res.fingerprint), CHUNKER)
    return res, saved


def test_fingerprint_from_walk_equals_fingerprint_from_entries(tmp_path):
    build_tree(tmp_path / "t", TREE)
    res, _ = saved_scan(tmp_path / "t")
    assert fingerprint(res.manifest.entries) == res.fingerprint


def test_updated_fingerprint_equals_a_fresh_one(tmp_path):
    """A replica's close derives the fingerprint of what it holds from its scan's, hashing only
    the entries it replaced: it must equal the fingerprint of the whole, and be b"" as soon as
    one new file entry is not racy-clean (as fingerprint() is)."""
    build_tree(tmp_path / "t", TREE)
    res, _ = saved_scan(tmp_path / "t")
    base = res.manifest.entries
    now = dict(base)
    del now["sub/b.txt"]  # deleted
    now["a.txt"] = base["a.txt"].replace(ino=base["a.txt"].ino + 7)  # rewritten in place
    now["moved.txt"] = base["sub/deeper/c.txt"].replace(path="moved.txt")
    del now["sub/deeper/c.txt"]  # renamed
    got = fingerprint_update(res.fingerprint, base, now)
    assert got == fingerprint(now) and got not in (b"", res.fingerprint)
    assert fingerprint_update(res.fingerprint, base, dict(base)) == res.fingerprint
    untrusted = dict(now)
    untrusted["new.txt"] = FileEntry("new.txt", 1, 0o644, 1, b"x" * 16, 0, (1,), b"x" * 16, 5, 5, False)
    assert fingerprint_update(res.fingerprint, base, untrusted) == b""
    # A fingerprint that is not this base's sum (another format, another count) is not trusted.
    assert fingerprint_update(res.fingerprint[:16], base, now) == fingerprint(now)
    assert fingerprint_update(fingerprint(now), base, now) == fingerprint(now)


def test_unchanged_tree_is_taken_from_the_cache_without_decoding(tmp_path):
    root = tmp_path / "t"
    build_tree(root, TREE)
    first, saved = saved_scan(root)
    again = scan_tree(str(root), cache=saved)
    assert again.unchanged and not again.decoded and not saved.decoded
    assert again.files_read == 0 and again.fingerprint == first.fingerprint
    assert again.manifest == first.manifest  # reading it decodes the cache, equal to a fresh scan


def test_racy_files_get_no_fingerprint(tmp_path):
    root = tmp_path / "t"
    build_tree(root, TREE)
    settle(root)
    write(root / "a.txt", "just now\n")  # written inside the racy window of the next scan
    res = scan_tree(str(root))
    assert res.fingerprint == b""
    assert fingerprint(res.manifest.entries) == b""


def _chmod(root):
    os.chmod(root / "a.txt", 0o600)


def _touch_mtime(root):
    st = os.stat(root / "a.txt")
    touch(root / "a.txt", st.st_mtime_ns + 1)


def _same_size_same_mtime(root):
    overwrite_same_size_and_mtime(root / "sub/b.txt", b"BETA\n")


def _append(root):
    with open(root / "big.bin", "ab") as f:
        f.write(b"x")


def _add(root):
    write(root / "sub/new.txt", "new\n")


def _remove(root):
    os.unlink(root / "sub/deeper/c.txt")


def _rename_file(root):
    os.rename(root / "a.txt", root / "sub/a.txt")


def _rename_dir(root):
    os.rename(root / "sub/deeper", root / "deeper")


def _retarget_link(root):
    os.unlink(root / "sub/link")
    os.symlink("deeper/c.txt", root / "sub/link")
    st = os.lstat(root / "sub")  # keep the parent's mtime: only the link itself differs
    os.utime(root / "sub", ns=(st.st_atime_ns, st.st_mtime_ns))


def _dir_mode(root):
    os.chmod(root / "empty", 0o700)


def _fifo(root):
    os.mkfifo(root / "sub/pipe")


MUTATIONS = [_chmod, _touch_mtime, _same_size_same_mtime, _append, _add, _remove, _rename_file, _rename_dir,
             _retarget_link, _dir_mode, _fifo]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=[m.__name__.strip("_") for m in MUTATIONS])
def test_any_change_defeats_the_shortcut(tmp_path, mutate):
    root = tmp_path / "t"
    build_tree(root, TREE)
    first, saved = saved_scan(root)
    mutate(root)
    res = scan_tree(str(root), cache=saved)
    assert res.decoded and not res.unchanged
    assert res.fingerprint != first.fingerprint
    fresh = scan_tree(str(root))  # no cache at all: what the tree really is
    assert res.manifest == fresh.manifest
    if mutate is _same_size_same_mtime:
        assert res.files_read >= 1  # the cache entry was not trusted: the content was read


def test_excludes_apply_before_the_fingerprint(tmp_path):
    root = tmp_path / "t"
    build_tree(root, TREE)
    settle(root)
    ex = Excluder(["*.bin"])
    res = scan_tree(str(root), excluder=ex)
    saved = load(to_bytes(res.manifest, CHUNKER, res.fingerprint), CHUNKER)
    with open(root / "other.bin", "wb") as f:  # excluded: changes nothing the scan sees
        f.write(b"ignored")
    os.utime(root, ns=(os.stat(root).st_atime_ns, res.manifest.entries[""].mtime_ns))
    again = scan_tree(str(root), excluder=ex, cache=saved)
    assert again.unchanged and not again.decoded
    assert "big.bin" not in again.manifest.entries


# -- the "in step" shortcut of sync, end to end through the CLI -------------------------------


def _status_record(env_home) -> dict:
    """The one pair's status record, with its in-step note (the .step beside it) as "in_step"."""
    d = os.path.join(env_home, "dirsync", "status")
    (name,) = [n for n in os.listdir(d) if n.endswith(".json")]
    with open(os.path.join(d, name)) as f:
        rec = json.load(f)
    assert "in_step" not in rec
    rec["in_step"] = load_in_step(rec["master"], rec["replica"])
    return rec


def _in_step_pair(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    sync_json(m, r)  # in step as it leaves them, unless files were still racy (then the next run notes it)
    settle(m)
    settle(r)
    sync_json(m, r)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["planned"] is False, "the in-step shortcut was not taken"
    return m, r


def test_noop_run_skips_planning_once_in_step(tmp_path):
    m, r = _in_step_pair(tmp_path)
    rec = _status_record(os.environ["XDG_STATE_HOME"])
    assert set(rec["in_step"]) == {"master", "replica", "opts"}
    cp = run_cli("plan", m, r)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, r)


@pytest.mark.parametrize("side", ["master", "replica"])
def test_in_step_shortcut_does_not_hide_a_silent_edit(tmp_path, side):
    """Same size, mtime put back: only the ctime tells. Either side must be noticed."""
    m, r = _in_step_pair(tmp_path)
    target = (m if side == "master" else r) / "sub/b.txt"
    overwrite_same_size_and_mtime(target, b"BETA\n")
    _, out = sync_json(m, r)
    assert out["replicas"][0]["planned"] is True
    treecmp.assert_trees_equal(m, r)
    assert read(r / "sub/b.txt") == read(m / "sub/b.txt")


def test_in_step_shortcut_does_not_hide_a_replica_delete(tmp_path):
    m, r = _in_step_pair(tmp_path)
    os.unlink(r / "sub/deeper/c.txt")
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 1
    treecmp.assert_trees_equal(m, r)


def test_a_clean_run_leaves_the_pair_in_step(tmp_path):
    """A run that carried out its whole plan notes master and replica as it left them: the
    next run plans nothing, the first time already (a copy, then a change)."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    settle(m)  # old enough that the files written from it are racy-clean at once
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 4
    _, out = sync_json(m, r)
    assert out["replicas"][0]["planned"] is False, "the first no-op after a copy planned again"
    write(m / "sub/b.txt", "beta, edited\n")
    os.unlink(m / "a.txt")
    settle(m)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 1 and out["replicas"][0]["files_deleted"] == 1
    _, out = sync_json(m, r)
    assert out["replicas"][0]["planned"] is False
    treecmp.assert_trees_equal(m, r)


def _tamper(r, how: str, chmod_path: str) -> None:
    """Change the replica behind dirsync's back: a same-size edit with the mtime put back, a
    delete, or a chmod of `chmod_path`."""
    if how == "silent-edit":
        overwrite_same_size_and_mtime(r / "sub/b.txt", b"BETA\n")
    elif how == "delete":
        os.unlink(r / "sub/deeper/c.txt")
    else:
        os.chmod(r / chmod_path, 0o600)


@pytest.mark.parametrize("tamper", ["silent-edit", "delete", "chmod"])
def test_noted_replica_state_does_not_hide_a_later_replica_change(tmp_path, tamper):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    settle(m)
    sync_json(m, r)
    _tamper(r, tamper, "a.txt")
    _, out = sync_json(m, r)
    assert out["replicas"][0]["planned"] is True
    treecmp.assert_trees_equal(m, r)


@pytest.mark.parametrize("tamper", ["silent-edit", "delete", "chmod"])
def test_planning_only_master_changes_does_not_hide_a_replica_change(tmp_path, tamper):
    """A run after a master change plans only the master's changed paths when the replica is
    still as the last run left it; a replica changed behind its back (another file) is
    compared path by path again, and converges."""
    m, r = _in_step_pair(tmp_path)
    _tamper(r, tamper, "sub/b.txt")
    write(m / "a.txt", "alpha, edited on the master\n")
    settle(m)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["planned"] is True
    treecmp.assert_trees_equal(m, r)


def test_planning_only_master_changes_needs_the_cache_the_pair_was_in_step_with(tmp_path):
    """The master's cache moved on with a sync to another replica: for the first replica, what
    changed since its own in-step run is more than what changed since that cache; it still
    gets both changes."""
    m, r = _in_step_pair(tmp_path)
    write(m / "sub/b.txt", "beta, first change\n")
    settle(m)
    sync_json(m, tmp_path / "other")
    write(m / "a.txt", "alpha, second change\n")
    settle(m)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 2
    treecmp.assert_trees_equal(m, r)


def test_a_run_with_a_failure_notes_nothing(tmp_path):
    import shutil
    import subprocess

    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    settle(m)
    sync_json(m, r)
    write(m / "sub/new.txt", "new\n")
    settle(m)
    # The new file cannot be created: a read-only directory, immutable for root too.
    os.chmod(r / "sub", 0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") and subprocess.run(
        ["chattr", "+i", str(r / "sub")], capture_output=True).returncode == 0
    if os.geteuid() == 0 and not immutable:
        os.chmod(r / "sub", 0o755)
        pytest.skip("root, and no chattr +i here: cannot make a directory unwritable")
    try:
        _, out = sync_json(m, r, expect=23)
        assert out["replicas"][0]["errors"]
        assert _status_record(os.environ["XDG_STATE_HOME"]).get("in_step") is None
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(r / "sub")], check=True)
        os.chmod(r / "sub", 0o755)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["planned"] is True and out["replicas"][0]["files_written"] == 1


def test_in_step_is_not_taken_with_other_options(tmp_path):
    m, r = _in_step_pair(tmp_path)
    write(r / "extra.txt", "only on the replica\n")
    settle(r)
    _, out = sync_json(m, r, args=("--no-delete",))  # the replica keeps extra.txt: in step without deletes
    _, out = sync_json(m, r, args=("--no-delete",))
    assert (r / "extra.txt").exists()
    _, out = sync_json(m, r)  # with deletes the old finding does not hold
    assert out["replicas"][0]["planned"] is True and out["replicas"][0]["files_deleted"] == 1
    treecmp.assert_trees_equal(m, r)


def test_cache_of_format_1_is_still_read_and_upgraded(tmp_path):
    import msgpack
    import xxhash

    from dirsync.manifest import MAGIC, encode_rows
    from dirsync.state import master_cache_path

    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    sync_json(m, r)
    settle(m)
    res = scan_tree(str(m))
    body = msgpack.packb((CHUNKER, encode_rows(res.manifest.entries.values()), ""), use_bin_type=True)
    path = master_cache_path(os.path.realpath(m))
    with open(path, "wb") as f:
        f.write(MAGIC + b"\x01" + xxhash.xxh3_64_digest(body) + body)
    _, out = sync_json(m, r)
    assert out["master_scan"]["files_hashed"] == 0  # the old cache was used
    with open(path, "rb") as f:
        saved = load(f.read(), CHUNKER)
    assert saved.fingerprint == res.fingerprint  # rewritten with the fingerprint it lacked


# -- the two-way "nothing to do" shortcut -------------------------------------------------------


def _tw(a, b, *args):
    cp = run_cli("sync", "--two-way", "--json", *args, a, b)
    assert cp.returncode in (0, 4), cp.stderr
    return json.loads(cp.stdout)


def _two_way_in_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, TREE)
    _tw(a, b)
    settle(a)
    settle(b)
    out = _tw(a, b)  # re-reads what was racy, finds nothing to do, notes it
    assert out["sides"][0]["planned"] is True
    out = _tw(a, b)
    assert [s["planned"] for s in out["sides"]] == [False, False], "the two-way shortcut was not taken"
    return a, b


@pytest.mark.parametrize("side", ["a", "b"])
def test_two_way_shortcut_does_not_hide_a_silent_edit(tmp_path, side):
    a, b = _two_way_in_step(tmp_path)
    where = a if side == "a" else b
    overwrite_same_size_and_mtime(where / "sub/b.txt", b"BETA\n")
    out = _tw(a, b)
    assert out["sides"][0]["planned"] is True
    assert read(a / "sub/b.txt") == read(b / "sub/b.txt") == b"BETA\n"
    treecmp.assert_trees_equal(a, b)


@pytest.mark.parametrize("field", ["base", "opts", "fp"])
def test_two_way_shortcut_needs_every_fact_of_its_note(tmp_path, field):
    """The note (.dirsync/twoway-*.step) holds only while its base, options and fingerprints all
    still hold: alter any one and the run reconciles in full."""
    a, b = _two_way_in_step(tmp_path)
    (note,) = [p for p in (a / ".dirsync").iterdir() if p.name.endswith(".step")]
    step = json.loads(note.read_text())
    if field == "fp":
        k = sorted(step["fp"])[0]
        step["fp"][k] = "0" * 32
    else:
        step[field] = "something else"
    note.write_text(json.dumps(step))
    out = _tw(a, b)
    assert [s["planned"] for s in out["sides"]] == [True, True]
    treecmp.assert_trees_equal(a, b)
    out = _tw(a, b, "--prefer", "a")  # other options: no shortcut either
    assert out["sides"][0]["planned"] is True


@pytest.mark.parametrize("how", ["walk", "split-reads", "prewalk"])
def test_scan_knows_which_paths_changed_since_its_cache(tmp_path, monkeypatch, how):
    """A scan against a saved cache notes the paths whose entry is not the cache's own object
    (what a run plans when the pair was in step): computed from what the scan missed, it
    equals the full comparison (strategies.changed_paths) for every kind of change, also when a
    second process read files or a prewalk child classified the tree."""
    import shutil

    from dirsync import scan as scan_mod
    from dirsync.scan import Prewalk

    root = tmp_path / "t"
    build_tree(root, {**TREE, "d1/x.txt": "x\n", "d1/y.txt": "y\n", "d2/z.txt": "z\n", "keep/k.txt": "k\n",
                      "l2": Link("a.txt"), **{f"many/f{i}.txt": f"{i}\n" for i in range(60)}})
    res, _ = saved_scan(root)
    saved = load(to_bytes(res.manifest, CHUNKER, res.fingerprint, packed=True), CHUNKER, own=True)
    write(root / "a.txt", "alpha, edited\n")  # edited
    os.chmod(root / "sub/b.txt", 0o600)  # mode only
    write(root / "new.txt", "new\n")  # new
    os.unlink(root / "sub/deeper/c.txt")  # gone
    shutil.rmtree(root / "d1")  # a directory and its files gone
    os.rename(root / "d2", root / "d3")  # moved
    os.unlink(root / "l2")
    os.symlink("new.txt", root / "l2")  # a link retargeted
    os.utime(root / "empty", ns=(5_000_000_000, 5_000_000_000))  # a directory's mtime only
    for i in range(3):
        write(root / f"many/f{i}.txt", f"{i} edited\n")
    settle(root)
    taken = []  # the path under test was taken (not a fallback to a plain walk)
    if how == "split-reads":
        monkeypatch.setattr(scan_mod, "READ_SPLIT_MIN", 2)
        real_share = scan_mod._Scanner._take_share
        monkeypatch.setattr(scan_mod._Scanner, "_take_share", lambda *a: taken.append(1) or real_share(*a))
    if how == "prewalk":
        real_take = scan_mod._take_classified
        monkeypatch.setattr(scan_mod, "_take_classified", lambda *a: taken.append(real_take(*a)) or taken[-1])
    walked = Prewalk.start(str(root), Excluder(), saved.fingerprint, saved) if how == "prewalk" else None
    got = scan_tree(str(root), cache=saved, walked=walked, split_reads=how == "split-reads")
    assert bool(taken) == (how != "walk") and None not in taken
    assert got.base is not None and got.base[0] == saved.fingerprint
    full = changed_paths(saved.manifest.entries, got.manifest.entries)
    assert got.base[1] == full
    assert {"a.txt", "sub/b.txt", "new.txt", "sub/deeper/c.txt", "d1", "d1/x.txt", "d2", "d3/z.txt", "l2",
            "empty", "many/f0.txt"} <= full
    assert not {"keep", "keep/k.txt", "big.bin", "sub/link", "many/f5.txt"} & full
