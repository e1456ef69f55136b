"""A throwaway OpenSSH server on 127.0.0.1 for tests: generated keys, key-only auth, its own known_hosts.

Use as a pytest plugin (``pytest_plugins = ["tests.sshd"]`` in tests/conftest.py)
to get the session-scoped ``sshd`` fixture and the ``ssh`` marker, or call
``start_sshd(dir)`` directly. A missing or broken sshd skips the tests, unless
``DIRSYNC_REQUIRE_SSH=1`` is set (CI), where it fails them.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
ALIAS = "dirsync-test"
START_DEADLINE_S = 10.0


class SshdUnavailable(RuntimeError):
    """sshd is missing or did not start."""


@dataclass
class SshdInfo:
    """A running test sshd. Everything a client needs to reach it."""

    host: str
    port: int
    user: str
    client_key_path: str
    known_hosts_path: str
    ssh_config_path: str  # has `Host dirsync-test` pointing here
    host_pub_line: str  # "ssh-ed25519 AAAA…" (the server's public host key)
    pid: int
    dir: str
    log_path: str
    _proc: subprocess.Popen[bytes] | None = None

    alias = ALIAS

    def url(self, path: str) -> str:
        """``ssh://user@127.0.0.1:PORT/path`` for an absolute ``path``."""
        return f"ssh://{self.user}@{self.host}:{self.port}{path}"

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dirsync.transport.ssh.connect`` that reach this server hermetically."""
        return {
            "identity": self.client_key_path,
            "known_hosts_files": [self.known_hosts_path],
            "ssh_config_file": os.devnull,
        }

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def session_pids(self) -> list[int]:
        """PIDs of per-connection sshd processes and everything they started."""
        return _descendants(self.pid)

    def kill_sessions(self) -> None:
        """Kill every live session (simulates the link dying); the listener keeps running."""
        for pid in reversed(self.session_pids()):
            _kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the listener and every session it spawned, by PID."""
        kids = self.session_pids()
        _kill(self.pid, signal.SIGTERM)
        for pid in reversed(kids):  # sessions survive SIGTERM of the listener
            _kill(pid, signal.SIGKILL)
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill(self.pid, signal.SIGKILL)
                self._proc.wait(5)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _children(pid: int) -> list[int]:
    if shutil.which("pgrep"):
        r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
        return [int(x) for x in r.stdout.split()]
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _descendants(pid: int) -> list[int]:
    """All descendants, parents before children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in _children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    """Create an ed25519 key pair at ``path`` / ``path.pub``; return the public line."""
    if shutil.which("ssh-keygen"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dirsync-test", "-f", str(path)], check=True)
    else:  # pragma: no cover - ssh-keygen ships with openssh-server
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        k = Ed25519PrivateKey.generate()
        path.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        Path(f"{path}.pub").write_bytes(pub + b" dirsync-test\n")
    path.chmod(0o600)
    fields = Path(f"{path}.pub").read_text().split()
    return f"{fields[0]} {fields[1]}"


def make_keypair(path: str | os.PathLike[str]) -> str:
    """Generate an extra ed25519 key pair (for wrong-key and changed-key tests); return the public line."""
    return _keygen(Path(path))


def start_sshd(tmpdir: str | os.PathLike[str], *, extra_config: str = "") -> SshdInfo:
    """Start ``sshd -D -e`` on a free 127.0.0.1 port with keys and files under ``tmpdir``.

    Raises ``SshdUnavailable`` if sshd is missing or does not accept
    connections within the deadline. ``extra_config`` lines are appended to
    sshd_config (for example ``SetEnv PATH=/nonexistent``).
    """
    sshd = next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("sshd")
    if not sshd:
        raise SshdUnavailable("sshd not found (apt-get install openssh-server)")
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    host_pub = _keygen(d / "host_ed25519")
    client_pub = _keygen(d / "client_ed25519")
    (d / "authorized_keys").write_text(client_pub + "\n")
    (d / "authorized_keys").chmod(0o600)
    if os.geteuid() == 0:
        # Debian's sshd refuses to start without its privilege-separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    user = getpass.getuser()
    log_path = d / "sshd.log"
    last_error = ""
    for _attempt in range(3):  # another process may grab the free port before sshd binds it
        port = _free_port()
        cfg = d / "sshd_config"
        cfg.write_text(
            f"ListenAddress 127.0.0.1\n"
            f"Port {port}\n"
            f"HostKey {d / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            f"PidFile {d / 'sshd.pid'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "AllowTcpForwarding yes\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            "LogLevel VERBOSE\n" + extra_config
        )
        check = subprocess.run([sshd, "-t", "-f", str(cfg)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise SshdUnavailable(f"sshd -t rejected the config: {check.stderr.strip()}")
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            last_error = log_path.read_text(errors="replace").strip()[-2000:]
            continue
        break
    else:
        raise SshdUnavailable(f"sshd did not start: {last_error or 'no output'}")

    known_hosts = d / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    ssh_config = d / "ssh_config"
    ssh_config.write_text(
        f"Host {ALIAS}\n"
        f"  HostName 127.0.0.1\n"
        f"  Port {port}\n"
        f"  User {user}\n"
        f"  IdentityFile {d / 'client_ed25519'}\n"
        f"  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known_hosts}\n"
        f"  StrictHostKeyChecking yes\n"
        f"  BatchMode yes\n"
    )
    return SshdInfo(
        host="127.0.0.1",
        port=port,
        user=user,
        client_key_path=str(d / "client_ed25519"),
        known_hosts_path=str(known_hosts),
        ssh_config_path=str(ssh_config),
        host_pub_line=host_pub,
        pid=proc.pid,
        dir=str(d),
        log_path=str(log_path),
        _proc=proc,
    )


def _unavailable(reason: str) -> None:
    if os.environ.get("DIRSYNC_REQUIRE_SSH") == "1":
        pytest.fail(f"real-sshd tests required (DIRSYNC_REQUIRE_SSH=1) but: {reason}", pytrace=False)
    pytest.skip(f"no usable sshd: {reason}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdInfo]:
    """A real sshd for the whole test session (skips, or fails under DIRSYNC_REQUIRE_SSH=1, if unavailable)."""
    try:
        info = start_sshd(tmp_path_factory.mktemp("sshd"))
    except (SshdUnavailable, OSError, subprocess.CalledProcessError) as e:
        _unavailable(str(e))
        raise  # unreachable: skip/fail raise
    try:
        yield info
    finally:
        info.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ssh: needs a real sshd on 127.0.0.1 (tests/sshd.py)")
