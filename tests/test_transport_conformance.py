"""One conformance suite for the transport contract (dirsync/transport/__init__.py), run against
every implementation: `local` (LocalTransport, in-process), `pipe` (RemoteTransport talking to
`python -m dirsync agent` over a subprocess pipe), `ssh` (RemoteTransport through a real
OpenSSH sshd on 127.0.0.1, tests/sshd.py, with paramiko) and `openssh` (the same sshd reached
through the system's `ssh` client, DIRSYNC_RSH). Real files, real processes, no mocks.

Each case drives the contract the way sync.py does: open, scan, plan.diff, apply, close.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from dirsync import replica as replica_mod
from dirsync.apply import MasterReader, ReplicaSummary
from dirsync.errors import ConfigError, ItemError, LockedError, ProtocolError, RefusedError
from dirsync.manifest import FileEntry, encode_rows
from dirsync.plan import Commit, CopyOp, MakeDir, PlanOptions, WriteFile, diff
from dirsync.replica import Replica
from dirsync.scan import scan_tree
from dirsync.transport import TransportOptions
from dirsync.transport.local import LocalTransport

try:  # plain `pytest` puts tests/ on sys.path; `python -m pytest` also has the repo root
    import sshd as _sshd_plugin
    import treecmp
    from helpers import Link, build_tree, random_bytes, read, settle, stray_temps, text_lines, tmp_entries, write
    from remote_helpers import pipe_transport, ssh_transport
except ImportError:
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import (Link, build_tree, random_bytes, read, settle, stray_temps, text_lines, tmp_entries,
                               write)
    from tests.remote_helpers import pipe_transport, ssh_transport

pytest_plugins = [_sshd_plugin.__name__]

KiB, MiB = 1 << 10, 1 << 20
KINDS = ["local", "pipe", pytest.param("ssh", marks=pytest.mark.ssh),
         pytest.param("openssh", marks=[pytest.mark.ssh, pytest.mark.skipif(
             shutil.which("ssh") is None, reason="no OpenSSH client (ssh) installed")])]


@pytest.fixture(params=KINDS)
def make(request):
    """make(root, **TransportOptions fields) -> a fresh, unopened transport of this kind."""
    kind = request.param
    if kind == "local":
        return lambda root, **kw: LocalTransport(str(root), TransportOptions(**kw))
    if kind == "pipe":
        return lambda root, **kw: pipe_transport(root, TransportOptions(**kw))
    sshd = request.getfixturevalue("sshd")
    if kind == "openssh":  # the session through the system's ssh client (DIRSYNC_RSH), not paramiko
        return lambda root, **kw: ssh_transport(sshd, root, rsh="ssh", **kw)
    return lambda root, **kw: ssh_transport(sshd, root, **kw)


@contextlib.contextmanager
def opened(t, *, init=False, readonly=False, save=True):
    info = t.open(init=init, readonly=readonly)
    ok = False
    try:
        yield info
        ok = True
    finally:
        t.close(save=save and ok)


def wire(m) -> list:
    """A manifest as comparable wire rows (no cache-only fields)."""
    return sorted(encode_rows(list(m.entries.values()), cache_fields=False), key=lambda r: r[1])


def sync_with(t, master, *, init=False, tamper=None) -> ReplicaSummary:
    """What sync.py does with one replica. `tamper()` runs between the plan and apply."""
    mman = scan_tree(str(master)).manifest
    summary = ReplicaSummary(replica=t.name)
    with opened(t, init=init):
        rscan = t.scan([])
        plan = diff(mman, rscan.manifest, PlanOptions())
        if tamper:
            tamper()
        t.apply(plan.actions, MasterReader(os.path.realpath(master)), summary)
    return summary


def codes(summary: ReplicaSummary) -> list[tuple[str, str]]:
    return sorted((e.path, e.code) for e in summary.errors)


def initial(m):
    build_tree(m, {
        "a.txt": text_lines(4 * KiB, seed=1),
        "big.bin": random_bytes(3 * MiB, 2),
        "sub": {"deep": {"x": b"x\n"}, "empty": {}},
        "link": Link("a.txt"),
        "dangling": Link("nowhere"),
        b"raw\xffname": b"non-utf8\n",
    })


# -- open -----------------------------------------------------------------------------------------


def test_open_creates_a_missing_root_and_marks_it(make, tmp_path):
    r = tmp_path / "new-replica"
    t = make(r)
    with opened(t) as info:
        assert info.created and info.initialised
    assert (r / ".dirsync" / "replica.json").is_file()
    with opened(make(r)) as info:  # second time: an ordinary, known replica
        assert not info.created and not info.initialised


def test_open_refuses_an_unmarked_non_empty_dir_unless_init(make, tmp_path):
    r = tmp_path / "stranger"
    build_tree(r, {"precious.txt": b"mine\n"})
    before = treecmp.snapshot(r, ignore=())
    with pytest.raises(RefusedError) as ei:
        make(r).open()
    assert "never synced by dirsync" in str(ei.value) and "--init" in (ei.value.hint or "")
    assert treecmp.snapshot(r, ignore=()) == before, "a refused open must not write anything"
    with opened(make(r), init=True) as info:
        assert info.initialised
    assert read(r / "precious.txt") == b"mine\n"


def test_open_refuses_a_root_that_is_a_file(make, tmp_path):
    f = tmp_path / "file"
    write(f, b"not a dir\n")
    with pytest.raises(RefusedError):
        make(f).open()
    assert read(f) == b"not a dir\n"


def test_open_with_a_missing_parent_is_a_config_error(make, tmp_path):
    with pytest.raises(ConfigError):
        make(tmp_path / "no" / "such" / "parent").open()


def test_lock_held_gives_locked_error(make, tmp_path):
    r = tmp_path / "r"
    with opened(make(r)):
        pass
    holder = Replica(str(r))
    holder.open()
    try:
        with pytest.raises(LockedError) as ei:
            make(r).open()
        assert "locked" in str(ei.value)
    finally:
        holder.close(save=False)
    with opened(make(r)):  # released: usable again
        pass


def test_readonly_open_writes_nothing(make, tmp_path):
    r = tmp_path / "absent"
    with opened(make(r), readonly=True) as info:
        assert info.cache_status == "missing"
    assert not r.exists()


# -- scan -----------------------------------------------------------------------------------------


def test_scan_matches_an_independent_local_scan(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    sync_with(make(r), m)
    expect = wire(scan_tree(str(r)).manifest)
    t = make(r)
    with opened(t):
        assert wire(t.scan([]).manifest) == expect
    # Changes made behind dirsync's back show up (for remotes: through a delta against the saved
    # generation), and so do removals.
    write(r / "a.txt", b"changed behind our back\n")
    os.unlink(r / "sub/deep/x")
    write(r / "new.txt", b"new\n")
    os.symlink("a.txt", r / "newlink")
    expect = wire(scan_tree(str(r)).manifest)
    for _ in range(2):  # twice: the second scan is a delta against what the first one saved
        t = make(r)
        with opened(t):
            assert wire(t.scan([]).manifest) == expect
            assert wire(t.scan([], fresh=True).manifest) == expect


def test_scan_honours_exclude_patterns(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    sync_with(make(r), m)
    t = make(r)
    with opened(t):
        paths = set(t.scan(["*.bin", "sub/deep/"]).manifest.entries)
    assert "big.bin" not in paths and "sub/deep" not in paths and "sub/deep/x" not in paths
    assert {"a.txt", "sub", "sub/empty", "link"} <= paths


def test_cached_root_matches_local(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    sync_with(make(r), m)
    local = LocalTransport(str(r))
    with opened(local, readonly=True):
        want = local.cached_root([])
        want_ex = local.cached_root(["*.bin"])
    assert want and want != want_ex
    t = make(r)
    with opened(t, readonly=True):
        assert t.cached_root([]) == want
        assert t.cached_root(["*.bin"]) == want_ex


# -- apply: every action kind -----------------------------------------------------------------------


def test_initial_copy_then_patch_reuses_chunks(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    s = sync_with(make(r), m)
    assert s.errors == [] and s.files_written == 4 and s.links_made == 2 and s.dirs_created == 3
    treecmp.assert_trees_equal(m, r)
    assert tmp_entries(r) == [] and stray_temps(r) == []

    data = read(m / "big.bin")
    write(m / "big.bin", data[:MiB] + b"<inserted in the middle>" + data[MiB:])
    s = sync_with(make(r), m)
    assert s.errors == [] and s.files_written == 1
    assert 0 < s.bytes_sent < 256 * KiB, s.bytes_sent
    assert s.bytes_reused > 2 * MiB
    treecmp.assert_trees_equal(m, r)


def test_small_and_large_writes_inline_and_streamed(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"tiny": b"t", "empty": b"", "inline": random_bytes(60 * KiB, 3),
                   "streamed": random_bytes(9 * MiB, 4)})
    s = sync_with(make(r), m)
    assert s.errors == [] and s.files_written == 4
    treecmp.assert_trees_equal(m, r)


def test_compressed_session_round_trips(make, tmp_path):
    """compress=True (--compress): text and random data, inline and streamed, patched; a
    transport without compression simply ignores the option."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"src": {f"f{i}.py": text_lines(3 * KiB + i * 700, seed=i) for i in range(20)},
                   "big.txt": text_lines(3 * MiB, seed=30), "random.bin": random_bytes(2 * MiB, 31),
                   "mixed": text_lines(40 * KiB, seed=32) + random_bytes(40 * KiB, 33)})
    s = sync_with(make(r, compress=True), m)
    assert s.errors == [] and s.files_written == 23
    treecmp.assert_trees_equal(m, r)
    data = read(m / "big.txt")
    write(m / "big.txt", data[: MiB] + b"an edit in the middle\n" + data[MiB:])
    write(m / "src/f3.py", read(m / "src/f3.py") + b"# appended\n")
    s = sync_with(make(r, compress=True), m)
    assert s.errors == [] and s.files_written == 2
    treecmp.assert_trees_equal(m, r)


def test_delete_mkdir_symlink_and_metadata(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    sync_with(make(r), m)
    os.unlink(m / "a.txt")
    shutil.rmtree(m / "sub/deep")
    os.makedirs(m / "newdir/inner")
    os.unlink(m / "link")
    os.symlink("sub/empty", m / "link")
    os.symlink("/etc/hostname", m / "abs-link")
    os.chmod(m / "big.bin", 0o600)
    os.utime(m / "big.bin", ns=(1_500_000_000_000_000_000,) * 2)
    os.chmod(m / "sub", 0o750)
    s = sync_with(make(r), m)
    assert s.errors == [], s.errors
    assert s.files_deleted >= 3 and s.dirs_created == 2 and s.links_made == 2 and s.meta_set >= 2
    assert s.bytes_sent == 0
    treecmp.assert_trees_equal(m, r)
    assert os.readlink(r / "abs-link") == "/etc/hostname"


def test_type_changes(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    sync_with(make(r), m)
    os.unlink(m / "a.txt")
    os.makedirs(m / "a.txt/inside")
    shutil.rmtree(m / "sub")
    write(m / "sub", b"now a file\n")
    os.unlink(m / "link")
    write(m / "link", b"was a link\n")
    s = sync_with(make(r), m)
    assert s.errors == [], s.errors
    treecmp.assert_trees_equal(m, r)


def test_conflict_replica_changed_between_scan_and_commit(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    sync_with(make(r), m)
    write(m / "a.txt", b"master's new content\n")
    write(m / "other.txt", b"unrelated new file\n")

    def tamper():
        write(r / "a.txt", b"someone edited the replica meanwhile, longer than before" * 3)

    s = sync_with(make(r), m, tamper=tamper)
    assert codes(s) == [("a.txt", "CONFLICT")], s.errors
    assert read(r / "a.txt") == b"someone edited the replica meanwhile, longer than before" * 3
    assert read(r / "other.txt") == b"unrelated new file\n", "the other items of the run still apply"
    assert tmp_entries(r) == []
    # The next run converges.
    s = sync_with(make(r), m)
    assert s.errors == []
    treecmp.assert_trees_equal(m, r)


def _saved_and_remembered(t, r) -> tuple[list, list]:
    """(the replica's saved cache, the master's copy of it) as wire rows; the copy only for a
    remote transport (its _cache_file), else the cache twice."""
    from dirsync.chunking import CHUNKER_ID
    from dirsync.state import load_manifest_file

    saved = load_manifest_file(str(r / ".dirsync" / "manifest"), CHUNKER_ID)
    assert saved.status == "ok", saved.reason
    copy = getattr(t, "_cache_file", None)
    if copy is None:
        return wire(saved.saved.manifest), wire(saved.saved.manifest)
    got = load_manifest_file(copy, CHUNKER_ID)
    assert got.status == "ok", got.reason
    assert got.saved.generation == saved.saved.generation
    return wire(saved.saved.manifest), wire(got.saved.manifest)


def test_the_masters_copy_is_the_saved_cache_after_each_kind_of_run(make, tmp_path, monkeypatch):
    """The agent sends its rows for the master's copy of the saved manifest before it saves
    (the master takes them in meanwhile): they must be exactly what it saves, after a first
    copy (most files go back as "written" paths), after a run whose new directory could not
    be put in place (a file appeared at its name: its files are in neither), and after the
    next run, which converges (a copy claiming them would make it skip them)."""
    # (should_stop below counts the loop's actions: one call each, not one per batch of new
    # files, as a local writer with dirsync._files makes them: Replica.stage_new)
    monkeypatch.setattr(replica_mod, "_files", None)
    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    build_tree(m / "many", {f"f{i}.txt": f"file {i}\n" for i in range(300)})
    t = make(r)
    sync_with(t, m)
    cache, copy = _saved_and_remembered(t, r)
    assert cache == copy and len(cache) > 300
    build_tree(m / "fresh", {f"f{i}.txt": f"new file {i}\n" for i in range(40)})
    t = make(r)
    mman = scan_tree(str(m)).manifest
    summary = ReplicaSummary(replica=t.name)
    with opened(t):
        plan = diff(mman, t.scan([]).manifest, PlanOptions())
        stop_at = next(i for i, a in enumerate(plan.actions) if isinstance(a, Commit)) + 1
        assert stop_at < len(plan.actions), "the plan must have actions after the commit"
        calls = []

        def should_stop() -> bool:
            calls.append(1)
            if len(calls) == stop_at + 1:
                write(r / "fresh", b"appeared meanwhile\n")
            return len(calls) > stop_at

        t.apply(plan.actions, MasterReader(os.path.realpath(m)), summary, should_stop)
    assert read(r / "fresh") == b"appeared meanwhile\n"
    assert ("fresh", "CONFLICT") in codes(summary), summary.errors
    cache, copy = _saved_and_remembered(t, r)
    assert cache == copy
    assert not any(row[1].startswith(b"fresh/") for row in cache)

    os.unlink(r / "fresh")
    s = sync_with(make(r), m)
    assert s.errors == []
    treecmp.assert_trees_equal(m, r)
    cache, copy = _saved_and_remembered(t, r)
    assert cache == copy and sum(row[1].startswith(b"fresh/") for row in cache) == 40


_SETTLE_FAILS_ONCE = """
import errno, os, sys, runpy
import dirsync.replica as rm
real, seen = rm.Replica.settle, []
def settle(self):
    if self.touched and not seen:  # the agent's close: its flush reports EIO, a retry would pass
        seen.append(1)
        raise rm.ItemIOError(".dirsync/manifest", "flush the run's renames", OSError(errno.EIO, os.strerror(errno.EIO)))
    return real(self)
rm.Replica.settle = settle
sys.argv[0] = "dirsync"
runpy.run_module("dirsync", run_name="__main__")
"""


def test_an_agent_whose_close_cannot_flush_saves_nothing_and_the_master_forgets_its_copy(tmp_path):
    """If the agent's close cannot flush the run's names, it sends no rows and saves no cache,
    even though a second try (inside Replica.close) would pass: a cache saved under a new
    generation the master got no rows for would leave the master's copy claiming it without
    this run's changes. The master drops its copy, and the next run converges from a full scan."""
    from remote_helpers import REPO_ROOT, agent_env

    from dirsync.transport.pipe import SubprocessChannel
    from dirsync.transport.remote import RemoteTransport

    m, r = tmp_path / "m", tmp_path / "r"
    initial(m)
    sync_with(pipe_transport(r), m)
    copy = pipe_transport(r)._cache_file
    assert os.path.exists(copy)
    before = read(r / ".dirsync" / "manifest")
    write(m / "a.txt", b"changed on the master\n")
    build_tree(m / "newdir", {"n.txt": b"new\n"})
    argv = [sys.executable, "-c", _SETTLE_FAILS_ONCE, "agent"]
    t = RemoteTransport(f"localhost:{r}", TransportOptions(),
                        channel_factory=lambda: SubprocessChannel(argv, env=agent_env(), cwd=REPO_ROOT))
    with pytest.raises(ItemError, match="Input/output error"):
        sync_with(t, m)
    assert read(r / ".dirsync" / "manifest") == before, "the agent saved a cache after a failed flush"
    assert not os.path.exists(copy), "the master kept a copy of a manifest it got no rows for"
    s = sync_with(pipe_transport(r), m)
    assert s.errors == []
    treecmp.assert_trees_equal(m, r)
    cache, copy_rows = _saved_and_remembered(pipe_transport(r), r)
    assert cache == copy_rows


def test_a_close_whose_save_fails_after_saying_its_generation_leaves_no_copy(tmp_path):
    """An agent that says "saving" (the master then saves its copy under that generation while
    the agent saves) and then cannot save (its disk filled up) answers with no generation: the
    master must drop the copy it saved meanwhile, and the next run converges from a full scan."""
    try:
        from test_faults import tiny_tmpfs
    except ImportError:
        from tests.test_faults import tiny_tmpfs

    m = tmp_path / "m"
    build_tree(m, {f"d{i}": {f"f{j}.txt": f"{i}/{j}\n" * 20 for j in range(40)} for i in range(10)})
    with tiny_tmpfs("8m") as root:
        r = tmp_path / "r"
        os.symlink(root, r)  # (the replica root may be reached through a symlink)
        sync_with(pipe_transport(r), m)
        t = pipe_transport(r)
        copy = t._cache_file
        assert os.path.exists(copy)
        before = read(r / ".dirsync" / "manifest")
        build_tree(m / "more", {f"g{j}.txt": f"more {j}\n" for j in range(200)})
        mman = scan_tree(str(m)).manifest
        summary = ReplicaSummary(replica=t.name)
        t.open()
        plan = diff(mman, t.scan([]).manifest, PlanOptions())
        t.apply(plan.actions, MasterReader(os.path.realpath(m)), summary)
        assert summary.errors == []
        filler = r / ".dirsync" / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        with pytest.raises(ItemError, match="No space left on device"):
            t.close()
        assert read(r / ".dirsync" / "manifest") == before
        assert not os.path.exists(copy), "the master kept the copy it saved under a generation never saved"
        os.unlink(filler)
        s = sync_with(pipe_transport(r), m)
        assert s.errors == []
        treecmp.assert_trees_equal(m, r)
        cache, copy_rows = _saved_and_remembered(pipe_transport(r), r)
        assert cache == copy_rows


def _moved_and_edited(m, r, make) -> bytes:
    """old.bin synced and settled (trusted on both sides), then moved on the master to
    moved/new.bin with two small edits: planned as a write that copies most of its bytes from
    the replica's old.bin and sends the edited chunks."""
    data = random_bytes(3 * MiB, 21)
    build_tree(m, {"old.bin": data, "keep.txt": b"k\n"})
    assert sync_with(make(r), m).errors == []
    os.makedirs(m / "moved")
    os.rename(m / "old.bin", m / "moved" / "new.bin")
    new = data[:MiB] + b"<edit one>" + data[MiB + 10:2 * MiB] + b"<edit two>" + data[2 * MiB + 10:]
    write(m / "moved" / "new.bin", new)
    settle(m, r)
    return new


def test_a_write_from_trusted_reuse_sources_is_exact(make, tmp_path):
    """Reuse sources the scan trusted are copied without rereading them in Python; what lands
    is still byte-exact, and the run sends only the edited chunks."""
    m, r = tmp_path / "m", tmp_path / "r"
    new = _moved_and_edited(m, r, make)
    s = sync_with(make(r), m)
    assert s.errors == [] and s.files_written == 1
    assert 0 < s.bytes_sent < 512 * KiB and s.bytes_reused > 2 * MiB, (s.bytes_sent, s.bytes_reused)
    assert read(r / "moved" / "new.bin") == new
    treecmp.assert_trees_equal(m, r)


def test_a_reuse_source_changed_behind_its_stat_fails_the_write_copying_it(make, tmp_path):
    """The replica's old.bin is rewritten after the scan with its size and mtime put back (only
    its ctime tells): the write that copies from it fails as a conflict instead of landing the
    wrong bytes, and the next run converges. (Deleting old.bin then goes ahead: a delete checks
    size, mtime and type, which the tamper kept; only a write proves content.)"""
    m, r = tmp_path / "m", tmp_path / "r"
    _moved_and_edited(m, r, make)
    tampered = random_bytes(3 * MiB, 22)

    def tamper():
        st = os.stat(r / "old.bin")
        write(r / "old.bin", tampered)
        os.utime(r / "old.bin", ns=(st.st_atime_ns, st.st_mtime_ns))

    s = sync_with(make(r), m, tamper=tamper)
    assert ("moved/new.bin", "CONFLICT") in codes(s), s.errors
    assert not (r / "moved" / "new.bin").exists()
    assert tmp_entries(r) == [] and stray_temps(r) == []
    s = sync_with(make(r), m)
    assert s.errors == []
    treecmp.assert_trees_equal(m, r)


class _LyingReader(MasterReader):
    """A master that sends other bytes than its manifest promises (a fault the real reader
    cannot produce: it checks every chunk it reads), of the right length."""

    def sends(self, w):
        for buf in super().sends(w):
            yield bytes(b ^ 0x5A for b in buf)

    def local_sends(self, w):
        return self.sends(w)  # bytes, not the master file to copy from (that is proven by stat)


def test_sent_bytes_that_do_not_match_the_target_fail_the_write(make, tmp_path):
    """The replica checks what it was sent against the target's chunk digests, also when the
    rest of the file is copied from trusted sources without being hashed."""
    m, r = tmp_path / "m", tmp_path / "r"
    _moved_and_edited(m, r, make)
    mman = scan_tree(str(m)).manifest
    summary = ReplicaSummary(replica=str(r))
    t = make(r)
    with opened(t):
        plan = diff(mman, t.scan([]).manifest, PlanOptions())
        t.apply(plan.actions, _LyingReader(os.path.realpath(m)), summary)
    assert ("moved/new.bin", "CONFLICT") in codes(summary), summary.errors
    assert not (r / "moved" / "new.bin").exists()
    assert tmp_entries(r) == [] and stray_temps(r) == []


def test_reuse_without_copy_file_range_reads_and_writes(tmp_path, monkeypatch):
    """Where copy_file_range refuses a pair of files (EXDEV: they are on two file systems, a
    fault one tmp dir cannot hold, so a stand-in raises it), the trusted path copies through a
    buffer instead, still without hashing, and the result is exact."""
    import errno

    from dirsync import replica as replica_mod

    refused = []

    def cross_device(*args):
        refused.append(args[2])
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    m, r = tmp_path / "m", tmp_path / "r"
    new = _moved_and_edited(m, r, lambda root, **kw: LocalTransport(str(root), TransportOptions(**kw)))
    monkeypatch.setattr(replica_mod, "_copy_file_range", cross_device)
    s = sync_with(LocalTransport(str(r)), m)
    assert s.errors == [] and s.bytes_reused > 2 * MiB
    assert read(r / "moved" / "new.bin") == new
    assert sum(refused) >= 2 * MiB, "the reused ranges did not go through copy_file_range first"


def test_a_file_appearing_at_a_new_name_before_the_commit_is_left_alone(make, tmp_path):
    """Someone creates a file at a path the plan writes as new (small ones are staged beside
    it, large ones in .dirsync/tmp): the commit refuses to replace it (an atomic no-replace
    rename where the system has one), reports a conflict, and the other files land."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"keep.txt": b"k\n"})
    assert sync_with(make(r), m).errors == []
    build_tree(m, {"new-small.txt": b"from the master\n", "new-big.bin": random_bytes(3 * MiB, 23),
                   "other.txt": b"unrelated\n"})

    def tamper():
        write(r / "new-small.txt", b"someone else's\n")
        write(r / "new-big.bin", b"someone else's big file\n")

    s = sync_with(make(r), m, tamper=tamper)
    assert codes(s) == [("new-big.bin", "CONFLICT"), ("new-small.txt", "CONFLICT")], s.errors
    assert read(r / "new-small.txt") == b"someone else's\n"
    assert read(r / "new-big.bin") == b"someone else's big file\n"
    assert read(r / "other.txt") == b"unrelated\n"
    assert tmp_entries(r) == [] and stray_temps(r) == []


def test_new_names_commit_without_renameat2_too(tmp_path, monkeypatch):
    """Where the system has no RENAME_NOREPLACE the commit checks the name, then renames."""
    from dirsync import replica as replica_mod

    monkeypatch.setattr(replica_mod, "_noreplace", False)
    test_a_file_appearing_at_a_new_name_before_the_commit_is_left_alone(
        lambda root, **kw: LocalTransport(str(root), TransportOptions(**kw)), tmp_path)
    m, r = tmp_path / "m", tmp_path / "r"
    s = sync_with(LocalTransport(str(r)), m)  # the next run replaces them with the master's
    assert s.errors == []
    treecmp.assert_trees_equal(m, r)


def test_source_vanishing_on_the_master_is_an_item_error(make, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"going.bin": random_bytes(2 * MiB, 5), "staying.txt": b"stay\n", "small": b"s" * 100})

    def tamper():
        os.unlink(m / "going.bin")
        os.unlink(m / "small")

    s = sync_with(make(r), m, tamper=tamper)
    assert codes(s) == [("going.bin", "CHANGED"), ("small", "CHANGED")], s.errors
    assert not (r / "going.bin").exists() and read(r / "staying.txt") == b"stay\n"
    assert tmp_entries(r) == []


# -- hostile actions --------------------------------------------------------------------------------


def _file_target(master, name: str, path: str) -> FileEntry:
    e = scan_tree(str(master)).manifest.entries[name]
    assert isinstance(e, FileEntry)
    return e.replace(path=path)


def test_actions_that_escape_the_root_are_rejected(make, tmp_path):
    m, r, outside = tmp_path / "m", tmp_path / "r", tmp_path / "outside"
    build_tree(m, {"f.txt": b"payload\n"})
    build_tree(outside, {"keep.txt": b"keep\n"})
    sync_with(make(r), m)
    os.symlink(str(outside), r / "evil")  # a symlinked directory inside the replica
    before_out = treecmp.snapshot(outside, ignore=())
    target = _file_target(m, "f.txt", "f.txt")
    hostile = [
        [MakeDir("../escaped", 0o755)],
        [MakeDir("/tmp/escaped-" + uuid.uuid4().hex, 0o755)],
        [WriteFile(target.replace(path="../escaped.txt"), target_ops(target), None),
         Commit(("../escaped.txt",))],
        [MakeDir("evil/sub", 0o755)],
        [WriteFile(target.replace(path="evil/pwned.txt"), target_ops(target), None),
         Commit(("evil/pwned.txt",))],
    ]
    for actions in hostile:
        t = make(r)
        summary = ReplicaSummary(replica=t.name)
        with opened(t, save=False):
            t.scan([])
            try:
                t.apply(actions, MasterReader(str(m)), summary)
            except ProtocolError:
                assert t.is_remote, "only a remote transport turns a bad path into a protocol error"
            else:
                assert summary.errors and all(e.code == "INVALID_PATH" for e in summary.errors), summary.errors
    assert treecmp.snapshot(outside, ignore=()) == before_out
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped.txt").exists()
    assert tmp_entries(r) == []


def target_ops(target: FileEntry):
    """Build the file from the replica's own copy (no master data is read for it)."""
    return (CopyOp("f.txt", 0, target.size),)


# -- resources ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    d = tmp_path / "tiny"
    d.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {cp.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_disk_full_is_an_item_error_and_leaves_no_temps(make, tmp_path, tiny_fs):
    m = tmp_path / "m"
    build_tree(m, {"fits.txt": b"small\n", "huge.bin": random_bytes(2 * MiB, 6)})
    r = tiny_fs / "r"
    s = sync_with(make(r), m)
    assert codes(s) == [("huge.bin", "NO_SPACE")], s.errors
    assert read(r / "fits.txt") == b"small\n"
    assert not (r / "huge.bin").exists()
    assert tmp_entries(r) == []


def test_cache_that_cannot_be_saved_is_an_item_error_at_close(make, tmp_path, tiny_fs):
    """The run's files are in place, but the replica's manifest cache did not fit: close() raises
    the item error (exit 23 for the run), the lock is released, and a later run converges."""
    m = tmp_path / "m"
    r = tiny_fs / "r"
    for pages_left in (2, 3, 4):  # tmpfs accounting: find the size that leaves no page for the cache
        if r.exists():
            shutil.rmtree(r)
        build_tree(m, {"f": random_bytes((256 - pages_left) * 4096, pages_left)})
        try:
            s = sync_with(make(r), m)
        except ItemError as e:
            assert "save replica cache" in str(e) and e.code == "NO_SPACE", e
            break
        os.unlink(m / "f")
    else:
        pytest.skip("could not size a file to fill the tmpfs exactly here")
    assert read(r / "f") == read(m / "f")
    os.unlink(m / "f")
    os.unlink(r / "f")  # make room
    write(m / "g", b"small\n")
    s = sync_with(make(r), m)  # not locked, and the stale cache is rescanned
    assert s.errors == []
    treecmp.assert_trees_equal(m, r)


@pytest.mark.parametrize("backup_dir", ["bak", ".dirsync/bak"])
def test_backup_dir_keeps_replaced_and_deleted_files(make, tmp_path, backup_dir):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"keep.txt": b"v1\n", "gone.txt": b"bye\n", "sub": {"x": b"x1\n"}})
    sync_with(make(r, backup_dir=backup_dir, backup_keep=2), m)
    write(m / "keep.txt", b"v2, longer\n")
    write(m / "sub/x", b"x2, longer\n")
    os.unlink(m / "gone.txt")
    t = make(r, backup_dir=backup_dir, backup_keep=2)
    mman = scan_tree(str(m)).manifest
    summary = ReplicaSummary(replica=t.name)
    with opened(t) as info:
        assert info.reserved == (backup_dir,)
        rscan = t.scan([])
        assert not any(p == backup_dir or p.startswith(backup_dir + "/") for p in rscan.manifest.entries)
        t.apply(diff(mman, rscan.manifest, PlanOptions()).actions, MasterReader(str(m)), summary)
    assert summary.errors == []
    runs = os.listdir(r / backup_dir)
    assert len(runs) == 1
    kept = r / backup_dir / runs[0]
    assert read(kept / "keep.txt") == b"v1\n" and read(kept / "gone.txt") == b"bye\n" and read(kept / "sub/x") == b"x1\n"
    treecmp.assert_trees_equal(m, r, ignore=(".dirsync", "bak"))
