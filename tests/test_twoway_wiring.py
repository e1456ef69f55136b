"""Two-way sync wired into profiles (`dirsync run`), `dirsync status` and `dirsync watch --two-way`.

Real trees in tmp dirs and the real CLI in subprocesses; no mocks. Every wait polls a condition
with a deadline. The one negative check (a watcher that has settled starts no more runs) watches
the pair's status record over a bounded window and fails at the first new run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

try:  # pytest "prepend" import mode puts tests/ on sys.path
    import sshd as _sshd_plugin
    import treecmp
    from helpers import T0, File, WatchDaemon, build_tree, read, run_cli, wait_for, write
    from remote_helpers import ssh_cli_args, ssh_spec
except ImportError:  # pragma: no cover
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import T0, File, WatchDaemon, build_tree, read, run_cli, wait_for, write
    from tests.remote_helpers import ssh_cli_args, ssh_spec

from dirsync.status import load_twoway_record
from dirsync.twoway import conflict_name

pytest_plugins = [_sshd_plugin.__name__]  # the session-scoped `sshd` fixture

S = 1_000_000_000
DEADLINE_S = 30.0


def config(tmp_path, text: str) -> str:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return str(p)


def cli_json(*args, expect: int):
    cp = run_cli(*args)
    assert cp.returncode == expect, f"exit {cp.returncode}, expected {expect}\n{cp.stdout}\n{cp.stderr}"
    return json.loads(cp.stdout), cp


def put(p, data: bytes, mtime_s: int) -> None:
    write(p, data)
    os.utime(p, ns=(T0 + mtime_s * S, T0 + mtime_s * S))


def same(a, b, *ignore: str) -> None:
    treecmp.assert_trees_equal(a, b, ignore=(".dirsync", *ignore))


# -- profiles ------------------------------------------------------------------------------------


def test_profile_two_way_run_both_ways_conflict_and_profile_options(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"doc.txt": File(b"v0\n", mtime_ns=T0), "keep.txt": b"keep\n", "gone.txt": b"bye\n",
                   "old1.txt": b"1\n", "old2.txt": b"2\n", "skip.log": b"a's log\n"})
    cfg = config(tmp_path, '[profile.notes]\nmaster = "a"          # relative to this file\nreplicas = ["b"]\n'
                           'two_way = true\nexclude = ["*.log"]\nmax_delete = 1\n')
    first, _ = cli_json("run", "-c", cfg, "notes", "--json", expect=0)
    assert first["two_way"] is True and first["profile"] == "notes" and first["run_id"]
    assert first["a"] == str(a) and first["b"] == str(b)
    assert read(b / "doc.txt") == b"v0\n" and not (b / "skip.log").exists()  # the profile's exclude

    # Changes on both sides, a one-sided delete, and an edit/edit conflict (b's version is newer).
    write(a / "new-a.txt", b"from a\n")
    write(b / "new-b.txt", b"from b\n")
    os.unlink(b / "gone.txt")
    put(a / "doc.txt", b"edited on a\n", 100)
    put(b / "doc.txt", b"edited on b\n", 200)
    write(b / "local.log", b"b's own log\n")
    out, _ = cli_json("run", "-c", cfg, "notes", "--json", expect=4)
    assert out["decisions"]["conflicts"] == 1 and out["decisions"]["deleted_on_a"] == 1
    copy = conflict_name("doc.txt", T0 + 100 * S, "a")
    assert [c["copy"] for c in out["conflicts"]] == [copy]
    for side in (a, b):
        assert read(side / "doc.txt") == b"edited on b\n" and read(side / copy) == b"edited on a\n"
        assert read(side / "new-a.txt") == b"from a\n" and read(side / "new-b.txt") == b"from b\n"
        assert not (side / "gone.txt").exists()
    assert not (a / "local.log").exists() and read(a / "skip.log") == b"a's log\n"
    same(a, b, "skip.log", "local.log")

    # max_delete = 1 from the profile holds back two deletions (exit 25, nothing deleted on b);
    # the command line overrides it.
    os.unlink(a / "old1.txt")
    os.unlink(a / "old2.txt")
    cp = run_cli("run", "-c", cfg, "notes")
    assert cp.returncode == 25, cp.stderr
    assert (b / "old1.txt").exists() and (b / "old2.txt").exists()
    cp = run_cli("run", "-c", cfg, "notes", "--max-delete", "5")
    assert cp.returncode == 0, cp.stderr
    assert not (b / "old1.txt").exists() and not (b / "old2.txt").exists()
    same(a, b, "skip.log", "local.log")
    # a dry run shows the plan and changes nothing
    write(b / "later.txt", b"later\n")
    cp = run_cli("run", "-c", cfg, "notes", "--dry-run")
    assert cp.returncode == 0 and "later.txt" in cp.stdout, cp.stdout + cp.stderr
    assert not (a / "later.txt").exists()


def test_profile_prefer_settles_conflicts_and_the_flag_overrides_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"doc.txt": File(b"v0\n", mtime_ns=T0)})
    cfg = config(tmp_path, f'[profile.p]\nmaster = "{a}"\nreplicas = ["{b}"]\ntwo_way = true\nprefer = "newer"\n')
    assert run_cli("run", "-c", cfg, "p").returncode == 0
    put(a / "doc.txt", b"a1\n", 100)
    put(b / "doc.txt", b"b1\n", 200)
    assert run_cli("run", "-c", cfg, "p").returncode == 0  # settled without a copy: exit 0
    assert read(a / "doc.txt") == read(b / "doc.txt") == b"b1\n"
    put(a / "doc.txt", b"a2\n", 300)
    put(b / "doc.txt", b"b2\n", 400)
    cp = run_cli("run", "-c", cfg, "p", "--prefer", "a")
    assert cp.returncode == 0, cp.stderr
    assert read(a / "doc.txt") == read(b / "doc.txt") == b"a2\n"
    assert sorted(os.listdir(a)) == [".dirsync", "doc.txt"]


@pytest.mark.parametrize("text,expect", [
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\nprefer = "a"\n',
     r"config\.toml:4: profile 'a': 'prefer' only applies with two_way = true"),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\ntwo_way = false\nprefer = "newer"\n',
     r"config\.toml:5: profile 'a': 'prefer' only applies with two_way = true"),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r", "/s"]\ntwo_way = true\n',
     r"config\.toml:3: profile 'a': two_way = true takes exactly one replica .*, got 2"),
    ('[profile.a]\nmaster = "/m"\nreplicas = []\ntwo_way = true\n',
     r"config\.toml:3: profile 'a': bad value for 'replicas'"),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\ntwo_way = true\nprefer = "mine"\n',
     r"config\.toml:5: profile 'a': bad value for 'prefer': expected \"a\", \"b\" or \"newer\""),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\ntwo_way = "yes"\n',
     r"config\.toml:4: profile 'a': bad value for 'two_way': expected true or false"),
])
def test_two_way_profile_errors_are_one_line_exit_2_with_file_and_line(tmp_path, text, expect):
    cfg = config(tmp_path, text)
    for cmd in ("run", "status"):
        cp = run_cli(cmd, "-c", cfg, "a")
        assert cp.returncode == 2, (cmd, cp)
        assert cp.stdout == ""
        errors = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and re.search(expect, errors[0]), cp.stderr


def test_prefer_flag_on_a_one_way_profile_is_a_usage_error(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"f": b"f"})
    cfg = config(tmp_path, f'[profile.p]\nmaster = "{a}"\nreplicas = ["{b}"]\n')
    cp = run_cli("run", "-c", cfg, "p", "--prefer", "a")
    assert cp.returncode == 2 and "--prefer only applies to a two-way profile" in cp.stderr
    assert not b.exists()


# -- status --------------------------------------------------------------------------------------


def _pair_status(*args, expect: int) -> tuple[dict, dict]:
    out, _ = cli_json("status", "--json", *args, expect=expect)
    (grp,) = out["profiles"]
    (pair,) = grp["replicas"]
    return grp, pair


def test_status_shows_a_two_way_pair_after_a_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"doc.txt": File(b"v0\n", mtime_ns=T0), "x.txt": b"x\n"})
    cfg = config(tmp_path, f'[profile.notes]\nmaster = "{a}"\nreplicas = ["{b}"]\ntwo_way = true\n')
    grp, pair = _pair_status("-c", cfg, "notes", expect=1)  # never synced: b lacks everything
    assert grp["two_way"] is True and pair["two_way"] is True and pair["last_run"] is None
    assert pair["behind"] is True and pair["pending"]["b"]["writes"] == 2 and pair["pending"]["a"]["actions"] == 0

    assert run_cli("run", "-c", cfg, "notes").returncode == 0
    put(a / "doc.txt", b"a\n", 100)
    put(b / "doc.txt", b"b\n", 200)
    conflicted, _ = cli_json("run", "-c", cfg, "notes", "--json", expect=4)
    grp, pair = _pair_status("-c", cfg, "notes", expect=0)
    assert (grp["profile"], grp["two_way"], pair["a"], pair["b"]) == ("notes", True, str(a), str(b))
    last = pair["last_run"]
    assert last["run_id"] == conflicted["run_id"] and last["profile"] == "notes"
    assert (last["exit_code"], last["status"], last["conflicts"], last["conflict_copies"]) == (4, "conflicts", 1, 1)
    assert last["decisions"]["conflicts"] == 1 and last["files_written"] >= 2
    assert pair["last_success"] == last  # conflicts kept as copies: both sides ended equal
    assert pair["runs"] == 2 and pair["behind"] is False and pair["error"] is None
    text = run_cli("status", "-c", cfg, "notes")
    assert text.returncode == 0
    assert f"{a} ⇄ {b} (two-way): up to date" in text.stdout and "1 conflict copy(ies) kept" in text.stdout
    assert conflicted["run_id"] in text.stdout and "(two-way)" in text.stdout.splitlines()[0]

    # behind: a change on b; the MASTER REPLICA form finds the two-way record (either order)
    write(b / "new-b.txt", b"new\n")
    _, pair = _pair_status(str(b), str(a), expect=1)
    assert pair["two_way"] is True and pair["behind"] is True
    assert pair["pending"]["a_to_b"] == 1 and pair["pending"]["b"]["writes"] == 1  # as b ⇄ a: "b" is dir a
    assert pair["last_run"]["run_id"] == conflicted["run_id"]
    assert "BEHIND" in run_cli("status", "-c", cfg, "notes").stdout

    # a dry run is not recorded; a plain `sync --two-way` is, without a profile
    assert run_cli("plan", "--two-way", a, b).returncode == 0
    assert load_twoway_record(str(a), str(b))["runs"] == 2
    synced, _ = cli_json("sync", "--two-way", "--json", a, b, expect=0)
    _, pair = _pair_status("--no-check", str(a), str(b), expect=0)
    assert pair["last_run"]["run_id"] == synced["run_id"] and pair["last_run"]["profile"] is None
    assert pair["runs"] == 3 and pair["behind"] is None


def test_status_records_a_refused_two_way_run_and_one_way_pairs_say_so(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"x": b"x"})
    build_tree(b, {"y": b"y"})  # two non-empty trees never synced: --init needed
    cp = run_cli("sync", "--two-way", a, b)
    assert cp.returncode == 12, cp.stderr
    _, pair = _pair_status("--two-way", "--no-check", str(a), str(b), expect=0)
    assert pair["last_success"] is None and pair["last_run"]["exit_code"] == 12
    assert "never synced" in pair["last_run"]["error"] and pair["last_run"]["status"] == "refused"
    text = run_cli("status", "--two-way", "--no-check", a, b).stdout
    assert "never synced successfully" in text and "exited 12" in text
    # a one-way pair is marked as such
    c = tmp_path / "c"
    assert run_cli("sync", a, c).returncode == 0
    grp, pair = _pair_status(str(a), str(c), expect=0)
    assert grp["two_way"] is False and pair["two_way"] is False and pair["last_success"]["exit_code"] == 0


# -- watch --two-way -----------------------------------------------------------------------------


def Daemon(tmp_path, *args, name: str = "watch") -> WatchDaemon:
    """`dirsync watch ARGS...` (e.g. --two-way A B; see helpers.WatchDaemon)."""
    return WatchDaemon(tmp_path, *args, name=name, deadline=DEADLINE_S)


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


def wait_same(a, b, timeout: float = DEADLINE_S) -> None:
    def ok():
        try:
            same(a, b)
            return True
        except (AssertionError, OSError):  # OSError: a tree changed under the walk (mid-sync)
            return False

    try:
        wait_for(ok, timeout, 0.02, "both sides equal")
    except AssertionError:
        same(a, b)  # fails with the differences
        raise


def runs(a, b) -> int:
    rec = load_twoway_record(str(a), str(b))
    return rec["runs"] if rec else 0


def settle(a, b, quiet_s: float = 1.0, timeout: float = DEADLINE_S) -> int:
    """The run count once no run has been recorded for quiet_s (a watcher that loops never gets there)."""
    state = {"n": runs(a, b), "since": time.monotonic()}

    def quiet():
        n = runs(a, b)
        if n != state["n"]:
            state["n"], state["since"] = n, time.monotonic()
            return None
        return time.monotonic() - state["since"] >= quiet_s

    wait_for(quiet, timeout, 0.02, f"no new two-way run for {quiet_s}s")
    return state["n"]


def assert_no_run_for(a, b, n: int, window_s: float) -> None:
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        assert runs(a, b) == n, f"a settled watcher ran again ({runs(a, b)} runs, was {n})"
        time.sleep(0.02)


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"doc.txt": File(b"v0\n", mtime_ns=T0), "sub": {"deep": {"f.txt": b"deep\n"}}, "top.txt": b"t\n"})
    return a, b


@pytest.mark.watch
def test_watch_two_way_syncs_both_ways_settles_and_keeps_running_through_a_conflict(pair, tmp_path, daemons):
    a, b = pair
    d = daemons(tmp_path, "--two-way", a, b)
    d.wait_log("watching ")
    wait_same(a, b)
    assert "two-way" in d.text()

    # an edit on a reaches b, an edit on b reaches a
    n0 = settle(a, b)
    write(a / "sub" / "deep" / "f.txt", b"edited on a\n")
    (a / "sub" / "new-dir").mkdir()
    write(a / "sub" / "new-dir" / "n.txt", b"new dir on a\n")
    wait_for(lambda: (b / "sub" / "new-dir" / "n.txt").exists()
             and read(b / "sub" / "deep" / "f.txt") == b"edited on a\n", DEADLINE_S, 0.01, "a's edit on b")
    n1 = settle(a, b)
    # our own writes on b cause one follow-up run that finds nothing to do, never more
    assert 2 <= n1 - n0 <= 4, (n0, n1)
    write(b / "from-b.txt", b"from b\n")
    os.unlink(b / "top.txt")
    wait_for(lambda: (a / "from-b.txt").exists() and not (a / "top.txt").exists(), DEADLINE_S, 0.01,
             "b's edit on a")
    wait_same(a, b)
    n2 = settle(a, b)
    assert_no_run_for(a, b, n2, 3.0)  # ~60 debounce periods: a loop would show

    # a conflict: both sides change while the daemon is stopped (events wait in the kernel)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        put(a / "doc.txt", b"conflict a\n", 100)
        put(b / "doc.txt", b"conflict b\n", 200)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    copy = conflict_name("doc.txt", T0 + 100 * S, "a")
    wait_for(lambda: (b / copy).exists() and (a / copy).exists(), DEADLINE_S, 0.01, "conflict copies")
    wait_same(a, b)
    assert read(a / "doc.txt") == b"conflict b\n" and read(b / copy) == b"conflict a\n"
    d.wait_log("warning conflict: doc.txt")
    d.wait_log("exit 4")  # written after the warning line: wait for it, do not race it
    n3 = settle(a, b)
    assert_no_run_for(a, b, n3, 1.0)
    assert d.proc.poll() is None  # conflicts do not stop the daemon
    write(a / "after.txt", b"still watching\n")
    wait_for(lambda: (b / "after.txt").exists(), DEADLINE_S, 0.01, "a change after the conflict")

    assert d.stop() == 0
    assert "stopped watching" in d.text() and "Traceback" not in d.stderr()
    assert "error" not in d.text(), d.text()


@pytest.mark.watch
def test_watch_two_way_locks_sigterm_mid_run_and_restart(pair, tmp_path, daemons):
    a, b = pair
    d = daemons(tmp_path, "--two-way", a, b)
    d.wait_log("watching ")
    # one watcher per pair, whichever order or direction
    for i, args in enumerate((("--two-way", b, a), (a, b))):
        other = daemons(tmp_path, *args, name=f"second{i}")
        assert other.proc.wait(DEADLINE_S) == 3, other.stderr()
        assert "locked" in other.stderr()
    # SIGTERM while a large file is being staged on b: exit 0, no temp left, never a partial file
    size = 48 << 20
    with open(tmp_path / "big.part", "wb") as f:
        for _ in range(size >> 24):
            f.write(os.urandom(16 << 20))
    os.rename(tmp_path / "big.part", a / "big.bin")  # appears whole
    staging = b / ".dirsync" / "tmp"
    wait_for(lambda: (staging.exists() and os.listdir(staging)) or (b / "big.bin").exists(), DEADLINE_S, 0.001,
             "big.bin being staged on b")
    assert d.stop(signal.SIGTERM, timeout=60) == 0, d.stderr()
    assert "stopped watching" in d.text() and "Traceback" not in d.stderr()
    assert (os.listdir(staging) if staging.exists() else []) == []
    assert not any(n.startswith(".dirsync-tmp-") for n in os.listdir(b))
    assert not (b / "big.bin").exists() or (b / "big.bin").stat().st_size == size
    # the locks are released: a new watcher starts and finishes the job
    d2 = daemons(tmp_path, "--two-way", a, b, name="again")
    d2.wait_log("watching ")
    wait_same(a, b)
    assert d2.stop() == 0


@pytest.mark.watch
def test_watch_two_way_interval_runs_periodically_and_is_two_way_only(pair, tmp_path, daemons):
    a, b = pair
    d = daemons(tmp_path, "--two-way", "--interval", "0.3", a, b)
    d.wait_log("a run every 0.3s")
    n = runs(a, b)
    wait_for(lambda: runs(a, b) >= n + 3, DEADLINE_S, 0.02, "three periodic runs while idle")
    assert d.stop() == 0
    one_way = daemons(tmp_path, "--interval", "5", a, tmp_path / "c", name="oneway")
    assert one_way.proc.wait(DEADLINE_S) == 2
    assert "--interval only applies with --two-way" in one_way.stderr()


@pytest.mark.watch
@pytest.mark.ssh
def test_watch_two_way_with_a_remote_side_polls_it_every_interval(pair, tmp_path, daemons, sshd):
    """A remote side raises no events here: its changes arrive with the --interval runs; the
    local side's changes still go out on events."""
    a, b = pair
    spec_b = ssh_spec(sshd, b)
    d = daemons(tmp_path, "--two-way", "--interval", "0.5", *ssh_cli_args(sshd), a, spec_b)
    d.wait_log("watching ")
    wait_same(a, b)
    n = runs(a, spec_b)  # let the follow-up of the initial run pass: later runs are periodic ones
    wait_for(lambda: runs(a, spec_b) >= n + 2, DEADLINE_S, 0.02, "two more runs")
    write(b / "made-remotely.txt", b"on the far side\n")
    wait_for(lambda: (a / "made-remotely.txt").exists(), DEADLINE_S, 0.02, "the remote side's file on a")
    write(a / "made-locally.txt", b"here\n")
    wait_for(lambda: (b / "made-locally.txt").exists(), DEADLINE_S, 0.02, "the local side's file on b")
    wait_same(a, b)
    rec = load_twoway_record(str(a), spec_b)
    assert rec["b"] == spec_b and rec["last_success"] is not None
    assert d.stop() == 0
    assert "stopped watching" in d.text() and "Traceback" not in d.stderr()
