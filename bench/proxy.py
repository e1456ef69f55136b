"""A byte-counting TCP forwarder on 127.0.0.1.

Both tools' SSH connections go through the same proxy in front of the bench's
sshd, so "bytes on the wire" is measured the same way for rsync (OpenSSH) and
dirsync (paramiko): every byte of the TCP stream each way, SSH handshake,
encryption and MAC overhead included.

Each connection gets two pump threads.  On Linux the pumps use splice(2)
(socket -> pipe -> socket, no copies through Python), so the proxy costs little
CPU even at several hundred MB/s; elsewhere they fall back to recv/sendall.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time

_SPLICE = hasattr(os, "splice")
_PIPE_SIZE = 1 << 20


class _Conn:
    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self.done = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def finish_one(self) -> None:
        with self.lock:
            self.done += 1
            last = self.done == 2
        if last:
            for s in (self.client, self.server):
                try:
                    s.close()
                except OSError:
                    pass
            self.closed.set()

    def abort(self) -> None:
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class CountingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((listen_host, 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns: list[_Conn] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    # -- public -----------------------------------------------------------
    def start(self) -> "CountingProxy":
        self._thread.start()
        return self

    def snapshot(self) -> tuple[int, int, int]:
        """(bytes client->server, bytes server->client, connections) so far."""
        with self._lock:
            conns = list(self.conns)
        return sum(c.up for c in conns), sum(c.down for c in conns), len(conns)

    def settle(self, since_conns: int, timeout: float = 5.0) -> bool:
        """Wait until every connection opened after ``since_conns`` has closed, so the
        last bytes of a finished command are counted.  False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = [c for c in self.conns[since_conns:] if not c.closed.is_set()]
            if not pending:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pending[0].closed.wait(min(left, 0.05))

    def stop(self) -> None:
        self._stopping = True
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self.conns)
        for c in conns:
            c.abort()

    # -- internals --------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, server)
            with self._lock:
                self.conns.append(conn)
            for src, dst, attr in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=(conn, src, dst, attr), daemon=True,
                                 name=f"proxy-{attr}").start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, attr: str) -> None:
        try:
            if _SPLICE:
                self._pump_splice(conn, src, dst, attr)
            else:
                self._pump_copy(conn, src, dst, attr)
        except OSError:
            conn.abort()
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.finish_one()

    @staticmethod
    def _pump_copy(conn: _Conn, src: socket.socket, dst: socket.socket, attr: str) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        total = 0
        while True:
            n = src.recv_into(buf)
            if not n:
                return
            dst.sendall(view[:n])
            total += n
            setattr(conn, attr, total)

    @staticmethod
    def _pump_splice(conn: _Conn, src: socket.socket, dst: socket.socket, attr: str) -> None:
        r, w = os.pipe()
        try:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except (OSError, AttributeError):
                pass
            sfd, dfd = src.fileno(), dst.fileno()
            total = 0
            while True:
                n = os.splice(sfd, w, _PIPE_SIZE)
                if n == 0:
                    return
                left = n
                while left:
                    left -= os.splice(r, dfd, left)
                total += n
                setattr(conn, attr, total)
        finally:
            os.close(r)
            os.close(w)
