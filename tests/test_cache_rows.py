"""A replica's cache read row by row (cache format 4: manifest.RowIndex, manifest.Overlay).

When a replica's scan matches its saved cache (the usual run), what the replica holds is that
cache, and Replica.current reads it only at the rows the run's actions touch; a local replica
left in step with the master is planned against the master's own cache (which the master scan
decoded already), so the replica's cache is never decoded whole. What must hold: the replica
ends equal to the master, the cache it saves is exactly its tree (every entry, inode and
ctime; a fingerprint a fresh walk matches), the next run finds nothing to do; and where the
shortcut does not apply (a replica changed since, a cache without a row index) the same
results come the long way.
"""

from __future__ import annotations

import os

import xxhash

try:
    import treecmp
    from helpers import append, build_tree, random_bytes, remove, settle, spy_calls, sync_json, text_lines, write
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import append, build_tree, random_bytes, remove, settle, spy_calls, sync_json, text_lines, write

from dirsync import manifest as manifest_mod
from dirsync.apply import MasterReader, ReplicaSummary, apply_actions
from dirsync.chunking import CHUNKER_ID
from dirsync.manifest import MAGIC, FileEntry, Overlay, changed_entries, fingerprint
from dirsync.plan import diff
from dirsync.progress import Reporter
from dirsync.replica import Replica
from dirsync.scan import Excluder, scan_tree
from dirsync.state import load_manifest_file
from dirsync.status import load_in_step
from dirsync.sync import SyncConfig, run_sync

KiB = 1 << 10


def _spec() -> dict:
    return {
        "a.txt": text_lines(20 * KiB, seed=1),
        "big.bin": random_bytes(300 * KiB, seed=2),
        "d": {"b.txt": text_lines(5 * KiB, seed=3), "gone.txt": b"to be deleted\n", "e": {"c.bin": random_bytes(9 * KiB, 4)}},
        "keep": {f"k{i}.txt": text_lines(2 * KiB, seed=10 + i) for i in range(12)},
        "moved.bin": random_bytes(40 * KiB, seed=5),
    }


def _run(m, r):
    return run_sync(SyncConfig(master=str(m), replicas=(str(r),)), Reporter(quiet=True))


def _in_step_pair(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _spec())
    settle(m)
    assert run_sync(SyncConfig(master=str(m), replicas=(str(r),), init=True), Reporter(quiet=True)).exit_code == 0
    settle(m, r)
    assert _run(m, r).exit_code == 0  # (caches racy-clean now: the pair is recorded in step)
    assert load_in_step(os.path.realpath(m), os.path.abspath(r))
    return m, r


def _change(m) -> None:
    with open(m / "big.bin", "r+b") as f:  # an edit in the middle of a chunked file
        f.seek(150 * KiB)
        f.write(b"EDIT" * 64)
    append(m / "a.txt", b"one more line\n")
    remove(m / "d" / "gone.txt")
    os.rename(m / "moved.bin", m / "d" / "e" / "moved.bin")
    write(m / "d" / "new.txt", b"new\n")
    os.chmod(m / "keep" / "k3.txt", 0o600)
    os.makedirs(m / "nd" / "deeper")
    write(m / "nd" / "deeper" / "x.bin", random_bytes(3 * KiB, seed=6))
    settle(m)


def _cache(r):
    load = load_manifest_file(os.path.join(r, ".dirsync", "manifest"), CHUNKER_ID, lazy=True)
    assert load.status == "ok", load.reason
    return load.saved


def assert_cache_is_the_tree(r) -> None:
    """The replica's saved cache is its tree: content as a fresh scan reads it, the stat facts
    of every file as they are now, and a fingerprint that is its entries' own."""
    saved = _cache(r)
    got = saved.manifest.entries
    fresh = scan_tree(str(r), excluder=Excluder())
    assert got == fresh.manifest.entries
    for p, e in got.items():
        if isinstance(e, FileEntry):
            st = os.lstat(os.path.join(r, p))
            assert (e.ino, e.ctime_ns, e.size, e.mtime_ns) == (st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns), p
    if saved.fingerprint:
        assert saved.fingerprint == fingerprint(got)
        if fresh.fingerprint:
            assert fresh.fingerprint == saved.fingerprint


def _spies(monkeypatch):
    """(Overlays made, whole decodes of a saved manifest)."""
    overlays = spy_calls(monkeypatch, Overlay, "__init__", lambda _, self, rows: len(rows.paths))
    decodes = spy_calls(monkeypatch, manifest_mod, "_decode_body", lambda m, *a: len(m.entries))
    return overlays, decodes


def _sync_spied(m, r, monkeypatch) -> tuple[list, list]:
    """One clean run that leaves the replica equal to the master: (Overlays made, whole
    decodes) during it (see _spies)."""
    overlays, decodes = _spies(monkeypatch)
    run = _run(m, r)
    got = list(overlays), list(decodes)
    assert run.exit_code == 0 and run.replicas[0].errors == []
    treecmp.assert_trees_equal(m, r)
    return got


def test_a_local_replica_in_step_is_planned_and_written_without_decoding_its_cache(tmp_path, monkeypatch):
    m, r = _in_step_pair(tmp_path)
    _change(m)
    overlays, decoded = _sync_spied(m, r, monkeypatch)
    # The replica's cache was read by rows (one Overlay over all of them); the one manifest
    # decoded whole was the master's cache, which the master scan needs anyway.
    before = len(_spec()) + 1 + 2 + 12 + 2  # (root, d, e, keep's files, d's two files: 22)
    assert overlays == [before] and decoded == [before]
    assert_cache_is_the_tree(r)
    settle(m, r)
    _, out = sync_json(m, r)
    assert out["replicas"][0]["files_written"] == 0 and out["replicas"][0]["files_deleted"] == 0


def test_a_replica_changed_since_its_last_run_is_planned_against_its_own_scan(tmp_path, monkeypatch):
    m, r = _in_step_pair(tmp_path)
    _change(m)
    write(r / "keep" / "k5.txt", b"changed on the replica\n")  # its walk no longer matches its cache
    write(r / "stray.txt", b"only on the replica\n")
    settle(m, r)
    overlays, _ = _sync_spied(m, r, monkeypatch)
    assert overlays == []  # its scan classified its walk against the decoded cache
    assert_cache_is_the_tree(r)


def test_a_cache_without_a_row_index_is_decoded_whole_with_the_same_result(tmp_path, monkeypatch):
    m, r = _in_step_pair(tmp_path)
    _strip_index(r)
    assert _cache(r).rows() is None
    _change(m)
    overlays, decoded = _sync_spied(m, r, monkeypatch)
    assert overlays == [] and len(decoded) == 2  # the master's cache and the replica's
    assert_cache_is_the_tree(r)
    assert _cache(r).rows() is not None  # saved with an index again


def _strip_index(r) -> None:
    """Make the replica's cache what dirsync wrote before format 4 (rows and all alike)."""
    path = os.path.join(r, ".dirsync", "manifest")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(_without_index(data))


def _without_index(data: bytes) -> bytes:
    """A format 4 cache file as format 3: the same header and body, no row index."""
    assert data[len(MAGIC)] == 4
    rest = data[len(MAGIC) + 9:]
    at = 4 + int.from_bytes(rest[:4], "little")
    ilen = int.from_bytes(rest[at:at + 4], "little")
    rest = rest[:at] + rest[at + 4 + ilen:]
    return MAGIC + b"\x03" + xxhash.xxh3_64_digest(b"\x03" + rest) + rest


def test_an_overlay_replica_reports_its_changes_as_a_decoded_one_would(tmp_path):
    """What the agent does with a replica whose scan took its cache whole: the Overlay's changes
    (sent to the master for its copy of the cache) are those of the whole decoded scan against
    what the replica holds after the actions; the cache it saves is the tree."""
    m, r = _in_step_pair(tmp_path)
    _change(m)
    ms = scan_tree(str(m), excluder=Excluder())
    rep = Replica(str(r))
    rep.open()
    rs = rep.manifest(Excluder())
    assert rs.unchanged and not rs.decoded
    rep.ready_rows()
    cur = rep.current
    assert isinstance(cur, Overlay)
    plan = diff(ms.manifest, _cache(r).manifest)
    summary = ReplicaSummary(replica=str(r))
    apply_actions(rep, plan.actions, MasterReader(str(m), None, ms.held).sends, summary)
    assert summary.errors == []
    rep.settle()
    scanned = _cache(r).manifest.entries  # (not yet saved again: the cache the scan took)
    now = dict(cur.items())
    changed, gone = cur.changes()
    assert sorted(e.path for e in changed) == sorted(e.path for e in changed_entries(scanned, now))
    assert sorted(gone) == sorted(p for p in scanned if p not in now)
    for p in ("big.bin", "d/gone.txt", "nd/deeper/x.bin"):
        assert rep.scanned_entry(p) == scanned.get(p)  # as scanned, whatever happened since
    rep.close()
    treecmp.assert_trees_equal(m, r)
    assert_cache_is_the_tree(r)


def test_the_master_cache_keeps_its_index_through_runs(tmp_path):
    """The master's cache (saved by a forked child, rows copied from the one it decoded) keeps
    a row index that fits its rows."""
    m, r = _in_step_pair(tmp_path)
    _change(m)
    assert _run(m, r).exit_code == 0
    from dirsync.state import master_cache_path

    load = load_manifest_file(master_cache_path(os.path.realpath(m)), CHUNKER_ID, lazy=True)
    rows = load.saved.rows()
    assert rows is not None
    got = {p: rows.entry(i) for i, p in enumerate(rows.paths)}
    assert got == load.saved.manifest.entries


def test_ready_rows_reads_the_index_or_else_decodes_the_whole_cache(tmp_path):
    """The agent's `prep` (Replica.ready_rows): with an index, the Overlay and its path lookup
    are made and no row is decoded; without one, the scan's manifest is decoded whole (so that
    the first action does not pay for it) and nothing counts as touched."""
    m, r = _in_step_pair(tmp_path)
    rep = Replica(str(r))
    rep.open()
    rep.manifest(Excluder())
    rep.ready_rows()
    assert isinstance(rep._current, Overlay) and rep._current._ix._where is not None and not rep._current._orig
    rep.close()
    _strip_index(r)
    rep = Replica(str(r))
    rep.open()
    rs = rep.manifest(Excluder())
    assert rs.unchanged and not rs.decoded
    rep.ready_rows()
    assert rs.decoded and not rep.touched
    rep.close()
    assert _cache(r).rows() is None  # untouched: the cache was not saved again
