"""Manifests: what a tree contains, as plain data, and their on-disk form. No filesystem access.

Paths are POSIX-style relpaths as `str` (undecodable bytes kept with surrogateescape);
the root directory is the entry with path "". Digests are xxh3-128 (16 bytes).
"""

from __future__ import annotations

import operator
import os
import struct
import sys
from array import array
from functools import reduce
from itertools import accumulate, compress, repeat

import msgpack
import xxhash

from dirsync.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import ClassVar, Iterator

# 4: a row index between header and body (see RowIndex; cache files only); 3: chunk sizes
# packed (see pack_sizes; cache files only); 2: a header before the rows; 1: rows only. All
# four are read.
FORMAT_VERSION = 4
_UNPACKED_VERSION = 2  # what to_bytes(packed=False) writes: readable by dirsync before format 3
DIGEST_SIZE = 16
MAGIC = b"DSYNCMF"
_FSENC = sys.getfilesystemencoding()  # what os.fsencode/fsdecode use (with surrogateescape)


# Entries are treated as immutable (use .replace()); nothing enforces it: a frozen class's
# __init__ costs 3.6 us against 0.8 us here, and a 100,000-file cache builds one entry per
# file on every run.
class FileEntry(Record):
    _fields = (
        "path", "size", "mode", "mtime_ns", "digest", "avg", "sizes", "digests", "ino", "ctime_ns",
        "trusted",
    )
    __slots__ = ("path", "size", "mode", "mtime_ns", "digest", "avg", "held_sizes", "digests", "ino", "ctime_ns",
                 "trusted")
    _compare = ("path", "size", "mode", "mtime_ns", "digest", "avg", "sizes", "digests")
    kind: ClassVar[str] = "f"

    def __init__(
        self,
        path: str,
        size: int,
        mode: int,  # permission bits (S_IMODE)
        mtime_ns: int,
        digest: bytes,  # xxh3-128 of the whole content
        avg: int,  # chunk class (FastCDC average size); 0: the file is one chunk
        sizes: tuple[int, ...] | bytes,  # chunk sizes, in order, tiling [0, size); or pack_sizes() of them
        digests: bytes,  # DIGEST_SIZE bytes per chunk, in order
        # Cache-only facts: not part of what the file *is*.
        ino: int = 0,
        ctime_ns: int = 0,
        trusted: bool = False,  # digest may be reused when stat matches
    ) -> None:
        self.path = path
        self.size = size
        self.mode = mode
        self.mtime_ns = mtime_ns
        self.digest = digest
        self.avg = avg
        # As given: a cache row's packed sizes are unpacked on first use of .sizes (most entries
        # of a run never need them). Pass held_sizes, not sizes, when copying an entry.
        self.held_sizes = sizes
        self.digests = digests
        self.ino = ino
        self.ctime_ns = ctime_ns
        self.trusted = trusted

    @property
    def sizes(self) -> tuple[int, ...]:
        s = self.held_sizes
        if s.__class__ is bytes:
            s = self.held_sizes = unpack_sizes(s, len(self.digests) // DIGEST_SIZE)  # type: ignore[arg-type]
        return s  # type: ignore[return-value]

    @property
    def nchunks(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def chunks(self) -> Iterator[tuple[int, int, bytes]]:
        """Yield (offset, size, digest) for each chunk."""
        off = 0
        d = self.digests
        for i, n in enumerate(self.sizes):
            yield off, n, d[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            off += n

    def same_content(self, other: "Entry") -> bool:
        return isinstance(other, FileEntry) and other.size == self.size and other.digest == self.digest


class DirEntry(Record):
    _fields = ("path", "mode", "mtime_ns")
    __slots__ = _fields
    kind: ClassVar[str] = "d"

    def __init__(self, path: str, mode: int, mtime_ns: int) -> None:
        self.path = path
        self.mode = mode
        self.mtime_ns = mtime_ns


class LinkEntry(Record):
    _fields = ("path", "target", "mtime_ns")
    __slots__ = _fields
    kind: ClassVar[str] = "l"

    def __init__(
        self,
        path: str,
        target: str,  # stored as given, never followed
        mtime_ns: int,
    ) -> None:
        self.path = path
        self.target = target
        self.mtime_ns = mtime_ns


Entry = FileEntry | DirEntry | LinkEntry

_STRUCTS: dict[tuple[int, str], struct.Struct] = {}


def _sizes_struct(n: int, code: str) -> struct.Struct:
    s = _STRUCTS.get((n, code))
    if s is None:
        s = struct.Struct(f"<{n}{code}")
        if n <= 256:  # the usual chunk counts; a big file's is built each time (noise beside its bytes)
            _STRUCTS[(n, code)] = s
    return s


def pack_sizes(sizes: tuple[int, ...]) -> bytes | None:
    """Chunk sizes as little-endian uint16s (uint32s if one is 64 KiB or more; the chunker's
    largest chunk is 32 KiB); None if one is 4 GiB or more (such a row keeps its ints). A cache
    row holds them so: msgpack builds a tuple of ints 3x slower than it copies these bytes (the
    mixed tree's cache holds 410,000 chunk sizes)."""
    for code in ("H", "I"):
        try:
            return _sizes_struct(len(sizes), code).pack(*sizes)
        except struct.error:
            pass
    return None


def unpack_sizes(raw: bytes, n: int) -> tuple[int, ...]:
    """Inverse of pack_sizes for `n` chunks; ValueError when `raw` cannot hold n sizes."""
    if len(raw) == 2 * n:
        return _sizes_struct(n, "H").unpack(raw)
    if len(raw) == 4 * n and n:
        return _sizes_struct(n, "I").unpack(raw)
    raise ValueError(f"{len(raw)} bytes of packed sizes for {n} chunks")


def entry_key(e: Entry) -> tuple:
    """What must be equal for two entries to count as the same (content and metadata)."""
    if isinstance(e, FileEntry):
        return ("f", e.size, e.digest, e.mode, e.mtime_ns)
    if isinstance(e, DirEntry):
        return ("d", e.mode, e.mtime_ns)
    return ("l", e.target, e.mtime_ns)


class Manifest(Record):
    """A tree: relpath -> entry. Holds the root DirEntry at "" when the root was read."""

    _fields = ("entries", "generation", "rows")
    __slots__ = _fields
    _compare = ("entries",)

    def __init__(
        self,
        entries: dict[str, Entry] | None = None,
        generation: str = "",  # id of a saved replica state (delta scans)
        # The encoded rows of the cache file these entries were decoded from (or whose entry
        # objects they reuse): saving writes an unchanged entry's row bytes again (see to_bytes).
        rows: "RowSource | None" = None,
    ) -> None:
        self.entries = {} if entries is None else entries
        self.generation = generation
        self.rows = rows

    def keys(self) -> dict[str, tuple]:
        return {p: entry_key(e) for p, e in self.entries.items()}

    def files(self) -> Iterator[FileEntry]:
        for e in self.entries.values():
            if isinstance(e, FileEntry):
                yield e


def parent_of(path: str) -> str:
    i = path.rfind("/")
    return path[:i] if i >= 0 else ""


def is_under(path: str, top: str) -> bool:
    """True when `path` is `top` or inside it ("" is the root, which holds everything)."""
    return top == "" or path == top or path.startswith(top + "/")


def covered(path: str, tops: "set[str] | frozenset[str]") -> bool:
    """True when `path` or one of its ancestors ("" included) is in `tops` (set lookups only)."""
    while True:
        if path in tops:
            return True
        if not path:
            return False
        path = parent_of(path)


def check_relpath(path: str) -> str:
    """Return `path` if it is a safe replica-relative path, else raise ValueError.

    Safe: non-empty, relative, '/'-separated, no '', '.' or '..' component, no NUL.
    """
    if path.__class__ is str and path:  # the usual case in one pass of fast tests (see _bad_path)
        w = "/" + path + "/"
        if not ("//" in w or "/./" in w or "/../" in w or "\x00" in path or len(path) > 4096):
            return path
    if not isinstance(path, str) or not path:
        raise ValueError("empty path")
    if "\x00" in path:
        raise ValueError("NUL in path")
    if path.startswith("/"):
        raise ValueError("absolute path")
    if len(path) > 4096:
        raise ValueError("path too long")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"bad path component {part!r}")
    return path


# -- Merkle digests (used by verify) ---------------------------------------------


def tree_digests(m: Manifest) -> dict[str, bytes]:
    """Digest of every directory over its whole subtree (content and metadata)."""
    children: dict[str, list[str]] = {}
    for p in m.entries:
        if p:
            children.setdefault(parent_of(p), []).append(p)
    out: dict[str, bytes] = {}

    def dir_digest(d: str) -> bytes:
        h = xxhash.xxh3_128()
        e = m.entries.get(d)
        if isinstance(e, DirEntry):
            h.update(b"D%d %d\0" % (e.mode, e.mtime_ns))
        for c in sorted(children.get(d, ())):
            ce = m.entries[c]
            h.update(os.fsencode(c) + b"\0")
            if isinstance(ce, DirEntry):
                h.update(out[c] if c in out else dir_digest(c))
            elif isinstance(ce, FileEntry):
                h.update(b"F%d %d %d\0" % (ce.size, ce.mode, ce.mtime_ns) + ce.digest)
            else:
                h.update(b"L%d\0" % ce.mtime_ns + os.fsencode(ce.target))
        out[d] = h.digest()
        return out[d]

    # Iterative post-order to survive deep trees without recursion limits.
    order: list[str] = []
    stack = [""]
    while stack:
        d = stack.pop()
        order.append(d)
        stack.extend(c for c in children.get(d, ()) if isinstance(m.entries[c], DirEntry))
    for d in reversed(order):
        if d not in out:
            dir_digest(d)
    return out


# -- serialisation ------------------------------------------------------------------


class ManifestFormatError(ValueError):
    """The bytes are not a manifest this version can read (corrupt, or from another version)."""


def encode_rows(entries, *, cache_fields: bool = True, packed: bool = False) -> list[tuple]:
    """Entries as plain msgpack-able rows (the manifest body and the wire use the same rows;
    the wire leaves out the cache-only fields). `packed`: chunk sizes as pack_sizes() bytes
    (cache files of format 3), else as a list of ints."""
    rows = []
    fs = _FSENC
    for e in entries:
        c = e.__class__
        if c is FileEntry:
            if cache_fields:
                sz = e.held_sizes
                if packed:
                    if sz.__class__ is not bytes:
                        p = pack_sizes(sz)  # type: ignore[arg-type]
                        if p is not None:
                            sz = p
                elif sz.__class__ is bytes:
                    sz = e.sizes
                rows.append((0, e.path.encode(fs, "surrogateescape"), e.size, e.mode, e.mtime_ns, e.digest, e.avg,
                             sz, e.digests, e.ino, e.ctime_ns, e.trusted))
            else:
                rows.append((0, e.path.encode(fs, "surrogateescape"), e.size, e.mode, e.mtime_ns, e.digest, e.avg,
                             e.sizes, e.digests))
        elif c is DirEntry:
            rows.append((1, e.path.encode(fs, "surrogateescape"), e.mode, e.mtime_ns))
        else:
            rows.append((2, e.path.encode(fs, "surrogateescape"), e.target.encode(fs, "surrogateescape"),
                         e.mtime_ns))
    return rows


class RowSource:
    """The body of a cache file and the entries decoded from it, in row order. A row is a pure
    function of its entry object, so an entry that is still the same object can be saved again
    by copying its bytes (see _body_reusing). Paths and objects are kept as tuples of their own:
    whatever later happens to the decoded dict, row i stays paired with what it encodes."""

    __slots__ = ("chunker", "packed", "body", "paths", "objs", "offs")

    def __init__(self, chunker: str, packed: bool, body, entries: dict[str, Entry], offs: array) -> None:
        self.chunker, self.packed, self.body = chunker, packed, body
        self.paths, self.objs = tuple(entries), tuple(entries.values())
        # Where each row starts, and the end of the last (noted while decoding, two C calls a
        # row): row i is body[offs[i]:offs[i + 1]].
        assert len(offs) == len(self.paths) + 1
        self.offs = offs


def _body_reusing(entries: dict[str, Entry], src: RowSource, chunker: str, generation: str,
                  packed: bool) -> tuple[list, array, list[str]]:
    """The body msgpack.packb((chunker, rows, generation)) would give, up to row order, as a
    list of pieces to join, with its row index (see _splice): rows of entries that are the very
    objects `src` decoded are views of its body, the others encoded (new paths at the end,
    sorted). Costs a few C-level passes over the old rows, not an encode of each."""
    paths = src.paths
    news = list(map(entries.get, paths))
    # Rows whose entry is no longer the same object, found without a Python-level loop.
    changed = ((i, news[i]) for i in compress(range(len(news)), map(operator.is_not, news, src.objs)))
    added = [(p, entries[p]) for p in sorted(entries.keys() - set(paths))]
    return _splice(src.body, src.offs, paths, changed, added, len(entries), chunker, generation, packed)


def _splice(body, offs: array, paths, changed, added: list, count: int, chunker: str, generation: str,
            packed: bool) -> tuple[list, array, list[str]]:
    """A new body from an old one (`body`, its row offsets `offs` and `paths`): row i for each
    (i, entry or None: dropped) of `changed` (in row order) encoded again, the rows between
    copied as views, the (path, entry) pairs of `added` at the end; `count` rows in all.
    Returns (pieces, row offsets, paths in row order), the index of the new body."""
    pk = msgpack.Packer(use_bin_type=True)
    parts = [pk.pack_array_header(3), pk.pack(chunker), pk.pack_array_header(count)]
    pos = sum(map(len, parts))
    noffs, npaths = array("Q"), []
    done = 0  # row up to which rows are handled

    def keep(a: int, b: int) -> None:  # rows a..b-1 as they are
        nonlocal pos
        if a < b:
            start, end = offs[a], offs[b]
            parts.append(body[start:end])
            noffs.extend(map(operator.add, offs[a:b], repeat(pos - start)))
            npaths.extend(paths[a:b])
            pos += end - start

    def put(path: str, e: Entry) -> None:
        nonlocal pos
        row = pk.pack(encode_rows((e,), packed=packed)[0])
        parts.append(row)
        noffs.append(pos)
        npaths.append(path)
        pos += len(row)

    for i, e in changed:
        keep(done, i)
        if e is not None:
            put(paths[i], e)
        done = i + 1
    keep(done, len(paths))
    for p, e in added:
        put(p, e)
    noffs.append(pos)
    parts.append(pk.pack(generation))
    return parts, noffs, npaths


def _fresh_body(entries: dict[str, Entry], chunker: str, generation: str,
                packed: bool) -> tuple[list, array, list[str]]:
    """The body of `entries` encoded row by row, with its row index (see _splice)."""
    pk = msgpack.Packer(use_bin_type=True)
    head = [pk.pack_array_header(3), pk.pack(chunker), pk.pack_array_header(len(entries))]
    if packed and _rows is not None and ROWS_C:  # (100,000 rows: ~0.2 s in Python; a cache saved after a copy)
        got = _rows.encode_own_rows(list(entries.values()), *_row_kinds(), sum(map(len, head)))
        if got is not None:
            offs = array("Q")
            offs.frombytes(got[1])
            return [*head, got[0], pk.pack(generation)], offs, list(entries)
    rows = list(map(pk.pack, encode_rows(entries.values(), packed=packed)))
    offs = array("Q", accumulate(map(len, rows), initial=sum(map(len, head))))
    return [*head, *rows, pk.pack(generation)], offs, list(entries)


def to_bytes(m: Manifest, chunker: str, fingerprint: bytes = b"", packed: bool = False) -> bytes:
    """Versioned, checksummed encoding: MAGIC, version byte, xxh3-64 of the rest, then a small
    header (chunker, generation, fingerprint; readable without decoding any row) and the body.
    `packed`: format 3 (chunk sizes packed), for cache files, which only this install reads;
    else format 2, which a peer running an older dirsync reads too."""
    # One join of the pieces (a cache is megabytes: each concatenation would copy it again).
    return b"".join(to_pieces(m, chunker, fingerprint, packed))


def to_pieces(m: Manifest, chunker: str, fingerprint: bytes = b"", packed: bool = False) -> list:
    """to_bytes as the pieces it joins (bytes and views of the rows' source body), for a writer
    that hands them to the kernel without joining them: a cache is megabytes, and here every
    megabyte of memory a process touches first costs it about a millisecond."""
    header = msgpack.packb((chunker, m.generation, fingerprint, len(m.entries)), use_bin_type=True)
    head = [len(header).to_bytes(4, "little"), header]
    src = m.rows
    if m.entries.__class__ is Overlay:
        body, offs, paths = m.entries.body(chunker, m.generation, packed)
    elif src is not None and src.chunker == chunker and src.packed == packed:
        body, offs, paths = _body_reusing(m.entries, src, chunker, m.generation, packed)
    elif packed:
        body, offs, paths = _fresh_body(m.entries, chunker, m.generation, packed)
    else:
        body, offs, paths = [msgpack.packb((chunker, encode_rows(m.entries.values(), packed=packed), m.generation),
                                           use_bin_type=True)], None, None
    if packed:  # format 4: the row index before the body
        index = msgpack.packb((_encode_paths(paths), offs.tobytes()), use_bin_type=True)
        rest = [*head, len(index).to_bytes(4, "little"), index, *body]
        version = FORMAT_VERSION
    else:
        rest = [*head, *body]
        version = _UNPACKED_VERSION
    return [MAGIC, bytes([version]), _checksum(version, *rest), *rest]


def _encode_paths(paths: list[str]) -> bytes:
    return "\0".join(paths).encode(_FSENC, "surrogateescape")


def _checksum(version: int, *rest: bytes | memoryview) -> bytes:
    """xxh3-64 of what follows it (given in pieces); from format 3 on, of the version byte too
    (2 and 3 differ in how rows hold chunk sizes: a flipped bit there must not pass)."""
    h = xxhash.xxh3_64(bytes([version])) if version >= 3 else xxhash.xxh3_64()
    for piece in rest:
        h.update(piece)
    return h.digest()


class SavedManifest:
    """A manifest read from a cache file: the header is checked at once, the rows are decoded
    on first use of `manifest` (a no-op run whose tree matches the fingerprint never needs them).
    `manifest` raises ManifestFormatError for a body that does not decode."""

    __slots__ = ("chunker", "generation", "fingerprint", "count", "_body", "_m", "_own", "_packed", "_index",
                 "_rows")

    def __init__(self, chunker: str, generation: str, fingerprint: bytes, count: int, body: bytes | memoryview | None,
                 m: Manifest | None = None, own: bool = False, packed: bool = False,
                 index: memoryview | None = None) -> None:
        self.chunker, self.generation, self.fingerprint, self.count = chunker, generation, fingerprint, count
        self._body, self._m, self._own, self._packed = body, m, own, packed
        self._index = index  # format 4: the row index, read by rows()
        self._rows: RowIndex | None = None

    def rows(self) -> RowIndex | None:
        """The rows, found one at a time by path (format 4 of our own files, not yet decoded
        whole); None when the file has no usable index (the whole manifest then decodes)."""
        if self._rows is None and self._index is not None and self._m is None and self._own \
                and self._body is not None:
            self._rows = RowIndex.read(self._index, self._body, self.count, self.chunker, self._packed)
            self._index = None
        return self._rows

    @property
    def manifest(self) -> Manifest:
        if self._m is None:
            self._m = _decode_body(self._body if self._body is not None else b"", self.chunker, self._own,
                                   self._packed)
            self._body = self._index = self._rows = None
        return self._m

    @property
    def decoded(self) -> bool:
        return self._m is not None


def load(data: bytes, chunker: str, *, own: bool = False) -> SavedManifest:
    """Check a saved manifest's framing, checksum and chunker; rows stay undecoded. Raises
    ManifestFormatError when the bytes cannot be this chunker's manifest.
    `own`: a file this process's user wrote itself (a cache under its state dir or replica
    root), not one a peer sent: its rows get the cheap checks only (see decode_rows)."""
    n = len(MAGIC)
    if len(data) < n + 9 or data[:n] != MAGIC:
        raise ManifestFormatError("not a dirsync manifest")
    version = data[n]
    if version not in (1, 2, 3, 4):
        raise ManifestFormatError(f"manifest format version {version}, this dirsync reads {FORMAT_VERSION}")
    rest = memoryview(data)[n + 9 :]  # views, not copies: a big cache is megabytes
    if _checksum(version, rest) != data[n + 1 : n + 9]:
        raise ManifestFormatError("manifest checksum mismatch")
    if version == 1:  # no header: decode now (the fingerprint is unknown)
        m = _decode_body(rest, chunker, own)
        return SavedManifest(chunker, m.generation, b"", len(m.entries), None, m)
    try:
        hlen = int.from_bytes(rest[:4], "little")
        got, generation, fp, count = msgpack.unpackb(rest[4 : 4 + hlen], raw=False, use_list=False)
        if not isinstance(got, str) or not isinstance(generation, str) or not isinstance(fp, bytes) \
                or type(count) is not int:
            raise ManifestFormatError("manifest header is malformed")
    except ManifestFormatError:
        raise
    except Exception as e:
        raise ManifestFormatError(f"manifest header unreadable: {e}") from e
    if got != chunker:
        raise ManifestFormatError(f"manifest made with chunker {got!r}, this dirsync uses {chunker!r}")
    at, index = 4 + hlen, None
    if version == 4:
        ilen = int.from_bytes(rest[at:at + 4], "little")
        if len(rest) < at + 4 + ilen:
            raise ManifestFormatError("manifest index is truncated")
        index = rest[at + 4:at + 4 + ilen] if ilen else None
        at += 4 + ilen
    return SavedManifest(chunker, generation, fp, count, rest[at:], own=own, packed=version >= 3, index=index)


def from_bytes(data: bytes, chunker: str) -> Manifest:
    """Inverse of to_bytes. Raises ManifestFormatError on any inconsistency."""
    return load(data, chunker).manifest


_PIECE = 64 << 10  # below malloc's mmap threshold: each piece reuses a heap block


class _Pieces:
    """A file-like reader of `data` (bytes or a memoryview) for msgpack.Unpacker."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        p = self.pos
        self.pos = p + n
        return bytes(self.data[p:p + n])


def _decode_body(body: bytes, chunker: str, own: bool = False, packed: bool = False) -> Manifest:
    try:
        # Stream the rows: holding all of them decoded at once doubled the peak memory of a
        # 100,000-file run. And read the body in pieces rather than feed() it: feed copies it
        # whole into fresh memory first (the mixed tree's 8 MB cache: 2,000 more page faults,
        # ~8 ms of a first decode here), where pieces reuse the same few heap blocks.
        up = msgpack.Unpacker(_Pieces(body), raw=False, use_list=False, read_size=min(_PIECE, len(body) + 1),
                              max_buffer_size=len(body) + 1)
        nparts = up.read_array_header()
        if nparts not in (2, 3):
            raise ManifestFormatError(f"manifest body has {nparts} parts")
        got_chunker = up.unpack()
        if got_chunker != chunker:
            raise ManifestFormatError(f"manifest made with chunker {got_chunker!r}, this dirsync uses {chunker!r}")
        nrows = up.read_array_header()
        offs = array("Q")  # where each row starts (own caches: for saving the rows again, RowSource)
        got = _rows.decode_own_rows(body, up.tell(), nrows, *_row_kinds()) \
            if own and ROWS_C and _rows is not None else None
        start = 0  # where `up` started in the body
        if got is not None:  # the rows decoded in C (None: rows it does not take; decoded below, as ever)
            entries, packed_offs, start = got
            offs.frombytes(packed_offs)
            up = msgpack.Unpacker(raw=False, use_list=False)
            up.feed(body[start:])  # (what follows the rows: the generation)
        else:
            def own_rows() -> Iterator:
                mark, tell, unpack = offs.append, up.tell, up.unpack
                for _ in range(nrows):
                    mark(tell())
                    yield unpack()
                mark(tell())

            entries = _decode_own_rows(own_rows()) if own else decode_rows(up.unpack() for _ in range(nrows))
        generation = up.unpack() if nparts == 3 else ""
        if start + up.tell() != len(body):
            raise ManifestFormatError("trailing bytes after the manifest body")
        m = Manifest(entries=entries, generation=str(generation))
        if own and len(entries) == nrows:  # (a repeated path would break row i <-> entry i)
            m.rows = RowSource(chunker, packed, body, entries, offs)
        return m
    except ManifestFormatError:
        raise
    except Exception as e:  # malformed body: any decoding failure means "rebuild"
        raise ManifestFormatError(f"manifest body unreadable: {e}") from e


try:  # the walk's loop and fingerprint sum in C (dirsync/_walk.c), when it was built (scan.py's too)
    from dirsync import _walk
except ImportError:
    _walk = None
if getattr(_walk, "API", None) != 2:  # (a build of an older _walk.c: not this code's)
    _walk = None
try:  # rows of our own caches decoded in C (dirsync/_rows.c), when it was built; else in Python
    from dirsync import _rows
except ImportError:
    _rows = None
if getattr(_rows, "API", None) != 2:  # (a build of an older _rows.c: not this code's)
    _rows = None
ROWS_C = True  # False: the Python decoder and encoder even when _rows is built (tests compare them)
FP_C = True  # False: fingerprint() sums in Python even when _walk is built (likewise)
_KINDS: tuple | None = None


def _row_kinds() -> tuple:
    """(class, its slots' member descriptors in __init__'s order) for FileEntry, DirEntry and
    LinkEntry: _rows builds entries without calling __init__, which assigns exactly these."""
    global _KINDS
    if _KINDS is None:
        _KINDS = tuple((c, tuple(c.__dict__[f] for f in c.__slots__)) for c in (FileEntry, DirEntry, LinkEntry))
    return _KINDS


class RowIndex:
    """The rows of a saved cache (format 4), each decoded on its own when its path is asked for:
    the index holds every row's path and where it starts in the body. A run that touches a few
    paths of a 10,000-file cache decodes those few rows, not all (the mixed tree's 10,700 rows:
    ~30 ms here)."""

    __slots__ = ("body", "offs", "paths", "chunker", "packed", "_where")

    def __init__(self, body, offs: array, paths: list[str], chunker: str, packed: bool) -> None:
        self.body, self.offs, self.paths, self.chunker, self.packed = body, offs, paths, chunker, packed
        self._where: dict[str, int] | None = None

    @classmethod
    def read(cls, index, body, count: int, chunker: str, packed: bool) -> RowIndex | None:
        """None when the index does not fit the body (then the whole body is decoded, which
        reports whatever is wrong with it)."""
        try:
            blob, raw = msgpack.unpackb(index, raw=True, use_list=False)
            offs = array("Q")
            offs.frombytes(raw)
            paths = blob.decode(_FSENC, "surrogateescape").split("\0") if count else []
        except Exception:
            return None
        if len(paths) != count or len(offs) != count + 1 or (count and offs[-1] > len(body)):
            return None
        ix = cls(body, offs, paths, chunker, packed)
        return ix if len(ix.where) == count else None  # (a path twice)

    @property
    def where(self) -> dict[str, int]:
        """path -> row number."""
        if self._where is None:
            self._where = dict(zip(self.paths, range(len(self.paths))))
        return self._where

    def entry(self, i: int) -> Entry:
        """Row i, decoded and checked as a row of the whole body would be. Raises
        ManifestFormatError when it is not the row the index says (its path included)."""
        try:
            row = msgpack.unpackb(self.body[self.offs[i]:self.offs[i + 1]], raw=False, use_list=False)
            (e,) = _decode_own_rows((row,)).values()
        except Exception as exc:
            raise ManifestFormatError(f"manifest row {i} unreadable: {exc}") from exc
        if e.path != self.paths[i]:
            raise ManifestFormatError(f"manifest row {i} is not {self.paths[i]!r}")
        return e


_MISSING = object()


class Overlay:
    """The entries of a saved cache, read row by row (RowIndex), under this run's changes: what
    a replica holds now when its scan took the cache whole (Replica.current). Lookups and
    changes cost the paths they touch; iterating decodes every row. Saving writes the unchanged
    rows' bytes again (to_pieces), and fingerprint() updates the cache's fingerprint from the
    changed paths only."""

    __slots__ = ("_ix", "_orig", "_set", "_gone")

    def __init__(self, rows: RowIndex) -> None:
        self._ix = rows
        self._orig: dict[str, Entry] = {}  # rows decoded so far
        self._set: dict[str, Entry] = {}  # paths set since (new or changed)
        self._gone: set[str] = set()  # paths of the cache removed since (and not set again)

    def original(self, p: str) -> Entry | None:
        """The cache's entry at p (as scanned), whatever happened to it since."""
        e = self._orig.get(p)
        if e is None:
            i = self._ix.where.get(p)
            if i is None:
                return None
            e = self._orig[p] = self._ix.entry(i)
        return e

    def get(self, p: str, default=None):
        e = self._set.get(p)
        if e is not None:
            return e
        if p in self._gone:
            return default
        e = self.original(p)
        return default if e is None else e

    def __getitem__(self, p: str) -> Entry:
        e = self.get(p, _MISSING)
        if e is _MISSING:
            raise KeyError(p)
        return e  # type: ignore[return-value]

    def __contains__(self, p: object) -> bool:
        return p in self._set or (p not in self._gone and p in self._ix.where)

    def __setitem__(self, p: str, e: Entry) -> None:
        self._set[p] = e
        self._gone.discard(p)

    def pop(self, p: str, default=_MISSING):
        e = self.get(p, _MISSING)
        if e is _MISSING:
            if default is _MISSING:
                raise KeyError(p)
            return default
        self._set.pop(p, None)
        if p in self._ix.where:
            self._gone.add(p)
        return e

    def __delitem__(self, p: str) -> None:
        self.pop(p)

    def __len__(self) -> int:
        where = self._ix.where
        return len(where) - len(self._gone) + sum(1 for p in self._set if p not in where)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[str]:
        where, st, gone = self._ix.where, self._set, self._gone
        for p in self._ix.paths:
            if p not in gone:
                yield p
        for p in st:
            if p not in where:
                yield p

    def keys(self) -> list[str]:
        return list(self)

    def values(self) -> list[Entry]:
        return [self[p] for p in self]

    def items(self) -> list[tuple[str, Entry]]:
        return [(p, self[p]) for p in self]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Overlay):
            other = dict(other.items())
        return isinstance(other, dict) and dict(self.items()) == other

    __hash__ = None  # type: ignore[assignment]

    def changed(self) -> bool:
        """Something was set or removed since the cache was read."""
        return bool(self._set or self._gone)

    def changes(self) -> tuple[list[Entry], list[str]]:
        """(entries set that the cache lacks or holds otherwise, paths of the cache now gone)."""
        out = []
        for p, e in self._set.items():
            if self.original(p) != e:
                out.append(e)
        return out, [p for p in self._ix.paths if p in self._gone] if self._gone else []

    def fingerprint(self, fp: bytes) -> bytes:
        """fingerprint(self), given `fp` = the cache's own (as fingerprint_update)."""
        where = self._ix.where
        if len(fp) != 24 or int.from_bytes(fp[16:], "little") != len(where):
            return fingerprint(dict(self.items()))
        acc = int.from_bytes(fp[:16], "little")
        for p in self._gone | self._set.keys():
            old = self.original(p)
            if old is not None:
                h = _fp_entry(old)
                if h is None:
                    return fingerprint(dict(self.items()))
                acc -= h
            n = self._set.get(p)
            if n is not None:
                h = _fp_entry(n)
                if h is None:
                    return b""
                acc += h
        return fp_final(acc, len(self))

    def body(self, chunker: str, generation: str, packed: bool) -> tuple[list, array, list[str]]:
        """The body of the cache these entries make, with its index (see _splice): the rows of
        untouched paths copied, the others encoded."""
        ix = self._ix
        if ix.chunker != chunker or ix.packed != packed:
            return _fresh_body(dict(self.items()), chunker, generation, packed)
        where, st = ix.where, self._set
        changed = sorted(((where[p], st.get(p)) for p in self._gone | st.keys() if p in where),
                         key=operator.itemgetter(0))
        added = [(p, st[p]) for p in sorted(p for p in st if p not in where)]
        return _splice(ix.body, ix.offs, ix.paths, changed, added, len(self), chunker, generation, packed)


# -- tree fingerprints ------------------------------------------------------------------
# A fingerprint sums one 128-bit hash per entry over what a scan sees without reading any file
# (path, type, mode, size, mtime, inode, ctime; a link's target). Order does not matter, so the
# scanner computes it while walking and a writer from the entries it holds. Two equal
# fingerprints mean equal stat facts; a cache is given one only when every file entry in it is
# trusted (racy-clean), so a walk matching it may take the whole cache as the tree, exactly as
# the per-file check would have.

_MASK128 = (1 << 128) - 1


FP_FILE = b"f%b\0%d %d %d %d %d"  # path, mode, size, mtime_ns, ino, ctime_ns (scan.py inlines fp_file)


def fp_file(rel: str, mode: int, size: int, mtime_ns: int, ino: int, ctime_ns: int) -> int:
    return xxhash.xxh3_128_intdigest(FP_FILE % (rel.encode(_FSENC, "surrogateescape"), mode, size, mtime_ns, ino,
                                                ctime_ns))


def fp_dir(rel: str, mode: int, mtime_ns: int) -> int:
    return xxhash.xxh3_128_intdigest(b"d%b\0%d %d" % (rel.encode(_FSENC, "surrogateescape"), mode, mtime_ns))


def fp_link(rel: str, target: str, mtime_ns: int) -> int:
    return xxhash.xxh3_128_intdigest(b"l%b\0%d\0%b" % (rel.encode(_FSENC, "surrogateescape"), mtime_ns,
                                                        target.encode(_FSENC, "surrogateescape")))


def fp_final(acc: int, count: int) -> bytes:
    # The sum itself (not a hash of it), so that fingerprint_update can start from it.
    return (acc & _MASK128).to_bytes(16, "little") + count.to_bytes(8, "little")


def _fp_entry(e: "Entry") -> int | None:
    c = e.__class__
    if c is FileEntry:
        if not e.trusted or not e.ino:
            return None
        return fp_file(e.path, e.mode, e.size, e.mtime_ns, e.ino, e.ctime_ns)
    if c is DirEntry:
        return fp_dir(e.path, e.mode, e.mtime_ns)
    return fp_link(e.path, e.target, e.mtime_ns)


def changed_entries(old: dict[str, "Entry"], new: dict[str, "Entry"]) -> list["Entry"]:
    """The entries of `new` that `old` lacks or holds otherwise. Entry objects the two dicts
    share are skipped without comparing them (an equality test decodes a file's packed chunk
    sizes: most of the cost when 10,000 entries are compared and few changed)."""
    get = old.get
    return [e for p in compress(new, map(operator.is_not, map(get, new), new.values()))
            if get(p) != (e := new[p])]


def fingerprint_update(fp: bytes, base: dict[str, "Entry"], entries: dict[str, "Entry"]) -> bytes:
    """fingerprint(entries), given `fp` = fingerprint(base) of a dict that shares the entry
    objects of every unchanged path: only the paths whose entry is another object are hashed."""
    if len(fp) != 24 or int.from_bytes(fp[16:], "little") != len(base):
        return fingerprint(entries)
    acc = int.from_bytes(fp[:16], "little")
    get = entries.get
    for p in list(compress(base, map(operator.is_not, map(get, base), base.values()))):
        old = _fp_entry(base[p])
        if old is None:
            return fingerprint(entries)
        acc -= old
        n = get(p)
        if n is not None:
            h = _fp_entry(n)
            if h is None:
                return b""
            acc += h
    added = _fp_sum([e for p, e in entries.items() if p not in base])  # (in the dict's order: 4x faster than a set's)
    if added is None:
        return b""
    return fp_final(acc + added, len(entries))


def fingerprint(entries: dict[str, "Entry"]) -> bytes:
    """The fingerprint a scan of the tree these entries describe would compute, or b"" when an
    entry lacks what makes it trustworthy (an untrusted file, an unknown inode)."""
    acc = _fp_sum(list(entries.values()))
    return b"" if acc is None else fp_final(acc, len(entries))


def _fp_sum(entries: list["Entry"]) -> int | None:
    """The sum of the entries' fingerprint hashes (_fp_entry; modulo 2**128 when summed in C),
    or None when one has none. In C when _walk is built: a replica's close after an initial copy
    sums every entry it made (100,000: ~0.13 s in Python)."""
    if _walk is not None and FP_C:
        got = _walk.fingerprint_sum(entries, *_row_kinds(), xxhash.xxh3_128_digest)
        if got is not NotImplemented:
            return got
    acc = 0
    for e in entries:
        h = _fp_entry(e)
        if h is None:
            return None
        acc += h
    return acc


def _or_all(xs: tuple) -> int:
    return reduce(operator.or_, xs, 0)


def _bad_path(p: str) -> bool:
    """Fast form of check_relpath's rule (this runs once per row of every cache load)."""
    w = "/" + p + "/"
    return ("//" in w or "/./" in w or "/../" in w or "\x00" in p or len(p) > 4096)


def _decode_own_rows(rows) -> dict[str, Entry]:
    """decode_rows for our own checksummed cache files: paths are still checked (cheap, and
    every writer checks them again), field types are not (4x faster: a 100,000-file cache).
    A row of the wrong shape still fails (unpacking raises) and the cache is rebuilt."""
    enc = _FSENC
    entries: dict[str, Entry] = {}
    for r in rows:
        t = r[0]
        path = r[1].decode(enc, "surrogateescape")
        if path:
            w = "/" + path + "/"
            if "//" in w or "/./" in w or "/../" in w or "\x00" in path or len(path) > 4096:
                raise ValueError(f"bad path {path!r}")
        if t == 0:
            _, _, size, mode, mtime, digest, avg, sizes, digests, ino, ctime, trusted = r
            if sizes.__class__ is bytes and len(sizes) != len(digests) >> 3 and len(sizes) != len(digests) >> 2:
                raise ValueError(f"bad packed chunk sizes for {path!r}")  # (2 or 4 bytes per 16-byte digest)
            entries[path] = FileEntry(path, size, mode, mtime, digest, avg, sizes, digests, ino, ctime, trusted)
        elif t == 1:
            _, _, mode, mtime = r
            entries[path] = DirEntry(path, mode, mtime)
        elif t == 2:
            _, _, target, mtime = r
            entries[path] = LinkEntry(path, target.decode(enc, "surrogateescape"), mtime)
        else:
            raise ValueError(f"unknown entry type {t!r}")
        if not path and t != 1:
            raise ValueError("the root must be a directory")
    return entries


def decode_rows(rows) -> dict[str, Entry]:
    """Decode manifest rows into entries, validating types and paths (rows may come from a peer)."""
    dec = os.fsdecode
    entries: dict[str, Entry] = {}
    for r in rows:
        t = r[0]
        path = dec(r[1])
        if path and _bad_path(path):
            check_relpath(path)  # raises with the precise reason
            raise ValueError(f"bad path {path!r}")
        if not path and t != 1:
            raise ValueError("the root must be a directory")
        if t == 0:
            if len(r) == 9:  # wire row: no cache-only fields
                r = tuple(r) + (0, 0, False)
            (_, _, size, mode, mtime, digest, avg, sizes, digests, ino, ctime, trusted) = r
            if isinstance(sizes, bytes):  # a format 3 row
                sizes = unpack_sizes(sizes, len(digests) // DIGEST_SIZE) if isinstance(digests, bytes) else ()
            else:
                sizes = tuple(sizes)
            try:
                # `|` raises TypeError for anything but ints: a cheap type check for a hot loop.
                size | mode | mtime | avg | ino | ctime | _or_all(sizes)
                ok = (0 <= mode <= 0o7777 and len(digest) == DIGEST_SIZE
                      and len(digests) == DIGEST_SIZE * len(sizes) and sum(sizes) == size
                      and (not sizes or min(sizes) > 0) and size >= 0)
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"bad file row for {path!r}")
            entries[path] = FileEntry(path, size, mode, mtime, bytes(digest), avg, sizes, bytes(digests),
                                      ino, ctime, bool(trusted))
        elif t == 1:
            _, _, mode, mtime = r
            if type(mode) is not int or type(mtime) is not int or not 0 <= mode <= 0o7777:
                raise ValueError(f"bad dir row for {path!r}")
            entries[path] = DirEntry(path, mode, mtime)
        elif t == 2:
            _, _, target, mtime = r
            if type(mtime) is not int or not target or b"\0" in target:
                raise ValueError(f"bad link row for {path!r}")
            entries[path] = LinkEntry(path, dec(target), mtime)
        else:
            raise ValueError(f"unknown entry type {t!r}")
    return entries
