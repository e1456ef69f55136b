"""The walk's C loop (dirsync/_walk.c) against gather's Python loop: same items, fingerprint,
link targets, temps and errors, in the same order, on the same trees (real files, real faults);
its fingerprint sum of a manifest's entries against manifest.fingerprint's Python sum."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import stat

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirsync import manifest, scan
from dirsync.manifest import DirEntry, FileEntry, LinkEntry
from dirsync.scan import STATE_DIR, TMP_PREFIX, Excluder, _Scanner

try:
    from helpers import spy_calls, user_ids, world_dir
except ImportError:
    from tests.helpers import spy_calls, user_ids, world_dir

pytestmark = pytest.mark.skipif(scan._walk is None, reason="dirsync._walk was not built (no C compiler?)")


def walk(root: str, excluder: Excluder, use_c: bool, split: bool = False, on_exclude=None) -> dict:
    """One walk_root of `root` with the C or the Python loop: everything the walk produced."""
    if on_exclude is not None:
        inner = excluder.excluded

        def excluded(rel, is_dir):
            on_exclude(rel, is_dir)
            return inner(rel, is_dir)

        excluder.excluded = excluded
    old = scan.WALK_C
    scan.WALK_C = use_c
    try:
        s = _Scanner(root, excluder, None)
        s.split = split
        items, fp = s.walk_root()
    finally:
        scan.WALK_C = old
    return {"items": items, "fp": fp, "links": s.links, "temps": s.result.temps, "fp_ok": s.fp_ok,
            "errors": [(e.path, e.op, e.errno, e.code) for e in s.result.errors]}


def both(root: str, patterns=(), split: bool = False) -> tuple[dict, dict]:
    return walk(root, Excluder(patterns), True, split), walk(root, Excluder(patterns), False, split)


def make(path: str, data: bytes = b"", mode: int = 0o644, mtime_ns: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def rich_tree(root: str) -> None:
    """Files, empty and nested directories, links of every kind, a fifo, dirsync's temps and
    state folder, odd names and timestamps (before 1970; past 2262, beyond 64-bit nanoseconds)."""
    make(f"{root}/a.txt", b"hello\n")
    make(f"{root}/exec.sh", b"#!/bin/sh\n", 0o755)
    make(f"{root}/setuid", b"x", 0o4750)
    make(f"{root}/old", b"old", mtime_ns=-123_456_789_012)
    make(f"{root}/future", b"f", mtime_ns=13_600_000_000 * 10**9 + 7)
    make(f"{root}/d1/d2/d3/deep", b"deep" * 1000)
    os.makedirs(f"{root}/empty/inner")
    os.chmod(f"{root}/empty", 0o700)
    make(f"{root}/skip.log", b"log")
    make(f"{root}/build/out.o", b"obj")
    make(os.fsdecode(os.fsencode(root) + b"/bad\xff\xfename"), b"latin")
    make(f"{root}/new\nline", b"nl")
    make(f"{root}/ünïcødé/日本", b"u")
    os.symlink("a.txt", f"{root}/rel-link")
    os.symlink("/etc/hostname", f"{root}/abs-link")
    os.symlink("nowhere/at/all", f"{root}/dangling")
    os.symlink("d1", f"{root}/dir-link")
    os.symlink("x" * 2000, f"{root}/long-target")
    os.mkfifo(f"{root}/fifo")
    make(f"{root}/{TMP_PREFIX}1-abc", b"temp")
    os.makedirs(f"{root}/d1/{TMP_PREFIX}dir/x")
    make(f"{root}/{STATE_DIR}/manifest", b"state")
    for i in range(50):
        make(f"{root}/many/f{i:02d}", bytes([i]) * i)


@pytest.mark.parametrize("patterns", [(), ("*.log", "build/", "!keep.log")])
@pytest.mark.parametrize("split", [False, True])
def test_c_loop_equals_python_loop_on_a_rich_tree(tmp_path, patterns, split):
    root = str(tmp_path / "t")
    rich_tree(root)
    c, py = both(root, patterns, split)
    assert c == py
    rels = {r for r, _ in c["items"]}
    assert "a.txt" in rels and "d1/d2/d3/deep" in rels and "empty/inner" in rels and "fifo" in rels
    assert os.fsdecode(b"bad\xff\xfename") in rels and "new\nline" in rels and "ünïcødé/日本" in rels
    assert STATE_DIR not in rels and not any(r.startswith(STATE_DIR + "/") for r in rels)
    assert sorted(c["temps"]) == [f"{TMP_PREFIX}1-abc", f"d1/{TMP_PREFIX}dir"]
    assert c["links"]["long-target"] == "x" * 2000 and c["links"]["dangling"] == "nowhere/at/all"
    assert c["fp_ok"] is False and c["fp"] == b""  # the fifo: no fingerprint can stand for it
    assert ("skip.log" in rels) == (not patterns) and ("build/out.o" in rels) == (not patterns)
    m = dict(c["items"])
    assert m["old"][2] == os.lstat(f"{root}/old").st_mtime_ns < 0
    assert m["future"][2] == os.lstat(f"{root}/future").st_mtime_ns
    st_ = os.lstat(f"{root}/setuid")
    assert m["setuid"] == (st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_ino, st_.st_ctime_ns)


def test_fingerprint_matches_without_special_files(tmp_path):
    root = str(tmp_path / "t")
    rich_tree(root)
    os.unlink(f"{root}/fifo")
    c, py = both(root)
    assert c == py and c["fp_ok"] and len(c["fp"]) == 24
    make(f"{root}/many/f00", b"changed")  # any stat fact that changes changes the fingerprint
    c2, py2 = both(root)
    assert c2 == py2 and c2["fp"] != c["fp"]


_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=12) \
    .filter(lambda n: n not in (".", ".."))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.lists(st.tuples(st.lists(_name, min_size=1, max_size=3), st.sampled_from("fdl"),
                               st.binary(max_size=64), st.integers(-2**40, 2**34) .map(lambda s: s * 10**9 + 1)),
                     max_size=25))
def test_c_loop_equals_python_loop_on_generated_trees(tmp_path_factory, tree):
    root = str(tmp_path_factory.mktemp("gen"))
    for parts, kind, data, mtime in tree:
        p = os.path.join(root, *parts)
        try:
            if kind == "d":
                os.makedirs(p, exist_ok=True)
            elif kind == "l":
                os.makedirs(os.path.dirname(p), exist_ok=True)
                os.symlink(data.decode("latin-1").replace("\0", "") or "t", p)
            else:
                make(p, data, mtime_ns=mtime)
        except OSError:
            continue  # a path the tree already holds otherwise
    c, py = both(root)
    assert c == py
    assert len(c["items"]) == sum(len(fs) + len(ds) for _, ds, fs in os.walk(root)) + 1


def test_entries_vanishing_during_the_walk(tmp_path):
    """A name listed but gone by its stat is simply absent; a directory that became a file
    before it is listed is a 'read directory' error (ENOTDIR); the rest of the walk goes on."""
    root = str(tmp_path / "t")

    def setup():
        for i in range(10):
            make(f"{root}/v/f{i}", b"v")
        os.makedirs(f"{root}/w/sub/x", exist_ok=True)
        make(f"{root}/z", b"z")

    def mutate(rel, is_dir):
        if rel.startswith("v/"):  # the first entry of v asked about: every other one goes
            for i in range(10):
                if f"v/f{i}" != rel and os.path.exists(f"{root}/v/f{i}"):
                    os.unlink(f"{root}/v/f{i}")
        if rel == "w/sub" and is_dir:  # seen as a directory; a file by the time it is listed
            shutil.rmtree(f"{root}/w/sub")
            make(f"{root}/w/sub", b"now a file")

    results = []
    for use_c in (True, False):
        shutil.rmtree(root, ignore_errors=True)
        setup()
        results.append(walk(root, Excluder(["nothing-matches"]), use_c, on_exclude=mutate))
    for r in results:
        rels = [p for p, _ in r["items"]]
        assert len([p for p in rels if p.startswith("v/")]) == 1
        assert "w/sub" in rels and "w/sub/x" not in rels and "z" in rels
        assert r["errors"] == [("w/sub", "read directory", errno.ENOTDIR, "IO")]
        assert r["fp"] == b""  # an error: no fingerprint
    c, py = results  # (the tree was made again for each: only names, types and sizes compare)
    assert [(p, s[0], s[1]) for p, s in c["items"]] == [(p, s[0], s[1]) for p, s in py["items"]]


@pytest.mark.skipif(os.geteuid() != 0 or user_ids("nobody") is None, reason="needs root and a nobody user")
def test_permission_denied_as_an_unprivileged_user():
    """Run as nobody: a directory it may list but not search (stat of each entry: EACCES) and
    one it may search but not list ('read directory': EACCES). Both loops report the same."""
    uid, gid = user_ids("nobody")
    with world_dir() as base:
        root = os.path.join(base, "t")
        make(f"{root}/ok/a", b"a")
        make(f"{root}/nosearch/b", b"b")
        make(f"{root}/nosearch/c", b"c")
        make(f"{root}/nolist/d", b"d")
        for dirpath, dirnames, filenames in os.walk(root):
            os.chown(dirpath, uid, gid)
            for n in filenames:
                os.chown(os.path.join(dirpath, n), uid, gid)
        os.chmod(f"{root}/nosearch", 0o444)
        os.chmod(f"{root}/nolist", 0o111)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                out = pickle.dumps([walk(root, Excluder(), c) for c in (True, False)])
            except BaseException as e:
                out = pickle.dumps(repr(e))
            os.write(w, out)
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 1 << 16):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        got = pickle.loads(data)
        assert isinstance(got, list), got
        c, py = got
        assert c == py
        assert sorted(c["errors"]) == [("nolist", "read directory", errno.EACCES, "PERMISSION"),
                                      ("nosearch/b", "stat", errno.EACCES, "PERMISSION"),
                                      ("nosearch/c", "stat", errno.EACCES, "PERMISSION")]
        rels = {p for p, _ in c["items"]}
        assert {"ok/a", "nosearch", "nolist"} <= rels and "nolist/d" not in rels and "nosearch/b" not in rels
        assert stat.S_ISDIR(dict(c["items"])["nolist"][0])


def test_the_c_loop_is_what_a_scan_uses(tmp_path, monkeypatch):
    """scan_tree goes through _walk.list_dir when it was built (else the suite's other scans
    would only ever test the Python loop)."""
    root = str(tmp_path / "t")
    rich_tree(root)
    calls = spy_calls(monkeypatch, scan._walk, "list_dir", lambda _, path, *a: path)
    res = scan.scan_tree(root)
    assert len(calls) == sum(1 for _ in os.walk(root)) - 3  # not the state folder, nor the temp dir and its x
    assert "d1/d2/d3/deep" in res.manifest.entries


_texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12) | st.sampled_from(
    ["caf\udce9", "a/b\udcff", "plain", "spaces and\nnewline"])  # (surrogate-escaped bytes: non-UTF-8 names)
_ints = st.integers(-2**63, 2**63 - 1) | st.sampled_from([0, 1, -1, 2**63, -2**63 - 1, 2**70])
_entries = st.one_of(
    st.builds(FileEntry, _texts, st.integers(0, 2**40), st.integers(0, 0o7777), _ints, st.just(b"d" * 16),
              st.just(0), st.just((1,)), st.just(b"d" * 16), _ints, _ints, st.booleans()),
    st.builds(DirEntry, _texts, st.integers(0, 0o7777), _ints),
    st.builds(LinkEntry, _texts, _texts, _ints))


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(_entries, max_size=12))
def test_the_fingerprint_sum_in_c_equals_pythons(entries):
    """manifest.fingerprint (and fingerprint_update's sum of added entries) with the C sum and
    with Python's: equal on any entries; an untrusted file or one with no inode gives b"" in
    both; an int beyond 64 bits sends the C sum back to Python (NotImplemented)."""
    d = {f"{i}:{e.path}": e for i, e in enumerate(entries)}
    got = {}
    for c in (True, False):
        manifest.FP_C = c
        try:
            got[c] = (manifest.fingerprint(d), manifest.fingerprint_update(manifest.fingerprint({}), {}, d))
        finally:
            manifest.FP_C = True
    assert got[True] == got[False]
    raw = manifest._walk.fingerprint_sum(list(d.values()), *manifest._row_kinds(), xxhash.xxh3_128_digest)
    beyond = any(not -2**63 <= v < 2**63 for e in entries for k in ("mtime_ns", "ino", "ctime_ns", "size")
                 if isinstance(v := getattr(e, k, 0), int))
    if raw is NotImplemented:
        assert beyond
    elif raw is None:
        assert got[True][0] == b""
    else:
        assert not beyond and got[True][0] == manifest.fp_final(raw, len(d))


def test_the_fingerprint_sum_gives_other_classes_back_to_python():
    class Odd(DirEntry):
        pass

    kinds = manifest._row_kinds()
    assert manifest._walk.fingerprint_sum([DirEntry("a", 0o755, 1), Odd("b", 0o755, 2)], *kinds,
                                          xxhash.xxh3_128_digest) is NotImplemented
    assert manifest._walk.fingerprint_sum([], *kinds, xxhash.xxh3_128_digest) == 0
    with pytest.raises(TypeError):
        manifest._walk.fingerprint_sum([], kinds[0], kinds[1], (DirEntry, ()), xxhash.xxh3_128_digest)
