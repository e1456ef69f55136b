"""New small files written in C (dirsync/_files.c via Replica.stage_new) against stage()'s
Python path: the same replicas and caches; every fault leaves the file to stage(), which
writes it or reports what it always reported; nothing is ever left at a file's name."""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest
import xxhash

from dirsync import chunking
from dirsync import replica as replica_mod
from dirsync import scan as scan_mod
from dirsync.apply import MasterReader, ReplicaSummary, apply_actions
from dirsync.chunking import CHUNKER_ID
from dirsync.errors import ItemIOError, SourceChangedError
from dirsync.manifest import DirEntry, FileEntry, Manifest
from dirsync.plan import diff
from dirsync.replica import Replica
from dirsync.scan import Excluder, scan_tree
from dirsync.state import load_manifest_file

try:
    import treecmp
    from helpers import build_tree, raw_snapshot, settle, spy_calls, stray_temps, sync_json
    from test_faults import tiny_tmpfs
except ImportError:
    from tests import treecmp
    from tests.helpers import build_tree, raw_snapshot, settle, spy_calls, stray_temps, sync_json
    from tests.test_faults import tiny_tmpfs

pytestmark = pytest.mark.skipif(replica_mod._files is None, reason="dirsync._files was not built (no C compiler?)")
_files = replica_mod._files
H = xxhash.xxh3_128_digest


def tree(root) -> None:
    """Files the batch takes (small, new, in new directories) and files it leaves to stage()."""
    spec = {f"d{k}/f{i}.txt": (f"{k}:{i}\n" * (i * 7 + 1)).encode() for k in range(3) for i in range(40)}
    spec.update({"d0/empty": b"", "top.txt": b"at the root: not in a new directory\n",
                 "d1/big.bin": os.urandom((64 << 10) + 1), "d1/edge.bin": os.urandom((64 << 10) - 1),
                 "d2/sub/deep.txt": b"deep\n"})
    build_tree(root, spec)
    os.chmod(root / "d0/f1.txt", 0o4755)  # setuid: beyond the umask's modes (fchmod after writing)
    os.chmod(root / "d0/f2.txt", 0o600)
    os.utime(root / "d0/f3.txt", ns=(-86_400 * 10**9 * 365 - 123, -86_400 * 10**9 * 365 - 123))  # before 1970
    weird = os.fsencode(root / "d2") + b"/caf\xe9\nname"
    with open(weird, "wb") as f:
        f.write(b"a non-UTF-8 name with a newline\n")
    settle(root)  # (every entry trusted, the same in every copy: see settle)
    os.utime(root / "d0/f4.txt", ns=(2**63 + 10**9, 2**63 + 10**9))  # past 2262 (never trusted): left to stage()


def sync(m, r, hold: int, c: bool, monkeypatch, between=None, full: bool = False) -> tuple[ReplicaSummary, list]:
    """One local sync in this process (hold: the scan's held bytes), with or without _files;
    returns the summary and the paths each stage_new call wrote. `full`: the disk is full (the
    replica's cache cannot be saved)."""
    monkeypatch.setattr(replica_mod, "_files", _files if c else None)
    batches = spy_calls(monkeypatch, Replica, "stage_new",  # (the paths each call wrote)
                        lambda left, self, ws, source: [w.path for w in ws if id(w) not in left])
    ms = scan_tree(str(m), hold=hold)
    rep = Replica(str(r))
    rep.open(init=True)
    plan = diff(ms.manifest, rep.manifest(Excluder()).manifest)
    if between is not None:
        between()
    summary = ReplicaSummary(replica=str(r))
    try:
        apply_actions(rep, plan.actions, MasterReader(str(m), None, ms.held).local_sends, summary, split=False)
    finally:
        try:
            rep.close()
        except ItemIOError as e:
            assert full and e.errno == errno.ENOSPC
    return summary, batches


def cache_rows(r) -> dict:
    """The replica's saved cache, per path, without what differs between two copies (inodes, ctimes)."""
    saved = load_manifest_file(os.path.join(r, ".dirsync", "manifest"), CHUNKER_ID).saved
    return {p: (e.__class__.__name__, *(getattr(e, k, None) for k in ("size", "mode", "mtime_ns", "digest",
                                                                         "digests", "trusted", "target")))
            for p, e in saved.manifest.entries.items()}


@pytest.mark.parametrize("hold", [0, 64 << 20], ids=["read-again", "held"])
def test_a_copy_through_the_batch_equals_one_through_stage(tmp_path, monkeypatch, hold):
    m = tmp_path / "m"
    tree(m)
    got = {}
    for c in (True, False):
        r = tmp_path / f"r{int(c)}"
        summary, batches = sync(m, r, hold, c, monkeypatch)
        assert summary.errors == [] and summary.files_written == 126
        treecmp.assert_trees_equal(m, r)
        got[c] = ({p: v for p, v in raw_snapshot(r).items() if not p.startswith(b".dirsync")}, cache_rows(r), batches)
    assert got[True][:2] == got[False][:2]
    taken = [p for b in got[True][2] for p in b]
    every = {p for p, e in got[True][1].items() if e[0] == "FileEntry"}
    assert got[False][2] == [] and len(taken) == len(set(taken)) == 122
    # all but: at the root (not a new directory), empty (nothing sent), 64 KiB or more, past 2262
    assert set(taken) == every - {"top.txt", "d0/empty", "d1/big.bin", "d0/f4.txt"}
    assert os.stat(tmp_path / "r1/d0/f1.txt").st_mode & 0o7777 == 0o4755


def test_master_files_changed_since_the_scan_are_reported_as_stage_reports_them(tmp_path, monkeypatch):
    """Changed (same size and mtime, other bytes), grown, vanished, turned into a link: the
    batch leaves each to stage(), which reports it; every other file arrives."""
    m = tmp_path / "m"
    build_tree(m, {f"d/f{i}.txt": f"file {i}\n".encode() * 20 for i in range(12)})

    def meddle():
        p = m / "d/f1.txt"
        st = os.stat(p)
        p.write_bytes(b"X" * st.st_size)
        os.utime(p, ns=(st.st_mtime_ns, st.st_mtime_ns))
        with open(m / "d/f2.txt", "ab") as f:
            f.write(b"more")
        os.unlink(m / "d/f3.txt")
        os.unlink(m / "d/f4.txt")
        os.symlink("f5.txt", m / "d/f4.txt")

    results = {}
    for c in (True, False):
        r = tmp_path / f"r{int(c)}"
        build_tree(m, {f"d/f{i}.txt": f"file {i}\n".encode() * 20 for i in range(12)})
        if (m / "d/f4.txt").is_symlink():
            os.unlink(m / "d/f4.txt")
            build_tree(m, {"d/f4.txt": b"file 4\n" * 20})
        summary, batches = sync(m, r, 0, c, monkeypatch, meddle)
        assert bool(batches) == c
        results[c] = sorted((e.path, type(e).__name__, e.op) for e in summary.errors)
        assert sorted(os.listdir(r / "d")) == sorted(f"f{i}.txt" for i in range(12) if i not in (1, 2, 3, 4))
        assert stray_temps(r) == []
    assert results[True] == results[False] and [p for p, *_ in results[True]] == [f"d/f{i}.txt" for i in (1, 2, 3, 4)]


def test_write_new_checks_before_creating_and_leaves_nothing_when_it_fails(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "taken").write_bytes(b"someone else's\n")
    src = tmp_path / "src"
    src.write_bytes(b"source bytes\n")
    st = os.stat(src)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ok = b"fine\n"

        def item(name, data=ok, src_path=None, size=None, digest=None, mtime=1_000_000_123, modes=(0o644, -1),
                 cuts=None):
            size = len(data) if size is None else size
            return (dfd, name, src_path, None if src_path else data, size, digest or H(data), mtime, *modes, cuts)

        codes = _files.write_new([
            item(b"a"),                                   # written
            item(b"taken"),                               # EEXIST: left as it was
            item(b"b", digest=H(b"other")),               # digest mismatch: -1, nothing created
            item(b"c", data=b"short", size=6),            # size mismatch
            item(b"e", data=src.read_bytes(), src_path=os.fsencode(src), mtime=st.st_mtime_ns),  # read here
            item(b"f", data=src.read_bytes(), src_path=os.fsencode(src), mtime=st.st_mtime_ns + 1),  # mtime differs
            item(b"g", data=src.read_bytes(), src_path=os.fsencode(tmp_path / "gone"), mtime=st.st_mtime_ns),
            item(b"h", modes=(0o600, 0o2750)),            # fchmod after writing
            item(b"i", b"0123456789", cuts=(3, 3, 4)),     # its chunk digests derived
            item(b"j", b"0123456789", cuts=(3, 3, 3)),     # cuts that do not tile it: nothing made
            item(b"k", b"0123456789", cuts=(3, 0, 7)),
        ], H)
        assert codes == [0, errno.EEXIST, -1, -1, 0, -1, errno.ENOENT, 0, H(b"012") + H(b"345") + H(b"6789"), -1, -1]
        assert sorted(os.listdir(d)) == ["a", "e", "h", "i", "taken"]
        assert os.stat(d / "a").st_mtime_ns == 1_000_000_123 == os.stat(d / "a").st_atime_ns  # (before a read)
        assert (d / "a").read_bytes() == ok and (d / "e").read_bytes() == b"source bytes\n"
        assert (d / "taken").read_bytes() == b"someone else's\n"
        assert os.stat(d / "e").st_mtime_ns == st.st_mtime_ns
        assert stat.S_IMODE(os.stat(d / "h").st_mode) == 0o2750
        with pytest.raises(TypeError):  # a bad item: checked before any file is made
            _files.write_new([item(b"x"), (dfd, b"y")], H)
        with pytest.raises(TypeError):
            _files.write_new([item(b"x"), item(b"y", cuts=(1, "2"))], H)
        with pytest.raises(ValueError):
            _files.write_new([item(b"x"), item(b"y/z")], H)
        assert not (d / "x").exists()

        def failing_hash(data):  # a Python error midway: what the call made is gone again
            if data == b"third\n":
                raise RuntimeError("boom")
            return H(data)

        with pytest.raises(RuntimeError):
            _files.write_new([item(b"p1", b"first\n"), item(b"p2", b"second\n"), item(b"p3", b"third\n")],
                             failing_hash)
        assert sorted(os.listdir(d)) == ["a", "e", "h", "i", "taken"]
    finally:
        os.close(dfd)


def test_a_full_disk_leaves_no_partial_file_and_the_rest_is_reported(tmp_path, monkeypatch):
    """ENOSPC midway through a batch: the file being written is unlinked by the C call,
    stage() then reports it (or those after it) as the Python path does; the next run with
    room writes exactly what is missing."""
    m = tmp_path / "m"
    build_tree(m, {f"d/f{i:03}.bin": os.urandom(60_000) for i in range(60)})  # ~3.6 MB into 2 MB
    with tiny_tmpfs("2m") as r:
        summary, batches = sync(m, r, 0, True, monkeypatch, full=True)
        assert batches and summary.errors and all(e.op in ("write", "commit") for e in summary.errors)
        for name in os.listdir(os.path.join(r, "d")) if os.path.isdir(os.path.join(r, "d")) else ():
            assert (m / "d" / name).read_bytes() == open(os.path.join(r, "d", name), "rb").read()
        assert stray_temps(r) == []
    r2 = tmp_path / "r2"
    sync_json(m, r2)
    treecmp.assert_trees_equal(m, r2)


# -- a small file read and hashed in C (scan._Scanner.hash_file) ------------------------------------


def scanned(root, use_c: bool, monkeypatch, hold: int = 64 << 20):
    monkeypatch.setattr(scan_mod, "READ_C", use_c)
    calls = spy_calls(monkeypatch, scan_mod._files, "read_small", lambda got, *a: got is not None)
    res = scan_tree(str(root), hold=hold)
    monkeypatch.undo()
    return res, calls


@pytest.mark.parametrize("seed", [1, 2])
def test_read_small_gives_what_the_python_read_gives(tmp_path, monkeypatch, seed):
    """Every chunk class (0: one chunk; 512 B to 8 KiB), random and repetitive bytes, sizes at
    the classes' edges and at the C read's limit; modes, an old mtime, non-UTF-8 names: the
    same entries (digests, chunk sizes, stat facts, trust) and held bytes either way."""
    rnd = random.Random(seed)
    spec = {}
    for n in (0, 1, 63, 64, 1024, 1025, 2048, 4095, 4096, 16384, 65536, 65537, 100_000, 262_144, 262_145, 300_000):
        spec[f"r/{n}.bin"] = rnd.randbytes(n)
        spec[f"t/{n}.txt"] = (b"abc\n" * (n // 4 + 1))[:n]
    build_tree(tmp_path / "m", spec)
    os.chmod(tmp_path / "m/r/1025.bin", 0o4711)
    os.utime(tmp_path / "m/t/2048.txt", ns=(-10**18, -10**18))
    with open(os.fsencode(tmp_path / "m/r") + b"/caf\xe9", "wb") as f:
        f.write(rnd.randbytes(5000))
    settle(tmp_path / "m")
    c, c_calls = scanned(tmp_path / "m", True, monkeypatch)
    py, py_calls = scanned(tmp_path / "m", False, monkeypatch)
    assert py_calls == [] and c_calls.count(True) == sum(len(v) <= 262_144 for v in spec.values()) + 1
    assert list(c.manifest.entries) == list(py.manifest.entries)
    for p, e in c.manifest.entries.items():
        f = py.manifest.entries[p]
        assert [getattr(e, k) for k in e.__slots__ if k != "held_sizes"] == \
            [getattr(f, k) for k in f.__slots__ if k != "held_sizes"] and getattr(e, "sizes", 0) == getattr(f, "sizes", 0), p
    assert c.held == py.held and (c.files_read, c.bytes_read) == (py.files_read, py.bytes_read)
    assert sum(len(e.sizes) > 1 for e in c.manifest.entries.values() if isinstance(e, FileEntry)) > 10


@pytest.mark.parametrize("avg", [0, 512, 1024, 2048, 4096, 8192])
def test_read_small_cuts_as_pyfastcdc_does(tmp_path, avg):
    rnd = random.Random(avg)
    for k in range(40):
        n = rnd.choice([rnd.randrange(1, 300), rnd.randrange(300, 40_000), rnd.randrange(40_000, 200_000)])
        data = rnd.randbytes(n) if k % 3 else bytes(rnd.choice(b"ab") for _ in range(n))
        p = tmp_path / f"f{k}"
        p.write_bytes(data)
        st = os.stat(p)
        got = _files.read_small(str(p), st.st_ino, n, chunking.cut_params(avg), H)
        sizes, digests, whole = chunking.chunk_buffer(data, avg)
        assert got[:4] == (data, sizes, digests, whole)
        assert got[4:] == (stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_ctime_ns)


def test_read_small_leaves_anything_else_to_python(tmp_path):
    """None for: a missing file, a link, a directory, another inode, another size (grown or
    shrunk since the walk), an unreadable file (as another user): hash_file's Python read then
    raises or reports as it always did."""
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    os.symlink("f", tmp_path / "l")
    st = os.stat(p)
    cut = chunking.cut_params(0)
    assert _files.read_small(str(p), st.st_ino, 100, cut, H) is not None
    for path, ino, size in ((tmp_path / "gone", st.st_ino, 100), (tmp_path / "l", st.st_ino, 100),
                            (tmp_path, os.stat(tmp_path).st_ino, 0), (p, st.st_ino + 1, 100), (p, st.st_ino, 99),
                            (p, st.st_ino, 101)):
        assert _files.read_small(str(path), ino, size, cut, H) is None, path
    with pytest.raises(ValueError):
        _files.read_small(str(p), st.st_ino, 100, (0, 0, 0, 0, 0, b"short", b"short"), H)


def test_read_checked_gives_a_master_files_bytes_only_as_the_plan_has_them(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"content\n" * 10)
    os.symlink("f", tmp_path / "l")
    st = os.stat(p)
    d = H(p.read_bytes())
    assert _files.read_checked(str(p), 80, st.st_mtime_ns, d, H) == b"content\n" * 10
    for path, size, mtime, digest in ((p, 79, st.st_mtime_ns, d), (p, 81, st.st_mtime_ns, d),
                                      (p, 80, st.st_mtime_ns + 1, d), (p, 80, st.st_mtime_ns, H(b"other")),
                                      (tmp_path / "l", 80, st.st_mtime_ns, d), (tmp_path / "gone", 80, 0, d),
                                      (tmp_path, 80, st.st_mtime_ns, d)):
        assert _files.read_checked(str(path), size, mtime, digest, H) is None, (path, size, mtime)


def test_a_master_readers_whole_file_is_held_read_in_c_or_refused_as_sends_refuses_it(tmp_path, monkeypatch):
    """MasterReader.whole (an SSH write batch's bytes): the scan's held bytes, else read in C,
    and a file changed since the scan raises what sends() raises (its Python read)."""
    m = tmp_path / "m"
    build_tree(m, {"a.txt": b"alpha\n" * 30, "b.txt": b"beta\n" * 30, "c.txt": b"gamma\n" * 30})
    settle(m)
    ms = scan_tree(str(m), hold=len(b"alpha\n" * 30))  # (room for the first file read only)
    plan = diff(ms.manifest, Manifest({"": DirEntry("", 0o755, 0)}))
    writes = {a.path: a for a in plan.actions if a.__class__.__name__ == "WriteFile"}
    reader = MasterReader(str(m), None, ms.held)
    assert len(ms.held) == 1
    read = spy_calls(monkeypatch, _files, "read_checked", lambda got, *a: got is not None)
    for p in ("a.txt", "b.txt", "c.txt"):
        assert reader.whole(writes[p]) == (m / p).read_bytes()
    assert read == [True, True]  # (the held one needed no read)
    p = next(p for p in ("b.txt", "c.txt") if p not in ms.held)
    st = os.stat(m / p)
    (m / p).write_bytes(b"X" * st.st_size)  # same size and mtime, other bytes
    os.utime(m / p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(SourceChangedError):
        reader.whole(writes[p])
    assert read[-1] is False
