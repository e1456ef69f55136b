"""A private OpenSSH sshd on 127.0.0.1 for the SSH benchmark cases.

Generated host and client keys (ssh-keygen), key-only auth, its own config,
pid file and log, a free port; stopped by pid (and its per-connection children,
which sshd puts in their own sessions) at the end.  Independent of tests/.

The client side gets an ssh config and a known_hosts file usable by both
OpenSSH (``rsync -e "ssh -F CFG"``) and dirsync (``--ssh-config CFG`` plus the
known_hosts in a private $HOME for paramiko).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time


class SshdError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_sshd() -> str | None:
    for p in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if p and os.access(p, os.X_OK):
            return p
    return None


def descendants(pid: int) -> list[int]:
    """All live descendants of pid (via /proc/PID/task/*/children), parents first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        kids.extend(int(x) for x in f.read().split())
                except OSError:
                    pass
        except OSError:
            continue
        out.extend(kids)
        todo.extend(kids)
    return out


def _cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


class Sshd:
    def __init__(self, workdir: str):
        self.dir = os.path.abspath(workdir)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.user = getpass.getuser()
        self.host_key = os.path.join(self.dir, "ssh_host_ed25519_key")
        self.client_key = os.path.join(self.dir, "id_ed25519")
        self.authorized_keys = os.path.join(self.dir, "authorized_keys")
        self.config = os.path.join(self.dir, "sshd_config")
        self.pidfile = os.path.join(self.dir, "sshd.pid")
        self.log = os.path.join(self.dir, "sshd.log")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.client_config = os.path.join(self.dir, "ssh_config")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 15.0) -> "Sshd":
        sshd = find_sshd()
        if not sshd:
            raise SshdError("sshd not found (install openssh-server)")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for key in (self.host_key, self.client_key):
            if not os.path.exists(key):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dirsync-bench", "-f", key],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        shutil.copyfile(self.client_key + ".pub", self.authorized_keys)
        os.chmod(self.authorized_keys, 0o600)
        try:
            os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir
        except OSError:
            pass
        self.port = _free_port()
        with open(self.config, "w") as f:
            f.write(
                f"ListenAddress 127.0.0.1\n"
                f"Port {self.port}\n"
                f"HostKey {self.host_key}\n"
                f"AuthorizedKeysFile {self.authorized_keys}\n"
                f"PidFile {self.pidfile}\n"
                "AuthenticationMethods publickey\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"
                "PermitRootLogin prohibit-password\n"
                "UseDNS no\n"
                "PrintMotd no\n"
                "MaxStartups 64:30:128\n"
                "MaxSessions 32\n"
                "Subsystem sftp internal-sftp\n"
                "LogLevel INFO\n"
            )
        check = subprocess.run([sshd, "-t", "-f", self.config], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise SshdError(f"sshd -t rejected the config: {check.stderr.strip()}")
        logf = open(self.log, "ab")
        # -D: stay in the foreground (our child, stoppable by pid); -e: log to stderr (the log file).
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", self.config], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SshdError(f"sshd exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SshdError(f"sshd did not answer on port {self.port}: {self._log_tail()}")
            time.sleep(0.05)
        return self

    def write_client_files(self, port: int) -> None:
        """known_hosts and ssh config for connecting to 127.0.0.1:port (the proxy's port)."""
        with open(self.host_key + ".pub") as f:
            keytype, key = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write(f"[127.0.0.1]:{port} {keytype} {key}\n")
        with open(self.client_config, "w") as f:
            f.write(
                "Host 127.0.0.1\n"
                "  HostName 127.0.0.1\n"
                f"  Port {port}\n"
                f"  User {self.user}\n"
                f"  IdentityFile {self.client_key}\n"
                "  IdentitiesOnly yes\n"
                "  IdentityAgent none\n"
                f"  UserKnownHostsFile {self.known_hosts}\n"
                "  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n"
                "  Compression no\n"
                "  ControlMaster no\n"
                "  ControlPath none\n"
                "  LogLevel ERROR\n"
            )

    def negotiated(self, port: int) -> dict:
        """Cipher/MAC/kex OpenSSH negotiates with this sshd (what rsync -e ssh uses)."""
        out = {}
        try:
            r = subprocess.run(["ssh", "-F", self.client_config, "-v", "-p", str(port), "127.0.0.1", "true"],
                               capture_output=True, text=True, timeout=30)
            for line in r.stderr.splitlines():
                if "kex: server->client cipher:" in line:
                    parts = line.split()
                    out["cipher"] = parts[parts.index("cipher:") + 1]
                    out["mac"] = parts[parts.index("MAC:") + 1]
                elif "kex: algorithm:" in line:
                    out["kex"] = line.split("kex: algorithm:")[1].strip()
                elif line.startswith("OpenSSH_") or "OpenSSH_" in line and "version" not in out:
                    out.setdefault("version", line.split(",")[0].replace("debug1: ", ""))
            out["ok"] = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as e:
            out["error"] = str(e)
        return out

    def stop(self) -> None:
        if not self.proc:
            return
        pid = self.proc.pid
        kids = {k: _cmdline(k) for k in descendants(pid)}
        if self.proc.poll() is None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for k in kids:  # connection processes live in their own sessions: stop them by pid
            try:
                os.kill(k, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        for k, cmd in kids.items():
            if cmd is None or _cmdline(k) != cmd:
                continue  # gone (or the pid was reused): leave it alone
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def _log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""
