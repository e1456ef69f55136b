"""Stateful property test: random sequences of real file-system mutations on a master, with a
sync (in-process, `dirsync.sync.run_sync` on a local replica) now and then; after every sync
the replica must equal the master (tests/treecmp.py) and no temp may be left.

Mutations: write, append, insert, truncate, delete, rename (files and directories), mkdir,
replace file<->directory, symlink, chmod, touch. Names include non-ASCII and non-UTF-8 ones.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

try:
    import treecmp
    from helpers import random_bytes, tmp_entries
except ImportError:
    from tests import treecmp
    from tests.helpers import random_bytes, tmp_entries

from dirsync.progress import Reporter
from dirsync.sync import SyncConfig, run_sync

# A small alphabet so that renames collide, type changes hit existing paths, and so on.
NAMES = ["a", "b", "c.txt", "dé", os.fsdecode(b"x\xff")]
FILE_MODES = [0o644, 0o600, 0o755, 0o640]
DIR_MODES = [0o755, 0o700, 0o750]

small = st.binary(max_size=200)
# Larger files come from a few seeds, so identical content and chunks recur across files.
large = st.builds(lambda n, seed: random_bytes(n, seed), st.integers(1500, 150_000), st.integers(0, 3))
contents = st.one_of(small, small, large)


def _base_dir() -> str | None:
    """tmpfs when there is one: this test is about logic, and fsync on a busy disk is slow."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


class SyncMachine(RuleBasedStateMachine):
    total_syncs = 0  # across examples: proves the property was actually checked

    def __init__(self) -> None:
        super().__init__()
        self.base = tempfile.mkdtemp(prefix="dirsync-stateful-", dir=_base_dir())
        self.m = os.path.join(self.base, "master")
        self.r = os.path.join(self.base, "replica")
        os.mkdir(self.m)
        self.syncs = 0

    def teardown(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    # -- what exists now ---------------------------------------------------------------

    def _entries(self) -> tuple[list[str], list[str], list[str]]:
        """(dirs incl. root "", regular files, symlinks) as relpaths, sorted."""
        dirs, files, links = [""], [], []
        for dirpath, dirnames, filenames in os.walk(self.m):
            rel = os.path.relpath(dirpath, self.m)
            rel = "" if rel == "." else rel
            for n in dirnames + filenames:
                p = os.path.join(rel, n) if rel else n
                full = os.path.join(self.m, p)
                if os.path.islink(full):
                    links.append(p)
                elif os.path.isdir(full):
                    dirs.append(p)
                else:
                    files.append(p)
        return sorted(dirs), sorted(files), sorted(links)

    def _pick(self, items: list[str], i: int) -> str | None:
        return items[i % len(items)] if items else None

    def _abs(self, rel: str) -> str:
        return os.path.join(self.m, rel) if rel else self.m

    def _new_path(self, d: int, name: str) -> str | None:
        """A free path NAME inside an existing directory, or None."""
        parent = self._pick(self._entries()[0], d)
        p = os.path.join(parent, name) if parent else name
        return None if os.path.lexists(self._abs(p)) else p

    # -- mutations ------------------------------------------------------------------------

    @initialize(data=contents)
    def seed(self, data):
        with open(os.path.join(self.m, "seed.bin"), "wb") as f:
            f.write(data)

    @rule(d=st.integers(0, 50), name=st.sampled_from(NAMES), data=contents)
    def write_file(self, d, name, data):
        parent = self._pick(self._entries()[0], d)
        p = self._abs(os.path.join(parent, name) if parent else name)
        if os.path.isdir(p) and not os.path.islink(p):
            return
        if os.path.islink(p):
            os.unlink(p)
        with open(p, "wb") as f:
            f.write(data)

    @rule(i=st.integers(0, 50), data=st.binary(min_size=1, max_size=3000))
    def append(self, i, data):
        f = self._pick(self._entries()[1], i)
        if f:
            with open(self._abs(f), "ab") as fh:
                fh.write(data)

    @rule(i=st.integers(0, 50), where=st.floats(0, 1), data=st.binary(min_size=1, max_size=300))
    def insert(self, i, where, data):
        f = self._pick(self._entries()[1], i)
        if f:
            p = self._abs(f)
            with open(p, "rb") as fh:
                old = fh.read()
            k = int(len(old) * where)
            with open(p, "wb") as fh:
                fh.write(old[:k] + data + old[k:])

    @rule(i=st.integers(0, 50), keep=st.floats(0, 1))
    def truncate(self, i, keep):
        f = self._pick(self._entries()[1], i)
        if f:
            p = self._abs(f)
            os.truncate(p, int(os.path.getsize(p) * keep))

    @rule(i=st.integers(0, 100))
    def delete(self, i):
        dirs, files, links = self._entries()
        p = self._pick(dirs[1:] + files + links, i)
        if p:
            full = self._abs(p)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)

    @rule(i=st.integers(0, 100), d=st.integers(0, 50), name=st.sampled_from(NAMES))
    def rename(self, i, d, name):
        dirs, files, links = self._entries()
        src = self._pick(dirs[1:] + files + links, i)
        dst = self._new_path(d, name)
        if src and dst and not (dst + "/").startswith(src + "/"):
            os.rename(self._abs(src), self._abs(dst))

    @rule(d=st.integers(0, 50), name=st.sampled_from(NAMES), mode=st.sampled_from(DIR_MODES))
    def mkdir(self, d, name, mode):
        p = self._new_path(d, name)
        if p:
            os.mkdir(self._abs(p))
            os.chmod(self._abs(p), mode)

    @rule(i=st.integers(0, 50), child=st.booleans())
    def replace_file_with_dir(self, i, child):
        f = self._pick(self._entries()[1], i)
        if f:
            os.unlink(self._abs(f))
            os.mkdir(self._abs(f))
            if child:
                with open(os.path.join(self._abs(f), "inside"), "wb") as fh:
                    fh.write(b"was a file\n")

    @rule(i=st.integers(0, 50), data=small)
    def replace_dir_with_file(self, i, data):
        d = self._pick(self._entries()[0][1:], i)
        if d:
            shutil.rmtree(self._abs(d))
            with open(self._abs(d), "wb") as fh:
                fh.write(data)

    @rule(d=st.integers(0, 50), name=st.sampled_from(NAMES), dest=st.sampled_from(["a", "../b", "/etc", "dé/x"]))
    def symlink(self, d, name, dest):
        p = self._new_path(d, name)
        if p:
            os.symlink(dest, self._abs(p))

    @rule(i=st.integers(0, 100), fmode=st.sampled_from(FILE_MODES), dmode=st.sampled_from(DIR_MODES))
    def chmod(self, i, fmode, dmode):
        dirs, files, _ = self._entries()
        p = self._pick(dirs + files, i)
        if p is not None:
            os.chmod(self._abs(p), dmode if p in dirs else fmode)

    @rule(i=st.integers(0, 100), ns=st.integers(1_000_000_000_000_000_000, 1_900_000_000_000_000_000))
    def touch(self, i, ns):
        dirs, files, links = self._entries()
        p = self._pick(dirs + files + links, i)
        if p is not None:
            os.utime(self._abs(p), ns=(ns, ns), follow_symlinks=False)

    # -- the property -------------------------------------------------------------------------

    @rule()
    def sync_and_check(self):
        run = run_sync(SyncConfig(master=self.m, replicas=(self.r,), allow_mass_delete=True), Reporter(io.StringIO()))
        self.syncs += 1
        SyncMachine.total_syncs += 1
        assert run.exit_code == 0, run.to_json()
        treecmp.assert_trees_equal(self.m, self.r)
        assert tmp_entries(self.r) == []

    @invariant()
    def replica_never_holds_temps_outside_staging(self):
        if os.path.isdir(self.r):
            for dirpath, _, filenames in os.walk(self.r):
                if os.path.basename(dirpath) == "tmp" and os.path.basename(os.path.dirname(dirpath)) == ".dirsync":
                    continue
                assert not [n for n in filenames if n.startswith(".dirsync-tmp-")], dirpath


def _run_machine(machine, examples: int, steps: int, **kw) -> None:
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], **kw))


def test_random_mutation_sequences_converge():
    SyncMachine.total_syncs = 0
    _run_machine(SyncMachine, 25, 30)
    assert SyncMachine.total_syncs >= 25, SyncMachine.total_syncs


@pytest.mark.slow
def test_random_mutation_sequences_converge_longer():
    _run_machine(SyncMachine, 80, 50)


class HelperSyncMachine(SyncMachine):
    """SyncMachine with bursts of new files over several directories (what a helper writer takes)."""

    @rule(d=st.integers(0, 50), names=st.lists(st.sampled_from(NAMES), min_size=2, max_size=3, unique=True),
          data=st.lists(small, min_size=2, max_size=6))
    def burst(self, d, names, data):
        parent = self._pick(self._entries()[0], d)
        for k, name in enumerate(names):
            sub = os.path.join(parent, f"n{name}") if parent else f"n{name}"
            if os.path.lexists(self._abs(sub)):
                continue
            os.mkdir(self._abs(sub))
            for j, blob in enumerate(data):
                with open(os.path.join(self._abs(sub), f"f{k}{j}"), "wb") as f:
                    f.write(blob + bytes([k, j]))


def test_random_mutation_sequences_converge_with_a_helper_writer(monkeypatch):
    """The machine with bursts of new files, and the second writer taking a share of any plan
    with two or more new files (apply._split_share: normally from 1,000 on), so that its share
    meets type changes, renames, deletes and moves in the same plans."""
    from dirsync import apply

    started = []
    real = apply._Helper.start.__func__

    def start(cls, *a, **kw):
        h = real(cls, *a, **kw)
        if h is not None:
            started.append(h.pid)
        return h

    monkeypatch.setattr(apply, "SPLIT_MIN", 2)
    monkeypatch.setattr(apply._Helper, "start", classmethod(start))
    SyncMachine.total_syncs = 0
    _run_machine(HelperSyncMachine, 60, 30, derandomize=True, database=None)
    assert SyncMachine.total_syncs >= 25, SyncMachine.total_syncs
    assert started, "no plan gave the helper a share"


class SettledSyncMachine(SyncMachine):
    """SyncMachine that lets both trees settle (every ctime, and every mtime not in the future,
    older than the scans' racy window) before each sync, so that clean runs leave the pair in
    step and the next run after a master change plans only the paths its scan did not take
    over from the master's cache (sync._changed_since_in_step)."""

    @rule()
    def sync_and_check(self):
        deadline = time.monotonic() + 5
        newest = 0
        for root in (self.m, self.r):
            for dirpath, dirs, files in os.walk(root):
                for n in dirs + files + ["."]:
                    st_ = os.lstat(os.path.join(dirpath, n))
                    newest = max(newest, st_.st_ctime_ns, min(st_.st_mtime_ns, time.time_ns()))
        while time.time_ns() <= newest + 100_000_000 + 1_000_000:
            assert time.monotonic() < deadline, "clock does not advance"
            time.sleep(0.01)
        super().sync_and_check()

    @rule()
    def sync_again(self):  # (a second rule: syncs come twice as often as in SyncMachine)
        self.sync_and_check()


def test_planning_only_what_changed_since_the_pair_was_in_step(monkeypatch):
    """Random master changes between settled syncs: whenever a run plans only the paths that
    changed since the pair was last in step, its plan equals the plan of every path (checked
    here on each such run), the replica converges, and that happens in most runs."""
    from dirsync import sync as sync_mod

    real = sync_mod.diff
    seen = {"only": 0, "all": 0}

    def diff_both_ways(master, replica, opts, only=None):
        got = real(master, replica, opts, only)
        if only is None:
            seen["all"] += 1
        else:
            full = real(master, replica, opts)
            assert got.actions == full.actions and got.skipped == full.skipped, (sorted(only), full, got)
            seen["only"] += 1
        return got

    monkeypatch.setattr(sync_mod, "diff", diff_both_ways)
    SyncMachine.total_syncs = 0
    _run_machine(SettledSyncMachine, 20, 30, derandomize=True, database=None)
    assert SyncMachine.total_syncs >= 20, SyncMachine.total_syncs
    assert seen["only"] >= 10, seen
