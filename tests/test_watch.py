"""Watch mode: the pure Debouncer with a fake clock, the Watcher on real watchdog, and the
`dirsync watch` daemon on real files (in a subprocess, or in-process in a thread joined here).

Every wait polls a condition with a deadline; no test sleeps a fixed time and then asserts.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

try:  # pytest "prepend" import mode puts tests/ on sys.path
    from helpers import WatchDaemon, wait_for as helpers_wait_for
    from treecmp import assert_trees_equal
except ImportError:  # pragma: no cover
    from tests.helpers import WatchDaemon, wait_for as helpers_wait_for
    from tests.treecmp import assert_trees_equal

from dirsync.manifest import DirEntry, FileEntry, Manifest
from dirsync.progress import Reporter
from dirsync.sync import SyncConfig
from dirsync.watch import Debouncer, Rescan, Watcher, anchor, run_watch, widen

pytestmark = pytest.mark.watch

DEADLINE_S = 30.0


# -- helpers -------------------------------------------------------------------------------------


def wait_for(cond, timeout: float = DEADLINE_S, what: str = "condition", interval: float = 0.01):
    return helpers_wait_for(cond, timeout, interval, what)


def wait_equal(master, replica, timeout: float = DEADLINE_S) -> float:
    """Poll until the trees are equal; returns the seconds it took. Fails with the last diff."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        try:
            assert_trees_equal(master, replica)
            return time.monotonic() - t0
        except (AssertionError, OSError) as e:  # OSError: the replica changed under the walk (mid-sync)
            if time.monotonic() >= deadline:
                raise AssertionError(f"replica did not converge within {timeout}s:\n{e}") from None
        time.sleep(0.02)


def temps(replica) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(replica):
        for n in dirnames + filenames:
            if n.startswith(".dirsync-tmp-"):
                out.append(os.path.join(dirpath, n))
    try:
        out += [os.path.join(replica, ".dirsync", "tmp", n) for n in os.listdir(os.path.join(replica, ".dirsync", "tmp"))]
    except FileNotFoundError:
        pass
    return out


def write(p, data: bytes | str) -> None:
    Path(p).parent.mkdir(parents=True, exist_ok=True)
    Path(p).write_bytes(data.encode() if isinstance(data, str) else data)


def make_tree(root: Path, n_files: int = 40) -> None:
    for i in range(n_files):
        write(root / f"d{i % 4}" / f"f{i:03d}.txt", f"file {i}\n" * (i + 1))
    write(root / "top.txt", "top\n")
    write(root / "big.bin", os.urandom(2 << 20))
    (root / "empty").mkdir()
    os.symlink("top.txt", root / "link")


class Daemon(WatchDaemon):
    """`dirsync watch [ARGS] MASTER REPLICA...` (see helpers.WatchDaemon)."""

    def __init__(self, tmp_path: Path, master, *replicas, args=(), name: str = "watch") -> None:
        super().__init__(tmp_path, *args, master, *replicas, name=name, deadline=DEADLINE_S)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*a, **kw) -> Daemon:
        d = Daemon(*a, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture
def trees(tmp_path):
    master, replica = tmp_path / "master", tmp_path / "replica"
    master.mkdir()
    make_tree(master)
    return master, replica


# -- Debouncer (pure, fake clock) -----------------------------------------------------------------


def test_debouncer_waits_for_quiet_period():
    d = Debouncer(delay_s=0.2, max_latency_s=2.0)
    assert d.due(0.0) is None and d.deadline() is None
    d.add("a", 10.0)
    assert d.deadline() == pytest.approx(10.2)
    assert d.due(10.19) is None
    d.add("b", 10.15)  # a new event restarts the quiet period
    assert d.due(10.3) is None
    b = d.due(10.35)
    assert b is not None and b.paths == {"a", "b"} and b.first_s == 10.0 and b.events == 2 and not b.full
    assert d.due(100.0) is None and not d


def test_debouncer_max_latency_bounds_a_continuous_writer():
    d = Debouncer(delay_s=0.2, max_latency_s=2.0)
    t = 0.0
    batches = []
    while t < 5.0:  # one write every 0.1 s: never quiet for 0.2 s
        d.add("log.txt", t)
        b = d.due(t)
        if b:
            batches.append((t, b))
        t = round(t + 0.1, 6)
    assert [round(bt, 6) for bt, _ in batches] == [2.0, 4.1]
    assert all(b.paths == {"log.txt"} for _, b in batches)


def test_debouncer_widens_crowded_dir_and_large_sets():
    d = Debouncer(0.1, 1.0, max_per_dir=10, max_paths=50)
    for i in range(11):
        d.add(f"a/b/f{i}", 0.0)
    d.add("c/x", 0.0)
    assert d.due(1.0).paths == {"a/b", "c/x"}
    for i in range(200):  # 200 directories of 1 file: too many paths, climb towards the root
        d.add(f"top{i % 2}/sub{i}/f", 0.0)
    b = d.due(1.0)
    assert b.paths == {"top0", "top1"}
    assert widen({f"t{i}/f" for i in range(100)}, 1000, 50) == {""}


def test_debouncer_nested_paths_and_whole_tree():
    d = Debouncer(0.1, 1.0)
    for p in ("a", "a/b", "a/b/c", "ab", "x/y"):
        d.add(p, 0.0)
    assert d.due(0.1).paths == {"a", "ab", "x/y"}
    d.add("a", 1.0)
    d.add_all(1.0, "inotify event queue overflowed")
    d.add("b", 1.05)
    b = d.due(1.2)
    assert b.full and b.paths == {""} and b.reason == "inotify event queue overflowed"
    d.add("", 2.0)  # an event on the root itself is the whole tree too
    assert d.due(3.0).full


def test_debouncer_storm_stays_bounded():
    d = Debouncer(0.1, 10.0, max_per_dir=100, max_paths=100)
    for i in range(100_000):
        d.add(f"d{i % 37}/e{i % 1000}/f{i}", i * 1e-6)
        assert len(d.paths) <= 8 * 100 + 1
    b = d.due(20.0)
    assert 0 < len(b.paths) <= 100 and b.events == 100_000


def test_debouncer_rejects_bad_timing():
    with pytest.raises(ValueError):
        Debouncer(delay_s=1.0, max_latency_s=0.5)


def test_anchor_rescans_from_the_highest_unknown_ancestor():
    m = Manifest({"": DirEntry("", 0o755, 1), "a": DirEntry("a", 0o755, 1),
                  "f": FileEntry("f", 0, 0o644, 1, b"\0" * 16, 0, (), b"")})
    # "a/new/deeper/x": neither a/new nor a/new/deeper is known -> rescan a/new
    assert anchor(["a/new/deeper/x", "a/y", "f"], m) == ["a/new", "a/y", "f"]
    # a path under a file (type change file -> dir) is anchored at that path
    assert anchor(["f/inner"], m) == ["f"]


# -- Watcher (real watchdog) ----------------------------------------------------------------------


def drain(q: queue.SimpleQueue, until, timeout: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"queue never satisfied the condition; got {got}")
        try:
            got.append(q.get(timeout=min(left, 0.1)))
        except queue.Empty:
            pass
    return got


def test_watcher_queues_relpaths_drops_own_files_and_joins_its_threads(tmp_path):
    root = tmp_path / "m"
    (root / ".dirsync" / "tmp").mkdir(parents=True)
    (root / "sub").mkdir()
    before = set(threading.enumerate())
    q: queue.SimpleQueue = queue.SimpleQueue()
    with Watcher(str(root.resolve()), q, ignore=["logs"]) as w:
        assert w.problem() is None
        assert w.watch_count() is not None and w.watch_count() >= 3
        write(root / ".dirsync" / "tmp" / "x", "own temp")
        write(root / "sub" / ".dirsync-tmp-1-abcd", "old-style temp")
        write(root / "logs" / "daemon.log", "our log")
        write(root / "sub" / "new.txt", "hello")
        os.rename(root / "sub" / "new.txt", root / "sub" / "moved.txt")
        os.chmod(root / "sub", 0o700)
        got = drain(q, lambda g: "sub/moved.txt" in g and "sub" in g)
    assert "sub/new.txt" in got
    assert not [p for p in got if isinstance(p, str) and (p.startswith(".dirsync") or "dirsync-tmp" in p
                                                          or p.startswith("logs"))], got
    assert not set(threading.enumerate()) - before  # the observer and everything it owns were joined


def test_watcher_start_failure_is_a_problem_not_an_exception(tmp_path):
    from watchdog.observers import Observer

    class LimitObserver(Observer):
        def start(self):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    before = set(threading.enumerate())
    q: queue.SimpleQueue = queue.SimpleQueue()
    with Watcher(str(tmp_path), q, observer_factory=LimitObserver) as w:
        assert "inotify watch limit reached" in w.problem()
    assert not set(threading.enumerate()) - before


def test_watcher_turns_overflow_log_into_rescan_marker(tmp_path):
    q: queue.SimpleQueue = queue.SimpleQueue()
    with Watcher(str(tmp_path), q):
        # what watchdog's inotify reader logs when the kernel queue overflowed
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
        got = drain(q, lambda g: any(isinstance(x, Rescan) for x in g))
    assert "overflow" in next(x for x in got if isinstance(x, Rescan)).reason
    assert not logging.getLogger("watchdog.observers.inotify_c").handlers  # removed on exit


# -- run_watch in-process (a thread owned and joined here) ------------------------------------------


class InProcess:
    def __init__(self, cfg: SyncConfig, log: Path, **kw) -> None:
        self.stop = threading.Event()
        self.reporter = Reporter(io.StringIO(), log_file=str(log), verbose=True)
        self.result: list = []
        self.log = log

        def main():
            try:
                self.result.append(run_watch(cfg, self.reporter, self.stop, **kw))
            except BaseException as e:  # surfaced by join()
                self.result.append(e)
            finally:
                self.reporter.close()

        self.thread = threading.Thread(target=main, name="run_watch-under-test")
        self.thread.start()

    def join(self) -> int:
        self.stop.set()
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive(), "run_watch did not stop"
        r = self.result[0]
        if isinstance(r, BaseException):
            raise r
        return r


def test_watch_limit_falls_back_to_periodic_full_rescans(trees, tmp_path):
    """The observer cannot start (inotify watch limit): warn, and full rescans still converge."""
    from watchdog.observers import Observer

    class LimitObserver(Observer):
        def start(self):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    master, replica = trees
    before = set(threading.enumerate())
    run = InProcess(SyncConfig(str(master), (str(replica),)), tmp_path / "w.log", delay_s=0.05,
                    rescan_interval_s=0.5, observer_factory=LimitObserver)
    try:
        wait_equal(master, replica)
        write(master / "d1" / "later.txt", "seen by a full rescan, not an event")
        (master / "top.txt").unlink()
        wait_equal(master, replica)
    finally:
        assert run.join() == 0
    log = (tmp_path / "w.log").read_text()
    assert "inotify watch limit reached" in log and "changes may be missed" in log
    assert not set(threading.enumerate()) - before


# -- the daemon: scenarios ------------------------------------------------------------------------


def _create(m: Path) -> None:
    write(m / "new.txt", "new file\n")
    write(m / "n1" / "n2" / "n3" / "deep.txt", "deep\n")
    (m / "n1" / "emptydir").mkdir()
    os.symlink("../top.txt", m / "n1" / "uplink")
    write(m / "d2" / "another.txt", "x" * 10000)


def _modify(m: Path) -> None:
    write(m / "d0" / "f000.txt", "FILE 0\n")  # same size, new content
    write(m / "top.txt", "a different length now\n")
    os.chmod(m / "d1" / "f001.txt", 0o600)
    os.chmod(m / "d3", 0o750)
    os.utime(m / "d2" / "f002.txt", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    with open(m / "big.bin", "r+b") as f:  # edit in the middle of a 2 MiB file
        f.seek(1 << 20)
        f.write(b"EDITED IN THE MIDDLE")


def _append(m: Path) -> None:
    with open(m / "d0" / "f004.txt", "ab") as f:
        f.write(b"appended line\n")
    with open(m / "big.bin", "ab") as f:
        f.write(os.urandom(100_000))


def _delete(m: Path) -> None:
    (m / "d0" / "f008.txt").unlink()
    (m / "link").unlink()
    (m / "empty").rmdir()
    shutil.rmtree(m / "d3")


def _rename(m: Path) -> None:
    os.rename(m / "d0" / "f000.txt", m / "d0" / "renamed.txt")
    os.rename(m / "d1" / "f001.txt", m / "d2" / "moved-across.txt")
    os.rename(m / "d3", m / "d3-renamed")
    os.rename(m / "big.bin", m / "d2" / "big-moved.bin")
    os.rename(m / "d0" / "f004.txt", m / "swap.tmp")  # swap two files
    os.rename(m / "d0" / "f008.txt", m / "d0" / "f004.txt")
    os.rename(m / "swap.tmp", m / "d0" / "f008.txt")


def _type_changes(m: Path) -> None:
    (m / "top.txt").unlink()
    (m / "top.txt").mkdir()  # file -> dir (the symlink "link" now points at a dir)
    write(m / "top.txt" / "inside.txt", "inside\n")
    shutil.rmtree(m / "d3")
    write(m / "d3", "dir -> file\n")
    (m / "d0" / "f000.txt").unlink()
    os.symlink("f004.txt", m / "d0" / "f000.txt")  # file -> symlink
    (m / "link").unlink()
    (m / "link").mkdir()  # symlink -> dir


SCENARIOS = {"create": _create, "modify": _modify, "append": _append, "delete": _delete, "rename": _rename,
             "type-changes": _type_changes}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_converges(name, trees, tmp_path, daemons):
    master, replica = trees
    d = daemons(tmp_path, master, replica).wait_ready()
    wait_equal(master, replica)
    SCENARIOS[name](master)
    wait_equal(master, replica)
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert not temps(replica)
    d.assert_clean_log()
    assert "stopped watching" in d.text()


def _sent_bytes(log: str) -> int:
    units = {"B": 1, "KiB": 1024, "MiB": 1 << 20}
    return int(sum(float(n) * units[u] for n, u in re.findall(r"sent ([\d.]+) (B|KiB|MiB)", log)))


def test_renames_resend_no_content(trees, tmp_path, daemons):
    master, replica = trees
    d = daemons(tmp_path, master, replica).wait_ready()
    wait_equal(master, replica)
    start = len(d.text())
    os.rename(master / "big.bin", master / "d1" / "big-renamed.bin")
    os.rename(master / "d2", master / "d2-renamed")
    wait_equal(master, replica)
    assert d.stop() == 0  # a stopped daemon has written every batch line
    after = d.text()[start:]
    assert "synced " in after
    assert _sent_bytes(after) < 64 * 1024, after  # a 2 MiB file moved: its chunks are reused


def test_burst_of_2500_files(trees, tmp_path, daemons):
    master, replica = trees
    d = daemons(tmp_path, master, replica).wait_ready()
    wait_equal(master, replica)
    for i in range(2500):
        write(master / "burst" / f"b{i % 25:02d}" / f"file{i:05d}", f"burst {i}\n")
    wait_equal(master, replica, timeout=60)
    assert d.stop() == 0
    d.assert_clean_log()


def test_slow_writer_never_leaves_a_torn_file(tmp_path, daemons):
    """A file appended to for ~3 s, one 4 KiB page per write (a read sees whole writes only).

    Checkable: every version the replica ever holds at the final name is a prefix of the final
    content ending on a write boundary (a state the master really had), and the max latency makes
    intermediate versions appear while the writer is still going. Then a file written slowly
    under a temp name and renamed into place: the replica's file is only ever old or new.
    """
    master, replica = tmp_path / "master", tmp_path / "replica"
    master.mkdir()
    write(master / "keep.txt", "keep\n")
    d = daemons(tmp_path, master, replica, args=("--delay", "0.3", "--max-latency", "0.5")).wait_ready()
    wait_equal(master, replica)
    block = 4096
    blocks = [bytes([65 + i % 26]) * block for i in range(150)]
    final = b"".join(blocks)
    seen: set[int] = set()
    target = replica / "slow.log"

    def observe():
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            return
        assert len(data) % block == 0 and data == final[:len(data)], f"torn version of {len(data)} bytes"
        seen.add(len(data) // block)

    with open(master / "slow.log", "wb", buffering=0) as f:
        t_end = time.monotonic() + 3.0
        for i, b in enumerate(blocks):
            f.write(b)
            pause_until = time.monotonic() + max(0.0, (t_end - time.monotonic()) / (len(blocks) - i))
            while time.monotonic() < pause_until:
                observe()
                time.sleep(0.003)
    intermediate = {k for k in seen if 0 < k < len(blocks)}
    assert intermediate, "no intermediate version synced while the file was being written (max latency)"
    wait_equal(master, replica)

    old, new = b"old version\n" * 1000, b"".join(blocks[:40])
    write(master / "doc.txt", old)
    wait_equal(master, replica)
    with open(master / ".doc.txt.part", "wb", buffering=0) as f:
        for b in blocks[:40]:
            f.write(b)
            t = time.monotonic() + 0.02
            while time.monotonic() < t:
                assert (replica / "doc.txt").read_bytes() in (old, new)
    os.rename(master / ".doc.txt.part", master / "doc.txt")
    wait_for(lambda: (replica / "doc.txt").read_bytes() == new, what="renamed-into-place file")
    wait_equal(master, replica)
    assert d.stop() == 0


def test_replica_renamed_away_and_back(trees, tmp_path, daemons):
    """One replica disappears (like an unmounted disk): not recreated, the other replica goes on,
    and the returning one catches up."""
    master, replica = trees
    other = tmp_path / "other"
    d = daemons(tmp_path, master, replica, other).wait_ready()
    wait_equal(master, replica)
    wait_equal(master, other)
    away = tmp_path / "replica.away"
    os.rename(replica, away)
    write(master / "while-away.txt", "written while the replica was away\n")
    (master / "d0" / "f000.txt").unlink()
    wait_equal(master, other)
    d.wait_log("replica is gone")
    assert not replica.exists(), "a vanished replica must not be recreated (it could be an unmounted disk)"
    os.rename(away, replica)
    wait_equal(master, replica)
    d.wait_log("replica is back")
    assert d.proc.poll() is None
    assert d.stop() == 0
    d.assert_clean_log()


def test_restart_catches_up_changes_made_while_down(trees, tmp_path, daemons):
    master, replica = trees
    d = daemons(tmp_path, master, replica).wait_ready()
    wait_equal(master, replica)
    assert d.stop(signal.SIGINT) == 0  # Ctrl-C stops as cleanly as SIGTERM
    write(master / "offline.txt", "made while the daemon was down\n")
    shutil.rmtree(master / "d1")
    os.rename(master / "d2", master / "d2-moved")
    d2 = daemons(tmp_path, master, replica, name="watch2")
    wait_equal(master, replica)
    d2.wait_ready()
    write(master / "online-again.txt", "and events work again\n")
    wait_equal(master, replica)
    assert d2.stop() == 0


def test_sigterm_mid_transfer_leaves_no_temp(tmp_path, daemons):
    master, replica = tmp_path / "master", tmp_path / "replica"
    master.mkdir()
    write(master / "small.txt", "small\n")
    d = daemons(tmp_path, master, replica).wait_ready()
    wait_equal(master, replica)
    tmpdir = replica / ".dirsync" / "tmp"
    size = 64 << 20  # staging takes long enough to catch it
    with open(tmp_path / "huge.part", "wb") as f:
        for _ in range(size >> 24):
            f.write(os.urandom(16 << 20))
    os.rename(tmp_path / "huge.part", master / "huge.bin")  # appears whole: one version only
    wait_for(lambda: os.listdir(tmpdir), what="a temp file being staged", interval=0.001)
    rc = d.stop(signal.SIGTERM, timeout=60)
    assert rc == 0, d.stderr()
    assert not temps(replica), temps(replica)
    huge = replica / "huge.bin"
    assert not huge.exists() or huge.stat().st_size == size  # never a partial file at its name
    assert "stopped watching" in d.text()
    d.assert_clean_log()
    if huge.exists():
        return
    # A second signal does not wait for the current file: exit 130, still no temp left.
    d2 = daemons(tmp_path, master, replica, name="again")
    wait_for(lambda: os.listdir(tmpdir) or d2.proc.poll() is not None, what="staging again", interval=0.001)
    d2.proc.send_signal(signal.SIGTERM)  # two different signals: the same one twice could be coalesced
    d2.proc.send_signal(signal.SIGINT)
    rc = d2.stop(timeout=60)
    assert rc in (130, 0), d2.stderr()  # 0 only if staging had already finished
    assert not temps(replica), temps(replica)
    assert not huge.exists() or huge.stat().st_size == size


def test_second_watcher_of_a_pair_exits_locked(trees, tmp_path, daemons):
    master, replica = trees
    d = daemons(tmp_path, master, replica).wait_ready()
    second = daemons(tmp_path, master, replica, name="second")
    assert second.proc.wait(DEADLINE_S) == 3
    assert "locked" in second.stderr()
    # another pair with the same master is fine
    third = daemons(tmp_path, master, tmp_path / "elsewhere", name="third").wait_ready()
    assert third.stop() == 0
    assert d.stop() == 0


def test_replica_inside_master_is_refused(trees, tmp_path, daemons):
    master, _ = trees
    d = daemons(tmp_path, master, master / "sub-replica", name="inside")
    assert d.proc.wait(DEADLINE_S) == 12
    assert "overlaps the master" in d.stderr()
    assert not (master / "sub-replica").exists()


def test_own_log_file_inside_master_does_not_loop(trees, tmp_path, daemons):
    master, replica = trees
    d = daemons(tmp_path, master, replica, args=("--log-file", str(master / "watch.log")), name="inlog")
    log = master / "watch.log"
    wait_for(lambda: log.exists() and "watching " in log.read_text(), what="ready line in the log")
    write(master / "one.txt", "1\n")
    wait_for(lambda: (replica / "one.txt").exists(), what="one.txt on the replica")
    n = log.read_text().count("synced ")
    write(master / "two.txt", "2\n")  # a later, unrelated change: at most one more batch line
    wait_for(lambda: (replica / "two.txt").exists(), what="two.txt on the replica")
    wait_for(lambda: log.read_text().count("synced ") >= n + 1, what="batch line")
    assert log.read_text().count("synced ") <= n + 2, log.read_text()
    assert d.stop() == 0


def _have_remote() -> bool:
    try:
        import dirsync.transport.remote  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.ssh
@pytest.mark.skipif(not _have_remote(), reason="dirsync.transport.remote does not exist yet")
def test_ssh_replica_survives_sshd_stop_and_restart(tmp_path, daemons):
    """An SSH replica whose sshd is stopped and restarted: the local replica keeps syncing,
    the SSH one is retried with backoff and caught up."""
    try:
        from sshd import ALIAS, SshdUnavailable, start_sshd
    except ImportError:  # pragma: no cover
        from tests.sshd import ALIAS, SshdUnavailable, start_sshd
    try:
        info = start_sshd(tmp_path / "sshd")
    except (SshdUnavailable, OSError) as e:
        pytest.skip(f"no usable sshd: {e}")
    master, local, remote = tmp_path / "master", tmp_path / "local", tmp_path / "remote"
    master.mkdir()
    make_tree(master, 10)
    try:
        repo = str(Path(__file__).resolve().parent.parent)  # the agent runs this checkout
        remote_cmd = f"env PYTHONPATH={shlex.quote(repo)} {shlex.quote(sys.executable)} -m dirsync"
        d = daemons(tmp_path, master, local, f"{ALIAS}:{remote}",
                    args=("--ssh-config", info.ssh_config_path, "--remote-cmd", remote_cmd))
        d.wait_ready()
        wait_equal(master, remote)
        os.kill(info.pid, signal.SIGTERM)
        info._proc.wait(10)
        write(master / "while-down.txt", "sshd is down\n")
        wait_equal(master, local)
        d.wait_log("retrying in")
        restarted = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f",
                                      os.path.join(info.dir, "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_equal(master, remote, timeout=60)
            d.wait_log("replica is back")
            assert d.stop() == 0
        finally:
            restarted.terminate()
            restarted.wait(10)
    finally:
        if info._proc.poll() is None:
            info._proc.terminate()
            info._proc.wait(10)
