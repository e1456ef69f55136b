"""Wire format between dirsync and its remote agent: framing, codecs, validators. Pure: no I/O.

A frame is a 4-byte big-endian body length followed by a msgpack body whose
top level is a map or an array. Every message is a map with a ``"type"`` key
(see ``hello``). Paths travel as msgpack *bin* (raw filesystem bytes) so
non-UTF-8 names survive; strings are UTF-8.

Everything that arrives from the peer is hostile until a ``v_*`` validator has
accepted it: lengths, offsets, counts, paths and error codes alike. The
validators raise ``ProtocolError``, which ends the session (exit code 11).
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from collections.abc import Mapping

import msgpack

from dirsync.errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Any

__all__ = [
    "MAX_FRAME",
    "MAX_RELPATH",
    "PROTO_VERSION",
    "ErrorCode",
    "FrameDecoder",
    "ProtocolError",
    "check_hello",
    "data_frame_head",
    "decode_frame_body",
    "encode",
    "errno_to_code",
    "hello",
    "relpath_bytes",
    "v_bool",
    "v_bytes",
    "v_code",
    "v_field",
    "v_int",
    "v_list",
    "v_map",
    "v_relpath",
    "v_str",
    "v_type",
]

PROTO_VERSION = 1
"""Bumped on any incompatible change to messages or framing."""

MAX_FRAME = 16 * 1024 * 1024
"""Largest accepted frame body, checked before any allocation (Syncthing's MaxMessageLen)."""

MAX_RELPATH = 4096
"""Longest relpath accepted from the peer, in bytes (Linux PATH_MAX)."""

U64_MAX = 2**64 - 1
"""Upper bound for sizes/offsets/ids; msgpack ints cannot exceed it anyway."""

_HEADER = struct.Struct(">I")


# ---------------------------------------------------------------------------
# Framing


def encode(msg: Mapping[str, Any] | list[Any] | tuple[Any, ...]) -> bytes:
    """Return one frame (header + msgpack body) for ``msg``.

    Raises ``ProtocolError`` if ``msg`` is not a map/array, cannot be packed,
    or packs to more than ``MAX_FRAME`` bytes (a bug on our side: callers
    split large data into several messages).
    """
    if not isinstance(msg, (Mapping, list, tuple)):
        raise ProtocolError(f"cannot send {type(msg).__name__}: a frame holds a map or an array")
    try:
        body = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode message: {e}") from e
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(body)) + body


_DATA_HEAD = {False: b"\x82\xa1t\xa4data\xa1b", True: b"\x83\xa1t\xa4data\xa1z\xc3\xa1b"}


def data_frame_head(n: int, z: bool = False) -> bytes:
    """The start of encode({"t": "data", "b": payload} (with "z": True when `z`)) for a payload
    of `n` bytes: the frame header and the body up to the payload, which the caller sends
    right after it ("b" comes last): the same message, without copying a large payload into a
    frame (packing, prefixing and buffering each copied it: four copies of every byte sent)."""
    if n < 256:
        bin_head = b"\xc4" + n.to_bytes(1, "big")
    elif n < 65536:
        bin_head = b"\xc5" + n.to_bytes(2, "big")
    else:
        bin_head = b"\xc6" + n.to_bytes(4, "big")
    head = _DATA_HEAD[bool(z)] + bin_head
    if len(head) + n > MAX_FRAME:
        raise ProtocolError(f"message of {len(head) + n} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return _HEADER.pack(len(head) + n) + head


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"unexpected msgpack extension type {code}")


def _decode_body(body: bytes | memoryview) -> Any:
    try:
        msg = msgpack.unpackb(
            body,
            raw=False,  # str must be valid UTF-8; paths travel as bin
            strict_map_key=True,  # map keys are str or bytes only
            use_list=True,
            ext_hook=_reject_ext,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        # ValueError covers ExtraData, StackError (deep nesting), FormatError,
        # UnicodeDecodeError and "incomplete input".
        raise ProtocolError(f"malformed frame body: {type(e).__name__}: {e}") from e
    if not isinstance(msg, (dict, list)):
        raise ProtocolError(f"frame body is a {type(msg).__name__}, expected a map or an array")
    return msg


def decode_frame_body(body: bytearray) -> Any:
    """The message of a whole frame body (see FrameDecoder.take_partial), as feed would give it,
    except that a data message laid out as data_frame_head starts it gives its payload as a
    memoryview of `body` instead of a copy. Any other layout is decoded (and checked) as usual."""
    for z, head in _DATA_HEAD.items():
        if body.startswith(head):
            k = len(head) + 5
            if len(body) >= k and body[k - 5] == 0xC6 and int.from_bytes(body[k - 4:k], "big") == len(body) - k:
                return {"t": "data", "z": True, "b": memoryview(body)[k:]} if z else \
                    {"t": "data", "b": memoryview(body)[k:]}
            break
    return _decode_body(body)


def _looks_like_text(data: bytes) -> bool:
    """All printable, or a printable first line (a banner followed by whatever came next)."""
    def printable(d: bytes) -> bool:
        return bool(d) and all(32 <= b < 127 or b in (9, 10, 13) for b in d)

    line, nl, _ = data.partition(b"\n")
    return printable(data) or (bool(nl) and len(line) >= 2 and printable(line))


class FrameDecoder:
    """Incremental frame decoder: feed it bytes as they arrive, get whole messages back.

    The stream may be split at any byte boundary. After a ``ProtocolError``
    the decoder is poisoned and every later ``feed`` raises again: the stream
    cannot be resynchronised, so the session must end.
    """

    __slots__ = ("_buf", "_error", "_max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data`` and return every message completed by it, in order.

        Raises ``ProtocolError`` for an oversize or zero length, or a body that
        is not valid msgpack holding a map or an array.
        """
        if self._error is not None:
            raise self._error
        if data:
            self._buf += data
        out: list[Any] = []
        buf = self._buf
        pos = 0
        view = memoryview(buf)  # (bodies are decoded in place: a write batch is a megabyte)
        try:
            while len(buf) - pos >= 4:
                (n,) = _HEADER.unpack_from(buf, pos)
                if n == 0 or n > self._max_frame:
                    raise self._bad_length(n, bytes(buf[pos : pos + 40]))
                if len(buf) - pos - 4 < n:
                    break
                with view[pos + 4 : pos + 4 + n] as body:  # (released even when it is refused)
                    out.append(_decode_body(body))
                pos += 4 + n
        except ProtocolError as e:
            self._error = e
            raise
        finally:
            view.release()  # (before the buffer shrinks: msgpack copied what it returned)
            if pos:
                del buf[:pos]
        return out

    def take_partial(self, least: int) -> tuple[int, bytearray] | None:
        """For a reader that takes a large frame's body straight into a buffer of its own (one
        copy from the kernel, instead of another into this buffer and a third out of it): when
        what is buffered is the start of one frame of at least `least` bytes (its length checked
        by feed), take it out: (the body's length, the part of the body already here). Else None.
        Give the whole body to decode_frame_body."""
        buf = self._buf
        if self._error is not None or len(buf) < 4:
            return None
        (n,) = _HEADER.unpack_from(buf, 0)
        if n < least or len(buf) - 4 >= n:
            return None
        part = buf[4:]
        buf.clear()
        return n, part

    def check_eof(self) -> None:
        """Call when the peer closed its side: raise if a frame was cut short."""
        if self._error is not None:
            raise self._error
        if self._buf:
            raise ProtocolError(f"connection closed in the middle of a frame ({len(self._buf)} bytes pending)")

    def _bad_length(self, n: int, head: bytes) -> ProtocolError:
        if n == 0:
            return ProtocolError("peer sent an empty frame")
        if _looks_like_text(head):
            # Typically a login banner, a shell error, or an old/alien program
            # on the other end writing text to stdout.
            return ProtocolError(
                f"peer sent text instead of a dirsync frame: {head!r}",
                hint="check that the remote command is a dirsync agent and that the "
                "remote login shell prints nothing to stdout",
            )
        return ProtocolError(f"frame length {n} exceeds the limit of {self._max_frame} bytes (starts {head[:16]!r})")


# ---------------------------------------------------------------------------
# Handshake


def hello(version: str, **extra: Any) -> dict[str, Any]:
    """The first message each side sends: protocol number plus software version.

    ``extra`` carries optional capabilities (for example ``features``); a peer
    ignores keys it does not know.
    """
    return {"type": "hello", "proto": PROTO_VERSION, "version": version, **extra}


def check_hello(msg: Any) -> dict[str, Any]:
    """Validate the peer's hello and return it.

    Raises ``ProtocolError`` if ``msg`` is not a hello, or names a different
    protocol version (the message names both versions).
    """
    m = v_map(msg)
    if m.get("type") != "hello":
        raise ProtocolError(f"expected a hello message from the peer, got {_short(m.get('type'))}")
    proto = v_int(v_field(m, "proto"), 0, 2**31)
    peer_version = v_str(m.get("version", "?"), 200)
    if proto != PROTO_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: this side speaks {PROTO_VERSION}, "
            f"the peer (dirsync {peer_version}) speaks {proto}",
            hint="install the same dirsync version on both machines",
        )
    return m


# ---------------------------------------------------------------------------
# Validators: apply to every value received from the peer


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def v_int(x: Any, lo: int = 0, hi: int = U64_MAX) -> int:
    """Return ``x`` if it is an int (not a bool) with ``lo <= x <= hi``."""
    if type(x) is not int:
        raise ProtocolError(f"expected an integer, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ProtocolError(f"integer {_short(x)} out of range [{lo}, {hi}]")
    return x


def v_bool(x: Any) -> bool:
    """Return ``x`` if it is a bool."""
    if type(x) is not bool:
        raise ProtocolError(f"expected a boolean, got {type(x).__name__}")
    return x


def v_bytes(x: Any, max_len: int) -> bytes:
    """Return ``x`` if it is bytes of at most ``max_len``."""
    if type(x) is not bytes:
        raise ProtocolError(f"expected bytes, got {type(x).__name__}")
    if len(x) > max_len:
        raise ProtocolError(f"byte string of {len(x)} bytes exceeds {max_len}")
    return x


def v_str(x: Any, max_len: int = 4096) -> str:
    """Return ``x`` if it is a str of at most ``max_len`` characters."""
    if type(x) is not str:
        raise ProtocolError(f"expected a string, got {type(x).__name__}")
    if len(x) > max_len:
        raise ProtocolError(f"string of {len(x)} characters exceeds {max_len}")
    return x


def v_list(x: Any, max_len: int) -> list[Any]:
    """Return ``x`` if it is an array of at most ``max_len`` items (items unchecked)."""
    if type(x) is not list:
        raise ProtocolError(f"expected an array, got {type(x).__name__}")
    if len(x) > max_len:
        raise ProtocolError(f"array of {len(x)} items exceeds {max_len}")
    return x


def v_map(x: Any, max_len: int = 64) -> dict[str, Any]:
    """Return ``x`` if it is a map with str keys and at most ``max_len`` entries."""
    if type(x) is not dict:
        raise ProtocolError(f"expected a map, got {type(x).__name__}")
    if len(x) > max_len:
        raise ProtocolError(f"map of {len(x)} entries exceeds {max_len}")
    for k in x:
        if type(k) is not str:
            raise ProtocolError(f"map key {_short(k)} is not a string")
    return x


def v_field(m: Mapping[str, Any], key: str) -> Any:
    """Return ``m[key]``, or raise ``ProtocolError`` naming the missing field."""
    try:
        return m[key]
    except KeyError:
        raise ProtocolError(f"message {_short(m.get('type'))} lacks field {key!r}") from None


def v_type(m: Any, *allowed: str) -> str:
    """Return the ``type`` of message ``m`` if it is one of ``allowed``."""
    t = v_field(v_map(m), "type")
    if t not in allowed:
        raise ProtocolError(f"unexpected message {_short(t)}, expected one of {', '.join(allowed)}")
    return t  # type: ignore[no-any-return]


def v_relpath(b: Any) -> str:
    """Turn a relpath received as bytes into a str, refusing anything that could escape the root.

    Accepts ``a``, ``a/b/c``. Rejects: non-bytes, empty, longer than
    ``MAX_RELPATH``, NUL, absolute, trailing slash, empty components
    (``a//b``), ``.`` and ``..`` components. Non-UTF-8 bytes are kept with
    ``os.fsdecode`` (surrogateescape), so ``os.fsencode`` restores them.
    """
    if type(b) is bytes and b:  # the usual case in one pass of fast tests
        w = b"/" + b + b"/"
        if not (b"//" in w or b"/./" in w or b"/../" in w or b"\0" in b or len(b) > MAX_RELPATH):
            return os.fsdecode(b)
    if type(b) is not bytes:
        raise ProtocolError(f"path must be bytes, got {type(b).__name__}")
    if not b:
        raise ProtocolError("empty path")
    if len(b) > MAX_RELPATH:
        raise ProtocolError(f"path of {len(b)} bytes exceeds {MAX_RELPATH}")
    if b"\0" in b:
        raise ProtocolError(f"path contains NUL: {_short(b)}")
    if b.startswith(b"/"):
        raise ProtocolError(f"absolute path: {_short(b)}")
    if b.endswith(b"/"):
        raise ProtocolError(f"path ends with '/': {_short(b)}")
    for part in b.split(b"/"):
        if part in (b"", b".", b".."):
            raise ProtocolError(f"path has an empty, '.' or '..' component: {_short(b)}")
    return os.fsdecode(b)


def relpath_bytes(path: str) -> bytes:
    """Encode a relpath for the wire; the inverse of ``v_relpath``."""
    return os.fsencode(path)


# ---------------------------------------------------------------------------
# Result codes


class ErrorCode:
    """Why one item failed on the replica. Closed set (`codes()`); tracebacks never cross the
    wire. Plain strings: an Enum would import enum, ~3 ms of every agent's start-up."""

    NOT_FOUND = "NOT_FOUND"  # a path (or a basis file) that should exist does not
    CONFLICT = "CONFLICT"  # the replica is not in the expected state (precondition)
    PERMISSION = "PERMISSION"  # EACCES/EPERM/EROFS
    NO_SPACE = "NO_SPACE"  # ENOSPC/EDQUOT
    INVALID_PATH = "INVALID_PATH"  # refused path: escapes the root, symlinked parent, too long
    IO = "IO"  # any other OS error
    CHANGED = "CHANGED"  # data did not match its digest (source changed while read)
    INTERNAL = "INTERNAL"  # a bug in the agent

    @classmethod
    def codes(cls) -> frozenset[str]:
        return frozenset(v for k, v in vars(cls).items() if k.isupper())


def v_code(x: Any) -> str:
    """Return ``x`` when it names an ``ErrorCode``, or raise ``ProtocolError``."""
    if type(x) is not str:
        raise ProtocolError(f"error code must be a string, got {type(x).__name__}")
    if x not in _CODES:
        raise ProtocolError(f"unknown error code {_short(x)}")
    return x


_CODES = ErrorCode.codes()
_ERRNO_CODES: dict[int, str] = {
    _errno.ENOENT: ErrorCode.NOT_FOUND,
    _errno.ENOTDIR: ErrorCode.NOT_FOUND,
    _errno.EACCES: ErrorCode.PERMISSION,
    _errno.EPERM: ErrorCode.PERMISSION,
    _errno.EROFS: ErrorCode.PERMISSION,
    _errno.ENOSPC: ErrorCode.NO_SPACE,
    _errno.EDQUOT: ErrorCode.NO_SPACE,
    _errno.EEXIST: ErrorCode.CONFLICT,
    _errno.ENOTEMPTY: ErrorCode.CONFLICT,
    _errno.EISDIR: ErrorCode.CONFLICT,
    _errno.ELOOP: ErrorCode.INVALID_PATH,  # O_NOFOLLOW met a symlink
    _errno.ENAMETOOLONG: ErrorCode.INVALID_PATH,
    _errno.EXDEV: ErrorCode.INVALID_PATH,  # openat2 RESOLVE_BENEATH / cross-device
}


def errno_to_code(err: int | None) -> str:
    """Map an ``OSError.errno`` to an ``ErrorCode``; unknown or ``None`` gives ``IO``."""
    if err is None:
        return ErrorCode.IO
    return _ERRNO_CODES.get(err, ErrorCode.IO)


class Inflater:
    """The receiving end of a session's zstd stream (write rows and --compress data towards the
    agent, outcome batches back): each compressed payload continues it, in message order. Input
    is fed in small steps and output past the payload's limit is refused, so a decompression
    bomb costs at most limit + 8 MiB of memory (one zstd block inflates to at most 128 KiB and
    takes at least 4 bytes, so a 256-byte step makes at most 8 MiB)."""

    STEP = 256

    def __init__(self) -> None:
        self._d: Any = None

    def inflate(self, z: bytes, limit: int) -> bytes:
        import zstandard  # here: a session that never inflates does not load it

        if self._d is None:
            self._d = zstandard.ZstdDecompressor().decompressobj(write_size=1 << 17)
        out = bytearray()
        view = memoryview(z)
        try:
            for i in range(0, len(view), self.STEP):
                out += self._d.decompress(view[i:i + self.STEP])
                if len(out) > limit:
                    raise ProtocolError(f"compressed data inflates past the {limit}-byte limit")
        except zstandard.ZstdError as e:
            raise ProtocolError(f"bad compressed data: {e}") from None
        return bytes(out)
