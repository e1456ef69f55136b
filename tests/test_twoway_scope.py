"""Two-way runs that look only at the paths where a side differs from the base (the scope).

1. Property: on generated sides that share most of the base, the scoped reconcile, plans and new
   base are those of the whole-tree computation whenever it is taken (no conflicts).
2. Base records stored as a snapshot plus a delta decode to the manifest they were made from.
3. Real directories: every kind of change, on either side, is still seen and propagated by a
   scoped run, the stored base equals both sides afterwards, and a rerun has nothing to do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirsync import twoway
from dirsync.manifest import DirEntry, Entry, Manifest, entry_key, parent_of
from dirsync.progress import Reporter
from dirsync.twoway import (BaseRecord, ReconcileOptions, TwoWayConfig, decode_base, encode_base, encode_base_delta,
                            reconcile, run_twoway, settled_base, side_plans)

try:
    import treecmp
    from helpers import File, build_tree
    from strategies import manifests
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import File, build_tree
    from tests.strategies import manifests

EXAMPLES = int(os.environ.get("DIRSYNC_PROP_EXAMPLES", "50"))
SETTINGS = settings(max_examples=EXAMPLES * 4, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CHUNKER = "test-chunker"


def consistent(entries: dict[str, Entry]) -> Manifest:
    """Drop entries whose parent is not a directory (parents sort first)."""
    out: dict[str, Entry] = {}
    for p in sorted(entries):
        if not p or isinstance(out.get(parent_of(p)), DirEntry):
            out[p] = entries[p]
    return Manifest(out)


@st.composite
def near(draw, base: Manifest) -> Manifest:
    """A side that mostly still holds the base: each path from the base or from another tree."""
    other = draw(manifests())
    keep = draw(st.lists(st.booleans(), min_size=64, max_size=64))
    mixed: dict[str, Entry] = {}
    for i, p in enumerate(sorted(set(base.entries) | set(other.entries))):
        src = base if keep[i % 64] or i % 3 else other  # at most a third of the paths may move away
        e = src.entries.get(p)
        if e is not None:
            mixed[p] = e
    if "" not in mixed:
        mixed[""] = base.entries.get("") or DirEntry("", 0o755, 0)
    return consistent(mixed)


def scoped(base: Manifest, a: Manifest, b: Manifest, prefer=None, every_file=True):
    scope = twoway._scope(base, a, b)
    sa, sb = (twoway._restrict(m, scope, every_file=every_file) for m in (a, b))
    dec = reconcile(twoway._restrict(base, scope), sa, sb, ReconcileOptions(prefer=prefer))
    return scope, dec, sa, sb


@SETTINGS
@given(st.data(), st.sampled_from([None, "newer", "a"]))
def test_scoped_reconcile_plans_and_base_equal_the_whole_tree_ones(data, prefer):
    base = data.draw(manifests())
    a, b = data.draw(near(base)), data.draw(near(base))
    full = reconcile(base, a, b, ReconcileOptions(prefer=prefer))
    scope, dec, sa, sb = scoped(base, a, b, prefer)
    if dec.conflicts:  # run_twoway reconciles everything then
        return
    assert full.conflicts == []
    assert [(d.path, d.action, d.reason, d.minor) for d in dec.decisions] == \
        [(d.path, d.action, d.reason, d.minor) for d in full.decisions]
    # Outside the scope the whole-tree target is the base; inside it, the scoped target.
    for p in set(full.target.entries) | set(dec.target.entries) | set(base.entries):
        want = full.target.entries.get(p)
        got = dec.target.entries.get(p) if p in scope else base.entries.get(p)
        assert got == want, p
    assert side_plans(dec, sa, sb) == side_plans(full, a, b)
    # A local side copies only from changed files: the same actions, maybe other ops.
    la, lb = (twoway._restrict(m, scope) for m in (a, b))
    for got, want in zip(side_plans(dec, la, lb), side_plans(full, a, b)):
        assert [(type(x), getattr(x, "path", None)) for x in got.actions] == \
            [(type(x), getattr(x, "path", None)) for x in want.actions]
    unsettled = sorted(scope)[::3]
    changes = twoway._settle_scoped(base, dec, unsettled, scope)
    new = dict(base.entries)
    for p, e in changes.items():
        assert p in scope
        if e is None:
            del new[p]
        else:
            new[p] = e
    assert Manifest(new) == settled_base(base, full, unsettled)


@SETTINGS
@given(st.data())
def test_scoped_runs_reach_the_target_on_both_sides(data):
    base = data.draw(manifests())
    a, b = data.draw(near(base)), data.draw(near(base))
    scope, dec, sa, sb = scoped(base, a, b, every_file=False)
    if dec.conflicts:
        return
    pa, pb = side_plans(dec, sa, sb)
    def key(e):
        return entry_key(e) if e is not None else None

    for plan, side in ((pa, a), (pb, b)):
        got = plan.apply_to(side).entries
        for p in set(got) | set(side.entries):
            want = dec.target.entries.get(p) if p in scope else base.entries.get(p)
            assert key(got.get(p)) == key(want), p


# -- base records with a delta --------------------------------------------------------------------


@SETTINGS
@given(manifests(), st.lists(manifests(), min_size=1, max_size=4))
def test_base_delta_records_decode_to_what_they_were_made_from(first, later):
    rec = BaseRecord(1, "g1", {"x": "/a", "y": "/b"}, first)
    data = encode_base(rec, CHUNKER)
    prev_m = first
    for i, m in enumerate(later):
        prev = decode_base(data, CHUNKER, header_only=True)
        changes = {p: m.entries.get(p) for p in set(prev_m.entries) | set(m.entries)
                   if m.entries.get(p) != prev_m.entries.get(p)}
        rec = BaseRecord(i + 2, f"g{i + 2}", rec.specs, Manifest())
        out = encode_base_delta(prev, rec, changes, len(m.entries), CHUNKER)
        if out is None:  # too big a delta: a fresh snapshot
            rec.manifest = m
            out = encode_base(rec, CHUNKER)
        data = out
        for own in (True, False):
            got = decode_base(data, CHUNKER, own=own)
            assert (got.seq, got.gen, got.specs) == (i + 2, f"g{i + 2}", {"x": "/a", "y": "/b"})
            assert got.manifest.keys() == m.keys()
            assert got.manifest.entries == m.entries
        prev_m = m


def test_base_delta_grows_then_a_snapshot_is_written(monkeypatch):
    monkeypatch.setattr(twoway, "_DELTA_MIN", 3)
    m = Manifest({"": DirEntry("", 0o755, 1), **{f"d{i}": DirEntry(f"d{i}", 0o755, 1) for i in range(8)}})
    data = encode_base(BaseRecord(1, "g", {}, m), CHUNKER)
    snap = decode_base(data, CHUNKER, header_only=True).snapshot
    prev = decode_base(data, CHUNKER, header_only=True)
    for i in range(3):
        out = encode_base_delta(prev, BaseRecord(2 + i, "h", {}, Manifest()),
                                {f"d{i}": DirEntry(f"d{i}", 0o700, 2)}, 9, CHUNKER)
        assert out is not None
        prev = decode_base(out, CHUNKER, header_only=True)
        assert prev.snapshot == snap and len(prev.delta) == i + 1
    assert encode_base_delta(prev, BaseRecord(9, "h", {}, Manifest()), {"d5": None}, 8, CHUNKER) is None
    # the same path changed again replaces its row; a removal drops it
    out = encode_base_delta(prev, BaseRecord(9, "h", {}, Manifest()), {"d0": None}, 8, CHUNKER)
    rec = decode_base(out, CHUNKER)
    assert len(rec.delta) == 2 and rec.gone == (b"d0",) and "d0" not in rec.manifest.entries
    assert rec.manifest.entries["d1"] == DirEntry("d1", 0o700, 2)


def test_base_delta_that_does_not_decode_is_refused():
    m = Manifest({"": DirEntry("", 0o755, 1)})
    prev = decode_base(encode_base(BaseRecord(1, "g", {}, m), CHUNKER), CHUNKER, header_only=True)
    for bad in ({"../x": DirEntry("../x", 0o755, 1)}, {"": None}):
        out = encode_base_delta(prev, BaseRecord(2, "h", {}, Manifest()), bad, 1, CHUNKER)
        with pytest.raises(ValueError):
            decode_base(out, CHUNKER)
    corrupt = bytearray(prev.snapshot)
    corrupt[-1] ^= 1
    prev.snapshot = bytes(corrupt)
    assert encode_base_delta(prev, BaseRecord(2, "h", {}, Manifest()), {}, 1, CHUNKER) is None


# -- real directories -------------------------------------------------------------------------------

T0 = 1_600_000_000 * 10**9


def tw(a, b, **kw):
    return run_twoway(TwoWayConfig(str(a), str(b), **kw), Reporter(quiet=True))


@pytest.fixture
def synced(tmp_path, monkeypatch):
    """Two sides synced from a tree of 3 directories of 6 files; records the size of every
    reconcile run_twoway makes."""
    a, b = tmp_path / "a", tmp_path / "b"
    tree = {f"d{i}": {f"f{j}.txt": File(f"file {i} {j}\n".encode() * 20, mtime_ns=T0) for j in range(6)}
            for i in range(3)}
    tree["top.txt"] = File(b"top\n", mtime_ns=T0)
    build_tree(a, tree)
    assert tw(a, b).exit_code == 0
    assert tw(a, b).exit_code == 0  # caches and the base as a steady pair has them
    sizes: list[int] = []
    real = twoway.reconcile

    def spy(base, x, y, opts=ReconcileOptions()):
        sizes.append(len(x.entries) + len(y.entries))
        return real(base, x, y, opts)

    monkeypatch.setattr(twoway, "reconcile", spy)
    return a, b, sizes


def side_keys(root) -> dict:
    from dirsync.scan import Excluder, scan_tree

    return scan_tree(str(root), excluder=Excluder()).manifest.keys()


def stored_base(root) -> Manifest:
    from dirsync import chunking

    (name,) = [n for n in os.listdir(root / ".dirsync") if n.endswith(".base")]
    snap = lambda i: (root / ".dirsync" / name.replace(".base", f".snap-{i}")).read_bytes()  # noqa: E731
    return decode_base((root / ".dirsync" / name).read_bytes(), chunking.CHUNKER_ID, snapshot_of=snap).manifest


def _same_size_edit(p):
    st_ = os.lstat(p)
    data = bytearray(p.read_bytes())
    data[0] ^= 0x20
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert os.lstat(p).st_size == st_.st_size and os.lstat(p).st_mtime_ns == st_.st_mtime_ns


def _rename_across(root):
    os.rename(root / "d0" / "f1.txt", root / "d2" / "moved.txt")


def _file_to_dir(root):
    os.unlink(root / "d1" / "f2.txt")
    os.mkdir(root / "d1" / "f2.txt")
    (root / "d1" / "f2.txt" / "in.txt").write_bytes(b"now a dir\n")


def _dir_to_file(root):
    for n in os.listdir(root / "d2"):
        os.unlink(root / "d2" / n)
    os.rmdir(root / "d2")
    (root / "d2").write_bytes(b"now a file\n")


def _new_dir(root):
    os.makedirs(root / "new" / "deep")
    (root / "new" / "deep" / "x.bin").write_bytes(os.urandom(5000))


def _symlink_then_retarget(root):
    os.symlink("d0/f0.txt", root / "link")


CHANGES = {
    "same-size-same-mtime edit": lambda r: _same_size_edit(r / "d1" / "f3.txt"),
    "chmod": lambda r: os.chmod(r / "d0" / "f0.txt", 0o600),
    "mtime only": lambda r: os.utime(r / "d2" / "f5.txt", ns=(T0 + 5 * 10**9, T0 + 5 * 10**9)),
    "rename into another dir": _rename_across,
    "delete": lambda r: os.unlink(r / "d1" / "f4.txt"),
    "new file": lambda r: (r / "d0" / "new.txt").write_bytes(b"new\n"),
    "new directory tree": _new_dir,
    "file becomes a directory": _file_to_dir,
    "directory becomes a file": _dir_to_file,
    "new symlink": _symlink_then_retarget,
    "directory mode": lambda r: os.chmod(r / "d1", 0o700),
}


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("kind", sorted(CHANGES))
def test_every_kind_of_change_is_seen_by_a_scoped_run(synced, side, kind):
    a, b, sizes = synced
    root, other = (a, b) if side == "a" else (b, a)
    CHANGES[kind](root)
    want = side_keys(root)
    s = tw(a, b)
    assert s.exit_code == 0 and s.conflicts == []
    assert s.decisions.decisions, "the change was not seen"
    assert side_keys(other) == want and side_keys(root) == want
    treecmp.assert_trees_equal(a, b)
    full = 2 * len(want)
    assert sizes and sizes[-1] < full, "the run did not reconcile a scope"
    for r in (a, b):
        assert stored_base(r).keys() == want
    s = tw(a, b)
    assert s.decisions.decisions == [] and all(p.empty for p in s.plans)


def test_symlink_retarget_and_changes_on_both_sides_in_one_scoped_run(synced):
    a, b, sizes = synced
    os.symlink("d0/f0.txt", a / "link")
    assert tw(a, b).exit_code == 0
    os.unlink(b / "link")
    os.symlink("d1/f1.txt", b / "link")
    _same_size_edit(a / "d2" / "f0.txt")
    os.chmod(b / "d0" / "f3.txt", 0o640)
    _rename_across(a)
    os.unlink(b / "d1" / "f5.txt")
    s = tw(a, b)
    assert s.exit_code == 0 and s.conflicts == []
    treecmp.assert_trees_equal(a, b)
    assert os.readlink(a / "link") == "d1/f1.txt"
    assert stat.S_IMODE(os.lstat(a / "d0" / "f3.txt").st_mode) == 0o640
    assert not (a / "d1" / "f5.txt").exists() and (b / "d2" / "moved.txt").exists()
    assert (b / "d2" / "f0.txt").read_bytes() == (a / "d2" / "f0.txt").read_bytes()
    assert sizes[-1] < 2 * len(side_keys(a))
    for r in (a, b):
        assert stored_base(r).keys() == side_keys(a)


def test_a_conflict_in_a_scoped_run_falls_back_to_the_whole_tree(synced):
    a, b, sizes = synced
    (a / "d0" / "f0.txt").write_bytes(b"a's version\n")
    os.utime(a / "d0" / "f0.txt", ns=(T0 + 10**9, T0 + 10**9))
    (b / "d0" / "f0.txt").write_bytes(b"b's version\n")
    os.utime(b / "d0" / "f0.txt", ns=(T0 + 2 * 10**9, T0 + 2 * 10**9))
    s = tw(a, b)
    assert s.exit_code == 4 and len(s.conflicts) == 1 and s.conflicts[0].copy
    full = len(side_keys(a)) + len(side_keys(b)) - 2  # the copy is new on both
    assert sizes[-2] < sizes[-1] and sizes[-1] >= full
    treecmp.assert_trees_equal(a, b)
    assert (a / s.conflicts[0].copy).read_bytes() == b"a's version\n"


# -- ties: a side's scan cache stands for the base -----------------------------------------------


@pytest.fixture
def decodes(monkeypatch):
    """Counts full decodes of a base record."""
    n = []
    real = twoway.decode_base

    def spy(data, chunker, *, header_only=False, **kw):
        if not header_only:
            n.append(1)
        return real(data, chunker, header_only=header_only, **kw)

    monkeypatch.setattr(twoway, "decode_base", spy)
    return n


def tie_files(root) -> list:
    return sorted((root / ".dirsync").glob("twoway-*.tie"))


def test_a_tied_pair_runs_without_decoding_the_base(synced, decodes):
    a, b, sizes = synced
    assert len(tie_files(a)) == 1 and len(tie_files(b)) == 1
    _same_size_edit(b / "d1" / "f1.txt")
    os.chmod(a / "d0" / "f2.txt", 0o600)
    s = tw(a, b)
    assert s.exit_code == 0 and len(s.decisions.decisions) >= 2
    assert decodes == [] and sizes[-1] < 2 * len(side_keys(a))
    treecmp.assert_trees_equal(a, b)
    assert stored_base(a).keys() == side_keys(a) == side_keys(b)
    assert tw(a, b).decisions.decisions == [] and decodes == []


@pytest.mark.parametrize("spoil", ["tie names another cache", "tie names another base", "cache lost",
                                   "tie unreadable"])
def test_a_tie_that_does_not_match_is_ignored(synced, decodes, spoil):
    a, b, sizes = synced
    for r in (a, b):
        (t,) = tie_files(r)
        tie = __import__("json").loads(t.read_bytes())
        if spoil == "tie names another cache":
            tie["cache"] = "0" * 32
        elif spoil == "tie names another base":
            tie["base"] = "0" * 16
        elif spoil == "cache lost":
            (r / ".dirsync" / "manifest").unlink()
        t.write_bytes(b"{" if spoil == "tie unreadable" else __import__("json").dumps(tie).encode())
    os.unlink(a / "d2" / "f2.txt")
    (b / "d0" / "f0.txt").write_bytes(b"changed on b\n")
    s = tw(a, b)
    assert s.exit_code == 0 and decodes == [1]  # the base itself, decoded once
    treecmp.assert_trees_equal(a, b)
    assert not (b / "d2" / "f2.txt").exists() and (a / "d0" / "f0.txt").read_bytes() == b"changed on b\n"
    assert stored_base(a).keys() == side_keys(a)
    decodes.clear()
    assert tw(a, b).decisions.decisions == [] and decodes == []  # tied again


@contextlib.contextmanager
def refusing_metadata(path):
    """A real fault, for root too: an immutable file (chattr +i) refuses chmod and utime (EPERM)."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("no chattr +i on this file system: cannot make a file refuse its metadata")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_side_that_did_not_reach_the_base_is_not_tied(synced, decodes):
    """An action that fails leaves its path's old base entry. The side where it failed still
    holds that entry (tied to the new base); the other one does not (not tied), and the next run
    compares it with the first one's cache and redoes the path."""
    a, b, sizes = synced
    os.chmod(a / "d0" / "f3.txt", 0o600)
    (a / "d1" / "new.txt").write_bytes(b"new\n")
    (tie_a,), (tie_b,) = tie_files(a), tie_files(b)
    before = tie_a.read_bytes(), tie_b.read_bytes()
    with refusing_metadata(b / "d0" / "f3.txt"):
        s = tw(a, b)
    assert s.exit_code != 0 and (b / "d1" / "new.txt").exists()
    assert stat.S_IMODE(os.lstat(b / "d0" / "f3.txt").st_mode) != 0o600
    assert tie_a.read_bytes() == before[0]  # names the old base: ignored from now on
    assert tie_b.read_bytes() != before[1]
    new_gen = __import__("json").loads(tie_b.read_bytes())["base"]
    assert decode_base((b / ".dirsync" / tie_b.name.replace(".tie", ".base")).read_bytes(),
                       "x", header_only=True).gen == new_gen
    s = tw(a, b)
    assert s.exit_code == 0 and decodes == [] and sizes[-1] < 2 * len(side_keys(a))
    assert stat.S_IMODE(os.lstat(b / "d0" / "f3.txt").st_mode) == 0o600
    treecmp.assert_trees_equal(a, b)
    assert tie_a.read_bytes() != before[0]
    os.chmod(b / "d2" / "f1.txt", 0o640)
    assert tw(a, b).exit_code == 0 and decodes == []
    assert stat.S_IMODE(os.lstat(a / "d2" / "f1.txt").st_mode) == 0o640


def test_both_sides_untied_the_base_is_decoded(synced, decodes):
    a, b, sizes = synced
    for r in (a, b):
        for t in tie_files(r):
            t.unlink()
    os.chmod(b / "d1" / "f0.txt", 0o600)
    s = tw(a, b)
    assert s.exit_code == 0 and decodes == [1] and sizes[-1] < 2 * len(side_keys(a))
    assert stat.S_IMODE(os.lstat(a / "d1" / "f0.txt").st_mode) == 0o600
    assert len(tie_files(a)) == len(tie_files(b)) == 1


# -- base headers from the first bytes; b walked beside a --------------------------------------------


class FakeSide:
    """read_state / read_state_head over one in-memory file, counting whole reads."""

    def __init__(self, data: bytes | None, head: int = 1 << 16) -> None:
        self.data, self.head, self.whole = data, head, 0

    def read_state_head(self, name, size=1 << 16):
        return None if self.data is None else self.data[:min(size, self.head)]

    def read_state(self, name):
        self.whole += 1
        return self.data


def test_base_header_comes_from_the_first_bytes_of_a_big_record():
    from dirsync.twoway import read_base_head

    entries = {"": DirEntry("", 0o755, 1), **{f"d{i:05d}": DirEntry(f"d{i:05d}", 0o755, i) for i in range(5000)}}
    data = encode_base(BaseRecord(7, "gen7", {"id1": "/x", "id2": "h:/y"}, Manifest(entries)), CHUNKER)
    assert len(data) > 1 << 16
    side = FakeSide(data)
    h = read_base_head(side, "n", CHUNKER)
    assert (h.seq, h.gen, h.specs, side.whole) == (7, "gen7", {"id1": "/x", "id2": "h:/y"}, 0)
    short = FakeSide(data, head=20)  # the header does not fit: the whole file is read
    h = read_base_head(short, "n", CHUNKER)
    assert (h.seq, h.gen, short.whole) == (7, "gen7", 1)
    assert read_base_head(FakeSide(None), "n", CHUNKER) is None
    import msgpack

    for bad in (b"\xc1garbage", msgpack.packb({"format": 99, "seq": 1, "gen": "g", "specs": {}, "manifest": b""}),
                msgpack.packb({"format": 2, "seq": "1", "gen": "g", "specs": {}, "manifest": b""}),
                msgpack.packb({"format": 2, "seq": 1})):
        with pytest.raises(ValueError):
            read_base_head(FakeSide(bad), "n", CHUNKER)
    # cut after its header: the header reads; decoding the rows is what fails
    assert read_base_head(FakeSide(data[:100]), "n", CHUNKER).gen == "gen7"
    with pytest.raises(ValueError):
        decode_base(data[:100], CHUNKER)


def test_b_is_walked_by_a_child_and_its_changes_are_seen(synced, monkeypatch):
    from dirsync.transport.local import LocalTransport

    a, b, sizes = synced
    started = []
    real = LocalTransport.open_start

    def spy(self, patterns, **kw):
        started.append(self.root)
        return real(self, patterns, **kw)

    monkeypatch.setattr(LocalTransport, "open_start", spy)
    (b / "d1" / "from-b.txt").write_bytes(b"b\n")
    (a / ".dirsyncignore").write_bytes(b"*.tmp\n")
    (b / "d0" / "x.tmp").write_bytes(b"ignored\n")
    s = tw(a, b)
    assert s.exit_code == 0 and started == [str(b)]
    assert (a / "d1" / "from-b.txt").read_bytes() == b"b\n" and not (a / "d0" / "x.tmp").exists()
    assert (b / ".dirsyncignore").exists()


# -- the snapshot in a file of its own (two local sides) ----------------------------------------------


def state_names(root) -> list[str]:
    return sorted(n for n in os.listdir(root / ".dirsync") if n.startswith("twoway-"))


def test_split_record_round_trip_and_a_missing_snapshot_is_refused():
    from dirsync.twoway import encode_base_split

    m = Manifest({"": DirEntry("", 0o755, 1), "x": DirEntry("x", 0o700, 2)})
    data, snap, sid = encode_base_split(BaseRecord(4, "g4", {"i": "/a"}, m), CHUNKER)
    assert snap not in data and b"DSYNCMF" not in data and snap.startswith(b"DSYNCMF")
    got = decode_base(data, CHUNKER, snapshot_of={sid: snap}.get)
    assert (got.seq, got.gen, got.snap_id, got.manifest) == (4, "g4", sid, m)
    head = decode_base(data, CHUNKER, header_only=True)
    assert head.snap_id == sid and head.snapshot == b""
    prev = head
    out = encode_base_delta(prev, BaseRecord(5, "g5", {}, Manifest()), {"y": DirEntry("y", 0o755, 3)}, 3, CHUNKER,
                            split=True)
    got = decode_base(out, CHUNKER, snapshot_of={sid: snap}.get)
    assert got.snap_id == sid and set(got.manifest.entries) == {"", "x", "y"}
    # the other form of the snapshot is not made up from this one
    assert encode_base_delta(prev, BaseRecord(5, "g5", {}, Manifest()), {}, 2, CHUNKER) is None
    inline = decode_base(encode_base(BaseRecord(1, "g", {}, m), CHUNKER), CHUNKER, header_only=True)
    assert encode_base_delta(inline, BaseRecord(5, "g5", {}, Manifest()), {}, 2, CHUNKER, split=True) is None
    for snapshot_of in (None, {}.get):
        with pytest.raises(ValueError, match="missing"):
            decode_base(data, CHUNKER, snapshot_of=snapshot_of)
    import msgpack

    bad = msgpack.unpackb(data, raw=False)
    bad["snap"] = "../../etc/passwd"
    with pytest.raises(ValueError):
        decode_base(msgpack.packb(bad, use_bin_type=True), CHUNKER, header_only=True)


def test_snapshot_files_are_replaced_and_pruned_on_both_sides(synced, monkeypatch):
    a, b, sizes = synced
    snaps = [n for n in state_names(a) if ".snap-" in n]
    assert len(snaps) == 1 and state_names(a) == state_names(b)
    (a / "d0" / "one.txt").write_bytes(b"1\n")
    assert tw(a, b).exit_code == 0
    assert [n for n in state_names(b) if ".snap-" in n] == snaps  # a delta: the same snapshot
    monkeypatch.setattr(twoway, "encode_base_delta", lambda *a, **k: None)  # as when the delta is too big
    (b / "d1" / "two.txt").write_bytes(b"2\n")
    assert tw(a, b).exit_code == 0
    now = [n for n in state_names(a) if ".snap-" in n]
    assert len(now) == 1 and now != snaps and state_names(a) == state_names(b)
    for n in state_names(a):
        if not n.endswith(".tie"):
            assert (a / ".dirsync" / n).read_bytes() == (b / ".dirsync" / n).read_bytes()
    assert stored_base(a).keys() == side_keys(a) == side_keys(b)


def test_a_record_whose_snapshot_is_gone_falls_back_to_the_other_side(synced, decodes):
    a, b, sizes = synced
    for r in (a, b):
        for t in tie_files(r):
            t.unlink()
    (snap,) = [n for n in state_names(a) if ".snap-" in n]
    (a / ".dirsync" / snap).unlink()
    os.unlink(b / "d2" / "f3.txt")
    s = tw(a, b)
    assert s.exit_code == 0 and not (a / "d2" / "f3.txt").exists()  # b's record: the deletion propagates
    assert any("unusable" in w for w in s.warnings)
    snaps = [n for n in state_names(a) if ".snap-" in n]  # a fresh snapshot, on both sides
    assert len(snaps) == 1 and snaps != [snap] and snaps == [n for n in state_names(b) if ".snap-" in n]
    assert stored_base(a).keys() == side_keys(a)
    for r in (a, b):
        (r / ".dirsync" / snaps[0]).unlink()
        for t in tie_files(r):
            t.unlink()
    os.unlink(b / "d2" / "f4.txt")
    s = tw(a, b)  # neither record decodes: a first run, a union that deletes nothing
    assert s.exit_code == 0 and (b / "d2" / "f4.txt").exists()
    treecmp.assert_trees_equal(a, b)


# -- a run that leaves both sides at the base notes it: the next unchanged run skips everything ----


def test_a_clean_run_notes_its_result_and_the_next_run_takes_the_shortcut(synced, decodes):
    a, b, sizes = synced
    (a / "d0" / "note.txt").write_bytes(b"n\n")
    os.chmod(b / "d1" / "f1.txt", 0o600)
    time.sleep(0.3)  # past the racy window: what the run reads and writes can be trusted
    s = tw(a, b)
    assert s.exit_code == 0 and s.decisions.decisions
    n = len(sizes)
    s = tw(a, b)
    assert [sm.planned for sm in s.sides] == [False, False] and len(sizes) == n  # nothing reconciled
    _same_size_edit(b / "d0" / "note.txt")  # a silent edit: the fingerprint no longer matches
    s = tw(a, b)
    assert [sm.planned for sm in s.sides] != [False, False]
    assert (a / "d0" / "note.txt").read_bytes() == (b / "d0" / "note.txt").read_bytes() != b"n\n"
    assert decodes == []


def test_no_note_when_a_side_did_not_reach_the_base(synced):
    a, b, sizes = synced
    os.chmod(a / "d2" / "f2.txt", 0o600)
    with refusing_metadata(b / "d2" / "f2.txt"):
        assert tw(a, b).exit_code != 0
    s = tw(a, b)
    assert s.sides[0].planned and s.exit_code == 0
    assert stat.S_IMODE(os.lstat(b / "d2" / "f2.txt").st_mode) == 0o600


def test_a_first_run_ties_both_sides(tmp_path, decodes):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"d": {"x.txt": File(b"x\n", mtime_ns=T0)}, "y.txt": File(b"y\n", mtime_ns=T0)})
    build_tree(b, {"z.txt": File(b"z\n", mtime_ns=T0)})
    assert tw(a, b, init=True).exit_code == 0
    assert len(tie_files(a)) == len(tie_files(b)) == 1
    s = tw(a, b)  # reconciles (a first run notes nothing), from the tied caches
    assert s.exit_code == 0 and s.decisions.decisions == [] and decodes == []
    os.unlink(b / "d" / "x.txt")
    s = tw(a, b)
    assert s.exit_code == 0 and not (a / "d" / "x.txt").exists() and decodes == []
    treecmp.assert_trees_equal(a, b)
