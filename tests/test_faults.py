"""Faults on one machine, for real: files changing while they are read, kill -9 and SIGTERM in
the middle of a large write, a full disk (tiny tmpfs), permission denied on the replica, a
replica edited behind dirsync's back, and a second run on a locked pair.

After every fault: no half-written file at a final name, the old replica file intact, and a
rerun converges with `.dirsync/tmp/` empty. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import threading
import time

import pytest

try:
    import treecmp
    from helpers import (
        build_tree, kill_group, popen_cli, random_bytes, read, remove, run_cli,
        settle, stray_temps, sync_json, tiny_tmpfs, tmp_entries, wait_for, write,
    )
except ImportError:
    from tests import treecmp
    from tests.helpers import (
        build_tree, kill_group, popen_cli, random_bytes, read, remove, run_cli,
        settle, stray_temps, sync_json, tiny_tmpfs, tmp_entries, wait_for, write,
    )

from dirsync.apply import MasterReader, ReplicaSummary
from dirsync.errors import ExitCode
from dirsync.plan import PlanOptions, diff
from dirsync.progress import Reporter
from dirsync.scan import scan_tree
from dirsync.sync import SyncConfig, check_master, run_sync, scan_master
from dirsync.transport.local import LocalTransport

MiB = 1 << 20
PARTIAL = int(ExitCode.PARTIAL)


def sha(p) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(4 * MiB), b""):
            h.update(block)
    return h.hexdigest()


def write_random_file(path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def quiet_reporter() -> Reporter:
    return Reporter(io.StringIO())


def converges(m, r) -> None:
    cp = run_cli("sync", m, r)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, r)
    assert tmp_entries(r) == [] and stray_temps(r) == []


# -- a master file that changes while it is read --------------------------------------------


@pytest.mark.parametrize("trusted", [False, True], ids=["racy", "trusted"])
@pytest.mark.parametrize("change", ["append", "same-size-same-mtime", "truncate", "delete", "replace-by-dir"])
def test_master_file_changed_between_scan_and_read_is_not_committed(tmp_path, change, trusted):
    """Deterministic: scan the master, change a file, then run the sync on that (stale) scan.
    `trusted`: the scan saw the file settled, so the local writer copies it straight from the
    master file in the kernel (apply.DirectSends) and proves it by stat facts, not by reading."""
    m, r = tmp_path / "m", tmp_path / "r"
    v1 = random_bytes(600_000, 1)
    build_tree(m, {"f.bin": v1, "other.txt": b"o1\n"})
    sync_json(m, r)
    write(m / "f.bin", random_bytes(600_000, 2))  # v2: what the scan will see
    write(m / "other.txt", b"o2\n")
    if trusted:
        settle(m, r)
    rep = quiet_reporter()
    mscan = scan_master(check_master(str(m)), [], rep)
    assert mscan[0].manifest.entries["f.bin"].trusted == trusted

    if change == "append":
        with open(m / "f.bin", "ab") as f:
            f.write(b"late bytes")
    elif change == "same-size-same-mtime":
        st = os.stat(m / "f.bin")
        data = bytearray(read(m / "f.bin"))
        data[300_000:300_010] = b"0123456789"
        write(m / "f.bin", bytes(data))
        os.utime(m / "f.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # only ctime tells
    elif change == "truncate":
        os.truncate(m / "f.bin", 1000)
    elif change == "delete":
        os.unlink(m / "f.bin")
    else:
        os.unlink(m / "f.bin")
        os.mkdir(m / "f.bin")

    run = run_sync(SyncConfig(master=str(m), replicas=(str(r),)), rep, master_scan=mscan)
    assert run.exit_code == PARTIAL
    errs = run.replicas[0].errors
    assert [e.path for e in errs] == ["f.bin"], errs
    assert errs[0].code in ("CHANGED", "NOT_FOUND"), errs[0]
    assert read(r / "f.bin") == v1, "a changed master file was committed"
    assert read(r / "other.txt") == b"o2\n"  # the rest of the run went on
    assert tmp_entries(r) == []
    converges(m, r)  # the next run picks it up


def test_small_files_read_by_the_scan_are_sent_as_scanned(tmp_path):
    """The master scan keeps the bytes of small files it reads (sync.HOLD_BYTES): they are sent
    from memory, so a small file changed after the scan reaches the replica as scanned, whole
    and matching its manifest entry (the old path reread it and refused it as changed); the
    next run sends the new content. A file the scan did not read is read again, as before."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"small.txt": b"scanned\n" * 100, "kept.txt": b"k1\n"})
    settle(m)
    sync_json(m, r)  # (the master cache now trusts both files)
    write(m / "small.txt", b"SCANNED\n" * 100)
    rep = quiet_reporter()
    mscan = scan_master(check_master(str(m)), [], rep)
    assert set(mscan[0].held) == {"small.txt"}  # read by this scan; kept.txt came from the cache
    write(m / "small.txt", b"late one\n" * 100)  # same size, after the scan

    run = run_sync(SyncConfig(master=str(m), replicas=(str(r),)), rep, master_scan=mscan)
    assert run.exit_code == 0 and run.replicas[0].errors == []
    assert read(r / "small.txt") == b"SCANNED\n" * 100
    assert os.stat(r / "small.txt").st_mtime_ns == mscan[0].manifest.entries["small.txt"].mtime_ns
    assert tmp_entries(r) == []
    converges(m, r)


def test_master_file_changed_while_copied_in_the_kernel_is_not_committed(tmp_path):
    """A trusted master file is copied straight from the master (apply.DirectSends): when it
    changes after the writer opened it (same size, mtime put back; only ctime tells), the
    proof by stat facts after the copy fails and the file is not committed."""
    from dirsync.apply import DirectSends

    m, r = tmp_path / "m", tmp_path / "r"
    v1, v2 = random_bytes(600_000, 1), random_bytes(600_000, 2)
    build_tree(m, {"f.bin": v1, "other.txt": b"o1\n"})
    sync_json(m, r)
    write(m / "f.bin", v2)
    write(m / "other.txt", b"o2\n")
    settle(m, r)
    mscan = scan_tree(str(m))
    used = []

    class ChangesAfterOpen(MasterReader):
        def local_sends(self, w):
            s = super().local_sends(w)
            if w.path == "f.bin":
                used.append(isinstance(s, DirectSends))
                st = os.stat(m / "f.bin")
                write(m / "f.bin", v2[:1000] + b"X" * 10 + v2[1010:])
                os.utime(m / "f.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
            return s

    t = LocalTransport(str(r))
    t.open()
    summary = ReplicaSummary(str(r))
    try:
        plan = diff(mscan.manifest, t.scan([]).manifest, PlanOptions())
        t.apply(plan.actions, ChangesAfterOpen(str(m)), summary)
    finally:
        t.close()
    assert used == [True], "the file was not offered for a copy in the kernel"
    assert [(e.path, e.code) for e in summary.errors] == [("f.bin", "CHANGED")], summary.errors
    assert read(r / "f.bin") == v1
    assert read(r / "other.txt") == b"o2\n"
    assert tmp_entries(r) == []
    converges(m, r)


@pytest.mark.slow
def test_concurrent_writer_never_yields_a_mixed_replica_file(tmp_path):
    """A real writer thread rewrites an 8 MiB file in place, each version one repeated byte.

    Sync in-process until some run reports the file as changed-while-read (deadline). At every
    run the replica copy, if any, must be one whole version (one byte value), never a mix.
    """
    m, r = tmp_path / "m", tmp_path / "r"
    size = 8 * MiB
    build_tree(m, {"hot.bin": b"\0" * size, "cold.txt": b"cold\n"})
    stop = threading.Event()
    versions = [0]

    def writer():
        fd = os.open(m / "hot.bin", os.O_WRONLY)
        try:
            i = 0
            while not stop.is_set():
                i += 1
                block = bytes([i % 251 + 1]) * (1 * MiB)
                for off in range(0, size, len(block)):
                    os.pwrite(fd, block, off)
                versions[0] = i
        finally:
            os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    seen_changed = False
    runs = 0
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and not seen_changed:
            run = run_sync(SyncConfig(master=str(m), replicas=(str(r),)), quiet_reporter())
            runs += 1
            assert run.exit_code in (0, PARTIAL), run.to_json()
            errors = list(run.scan_errors) + [e for x in run.replicas for e in x.errors]
            seen_changed = any(e.path == "hot.bin" and e.code == "CHANGED" for e in errors)
            if os.path.exists(r / "hot.bin"):
                data = read(r / "hot.bin")
                assert len(data) == size and data == data[:1] * size, "replica holds a mix of two versions"
            assert tmp_entries(r) == []
    finally:
        stop.set()
        t.join(10)
    assert versions[0] > 1, "the writer never ran"
    assert seen_changed, f"no run noticed the file changing in {runs} runs"
    converges(m, r)


# -- kill -9 and SIGTERM in the middle of a large write ----------------------------------------


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """One 300 MiB random file, hard-linked into the masters that need it (read-only use)."""
    d = tmp_path_factory.mktemp("big")
    p = d / "big.bin"
    write_random_file(p, 300 * MiB)
    return p


def _interrupt_mid_write(tmp_path, big, sig, *, extra_args=()):
    m, r = tmp_path / "m", tmp_path / "r"
    old = random_bytes(1 * MiB, 3)
    build_tree(m, {"big.bin": old, "small.txt": b"s1\n"})
    sync_json(m, r)
    old_sha = sha(r / "big.bin")
    os.unlink(m / "big.bin")
    os.link(big, m / "big.bin")  # the new version: 300 MiB, nothing reusable
    write(m / "small.txt", b"s2\n")
    p = popen_cli("sync", *extra_args, m, r)
    try:
        wait_for(lambda: tmp_entries(r) or p.poll() is not None, 120, what="a temp file under .dirsync/tmp")
        assert p.poll() is None, f"sync ended before it could be interrupted: {p.communicate()}"
        wait_for(lambda: any(os.path.getsize(os.path.join(r, ".dirsync", "tmp", os.fsdecode(n))) > 0
                             for n in tmp_entries(r)) or p.poll() is not None, 60, what="bytes in the temp")
        if sig == signal.SIGKILL:
            kill_group(p, signal.SIGKILL)
        else:
            p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            kill_group(p)
            p.wait(10)
    return m, r, p.returncode, err.decode(errors="replace"), old_sha


@pytest.mark.slow
def test_kill_9_mid_write_leaves_the_old_file_intact(tmp_path, big_file):
    m, r, rc, err, old_sha = _interrupt_mid_write(tmp_path, big_file, signal.SIGKILL)
    assert rc == -signal.SIGKILL, (rc, err)
    assert sha(r / "big.bin") == old_sha, "the old file was damaged by a killed run"
    # A stale temp may remain after kill -9; no dirsync temp may sit anywhere in the tree.
    staging = os.path.join(os.fsencode(r), b".dirsync", b"tmp")
    assert [t for t in stray_temps(r) if os.path.dirname(t) != staging] == []
    assert all(n.startswith(b".dirsync-tmp-") for n in tmp_entries(r))
    converges(m, r)
    assert sha(r / "big.bin") == sha(big_file)


@pytest.mark.slow
def test_sigterm_mid_write_exits_130_removes_its_temp_and_keeps_the_old_file(tmp_path, big_file):
    m, r, rc, err, old_sha = _interrupt_mid_write(tmp_path, big_file, signal.SIGTERM)
    assert rc == int(ExitCode.INTERRUPTED), (rc, err)
    assert "Traceback" not in err and "interrupted" in err, err
    assert sha(r / "big.bin") == old_sha
    assert tmp_entries(r) == [], "SIGTERM left a temp behind"
    converges(m, r)


def test_kill_9_while_throttled_and_a_second_run_is_locked_out(tmp_path):
    """Same fault at a small size, made slow with --bwlimit: a second run on the pair meanwhile
    exits 3, then kill -9 of the first; the old file survives and the lock is free again."""
    m, r = tmp_path / "m", tmp_path / "r"
    old = random_bytes(64 * 1024, 4)
    build_tree(m, {"big.bin": old})
    sync_json(m, r)
    write(m / "big.bin", random_bytes(6 * MiB, 5))
    p = popen_cli("sync", "--bwlimit", "1M", m, r)
    try:
        wait_for(lambda: tmp_entries(r) or p.poll() is not None, 60, what="a temp file under .dirsync/tmp")
        assert p.poll() is None, p.communicate()
        second = run_cli("sync", m, r)
        assert second.returncode == int(ExitCode.LOCKED), second.stderr
        assert "locked" in second.stderr and str(p.pid) in second.stderr
        kill_group(p, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            kill_group(p)
            p.wait(10)
    assert read(r / "big.bin") == old
    converges(m, r)  # the kernel dropped the flock with the process


def test_stale_temps_from_a_dead_run_are_removed(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"a": b"a"})
    sync_json(m, r)
    write(r / ".dirsync" / "tmp" / ".dirsync-tmp-99-deadbeef", b"half a file")
    write(m / "a", b"b")
    converges(m, r)


# -- disk full ----------------------------------------------------------------------------------


def test_disk_full_is_an_item_error_and_the_old_file_survives(tmp_path):
    m = tmp_path / "m"
    v1 = random_bytes(100_000, 6)
    build_tree(m, {"big.bin": v1, "a.txt": b"a1\n", "docs": {"b.txt": b"b1\n"}})
    with tiny_tmpfs("2m") as r:
        sync_json(m, r)
        write_random_file(m / "big.bin", 3 * MiB)  # cannot fit
        write(m / "a.txt", b"a2\n")
        write(m / "docs" / "new.txt", b"new\n")
        cp = run_cli("sync", m, r)
        assert cp.returncode == PARTIAL, cp.stderr
        errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
        assert len(errs) == 1, cp.stderr
        assert "big.bin" in errs[0] and "No space left on device" in errs[0], errs
        assert read(os.path.join(r, "big.bin")) == v1, "the old file was lost to a full disk"
        assert read(os.path.join(r, "a.txt")) == b"a2\n" and read(os.path.join(r, "docs/new.txt")) == b"new\n"
        assert tmp_entries(r) == [] and stray_temps(r) == []
        # Room again (the big file shrinks): converges.
        write(m / "big.bin", random_bytes(200_000, 7))
        converges(m, r)


def test_completely_full_replica_fails_cleanly(tmp_path):
    """Even the replica's own cache cannot be saved: item errors and a clean exit, no traceback."""
    m = tmp_path / "m"
    build_tree(m, {"a.txt": b"a1\n", "d": {"b.txt": b"b1\n"}})
    with tiny_tmpfs("1m") as r:
        sync_json(m, r)
        write(m / "a.txt", b"a2, longer than before\n")
        write(m / "c.txt", b"c\n")
        filler = os.path.join(r, ".dirsync", "filler")  # never synced, never deleted: ours to fill
        with open(filler, "wb") as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        cp = run_cli("sync", m, r)
        assert cp.returncode == PARTIAL, (cp.returncode, cp.stderr)
        assert "No space left on device" in cp.stderr
        assert read(os.path.join(r, "a.txt")) == b"a1\n"
        assert tmp_entries(r) == [] and stray_temps(r) == []
        leftovers = [n for n in os.listdir(os.path.join(r, ".dirsync")) if ".tmp-" in n]
        assert leftovers == [], f"a half-written state file was left: {leftovers}"
        os.unlink(filler)
        converges(m, r)


def test_a_full_replica_reports_each_kind_of_failure_a_few_times_not_once_per_file(tmp_path):
    """Every new file fails the same way on a full disk: stderr shows the first ITEMS_SHOWN and
    one line counting the rest (a cron mail of 100,000 identical lines helps nobody); --json
    still lists every path, and room again converges."""
    from dirsync.progress import ITEMS_SHOWN

    m = tmp_path / "m"
    build_tree(m, {"a.txt": b"a1\n"})
    with tiny_tmpfs("1m") as r:
        sync_json(m, r)
        build_tree(m / "new", {f"f{i:02d}.bin": random_bytes(20_000, 50 + i) for i in range(3 * ITEMS_SHOWN)})
        filler = os.path.join(r, ".dirsync", "filler")  # never synced, never deleted: ours to fill
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        cp = run_cli("sync", m, r)
        assert cp.returncode == PARTIAL, (cp.returncode, cp.stderr)
        errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
        per_file = [ln for ln in errs if "new/f" in ln and "No space left on device" in ln and "more paths" not in ln]
        rest = [ln for ln in errs if "more paths failed the same way (No space left on device)" in ln]
        assert len(per_file) == ITEMS_SHOWN and len(rest) == 1, cp.stderr
        assert f"{2 * ITEMS_SHOWN} more paths" in rest[0] and "new/f29.bin" in rest[0], rest
        cp = run_cli("sync", "--json", m, r)
        out = json.loads(cp.stdout)
        failed = {e["path"] for e in out["replicas"][0]["errors"]}
        assert {f"new/f{i:02d}.bin" for i in range(3 * ITEMS_SHOWN)} <= failed
        assert tmp_entries(r) == [] and stray_temps(r) == []
        os.unlink(filler)
        shutil.rmtree(m / "new")  # (the tmpfs is too small for all of them anyway)
        converges(m, r)


def _fill(root: str, leave: int = 0) -> str:
    """Fill the file system of `root` through a file in its .dirsync/ (never synced), then free
    `leave` bytes of it again. Returns the filler's path."""
    filler = os.path.join(root, ".dirsync", "filler")
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    if leave:
        os.truncate(filler, max(0, os.path.getsize(filler) - leave))
    return filler


def test_two_way_reports_a_full_side_the_same_few_lines(tmp_path):
    """Two-way prints item errors through the same Reporter.item_errors: ITEMS_SHOWN lines and
    one counting the rest."""
    from dirsync.progress import ITEMS_SHOWN

    a = tmp_path / "a"
    build_tree(a, {"a.txt": b"a1\n"})
    with tiny_tmpfs("1m") as b:
        cp = run_cli("sync", "--two-way", a, b)
        assert cp.returncode == 0, cp.stderr
        build_tree(a / "new", {f"f{i:02d}.bin": random_bytes(20_000, 80 + i) for i in range(2 * ITEMS_SHOWN + 3)})
        filler = _fill(b, leave=16 << 10)  # room for the run's small state files, not for a new file
        cp = run_cli("sync", "--two-way", a, b)
        assert cp.returncode == PARTIAL, (cp.returncode, cp.stderr)
        errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:") and "new/f" in ln]
        assert len(errs) == ITEMS_SHOWN + 1, cp.stderr
        assert f"{ITEMS_SHOWN + 3} more paths failed the same way (No space left on device)" in errs[-1], errs
        assert tmp_entries(b) == [] and stray_temps(b) == []
        os.unlink(filler)
        shutil.rmtree(a / "new")
        cp = run_cli("sync", "--two-way", a, b)
        assert cp.returncode == 0, cp.stderr
        treecmp.assert_trees_equal(a, b)


def test_two_way_with_a_side_too_full_for_its_state_stops_cleanly(tmp_path):
    """Not even the run's .pending marker fits: one clear error, no traceback, exit 23, nothing
    changed on either side; with room again the next run converges."""
    a = tmp_path / "a"
    build_tree(a, {"a.txt": b"a1\n"})
    with tiny_tmpfs("1m") as b:
        assert run_cli("sync", "--two-way", a, b).returncode == 0
        write(a / "a.txt", b"a2\n")
        filler = _fill(b)
        cp = run_cli("sync", "--two-way", a, b)  # (run_cli asserts there is no traceback)
        assert cp.returncode == PARTIAL, (cp.returncode, cp.stderr)
        errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
        assert len(errs) == 1 and "write two-way state" in errs[0] and "No space left on device" in errs[0], errs
        assert read(os.path.join(b, "a.txt")) == b"a1\n" and read(a / "a.txt") == b"a2\n"
        assert tmp_entries(b) == [] and stray_temps(b) == []
        os.unlink(filler)
        cp = run_cli("sync", "--two-way", a, b)
        assert cp.returncode == 0, cp.stderr
        treecmp.assert_trees_equal(a, b)


# -- permissions on the replica ------------------------------------------------------------------


def test_permission_denied_on_a_replica_directory_is_an_item_error(unpriv):
    m, r = unpriv.path("m"), unpriv.path("r")
    build_tree(m, {"ro": {"old.txt": b"old\n"}, "top.txt": b"t1\n"})
    unpriv.own(m)
    assert unpriv.run("sync", m, r).returncode == 0
    write(os.path.join(m, "ro", "new.txt"), b"new\n")
    write(os.path.join(m, "ro", "old.txt"), b"old, edited\n")
    write(os.path.join(m, "top.txt"), b"t2\n")
    unpriv.own(m)
    os.chmod(os.path.join(r, "ro"), 0o555)  # nobody owns it but may not write into it
    cp = unpriv.run("sync", m, r)
    assert cp.returncode == PARTIAL, cp.stderr
    errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
    assert errs and all("Permission denied" in ln for ln in errs), cp.stderr
    assert any("ro/new.txt" in ln for ln in errs) and any("ro/old.txt" in ln for ln in errs), errs
    assert read(os.path.join(r, "ro", "old.txt")) == b"old\n"
    assert not os.path.exists(os.path.join(r, "ro", "new.txt"))
    assert read(os.path.join(r, "top.txt")) == b"t2\n"
    assert tmp_entries(r) == [] and stray_temps(r) == []
    # The directory's mode comes from the master at the end of the run, so the next run succeeds.
    cp = unpriv.run("sync", m, r)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, r)


def test_permission_denied_on_the_replica_root_is_reported(unpriv):
    m, r = unpriv.path("m"), unpriv.path("r")
    build_tree(m, {"a.txt": b"a\n"})
    os.mkdir(r)  # owned by root, 0755: nobody cannot create .dirsync in it
    unpriv.own(m)
    cp = unpriv.run("sync", m, r)
    assert cp.returncode == int(ExitCode.USAGE), cp.stderr
    errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Permission denied" in errs[0] and str(r) in errs[0], cp.stderr
    assert os.listdir(r) == []


# -- the replica changes behind dirsync's back ------------------------------------------------------


def test_replica_file_changed_after_the_scan_is_left_alone(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"a.txt": b"a1\n", "b.txt": b"b1\n", "gone.txt": b"g\n"})
    sync_json(m, r)
    write(m / "a.txt", b"a2 from the master\n")
    write(m / "b.txt", b"b2\n")
    remove(m / "gone.txt")
    mscan = scan_tree(str(m))
    t = LocalTransport(str(r))
    t.open()
    try:
        plan = diff(mscan.manifest, t.scan([]).manifest, PlanOptions())
        write(r / "a.txt", b"someone edited the replica meanwhile\n")  # after the scan, before apply
        write(r / "gone.txt", b"and this one too, longer\n")
        summary = ReplicaSummary(str(r))
        t.apply(plan.actions, MasterReader(str(m)), summary)
    finally:
        t.close()
    assert sorted(e.path for e in summary.errors) == ["a.txt", "gone.txt"], summary.errors
    assert all(e.code == "CONFLICT" for e in summary.errors)
    assert read(r / "a.txt") == b"someone edited the replica meanwhile\n"
    assert read(r / "gone.txt") == b"and this one too, longer\n"
    assert read(r / "b.txt") == b"b2\n"
    assert tmp_entries(r) == []
    converges(m, r)


def test_reuse_source_swapped_for_a_fifo_does_not_hang(tmp_path):
    """A replica file the plan copies from is replaced by a FIFO after the scan: opening it for
    reading must not block forever (the write fails as an item error and the run goes on)."""
    m, r = tmp_path / "m", tmp_path / "r"
    data = random_bytes(200_000, 9)
    build_tree(m, {"old-name.bin": data, "other.txt": b"o1\n"})
    sync_json(m, r)
    os.rename(m / "old-name.bin", m / "new-name.bin")  # planned as a local copy from old-name.bin
    write(m / "other.txt", b"o2\n")
    mscan = scan_tree(str(m))
    t = LocalTransport(str(r))
    t.open()
    summary = ReplicaSummary(str(r))
    done = threading.Event()
    try:
        plan = diff(mscan.manifest, t.scan([]).manifest, PlanOptions())
        os.unlink(r / "old-name.bin")
        os.mkfifo(r / "old-name.bin")

        def apply():
            try:
                t.apply(plan.actions, MasterReader(str(m)), summary)
            finally:
                done.set()

        th = threading.Thread(target=apply, daemon=True)
        th.start()
        finished = done.wait(15)
        if not finished:  # unblock the reader so the thread can end, then fail
            fd = os.open(r / "old-name.bin", os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            th.join(15)
        assert finished, "the replica writer blocked opening a FIFO"
    finally:
        t.close()
    # The write that needed it fails, and the FIFO itself is left alone (not what was scanned).
    assert sorted(e.path for e in summary.errors) == ["new-name.bin", "old-name.bin"], summary.errors
    assert all(e.code == "CONFLICT" for e in summary.errors)
    assert read(r / "other.txt") == b"o2\n"
    assert tmp_entries(r) == []
    remove(r / "old-name.bin")
    converges(m, r)
