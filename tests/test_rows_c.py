"""The C row decoder (dirsync/_rows.c) against the Python one: the same entries (every slot,
same types), order, row offsets and generation for the same cache bytes; None (so the Python
decoder runs and raises) on rows it does not take."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirsync import manifest
from dirsync.manifest import (DirEntry, FileEntry, LinkEntry, Manifest, ManifestFormatError, _decode_body,
                              load, to_bytes)

try:
    from helpers import spy_calls
    from strategies import any_manifests
except ImportError:
    from tests.helpers import spy_calls
    from tests.strategies import any_manifests

pytestmark = pytest.mark.skipif(manifest._rows is None, reason="dirsync._rows was not built (no C compiler?)")

CHUNKER = "test-chunker"


@contextlib.contextmanager
def rows_in(use_c: bool):
    """Cache rows decoded by the C decoder (True) or the Python one (False) meanwhile."""
    old = manifest.ROWS_C
    manifest.ROWS_C = use_c
    try:
        yield
    finally:
        manifest.ROWS_C = old


def decode(data: bytes, use_c: bool) -> Manifest:
    with rows_in(use_c):
        return load(data, CHUNKER, own=True).manifest


def decode_body(body: bytes, use_c: bool) -> Manifest:
    with rows_in(use_c):
        return _decode_body(body, CHUNKER, own=True)


def slots(e) -> tuple:
    return (e.__class__,) + tuple((getattr(e, f).__class__, getattr(e, f)) for f in e.__slots__)


def same(a: Manifest, b: Manifest) -> None:
    assert list(a.entries) == list(b.entries)
    assert [slots(e) for e in a.entries.values()] == [slots(e) for e in b.entries.values()]
    assert a.generation == b.generation
    assert (a.rows is None) == (b.rows is None)
    if a.rows is not None:
        assert list(a.rows.offs) == list(b.rows.offs) and a.rows.paths == b.rows.paths


@settings(max_examples=300, deadline=None)
@given(m=any_manifests(), packed=st.booleans(), generation=st.sampled_from(["", "g1", "ünï"]))
def test_c_decoder_equals_python_decoder(m, packed, generation):
    m.generation = generation
    data = to_bytes(m, CHUNKER, b"\1" * 24, packed=packed)
    with pytest.MonkeyPatch.context() as mp:  # the C decoder must take every row our writer writes
        took = spy_calls(mp, manifest._rows, "decode_own_rows", lambda got, *a: got is not None)
        c = decode(data, True)
    py = decode(data, False)
    assert took == [True]
    same(c, py)
    assert c.entries == m.entries


def test_the_c_decoder_is_what_a_load_uses(monkeypatch):
    m = Manifest({"": DirEntry("", 0o755, 1), "a": FileEntry("a", 3, 0o644, 5, b"d" * 16, 0, (3,), b"d" * 16, 7, 8,
                                                                 True),
                  "l": LinkEntry("l", "a", 9)})
    calls = spy_calls(monkeypatch, manifest._rows, "decode_own_rows", lambda _, body, pos, nrows, *a: nrows)
    got = load(to_bytes(m, CHUNKER, packed=True), CHUNKER, own=True).manifest
    assert calls == [3] and got.entries == m.entries and got.entries["a"].trusted is True


def _body(rows, generation="g") -> bytes:
    return msgpack.packb((CHUNKER, rows, generation), use_bin_type=True)


GOOD_FILE = (0, b"f", 3, 0o644, 5, b"d" * 16, 0, (3,), b"d" * 16, 7, 8, True)


@pytest.mark.parametrize("row", [
    (0, b"", *GOOD_FILE[2:]),  # the root as a file
    (0, b"a//b", *GOOD_FILE[2:]),
    (0, b"a/./b", *GOOD_FILE[2:]),
    (0, b"../b", *GOOD_FILE[2:]),
    (0, b"a/", *GOOD_FILE[2:]),
    (0, b"a\0b", *GOOD_FILE[2:]),
    (0, b"x" * 4097, *GOOD_FILE[2:]),
    GOOD_FILE[:11],  # a field short
    (3, b"f", 1, 2),  # an unknown kind
    (1, "f", 0o755, 1),  # a path as str
    (0, b"f", 3, 0o644, 5, b"d" * 16, 0, b"\0\3\0", b"d" * 16, 7, 8, True),  # packed sizes of the wrong length
])
def test_rows_the_python_decoder_rejects_are_rejected(row):
    body = _body([(1, b"", 0o755, 1), row])
    for use_c in (True, False):
        with pytest.raises(ManifestFormatError):
            decode_body(body, use_c)


@pytest.mark.parametrize("row", [
    (0, b"f", 3.0, 0o644, 5, b"d" * 16, 0, (3,), b"d" * 16, 7, 8, True),  # a float size
    (0, b"f", 3, 0o644, 5, b"d" * 16, 0, (3,), b"d" * 16, 7, 8, 1),  # trusted as an int
    (0, b"f", 3, 0o644, 5, "d" * 16, 0, (3,), b"d" * 16, 7, 8, True),  # a digest as str
])
def test_rows_our_writer_never_writes_are_left_to_the_python_decoder(row):
    body = _body([(1, b"", 0o755, 1), row])
    assert manifest._rows.decode_own_rows(body, 2 + len(msgpack.packb(CHUNKER)), 2, *manifest._row_kinds()) is None
    same(decode_body(body, True), decode_body(body, False))


def test_extreme_ints_and_repeated_paths():
    rows = [(1, b"", 0o755, -(2**63)), (0, b"f", 2**64 - 1, 0o7777, 2**63 - 1, b"d" * 16, 65536, (1, 2**40),
                                       b"d" * 32, 2**64 - 1, -1, False),
            (2, b"\xff\xfe", b"t\xff", 0), (1, b"f", 0o700, 3)]  # "f" again: the last row wins
    body = _body(rows)
    m = decode_body(body, True)
    same(m, decode_body(body, False))
    assert m.rows is None  # a repeated path: no row source
    assert m.entries["f"] == DirEntry("f", 0o700, 3) and m.entries[""].mtime_ns == -(2**63)
    link = m.entries[b"\xff\xfe".decode("utf-8", "surrogateescape")]
    assert link.target == b"t\xff".decode("utf-8", "surrogateescape")


def test_a_truncated_body_is_rejected():
    m = Manifest({"": DirEntry("", 0o755, 1), "a": FileEntry("a", 3, 0o644, 5, b"d" * 16, 0, (3,), b"d" * 16)})
    body = msgpack.packb((CHUNKER, manifest.encode_rows(m.entries.values(), packed=True), "g"), use_bin_type=True)
    for cut in range(1, len(body)):
        for use_c in (True, False):
            with pytest.raises(ManifestFormatError):
                decode_body(body[:-cut], use_c)


@settings(max_examples=400, deadline=None)
@given(m=any_manifests(), packed=st.booleans(), data=st.data())
def test_damaged_rows_decode_as_in_python_or_not_at_all(m, packed, data):
    """Bytes changed anywhere in the rows: the C decoder gives up (None) or gives what the
    Python decoder gives from the same bytes; it never reads outside the body."""
    body = msgpack.packb((CHUNKER, manifest.encode_rows(m.entries.values(), packed=packed), ""), use_bin_type=True)
    pos = 2 + len(msgpack.packb(CHUNKER))
    b = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(pos, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, 8))
    damaged = bytes(b[:len(b) - cut])
    header = msgpack.Unpacker(raw=False, use_list=False)
    header.feed(damaged)
    try:
        header.read_array_header(), header.unpack()
        nrows = header.read_array_header()
    except Exception:
        return  # (the header itself was hit)
    got = manifest._rows.decode_own_rows(damaged, header.tell(), nrows, *manifest._row_kinds())
    if got is None:
        return
    up = msgpack.Unpacker(raw=False, use_list=False)  # the same rows through msgpack and the Python decoder
    up.feed(damaged)
    up.read_array_header(), up.unpack(), up.read_array_header()
    expect = manifest._decode_own_rows([up.unpack() for _ in range(nrows)])
    entries, offs, end = got
    assert end == up.tell()
    assert list(entries) == list(expect)
    assert [slots(e) for e in entries.values()] == [slots(e) for e in expect.values()]


# -- the encoder -------------------------------------------------------------------------------

_ints = st.integers(-2**63, 2**64 - 1) | st.sampled_from([0, 1, -1, 31, -32, -33, 127, 128, 255, 256, 65535, 65536,
                                                          2**32 - 1, 2**32, 2**63 - 1, 2**63, -2**31 - 1])
_paths = st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s) | st.sampled_from(["caf\udce9", "x" * 300])
_sizes = (st.lists(st.integers(1, 70_000), max_size=40).map(tuple) | st.just(()) | st.just((2**32,))
          | st.binary(max_size=64))  # (packed sizes already, as a decoded row holds them)
_entries = st.one_of(
    st.builds(FileEntry, _paths, _ints, st.integers(0, 0o7777), _ints, st.binary(min_size=16, max_size=16),
              st.sampled_from([0, 512, 8192]), _sizes, st.binary(max_size=300), _ints, _ints,
              st.booleans() | st.sampled_from([0, 1])),
    st.builds(DirEntry, _paths, st.integers(0, 0o7777), _ints),
    st.builds(LinkEntry, _paths, _paths, _ints))


def encoded(entries: dict, use_c: bool) -> tuple:
    with rows_in(use_c):
        try:
            body, offs, paths = manifest._fresh_body(entries, CHUNKER, "gen", packed=True)
        except (OverflowError, ValueError) as e:  # (msgpack's, for an int it cannot pack)
            return type(e)
    return b"".join(body), list(offs), paths


@settings(max_examples=400, deadline=None)
@given(entries=st.lists(_entries, max_size=10))
def test_c_encoder_equals_python_encoder(entries):
    """The C encoder's rows are byte for byte msgpack's of encode_rows(packed=True), with the
    same row offsets; an int msgpack cannot pack sends it back to Python, which raises."""
    d = {f"{i}/{e.path}": e for i, e in enumerate(entries)}
    assert encoded(d, True) == encoded(d, False)


def test_the_c_encoder_gives_back_what_it_does_not_encode():
    class Odd(DirEntry):
        pass

    kinds = manifest._row_kinds()
    f = FileEntry("f", 1, 0o644, 1, b"d" * 16, 0, [1], b"d" * 16, 1, 1, True)  # (a list of sizes: not ours)
    for e in (Odd("b", 0o755, 2), f, DirEntry("d", 0o755, -2**63 - 1), DirEntry("d", 0o755, 2**64)):
        assert manifest._rows.encode_own_rows([DirEntry("a", 0o755, 1), e], *kinds, 0) is None
    body, offs = manifest._rows.encode_own_rows([], *kinds, 7)
    assert body == b"" and list(memoryview(offs).cast("Q")) == [7]


def test_the_c_encoder_is_what_a_fresh_cache_uses(monkeypatch):
    m = Manifest({"": DirEntry("", 0o755, 1), "a": FileEntry("a", 3, 0o644, 5, b"d" * 16, 0, (3,), b"d" * 16, 7, 8,
                                                                 True)}, generation="g")
    took = spy_calls(monkeypatch, manifest._rows, "encode_own_rows", lambda got, *a: got is not None)
    data = to_bytes(m, CHUNKER, b"", packed=True)
    assert took == [True] and decode(data, False).entries == m.entries
