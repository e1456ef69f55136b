"""Test helpers for the end-to-end tier: build real trees, mutate them, run the real CLI.

No mocks: everything here works on real files and real processes. Paths may be str or
bytes (non-UTF-8 names are built and mutated as bytes).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

T0 = 1_600_000_000_000_000_000  # a fixed base mtime (ns) for deterministic trees
STATE_DIR = b".dirsync"


# -- trees ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A symlink in a tree spec (target stored as given, never followed)."""

    target: str | bytes


@dataclass(frozen=True)
class File:
    """A file in a tree spec with explicit metadata (plain bytes/str values use defaults)."""

    data: bytes | str = b""
    mode: int | None = None
    mtime_ns: int | None = None


@contextlib.contextmanager
def tiny_tmpfs(size: str) -> Iterator[str]:
    """A tmpfs of `size` (e.g. "2m") mounted at a fresh directory for the block: a real full
    disk. Skips the test where it cannot be mounted (not root, no mount permission)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tempfile.mkdtemp(prefix="dirsync-tmpfs-")
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", d],
                        capture_output=True, text=True)
    if cp.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {cp.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        shutil.rmtree(d, ignore_errors=True)


def B(p: str | bytes | os.PathLike) -> bytes:
    """Any path-like -> bytes (so non-UTF-8 names work everywhere)."""
    return os.fsencode(os.fspath(p))


def J(*parts: str | bytes | os.PathLike) -> bytes:
    """Join as bytes."""
    return os.path.join(*[B(p) for p in parts])


def build_tree(root: str | bytes | os.PathLike, spec: Mapping[Any, Any]) -> None:
    """Create `spec` under `root` (created if missing).

    Keys are names (str or bytes, may contain '/'); values: bytes/str -> file, File -> file
    with metadata, dict -> directory (recursively), Link -> symlink.
    """
    root = B(root)
    os.makedirs(root, exist_ok=True)
    for name, v in spec.items():
        p = J(root, name)
        parent = os.path.dirname(p)
        if parent:
            os.makedirs(parent, exist_ok=True)
        if isinstance(v, dict):
            os.makedirs(p, exist_ok=True)
            build_tree(p, v)
        elif isinstance(v, Link):
            os.symlink(B(v.target), p)
        elif isinstance(v, File):
            write(p, v.data)
            if v.mode is not None:
                os.chmod(p, v.mode)
            if v.mtime_ns is not None:
                os.utime(p, ns=(v.mtime_ns, v.mtime_ns))
        else:
            write(p, v)


def sync_in_process(m, r, between: Callable[[], Any] | None = None, opts=None) -> tuple:
    """One local sync of m to r in this process: scan both, plan (`opts`: PlanOptions), run
    `between` (a test's meddling or spies), apply, close. Returns (ReplicaSummary, actions)."""
    from dirsync.apply import MasterReader, ReplicaSummary, apply_actions
    from dirsync.plan import PlanOptions, diff
    from dirsync.replica import Replica
    from dirsync.scan import Excluder, scan_tree

    ms = scan_tree(str(m))
    rep = Replica(str(r))
    rep.open(init=True)
    rs = rep.manifest(Excluder())
    plan = diff(ms.manifest, rs.manifest, PlanOptions() if opts is None else opts)
    if between is not None:
        between()
    summary = ReplicaSummary(replica=str(r))
    try:
        apply_actions(rep, plan.actions, MasterReader(str(m), None, ms.held).local_sends, summary, lambda: False)
    finally:
        rep.close()
    return summary, plan.actions


def read(p: str | bytes | os.PathLike) -> bytes:
    with open(B(p), "rb") as f:
        return f.read()


def write(p: str | bytes | os.PathLike, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode()
    with open(B(p), "wb") as f:
        f.write(data)


def append(p, data: bytes) -> None:
    with open(B(p), "ab") as f:
        f.write(data)


def insert(p, offset: int, data: bytes) -> None:
    old = read(p)
    write(p, old[:offset] + data + old[offset:])


def truncate(p, size: int) -> None:
    os.truncate(B(p), size)


def overwrite_same_size_and_mtime(p, data: bytes) -> None:
    """Replace the content without changing size or mtime (only ctime moves)."""
    st = os.stat(B(p))
    assert len(data) == st.st_size
    write(p, data)
    os.utime(B(p), ns=(st.st_atime_ns, st.st_mtime_ns))


def touch(p, ns: int | None = None) -> None:
    ns = time.time_ns() if ns is None else ns
    os.utime(B(p), ns=(ns, ns), follow_symlinks=False)


def remove(p) -> None:
    """Remove a file, link or whole directory tree."""
    p = B(p)
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def replace_with_dir(p, spec: Mapping[Any, Any] | None = None) -> None:
    remove(p)
    os.mkdir(B(p))
    if spec:
        build_tree(p, spec)


def replace_with_file(p, data: bytes = b"now a file\n") -> None:
    remove(p)
    write(p, data)


def replace_with_link(p, target: str | bytes) -> None:
    remove(p)
    os.symlink(B(target), B(p))


def swap(a, b) -> None:
    a, b = B(a), B(b)
    tmp = a + b".swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def text_lines(n_bytes: int, seed: int = 0) -> bytes:
    """Source-like text: numbered lines of random words, about n_bytes long."""
    r = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "return", "self", "value", "count", "if", "for", "None"]
    out, size, i = [], 0, 0
    while size < n_bytes:
        line = f"{i:05d} " + " ".join(r.choice(words) for _ in range(r.randint(3, 9))) + "\n"
        out.append(line)
        size += len(line)
        i += 1
    return "".join(out).encode()


def tmp_entries(replica) -> list[bytes]:
    """Names in REPLICA/.dirsync/tmp (staging area); [] when it does not exist."""
    try:
        return sorted(os.listdir(J(replica, STATE_DIR, b"tmp")))
    except FileNotFoundError:
        return []


def stray_temps(root) -> list[bytes]:
    """Any dirsync temp file anywhere under root (outside the staging area too)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(B(root)):
        for n in filenames + dirnames:
            if n.startswith(b".dirsync-tmp-"):
                out.append(os.path.join(dirpath, n))
    return out


def raw_snapshot(root, skip=(b".dirsync/lock",)) -> dict[bytes, tuple]:
    """Everything under root, .dirsync included (kind, mode, mtime, content or target).

    `skip`: relpaths left out (by default the lock file, which every run stamps with its pid).
    """
    root = B(root)
    skip = {B(x) for x in skip}
    st = os.lstat(root)
    out: dict[bytes, tuple] = {b"": ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel in skip or rel.endswith(b"/.dirsync/lock"):
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_mtime_ns, read(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("?", stat.S_IMODE(st.st_mode))
    return out


# -- waiting -------------------------------------------------------------------------


def settle(*roots, racy_ns: int = 100_000_000) -> None:
    """Wait (with a deadline) until every ctime/mtime under `roots` is older than dirsync's racy
    window (scan.RACY_NS), so scans trust the entries they read: a fixed rule, not a guess."""
    newest = 0
    for root in roots:
        for d, dirs, files in os.walk(B(root)):
            for n in dirs + files + [b"."]:
                st = os.lstat(os.path.join(d, n))
                newest = max(newest, st.st_ctime_ns, st.st_mtime_ns)
    deadline = time.monotonic() + 5
    while time.time_ns() <= newest + racy_ns + 1_000_000:
        assert time.monotonic() < deadline, "clock does not advance"
        time.sleep(0.01)


def spy_calls(monkeypatch, owner, name: str, note: Callable[..., Any]) -> list:
    """Let owner.name (a method or a module function) run as ever, recording note(result,
    *args, **kwargs) of each call in the list returned (a method's args start with self)."""
    got: list = []
    real = getattr(owner, name)

    def spy(*a, **k):
        result = real(*a, **k)
        got.append(note(result, *a, **k))
        return result

    monkeypatch.setattr(owner, name, spy)
    return got


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.002, what: str = "condition"):
    """Poll `cond` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- running the CLI -------------------------------------------------------------------


class WatchDaemon:
    """`python -m dirsync watch --delay 0.05 --log-file LOG ARGS...` in its own session, stderr
    to a file; the `daemons` fixture (conftest) kills whatever is left at teardown."""

    def __init__(self, tmp_path, *args, name: str = "watch", deadline: float = 30.0) -> None:
        self.log = tmp_path / f"{name}.log"
        self.errpath = tmp_path / f"{name}.stderr"
        self.deadline = deadline
        with open(self.errpath, "ab") as err:
            self.proc = subprocess.Popen(cli_argv("watch", "--delay", "0.05", "--log-file", self.log, *args),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=cli_env(), start_new_session=True)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        return self.errpath.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float | None = None) -> None:
        def seen():
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} before logging {needle!r}:\n"
                                     f"{self.stderr()}")
            return False

        wait_for(seen, self.deadline if timeout is None else timeout, 0.01, f"{needle!r} in the daemon log")

    def wait_ready(self) -> "WatchDaemon":
        self.wait_log("watching ")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
        timeout = self.deadline if timeout is None else timeout
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"daemon did not exit within {timeout}s after signal {sig}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def assert_clean_log(self) -> None:
        err = self.stderr()
        assert "Traceback" not in err, err


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI subprocess: a private XDG_STATE_HOME is mandatory."""
    env = dict(os.environ)
    if not env.get("XDG_STATE_HOME"):
        env["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="dirsync-state-")
    env.pop("COLUMNS", None)
    env["PYTHONFAULTHANDLER"] = "1"
    if extra:
        env.update(extra)
    return env


def cli_argv(*args: str | bytes | os.PathLike) -> list[bytes]:
    return [B(sys.executable), b"-m", b"dirsync", *[B(a) if not isinstance(a, int) else str(a).encode() for a in args]]


def run_cli(*args, timeout: float = 120, env: Mapping[str, str] | None = None, user: str | None = None,
            check_no_traceback: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `python -m dirsync ARGS` to completion (text output, undecodable bytes escaped).

    user="nobody" drops root privileges in the child (root ignores chmod 000).
    Asserts that stderr holds no Python traceback unless check_no_traceback=False.
    """
    argv = cli_argv(*args)
    if user is not None:
        prefix, ukw = as_user(user)
        argv = prefix + argv
        kw.update(ukw)
        kw.setdefault("cwd", "/")
    cp = subprocess.run(argv, capture_output=True, timeout=timeout, env=cli_env(env),
                        text=True, errors="surrogateescape", **kw)
    if check_no_traceback:
        assert "Traceback" not in cp.stderr, f"traceback from dirsync {args}:\n{cp.stderr}"
    return cp


def popen_cli(*args, env: Mapping[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start `python -m dirsync ARGS` in its own session (so its whole group can be killed)."""
    return subprocess.Popen(cli_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(env),
                            start_new_session=True, **kw)


def sync_json(master, *replicas, args: tuple = (), expect: int | None = 0, **kw) -> tuple[subprocess.CompletedProcess, dict]:
    """`dirsync sync --json [args] MASTER REPLICA...`; returns the process and the parsed summary."""
    cp = run_cli("sync", "--json", *args, master, *replicas, **kw)
    if expect is not None:
        assert cp.returncode == expect, f"exit {cp.returncode}, expected {expect}\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}"
    try:
        summary = json.loads(cp.stdout) if cp.stdout.strip() else {}
    except json.JSONDecodeError as e:
        raise AssertionError(f"--json output is not JSON ({e}):\n{cp.stdout}") from None
    return cp, summary


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)


# -- privileges ----------------------------------------------------------------------


def user_ids(name: str = "nobody") -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def as_user(name: str = "nobody") -> tuple[list[bytes], dict]:
    """(argv prefix, subprocess kwargs) that run a child as `name` without root's capabilities.

    setpriv is preferred: it also works when the interpreter lives under a directory `name`
    cannot search (pyenv under /root), where subprocess's own user= fails with EACCES.
    """
    ids = user_ids(name)
    assert ids is not None, f"no user {name}"
    uid, gid = ids
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [B(setpriv), b"--reuid=%d" % uid, b"--regid=%d" % gid, b"--clear-groups", b"--"], {}
    return [], {"user": uid, "group": gid, "extra_groups": []}


def can_drop_to(name: str = "nobody") -> str | None:
    """None when tests can run the CLI as `name`, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return None  # not root: chmod 000 already denies; children run as we are
    if user_ids(name) is None:
        return f"running as root and there is no {name!r} user to drop privileges to"
    prefix, kw = as_user(name)
    probe = "import os, dirsync.cli; assert os.geteuid() != 0; os.listdir('/root')"
    try:
        cp = subprocess.run(prefix + [B(sys.executable), b"-c", probe.encode()], capture_output=True, timeout=60,
                            cwd="/", **kw)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run the CLI as {name}: {e}"
    if b"PermissionError" not in cp.stderr:  # dirsync must import, and /root must be denied
        return f"cannot run the CLI as an unprivileged {name}: {cp.stderr.decode(errors='replace')[-300:]}"
    return None


@contextlib.contextmanager
def world_dir(prefix: str = "dirsync-e2e-") -> Iterator[str]:
    """A temp dir every user can reach (pytest's tmp_path is root-only 0700)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        for dirpath, dirnames, _ in os.walk(d):  # let root remove what a test chmod-ed away
            for n in dirnames:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(dirpath, n), 0o755, follow_symlinks=False)
        shutil.rmtree(d, ignore_errors=True)


def chown_tree(root, name: str = "nobody") -> None:
    uid, gid = user_ids(name)  # type: ignore[misc]
    for dirpath, dirnames, filenames in os.walk(B(root)):
        os.chown(dirpath, uid, gid, follow_symlinks=False)
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), uid, gid, follow_symlinks=False)


class Unprivileged:
    """Run the CLI without root's DAC override, inside a directory every user can reach.

    As root: children run as `nobody` and `own()` hands test trees to nobody. Not root:
    children run as the current user (chmod 000 already denies) and own() does nothing.
    """

    def __init__(self, base: str, user: str = "nobody") -> None:
        self.base = base
        self.user = user if os.geteuid() == 0 else None
        state = os.path.join(base, "xdg-state")
        os.mkdir(state)
        os.chmod(state, 0o777)
        self.env = {"XDG_STATE_HOME": state}

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    def own(self, *roots) -> None:
        if self.user is not None:
            for r in roots:
                chown_tree(r, self.user)

    def run(self, *args, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, env=self.env, user=self.user, **kw)


def files_match_master(m, r) -> int:
    """Every file under replica r (outside .dirsync) has the master's bytes; returns how many there are."""
    n = 0
    for d, dirs, files in os.walk(r):
        dirs[:] = [x for x in dirs if x != ".dirsync"]
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), r)
            assert read(os.path.join(m, rel)) == read(os.path.join(r, rel)), rel
            n += 1
    return n
