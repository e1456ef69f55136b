"""Channels that are local processes: the agent started directly (tests, `pipe`) or through an
external ssh client (DIRSYNC_RSH, e.g. OpenSSH). Kept apart from ssh.py so that neither needs
paramiko imported (about 170 ms).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shlex
import subprocess
import tempfile

from dirsync.errors import ConnectError
from dirsync.runtime import widen_pipe

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import IO, Any, Sequence

STDERR_KEEP = 64 * 1024
"""Bytes of the remote stderr kept for error messages (the tail)."""


def rsh_argv(rsh: str, ep: Any, opts: Any, command: str) -> list[str]:
    """The command line that runs `command` on `ep` through an external ssh client (`rsh`,
    split like a shell would: e.g. "ssh" or "ssh -c aes128-gcm@openssh.com"), OpenSSH-style
    options from the transport options. That client does its own host-key checking (its
    known_hosts, not dirsync's) and reads its own config; it never prompts (BatchMode)."""
    argv = shlex.split(rsh)
    if not argv:
        raise ConnectError("the ssh client command (--rsh or DIRSYNC_RSH) is empty")
    argv += ["-T", "-x", "-a", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, math.ceil(opts.connect_timeout))}"]
    if opts.accept_new_host_key:
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
    if opts.ssh_config:
        argv += ["-F", os.fspath(opts.ssh_config)]
    if opts.identity:
        argv += ["-i", os.fspath(opts.identity)]
    port = opts.port if opts.port is not None else ep.port
    if port is not None:
        argv += ["-p", str(port)]
    if ep.user:
        argv += ["-l", ep.user]
    return argv + ["--", ep.host, command]


def _lost(label: str, why: str, stderr: str = "") -> ConnectError:
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    msg = f"connection lost to {label}: {why}"
    if tail:
        msg += f" (remote said: {tail[0][:300]})"
    return ConnectError(msg)


class SubprocessChannel:
    """A local process whose stdin/stdout are the pipe (borg's ``__testsuite__`` trick).

    No reader thread: stderr goes to an unlinked temp file, so the child can
    never block on a full stderr pipe.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        label: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.label = label or f"local agent ({os.path.basename(argv[0])})"
        self._timeout: float | None = None
        self._stderr_file: IO[bytes] = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr_file,
                bufsize=0,
                env=env,
                cwd=cwd,
            )
        except OSError as e:
            self._stderr_file.close()
            raise ConnectError(f"cannot start {self.label}: {e.strerror or e}") from e
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._in = self._proc.stdin
        self._out = self._proc.stdout
        os.set_blocking(self._in.fileno(), False)
        widen_pipe(self._in.fileno())
        widen_pipe(self._out.fileno())

    def settimeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    def _why_dead(self, default: str) -> str:
        rc = self._proc.poll()
        return default if rc is None else f"agent exited with status {rc}"

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        fd = self._in.fileno() if not self._in.closed else -1
        if fd < 0:
            raise _lost(self.label, "send after send_eof")
        while view:
            try:
                _, w, _ = select.select([], [fd], [], self._timeout)
                if not w:
                    raise _lost(self.label, f"could not send for {self._timeout:g} s", self.stderr_text())
                k = os.write(fd, view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise _lost(self.label, self._why_dead("broken pipe"), self.stderr_text()) from e
            view = view[k:]

    def recv(self, n: int) -> bytes:
        fd = self._out.fileno()
        r, _, _ = select.select([fd], [], [], self._timeout)
        if not r:
            raise _lost(self.label, f"no data for {self._timeout:g} s", self.stderr_text())
        try:
            return os.read(fd, n)
        except OSError as e:
            raise _lost(self.label, f"receive failed: {e.strerror}", self.stderr_text()) from e

    def send_eof(self) -> None:
        with contextlib.suppress(OSError):
            self._in.close()

    def stderr_text(self) -> str:
        f = self._stderr_file
        if f.closed:
            return ""
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - STDERR_KEEP))
        return f.read().decode("utf-8", "replace")

    def exit_status(self) -> int | None:
        return self._proc.poll()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self, grace_s: float = 2.0) -> None:
        """Close the pipes; wait ``grace_s`` for the process to exit, then terminate, then kill it."""
        self.send_eof()
        with contextlib.suppress(OSError):
            self._out.close()
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            try:
                self._proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        finally:
            self._stderr_file.close()

    def __enter__(self) -> SubprocessChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
