"""wire.py: framing round trips, a stream split at every byte boundary, limits, hostile values."""

from __future__ import annotations

import errno
import os
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirsync.errors import ExitCode, ProtocolError
from dirsync.transport import wire
from dirsync.transport.wire import (
    MAX_FRAME,
    PROTO_VERSION,
    ErrorCode,
    FrameDecoder,
    check_hello,
    encode,
    errno_to_code,
    hello,
    relpath_bytes,
    v_bool,
    v_bytes,
    v_code,
    v_field,
    v_int,
    v_list,
    v_map,
    v_relpath,
    v_str,
    v_type,
)

MESSAGES = [
    hello("0.1.0"),
    {"type": "action", "id": 7, "kind": "write", "path": b"a/b\xff.txt", "size": 2**63},
    {"type": "data", "id": 7, "bytes": os.urandom(3000)},
    {"type": "result", "id": 7, "ok": False, "code": ErrorCode.NO_SPACE, "msg": "disk full ünïcode"},
    [1, 2, [3, {"k": None}]],
    {},
    [],
    {"type": "bye"},
]


def test_protocol_error_is_the_core_one() -> None:
    assert wire.ProtocolError is ProtocolError
    assert ProtocolError("x").exit_code == ExitCode.PROTOCOL


def test_encode_layout() -> None:
    frame = encode({"type": "bye"})
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"type": "bye"}


@pytest.mark.parametrize("msg", MESSAGES, ids=range(len(MESSAGES)))
def test_round_trip(msg: object) -> None:
    got = FrameDecoder().feed(encode(msg))  # type: ignore[arg-type]
    assert got == [msg]


def test_stream_split_at_every_byte_boundary() -> None:
    stream = b"".join(encode(m) for m in MESSAGES)  # type: ignore[arg-type]
    want = FrameDecoder().feed(stream)
    assert len(want) == len(MESSAGES)
    for cut in range(len(stream) + 1):
        d = FrameDecoder()
        got = d.feed(stream[:cut]) + d.feed(stream[cut:])
        assert got == want, cut
        assert d.buffered == 0
        d.check_eof()


def test_stream_fed_one_byte_at_a_time() -> None:
    stream = b"".join(encode(m) for m in MESSAGES)  # type: ignore[arg-type]
    d = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += d.feed(stream[i : i + 1])
    assert got == FrameDecoder().feed(stream)


@settings(max_examples=200, deadline=None)
@given(
    msgs=st.lists(
        st.dictionaries(
            st.text(max_size=8),
            st.one_of(st.integers(-(2**63), 2**64 - 1), st.binary(max_size=64), st.text(max_size=16), st.none()),
            max_size=5,
        ),
        max_size=6,
    ),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_random_messages_random_splits(msgs: list[dict[str, object]], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in msgs)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    d = FrameDecoder()
    got = []
    for a, b in zip(points, points[1:]):
        got += d.feed(stream[a:b])
    assert got == msgs
    d.check_eof()


def test_truncated_stream_detected_at_eof() -> None:
    frame = encode({"type": "bye"})
    d = FrameDecoder()
    assert d.feed(frame[:-1]) == []
    with pytest.raises(ProtocolError, match="middle of a frame"):
        d.check_eof()


def test_oversize_length_rejected_before_allocation() -> None:
    d = FrameDecoder()
    # only the header arrives: must be refused from the 4 bytes alone
    with pytest.raises(ProtocolError, match="exceeds"):
        d.feed(struct.pack(">I", MAX_FRAME + 1))
    assert d.buffered == 4  # nothing allocated for the body


def test_max_frame_accepted() -> None:
    body_len = MAX_FRAME - 32  # room for the map and bin headers
    msg = {"type": "data", "bytes": b"\0" * body_len}
    with pytest.raises(ProtocolError):
        encode({"type": "data", "bytes": b"\0" * MAX_FRAME})
    frame = encode(msg)
    assert len(frame) - 4 <= MAX_FRAME
    assert FrameDecoder().feed(frame) == [msg]


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 1 << 20, wire.MAX_FRAME - 20])
@pytest.mark.parametrize("z", [False, True])
def test_a_data_frame_sent_head_first_is_the_message_encode_makes(n: int, z: bool) -> None:
    """RemoteTransport sends a large "data" message as its frame's head, then the payload as is
    (no copy into a frame): the far side must decode exactly the message encode() would have
    framed, at every msgpack bin size (1-, 2- and 4-byte lengths) and up to the frame limit."""
    payload = os.urandom(n)
    msg = {"t": "data", "b": payload, "z": True} if z else {"t": "data", "b": payload}
    head = wire.data_frame_head(n, z)
    dec = FrameDecoder()
    assert dec.feed(head) + dec.feed(payload) == [msg] and dec.buffered == 0
    if not z:  # (with "z" only the order of the keys differs)
        assert head + payload == encode(msg)
    with pytest.raises(ProtocolError):
        wire.data_frame_head(wire.MAX_FRAME, z)


@pytest.mark.parametrize("z", [False, True])
@pytest.mark.parametrize("n", [1 << 18, (1 << 20) + 7, wire.MAX_FRAME - 20])
def test_a_large_frame_taken_out_and_read_in_place_is_the_message_feed_gives(n: int, z: bool) -> None:
    """The agent reads a large frame's body straight into one buffer (take_partial, then
    decode_frame_body): the message must be what feed() gives for the same bytes, a data
    message's payload a view of that buffer (not a copy); any other large message is decoded
    as usual, and a data frame with a byte too many is refused as feed refuses it."""
    payload = os.urandom(n)
    frame = wire.data_frame_head(n, z) + payload
    (want,) = FrameDecoder().feed(frame)
    for cut in (5, 4 + 100, 1 << 17):
        dec = FrameDecoder()
        assert dec.feed(frame[:cut]) == [] and dec.take_partial(n + 100) is None  # (smaller than asked for)
        got = dec.take_partial(1 << 18)
        assert got is not None and dec.buffered == 0
        size, part = got
        assert size == len(frame) - 4 and bytes(part) == frame[4:cut]
        msg = wire.decode_frame_body(bytearray(part) + frame[cut:])
        assert isinstance(msg["b"], memoryview)
        assert {**msg, "b": bytes(msg["b"])} == want
    other = encode({"t": "wb", "rz": b"r", "d": payload[:n - 64]})
    dec = FrameDecoder()
    dec.feed(other[:1000])
    size, part = dec.take_partial(1 << 16)
    assert wire.decode_frame_body(bytearray(part) + other[1000:]) == FrameDecoder().feed(other)[0]
    longer = wire.data_frame_head(n, z)[4:] + payload + b"\x00"  # (its bin length says n)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(longer)) + longer)
    with pytest.raises(ProtocolError):
        wire.decode_frame_body(bytearray(longer))


def test_a_complete_or_small_frame_is_not_taken_out() -> None:
    dec = FrameDecoder()
    small = encode({"t": "end"})
    assert dec.feed(small + small[:3]) == [{"t": "end"}] and dec.take_partial(1) is None  # (no whole header)
    assert dec.feed(small[3:]) == [{"t": "end"}] and dec.take_partial(1) is None
    big = wire.data_frame_head(1 << 18) + bytes(1 << 18)
    dec.feed(big[:100])
    assert dec.take_partial((1 << 18) + 100) is None and dec.buffered == 100


def test_decoder_is_poisoned_after_an_error() -> None:
    d = FrameDecoder()
    with pytest.raises(ProtocolError):
        d.feed(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        d.feed(encode({"type": "bye"}))
    with pytest.raises(ProtocolError):
        d.check_eof()


def test_text_instead_of_frames_gets_a_helpful_message() -> None:
    with pytest.raises(ProtocolError, match="text instead of a dirsync frame") as ei:
        FrameDecoder().feed(b"Welcome to Ubuntu 24.04 LTS\n")
    assert ei.value.hint


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # reserved byte
        b"\x92\x01",  # truncated array
        b"\x01\x02",  # trailing data
        b"\x01",  # top level not a container
        b"\xa3abc",  # top level str
        b"\x81\xa1k\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x81\x01\x02",  # int map key
        b"\x81\xc4\x01a\x01" + b"",  # bytes map key is allowed by msgpack, but...
        b"\x91\xd4\x05\x00",  # ext type
        b"\x91" * 5000 + b"\xc0",  # nesting bomb
    ],
)
def test_garbage_bodies_rejected(body: bytes) -> None:
    if body.startswith(b"\x81\xc4"):
        # ...v_map refuses non-str keys
        (m,) = FrameDecoder().feed(_frame(body))
        with pytest.raises(ProtocolError):
            v_map(m)
        return
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(_frame(body))


def test_zero_length_frame_rejected() -> None:
    with pytest.raises(ProtocolError, match="empty frame"):
        FrameDecoder().feed(b"\0\0\0\0")


def test_encode_refuses_non_containers_and_unpackable() -> None:
    with pytest.raises(ProtocolError):
        encode("hello")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        encode({"x": object()})


# --- handshake ---------------------------------------------------------------


def test_hello_round_trip_and_check() -> None:
    (m,) = FrameDecoder().feed(encode(hello("1.2.3", features=["x"])))
    assert check_hello(m)["version"] == "1.2.3"
    assert m["proto"] == PROTO_VERSION


def test_hello_mismatch_names_both_versions() -> None:
    peer = {"type": "hello", "proto": PROTO_VERSION + 1, "version": "9.9"}
    with pytest.raises(ProtocolError) as ei:
        check_hello(peer)
    msg = str(ei.value)
    assert str(PROTO_VERSION) in msg and str(PROTO_VERSION + 1) in msg and "9.9" in msg


@pytest.mark.parametrize(
    "bad",
    [None, [], {"type": "bye"}, {"type": "hello"}, {"type": "hello", "proto": "1"}, {"type": "hello", "proto": -1}],
)
def test_check_hello_rejects_non_hello(bad: object) -> None:
    with pytest.raises(ProtocolError):
        check_hello(bad)


# --- validators --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [(b"a", "a"), (b"a/b/c", "a/b/c"), (b"...", "..."), (b".hidden/x", ".hidden/x"), (b"a b/\xc3\xa9", "a b/é")],
)
def test_v_relpath_accepts(path: bytes, expected: str) -> None:
    assert v_relpath(path) == expected


def test_v_relpath_keeps_undecodable_bytes() -> None:
    raw = b"dir/\xff\xfe name"
    s = v_relpath(raw)
    assert relpath_bytes(s) == raw


@pytest.mark.parametrize(
    "path",
    [
        b"",
        b".",
        b"..",
        b"../x",
        b"a/../b",
        b"a/..",
        b"./a",
        b"a/./b",
        b"/abs",
        b"/",
        b"a//b",
        b"a/",
        b"a\0b",
        b"x" * 4097,
        "str/path",
        None,
        ["a"],
    ],
)
def test_v_relpath_rejects(path: object) -> None:
    with pytest.raises(ProtocolError):
        v_relpath(path)


def test_v_relpath_length_limit_is_inclusive() -> None:
    assert v_relpath(b"x" * 4096)


@pytest.mark.parametrize(
    ("x", "lo", "hi"),
    [(-1, 0, 10), (11, 0, 10), (2**64, 0, 2**64 - 1), (True, 0, 10), (1.0, 0, 10), ("1", 0, 10), (None, 0, 10)],
)
def test_v_int_rejects(x: object, lo: int, hi: int) -> None:
    with pytest.raises(ProtocolError):
        v_int(x, lo, hi)


def test_v_int_default_range_refuses_negative_offsets() -> None:
    assert v_int(2**64 - 1) == 2**64 - 1
    with pytest.raises(ProtocolError):
        v_int(-5)


def test_v_int_accepts() -> None:
    assert v_int(0, 0, 0) == 0
    assert v_int(-3, -5, 5) == -3


def test_v_bytes_str_list_map_bool() -> None:
    assert v_bytes(b"ab", 2) == b"ab"
    for bad in (b"abc", "ab", bytearray(b"a"), None):
        with pytest.raises(ProtocolError):
            v_bytes(bad, 2)
    assert v_str("ab", 2) == "ab"
    for bad in ("abc", b"ab", None):
        with pytest.raises(ProtocolError):
            v_str(bad, 2)
    assert v_list([1, 2], 2) == [1, 2]
    for bad in ([1, 2, 3], (1,), {}, None):
        with pytest.raises(ProtocolError):
            v_list(bad, 2)
    assert v_map({"a": 1}) == {"a": 1}
    for bad in ([], {b"a": 1}, {1: 2}, {str(i): i for i in range(65)}):
        with pytest.raises(ProtocolError):
            v_map(bad)
    assert v_bool(False) is False
    with pytest.raises(ProtocolError):
        v_bool(0)


def test_v_field_and_v_type() -> None:
    m = {"type": "result", "id": 1}
    assert v_field(m, "id") == 1
    with pytest.raises(ProtocolError, match="lacks field 'code'"):
        v_field(m, "code")
    assert v_type(m, "result", "log") == "result"
    with pytest.raises(ProtocolError):
        v_type(m, "hello")
    with pytest.raises(ProtocolError):
        v_type({"id": 1}, "result")


# --- error codes -------------------------------------------------------------


def test_error_codes_are_closed() -> None:
    assert ErrorCode.codes() == {
        "NOT_FOUND",
        "CONFLICT",
        "PERMISSION",
        "NO_SPACE",
        "INVALID_PATH",
        "IO",
        "CHANGED",
        "INTERNAL",
    }
    for c in ErrorCode.codes():
        (m,) = FrameDecoder().feed(encode({"code": c}))
        assert v_code(m["code"]) == c
    for bad in ("EVIL", 3, None, "not_found"):
        with pytest.raises(ProtocolError):
            v_code(bad)


def test_item_error_codes_are_wire_codes() -> None:
    """The core's ItemError.code strings must all be valid wire codes."""
    errors = pytest.importorskip("dirsync.errors")
    codes = {getattr(cls, "code", None) for cls in vars(errors).values() if isinstance(cls, type)}
    for code in codes - {None}:
        assert code in ErrorCode.codes()


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.ENOENT, ErrorCode.NOT_FOUND),
        (errno.ENOTDIR, ErrorCode.NOT_FOUND),
        (errno.EACCES, ErrorCode.PERMISSION),
        (errno.EPERM, ErrorCode.PERMISSION),
        (errno.EROFS, ErrorCode.PERMISSION),
        (errno.ENOSPC, ErrorCode.NO_SPACE),
        (errno.EDQUOT, ErrorCode.NO_SPACE),
        (errno.EEXIST, ErrorCode.CONFLICT),
        (errno.ENOTEMPTY, ErrorCode.CONFLICT),
        (errno.ELOOP, ErrorCode.INVALID_PATH),
        (errno.ENAMETOOLONG, ErrorCode.INVALID_PATH),
        (errno.EIO, ErrorCode.IO),
        (12345, ErrorCode.IO),
        (None, ErrorCode.IO),
    ],
)
def test_errno_to_code(err: int | None, code: ErrorCode) -> None:
    assert errno_to_code(err) is code
