"""RemoteTransport: a replica on another machine, driven through `dirsync agent` over a Channel.

Written once against a Channel (a byte pipe): ParamikoChannel over SSH in production,
SubprocessChannel in tests. One reader thread, owned by this object (started in open, joined
in close), turns incoming frames into messages on a queue, so the main thread can stream
actions and data without ever blocking the agent on a full pipe. A watchdog thread enforces
the one liveness rule: no byte from the agent (it pings every few seconds) for the I/O timeout
means the link is dead; the connection is then torn down, which also frees a main thread
blocked in a send. Only manifests, actions and the bytes of send ops cross the link; the
replica's file contents never do. The protocol is described in PROTOCOL.md.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import queue
import threading
import time

from dirsync import __version__, chunking
from dirsync import apply as _apply
from dirsync.apply import MasterReader, Sink
from dirsync.errors import ConnectError, DirsyncError, ItemError, ProtocolError
from dirsync.manifest import FileEntry, Manifest, ManifestFormatError, Overlay, SavedManifest, encode_rows
from dirsync.plan import Action, Commit, CopyOp, SendOp, WriteFile
from dirsync.replica import OpenInfo
from dirsync.scan import PRECOPY_MIN, ScanResult
from dirsync.state import load_manifest_file, save_manifest_file, state_home, _key
from dirsync.transport import TransportOptions
from dirsync.transport import proto
from dirsync.transport.wire import (MAX_FRAME, FrameDecoder, Inflater, check_hello, data_frame_head, encode, hello,
                                   v_bool, v_bytes, v_list, v_map, v_str)

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Any, Callable, Iterator, Sequence

PULL_WINDOW = 8 << 20  # two-way: bytes requested from a remote side at a time
INLINE_MAX = 64 << 10  # send-op data up to this size travels inside the write message
FLUSH_AT = 256 << 10  # coalesce small frames into writes of about this size
# A data message with at least this many bytes is sent without copying them into the send buffer
# (_send_data). Each of the four copies of a piece of up to 8 MiB took fresh memory: a first copy
# of the 1.4 GB mixed tree made 267,000 page faults in the master with them, 72,000 without.
DIRECT_DATA = 64 << 10
BATCH_LIMIT = 16 << 20  # bytes an outcome batch from the agent ("zb") may inflate to
IO_TIMEOUT_S = 60.0  # the agent pings every 5 s; this long without a byte means the link is dead
IO_TIMEOUT_ENV = "DIRSYNC_IO_TIMEOUT"  # seconds; overrides IO_TIMEOUT_S (tests, very slow links)
PING_S = 5.0  # the ping interval asked of the agent (at most a quarter of the I/O timeout)
START_GRACE_S = 3.0  # the agent ended before its hello: wait this long for its exit status


def io_timeout() -> float:
    """The dead-link timeout: $DIRSYNC_IO_TIMEOUT seconds when set and sane, else IO_TIMEOUT_S."""
    try:
        v = float(os.environ.get(IO_TIMEOUT_ENV, ""))
    except ValueError:
        return IO_TIMEOUT_S
    return v if 0.5 <= v <= 86400 else IO_TIMEOUT_S


_MISSING_HINT = ("install dirsync on the remote host (pip install dirsync-mirror), or point --remote-cmd at it, "
                 "e.g. --remote-cmd /opt/venv/bin/dirsync")
_MISSING_MARKS = ("command not found", "No such file or directory", "No module named", "not found")


class RemoteTransport:
    is_remote = True
    dir_moves = 0  # until the agent's hello lists "md"

    def __init__(self, spec: str, opts: TransportOptions = TransportOptions(), *,
                 channel_factory: Callable[[], Any] | None = None) -> None:
        from dirsync.transport.ssh import RemoteEndpoint, parse_endpoint

        self.name = spec
        self.opts = opts
        ep = parse_endpoint(spec)
        if channel_factory is None and not isinstance(ep, RemoteEndpoint):
            raise ConnectError(f"{spec} is not a remote replica")
        self.ep = ep
        self.path = ep.path
        self._factory = channel_factory
        self.chan: Any = None
        self.client: Any = None
        self.inbox: queue.Queue = queue.Queue()
        self.reader: threading.Thread | None = None
        self.watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self.out = bytearray()
        self.timeout = io_timeout()
        self._last_rx = time.monotonic()
        self._broken: DirsyncError | None = None  # why the link is unusable (the first cause wins)
        self._busy = False  # inside apply: the agent expects actions/data, not `close`
        self._readonly = False
        self._hello_seen = False
        self.tw_level = 1  # the agent's two-way requests: 2 when its hello announced "tw2"
        self.closed_fingerprint = b""  # after close: the fingerprint of the cache the agent saved
        self.base: SavedManifest | None = None  # our copy of the replica's last saved manifest
        self._base_rows: Overlay | None = None  # ... read by rows (see _scanned_rows)
        self._written: dict[str, FileEntry] = {}  # write targets sent this session (see "written")
        self._staged_seen: set[str] = set()  # writes whose bytes the sink has counted
        self._scan_res: ScanResult | None = None
        self._scan_pending: tuple[list[str], bool] | None = None  # (patterns, fresh) asked by scan_start
        self._hello_sent = False
        self._opener: threading.Thread | None = None  # see open_start
        self._opened: OpenInfo | BaseException | None = None
        self._cache_file = os.path.join(state_home(), "replicas", _key(spec) + ".manifest")
        self._zc: Any = None  # one zstd stream for the session's write rows, and data with --compress
        self._rz = False  # the agent takes write rows in that stream (it said "rz" in its hello)
        self._sd = False  # ... and computes the chunk digests of sent bytes itself ("sd")
        self._wb = False  # ... and takes small new files in write batches ("wb")
        self._wh = False  # ... and may hand batches flagged "h" to a helper writer ("wh")
        self._pp = False  # ... and takes the `prep` hint ("pp")
        self._pc = False  # ... and the `precopy` hint ("pc")
        # precopy() hints asked while the opener thread (open_start) still owns the sending:
        # it sends them after scan; from then on precopy() sends itself (see there).
        self._pc_lock = threading.Lock()
        self._pc_queue: list[tuple[str, int]] | None = None
        if opts.compress:
            import zstandard

            self._zc = zstandard.ZstdCompressor(level=3).compressobj()
            self._zflush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
            self._zprobe = zstandard.ZstdCompressor(level=1)
        self._zdata = self._zc is not None  # send-op data goes in the stream (--compress)

    # -- connection ------------------------------------------------------------------

    def _connect(self) -> None:
        if self._factory is not None:
            self.chan = self._factory()
            return
        rsh = (self.opts.rsh if self.opts.rsh is not None else os.environ.get("DIRSYNC_RSH", "")).strip()
        if rsh:  # an external ssh client (OpenSSH) carries the session, as rsync's -e / RSYNC_RSH
            from dirsync.transport.pipe import SubprocessChannel, rsh_argv

            cmd = f"{self.opts.remote_cmd or 'dirsync'} agent"
            argv = rsh_argv(rsh, self.ep, self.opts, cmd)
            self.chan = SubprocessChannel(argv, label=f"{self.ep} (through {argv[0]})")
            return
        from dirsync.transport.ssh import ParamikoChannel, connect

        self.client = connect(self.ep, port=self.opts.port, identity=self.opts.identity,
                              ssh_config_file=self.opts.ssh_config,
                              accept_new_host_key=self.opts.accept_new_host_key,
                              connect_timeout=self.opts.connect_timeout)
        cmd = f"{self.opts.remote_cmd or 'dirsync'} agent"
        self.chan = ParamikoChannel(self.client, cmd, label=str(self.ep))

    def _read_loop(self) -> None:
        dec = FrameDecoder()
        batches = FrameDecoder()  # frames inside the agent's compressed outcome batches ("zb")
        inflater = Inflater()
        try:
            while True:
                data = self.chan.recv(1 << 20)
                self._last_rx = time.monotonic()
                if not data:
                    dec.check_eof()
                    self.inbox.put(EOFError())
                    return
                for m in dec.feed(data):
                    if isinstance(m, dict) and m.get("t") == "zb":
                        inner = batches.feed(inflater.inflate(v_bytes(m.get("b"), MAX_FRAME), BATCH_LIMIT))
                        if any(isinstance(x, dict) and x.get("t") == "zb" for x in inner):
                            raise ProtocolError(f"{self.ep}: a batch inside a batch")
                    else:
                        inner = (m,)
                    for x in inner:
                        if not (isinstance(x, dict) and x.get("t") == "ping"):
                            self.inbox.put(x)
        except Exception as e:  # handed to the owner thread, which raises it
            self.inbox.put(e)

    def _watch(self) -> None:
        """Tear the link down when the agent has been silent for the I/O timeout."""
        step = min(1.0, self.timeout / 8)
        while not self._stop.wait(step):
            silent = time.monotonic() - self._last_rx
            if silent > self.timeout:
                self._fail(ConnectError(f"connection lost to {self.ep}: no data for {self.timeout:g} s "
                                        "(the link is dead or stalled)"))
                self._abort_link()
                return

    def _fail(self, err: DirsyncError) -> DirsyncError:
        """Remember the first fatal error of this session; return the one to raise."""
        if self._broken is None:
            self._broken = err
        return self._broken

    def _abort_link(self) -> None:
        """Close the connection from under any blocked send/recv (thread-safe in paramiko)."""
        try:
            if self.client is not None:
                self.client.close()
            elif self.chan is not None:
                self.chan.close()
        except Exception:
            pass

    def _send(self, msg: Any, flush: bool = False) -> None:
        self.out += encode(msg)
        if flush or len(self.out) >= FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if not self.out:
            return
        if self._broken is not None:
            raise self._broken
        data, self.out = bytes(self.out), bytearray()
        try:
            self.chan.send(data)
        except Exception as e:
            raise self._as_lost(e) from None

    def _as_lost(self, e: BaseException) -> DirsyncError:
        """The error to raise for a failure of the link (an earlier cause, e.g. the watchdog's, first)."""
        if isinstance(e, (ConnectError, ProtocolError)):
            return self._fail(e)
        return self._fail(self._lost(str(e) or type(e).__name__))

    def _recv(self, timeout: float | None = None) -> dict:
        self._flush()
        try:
            m = self.inbox.get(timeout=(self.timeout + 5) if timeout is None else timeout)
        except queue.Empty:
            raise self._fail(ConnectError(f"connection lost to {self.ep}: no answer for {self.timeout:g} s")) from None
        if isinstance(m, EOFError):
            if self._broken is None and not self._hello_seen:
                raise self._fail(self._agent_gone_early())
            raise self._fail(self._lost("the agent closed the connection"))
        if isinstance(m, BaseException):
            raise self._as_lost(m)
        return self._check(m)

    def _check(self, m: Any) -> dict:
        try:
            m = v_map(m)
            if m.get("t") == "fatal":
                raise proto.dec_fatal(m, str(self.ep))
        except DirsyncError as e:
            raise self._fail(e) from None
        return m

    def _lost(self, why: str) -> ConnectError:
        err = self.chan.stderr_text().strip() if self.chan is not None else ""
        status = self.chan.exit_status() if self.chan is not None else None
        last = err.splitlines()[-1][:300] if err else ""
        if not self._hello_seen and (status == 127 or any(k in err for k in _MISSING_MARKS)):
            return ConnectError(f"{self.ep}: the remote side could not start dirsync "
                                f"({last or f'exit status {status}'})", hint=_MISSING_HINT)
        tail = f" (remote said: {last})" if last else ""
        return ConnectError(f"connection lost to {self.ep}: {why}{tail}")

    def _agent_gone_early(self) -> ConnectError:
        """The agent ended before its hello: wait a moment for its exit status and stderr, then explain."""
        deadline = time.monotonic() + START_GRACE_S
        while time.monotonic() < deadline and self.chan.exit_status() is None:
            time.sleep(0.02)
        return self._lost("the agent closed the connection")

    # -- contract ----------------------------------------------------------------------

    def open(self, *, init: bool = False, readonly: bool = False) -> OpenInfo:
        self._readonly = readonly
        with self._shutdown_on_error():
            self._start()
            self._send(self._open_msg(init, readonly), flush=True)
            m = self._expect("opened")
            return proto.dec_open_info(m.get("info"))

    @contextlib.contextmanager
    def _shutdown_on_error(self) -> Iterator[None]:
        """Drop the session on any failure while opening (a link error is raised as this
        session's first fatal error)."""
        try:
            yield
        except (ConnectError, ProtocolError) as e:
            self._shutdown()
            raise self._fail(e) from None
        except BaseException:
            self._shutdown()
            raise

    def _open_msg(self, init: bool, readonly: bool) -> dict[str, Any]:
        msg: dict[str, Any] = {"t": "open", "root": os.fsencode(self.path), "init": init, "readonly": readonly}
        if self.opts.backup_dir:
            msg["backup_dir"] = os.fsencode(self.opts.backup_dir)
            if self.opts.backup_keep is not None:
                msg["backup_keep"] = self.opts.backup_keep
        return msg

    def open_start(self, patterns: list[str], *, init: bool = False, readonly: bool = False) -> None:
        """open() and scan_start(patterns) without waiting: connect and send hello here, then a
        short-lived thread (joined by open_finish) waits for the agent's hello, checks it and
        only then sends open and scan. The caller scans the master meanwhile, so the far side
        starts up and walks its tree at the same time; nothing reaches the far side's tree
        before its hello has been checked."""
        self._readonly = readonly
        with self._shutdown_on_error():
            self._start(wait=False)
        self._pc_queue = []
        self._opener = threading.Thread(target=self._open_and_scan, args=(list(patterns), init, readonly),
                                        name=f"dirsync-open {self.name}", daemon=True)
        self._opener.start()

    def _open_and_scan(self, patterns: list[str], init: bool, readonly: bool) -> None:
        try:
            self._hello_wait()
            self._send(self._open_msg(init, readonly), flush=True)
            m = self._expect("opened")
            self._opened = proto.dec_open_info(m.get("info"))
            self.scan_start(patterns)
        except BaseException as e:  # handed to open_finish, in the owner's thread
            self._opened = e
        with self._pc_lock:
            queued, self._pc_queue = self._pc_queue, None
            if not isinstance(self._opened, BaseException):
                for rel, size in queued or ():
                    self._send_precopy(rel, size)

    def precopy(self, rel: str, size: int) -> None:
        """The master scan is about to hash `rel` again at the size it had (see scan_tree's
        on_rehash): hint the agent to start copying its version ahead ("precopy", when it lists
        "pc"). Called in the owner's thread during the master scan, while open_start's thread
        may still be sending: then queued for it. A hint: a failure to send is left for the
        next request to report."""
        if size < PRECOPY_MIN or self._readonly:
            return
        with self._pc_lock:
            if self._pc_queue is not None:
                self._pc_queue.append((rel, size))
            else:
                self._send_precopy(rel, size)

    def _send_precopy(self, rel: str, size: int) -> None:
        if self._pc and self._broken is None:
            try:
                self._send({"t": "precopy", "path": os.fsencode(rel), "size": size}, flush=True)
            except DirsyncError:
                pass

    def open_finish(self) -> OpenInfo:
        """The OpenInfo of open_start (raising what went wrong there); the scan is under way."""
        assert self._opener is not None
        self._opener.join()
        self._opener = None
        got, self._opened = self._opened, None
        if isinstance(got, BaseException):
            self._scan_pending = None
            self._shutdown()
            if isinstance(got, (ConnectError, ProtocolError)):
                raise self._fail(got) from None
            raise got
        return got  # type: ignore[return-value]

    def _start(self, wait: bool = True) -> None:
        """Connect, start the reader and watchdog threads and send hello (once a session);
        `wait`: also read and check the agent's hello."""
        if self._hello_sent:
            if wait:
                self._hello_wait()
            return
        self._connect()
        self._last_rx = time.monotonic()
        self.reader = threading.Thread(target=self._read_loop, name=f"dirsync-reader {self.name}", daemon=True)
        self.reader.start()
        self.watchdog = threading.Thread(target=self._watch, name=f"dirsync-watchdog {self.name}", daemon=True)
        self.watchdog.start()
        ping_ms = int(min(PING_S, self.timeout / 4) * 1000)
        self._send(hello(__version__, ping_ms=ping_ms, features=["zb", "dw", "sg"]), flush=True)
        self._hello_sent = True
        if wait:
            self._hello_wait()

    def _hello_wait(self) -> None:
        if self._hello_seen:
            return
        first = self._recv(timeout=max(self.timeout, self.opts.connect_timeout))
        try:
            check_hello(first)
            features = v_list(first.get("features", []), 64)
            self._rz = "rz" in features
            self._sd = self._rz and "sd" in features
            self._wb = self._sd and "wb" in features
            self._wh = self._wb and "wh" in features
            self._pp = "pp" in features
            self._pc = "pc" in features
            self.dir_moves = proto.MOVE_MAX if "md" in features else 0
            self.tw_level = 2 if "tw2" in features else 1
            theirs = v_str(first.get("chunker", ""), 200)
            if theirs != chunking.CHUNKER_ID:  # every chunk would differ: nothing could be reused
                raise ProtocolError(f"the remote dirsync ({v_str(first.get('version', '?'), 200)}) cuts "
                                    f"files into chunks with {theirs or 'an unknown chunker'!r}, this one "
                                    f"with {chunking.CHUNKER_ID!r}",
                                    hint="install the same dirsync version on both machines")
        except ProtocolError as e:
            raise self._fail(ProtocolError(f"{self.ep}: {e}", hint=e.hint)) from None
        self._hello_seen = True

    # -- two-way sides (see twoway.RemoteTwoWaySide) --------------------------------------

    def twoway_request(self, op: str, **kw: Any) -> Any:
        """A two-way state request on this side's root; works before open() too."""
        try:
            if not self._hello_seen:
                self._start()
            msg: dict[str, Any] = {"t": "tw", "op": op, "root": os.fsencode(self.path)}
            if "name" in kw:
                msg["name"] = kw["name"]
            if "data" in kw:
                msg["data"] = kw["data"]
            if "size" in kw:
                msg["size"] = kw["size"]
            self._send(msg, flush=True)
            m = self._expect("tw_ok")
            v = m.get("v")
            if op == "peek":
                return None if v is None else v_str(v, 200)
            if op == "list":
                return [v_str(n, 100) for n in v_list(v, 1000)]
            if op == "read":
                return None if v is None else v_bytes(v, 1 << 26)
            if op == "head":
                return None if v is None else v_bytes(v, kw["size"])
            if op == "ignore":
                return [v_str(p, 4096) for p in v_list(v, 10000)]
            if op == "empty":
                return v_bool(v)
            return None
        except (ConnectError, ProtocolError) as e:
            self._shutdown()
            raise self._fail(e) from None

    def pull(self, w: WriteFile) -> Iterator[bytes]:
        """The bytes of w's send ops, read on this (remote) side from its file w.target (chunks
        verified there against w.target's digests, and again by the writer here). Requested in
        windows of about PULL_WINDOW bytes so memory stays bounded."""
        ops = [o for o in w.ops if isinstance(o, SendOp)]
        row = encode_rows([w.target], cache_fields=False)[0]
        bounds = [off for off, _n, _d in w.target.chunks()] + [w.target.size]
        for op in ops:
            pos, end = op.offset, op.offset + op.size
            while pos < end:
                # the largest chunk-aligned window from pos, at least one chunk
                i = bisect.bisect_left(bounds, pos)
                j = bisect.bisect_right(bounds, min(end, pos + PULL_WINDOW)) - 1
                stop = bounds[max(j, i + 1)]
                self._send({"t": "tw_read", "f": row, "ops": [[pos, stop - pos]]}, flush=True)
                while True:
                    m = self._recv()
                    t = m.get("t")
                    if t == "data":
                        yield v_bytes(m.get("b"), 1 << 24)
                    elif t == "end":
                        break
                    elif t == "failed":
                        raise proto.dec_item_error(m.get("e"))
                    else:
                        raise self._fail(ProtocolError(f"{self.ep}: unexpected {str(t)[:40]!r} while reading"))
                pos = stop

    def _expect(self, t: str) -> dict:
        m = self._recv()
        if m.get("t") != t:
            raise self._fail(ProtocolError(f"{self.ep}: expected {t!r}, got {str(m.get('t'))[:40]!r}"))
        return m

    def _rows_until(self, end: str, changed: dict, removed: list[str],
                    saving: Callable[[str], None] | None = None) -> dict:
        """Collect `rows`/`removed` frames until the `end` message, which is returned.
        `saving(gen)`: for a close, called on the agent's "saving" (its rows are all in)."""
        while True:
            m = self._recv()
            t = m.get("t")
            if t == "rows":
                changed.update(proto.dec_rows(m.get("rows")))
            elif t == "removed":
                removed.extend(proto.dec_paths(m.get("paths")))
            elif t == "written" and end == "closed":
                for p in proto.dec_paths(m.get("paths")):
                    w = self._written.get(p)
                    if w is None:
                        raise self._fail(ProtocolError(f"{self.ep}: agent reports {p!r} as written, but it was not sent"))
                    changed[p] = w
            elif t == "moved" and end == "closed":  # (see Agent._send_moves)
                src, dst = proto.v_relpath(m.get("s")), proto.v_relpath(m.get("p"))
                ours = self._scanned_entries()
                for x in proto.dec_suffixes(m.get("m"), src):
                    e = ours.get(src + x) if ours is not None else None
                    if e is None:
                        raise self._fail(ProtocolError(f"{self.ep}: agent reports {src + x!r} moved, but it was not scanned"))
                    changed[dst + x] = e.replace(path=dst + x)
                    removed.append(src + x)
            elif t == "saving" and saving is not None:
                saving(v_str(m.get("gen", ""), 64))
            elif t == end:
                return m
            else:
                raise self._fail(ProtocolError(f"{self.ep}: unexpected {str(t)[:40]!r} while waiting for {end!r}"))

    def scan_start(self, patterns: list[str], *, fresh: bool = False) -> None:
        """Ask the agent to scan now and collect the answer in scan(): the far side walks its
        tree while this side does other work (the master scan, the other two-way side)."""
        try:
            load = load_manifest_file(self._cache_file, chunking.CHUNKER_ID, lazy=True)
            self.base, self._base_rows = load.saved, None
            base_gen = self.base.generation if self.base is not None else ""
            self._send({"t": "scan", "patterns": list(patterns), "fresh": fresh, "base": base_gen}, flush=True)
            self._scan_pending = (list(patterns), fresh)
        except (ConnectError, ProtocolError) as e:
            raise self._fail(e) from None

    def scan(self, patterns: list[str], *, fresh: bool = False) -> ScanResult:
        try:
            if self._scan_pending != (list(patterns), fresh):
                if self._scan_pending is not None:
                    self._scan_finish()  # asked with other patterns: drain that answer first
                self.scan_start(patterns, fresh=fresh)
            return self._scan_finish()
        except (ConnectError, ProtocolError) as e:
            raise self._fail(e) from None

    def expect_plan(self, decode: bool = True) -> None:
        """A hint, given before scan(): the master changed since this pair was last found in
        step, so a plan is coming. This side's own scan is done and it would wait idle for the
        agent's answer; the agent would wait idle while this side plans. So the agent is told
        ("prep": it reads its saved manifest's row index then, not at the first action that
        needs a row), and meanwhile this side decodes its copy of the replica's manifest (the
        answer amends it; not with `decode` False: the sync expects to plan against the
        master's cache, and then reads the copy by rows) and loads the compressor the writes'
        rows need."""
        try:
            if self._pp and self._scan_pending is not None:
                self._send({"t": "prep"}, flush=True)
        except (ConnectError, ProtocolError) as e:
            raise self._fail(e) from None
        if decode and self.base is not None and self._scan_pending is not None:
            try:
                self.base.manifest  # noqa: B018 (decoded once, kept)
            except ManifestFormatError:
                pass  # reported by _base_manifest if the answer needs it
        if self._rz:
            __import__("zstandard")  # loaded now: the writes' rows go through it

    def _scan_finish(self) -> ScanResult:
        self._scan_pending = None
        base_gen = self.base.generation if self.base is not None else ""
        changed: dict = {}
        removed: list[str] = []
        m = self._rows_until("scan_end", changed, removed)
        if m.get("full", True):
            res = ScanResult(Manifest(changed))
        else:
            if self.base is None or m.get("base") != base_gen:
                raise self._fail(ProtocolError(f"{self.ep}: agent sent a delta against a manifest we do not have"))
            if changed or removed:
                bm = self._base_manifest()
                entries = dict(bm.entries)
                for p in removed:
                    entries.pop(p, None)
                entries.update(changed)
                res = ScanResult(Manifest(entries, rows=bm.rows))
            else:  # nothing changed there: our copy is the replica (decoded only if needed)
                res = ScanResult(saved=self.base)
                res.unchanged = True
        self._scan_res = res
        res.errors = [proto.dec_item_error(e) for e in v_list(m.get("errors", []), 1 << 20)]
        res.warnings = [v_str(w, 4096) for w in v_list(m.get("warnings", []), 1 << 20)]
        res.fingerprint = v_bytes(m.get("fp", b""), 64)
        return res

    def _base_manifest(self) -> Manifest:
        assert self.base is not None
        try:
            return self.base.manifest
        except ManifestFormatError as e:  # checksum fine, rows not (tampering): drop it, start over
            try:
                os.unlink(self._cache_file)
            except OSError:
                pass
            raise self._fail(ProtocolError(f"{self.ep}: our copy of the replica manifest is unreadable ({e}); "
                                           "it was removed, run again")) from None

    @property
    def scanned(self) -> Manifest | None:
        return self._scan_res.manifest if self._scan_res is not None else None

    def _scanned_rows(self) -> Overlay | None:
        """Our copy of the replica's manifest read by rows (an Overlay, kept), when the scan
        found the replica as that copy records it and nothing has decoded the copy whole."""
        res = self._scan_res
        if self._base_rows is None and res is not None:
            rows = res.saved_rows()  # (the scan's saved cache is our copy: see _scan_finish)
            if rows is not None:
                self._base_rows = Overlay(rows)
        return self._base_rows if res is not None and not res.decoded else None

    def _scanned_entries(self):
        """What the replica held when scanned, for lookups by path (see _scanned_rows)."""
        rows = self._scanned_rows()
        if rows is not None:
            return rows
        return self._scan_res.manifest.entries if self._scan_res is not None else None

    def cached_root(self, patterns: list[str]) -> bytes | None:
        """Merkle root of the replica's saved manifest (verify --quick); the agent walks nothing."""
        try:
            self._send({"t": "root", "patterns": list(patterns)}, flush=True)
            m = self._expect("root")
            return v_bytes(m.get("root", b""), 64) or None
        except (ConnectError, ProtocolError) as e:
            raise self._fail(e) from None

    def apply(self, actions: Sequence[Action], master: MasterReader, sink: Sink,
              should_stop: Callable[[], bool] = lambda: False) -> None:
        try:
            self._apply(actions, master, sink, should_stop)
        except (ConnectError, ProtocolError) as e:
            raise self._fail(e) from None

    def _apply(self, actions: Sequence[Action], master: MasterReader, sink: Sink,
               should_stop: Callable[[], bool]) -> None:
        writes: dict[str, WriteFile] = {}
        others: dict[tuple[str, str], Action] = {}
        batch: list[tuple[WriteFile, bytes]] = []  # small new files read for the next write batch
        held = 0  # their bytes
        wb = self._wb
        share = self._helper_share(actions) if wb else None
        # (a MasterReader reads a small file's bytes in C; a two-way PairReader through sends)
        whole = getattr(master, "whole", None) or (lambda w: b"".join(master.sends(w)))
        self._busy = True
        self._send({"t": "apply"})
        for a in actions:
            if should_stop():
                break
            if isinstance(a, WriteFile):
                writes[a.path] = a
                self._written[a.path] = a.target
                if wb and proto.batchable(a):
                    try:
                        data = whole(a) if a.target.size else b""
                    except ItemError as e:  # (not sent: its commit skips it)
                        sink.failed(a.path, e)
                        continue
                    batch.append((a, data))
                    held += len(data)
                    if len(batch) >= proto.WB_FILES or held >= proto.WB_BYTES:
                        self._send_batch(batch, share)
                        batch, held = [], 0
                        self._dispatch(sink, writes, others, block=False)
                    continue
                if batch:
                    self._send_batch(batch, share)
                    batch, held = [], 0
                self._send_write(a, master, sink)
                self._dispatch(sink, writes, others, block=False)
                continue
            if batch:  # (before any other action: the plan's order holds)
                self._send_batch(batch, share)
                batch, held = [], 0
            if isinstance(a, Commit):
                msg = proto.enc_action(a)
                if self._rz:  # the paths were just in the stream: they compress to a few bytes
                    msg["pz"] = self._in_rows_stream(proto.pack_paths(msg))
                self._send(msg)
            else:
                msg = proto.enc_action(a)
                others[(msg["t"], a.path)] = a
                self._send(msg)
            self._dispatch(sink, writes, others, block=False)
        if batch:
            self._send_batch(batch, share)
        self._send({"t": "apply_end"}, flush=True)
        while not self._dispatch(sink, writes, others, block=True):
            pass
        self._busy = False

    def _send_write(self, w: WriteFile, master: MasterReader, sink: Sink) -> None:
        msg = proto.enc_action(w)
        if self._scan_res is not None and any(isinstance(o, CopyOp) for o in w.ops):
            compact = proto.compact_digests(w, self._scanned_entries())
            if compact is not None:  # the agent looks up the digests of chunks it already holds
                row = list(msg["f"])
                msg["dm"], row[8] = compact
                msg["f"] = row
        n = w.send_bytes
        try:
            inline = b"".join(master.sends(w)) if 0 < n <= INLINE_MAX else b""
        except ItemError as e:  # nothing of this write was sent (or compressed)
            sink.failed(w.path, e)
            return
        if self._sd and "dm" not in msg and w.target.nchunks > 1 and all(isinstance(o, SendOp) for o in w.ops):
            msg["sd"] = True  # the agent hashes the chunks as it writes them: 16 bytes a chunk saved
            msg["f"] = [*msg["f"][:8], b""]
        if self._rz:  # compressed only now that it will be sent: the agent inflates in stream order
            msg["rz"] = self._in_rows_stream(proto.pack_row(msg))
        if n <= INLINE_MAX:
            if n:
                msg["d"], z = self._pack(inline)
                if z:
                    msg["z"] = True
            self._send(msg)
            return
        self._send(msg)
        try:
            for piece in master.sends(w):
                self._send_data(piece)
            self._send({"t": "end"})
        except ItemError as e:
            self._send({"t": "abort"})
            sink.failed(w.path, e)

    def _helper_share(self, actions: Sequence[Action]) -> set[str] | None:
        """The paths the plan's first stretch of writes and commits commits, when an agent that
        lists "wh" may hand batches of them to a helper writer (see _send_batch): they are many
        and no sibling worker keeps the other cores busy (fan-out); else None."""
        if not (self._wh and _apply.split_writers) or len(actions) < _apply.SPLIT_MIN:
            return None
        _, _, committed = _apply.first_stretch(actions)
        return committed if len(committed) >= _apply.SPLIT_MIN else None

    def _send_batch(self, batch: list[tuple[WriteFile, bytes]], share: set[str] | None) -> None:
        """Send small new files as one write batch ("wb"): their rows in the rows' stream, then
        their bytes as one payload (one frame, one compression call, one agent decode for up to
        WB_FILES files instead of one each). "h": a helper writer may take it: as a local
        replica's writer shares files (apply._split_share), nothing else in the plan depends on
        any of them and the first stretch commits them all (`share`: its paths)."""
        msg = {"t": "wb", "rz": self._in_rows_stream(proto.pack_batch([w.target for w, _ in batch]))}
        msg["d"], z = self._pack(b"".join([d for _, d in batch]))
        if z:
            msg["z"] = True
        if share is not None and all(_apply.sharable(w, share) for w, _ in batch):
            msg["h"] = True
        self._send(msg)

    def _in_rows_stream(self, blob: bytes) -> bytes:
        """`blob` compressed as the next payload of the stream write rows and commit paths
        continue: the data's with --compress, else one of their own (rows are mostly paths and
        chunk sizes: a third of a small file's frame, and they compress against each other
        however the data is sent)."""
        if self._zc is None:
            import zstandard

            self._zc = zstandard.ZstdCompressor(level=3).compressobj()
            self._zflush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
            self._zdata = False
        return self._zc.compress(blob) + self._zc.flush(self._zflush)

    def _send_data(self, piece: bytes) -> None:
        """Send one "data" message. A large one goes to the channel as it is, after its frame's
        head (wire.data_frame_head): not packed, prefixed and buffered, each a copy of it."""
        b, z = self._pack(piece)
        if len(b) < DIRECT_DATA:
            self._send({"t": "data", "b": b, "z": True} if z else {"t": "data", "b": b})
            return
        self.out += data_frame_head(len(b), z)
        self._flush()
        try:
            self.chan.send(b)
        except Exception as e:
            raise self._as_lost(e) from None

    def _pack(self, piece: bytes) -> tuple[bytes, bool]:
        """(bytes to send, compressed?). Compressed data continues the session's zstd stream
        (flushed to a block boundary, so the agent can decode it at once), so small files
        compress against everything sent before them, as with rsync -z. Data that does not
        compress (judged on samples) goes raw and stays out of the stream."""
        if self._zc is None or not self._zdata or len(piece) < 64 or not self._compressible(piece):
            return bytes(piece), False
        return self._zc.compress(piece) + self._zc.flush(self._zflush), True

    def _compressible(self, piece: bytes) -> bool:
        n = len(piece)
        if n <= 16 << 10:
            sample = bytes(piece)
        else:
            sample = b"".join(bytes(piece[i:i + 4096]) for i in (0, n // 2, n - 4096))
        return len(self._zprobe.compress(sample)) < 0.9 * len(sample)

    def _dispatch(self, sink: Sink, writes: dict[str, WriteFile], others: dict, *, block: bool) -> bool:
        """Hand agent outcomes to the sink; True once the agent reported the apply finished."""
        while True:
            if block:
                m = self._recv()
            else:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    return False
                if isinstance(item, BaseException):
                    self.inbox.put(item)
                    m = self._recv()
                else:
                    m = self._check(item)
            try:
                if self._outcome(m, sink, writes, others):
                    return True
            except ProtocolError as e:
                raise self._fail(e) from None
            if block:
                return False

    def _outcome(self, m: dict, sink: Sink, writes: dict[str, WriteFile], others: dict) -> bool:
        t = m.get("t")
        if t == "applied":
            return True
        if t == "warn":
            sink.warn(v_str(m.get("msg"), 4096))
            return False
        if t == "failed":
            e = proto.dec_item_error(m.get("e"))
            sink.failed(e.path, e)
            return False
        if t == "dw":  # done writes, as one path list
            for b in v_list(m.get("ps"), proto.MAX_ROWS):
                self._write_done(os.fsdecode(v_bytes(b, 4096)), sink, writes)
            return False
        path = os.fsdecode(v_bytes(m.get("p", b""), 4096))
        if t == "staged":
            w = writes.get(path)
            if w is not None and path not in self._staged_seen:
                self._staged_seen.add(path)
                sink.staged(w)
        elif t == "done":
            k = v_str(m.get("k"), 8)
            if k == "write":
                self._write_done(path, sink, writes)
            else:
                a = others.get((k, path))
                if a is not None:
                    sink.done(a, path)
        else:
            raise ProtocolError(f"{self.ep}: unexpected {str(t)[:40]!r} during apply")
        return False

    def _write_done(self, path: str, sink: Sink, writes: dict[str, WriteFile]) -> None:
        w = writes.get(path)
        if w is not None:
            if path not in self._staged_seen:  # small files report only `done`
                self._staged_seen.add(path)
                sink.staged(w)
            sink.done(w, path)

    def close(self, *, save: bool = True) -> None:
        """End the session. After a link failure, or when interrupted inside apply, the
        connection is just dropped: the agent sees EOF, discards its temps and unlocks.
        Raises the item error the agent met while closing (e.g. its cache could not be saved),
        as Replica.close does for a local replica."""
        error: ItemError | None = None
        try:
            if self.chan is not None and self._broken is None and not self._busy and self._hello_seen:
                self._send({"t": "close", "save": save}, flush=True)
                changed: dict = {}
                removed: list[str] = []
                saved_as: list[str] = []

                def saving(gen: str) -> None:  # the agent saves under `gen` now: save our copy meanwhile
                    if gen and not self._readonly:
                        self._remember(gen, changed, removed)
                        saved_as.append(gen)

                m = self._rows_until("closed", changed, removed, saving)
                gen = v_str(m.get("gen", ""), 64)
                fp = v_bytes(m.get("fp", b""), 64)  # absent from older agents
                if m.get("error") is not None:
                    error = proto.dec_item_error(m.get("error"))
                if not self._readonly:  # a read-only session saved nothing: our copy still matches
                    if not (gen and saved_as == [gen]):  # (else saved already, under this very id)
                        self._remember(gen, changed, removed)
                    self.closed_fingerprint = fp if gen and error is None else b""
                self._send({"t": "bye"}, flush=True)
        except (ConnectError, ProtocolError, OSError):
            pass
        finally:
            self._shutdown()
        if error is not None:
            raise error

    def _remember(self, gen: str, changed: dict, removed: list[str]) -> None:
        """Keep our copy of the replica's saved manifest, so the next scan can be a delta."""
        try:
            if not gen or self._scan_res is None:
                if os.path.exists(self._cache_file):
                    os.unlink(self._cache_file)
                return
            if (not changed and not removed and self.base is not None and gen == self.base.generation
                    and self._scan_res.unchanged):
                return  # the replica kept the cache our copy matches: nothing to write
            rows = self._scanned_rows()
            if rows is not None:  # (the copy's own rows, read by path: see Overlay)
                for p in removed:
                    rows.pop(p, None)
                for p, e in changed.items():
                    rows[p] = e
                new = Manifest(rows, generation=gen)  # type: ignore[arg-type]
            else:
                scanned = self._scan_res.manifest
                entries = dict(scanned.entries)
                for p in removed:
                    entries.pop(p, None)
                entries.update(changed)
                new = Manifest(entries, generation=gen, rows=scanned.rows)
            # Not fsynced (on the run's last path, ~10 ms for the mixed tree): after a crash
            # a stale or damaged copy no longer matches the agent's generation, or fails its
            # checksum, and the agent then sends every row, as with no copy at all.
            save_manifest_file(self._cache_file, new, chunking.CHUNKER_ID, b"", durable=False)
        except OSError:
            pass

    def _shutdown(self) -> None:
        self._stop.set()
        if self.chan is not None:
            try:
                self.chan.send_eof()
            except Exception:
                pass
            try:
                self.chan.close()
            except Exception:
                pass
        if self.client is not None:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None
        if self.reader is not None:
            self.reader.join(timeout=10)
            self.reader = None
        if self.watchdog is not None and self.watchdog is not threading.current_thread():
            self.watchdog.join(timeout=5)
            self.watchdog = None
        self.chan = None
