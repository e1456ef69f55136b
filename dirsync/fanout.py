"""Fan-out to several replicas at the same time: one forked worker per replica, a few at once.

A run to several replicas used to take them one after another. Their turns share nothing but
the master's scan (read-only here), and each is mostly its own CPU, disk or link work (its
cache, its plan, its writes and flushes, its agent), so sync.py hands them to forked workers,
default_jobs() at once (--jobs). A worker gets this process's memory as it is (the master
scan; a local replica opened early, with its pair lock) and does the replica's whole turn
(sync._replica_turn: connect if remote, sync, status record, unlock); what it has to say goes
to this process, which alone prints (see WorkerReporter). A remote replica is connected by its
worker, never before the fork: paramiko runs threads, and a process with threads must not
fork (state.fork_child).

Worker -> parent, over a pipe, frames of one kind byte and an 8-byte little-endian number:
  b"b" n     the worker's progress bar would begin with n bytes to go
  b"p" n     n more bytes done
  b"r" n     then n bytes: pickle of (ReplicaSummary, [(Reporter method, args), ...])
A worker that dies before its b"r" frame leaves its replica failed (exit 1), said so here.
"""

from __future__ import annotations

import os
import pickle
import select
import signal

from dirsync import apply
from dirsync.apply import ReplicaSummary
from dirsync.errors import ExitCode
from dirsync.progress import Reporter
from dirsync.state import fork_answering

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable

def default_jobs() -> int:
    """Workers at once unless --jobs says: one per core, and at least four (a 1% change to three
    1.4 GB replicas on 2 cores: 1.23 s one by one, 1.04 s two at a time, 0.93 s all three: a
    turn waits on its disk often enough for a third to use the CPU)."""
    return max(4, os.cpu_count() or 1)


PROGRESS_STEP = 1 << 20  # a worker reports progress in steps of this many bytes (and at each end)
_HEAD = 9  # a frame's kind byte and 8-byte number


class WorkerReporter(Reporter):
    """A worker's reporter: progress goes to the parent as it happens; what the run says
    (info, warnings, errors) is kept and sent with the summary, for the parent to say in
    replica order: the same lines, in the same order, as when the replicas ran one by one."""

    def __init__(self, fd: int) -> None:  # (no Reporter.__init__: nothing is printed or logged here)
        self.fd = fd
        self.quiet = False
        self.show_info = True
        self.log = None
        self.said: list[tuple[str, tuple]] = []
        self._unsent = 0

    def info(self, msg: str) -> None:
        self.said.append(("info", (msg,)))

    def warn(self, msg: str) -> None:
        self.said.append(("warn", (msg,)))

    def error(self, msg: str) -> None:
        self.said.append(("error", (msg,)))

    def fatal(self, msg: str, hint: str | None = None) -> None:
        self.said.append(("fatal", (msg, hint)))

    def begin(self, label: str, total: int) -> None:
        self._send(b"b", total)

    def advance(self, n: int) -> None:
        self._unsent += n
        if self._unsent >= PROGRESS_STEP:
            self.end()

    def end(self) -> None:
        if self._unsent:
            self._send(b"p", self._unsent)
            self._unsent = 0

    def answer(self, summary: ReplicaSummary) -> None:
        self.end()
        summary.on_progress = None  # (this reporter's method: not for the parent)
        data = pickle.dumps((summary, self.said), protocol=pickle.HIGHEST_PROTOCOL)
        self._write(b"r" + len(data).to_bytes(8, "little") + data)

    def _send(self, kind: bytes, n: int) -> None:
        self._write(kind + n.to_bytes(8, "little"))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


class _Worker:
    """The parent's side of one worker: its replica, pid, what it took over, and its frames."""

    def __init__(self, spec: str, pid: int, opened) -> None:
        self.spec, self.pid, self.opened = spec, pid, opened
        self.buf = bytearray()
        self.answer: tuple[ReplicaSummary, list] | None = None

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """Take bytes from the pipe; returns the progress frames now complete."""
        self.buf += data
        out = []
        while len(self.buf) >= _HEAD and self.answer is None:
            kind, n = bytes(self.buf[:1]), int.from_bytes(self.buf[1:_HEAD], "little")
            if kind != b"r":
                out.append((kind, n))
                del self.buf[:_HEAD]
            elif len(self.buf) >= _HEAD + n:
                self.answer = pickle.loads(bytes(self.buf[_HEAD:_HEAD + n]))  # (our own child's)
                del self.buf[:_HEAD + n]
            else:
                break
        return out

    def finish(self, fd: int) -> tuple[ReplicaSummary, list]:
        """The pipe is at its end (or given up): reap the worker, drop this process's copy of
        what it took over, and return its answer, or a failed summary saying how it ended."""
        os.close(fd)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = None
        if self.opened is not None:
            self.opened.forget()
        if self.answer is not None:
            return self.answer
        how = ("vanished" if code is None else f"was killed by signal {-code}" if code < 0
               else f"failed (exit status {code})")
        fatal = f"the process syncing this replica {how}; nothing more is known of this run there"
        summary = ReplicaSummary(replica=self.spec, status="failed", exit_code=int(ExitCode.ERROR), fatal=fatal)
        return summary, [("fatal", (f"{self.spec}: {fatal}", "run it again: files are replaced atomically, "
                                    "so the replica holds no half-written file"))]


def run_turns(specs: list[str], turn: Callable[[str, dict, Reporter], ReplicaSummary], early: dict,
              reporter: Reporter, jobs: int = 0) -> dict[str, tuple[ReplicaSummary, list]]:
    """Run turn(spec, {spec: its early-opened replica}, reporter) for each spec in a forked
    worker, `jobs` at once (0: default_jobs()). Returns spec -> (summary, what its worker
    said). A spec missing from the result was not started (no fork was possible): the caller
    takes its turn itself, its early entry still in `early`.

    Interrupts: workers ignore SIGINT (Ctrl-C reaches the whole process group); when this loop
    is left by an exception (KeyboardInterrupt from Ctrl-C or SIGTERM among them), each worker
    still running gets one SIGTERM, so that it unwinds once (temps removed, lock dropped) as a
    run does on SIGTERM, and is waited for."""
    jobs = jobs or default_jobs()
    pending = list(specs)
    running: dict[int, _Worker] = {}
    done: dict[str, tuple[ReplicaSummary, list]] = {}
    total, begun = 0, False
    try:
        while pending or running:
            while pending and len(running) < jobs:
                spec = pending[0]
                opened = {spec: early[spec]} if spec in early else {}  # (a remote one: its worker connects)
                got = fork_answering(lambda fd, spec=spec, opened=opened: _work(fd, spec, opened, turn))
                if got is None:
                    pending.clear()  # (a thread appeared: the rest go one by one, in the caller)
                    break
                pending.pop(0)
                running[got[1]] = _Worker(spec, got[0], early.pop(spec, None))
            if not running:
                break
            for fd in select.select(list(running), [], [])[0]:
                w = running[fd]
                data = os.read(fd, 1 << 16)
                if not data:
                    del running[fd]
                    done[w.spec] = w.finish(fd)
                    continue
                for kind, n in w.feed(data):
                    if kind == b"b":
                        total += n
                        if begun:
                            reporter.grow(n)
                        else:
                            reporter.begin(f"{len(specs)} replicas", total)
                            begun = True
                    elif kind == b"p":
                        reporter.advance(n)
    finally:
        for fd, w in running.items():  # (only when this loop was left by an exception)
            try:
                os.kill(w.pid, signal.SIGTERM)
            except OSError:
                pass
            done[w.spec] = w.finish(fd)
        if begun:
            reporter.end()
    return done


def _work(fd: int, spec: str, opened: dict, turn: Callable[[str, dict, Reporter], ReplicaSummary]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards an interrupt once (run_turns)
    apply.split_writers = False  # (the sibling workers keep the other cores busy)
    out = WorkerReporter(fd)
    out.answer(turn(spec, opened, out))
