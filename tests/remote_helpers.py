"""Shared by the remote-replica tests: how to run `dirsync agent` from THIS checkout, locally
over pipes or behind the test sshd, and how to build the matching transports and CLI options.

The agent must run from the checkout under test (CI clones the repo elsewhere and installs it
editable in a venv), so the remote command is this interpreter with the repo root first on
PYTHONPATH, derived from this file's location, never hard-coded.
"""

from __future__ import annotations

import os
import selectors
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dirsync.transport import TransportOptions
from dirsync.transport.remote import RemoteTransport
from dirsync.transport.ssh import SubprocessChannel

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def agent_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def agent_argv() -> list[str]:
    return [sys.executable, "-m", "dirsync", "agent"]


def remote_cmd(env: dict[str, str] | None = None) -> str:
    """The --remote-cmd that runs this checkout's dirsync on the far side of the test sshd."""
    extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return f"env PYTHONPATH={shlex.quote(REPO_ROOT)} {extra + ' ' if extra else ''}{shlex.quote(sys.executable)} -m dirsync"


def pipe_transport(root: str | os.PathLike, opts: TransportOptions = TransportOptions(),
                   env: dict[str, str] | None = None) -> RemoteTransport:
    """RemoteTransport over a local `python -m dirsync agent` subprocess (no sshd)."""
    return RemoteTransport(f"localhost:{os.fspath(root)}", opts,
                           channel_factory=lambda: SubprocessChannel(agent_argv(), env=agent_env(env)))


def ssh_options(sshd: Any, *, env: dict[str, str] | None = None, **more: Any) -> TransportOptions:
    return TransportOptions(identity=sshd.client_key_path, ssh_config=sshd.ssh_config_path,
                            remote_cmd=remote_cmd(env), **more)


def ssh_spec(sshd: Any, root: str | os.PathLike) -> str:
    """`dirsync-test:/abs/path`: the fixture's Host alias (port, user, key, known_hosts in its config)."""
    return f"{sshd.alias}:{os.path.abspath(os.fspath(root))}"


def ssh_transport(sshd: Any, root: str | os.PathLike, env: dict[str, str] | None = None,
                  **more: Any) -> RemoteTransport:
    return RemoteTransport(ssh_spec(sshd, root), ssh_options(sshd, env=env, **more))


def ssh_cli_args(sshd: Any, env: dict[str, str] | None = None) -> list[str]:
    """CLI options that reach the fixture's sshd through its ssh_config Host alias."""
    return ["--ssh-config", sshd.ssh_config_path, "--remote-cmd", remote_cmd(env)]


# -- a TCP proxy in front of the test sshd: counts bytes, can stall or cut the stream ------------------

class TcpProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target_port>, one thread per connection.

    `up`/`down`: bytes forwarded client->server / server->client (all connections).
    `stall()`: stop forwarding both ways (the sockets stay open: a dead link that says nothing).
    `resume()`, `cut()` (close every connection: a broken link), `close()` (listener too).
    Only loopback addresses; every thread ends when the proxy is closed.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.up = 0
        self.down = 0
        self.connections = 0
        self._stalled = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._closed.is_set():
            try:
                c, _ = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                s = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._socks += [c, s]
                self.connections += 1
            t = threading.Thread(target=self._pump, args=(c, s), name="proxy-pump", daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, c: socket.socket, s: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(c, selectors.EVENT_READ, (s, "up"))
        sel.register(s, selectors.EVENT_READ, (c, "down"))
        try:
            while not self._closed.is_set():
                if self._stalled.is_set():
                    time.sleep(0.02)
                    continue
                for key, _ in sel.select(0.1):
                    src = key.fileobj
                    dst, way = key.data
                    data = src.recv(1 << 16)  # type: ignore[union-attr]
                    if not data:
                        return
                    dst.sendall(data)
                    with self._lock:
                        if way == "up":
                            self.up += len(data)
                        else:
                            self.down += len(data)
        except OSError:
            return
        finally:
            sel.close()
            for x in (c, s):
                try:
                    x.close()
                except OSError:
                    pass

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def stall(self) -> None:
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def cut(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for x in socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                x.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        self.cut()
        try:
            self.listener.close()
        except OSError:
            pass
        for t in self._threads:
            t.join(5)


def proxy_ssh_config(sshd: Any, proxy: TcpProxy, path: str | os.PathLike, alias: str = "via-proxy") -> str:
    """An ssh_config whose `alias` reaches the test sshd through `proxy` (host key as for the sshd)."""
    Path(path).write_text(
        f"Host {alias}\n"
        f"  HostName 127.0.0.1\n"
        f"  Port {proxy.port}\n"
        f"  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key_path}\n"
        f"  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {sshd.known_hosts_path}\n"
        f"  HostKeyAlias [127.0.0.1]:{sshd.port}\n"
    )
    return os.fspath(path)
