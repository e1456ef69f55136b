"""Run a Plan against a replica: read master bytes for send ops, feed the replica writer, collect outcomes.

`apply_actions` is the one action loop; it runs in-process for local replicas and inside the
agent for remote ones. Item failures become outcomes; only transport or fatal errors raise.
"""

from __future__ import annotations

import bisect
import os
import stat
import time
from itertools import accumulate

import xxhash

from dirsync.errors import ItemError, ItemIOError, SourceChangedError
from dirsync.manifest import DIGEST_SIZE, FileEntry, is_under, parent_of
from dirsync.plan import Action, Commit, CopyOp, Delete, MakeDir, MakeLink, MoveDir, SendOp, SetMeta, WriteFile
from dirsync.record import Record
from dirsync.scan import _files

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable, Iterator

READ_BLOCK = 8 << 20


class Sink:
    """(An interface.) Receives outcomes in order. Implemented by ReplicaSummary (and the agent's result sender)."""

    def staged(self, w: WriteFile) -> None: ...
    def done(self, a: Action, path: str) -> None: ...
    def failed(self, path: str, err: ItemError) -> None: ...
    def warn(self, msg: str) -> None: ...


def apply_actions(replica, actions, sends_for: Callable[[WriteFile], Iterator[bytes]], sink: Sink,
                  should_stop: Callable[[], bool] = lambda: False, split: bool = False) -> None:
    """Carry out `actions` in order on `replica` (a replica.Replica).

    A commit's flush may still be running while the next files are staged, unless one copies
    from a path that commit puts in place (a plan never does: see plan._writes_with_commits);
    any other action first waits for that commit to finish, so every action sees the replica
    as the plan's order says.
    `split`: a plan that writes many new files may hand a share of them to a second writer
    process (see _Helper); `sends_for` must then work in a forked child (a MasterReader's)."""
    helpers: list[_Helper] = []  # the running helper, while there is one
    share = _split_share(actions, replica.backup is None) if split and split_writers else None
    if share is not None:
        actions = _with_helper(replica, actions, share, sends_for, sink, helpers)
    staged_ok: dict[str, WriteFile] = {}
    pending = None  # a started commit (replica.commit_start), not yet finished
    pending_paths: frozenset[str] = frozenset()  # the paths it puts in place

    def finish() -> None:
        nonlocal pending
        if pending is None:
            return
        c, pending = pending, None
        for p, err in replica.commit_finish(c):
            if err is None:
                sink.done(staged_ok.pop(p), p)
            else:
                staged_ok.pop(p, None)
                sink.failed(p, err)

    published = False
    lost: list[str] = []  # new directories publish could not put in place (their error is reported)

    def publish() -> None:  # the directories made under temp names go in place (Replica.publish)
        nonlocal published
        published = True
        for p, err in replica.publish():
            sink.failed(p, err)
            lost.append(p)

    new_max, source = _new_batching(replica, sends_for)
    try:
        for a in (_batched(actions, replica, new_max) if new_max else actions):
            if should_stop():
                break
            if a.__class__ is list or a.__class__ is NewWrites:  # new small files (Replica.stage_new)
                _stage_new(replica, a, a.source if a.__class__ is NewWrites else source, lost, sends_for, sink,
                           staged_ok)
                continue
            if pending is not None and not (a.__class__ is WriteFile and not _copies_from(a.ops, pending_paths)):
                finish()
            if not published and not isinstance(a, (WriteFile, Commit, MakeDir, MoveDir)):
                publish()
            if isinstance(a, Commit):
                try:
                    pending = replica.commit_start(a.paths)
                    pending_paths = frozenset(a.paths)
                except ItemError as e:
                    sink.failed("", e)
                continue
            if lost and any(is_under(a.path, p) for p in lost):
                continue  # (its metadata, or a link in it: one error said it is not there)
            _apply_one(replica, a, sends_for, sink, staged_ok)
        if helpers:  # stopped early: so is the helper, before anything is published
            helpers.pop().join(replica, sink, stop=True)
        finish()
        if not published:
            publish()
    finally:
        finish()  # (an interrupted run: close() publishes what was committed)
        if helpers:  # (left early: stop it and take in what it did)
            helpers.pop().join(replica, sink, stop=True)


class NewWrites(list):
    """Writes of new small files an action source gives the loop together (the agent's write
    batches), for Replica.stage_new, with `source` (see there) for their bytes."""

    __slots__ = ("source",)

    def __init__(self, writes: list, source: Callable[[WriteFile], bytes | str | None]) -> None:
        super().__init__(writes)
        self.source = source


def _stage_new(replica, ws: list, source, lost: list[str], sends_for, sink: Sink, staged_ok: dict) -> None:
    """Stage writes of new small files with Replica.stage_new; each it leaves goes through
    stage() (_apply_one), with the bytes `source` gave for it when it gave bytes."""
    if lost:
        ws = [w for w in ws if not any(is_under(w.path, p) for p in lost)]
    left = replica.stage_new(ws, source)
    for w in ws:
        if left and id(w) in left:
            given = left[id(w)]
            _apply_one(replica, w, sends_for if given.__class__ is not bytes else (lambda _w, d=given: WholeSends(d)),
                       sink, staged_ok)  # (it writes it, or says why not)
        else:
            staged_ok[w.path] = w
            sink.staged(w)


def _new_batching(replica, sends_for) -> tuple[int, Callable | None]:
    """(batch size, source of bytes) when the loop may gather writes of new small files for
    Replica.stage_new itself (_batched): a local replica writer with the _files build, fed by
    a MasterReader in this process, not throttled (its pace is per read). Else (0, None)."""
    reader = getattr(sends_for, "__self__", None)
    if reader.__class__ is not MasterReader or reader.throttle is not None \
            or getattr(sends_for, "__func__", None) is not MasterReader.local_sends:
        return 0, None
    n = getattr(replica, "new_batch_max", None)
    return (n(), reader.new_source) if n is not None and n() > 1 else (0, None)


def _batched(actions, replica, most: int) -> Iterator:
    """`actions` with each run of writes that Replica.may_stage_new takes (up to `most`, and
    none a commit of the run would have to wait for: they are new paths) gathered in a list.
    Reads one action past a run (to see that it ends): an action source that does work as it
    is asked (apply._with_helper's) does it that much earlier, which only joins its helper."""
    run: list = []
    may = replica.may_stage_new
    for a in actions:
        if a.__class__ is WriteFile and may(a):
            run.append(a)
            if len(run) < most:
                continue
            a = None
        if run:
            yield run if len(run) > 1 else run[0]
            run = []
        if a is not None:
            yield a
    if run:
        yield run if len(run) > 1 else run[0]


def _copies_from(ops: tuple, paths: frozenset[str]) -> bool:
    """Does any of these write ops copy from one of `paths` on the replica?"""
    if len(ops) == 1:  # (a new file's usual plan: decided without a generator)
        return ops[0].__class__ is CopyOp and ops[0].src in paths
    return any(o.__class__ is CopyOp and o.src in paths for o in ops)


def _apply_one(replica, a, sends_for: Callable[[WriteFile], Iterator[bytes]], sink: Sink,
               staged_ok: dict[str, WriteFile]) -> None:
    """One action other than a commit; an item error is recorded and the run goes on."""
    try:
        if isinstance(a, WriteFile):
            sends = sends_for(a)
            try:
                replica.stage(a, sends)
            finally:
                close = getattr(sends, "close", None)
                if close:
                    close()
            staged_ok[a.path] = a
            sink.staged(a)
        elif isinstance(a, MakeDir):
            replica.make_dir(a)
            sink.done(a, a.path)
        elif isinstance(a, MoveDir):
            replica.move_dir(a)
            sink.done(a, a.path)
        elif isinstance(a, MakeLink):
            replica.make_link(a)
            sink.done(a, a.path)
        elif isinstance(a, SetMeta):
            replica.set_meta(a)
            sink.done(a, a.path)
        elif isinstance(a, Delete):
            warning = replica.delete(a)
            if warning:
                sink.warn(warning)
            else:
                sink.done(a, a.path)
    except ItemError as e:
        sink.failed(getattr(a, "path", ""), e)


# -- a second writer process ---------------------------------------------------------------
# Creating and writing a small file costs ~30-100 us of kernel time here, and the writer's
# Python about as much again: an initial copy of 100,000 files kept one core busy for ~10 s
# while the other idled. So a plan's files are shared with a forked helper when there are
# many. Only files no other action depends on go to it, committed in the plan's first stretch
# of writes and commits (not after a type change's clears): new paths built from sent bytes
# alone (no reuse source), and (for a local replica without backups) files that replace a
# file at their own path, reusing bytes of that file only, which no other write of the
# stretch reads (a release step's edits: creating each temp cost ~100-300 us of kernel time
# here, on an ext4 without a journal that skips recently freed inodes). The helper takes the
# second half of them by cost, whole directories (two processes creating in one directory
# contend for it), with its share of each commit; the parent does the rest and waits for it
# where that stretch ends, before anything that could depend on those files (directory
# times, deletions, publishing).

SPLIT_MIN = 1000  # new files a plan must write before a helper takes a share
# ... or files that replace others (_replaces_alone). Measured: a source release step's 375
# edits (and 50 new files) took ~50 ms less to apply shared, 157 ms against 207 (6 runs each).
SPLIT_MIN_EDITS = 200
FILE_COST = 150_000  # one more file's cost in bytes' worth (~100 us against ~1.5 GB/s)
split_writers = True  # off in fan-out workers: their siblings keep the other cores busy


def _independent(a) -> bool:
    return (a.__class__ is WriteFile and a.expect is None and not a.move and not a.derive
            and all(o.__class__ is SendOp for o in a.ops))


def first_stretch(actions) -> tuple[int, int, set[str]]:
    """(start, end, committed): the plan's first stretch of writes and commits is
    actions[start:end]; `committed` holds the paths its commits commit."""
    n = len(actions)
    start = 0
    while start < n and actions[start].__class__ is not WriteFile:
        start += 1
    end = start
    committed: set[str] = set()
    while end < n and actions[end].__class__ in (WriteFile, Commit):
        if actions[end].__class__ is Commit:
            committed.update(actions[end].paths)
        end += 1
    return start, end, committed


def sharable(a, committed: set[str]) -> bool:
    """May a helper writer take write `a` (see _split_share)? `committed`: first_stretch's."""
    return _independent(a) and a.path in committed


def _replaces_alone(a, committed: set[str], read: set[str]) -> bool:
    """Is `a` a write that replaces the file at its own path, reusing bytes of that file only,
    which no other write of the stretch reads (`read`)? Its helper then touches nothing the
    parent does: it builds, checks (expect) and renames over that one path."""
    if a.__class__ is not WriteFile or a.move or a.derive or a.expect is None or a.expect[0] != "f":
        return False
    p = a.path
    return p in committed and p not in read and all(o.__class__ is SendOp or o.src == p for o in a.ops)


def _alone_in_stretch(actions, start: int, end: int, committed: set[str]) -> list[int] | None:
    """The indexes of actions[start:end] (first_stretch's) that _replaces_alone, when there are
    SPLIT_MIN_EDITS or more of them; else None."""
    read = {o.src for i in range(start, end) if (a := actions[i]).__class__ is WriteFile
            for o in a.ops if o.__class__ is CopyOp and o.src != a.path}
    alone = [i for i in range(start, end) if _replaces_alone(actions[i], committed, read)]
    return alone if len(alone) >= SPLIT_MIN_EDITS else None


def _split_share(actions, replaces: bool = False) -> tuple[list, list, int, int] | None:
    """(the parent's actions, the helper's, where the helper starts, where the parent waits for
    it), both as indexes into the parent's list, which equals `actions` up to the first; None
    when the plan has too few files to share. `replaces`: files that replace others may be
    shared too (_replaces_alone: not with backups, whose folder both processes would make)."""
    start, end, committed = first_stretch(actions)
    cand = [i for i in range(start, end) if sharable(actions[i], committed)]
    if replaces and len(cand) < SPLIT_MIN:
        alone = _alone_in_stretch(actions, start, end, committed)
        if alone is None:
            return None
        cand = sorted(set(alone).union(cand))
    elif len(cand) < SPLIT_MIN:
        return None
    costs = [actions[i].target.size + FILE_COST for i in cand]
    left = sum(costs) / 2
    cut = len(cand)
    for k, c in enumerate(costs):  # the helper's share starts with the directory after the middle
        left -= c
        if left <= 0:
            last = parent_of(actions[cand[k]].path)
            cut = k + 1
            while cut < len(cand) and parent_of(actions[cand[cut]].path) == last:
                cut += 1
            break
    theirs_at = set(cand[cut:])
    if not theirs_at:
        return None
    theirs_paths = {actions[i].path for i in theirs_at}
    mine, theirs = list(actions[:start]), []
    for i in range(start, end):
        a = actions[i]
        if i in theirs_at:
            theirs.append(a)
        elif a.__class__ is Commit:
            m = tuple(p for p in a.paths if p not in theirs_paths)
            t = tuple(p for p in a.paths if p in theirs_paths)
            if m:
                mine.append(Commit(m))
            if t:
                theirs.append(Commit(t))
        else:
            mine.append(a)
    wait_at = len(mine)
    mine.extend(actions[end:])
    return mine, theirs, start, wait_at


def _with_helper(replica, actions, share, sends_for, sink: Sink, helpers: list) -> Iterator:
    """`actions` as the loop should see them, with a helper forked where its share begins
    (before that, only directories were made: nothing is staged or in flight) and waited
    for where the shared stretch ends. Without a fork (another thread runs, or it fails) the
    plan goes on whole here. A helper left running is in `helpers` (the loop stops it)."""
    mine, theirs, start, wait_at = share
    yield from actions[:start]  # (the loop carries out each action before asking for the next)
    helper = _Helper.start(replica, theirs, sends_for) if replica.can_fork_helper() else None
    if helper is None:
        yield from actions[start:]
        return
    helpers.append(helper)
    for k in range(start, wait_at):
        if not (k - start) & 31:
            helper.take(replica, sink)
        yield mine[k]
    helpers.remove(helper)
    helper.join(replica, sink)
    yield from mine[wait_at:]


_FRAME = 4  # the helper's frames: a 4-byte little-endian length, then a pickled list of events


class _HelperSink:
    """The helper's sink: each outcome goes to the parent as an event (sent in batches):
    (0, i) theirs[i] staged; (1, i, ino, ctime_ns, trusted, digests) theirs[i] committed (the
    chunk digests it derived for a derived write, else None); (2, path, error) failed; (3, rel)
    a fresh directory tainted; (4,) the helper ended normally; (5, msg) warning; (6, why) the
    helper failed as a whole (an exception left its loop)."""

    def __init__(self, fd: int, theirs: list, replica) -> None:
        import _pickle as pickle  # (not pickle.py: see scan._send)

        self.dumps = pickle.dumps
        self.fd = fd
        self.replica = replica
        self.events: list[tuple] = []
        self.index = {a.path: i for i, a in enumerate(theirs) if a.__class__ is WriteFile}

    def staged(self, w: WriteFile) -> None:
        self._add((0, self.index[w.path]))

    def done(self, a: Action, path: str) -> None:
        e = self.replica.current[path]
        self._add((1, self.index[path], e.ino, e.ctime_ns, e.trusted, e.digests if a.derive else None))

    def failed(self, path: str, err: ItemError) -> None:
        self._add((2, path, err))

    def warn(self, msg: str) -> None:
        self._add((5, msg))

    def _add(self, event: tuple) -> None:
        self.events.append(event)
        if len(self.events) >= 256:
            self.flush()

    def flush(self) -> None:
        if self.events:
            data = self.dumps(self.events, protocol=5)
            self.events = []
            view = memoryview(len(data).to_bytes(_FRAME, "little") + data)
            while view:
                view = view[os.write(self.fd, view):]


def _helper_main(fd: int, replica, theirs: list, sends_for, stream=None) -> None:
    """The helper process: its share of the plan (`theirs`; or stream(sink), its actions as
    they come: see _Helper.start_fed), then its end (see Replica.end_helper). An interrupt
    reaches it from the parent only (one SIGTERM): it stops after the action at hand, as the
    parent's loop does, and commits what it staged up to that point."""
    import signal

    stop: list[int] = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    replica.become_helper()
    out = _HelperSink(fd, theirs, replica)
    ended = False
    try:
        apply_actions(replica, theirs if stream is None else stream(out), sends_for, out, lambda: bool(stop))
        ended = True
    except BaseException as e:  # (a bug, or a fatal error: the parent reports its files failed)
        out.events.append((6, f"{type(e).__name__}: {e}"))
        raise
    finally:
        try:
            for rel in replica.end_helper():
                out.events.append((3, rel))
        finally:
            if ended:
                out.events.append((4,))
            out.flush()


class _Helper:
    """The parent's end of a helper writer: takes in its events (take, join) as they come."""

    def __init__(self, pid: int, fd: int, theirs: list, wfd: int = -1) -> None:
        self.pid, self.fd, self.theirs = pid, fd, theirs
        self.wfd = wfd  # a fed helper's input (see start_fed, send); -1 once closed
        self.fed = wfd >= 0
        self.buf = b""
        self.heard: set[str] = set()  # paths of its files with an outcome (committed or failed)
        self.staged_seen: set[int] = set()  # its files (places in theirs) it said it staged
        self.by_path: dict[str, WriteFile] | None = None  # its writes by path (see _event)
        self.failures: list[tuple[str, ItemError]] = []  # said after the parent's own, at join
        self.ended = False
        self.why = "its writer process died before committing it"  # for files it said nothing of

    @classmethod
    def start(cls, replica, theirs: list, sends_for) -> "_Helper | None":
        from dirsync.runtime import widen_pipe
        from dirsync.state import fork_answering

        got = fork_answering(lambda fd: _helper_main(fd, replica, theirs, sends_for))
        if got is None:
            return None
        pid, fd = got
        widen_pipe(fd)
        os.set_blocking(fd, False)
        return cls(pid, fd, theirs)

    @classmethod
    def start_fed(cls, replica, child_main: Callable[[int, int], None]) -> "_Helper | None":
        """Fork a helper whose actions come one message at a time (send): child_main(events
        fd, input fd) runs in it (it must end in _helper_main with a stream). It may be forked
        beside another thread (the agent's pinger): the child takes no lock that thread may
        hold (it makes syscalls, threads of its own for commit flushes, and talks through its
        own two pipes only)."""
        from dirsync.runtime import widen_pipe
        from dirsync.state import fork_answering

        rfd, wfd = os.pipe()

        def work(fd: int) -> None:
            os.close(wfd)
            child_main(fd, rfd)

        got = fork_answering(work, threads_ok=True)
        os.close(rfd)
        if got is None:
            os.close(wfd)
            return None
        pid, fd = got
        widen_pipe(fd)
        os.set_blocking(fd, False)
        widen_pipe(wfd)
        os.set_blocking(wfd, False)
        return cls(pid, fd, [], wfd)

    def send(self, msg: tuple, writes: list, replica, sink: Sink) -> bool:
        """Give a fed helper one message (pickled), `writes` the files it brings (its outcomes
        name them by their place in `theirs`). What the helper says meanwhile is taken in (it
        may be waiting for us to read before it reads on). False: it is gone (join says so)."""
        import _pickle as pickle  # (not pickle.py: see scan._send)
        import select

        self.theirs.extend(writes)
        if self.wfd < 0:
            return False
        data = pickle.dumps(msg, protocol=5)
        view = memoryview(len(data).to_bytes(_FRAME, "little") + data)
        while view:
            try:
                view = view[os.write(self.wfd, view):]
            except BlockingIOError:
                select.select([self.fd], [self.wfd], [])
                self.take(replica, sink)
            except BrokenPipeError:
                os.close(self.wfd)
                self.wfd = -1
                return False
        self.take(replica, sink)
        return True

    def take(self, replica, sink: Sink) -> None:
        """Take in what the helper has said so far, without waiting."""
        try:
            while data := os.read(self.fd, 1 << 20):
                self._feed(data, replica, sink)
        except BlockingIOError:
            pass

    def join(self, replica, sink: Sink, stop: bool = False) -> None:
        """Wait for the helper's end (`stop`: ask it to stop first) and take in all it said.
        Files a helper that died or failed said nothing of are reported failed, and what it may
        have left of them at their names in fresh directories is removed; one found in place
        elsewhere, exactly its target, is reported written (Replica.orphaned)."""
        try:
            if self.wfd >= 0:  # a fed helper: its input ends here (it commits what it was told, then ends)
                os.close(self.wfd)
                self.wfd = -1
            if stop:
                self._stop()
            os.set_blocking(self.fd, True)
            try:
                while data := os.read(self.fd, 1 << 20):
                    self._feed(data, replica, sink)
            except BaseException:  # interrupted while waiting: the helper stops too, then goes
                self._stop()
                raise
        finally:
            os.close(self.fd)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            replica.helper_joined()
        if not self.ended or self.fed:  # (a fed helper's files all have their commit before its input ends)
            why = self.why if not self.ended else "its writer process was never told to commit it"
            for i, a in enumerate(self.theirs):
                if a.__class__ is WriteFile and a.path not in self.heard:
                    if replica.orphaned(a):  # committed after all: its outcome was lost with it
                        if i not in self.staged_seen:
                            sink.staged(a)
                        sink.done(a, a.path)
                    else:
                        sink.failed(a.path, ItemIOError(a.path, "write", why))
        for path, err in self.failures:
            sink.failed(path, err)

    def _stop(self) -> None:
        import signal

        try:
            os.kill(self.pid, signal.SIGTERM)
        except OSError:
            pass

    def _feed(self, data: bytes, replica, sink: Sink) -> None:
        import _pickle as pickle  # (not pickle.py: see scan._send)

        buf = self.buf + data
        pos = 0
        while len(buf) - pos >= _FRAME:
            size = int.from_bytes(buf[pos:pos + _FRAME], "little")
            if len(buf) - pos - _FRAME < size:
                break
            events = pickle.loads(buf[pos + _FRAME:pos + _FRAME + size])
            pos += _FRAME + size
            for ev in events:
                self._event(ev, replica, sink)
        self.buf = buf[pos:]

    def _event(self, ev: tuple, replica, sink: Sink) -> None:
        kind = ev[0]
        if kind == 0:
            self.staged_seen.add(ev[1])
            sink.staged(self.theirs[ev[1]])
        elif kind == 1:
            w = self.theirs[ev[1]]
            replica.adopt(w, ev[2], ev[3], ev[4], ev[5])
            self.heard.add(w.path)
            sink.done(w, w.path)
        elif kind == 2:
            self.heard.add(ev[1])
            self.failures.append((ev[1], ev[2]))
            if not self.fed:  # (a fed helper's files reuse nothing: new files sent whole)
                if self.by_path is None:  # (theirs is fixed: built once, at the first failure)
                    self.by_path = {a.path: a for a in self.theirs if a.__class__ is WriteFile}
                w = self.by_path.get(ev[1])
                if w is not None:
                    replica.distrust_sources(w)
        elif kind == 3:
            replica.taint(ev[1])
        elif kind == 4:
            self.ended = True
        elif kind == 5:
            sink.warn(ev[1])
        elif kind == 6:
            self.why = f"its writer process failed before committing it ({ev[1]})"


def fed_messages(rfd: int) -> Iterator[tuple]:
    """In a fed helper: the messages _Helper.send wrote to `rfd`, until it is closed."""
    import _pickle as pickle  # (not pickle.py: see scan._send)

    buf = b""
    while True:
        while len(buf) < _FRAME or len(buf) - _FRAME < int.from_bytes(buf[:_FRAME], "little"):
            more = os.read(rfd, 1 << 20)
            if not more:
                return
            buf += more
        size = int.from_bytes(buf[:_FRAME], "little")
        msg, buf = pickle.loads(buf[_FRAME:_FRAME + size]), buf[_FRAME + size:]
        yield msg


class MasterReader:
    """Reads send-op bytes from master files, checking every chunk against the scanned digest."""

    def __init__(self, root: str, throttle: Callable[[int], None] | None = None,
                 held: dict[str, tuple[bytes, bytes]] | None = None) -> None:
        self.root = root
        self.throttle = throttle
        self.held = held or {}  # path -> (whole digest, bytes) the master scan kept (ScanResult.held)
        # Throttled reads go in smaller runs (about 1/4 s of data each) so the pace stays even.
        rate = getattr(throttle, "rate", 0)
        self.block = min(READ_BLOCK, max(64 << 10, int(rate) // 4)) if rate else READ_BLOCK

    def sends(self, w: WriteFile) -> Iterator[bytes]:
        """Yield the bytes of w's send ops in order. Raises SourceChangedError (an ItemError)
        when the master file no longer matches the manifest: such a file is not committed."""
        ops = [o for o in w.ops if isinstance(o, SendOp)]
        if not ops:
            return
        t = w.target
        path = w.path
        buf = self.held_bytes(w)
        if buf is not None:
            # The very bytes the scan read and computed t.digest from: send those (the file
            # as scanned, as its manifest entry says) instead of opening and reading it again.
            for op in ops:
                if self.throttle:
                    self.throttle(op.size)
                yield buf if op.size == len(buf) else buf[op.offset:op.offset + op.size]
            return
        try:
            fd = os.open(os.path.join(self.root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceChangedError(path, "read", "vanished from the master since it was scanned") from None
        except OSError as e:
            raise ItemIOError(path, "read", e) from None
        try:
            st0 = os.fstat(fd)
            if not stat.S_ISREG(st0.st_mode) or st0.st_size != t.size or st0.st_mtime_ns != t.mtime_ns:
                raise SourceChangedError(path, "read", "changed on the master since it was scanned; it will be synced next run")
            if len(ops) == 1 and ops[0].offset == 0 and ops[0].size == t.size <= self.block:
                # The whole (small) file: one read, checked by its whole-file digest.
                try:
                    buf = os.pread(fd, t.size + 1, 0)
                except OSError as e:
                    raise ItemIOError(path, "read", e) from None
                if len(buf) != t.size or xxhash.xxh3_128_digest(buf) != t.digest:
                    raise SourceChangedError(path, "read", "changed while being read; it will be synced next run")
                if self.throttle:
                    self.throttle(t.size)
                yield buf
                return  # (no second fstat: the digest proved these are the scanned bytes)
            offsets, sizes, digests = _chunk_table(t) if ops else ([], (), None)
            for op in ops:
                i = bisect.bisect_left(offsets, op.offset)
                if i >= len(offsets) or offsets[i] != op.offset:
                    raise SourceChangedError(path, "read", "send op not on a chunk boundary")
                end = op.offset + op.size
                while i < len(offsets) and offsets[i] < end:
                    # Read a run of whole chunks (up to self.block) and verify each one.
                    j, run = i, 0
                    while j < len(offsets) and offsets[j] < end and (run == 0 or run + sizes[j] <= self.block):
                        run += sizes[j]
                        j += 1
                    try:
                        buf = os.pread(fd, run, offsets[i])
                    except OSError as e:
                        raise ItemIOError(path, "read", e) from None
                    if len(buf) != run:
                        raise SourceChangedError(path, "read", "shrank while being read; it will be synced next run")
                    view = memoryview(buf)
                    pos = 0
                    for k in range(i, j):
                        if xxhash.xxh3_128_digest(view[pos:pos + sizes[k]]) != digests[k]:
                            raise SourceChangedError(path, "read", "changed while being read; it will be synced next run")
                        pos += sizes[k]
                    if self.throttle:
                        self.throttle(run)
                    yield buf
                    i = j
            st1 = os.fstat(fd)
            if (st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns) != (st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns):
                raise SourceChangedError(path, "read", "changed while being read; it will be synced next run")
        finally:
            os.close(fd)

    def whole(self, w: WriteFile) -> bytes:
        """All the bytes of a new file whose one send op covers it (an SSH write batch's): those
        the scan held; else, not throttled, read and checked in C (_files.read_checked: as
        sends() checks them, ~10 us a file less); else (or when that fails) sends()'s."""
        t = w.target
        held = self.held_bytes(w)
        if held is not None:
            if self.throttle:
                self.throttle(t.size)
            return held
        if _files is not None and self.throttle is None and t.size and -(1 << 63) <= t.mtime_ns < 1 << 63:
            got = _files.read_checked(os.path.join(self.root, w.path), t.size, t.mtime_ns, t.digest,
                                      xxhash.xxh3_128_digest)
            if got is not None:
                return got
        return b"".join(self.sends(w))

    def new_source(self, w: WriteFile) -> bytes | str:
        """Where Replica.stage_new takes a new small file's bytes from: those the master scan
        held (exactly the bytes its digest was computed from), else the master file's path
        (read there, and checked as sends() checks it)."""
        held = self.held_bytes(w)
        return held if held is not None else os.path.join(self.root, w.path)

    def held_bytes(self, w: WriteFile) -> bytes | None:
        """The bytes of w's target the master scan held (ScanResult.held), when they are exactly
        those its digest was computed from; else None."""
        held = self.held.get(w.path)
        t = w.target
        return held[1] if held is not None and held[0] == t.digest and len(held[1]) == t.size else None

    def local_sends(self, w: WriteFile) -> Iterator[bytes]:
        """sends(w) for a replica writer in this process: for a small file whose bytes the
        master scan held (it read them: a changed file), not throttled, a WholeSends of the
        whole file, so the writer builds it from them alone instead of also opening and
        copying the replica's old version (Replica._build_whole; measured: a source release
        step's 340 small edits took ~30 ms less, about 80 us each); for a file the master
        scan trusted (racy-clean), larger than DIRECT_MIN and not throttled, a DirectSends
        whose master file the writer may copy from in the kernel instead of reading these
        bytes (see Replica._build); otherwise sends(w)."""
        t = w.target
        ops = w.ops
        if t.size < DIRECT_MIN and len(ops) == 1 and ops[0].__class__ is SendOp:
            return WholeSends(b"".join(self.sends(w)))  # (a small new file: read and checked now)
        if t.size < DIRECT_MIN and not self.throttle:
            held = self.held_bytes(w)
            if held is not None:
                return WholeSends(held, ops)  # (checked again by the writer: see there)
        if self.throttle or t.size < DIRECT_MIN or not (t.trusted and t.ino) or \
                not any(isinstance(o, SendOp) for o in w.ops):
            return self.sends(w)
        try:
            fd = os.open(os.path.join(self.root, w.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return self.sends(w)  # (reports why)
        d = DirectSends(fd, w, self.sends(w))
        try:
            d.check()
        except ItemError:
            d.close()
            return self.sends(w)  # (reports why)
        return d


DIRECT_MIN = 64 << 10  # smaller files: one read, checked by their digest, costs about as much


class WholeSends:
    """All the bytes of a write's one send op, already read (and checked): the writer takes
    them at once (take_all: Replica._build_whole) or iterates them like sends(). With `ops`
    (the write's): they are the whole target file's bytes, whatever its ops (`whole`: a writer
    in this process builds the file from them alone), and iterating yields its send ops'."""

    __slots__ = ("_data", "whole", "_pieces")

    def __init__(self, data: bytes, ops: tuple | None = None) -> None:
        self._data: bytes | None = data
        self.whole = ops is not None
        self._pieces = None if ops is None else \
            (data[o.offset:o.offset + o.size] for o in ops if o.__class__ is SendOp)

    def take_all(self) -> bytes | None:
        data, self._data = self._data, None
        return data

    def __iter__(self) -> "WholeSends":
        return self

    def __next__(self) -> bytes:
        if self._pieces is not None:
            self._data = None
            return next(self._pieces)
        data, self._data = self._data, None
        if not data:
            raise StopIteration
        return data


class DirectSends:
    """The bytes of w's send ops, as sends() yields them (read and checked chunk by chunk), or
    straight from `fd`, an open master file: a writer that copies ranges of `fd` itself must
    call check() afterwards, which proves by stat facts that they were the scanned bytes."""

    def __init__(self, fd: int, w: WriteFile, inner: Iterator[bytes]) -> None:
        self.fd = fd
        self._w = w
        self._inner = inner

    def __iter__(self) -> "DirectSends":
        return self

    def __next__(self) -> bytes:
        return next(self._inner)

    def check(self) -> None:
        """Raise SourceChangedError unless the master file is still the one the scan trusted
        (size, mtime, ctime and inode as scanned; the scan saw it unchanged for RACY_NS)."""
        t = self._w.target
        try:
            st = os.fstat(self.fd)
        except OSError as e:
            raise ItemIOError(t.path, "read", e) from None
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != (
                t.size, t.mtime_ns, t.ctime_ns, t.ino):
            raise SourceChangedError(t.path, "read", "changed on the master since it was scanned; it will be synced next run")

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close:
            close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_RATE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_rate(text: str) -> int:
    """`--bwlimit` value -> bytes per second. `500K`, `10M`, `1.5G`, `4096`; K/M/G are 1024-based
    (`KB`, `KiB`, `KB/s` are accepted too). ValueError for anything else or a rate below 1 KiB/s."""
    import re  # here: most runs have no --bwlimit

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgb]?)(?:i?b)?(?:/s)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad rate {text!r}: expected a number of bytes per second like 500K or 10M")
    rate = int(float(m.group(1)) * _RATE_UNITS[m.group(2).upper()])
    if rate < 1024:
        raise ValueError(f"rate {text!r} is below 1K (1024 bytes per second)")
    return rate


class TokenBucket:
    """Paces a byte stream to `rate` bytes/second: call it with each block's size before sending.

    Pure pacing with a small burst allowance (`burst_s` seconds of credit at most), so a
    transfer of N bytes takes about N/rate seconds however it is split into blocks.
    """

    def __init__(self, rate: int, burst_s: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst_s = burst_s
        self.clock = clock
        self.sleep = sleep
        self.t = clock()  # when the bytes granted so far will have been "paid for"

    def __call__(self, nbytes: int) -> None:
        now = self.clock()
        self.t = max(self.t, now - self.burst_s) + nbytes / self.rate
        delay = self.t - now
        if delay > 0:
            self.sleep(delay)


class _Digests:
    """The i-th chunk digest of a file, sliced on use (a 1 GiB file has ~130,000 chunks and a
    few changed ranges need a handful of them)."""

    __slots__ = ("d",)

    def __init__(self, d: bytes) -> None:
        self.d = d

    def __getitem__(self, i: int) -> bytes:
        return self.d[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]


def _chunk_table(t: FileEntry) -> tuple[list[int], tuple[int, ...], _Digests]:
    offsets = list(accumulate(t.sizes, initial=0))
    offsets.pop()
    return offsets, t.sizes, _Digests(t.digests)


class ReplicaSummary(Record):
    """What happened to one replica in one run (also the --json per-replica object)."""

    _fields = (
        "replica", "status", "exit_code", "files_written", "bytes_sent", "bytes_reused", "files_deleted",
        "dirs_created", "links_made", "meta_set", "errors", "warnings", "fatal", "seconds", "on_progress",
        "in_step", "planned", "dirs_moved",
    )

    def __init__(
        self,
        replica: str,
        status: str = "ok",  # ok | partial | failed | refused | dry-run
        exit_code: int = 0,
        files_written: int = 0,
        bytes_sent: int = 0,
        bytes_reused: int = 0,
        files_deleted: int = 0,
        dirs_created: int = 0,
        links_made: int = 0,
        meta_set: int = 0,
        errors: list[ItemError] | None = None,
        warnings: list[str] | None = None,
        fatal: str | None = None,
        seconds: float = 0.0,
        on_progress: Callable[[int], None] | None = None,
        in_step: dict | None = None,  # set when master and replica were found in step (status record)
        planned: bool = True,  # False: both trees were as a run last found them in step; no plan was made
        dirs_moved: int = 0,  # directories renamed whole (MoveDir)
    ) -> None:
        self.replica = replica
        self.status = status
        self.exit_code = exit_code
        self.files_written = files_written
        self.bytes_sent = bytes_sent
        self.bytes_reused = bytes_reused
        self.files_deleted = files_deleted
        self.dirs_created = dirs_created
        self.links_made = links_made
        self.meta_set = meta_set
        self.errors = [] if errors is None else errors
        self.warnings = [] if warnings is None else warnings
        self.fatal = fatal
        self.seconds = seconds
        self.on_progress = on_progress
        self.in_step = in_step
        self.planned = planned
        self.dirs_moved = dirs_moved

    def staged(self, w: WriteFile) -> None:
        s = w.send_bytes
        self.bytes_sent += s
        self.bytes_reused += w.target.size - s
        if self.on_progress:
            self.on_progress(w.target.size)

    def done(self, a: Action, path: str) -> None:
        if isinstance(a, WriteFile):
            self.files_written += 1
        elif isinstance(a, Delete):
            self.files_deleted += 1
        elif isinstance(a, MakeDir):
            self.dirs_created += 1
        elif isinstance(a, MakeLink):
            self.links_made += 1
        elif isinstance(a, SetMeta):
            self.meta_set += 1
        elif isinstance(a, MoveDir):
            self.dirs_moved += 1

    def failed(self, path: str, err: ItemError) -> None:
        self.errors.append(err)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def to_json(self) -> dict:
        return {
            "replica": self.replica,
            "status": self.status,
            "exit_code": self.exit_code,
            "files_written": self.files_written,
            "bytes_sent": self.bytes_sent,
            "bytes_reused": self.bytes_reused,
            "files_deleted": self.files_deleted,
            "dirs_created": self.dirs_created,
            "links_made": self.links_made,
            "metadata_set": self.meta_set,
            "dirs_moved": self.dirs_moved,
            "errors": [{"path": os.fsencode(e.path).decode("utf-8", "backslashreplace"), "op": e.op,
                        "code": e.code, "message": str(e)} for e in self.errors],
            "warnings": self.warnings,
            "fatal": self.fatal,
            "seconds": round(self.seconds, 3),
            "planned": self.planned,
        }


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0
