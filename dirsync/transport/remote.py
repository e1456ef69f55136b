"""RemoteTransport: a replica on another machine, driven through `dirsync agent` over a Channel.

Written once against a Channel (a byte pipe): ParamikoChannel over SSH in production,
SubprocessChannel in tests. One reader thread, owned by this object (started in open, joined
in close), turns incoming frames into messages on a queue, so the main thread can stream
actions and data without ever blocking the agent on a full pipe. Only manifests, actions and
the bytes of send ops cross the link; the replica's file contents never do.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Sequence

from dirsync import __version__, chunking
from dirsync.apply import MasterReader, Sink
from dirsync.errors import ConnectError, ItemError, ProtocolError
from dirsync.manifest import Manifest
from dirsync.plan import Action, Commit, Delete, MakeDir, MakeLink, SetMeta, WriteFile
from dirsync.replica import OpenInfo
from dirsync.scan import ScanResult
from dirsync.state import load_manifest_file, save_manifest_file, state_home, _key
from dirsync.transport import TransportOptions
from dirsync.transport import proto
from dirsync.transport.wire import FrameDecoder, check_hello, encode, hello, v_bytes, v_list, v_map, v_str

INLINE_MAX = 64 << 10  # send-op data up to this size travels inside the write message
FLUSH_AT = 256 << 10  # coalesce small frames into writes of about this size
IO_TIMEOUT_S = 60.0  # the agent pings every 5 s; this long without a frame means the link is dead
_DONE_KINDS = {"mkdir": MakeDir, "link": MakeLink, "meta": SetMeta, "del": Delete}


class RemoteTransport:
    is_remote = True

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
        self.out = bytearray()
        self.base: Manifest | None = None  # our copy of the replica's last saved manifest
        self.scanned: Manifest | None = None
        self._cached_root: bytes | None = None
        self._cache_file = os.path.join(state_home(), "replicas", _key(spec) + ".manifest")
        self._zc = None
        if opts.compress:
            import zstandard

            self._zc = zstandard.ZstdCompressor(level=3)

    # -- connection ------------------------------------------------------------------

    def _connect(self) -> None:
        if self._factory is not None:
            self.chan = self._factory()
            return
        from dirsync.transport.ssh import ParamikoChannel, connect, remote_command

        self.client = connect(self.ep, port=self.opts.port, identity=self.opts.identity,
                              ssh_config_file=self.opts.ssh_config,
                              accept_new_host_key=self.opts.accept_new_host_key,
                              connect_timeout=self.opts.connect_timeout)
        cmd = f"{self.opts.remote_cmd or 'dirsync'} agent"
        self.chan = ParamikoChannel(self.client, cmd, label=str(self.ep))

    def _read_loop(self) -> None:
        dec = FrameDecoder()
        try:
            while True:
                data = self.chan.recv(1 << 20)
                if not data:
                    dec.check_eof()
                    self.inbox.put(EOFError())
                    return
                for m in dec.feed(data):
                    if isinstance(m, dict) and m.get("t") == "ping":
                        continue
                    self.inbox.put(m)
        except Exception as e:  # handed to the owner thread, which raises it
            self.inbox.put(e)

    def _send(self, msg: Any, flush: bool = False) -> None:
        self.out += encode(msg)
        if flush or len(self.out) >= FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if self.out:
            data, self.out = bytes(self.out), bytearray()
            self.chan.send(data)

    def _recv(self, timeout: float = IO_TIMEOUT_S) -> dict:
        self._flush()
        try:
            m = self.inbox.get(timeout=timeout)
        except queue.Empty:
            raise ConnectError(f"connection lost to {self.ep}: no answer for {timeout:g} s") from None
        if isinstance(m, EOFError):
            raise self._lost("the agent closed the connection")
        if isinstance(m, BaseException):
            if isinstance(m, (ConnectError, ProtocolError)):
                raise m
            raise self._lost(str(m) or type(m).__name__)
        m = v_map(m)
        if m.get("t") == "fatal":
            raise proto.dec_fatal(m, str(self.ep))
        return m

    def _lost(self, why: str) -> ConnectError:
        err = self.chan.stderr_text().strip() if self.chan is not None else ""
        status = self.chan.exit_status() if self.chan is not None else None
        if status == 127 or "not found" in err:
            return ConnectError(f"{self.ep}: the remote side could not start dirsync ({err.splitlines()[-1] if err else 'exit 127'})",
                                hint="install dirsync on the remote host (pip install dirsync-mirror), "
                                     "or point --remote-cmd at it, e.g. --remote-cmd '/opt/venv/bin/dirsync'")
        tail = f" (remote said: {err.splitlines()[-1][:300]})" if err else ""
        return ConnectError(f"connection lost to {self.ep}: {why}{tail}")

    # -- contract ----------------------------------------------------------------------

    def open(self, *, init: bool = False, readonly: bool = False) -> OpenInfo:
        self._connect()
        self.reader = threading.Thread(target=self._read_loop, name=f"dirsync-reader {self.name}")
        self.reader.start()
        try:
            self._send(hello(__version__), flush=True)
            check_hello(self._recv(timeout=max(IO_TIMEOUT_S, self.opts.connect_timeout)))
            msg: dict[str, Any] = {"t": "open", "root": os.fsencode(self.path), "init": init, "readonly": readonly}
            if self.opts.backup_dir:
                msg["backup_dir"] = os.fsencode(self.opts.backup_dir)
                msg["backup_keep"] = self.opts.backup_keep
            self._send(msg, flush=True)
            m = self._expect("opened")
            return proto.dec_open_info(m.get("info"))
        except BaseException:
            self._shutdown()
            raise

    def _expect(self, t: str) -> dict:
        m = self._recv()
        if m.get("t") != t:
            raise ProtocolError(f"{self.ep}: expected {t!r}, got {str(m.get('t'))[:40]!r}")
        return m

    def scan(self, patterns: list[str], *, fresh: bool = False) -> ScanResult:
        load = load_manifest_file(self._cache_file, chunking.CHUNKER_ID)
        self.base = load.manifest
        base_gen = self.base.generation if self.base is not None else ""
        self._send({"t": "scan", "patterns": list(patterns), "fresh": fresh, "base": base_gen}, flush=True)
        changed: dict = {}
        removed: list[str] = []
        while True:
            m = self._recv()
            t = m.get("t")
            if t == "rows":
                changed.update(proto.dec_rows(m.get("rows")))
            elif t == "removed":
                removed.extend(os.fsdecode(v_bytes(p, 4096)) for p in v_list(m.get("paths"), proto.MAX_ROWS))
            elif t == "scan_end":
                break
            else:
                raise ProtocolError(f"{self.ep}: unexpected {str(t)[:40]!r} during scan")
        if m.get("full", True):
            entries = changed
        else:
            if self.base is None or m.get("base") != base_gen:
                raise ProtocolError(f"{self.ep}: agent sent a delta against a manifest we do not have")
            entries = dict(self.base.entries)
            for p in removed:
                entries.pop(p, None)
            entries.update(changed)
        self.scanned = Manifest(entries)
        root = m.get("cached_root") or b""
        self._cached_root = v_bytes(root, 64) or None
        res = ScanResult(self.scanned)
        res.errors = [proto.dec_item_error(e) for e in v_list(m.get("errors", []), 1 << 20)]
        res.warnings = [v_str(w, 4096) for w in v_list(m.get("warnings", []), 1 << 20)]
        return res

    def cached_root(self, patterns: list[str]) -> bytes | None:
        if self.scanned is None:
            self.scan(patterns)
        return self._cached_root

    def apply(self, actions: Sequence[Action], master: MasterReader, sink: Sink,
              should_stop: Callable[[], bool] = lambda: False) -> None:
        writes: dict[str, WriteFile] = {}
        others: dict[tuple[str, str], Action] = {}
        self._send({"t": "apply"})
        for a in actions:
            if should_stop():
                break
            if isinstance(a, WriteFile):
                writes[a.path] = a
                self._send_write(a, master, sink)
            else:
                if not isinstance(a, Commit):
                    others[(proto.enc_action(a)["t"], a.path)] = a
                self._send(proto.enc_action(a))
            self._dispatch(sink, writes, others, block=False)
        self._send({"t": "apply_end"}, flush=True)
        while not self._dispatch(sink, writes, others, block=True):
            pass

    def _send_write(self, w: WriteFile, master: MasterReader, sink: Sink) -> None:
        msg = proto.enc_action(w)
        n = w.send_bytes
        try:
            if n <= INLINE_MAX:
                if n:
                    msg["d"] = b"".join(master.sends(w))
                self._send(msg)
                return
            self._send(msg)
            started = True
            for piece in master.sends(w):
                self._send(self._data(piece))
            self._send({"t": "end"})
        except ItemError as e:
            if n > INLINE_MAX:
                self._send({"t": "abort"})
            sink.failed(w.path, e)

    def _data(self, piece: bytes) -> dict:
        if self._zc is not None and len(piece) >= 512:
            z = self._zc.compress(piece)
            if len(z) < len(piece) * 0.9:  # skip data that does not compress
                return {"t": "data", "b": z, "z": True}
        return {"t": "data", "b": bytes(piece)}

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
                    m = v_map(item)
                    if m.get("t") == "fatal":
                        raise proto.dec_fatal(m, str(self.ep))
            t = m.get("t")
            if t == "applied":
                return True
            path = os.fsdecode(v_bytes(m.get("p", b""), 4096))
            if t == "staged":
                w = writes.get(path)
                if w is not None:
                    sink.staged(w)
            elif t == "done":
                k = v_str(m.get("k"), 8)
                if k == "write":
                    w = writes.get(path)
                    if w is not None:
                        sink.done(w, path)
                else:
                    a = others.get((k, path))
                    if a is not None:
                        sink.done(a, path)
            elif t == "failed":
                e = proto.dec_item_error(m.get("e"))
                sink.failed(e.path, e)
            elif t == "warn":
                sink.warn(v_str(m.get("msg"), 4096))
            else:
                raise ProtocolError(f"{self.ep}: unexpected {str(t)[:40]!r} during apply")
            if block:
                return False

    def close(self, *, save: bool = True) -> None:
        try:
            if self.chan is not None and self.reader is not None and self.reader.is_alive():
                self._send({"t": "close", "save": save}, flush=True)
                changed: dict = {}
                removed: list[str] = []
                while True:
                    m = self._recv()
                    t = m.get("t")
                    if t == "rows":
                        changed.update(proto.dec_rows(m.get("rows")))
                    elif t == "removed":
                        removed.extend(os.fsdecode(v_bytes(p, 4096)) for p in v_list(m.get("paths"), proto.MAX_ROWS))
                    elif t == "closed":
                        break
                gen = v_str(m.get("gen", ""), 64)
                self._remember(gen, changed, removed)
                self._send({"t": "bye"}, flush=True)
        except (ConnectError, ProtocolError, OSError):
            pass
        finally:
            self._shutdown()

    def _remember(self, gen: str, changed: dict, removed: list[str]) -> None:
        """Keep our copy of the replica's saved manifest, so the next scan can be a delta."""
        try:
            if not gen or self.scanned is None:
                if os.path.exists(self._cache_file):
                    os.unlink(self._cache_file)
                return
            entries = dict(self.scanned.entries)
            for p in removed:
                entries.pop(p, None)
            entries.update(changed)
            save_manifest_file(self._cache_file, Manifest(entries, generation=gen), chunking.CHUNKER_ID)
        except OSError:
            pass

    def _shutdown(self) -> None:
        if self.chan is not None:
            try:
                self.chan.send_eof()
            except Exception:
                pass
            try:
                self.chan.close()
            except Exception:
                pass
        if self.reader is not None:
            self.reader.join(timeout=10)
            self.reader = None
        if self.client is not None:
            self.client.close()
            self.client = None
        self.chan = None
