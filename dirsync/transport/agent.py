"""`dirsync agent`: the far side of a remote replica. Frames on stdin/stdout around replica.Replica.

Runs the same scanner, action loop (apply.apply_actions) and replica writer as a local replica.
Everything received is validated before use (proto.dec_*). The session ends on `bye`, on EOF
of stdin (a dropped link), after IDLE_S seconds without input, or when the master has not read
what the agent writes for WRITE_TIMEOUT_S (a stalled link); the replica lock and temps go with
it. stdout carries frames only: anything else printed by mistake goes to stderr. See PROTOCOL.md.

Exit status: 0 after `bye` or EOF, 11 after a protocol error (a `fatal` frame was sent first when
possible), 1 after an internal error (also reported in a `fatal` frame).
"""

from __future__ import annotations

import os
import select
import sys
import threading

from dirsync import __version__, chunking
from dirsync.apply import FILE_COST, NewWrites, WholeSends, _Helper, _helper_main, apply_actions, fed_messages
from dirsync.errors import DirsyncError, ItemError, ItemIOError, ProtocolError
from dirsync.manifest import _FSENC, FileEntry, ManifestFormatError, Overlay, changed_entries, encode_rows
from dirsync.plan import Action, Commit, MoveDir, SendOp, WriteFile
from dirsync.replica import BackupOptions, Replica, warm_up
from dirsync.runtime import gc_paused, keep_freed_memory, widen_pipe
from dirsync.scan import Excluder
from dirsync.transport import proto
from dirsync.transport.wire import (
    FrameDecoder,
    Inflater,
    check_hello,
    decode_frame_body,
    encode,
    hello,
    v_bool,
    v_bytes,
    v_int,
    v_list,
    v_map,
    v_str,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Any, Callable, Iterator

IDLE_S = 900.0  # no input for this long: the master is gone
IDLE_ENV = "DIRSYNC_AGENT_IDLE"  # seconds; overrides IDLE_S (tests)
WRITE_TIMEOUT_S = 120.0  # the master read nothing of ours for this long: the link is stalled
PING_S = 5.0  # keep-alive frames so the master can tell a slow agent from a dead link (hello may ask less)
PING_MIN_S = 0.1
READ_SIZE = 1 << 20
# Part of a frame this large buffered: bulk data comes in, and the agent keeps the memory it frees
# from then on (runtime.keep_freed_memory). Not for write batches of small files (~1 MiB frames):
# their agent made more page faults with it (97,000-103,000 against 86,000-94,000, 2 runs each).
BULK_FRAME = 2 << 20
LARGE_FRAME = 1 << 18  # a frame this large is read straight into a buffer of its own (_recv_large)
HOLD_MAX = 1 << 16  # outcome bytes held back at most before they are written (see Agent.send)
BATCH_MAX = 1 << 20  # held bytes sent as one compressed batch at most (the master accepts 16 MiB)
DATA_MAX = 1 << 24  # bytes in one data frame (or inline), after decompression
ROW_MAX = 1 << 24  # bytes of a compressed write's row and ops ("rz"), after decompression
# Announced in the hello; the master uses only what the agent announced ("rz", "sd": see
# PROTOCOL.md, write; "wb": write batches, "wh": flagged ones a helper writer may take; "tw2":
# the two-way `head` request and base snapshot files (twoway-<pair>.snap-<16 hex>) among the
# state names; "pp": the `prep` hint; "pc": the `precopy` hint; "md": the `mvdir` action).
FEATURES = ("rz", "sd", "tw2", "wb", "wh", "pp", "pc", "md")


def _env_seconds(name: str, default: float) -> float:
    try:
        v = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return v if 0.1 <= v <= 86400 else default


class _ReplicaError(DirsyncError):
    """The replica's file system failed outside any one item (e.g. its root became unreadable)."""


class _InternalError(DirsyncError):
    """A bug in the agent (an unexpected exception); reported to the master, exit status 1."""


class _Aborted(ItemError):
    """The master abandoned a file mid-stream (it changed while read); the master reports it."""


class Agent:
    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.decoder = FrameDecoder()
        self.inbox: list[Any] = []
        self.wlock = threading.Lock()
        self._held = bytearray()  # outcome frames not written yet (see send)
        self._outbox: Any = None  # called first by flush(): the action loop's gathered outcomes
        self._dw = False  # the master takes done writes as path lists ("dw": it said so in its hello)
        self._sg = False  # the master takes "saving" (the generation ahead of the save at close: "sg")
        self._zb: Any = None  # zstd stream for held outcomes: True once the master's hello lists "zb",
        # the stream itself from the first batch on (importing zstandard costs ~10 ms: a no-op need not)
        self.replica: Replica | None = None
        self.written: dict[str, FileEntry] = {}  # write targets received this session
        self.moves: list[MoveDir] = []  # directories moved whole this session (see _send_changes)
        self._derived: set[str] = set()  # writes whose chunk digests this side computed
        self._chunk_tables: dict[str, dict[int, tuple[int, bytes]]] = {}  # for compacted write rows
        self.inflater = Inflater()
        self.idle_s = _env_seconds(IDLE_ENV, IDLE_S)
        self.ping_s = PING_S
        self._inline: Any = None
        self._bulk = False  # bulk data came in (see recv)
        os.set_blocking(wfd, False)  # so that a stalled master cannot block a write forever

    # -- I/O ---------------------------------------------------------------------

    def send(self, msg: Any, *, later: bool = False) -> None:
        """Write one frame. OSError (TimeoutError for a stalled master) when the link is gone.
        `later`: an outcome, which may wait (in order) until the agent next waits for input or
        HOLD_MAX bytes gather: 100,000 small files then report in a few hundred writes, hence SSH
        packets, instead of one each (a packet costs about 50 bytes and a Python packet read)."""
        data = encode(msg)
        with self.wlock:
            if later:
                self._held += data
                if len(self._held) < HOLD_MAX:
                    return
                data = b""
            if self._held:
                data = self._take_held() + data
            self._write(data)

    def flush(self) -> None:
        """Write the outcomes held back by send(later=True)."""
        if self._outbox is not None:
            self._outbox()
        if not self._held:  # the usual case when the agent waits for input: no lock taken
            return
        with self.wlock:
            if self._held:
                self._write(self._take_held())

    def _take_held(self) -> bytes:
        """The held outcome frames, as one compressed "zb" frame when the master takes them
        (they are mostly paths and repeated keys: a few bytes a file instead of ~50)."""
        data = bytes(self._held)
        self._held.clear()
        if self._zb is None or len(data) < 256 or len(data) > BATCH_MAX:
            return data
        import zstandard

        if self._zb is True:
            self._zb = zstandard.ZstdCompressor(level=3).compressobj()
        return encode({"t": "zb", "b": self._zb.compress(data) + self._zb.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)})

    def _write(self, data: bytes) -> None:
        """Write all of `data` (the caller holds wlock)."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.wfd, view):]
            except BlockingIOError:
                _, w, _ = select.select([], [self.wfd], [], WRITE_TIMEOUT_S)
                if not w:
                    raise TimeoutError(f"the master read nothing for {WRITE_TIMEOUT_S:g} s") from None

    def recv(self) -> Any:
        while not self.inbox:
            self.flush()  # about to wait for the master: it gets every outcome first
            r, _, _ = select.select([self.rfd], [], [], self.idle_s)
            if not r:
                raise ProtocolError(f"no input for {self.idle_s:g} s; giving up")
            data = os.read(self.rfd, READ_SIZE)
            if not data:
                self.decoder.check_eof()
                raise EOFError
            self.inbox.extend(self.decoder.feed(data))
            if self.decoder.buffered >= BULK_FRAME:
                self._bulk_comes()
            if not self.inbox:
                self._recv_large()
        m = self.inbox.pop(0)
        return v_map(m)

    def _bulk_comes(self) -> None:
        """A large file's pieces are coming in (frames of up to 8 MiB): keep freed memory from now on."""
        if not self._bulk:
            self._bulk = True
            keep_freed_memory()

    def _recv_large(self) -> None:
        """A frame of LARGE_FRAME bytes or more has begun: read the rest of its body straight
        into one buffer (each byte copied once from the kernel, not twice more on the way to a
        message); a data message's payload is then a view of that buffer (wire.decode_frame_body)."""
        got = self.decoder.take_partial(LARGE_FRAME)
        if got is None:
            return
        n, part = got
        if n >= BULK_FRAME:
            self._bulk_comes()  # (the buffer below then comes from memory kept free)
        body = bytearray(n)
        view = memoryview(body)
        view[:len(part)] = part
        have = len(part)
        while have < n:
            self.flush()
            r, _, _ = select.select([self.rfd], [], [], self.idle_s)
            if not r:
                raise ProtocolError(f"no input for {self.idle_s:g} s; giving up")
            k = os.readv(self.rfd, [view[have:]])
            if not k:
                raise ProtocolError(f"connection closed in the middle of a frame ({have + 4} bytes pending)")
            have += k
        view.release()
        self.inbox.append(decode_frame_body(body))

    # -- session -----------------------------------------------------------------

    def run(self) -> int:
        stop = threading.Event()
        pinger = threading.Thread(target=self._ping, args=(stop,), name="agent-ping")
        try:
            self.send(hello(__version__, chunker=chunking.CHUNKER_ID, features=list(FEATURES)))
            peer = check_hello(self.recv())
            theirs = v_list(peer.get("features", []), 64)
            if "zb" in theirs:
                self._zb = True
            self._dw = "dw" in theirs
            self._sg = "sg" in theirs
            ping_ms = peer.get("ping_ms")
            if ping_ms is not None:
                self.ping_s = max(PING_MIN_S, min(PING_S, v_int(ping_ms, 0, 3_600_000) / 1000))
            pinger.start()
            while True:
                m = self.recv()
                t = m.get("t")
                if t == "bye":
                    return 0
                try:
                    self.handle(t, m)
                except DirsyncError as e:
                    if isinstance(e, ProtocolError):
                        raise
                    self.send(proto.enc_fatal(e))
        except EOFError:
            return 0
        except OSError as e:  # our stdout is gone or stalled: nobody to tell
            print(f"dirsync agent: lost the master: {e}", file=sys.stderr)
            return 0
        except ProtocolError as e:
            self._last_word(e)
            print(f"dirsync agent: {e}", file=sys.stderr)
            return 11
        except Exception as e:  # a bug: tell the master in one line, keep the traceback on stderr
            import traceback

            traceback.print_exc(file=sys.stderr)
            self._last_word(_InternalError(f"internal error in the agent: {type(e).__name__}: {e}"[:1000]))
            return 1
        finally:
            stop.set()
            if pinger.is_alive():
                pinger.join()
            if self.replica is not None:
                try:
                    self.replica.close(save=False)
                except Exception as e:  # the session is over anyway: never replace its outcome
                    print(f"dirsync agent: closing the replica: {e}", file=sys.stderr)

    def _last_word(self, e: DirsyncError) -> None:
        try:
            self.send(proto.enc_fatal(e))
        except (OSError, ProtocolError):
            pass

    def _ping(self, stop: threading.Event) -> None:
        while not stop.wait(self.ping_s):
            try:
                self.send({"t": "ping"})
            except OSError:
                return

    def handle(self, t: Any, m: dict) -> None:
        try:
            self._handle(t, m)
        except OSError as e:  # the replica's own file system failed us (not one item): tell the master
            where = f" {e.filename}" if e.filename else ""
            raise _ReplicaError(f"replica side: {e.strerror or e}{where}") from None

    def _handle(self, t: Any, m: dict) -> None:
        if t == "open":
            self.open(m)
        elif t == "scan":
            self.scan(m)
        elif t == "apply":
            self.apply()
        elif t == "tw":
            self.twoway(m)
        elif t == "tw_read":
            self.twoway_read(m)
        elif t == "close":
            self.close(v_bool(m.get("save", True)))
        elif t == "root":
            self.root(m)
        elif t == "prep":
            self.prep()
        elif t == "precopy":
            self.precopy(m)
        else:
            raise ProtocolError(f"unexpected message {str(t)[:40]!r}")

    def open(self, m: dict) -> None:
        if self.replica is not None:
            raise ProtocolError("open twice")
        root = os.path.expanduser(os.fsdecode(proto.v_path(m.get("root")) or b"."))
        backup = None
        bdir = m.get("backup_dir")
        if bdir is not None:
            keep = m.get("backup_keep")
            backup = BackupOptions(os.fsdecode(proto.v_path(bdir) or b"."),
                                   None if keep is None else v_int(keep, 1, 1 << 30))
        replica = Replica(root, readonly=v_bool(m.get("readonly", False)), backup=backup)
        replica.split_walk = True  # the master waits while this agent walks: the second core is free
        try:
            info = replica.open(init=v_bool(m.get("init", False)))
        except BaseException:
            replica.close(save=False)
            raise
        self.replica = replica
        self.send({"t": "opened", "info": proto.enc_open_info(info)})

    def scan(self, m: dict) -> None:
        r = self._need()
        patterns = [v_str(p, 4096) for p in v_list(m.get("patterns", []), 10000)]
        fresh = v_bool(m.get("fresh", False))
        base = v_str(m.get("base", ""), 64)
        res = r.manifest(_excluder(patterns), fresh=fresh)
        cache = r.cache
        if base and cache is not None and cache.generation == base:
            if res.unchanged and not res.decoded:  # the tree is the saved cache: nothing to send
                changed, removed = [], []
            else:
                old = cache.manifest.entries
                entries = res.manifest.entries
                changed = changed_entries(old, entries)
                removed = [os.fsencode(p) for p in old if p not in entries]
            full = False
        else:
            changed, removed, full = list(res.manifest.entries.values()), [], True
        self._send_rows(changed, removed)
        self.send({"t": "scan_end", "full": full, "base": base if not full else "",
                   "errors": [proto.enc_item_error(e) for e in res.errors], "warnings": res.warnings,
                   "fp": res.fingerprint})

    def prep(self) -> None:
        """The master's hint that a plan will follow: read the saved manifest the scan took whole
        now (its row index; a cache without one, every row), while the master plans, instead of
        at the first action that needs a row, and load what writing needs. A hint only: nothing
        is answered, and rows that do not decode are left for those later reads to report, as
        without it."""
        r = self._need()
        try:
            r.ready_rows()
        except ManifestFormatError:
            pass
        __import__("zstandard")  # the writes' compressed rows need it: loaded now, not at the first write
        warm_up()

    def precopy(self, m: dict) -> None:
        """The master's hint that it is hashing again a large file it last had at `size` bytes:
        start copying this replica's version ahead (Replica.precopy, which checks the path and
        the file). A hint only: nothing is answered."""
        r = self._need()
        path = proto.v_relpath(m.get("path"))
        r.precopy(path, v_int(m.get("size"), 0, 1 << 62))

    def root(self, m: dict) -> None:
        """Merkle root of the saved manifest, filtered like a scan with these patterns (verify --quick)."""
        from dirsync.verify import cached_root

        r = self._need()
        patterns = [v_str(p, 4096) for p in v_list(m.get("patterns", []), 10000)]
        _excluder(patterns)  # a bad pattern is the master's error, reported like in scan
        root = b"" if r.cache is None else cached_root(r.cache.manifest, patterns, r.reserved)
        self.send({"t": "root", "root": root})

    def _send_rows(self, entries: list, removed: list[bytes]) -> None:
        for i in range(0, len(entries), proto.ROWS_PER_FRAME):
            self.send({"t": "rows", "rows": encode_rows(entries[i:i + proto.ROWS_PER_FRAME], cache_fields=False)})
        for i in range(0, len(removed), proto.ROWS_PER_FRAME):
            self.send({"t": "removed", "paths": removed[i:i + proto.ROWS_PER_FRAME]})

    def apply(self) -> None:
        r = self._need()
        if r.readonly:
            raise ProtocolError("apply in a read-only session")
        sink = _ResultSender(self)
        self._outbox = sink.emit
        share = _BatchShare(self, r, sink)
        try:
            apply_actions(r, self._actions(share), self._sends, sink)
        finally:
            share.finish(stop=True)  # (only when the loop was left early: else it ended already)
            self._outbox = None
            sink.emit()
        self.send({"t": "applied"})

    def _actions(self, share: _BatchShare) -> Iterator[Action]:
        while True:
            m = self.recv()
            t = m.get("t")
            if t == "apply_end":
                share.finish()
                return
            if t == "wb":
                writes, blob, data = self._batch(m)
                if not (v_bool(m.get("h", False)) and share.take(writes, blob, data)):
                    yield from _new_runs(writes, _pieces(writes, data), self.replica, self._set_inline)
                continue
            if share.helper is not None and t not in ("write", "commit", "data", "end", "abort"):
                share.finish()  # the stretch of writes and commits ended: the helper's files are in
            if m.get("rz") is not None:  # the row and ops continue the session's zstd stream
                blob = self.inflater.inflate(v_bytes(m["rz"], ROW_MAX), ROW_MAX)
                m = {**m, **proto.dec_packed_row(blob, compacted=m.get("dm") is not None)}
            elif m.get("pz") is not None and t == "commit":  # so do a commit's paths
                m = {**m, "ps": proto.dec_packed_paths(self.inflater.inflate(v_bytes(m["pz"], ROW_MAX), ROW_MAX))}
            a = proto.dec_action(m, self._chunk_at, self._scanned_file)
            if share.helper is not None and a.__class__ is Commit:
                a = share.commit(a)  # (the helper's part of it goes to the helper)
                if a is None:
                    continue
            if isinstance(a, WriteFile):
                self.written[a.path] = a.target
                if a.derive:
                    self._derived.add(a.path)
                self._inline = m.get("d")
                if self._inline is not None:
                    v_bytes(self._inline, DATA_MAX)
                    if v_bool(m.get("z", False)):
                        self._inline = self.inflater.inflate(self._inline, a.send_bytes)
                    if len(self._inline) != a.send_bytes:
                        raise ProtocolError(f"write {a.path!r}: {len(self._inline)} inline bytes for "
                                            f"{a.send_bytes} bytes of send ops")
            yield a

    def _batch(self, m: dict) -> tuple[list[WriteFile], bytes, bytes]:
        """A write batch: (its writes, checked; their rows as packed; their bytes)."""
        blob = self.inflater.inflate(v_bytes(m.get("rz"), ROW_MAX), ROW_MAX)  # (the master's stream order)
        data = v_bytes(m.get("d"), DATA_MAX)
        if v_bool(m.get("z", False)):
            data = self.inflater.inflate(data, DATA_MAX)
        writes = proto.dec_batch(blob, len(data))
        written, derived = self.written, self._derived
        for w in writes:
            written[w.path] = w.target
            derived.add(w.path)
        return writes, blob, data

    def _set_inline(self, data: bytes) -> None:
        self._inline = data

    def _sends(self, w: WriteFile) -> Iterator[bytes]:  # (its inline bytes, or data frames to come)
        ops = w.ops
        if not (ops and (ops[0].__class__ is SendOp if len(ops) == 1 else any(isinstance(o, SendOp) for o in ops))):
            return iter(())  # nothing to receive for this file (the master sends no data frames)
        return _Sends(self, w, self._inline)

    def close(self, save: bool) -> None:
        r = self._need()
        touched = r.touched  # False: no action ran, the replica is as scanned
        self.replica = None
        error: ItemError | None = None
        try:
            r.settle()  # from here on r.current is what r.close saves
        except ItemError as e:  # (e.g. its flush failed: then nothing is saved, even if a retry
            error = e           # in close would pass, since the master got no rows for it)
        except OSError as e:
            error = ItemIOError("", "close replica", e)
        generation = ""
        if touched and save and not r.readonly and error is None:
            # The rows first, then the save: the master takes them in while this side encodes
            # and writes its cache (100,000 rows: ~0.3 s each side, one after the other before).
            # The master keeps them only if "closed" names the generation they were saved under;
            # a master that takes "saving" saves its copy under that one meanwhile.
            self._send_changes(r)
            if self._sg and r.will_save(save):
                generation = os.urandom(16).hex()
                self.send({"t": "saving", "gen": generation})
        try:
            gen = r.close(save=save and error is None, generation=generation)
        except ItemError as e:  # e.g. the cache could not be saved: the lock is released all the same
            gen, error = "", e
        except OSError as e:
            gen, error = "", ItemIOError("", "close replica", e)
        msg: dict[str, Any] = {"t": "closed", "gen": gen, "fp": r.closed_fingerprint if gen else b""}
        if error is not None:
            msg["error"] = proto.enc_item_error(error)
        self.send(msg)

    def _send_changes(self, r: Replica) -> None:
        """What the run changed against the scan, for the master's copy of the saved manifest."""
        current = r.current
        if current.__class__ is Overlay:  # (no pass over every row)
            changed, gone = current.changes()  # type: ignore[attr-defined]
            removed = [os.fsencode(p) for p in gone]
        else:
            scanned = r.scanned.entries if r.scanned is not None else {}
            changed = changed_entries(scanned, current)
            removed = [os.fsencode(p) for p in scanned if p not in current]
        # The entries of a directory moved whole that are exactly as scanned at their old
        # paths go back as one `moved` list of suffixes: the master has their rows.
        if self.moves:
            changed, removed = self._send_moves(r, changed, removed)
        # A file now exactly as the master sent it goes back as its path only: the master
        # still has the row (for a large file, thousands of chunk digests).
        derived, get = self._derived, self.written.get
        as_sent: list[bytes] = []
        rest: list = []
        for e in changed:
            p = e.path
            w = get(p)
            # w == e, or for a derived write the same but for the chunk digests (the master has
            # the real ones), inline: an initial copy of 100,000 files asks this of every one
            # (Record.__eq__ and a second test for derived writes: 2.3 us a file, 0.23 s).
            if (w is not None and e.__class__ is FileEntry and w.size == e.size and w.digest == e.digest
                    and w.mtime_ns == e.mtime_ns and w.mode == e.mode and w.avg == e.avg
                    and (w.held_sizes is e.held_sizes or w.sizes == e.sizes)
                    and (p in derived or w.digests == e.digests)):
                as_sent.append(p.encode(_FSENC, "surrogateescape"))  # (os.fsencode, inline)
            else:
                rest.append(e)
        self._send_rows(rest, removed)
        for i in range(0, len(as_sent), proto.ROWS_PER_FRAME):
            self.send({"t": "written", "paths": as_sent[i:i + proto.ROWS_PER_FRAME]})

    def _send_moves(self, r: Replica, changed, removed: list[bytes]) -> tuple[list, list[bytes]]:
        """Send a `moved` frame per directory moved whole, listing the entries now at its new
        path exactly as scanned at the old one; return the changes and removals left."""
        old: dict[str, str] = {}  # new path -> old path
        for m in self.moves:
            for x in m.moved:
                old[m.path + x] = m.src + x
        rest, same = [], set()
        for e in changed:
            q = old.get(e.path)
            s = r.scanned_entry(q) if q is not None else None
            if s is not None and s.__class__ is e.__class__ and s.replace(path=e.path) == e:
                same.add(e.path)
            else:
                rest.append(e)
        gone = {os.fsencode(old[p]) for p in same}
        for m in self.moves:
            xs = [os.fsencode(x) for x in m.moved if m.path + x in same]
            for i in range(0, len(xs), proto.ROWS_PER_FRAME):
                self.send({"t": "moved", "s": os.fsencode(m.src), "p": os.fsencode(m.path),
                           "m": xs[i:i + proto.ROWS_PER_FRAME]})
        return rest, [p for p in removed if p not in gone]

    def _scanned_file(self, src: str) -> FileEntry | None:
        """Replica file `src` as scanned this session (None: not a file then)."""
        e = self._need().scanned_entry(src)
        return e if isinstance(e, FileEntry) else None

    def _chunk_at(self, src: str, offset: int) -> tuple[int, bytes] | None:
        """(size, digest) of the chunk at `offset` of replica file `src`, as scanned this session."""
        table = self._chunk_tables.get(src)
        if table is None:
            e = self._need().scanned_entry(src)
            if not isinstance(e, FileEntry):
                return None
            table = self._chunk_tables[src] = {off: (n, d) for off, n, d in e.chunks()}
        return table.get(offset)

    # -- two-way sides: state files and reads, confined to ROOT/.dirsync and the tree --------

    def _tw_root(self, m: dict) -> str:
        root = os.path.expanduser(os.fsdecode(v_bytes(m.get("root"), 4096) or b"."))
        if "\0" in root:
            raise ProtocolError("NUL in root")
        if self.replica is not None and os.path.abspath(root) != self.replica.root:
            raise ProtocolError("two-way request for another root than the open one")
        return os.path.abspath(root)

    def twoway(self, m: dict) -> None:
        from dirsync.replica import MARKER
        from dirsync.scan import STATE_DIR, read_ignore_file
        from dirsync.state import write_atomic

        root = self._tw_root(m)
        op = v_str(m.get("op"), 10)
        state = os.path.join(root, STATE_DIR)
        if os.path.islink(state):
            raise ProtocolError(f"{state} is a symlink")
        name = None
        if op in ("read", "write", "remove", "head"):
            name = v_str(m.get("name"), 100)
            if not _tw_name(name):
                raise ProtocolError(f"bad two-way state name {name!r}")
        v: Any = None
        if op == "peek":
            try:
                import json  # (here: importing it costs every agent ~5 ms)

                with open(os.path.join(state, MARKER), "rb") as f:
                    v = str(json.loads(f.read())["id"])
            except (OSError, ValueError, KeyError, TypeError):
                v = None
        elif op == "list":
            try:
                v = sorted(n for n in os.listdir(state) if _tw_name(n))
            except OSError:
                v = []
        elif op == "read":
            try:
                with open(os.path.join(state, name), "rb") as f:
                    v = f.read()
            except FileNotFoundError:
                v = None
        elif op == "head":  # the first `size` bytes (a base record's header is in them)
            size = v_int(m.get("size"), 1, HEAD_MAX)
            try:
                with open(os.path.join(state, name), "rb") as f:
                    v = f.read(size)
            except FileNotFoundError:
                v = None
        elif op == "write":
            if self.replica is None or self.replica.readonly:
                raise ProtocolError("two-way state written without an open, writable side")
            try:
                write_atomic(os.path.join(state, name), v_bytes(m.get("data"), DATA_MAX))
            except OSError as e:  # (a full disk): the master reports it, the session goes on
                raise ItemIOError(f".dirsync/{name}", "write two-way state", e) from None
        elif op == "remove":
            if self.replica is None or self.replica.readonly:
                raise ProtocolError("two-way state removed without an open, writable side")
            try:
                os.unlink(os.path.join(state, name))
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ItemIOError(f".dirsync/{name}", "remove two-way state", e) from None
        elif op == "empty":
            try:
                v = all(n == STATE_DIR for n in os.listdir(root))
            except FileNotFoundError:
                v = True
            except OSError:
                v = False
        elif op == "ignore":
            v = read_ignore_file(root)
        else:
            raise ProtocolError(f"unknown two-way request {op!r}")
        self.send({"t": "tw_ok", "v": v})

    def twoway_read(self, m: dict) -> None:
        """Stream the bytes of a range of one of this side's files, each chunk checked against
        the digests the master sent (the row of the file as this side's scan reported it)."""
        from dirsync.apply import MasterReader

        r = self._need()
        rows = proto.dec_rows([m.get("f")])
        f = next(iter(rows.values())) if len(rows) == 1 else None
        if not isinstance(f, FileEntry) or not f.path or f.path.split("/")[0] == ".dirsync":
            raise ProtocolError("tw_read: not a file row")
        ops = []
        for o in v_list(m.get("ops"), 16):
            o = v_list(o, 2)
            if len(o) != 2:
                raise ProtocolError("tw_read: bad range")
            ops.append(SendOp(v_int(o[0], 0, proto.I64), v_int(o[1], 1, proto.I64)))
        try:
            for piece in MasterReader(r.root).sends(WriteFile(f, tuple(ops), None)):
                self.send({"t": "data", "b": bytes(piece)})
        except ItemError as e:
            self.send({"t": "failed", "e": proto.enc_item_error(e)})
            return
        self.send({"t": "end"})

    def _need(self) -> Replica:
        if self.replica is None:
            raise ProtocolError("no replica open")
        return self.replica


class _Sends:
    """The data of one WriteFile's send ops: inline, or `data` frames up to `end`/`abort`."""

    def __init__(self, agent: Agent, w: WriteFile, inline: Any) -> None:
        self.agent = agent
        self.w = w
        self.inline = inline
        self.done = False

    def take_all(self) -> bytes | None:
        """All of the send ops' bytes when they came inline (then this is their only reader),
        else None (read them by iterating)."""
        data, self.inline = self.inline, None
        if data is not None:
            self.done = True
        return data

    def __iter__(self) -> "_Sends":
        return self

    def __next__(self) -> bytes:
        try:
            return self._next()
        except ProtocolError:
            self.done = True  # the stream is poisoned: close() must not read on
            raise

    def _next(self) -> bytes:
        if self.inline is not None:
            data, self.inline = self.inline, None
            self.done = True
            if not data:
                raise StopIteration
            return data
        if self.done:
            raise StopIteration
        m = self.agent.recv()
        t = m.get("t")
        if t == "data":
            b = m.get("b")
            if b.__class__ is not memoryview:  # (a view: a large frame's payload, read in place)
                b = v_bytes(b, DATA_MAX)
            elif len(b) > DATA_MAX:
                raise ProtocolError(f"byte string of {len(b)} bytes exceeds {DATA_MAX}")
            if v_bool(m.get("z", False)):
                b = self.agent.inflater.inflate(b, DATA_MAX)
            return b
        if t == "end":
            self.done = True
            raise StopIteration
        if t == "abort":
            self.done = True
            raise _Aborted(self.w.path, "read", "abandoned by the master")
        raise ProtocolError(f"expected data for {self.w.path!r}, got {str(t)[:40]!r}")

    def close(self) -> None:
        """Skip what is left of this file's data (the writer stopped early)."""
        while not self.done:
            try:
                next(self)
            except (StopIteration, _Aborted):
                self.done = True


STAGED_REPORT_MIN = 1 << 20
DW_MAX = 2048  # done writes in one `dw` outcome at most
_TW_NAME: Any = None  # (compiled by _tw_name when a two-way side first asks: re costs every agent ~3 ms)


def _tw_name(name: str) -> bool:
    """Is `name` a two-way state file's (twoway-<pair>.base, .pending, .step, .snap-<16 hex>)?"""
    global _TW_NAME
    if _TW_NAME is None:
        import re

        _TW_NAME = re.compile(r"twoway-[0-9a-f]{32}\.(?:base|pending|step|snap-[0-9a-f]{16})")
    return _TW_NAME.fullmatch(name) is not None

HEAD_MAX = 1 << 20  # bytes a two-way `head` request may ask for


def _new_runs(writes: list[WriteFile], pieces: Iterator[bytes], replica: Replica, inline: Callable | None = None,
              data: dict[str, bytes] | None = None) -> Iterator:
    """A write batch's writes for the action loop: runs of those Replica.stage_new takes,
    gathered in apply.NewWrites whose source gives (pops) their bytes, and each other write
    alone: inline(its bytes) is called as it is yielded (the agent's), or with `data` (a
    helper's, see _batch_helper_main), every write's bytes go there by path, where the
    helper's sends_for pops them too. Each write is checked as it is reached (the loop has
    carried out everything yielded before it)."""
    most = replica.new_batch_max()
    may = replica.may_stage_new if most > 1 else None
    got: dict[str, bytes] = {} if data is None else data
    run: list = []
    for w, piece in zip(writes, pieces):
        if may is not None and may(w):
            run.append(w)
            got[w.path] = piece
            if len(run) < most:
                continue
            w = None
        if run:
            yield NewWrites(run, _popper(got))
            run = []
            if data is None:
                got = {}
        if w is not None:
            if data is None:
                inline(piece)  # type: ignore[misc]
            else:
                data[w.path] = piece
            yield w
    if run:
        yield NewWrites(run, _popper(got))


def _popper(data: dict[str, bytes]) -> Callable[[WriteFile], bytes | None]:
    return lambda w: data.pop(w.path, None)


def _pieces(writes: list[WriteFile], data: bytes) -> Iterator[bytes]:
    """The bytes of each write of a batch (dec_batch checked that they add up)."""
    pos = 0
    for w in writes:
        n = w.target.size
        yield data[pos:pos + n]
        pos += n


class _BatchShare:
    """A helper writer for write batches (apply._Helper, fed one message at a time). The master
    flags ("h") the batches whose files nothing else in the plan depends on and which are
    committed within its first stretch of writes and commits; this process hands about half of
    them (by cost) to a helper forked at the first, sends it its part of each commit, and waits
    for it where the stretch ends (any other action, or the end of the plan). Files are created
    by two processes then: creating a small file costs about as much kernel time as Python."""

    def __init__(self, agent: Agent, replica: Replica, sink: _ResultSender) -> None:
        self.agent, self.replica, self.sink = agent, replica, sink
        self.helper: _Helper | None = None
        self.paths: set[str] = set()  # the helper's files
        self.closed = not share_batches  # no more sharing (the stretch ended, or no helper could start)
        self.mine = self.theirs = 0  # cost of the flagged batches kept, and handed over

    def take(self, writes: list[WriteFile], blob: bytes, data: bytes) -> bool:
        """Hand a flagged batch to the helper (forked now if it is the first); False: write it here."""
        if self.closed:
            return False
        cost = len(data) + FILE_COST * len(writes)
        if self.theirs * (1 - HELPER_SHARE) > self.mine * HELPER_SHARE:
            self.mine += cost
            return False
        if self.helper is None:
            agent = self.agent
            fds = (agent.rfd, agent.wfd)
            self.helper = _Helper.start_fed(self.replica, lambda fd, rfd: _batch_helper_main(fd, rfd, self.replica, fds)) \
                if self.replica.can_fork_helper(fed=True) else None
            if self.helper is None:
                self.closed = True
                return False
        self.theirs += cost
        self.paths.update(w.path for w in writes)
        if not self.helper.send(("b", blob, data), writes, self.replica, self.sink):
            self.finish()  # (it is gone: its files are reported failed)
        return True

    def commit(self, c: Commit) -> Commit | None:
        """Send the helper its part of commit `c`; the rest (None: nothing) is this process's."""
        paths = self.paths
        theirs = tuple(p for p in c.paths if p in paths)
        if not theirs:
            return c
        assert self.helper is not None
        if not self.helper.send(("c", theirs), [], self.replica, self.sink):
            self.finish()
        mine = tuple(p for p in c.paths if p not in paths)
        return Commit(mine) if mine else None

    def finish(self, stop: bool = False) -> None:
        """Wait for the helper (its input ends), if one runs, and take in all it did; no sharing
        after this. `stop`: the apply loop was left early: the helper stops too."""
        self.closed = True
        h, self.helper = self.helper, None
        if h is not None:
            h.join(self.replica, self.sink, stop=stop)


share_batches = True  # (tests turn it off to compare)
HELPER_SHARE = 0.5  # the helper's share of the flagged batches' cost


def _batch_helper_main(fd: int, rfd: int, replica: Replica, agent_fds: tuple[int, int]) -> None:
    """The batch helper (see _BatchShare): its writes and commits come through `rfd`, its
    outcomes go to the agent through `fd` (apply._helper_main). The session's own pipes are
    the agent's alone."""
    for x in agent_fds:
        os.close(x)
    theirs: list[WriteFile] = []
    data: dict[str, bytes] = {}

    def actions(out) -> Iterator[Action]:
        for msg in fed_messages(rfd):  # (until the agent ends the stretch, or goes away)
            if msg[0] == "b":
                writes = proto.dec_batch(msg[1], len(msg[2]))  # (checked by the agent already; cheap)
                for w in writes:
                    out.index[w.path] = len(theirs)
                    theirs.append(w)
                yield from _new_runs(writes, _pieces(writes, msg[2]), replica, data=data)
            else:
                yield Commit(msg[1])

    _helper_main(fd, replica, theirs, lambda w: WholeSends(data.pop(w.path, b"")), actions)


class _ResultSender:
    """The action loop's sink on the agent: forwards every outcome to the master (held back
    until the agent waits for input, see Agent.send; a large file's `staged` goes at once).
    Done writes gather into one `dw` path list (to a master that takes it) until any other
    outcome, DW_MAX of them, or the agent's next wait for input: a frame per file cost both
    sides ~10 us of Python for 100,000 small files."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.paths: list[bytes] | None = [] if agent._dw else None

    def emit(self) -> None:
        """Send the gathered done writes (in order: before any outcome that follows them)."""
        if self.paths:
            ps, self.paths = self.paths, []
            self.agent.send({"t": "dw", "ps": ps}, later=True)

    def staged(self, w: WriteFile) -> None:
        # Only large files report staging (it drives the master's progress bar); for a small
        # file its `done` implies it, which halves the outcome traffic of a many-file run.
        if w.target.size >= STAGED_REPORT_MIN:
            self.emit()
            self.agent.send({"t": "staged", "p": os.fsencode(w.path)})

    def done(self, a: Action, path: str) -> None:
        if self.paths is not None and a.__class__ is WriteFile:
            self.paths.append(os.fsencode(path))
            if len(self.paths) >= DW_MAX:
                self.emit()
            return
        self.emit()
        if a.__class__ is MoveDir:
            self.agent.moves.append(a)
        self.agent.send({"t": "done", "k": proto.action_type(a),
                         "p": os.fsencode(path)}, later=True)

    def failed(self, path: str, err: ItemError) -> None:
        if isinstance(err, _Aborted):
            return
        self.emit()
        self.agent.send({"t": "failed", "e": proto.enc_item_error(err)}, later=True)

    def warn(self, msg: str) -> None:
        self.emit()
        self.agent.send({"t": "warn", "msg": msg}, later=True)


def _excluder(patterns: list[str]) -> Excluder:
    try:
        return Excluder(patterns)
    except DirsyncError:
        raise
    except Exception as e:  # pathspec's own errors for a malformed pattern
        raise ProtocolError(f"bad exclude pattern: {e}"[:300]) from None


def main() -> int:
    """Entry point of `dirsync agent`: speak frames on the original stdout, keep stray prints off it."""
    rfd = os.dup(0)
    wfd = os.dup(1)
    os.dup2(2, 1)
    widen_pipe(rfd)  # (to sshd or the master: see runtime.widen_pipe)
    widen_pipe(wfd)
    sys.stdout = sys.stderr
    with gc_paused():  # a session is one run (see runtime.gc_paused)
        return Agent(rfd, wfd).run()

