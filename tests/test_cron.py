"""Issue 5, "built for cron and scripts": locking, exit codes, JSON, profiles, verify, backups,
bandwidth limit, status, quiet output and log files.

Real trees, real `python -m dirsync` processes and real signals; no mocks. Every wait has a
deadline. Each test gets private XDG_STATE_HOME / XDG_CONFIG_HOME directories.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:  # pytest "prepend" import mode puts tests/ on sys.path ...
    import treecmp
    from helpers import settle
except ImportError:  # ... unless tests/ is a package
    from tests import treecmp
    from tests.helpers import settle

MiB = 1 << 20
STAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{6}Z(-\d+)?")


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path):
    """Environment for CLI children: private state and config homes, no terminal."""
    e = dict(os.environ)
    e["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    e["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    e.pop("DIRSYNC_CONFIG", None)
    return e


def _default_sigint():
    # A child started from a shell without job control may inherit SIGINT ignored; Python then
    # never installs its KeyboardInterrupt handler. Reset it so the SIGINT test is meaningful.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(env, *args, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dirsync", *map(str, args)], env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def start(env, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dirsync", *map(str, args)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def finish(p: subprocess.Popen, timeout=60) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_for(pred, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def write(path, data: bytes | str, mtime_ns: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def lock_holder_pids(env) -> list[int]:
    """pids written in the pair lock files of this test's state dir."""
    pids = []
    for p in glob.glob(os.path.join(env["XDG_STATE_HOME"], "dirsync", "locks", "*.lock")):
        try:
            txt = read(p).decode().strip()
        except OSError:
            continue
        if txt:
            pids.append(int(txt))
    return pids


def temps(replica) -> list[str]:
    d = os.path.join(replica, ".dirsync", "tmp")
    return os.listdir(d) if os.path.isdir(d) else []


def big_master(tmp_path, size=16 * MiB):
    m = tmp_path / "m"
    write(m / "small.txt", "small\n")
    write(m / "big.bin", os.urandom(size))
    return m


def assert_equal_trees(master, replica, ignore=(".dirsync",)):
    treecmp.assert_trees_equal(master, replica, ignore=ignore)


# -- locking ---------------------------------------------------------------------------


def test_second_run_exits_3_naming_the_holder_and_sigkill_releases_the_lock(tmp_path, env):
    m, r = big_master(tmp_path), tmp_path / "r"
    holder = start(env, "sync", "--bwlimit", "1M", m, r)  # 16 MiB at 1 MiB/s: ~16 s
    try:
        wait_for(lambda: holder.pid in lock_holder_pids(env) or holder.poll() is not None, 20, "the holder's lock")
        assert holder.poll() is None, holder.communicate()
        t0 = time.monotonic()
        second = cli(env, "sync", m, r)
        assert second.returncode == 3, second
        assert time.monotonic() - t0 < 10  # at once, not after the holder
        assert f"pid {holder.pid}" in second.stderr
        assert "locked" in second.stderr
        assert second.stdout == ""
        st = cli(env, "status", "--json", "--no-check", m, r)  # status only reads the lock file
        assert json.loads(st.stdout)["profiles"][0]["replicas"][0]["running_pid"] == holder.pid
        # The holder dies without any cleanup: the kernel drops both flocks.
        holder.send_signal(signal.SIGKILL)
        assert finish(holder)[0] == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    third = cli(env, "sync", m, r)
    assert third.returncode == 0, third
    assert_equal_trees(m, r)
    assert temps(r) == []  # the killed run's temp was cleaned up by the next run


def test_wait_waits_for_the_holder_and_gives_up_after_its_deadline(tmp_path, env):
    m, r = big_master(tmp_path, 5 * MiB), tmp_path / "r"
    holder = start(env, "sync", "--bwlimit", "1M", m, r)  # ~5 s
    try:
        wait_for(lambda: holder.pid in lock_holder_pids(env) or holder.poll() is not None, 20, "the holder's lock")
        assert holder.poll() is None
        t0 = time.monotonic()
        short = cli(env, "sync", "--wait", "1", m, r)
        assert short.returncode == 3, short
        assert 0.9 <= time.monotonic() - t0 < 4.5
        assert f"pid {holder.pid}" in short.stderr
        waiter = cli(env, "sync", "--wait", "60", "--json", m, r)
        assert waiter.returncode == 0, waiter
        # It ran after the holder had finished: nothing was left to write.
        assert json.loads(waiter.stdout)["replicas"][0]["files_written"] == 0
        assert finish(holder)[0] == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert_equal_trees(m, r)


# -- exit codes ------------------------------------------------------------------------


def test_exit_0_for_a_sync_and_for_nothing_to_do(tmp_path, env):
    m = tmp_path / "m"
    write(m / "a.txt", "a")
    r = tmp_path / "r"
    assert cli(env, "sync", m, r).returncode == 0
    again = cli(env, "sync", "--json", m, r)
    assert again.returncode == 0
    s = json.loads(again.stdout)["replicas"][0]
    assert (s["files_written"], s["files_deleted"], s["bytes_sent"]) == (0, 0, 0)


@pytest.mark.parametrize("args", [
    ["sync", "--no-such-option", "{m}", "{r}"],
    ["sync", "--bwlimit", "fast", "{m}", "{r}"],
    ["sync", "--backup-keep", "0", "--backup-dir", "b", "{m}", "{r}"],
    ["sync", "{m}"],  # no replica
    ["sync", "{m}", "{tmp}/no/such/parent/r"],  # replica parent missing: a configuration error
    ["sync", "--backup-dir", "{m}/bak", "{m}", "{r}"],  # backups would land inside the master
    ["run", "nosuchprofile"],  # no config file
])
def test_exit_2_for_bad_options_and_configuration(tmp_path, env, args):
    m = tmp_path / "m"
    write(m / "a.txt", "a")
    res = cli(env, *[a.format(m=m, r=tmp_path / "r", tmp=tmp_path) for a in args])
    assert res.returncode == 2, res
    assert res.stderr.strip()
    assert not os.path.exists(tmp_path / "r" / "a.txt")


def test_exit_12_when_a_safety_guard_refuses(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "a")
    write(r / "precious.txt", "never synced by dirsync")
    res = cli(env, "sync", m, r)
    assert res.returncode == 12, res
    assert "--init" in res.stderr
    assert read(r / "precious.txt") == b"never synced by dirsync"
    missing = cli(env, "sync", tmp_path / "no-master", tmp_path / "r2")
    assert missing.returncode == 12, missing
    assert not os.path.exists(tmp_path / "r2")


def _partial_setup(tmp_path, env):
    """A replica where one item cannot be written: a directory holding an excluded file sits
    where the master now has a plain file (root can write anywhere, so no chmod tricks)."""
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "x" / "inner.txt", "inner")
    write(m / "ok.txt", "ok v1")
    assert cli(env, "sync", m, r).returncode == 0
    write(r / "x" / "keep.tmp", "excluded, so dirsync may not delete it")
    os.remove(m / "x" / "inner.txt")
    os.rmdir(m / "x")
    write(m / "x", "now a file")
    write(m / "ok.txt", "ok v2 (longer)")
    return m, r


def test_exit_23_when_some_items_fail_and_the_rest_sync(tmp_path, env):
    m, r = _partial_setup(tmp_path, env)
    res = cli(env, "sync", "--exclude", "*.tmp", m, r)
    assert res.returncode == 23, res
    assert "x" in res.stderr
    assert read(r / "ok.txt") == b"ok v2 (longer)"  # the rest synced
    assert os.path.isdir(r / "x")


def test_exit_25_when_the_delete_limit_trips_and_nothing_is_deleted(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    for i in range(4):
        write(m / f"f{i}.txt", str(i))
    assert cli(env, "sync", m, r).returncode == 0
    os.remove(m / "f0.txt")
    os.remove(m / "f1.txt")
    write(m / "new.txt", "new")
    res = cli(env, "sync", "--max-delete", "1", m, r)
    assert res.returncode == 25, res
    assert os.path.exists(r / "f0.txt") and os.path.exists(r / "f1.txt")
    assert read(r / "new.txt") == b"new"  # the rest of the plan was applied


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_exit_130_when_interrupted_mid_file(tmp_path, env, sig):
    m, r = big_master(tmp_path), tmp_path / "r"
    p = start(env, "sync", "--bwlimit", "1M", m, r)
    try:
        wait_for(lambda: temps(r) or p.poll() is not None, 20, "the big file to be in flight")
        assert p.poll() is None, p.communicate()
        time.sleep(0.3)
        p.send_signal(sig)
        rc, out, err = finish(p, 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert rc == 130, (rc, err)
    assert "interrupted" in err
    assert not os.path.exists(r / "big.bin")  # nothing half-written at a final name
    assert temps(r) == []  # and no temp left behind
    assert lock_holder_pids(env) == []  # lock file emptied on the way out
    assert cli(env, "sync", m, r).returncode == 0
    assert_equal_trees(m, r)


# -- JSON, quiet, log file ------------------------------------------------------------------

NUM = (int, float)
TOP = {"master": str, "run_id": str, "exit_code": int, "seconds": NUM, "master_scan": dict, "replicas": list}
SCAN = {"files_hashed": int, "bytes_hashed": int, "errors": list, "warnings": list}
REPLICA = {"replica": str, "status": str, "exit_code": int, "files_written": int, "bytes_sent": int,
           "bytes_reused": int, "files_deleted": int, "dirs_created": int, "links_made": int, "metadata_set": int,
           "errors": list, "warnings": list, "fatal": (str, type(None)), "seconds": NUM, "planned": bool}
ERROR = {"path": str, "op": str, "code": str, "message": str}


def _check(obj: dict, schema: dict, where: str) -> None:
    missing = set(schema) - set(obj)
    assert not missing, f"{where}: missing keys {missing}"
    for k, t in schema.items():
        assert isinstance(obj[k], t) and not (t is int and isinstance(obj[k], bool)), \
            f"{where}.{k}: {obj[k]!r} is not {t}"


def test_json_summary_schema(tmp_path, env):
    m, r = _partial_setup(tmp_path, env)
    r2 = tmp_path / "r2"
    res = cli(env, "sync", "--json", "--exclude", "*.tmp", m, r, r2)
    assert res.returncode == 23
    out = json.loads(res.stdout)  # stdout holds exactly one JSON object
    _check(out, TOP, "summary")
    _check(out["master_scan"], SCAN, "master_scan")
    assert out["exit_code"] == 23 and len(out["replicas"]) == 2
    for rep in out["replicas"]:
        _check(rep, REPLICA, "replica")
        assert rep["status"] in ("ok", "partial", "failed", "refused", "dry-run")
        for e in rep["errors"]:
            _check(e, ERROR, "error")
        assert all(isinstance(w, str) for w in rep["warnings"])
    bad, good = out["replicas"]
    assert (bad["replica"], bad["status"], bad["exit_code"]) == (str(r), "partial", 23)
    assert any(e["path"] == "x" for e in bad["errors"])
    assert (good["status"], good["exit_code"], good["errors"]) == ("ok", 0, [])
    assert good["files_written"] == 2 and good["bytes_sent"] == len("now a file") + len("ok v2 (longer)")
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", out["run_id"])


def test_quiet_by_default_when_not_on_a_terminal(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    for i in range(20):
        write(m / "d" / f"f{i}", os.urandom(3000))
    first = cli(env, "sync", m, r)
    assert (first.returncode, first.stdout, first.stderr) == (0, "", "")
    write(m / "d" / "f3", "changed")
    os.remove(m / "d" / "f4")
    second = cli(env, "sync", m, r)
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    # problems still reach cron mail
    os.remove(m / "d" / "f5")
    third = cli(env, "sync", "--max-delete", "0", m, r)
    assert third.returncode == 25 and third.stdout == "" and "deletions planned" in third.stderr
    # -v asks for the summary line anyway
    verbose = cli(env, "sync", "-v", "--max-delete", "5", m, r)
    assert verbose.returncode == 0 and "deleted" in verbose.stderr


LOG_LINE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{4} (info|warning|error) .+")


def test_log_file_gets_timestamped_lines_and_is_appended(tmp_path, env):
    m, r, log = tmp_path / "m", tmp_path / "r", tmp_path / "logs" / "dirsync.log"
    os.makedirs(log.parent)
    write(m / "a.txt", "a")
    res = cli(env, "sync", "--log-file", log, m, r)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")  # logged, not printed
    lines = read(log).decode().splitlines()
    assert lines and all(LOG_LINE.fullmatch(line) for line in lines), lines
    assert any(" info " in line and "1 written" in line for line in lines)
    refused = cli(env, "sync", "--log-file", log, tmp_path / "nope", r)
    assert refused.returncode == 12
    more = read(log).decode().splitlines()
    assert more[:len(lines)] == lines  # appended, not truncated
    assert any(" error " in line and "does not exist" in line for line in more[len(lines):])


# -- profiles ----------------------------------------------------------------------------


def _config(env, text: str) -> str:
    d = os.path.join(env["XDG_CONFIG_HOME"], "dirsync")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "config.toml")
    write(p, text)
    return p


def test_run_profile_from_xdg_config_and_flags_override(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "keep.txt", "keep")
    write(m / "noise.log", "log")
    _config(env, f"""
# relative paths are relative to this file's directory
[profile.site]
master = "{os.path.relpath(m, os.path.join(env['XDG_CONFIG_HOME'], 'dirsync'))}"
replicas = ["{r}"]
exclude = ["*.log"]
delete = false
""")
    res = cli(env, "run", "site", cwd="/")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert read(r / "keep.txt") == b"keep" and not os.path.exists(r / "noise.log")
    write(r / "stray.txt", "the master lacks this")
    assert cli(env, "run", "site").returncode == 0
    assert os.path.exists(r / "stray.txt")  # delete = false
    res = cli(env, "run", "site", "--delete", "--json")
    assert res.returncode == 0
    out = json.loads(res.stdout)
    assert out["profile"] == "site" and out["replicas"][0]["files_deleted"] == 1
    assert not os.path.exists(r / "stray.txt")  # the flag won
    write(m / "extra.tmp", "x")
    assert cli(env, "run", "site", "-x", "*.tmp").returncode == 0  # added to the profile's excludes
    assert not os.path.exists(r / "extra.tmp") and not os.path.exists(r / "noise.log")


def test_run_with_explicit_config_file_and_options(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "v1")
    cfg = tmp_path / "elsewhere.toml"
    write(cfg, f"""
[profile.nightly]
master = "{m}"
replicas = ["{r}"]
backup_dir = ".old"
backup_keep = 3
bwlimit = "100M"
wait = 5
log_file = "nightly.log"
""")
    assert cli(env, "run", "--config", cfg, "nightly").returncode == 0
    write(m / "a.txt", "v2!")
    assert cli(env, "run", "-c", cfg, "nightly").returncode == 0
    (stamp,) = os.listdir(r / ".old")
    assert read(r / ".old" / stamp / "a.txt") == b"v1"
    assert read(tmp_path / "nightly.log")  # relative to the config file
    # the default config file does not exist: a clear exit 2
    res = cli(env, "run", "nightly")
    assert res.returncode == 2 and "config.toml does not exist" in res.stderr


@pytest.mark.parametrize("text,expect", [
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"\ndelete = true\n', r"config\.toml:4:\d+: invalid TOML"),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\nmaster = "/n"\n', r"config\.toml:4:\d+: invalid TOML"),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\n\n[profile.b]\nmaster = "/m"\nreplica = "/r"\n',
     r"config\.toml:7: profile 'b': unknown key 'replica'"),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\nbwlimit = "fast"\n',
     r"config\.toml:4: profile 'a': bad value for 'bwlimit'"),
    ('[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\nmax_delete = "ten"\n',
     r"config\.toml:4: profile 'a': bad value for 'max_delete': expected an integer"),
    ('[profile.a]\nmaster = "/m"\nreplicas = []\n', r"config\.toml:3: profile 'a': bad value for 'replicas'"),
    ('[profile.a]\nreplicas = ["/r"]\n', r"config\.toml:1: profile 'a' has no 'master'"),
    ('[profiles.a]\nmaster = "/m"\nreplicas = ["/r"]\n', r"config\.toml:1: unknown top-level key 'profiles'"),
])
def test_bad_profiles_are_exit_2_with_file_and_line(tmp_path, env, text, expect):
    _config(env, text)
    res = cli(env, "run", "a")
    assert res.returncode == 2, res
    assert re.search(expect, res.stderr), res.stderr
    assert res.stdout == ""


def test_unknown_key_names_the_key_and_suggests(tmp_path, env):
    _config(env, '[profile.a]\nmaster = "/m"\nreplicas = ["/r"]\nbw_limit = "1M"\n')
    res = cli(env, "run", "a")
    assert res.returncode == 2
    assert "config.toml:4" in res.stderr and "'bw_limit'" in res.stderr and "'bwlimit'" in res.stderr


def test_unknown_profile_lists_the_known_ones(tmp_path, env):
    _config(env, '[profile.web]\nmaster = "/m"\nreplicas = ["/r"]\n[profile.db]\nmaster = "/m"\nreplicas = ["/r"]\n')
    res = cli(env, "run", "wbe")
    assert res.returncode == 2
    assert "no profile named 'wbe'" in res.stderr and "db, web" in res.stderr and "'web'" in res.stderr


# -- verify ------------------------------------------------------------------------------


def _large_tree(root, dirs=40, files=50):
    t = 1_600_000_000_000_000_000
    for d in range(dirs):
        for f in range(files):
            write(root / f"d{d:02}" / f"f{f:02}.dat", os.urandom(64 + (d * 37 + f * 11) % 1500), t + d * 1000 + f)


def _verify(env, *args):
    res = cli(env, "verify", "--json", *args)
    return res.returncode, json.loads(res.stdout) if res.stdout else None, res


def test_verify_finds_one_flipped_byte_in_a_large_tree_and_an_extra_file(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    _large_tree(m)
    assert cli(env, "sync", m, r).returncode == 0
    rc, out, _ = _verify(env, m, r)
    assert rc == 0 and out["replicas"][0]["equal"] is True
    # Flip one byte, keeping size and mtime: every cache still believes the file is unchanged.
    victim = r / "d17" / "f33.dat"
    st = os.stat(victim)
    data = bytearray(read(victim))
    data[len(data) // 2] ^= 0x01
    write(victim, bytes(data), st.st_mtime_ns)
    rc, out, res = _verify(env, m, r)
    assert rc == 1, res
    assert out["replicas"][0]["differences"] == [{"kind": "content", "path": "d17/f33.dat", "detail": ""}]
    text = cli(env, "verify", m, r)
    assert text.returncode == 1 and "content  d17/f33.dat" in text.stdout
    # --quick trusts the caches and does no rehashing: it cannot see that flip.
    rc, out, _ = _verify(env, "--quick", m, r)
    assert rc == 0
    write(r / "d05" / "intruder.txt", "extra")
    rc, out, _ = _verify(env, m, r)
    assert rc == 1
    assert [(d["kind"], d["path"]) for d in out["replicas"][0]["differences"]] == \
        [("metadata", "d05"), ("extra", "d05/intruder.txt"), ("content", "d17/f33.dat")]  # d05's mtime moved
    # the next sync repairs the extra file (the flip stays hidden from the cached scan)
    assert cli(env, "sync", m, r).returncode == 0
    assert not os.path.exists(r / "d05" / "intruder.txt")


def test_verify_quick_compares_cached_roots_without_walking(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    _large_tree(m, 5, 10)
    rc, out, _ = _verify(env, "--quick", m, r)
    assert rc == 1 and out["replicas"][0]["differences"][0]["kind"] == "nocache"
    assert cli(env, "sync", m, r).returncode == 0
    rc, out, _ = _verify(env, "--quick", m, r)
    assert rc == 0
    assert out["replicas"][0]["master_root"] == out["replicas"][0]["replica_root"] != ""
    # No walk: a whole directory removed behind dirsync's back is not noticed by --quick ...
    import shutil
    shutil.rmtree(r / "d03")
    assert _verify(env, "--quick", m, r)[0] == 0
    # ... but a full verify does (the root's mtime moved too).
    rc, out, _ = _verify(env, m, r)
    assert rc == 1
    assert [(d["kind"], d["path"]) for d in out["replicas"][0]["differences"]] == [("metadata", ""), ("missing", "d03")]
    # A master change seen by a scan (here a plan) updates the master cache: --quick sees it.
    assert cli(env, "sync", m, r).returncode == 0
    write(m / "d00" / "new.dat", "new")
    assert cli(env, "plan", m, r).returncode == 0
    rc, out, _ = _verify(env, "--quick", m, r)
    assert rc == 1 and out["replicas"][0]["differences"][0]["kind"] == "root"


# -- backups -----------------------------------------------------------------------------


def test_backup_dir_keeps_overwritten_and_deleted_files(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "A1")
    write(m / "d" / "b.txt", "B1")
    write(m / "same.txt", "unchanged")
    os.symlink("a.txt", m / "link")
    write(m / ".bak" / "evil.txt", "the master's .bak must not reach the replica's backups")
    assert cli(env, "sync", "--backup-dir", ".bak", m, r).returncode == 0
    assert not os.path.exists(r / ".bak")  # nothing was replaced: no backup folder
    write(m / "a.txt", "A2-longer")
    os.remove(m / "d" / "b.txt")
    os.remove(m / "link")
    os.symlink("same.txt", m / "link")
    res = cli(env, "sync", "--backup-dir", ".bak", "--json", m, r)
    assert res.returncode == 0, res
    (stamp,) = os.listdir(r / ".bak")
    assert STAMP_RE.fullmatch(stamp)
    b = r / ".bak" / stamp
    assert read(b / "a.txt") == b"A1"
    assert read(b / "d" / "b.txt") == b"B1"
    assert os.readlink(b / "link") == "a.txt"
    assert not os.path.exists(b / "same.txt") and not os.path.exists(b / "evil.txt")
    assert read(r / "a.txt") == b"A2-longer" and not os.path.exists(r / "d" / "b.txt")
    assert_equal_trees(m, r, ignore=(".dirsync", ".bak"))
    # verify knows the backup dir is not part of the mirror
    assert cli(env, "verify", "--backup-dir", ".bak", m, r).returncode == 0
    # Retention: three more runs that each overwrite a.txt, keeping 2 run folders.
    for v in ("A3", "A4", "A5"):
        write(m / "a.txt", v)
        assert cli(env, "sync", "--backup-dir", ".bak", "--backup-keep", "2", m, r).returncode == 0
    kept = sorted(os.listdir(r / ".bak"), key=lambda n: (n[:17], int(n[19:] or 0)))
    assert len(kept) == 2 and all(STAMP_RE.fullmatch(n) for n in kept)
    assert [read(r / ".bak" / n / "a.txt") for n in kept] == [b"A3", b"A4"]


def test_backups_of_runs_in_the_same_second_are_pruned_oldest_first(tmp_path, monkeypatch):
    """Runs within one second share a stamp (STAMP, STAMP-1, ...). With --backup-keep 2 the
    third run prunes STAMP; the fourth must not take that freed name (it would sort as the
    oldest and its backups be pruned at once) but the next after the newest."""
    from dirsync import replica as replica_mod
    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig, run_sync
    from dirsync.transport import TransportOptions

    monkeypatch.setattr(replica_mod, "backup_stamp", lambda t=None: "2026-11-26T101500Z")  # one second
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "v0")
    cfg = SyncConfig(master=str(m), replicas=(str(r),), transport=TransportOptions(backup_dir=".bak", backup_keep=2))
    assert run_sync(cfg, Reporter(quiet=True)).exit_code == 0
    for v in ("v1", "v2", "v3", "v4"):
        write(m / "a.txt", v)
        assert run_sync(cfg, Reporter(quiet=True)).exit_code == 0
    kept = sorted(os.listdir(r / ".bak"), key=lambda n: (n[:17], int(n[19:] or 0)))
    assert [read(r / ".bak" / n / "a.txt") for n in kept] == [b"v2", b"v3"], kept
    assert read(r / "a.txt") == b"v4"


def test_a_later_sync_without_backup_dir_keeps_the_old_backups(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "v1")
    assert cli(env, "sync", "--backup-dir", "old", m, r).returncode == 0
    write(m / "a.txt", "v2!")
    assert cli(env, "sync", "--backup-dir", "old", m, r).returncode == 0
    (stamp,) = os.listdir(r / "old")
    # By hand, without --backup-dir: the backups are neither deleted nor reported as extra.
    res = cli(env, "sync", "--json", m, r)
    assert res.returncode == 0 and json.loads(res.stdout)["replicas"][0]["files_deleted"] == 0
    assert read(r / "old" / stamp / "a.txt") == b"v1"
    assert cli(env, "verify", m, r).returncode == 0
    assert "up to date" in cli(env, "status", m, r).stdout
    # A master directory of the same name is not synced into the backups (and says so).
    write(m / "old" / "x.txt", "x")
    res = cli(env, "sync", m, r)
    assert res.returncode == 0 and "not synced" in res.stderr
    assert not os.path.exists(r / "old" / "x.txt")
    # Removing the backup dir by hand ends the reservation.
    import shutil
    shutil.rmtree(r / "old")
    assert cli(env, "sync", m, r).returncode == 0
    assert read(r / "old" / "x.txt") == b"x"


def test_backup_dir_outside_the_replica_and_never_inside_the_master(tmp_path, env):
    m, r, bak = tmp_path / "m", tmp_path / "r", tmp_path / "backups"
    write(m / "a.txt", "old")
    write(m / "gone.txt", "deleted later")
    assert cli(env, "sync", m, r).returncode == 0
    write(m / "a.txt", "new!")
    os.remove(m / "gone.txt")
    assert cli(env, "sync", "--backup-dir", bak, m, r).returncode == 0
    (stamp,) = os.listdir(bak)
    assert read(bak / stamp / "a.txt") == b"old" and read(bak / stamp / "gone.txt") == b"deleted later"
    assert_equal_trees(m, r)
    inside = cli(env, "sync", "--backup-dir", m / "backups", m, r)
    assert inside.returncode == 2 and "inside the master" in inside.stderr


# -- bandwidth limit ---------------------------------------------------------------------


def test_bwlimit_is_within_20_percent(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "blob.bin", os.urandom(8 * MiB))  # ~4 s: fixed costs (scan, fsync) stay small beside it
    res = cli(env, "sync", "--bwlimit", "2M", "--json", m, r)
    assert res.returncode == 0, res
    rep = json.loads(res.stdout)["replicas"][0]
    assert rep["bytes_sent"] == 8 * MiB
    rate = rep["bytes_sent"] / rep["seconds"]
    assert 0.8 * 2 * MiB <= rate <= 1.2 * 2 * MiB, f"{rate / MiB:.2f} MiB/s over {rep['seconds']} s"
    assert_equal_trees(m, r)


def test_bwlimit_applies_to_each_replica(tmp_path, env):
    m = tmp_path / "m"
    write(m / "blob.bin", os.urandom(3 * MiB))
    res = cli(env, "sync", "--bwlimit", "3M", "--json", m, tmp_path / "r1", tmp_path / "r2")
    assert res.returncode == 0
    for rep in json.loads(res.stdout)["replicas"]:
        assert 0.8 <= rep["seconds"] < 3, rep  # every replica is throttled, ~1 s each


# -- status ------------------------------------------------------------------------------


def test_status_reports_last_success_run_and_behind(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "a")
    write(m / "b.txt", "b")
    _config(env, f'[profile.p]\nmaster = "{m}"\nreplicas = ["{r}"]\n')
    st = cli(env, "status", "p")
    assert st.returncode == 1 and "never synced" in st.stdout and "BEHIND" in st.stdout
    first = cli(env, "run", "p", "--json")
    run_id = json.loads(first.stdout)["run_id"]
    st = cli(env, "status", "--json", "p")
    assert st.returncode == 0, st
    (grp,) = json.loads(st.stdout)["profiles"]
    (rep,) = grp["replicas"]
    assert grp["profile"] == "p" and rep["behind"] is False and rep["error"] is None
    ok = rep["last_success"]
    assert ok["run_id"] == run_id and ok["profile"] == "p" and ok["exit_code"] == 0 and ok["files_written"] == 2
    assert abs(ok["finished_ts"] - time.time()) < 120
    assert rep["last_run"] == ok
    text = cli(env, "status", m, r)  # the MASTER REPLICA form reads the same record
    assert text.returncode == 0 and "up to date" in text.stdout and run_id in text.stdout
    # behind now
    write(m / "c.txt", "c")
    st = cli(env, "status", "--json", "p")
    assert st.returncode == 1
    rep = json.loads(st.stdout)["profiles"][0]["replicas"][0]
    assert rep["behind"] is True and rep["pending"]["writes"] == 1
    # a failed run does not replace the last success
    write(r / "c.txt" / "keep.tmp", "blocks c.txt")
    bad = cli(env, "run", "p", "-x", "*.tmp", "--json")
    assert bad.returncode == 23
    rep = json.loads(cli(env, "status", "--json", "--no-check", "p").stdout)["profiles"][0]["replicas"][0]
    assert rep["last_success"]["run_id"] == run_id
    assert rep["last_run"]["run_id"] == json.loads(bad.stdout)["run_id"] and rep["last_run"]["exit_code"] == 23
    assert rep["behind"] is None  # --no-check


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json_values, max_size=6))
def test_status_records_and_json_summaries_are_written_as_json_dumps_writes_them(rec):
    """Status records are written without importing json (start-up time): the text must be
    json.dumps(indent=1)'s, byte for byte (non-ASCII, control characters, lone surrogates,
    NaN and infinities, big ints, nesting and empty containers included). So must sync's
    --json summary (indent 2), written by the same writer."""
    from dirsync.status import dumps

    assert dumps(rec) == json.dumps(rec, indent=1)
    assert dumps(rec, indent=2) == json.dumps(rec, indent=2)
    assert dumps([rec, (1.5, None)], indent=2) == json.dumps([rec, (1.5, None)], indent=2)


def test_a_sync_imports_no_json_nor_re_and_leaves_no_in_step_note_in_the_record(tmp_path, env, monkeypatch):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "a")
    import site

    code = ("import sys, os; from dirsync import fastcli, commands; cmd, kw = fastcli.parse(sys.argv[1:]); "
            "c = commands.sync(**kw); print(sorted(k for k in ('json', 're', 'enum', 'pickle', 'signal') "
            "if k in sys.modules)); sys.stdout.flush(); os._exit(c)")
    # -S, with the packages' directories on the path instead: no .pth hook (an editable
    # install's imports re and enum) runs first, so what is imported is the sync's own.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**env, "PYTHONPATH": os.pathsep.join([repo, *site.getsitepackages()])}
    for i in range(4):  # the first makes the replica (its marker is JSON); the first two hash racy
        # files (the chunker's import: no typing, re or enum either); the last two read nothing,
        # the last finds the pair in step by its note and prints its summary with --json
        p = subprocess.run([sys.executable, "-S", "-c", code, "sync", "--json" if i == 3 else "-q", str(m), str(r)],
                           env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and (i < 1 or p.stdout.splitlines()[-1] == "[]"), (i, p.stdout, p.stderr)
        if i == 3:
            summary = json.loads(p.stdout[:p.stdout.rindex("[]")])
            assert summary["exit_code"] == 0 and summary["replicas"][0]["replica"] == str(r), summary
        settle(m, r)
    d = os.path.join(env["XDG_STATE_HOME"], "dirsync", "status")
    (rec,) = [json.load(open(os.path.join(d, n))) for n in os.listdir(d) if n.endswith(".json")]
    assert rec["last_success"]["exit_code"] == 0 and "in_step" not in rec
    from dirsync.status import load_in_step

    monkeypatch.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])  # (where load_in_step looks)
    note = load_in_step(rec["master"], rec["replica"])
    assert note is not None and set(note) == {"master", "replica", "opts"} and note["opts"].startswith("delete=")


def test_status_of_every_profile_and_of_a_missing_master(tmp_path, env):
    m, r = tmp_path / "m", tmp_path / "r"
    write(m / "a.txt", "a")
    _config(env, f'[profile.one]\nmaster = "{m}"\nreplicas = ["{r}"]\n'
                 f'[profile.two]\nmaster = "{tmp_path / "gone"}"\nreplicas = ["{r}"]\n')
    assert cli(env, "run", "one").returncode == 0
    st = cli(env, "status")
    assert st.returncode == 12, st  # the most serious problem: a refused (missing) master
    assert "== one:" in st.stdout and "== two:" in st.stdout and "up to date" in st.stdout
    assert "does not exist" in st.stdout


# -- help and completion ---------------------------------------------------------------


def test_every_command_help_shows_an_example(env):
    from dirsync.cli import app

    names = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert {"sync", "plan", "verify", "run", "status"} <= set(names)
    for n in names:
        res = cli(env, n, "--help")
        assert res.returncode == 0, (n, res)
        assert re.search(r"Example: dirsync " + re.escape(n), res.stdout), (n, res.stdout)


def test_shell_completion_is_available(env):
    # Run from a bash, as a user would: with shellingham installed typer detects the shell from
    # the parent processes (and then treats "bash" as a stray argument), so the result must not
    # depend on what started pytest. (Two commands, so that bash does not exec into dirsync.)
    res = subprocess.run(["bash", "-c", '"$0" -m dirsync --show-completion bash; exit $?', sys.executable],
                         env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "complete" in res.stdout, res.stderr
