"""Fan-out: local replicas synced at the same time, each by a forked worker (dirsync/fanout.py).

End to end through the CLI on real trees: every replica converges, the summary and the lines
on stderr come in the order the replicas were given, each replica's turn ran in its own process
(the pid its status record holds) unless --jobs 1, one replica failing leaves the others alone,
and SIGTERM stops the workers (no temp left, the next run converges). The worker machinery
itself (run_turns) with real forks: turns run at once, what a worker says reaches the parent
in order, a worker killed by a signal fails only its own replica.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

try:
    import treecmp
    from helpers import build_tree, popen_cli, random_bytes, run_cli, stray_temps, sync_json, wait_for, write
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import build_tree, popen_cli, random_bytes, run_cli, stray_temps, sync_json, wait_for, write

from dirsync.apply import ReplicaSummary
from dirsync.fanout import WorkerReporter, run_turns
from dirsync.progress import Reporter
from dirsync.status import load_record

TREE = {
    "docs": {"a.txt": b"alpha\n" * 100, "b.txt": b"beta\n" * 50},
    "src": {"deep": {"x.bin": random_bytes(300_000, 1)}, "y.py": b"print('y')\n"},
    "top.txt": b"top\n",
}


def _record_pid(m, r) -> int:
    rec = load_record(os.path.realpath(m), os.path.abspath(r))
    assert rec is not None, f"no status record for {r}"
    return rec["last_run"]["pid"]


def _run(*args) -> tuple[int, subprocess.CompletedProcess]:
    """`dirsync ARGS` to completion; (its pid, the result)."""
    p = popen_cli(*args)
    out, err = p.communicate(timeout=120)
    return p.pid, subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def test_each_replica_is_synced_by_its_own_worker_and_all_converge(tmp_path):
    m = tmp_path / "m"
    build_tree(m, TREE)
    rs = [tmp_path / f"r{i}" for i in range(3)]
    pid, cp = _run("sync", "--json", m, *rs)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    assert [x["replica"] for x in out["replicas"]] == [str(r) for r in rs]
    assert [(x["status"], x["files_written"]) for x in out["replicas"]] == [("ok", 5)] * 3
    for r in rs:
        treecmp.assert_trees_equal(m, r)
        assert stray_temps(r) == []
    pids = [_record_pid(m, r) for r in rs]
    assert len(set(pids)) == 3 and pid not in pids, pids  # three workers, none of them the run itself

    write(m / "docs/a.txt", b"changed\n")
    write(m / "new.txt", b"new\n")
    _, out = sync_json(m, *rs)
    assert [x["files_written"] for x in out["replicas"]] == [2, 2, 2]
    for r in rs:
        treecmp.assert_trees_equal(m, r)

    write(m / "docs/b.txt", b"one at a time\n")
    pid, cp = _run("sync", "--jobs", "1", m, *rs)
    assert cp.returncode == 0, cp.stderr
    assert [_record_pid(m, r) for r in rs] == [pid] * 3  # --jobs 1: the run itself, one after another
    for r in rs:
        treecmp.assert_trees_equal(m, r)


def test_one_failing_replica_leaves_the_others_synced_and_lines_stay_in_replica_order(tmp_path):
    m = tmp_path / "m"
    build_tree(m, TREE)
    rs = [tmp_path / f"r{i}" for i in range(3)]
    sync_json(m, *rs)
    write(m / "c.txt", b"c\n")
    for r in rs[1:]:  # a directory where the master has a file, kept by -x: c.txt cannot be written
        os.makedirs(r / "c.txt")
        write(r / "c.txt" / "keep.tmp", b"keep\n")
    cp, out = sync_json(m, *rs, args=("-x", "*.tmp", "-v"), expect=23)
    assert [x["status"] for x in out["replicas"]] == ["ok", "partial", "partial"]
    assert out["replicas"][0]["files_written"] == 1
    treecmp.assert_trees_equal(m, rs[0])
    errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
    named = [next(i for i, r in enumerate(rs) if ln.startswith(f"error: {r}: ")) for ln in errs]
    assert named and named == sorted(named) and set(named) == {1, 2}, cp.stderr  # r1's lines, then r2's
    infos = [ln for ln in cp.stderr.splitlines() if " written, " in ln]  # (-v) one line a replica, in order
    assert [ln.split(":")[0] for ln in infos] == [str(r) for r in rs], cp.stderr


def test_sigterm_stops_every_worker_and_the_next_run_converges(tmp_path):
    m = tmp_path / "m"
    build_tree(m, {f"f{i}.bin": random_bytes(400_000, i) for i in range(10)})  # 4 MB at 1 MB/s a replica
    rs = [tmp_path / f"r{i}" for i in range(3)]
    p = popen_cli("sync", "--bwlimit", "1M", m, *rs)
    try:
        wait_for(lambda: all(r.exists() and any(os.scandir(r)) and len(os.listdir(r)) > 2 for r in rs),
                 timeout=60, what="every replica being written")
        os.kill(p.pid, signal.SIGTERM)  # the run only, not its group: it must stop its workers itself
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert b"Traceback" not in err, err
    # The workers stopped too: unthrottled, they would have finished their 4 s of copying.
    assert any(len([e for e in os.listdir(r) if e.startswith("f")]) < 10 for r in rs)
    for r in rs:
        assert stray_temps(r) == []
    cp = run_cli("sync", m, *rs)  # no lock left behind, nothing half-written taken as done
    assert cp.returncode == 0, cp.stderr
    for r in rs:
        treecmp.assert_trees_equal(m, r)


# -- the worker machinery --------------------------------------------------------------


class _Opened:
    """What the parent hands to a worker (an early-opened replica): forget() when it is done."""

    def __init__(self) -> None:
        self.forgotten = False

    def forget(self) -> None:
        self.forgotten = True


class _Recorder(Reporter):
    def __init__(self) -> None:
        super().__init__(quiet=False)
        self.calls: list[tuple] = []

    def _print(self, line: str) -> None:
        self.calls.append(("line", line))

    def begin(self, label: str, total: int) -> None:
        self.calls.append(("begin", total))

    def grow(self, n: int) -> None:
        self.calls.append(("grow", n))

    def advance(self, n: int) -> None:
        self.calls.append(("advance", n))

    def end(self) -> None:
        self.calls.append(("end",))


def test_turns_run_at_once_and_what_workers_say_reaches_the_parent_in_order(tmp_path):
    flag = tmp_path / "b-started"

    def turn(spec: str, opened: dict, rep: Reporter) -> ReplicaSummary:
        assert isinstance(rep, WorkerReporter) and list(opened) == [spec]
        rep.warn(f"{spec} one")
        if spec == "a":  # only possible while b's worker runs too
            wait_for(flag.exists, timeout=30, what="b's worker")
        else:
            flag.touch()
        rep.begin(spec, 3 << 20)
        rep.advance(1 << 20)
        rep.advance(2 << 20)
        rep.end()
        rep.error(f"{spec} two")
        return ReplicaSummary(replica=spec, files_written=len(spec), warnings=[f"w-{spec}"])

    early = {"a": _Opened(), "b": _Opened(), "later": _Opened()}
    opened = dict(early)
    rec = _Recorder()
    done = run_turns(["a", "b"], turn, early, rec, jobs=2)
    assert set(done) == {"a", "b"} and list(early) == ["later"]  # the rest stays for the caller
    assert opened["a"].forgotten and opened["b"].forgotten and not opened["later"].forgotten
    for spec in ("a", "b"):
        summary, said = done[spec]
        assert summary.status == "ok" and summary.files_written == len(spec) and summary.warnings == [f"w-{spec}"]
        assert said == [("warn", (f"{spec} one",)), ("error", (f"{spec} two",))]
    begins = [c for c in rec.calls if c[0] in ("begin", "grow")]
    assert begins[0][0] == "begin" and sum(c[1] for c in begins) == 6 << 20
    assert sum(c[1] for c in rec.calls if c[0] == "advance") == 6 << 20
    assert rec.calls[-1] == ("end",) and not any(c[0] == "line" for c in rec.calls)  # the parent says it later


def test_a_worker_killed_by_a_signal_fails_its_replica_only():
    def turn(spec: str, opened: dict, rep: Reporter) -> ReplicaSummary:
        if spec == "dies":
            os.kill(os.getpid(), signal.SIGKILL)
        return ReplicaSummary(replica=spec, files_written=7)

    early = {s: _Opened() for s in ("one", "dies", "two")}
    opened = dict(early)
    done = run_turns(["one", "dies", "two"], turn, early, Reporter(quiet=True), jobs=3)
    assert [done[s][0].files_written for s in ("one", "two")] == [7, 7]
    summary, said = done["dies"]
    assert summary.status == "failed" and summary.exit_code == 1 and "killed by signal 9" in summary.fatal
    assert said[0][0] == "fatal" and said[0][1][0].startswith("dies: ")
    assert all(o.forgotten for o in opened.values())


def test_a_locked_replica_and_an_unreachable_one_fail_alone(tmp_path):
    """One replica's pair lock is held by another run (exit 3) and one is a remote that refuses
    the connection (exit 10): the two others are synced by their workers, and the run's exit
    code is the most serious one; once the lock is free, the next run brings the rest along."""
    from dirsync.state import FileLock, pair_lock_path

    m = tmp_path / "m"
    build_tree(m, TREE)
    rs = [tmp_path / f"r{i}" for i in range(3)]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = f"127.0.0.1:{tmp_path / 'far'}"
    held = FileLock(pair_lock_path(os.path.realpath(m), os.path.abspath(rs[1])), "held by the test").acquire()
    try:
        cp, out = sync_json(m, rs[0], rs[1], unreachable, rs[2], args=("-p", str(port)), expect=None)
    finally:
        held.release()
    assert cp.returncode == 10, cp.stderr  # CONNECT outranks LOCKED
    assert [x["exit_code"] for x in out["replicas"]] == [0, 3, 10, 0]
    for r in (rs[0], rs[2]):
        treecmp.assert_trees_equal(m, r)
    assert not rs[1].exists() or not any(e.name != ".dirsync" for e in os.scandir(rs[1]))
    _, out = sync_json(m, *rs)
    for r in rs:
        treecmp.assert_trees_equal(m, r)
