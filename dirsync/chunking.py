"""Content-defined chunking (FastCDC 2020 via pyfastcdc) with a chunk size that adapts to file size.

Reads only streams or buffers it is given; never opens paths.

Why adaptive: a one-line edit in a 20 KiB file should send about a kilobyte, while a 1 GiB
file should not carry a million-entry chunk list. The average chunk size is about
4*sqrt(size), rounded down to a power of two and clamped to [MIN_AVG, MAX_AVG] (512 B to 8 KiB); files up to
SINGLE_MAX bytes are one chunk. A file keeps its previous chunk class while the natural class
moves by at most one step (hysteresis), so a file growing across a threshold keeps its
boundaries and with them its chunk reuse.
"""

from __future__ import annotations

import math
import os
from array import array
from itertools import accumulate

import xxhash

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import BinaryIO

CHUNKER_ID = "fastcdc2020/nc1/sqrt4/max8k/v2"  # recorded in every manifest; change it when boundaries change
SINGLE_MAX = 1024
MIN_AVG = 512
MAX_AVG = 8 * 1024  # measured: a 64 KiB cap sent 1.6x rsync's bytes for scattered 64 KiB edits of a
                   # large file; 8 KiB matches rsync's sqrt-sized blocks and costs ~0.1 s/GiB of loop
READ_SIZE = 8 * 1024 * 1024  # stream read size for large files

_digest = xxhash.xxh3_128_digest
_cutters: dict = {}  # avg -> pyfastcdc.FastCDC; imported lazily (a no-op run needs none)


def natural_avg(size: int) -> int:
    """The chunk class a file of `size` bytes gets when it has no history (0: one chunk)."""
    if size <= SINGLE_MAX:
        return 0
    k = int(math.log2(4 * math.sqrt(size)))
    return max(MIN_AVG, min(MAX_AVG, 1 << k))


def choose_avg(size: int, previous_avg: int | None) -> int:
    """Chunk class for a file, keeping `previous_avg` while it is within one step of natural."""
    nat = natural_avg(size)
    if nat and previous_avg and MIN_AVG <= previous_avg <= MAX_AVG:
        if abs(previous_avg.bit_length() - nat.bit_length()) <= 1:
            return previous_avg
    return nat


def _import_pyfastcdc():
    """pyfastcdc, imported without what it imports only for type hints: typing and
    typing_extensions (which bring re, enum, inspect, ast, dis...) and pathlib (for cut_file,
    which dirsync never calls). Together ~10-20 ms of every run that chunks a file, the agent's
    included; the extension itself loads in ~2 ms. pyfastcdc names typing's constructs only in
    annotations and aliases (Union[...], Callable[[...], int], a Protocol subclass), which
    the stand-ins below take; a release that needs more is imported plainly (import_hiding)."""
    from dirsync.imports import import_hiding, stand_in

    hint = _Hint()
    protocol = type("Protocol", (), {"__class_getitem__": classmethod(lambda cls, _args: cls)})
    return import_hiding("pyfastcdc", {
        "typing": stand_in("typing", Union=hint, Optional=hint, Iterator=hint, Callable=hint, Literal=hint,
                           Protocol=protocol),
        "typing_extensions": stand_in("typing_extensions", Literal=hint, Protocol=protocol),
        "pathlib": stand_in("pathlib", Path=type("Path", (), {})),
    })


class _Hint:
    """Stands in for a typing construct that is only subscripted (Union[a, b], Literal[0, 1])."""

    def __getitem__(self, _args) -> "_Hint":
        return self


def cutter(avg: int):
    c = _cutters.get(avg)
    if c is None:
        fastcdc = _import_pyfastcdc().FastCDC
        c = _cutters[avg] = fastcdc(avg, min_size=_min_size(avg), max_size=_max_size(avg), normalized_chunking=1)
    return c


def _min_size(avg: int) -> int:
    return max(64, avg // 4)


def _max_size(avg: int) -> int:
    return max(1024, avg * 4)


def cut_params(avg: int) -> tuple | None:
    """cutter(avg) as _files.read_small cuts (pyfastcdc's FastCDC 2020 with normalized chunking
    1, tests/test_files_c.py compares the two): (min, avg, max, mask_s, mask_l, gear, gear_ls),
    the masks and gear tables pyfastcdc's own (avg 0: one chunk); None when they are not at hand."""
    p = _cut_params.get(avg)
    if p is None and avg not in _cut_params:
        k = _gear_tables()
        if k is None:
            p = None
        elif avg:
            bits = avg.bit_length() - 1
            p = (_min_size(avg), avg, _max_size(avg), k.MASKS[bits + 1], k.MASKS[bits - 1], k.GEAR, k.GEAR_LS)
        else:
            p = (0, 0, 0, 0, 0, k.GEAR, k.GEAR_LS)
        _cut_params[avg] = p
    return p


_cut_params: dict = {}


def _gear_tables():
    """pyfastcdc's masks and gear tables: its pure-Python implementation's constants module (the
    compiled one's are not reachable from Python), loaded on its own (importing pyfastcdc.py
    would import that implementation, and typing with it) with typing_extensions hidden as in
    _import_pyfastcdc; None if they are not there as expected."""
    import importlib.util
    import sys

    from dirsync.imports import stand_in

    try:
        path = os.path.join(os.path.dirname(_import_pyfastcdc().__file__), "py", "constants.py")
        spec = importlib.util.spec_from_file_location("dirsync._fastcdc_constants", path)
        k = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        hidden = "typing_extensions" not in sys.modules
        if hidden:
            sys.modules["typing_extensions"] = stand_in("typing_extensions", Final=_Hint())
        try:
            spec.loader.exec_module(k)  # type: ignore[union-attr]
        finally:
            if hidden:
                del sys.modules["typing_extensions"]
        if len(k.GEAR) == len(k.GEAR_LS) == 256 and k.GEAR.itemsize == 8 and k.GEAR_LS.itemsize == 8:
            return k
    except (ImportError, AttributeError, TypeError, OSError):
        pass
    return None


def chunk_buffer(buf: bytes | memoryview, avg: int) -> tuple[tuple[int, ...], bytes, bytes]:
    """Chunk an in-memory file: (chunk sizes, concatenated chunk digests, whole-file digest)."""
    whole = _digest(buf)
    if not buf:
        return (), b"", whole
    if avg == 0:
        return (len(buf),), whole, whole
    sizes = []
    digests = []
    for ch in cutter(avg).cut_buf(buf):
        sizes.append(ch.length)
        digests.append(_digest(ch.data))
    return tuple(sizes), b"".join(digests), whole


def chunk_stream(f: BinaryIO, avg: int) -> tuple[tuple[int, ...], bytes, bytes, int]:
    """Chunk a file read from `f` to EOF: (sizes, digests, whole digest, bytes read)."""
    whole = xxhash.xxh3_128()
    sizes = []
    digests = []
    total = 0
    if avg == 0:
        data = f.read()
        total = len(data)
        whole.update(data)
        if data:
            sizes.append(total)
            digests.append(_digest(data))
    else:
        reader = _Reader(f, whole)
        for ch in cutter(avg).cut_stream(reader):
            sizes.append(ch.length)
            digests.append(_digest(ch.data))
        total = reader.total
    return tuple(sizes), b"".join(digests), whole.digest(), total


class _Reader:
    """Feeds pyfastcdc in large reads (its own default read size is small), hashing the whole
    file as it is read (the chunks cover every byte read, in order: one update a read instead
    of one a chunk)."""

    __slots__ = ("_f", "_whole", "total")

    def __init__(self, f: BinaryIO, whole) -> None:
        self._f = f
        self._whole = whole
        self.total = 0

    def readinto(self, b: memoryview) -> int:
        n = self._f.readinto(b)  # type: ignore[attr-defined]
        if n:
            self._whole.update(b[:n])
            self.total += n
        return n


PARALLEL_MIN = 128 << 20  # files at least this large are chunked by two processes (chunk_file_parallel)


class _PReader:
    """_Reader over positioned reads (pread) of `fd` from `pos`: the fd's file offset is shared
    with a forked child, so neither side may move it."""

    __slots__ = ("_fd", "_whole", "pos", "total")

    def __init__(self, fd: int, pos: int, whole) -> None:
        self._fd = fd
        self._whole = whole
        self.pos = pos
        self.total = 0

    def readinto(self, b: memoryview) -> int:
        n = os.preadv(self._fd, [b], self.pos)
        if n:
            if self._whole is not None:
                self._whole.update(b[:n])
            self.pos += n
            self.total += n
        return n


def _cut_range(fd: int, start: int, avg: int) -> tuple[list[int], bytes]:
    """Chunk the file from `start` to EOF as if a chunk began at `start`: (sizes, digests)."""
    sizes, digests = [], []
    for ch in cutter(avg).cut_stream(_PReader(fd, start, None)):
        sizes.append(ch.length)
        digests.append(_digest(ch.data))
    return sizes, b"".join(digests)


def chunk_file_parallel(fd: int, size: int, avg: int, fork) -> tuple[tuple[int, ...], bytes, bytes, int] | None:
    """chunk_stream's result for the open file `fd` of `size` bytes, computed by two processes:
    a child (`fork`: state.fork_answering) chunks the file from 3/7 of its size on as if a chunk
    began there, while this process chunks from the beginning. Chunk boundaries depend only on the
    bytes since the previous boundary, so from the first boundary both found the chunks are
    the same: this process stops there and takes the child's from then on (then only hashes
    the rest for the whole-file digest). Where they never meet, this process simply goes on
    to the end: the result is always exactly chunk_stream's. None when no child can be
    forked (the caller chunks alone)."""
    # The parent also hashes the child's part for the whole-file digest (about a quarter of
    # the cost of chunking it): splitting at 3/7 has both sides finish together.
    start = (size * 3 // 7) & ~((1 << 20) - 1)

    def work(w: int) -> None:
        sizes, digests = _cut_range(fd, start, avg)
        sz = array("Q", sizes).tobytes()
        view = memoryview(len(sz).to_bytes(8, "little") + sz + digests)
        while view:
            view = view[os.write(w, view):]

    got = fork(work)
    if got is None:
        return None
    pid, r = got
    try:
        whole = xxhash.xxh3_128()
        reader = _PReader(fd, 0, whole)
        sizes: list[int] = []
        digests: list[bytes] = []
        pos = 0
        ends: dict[int, int] | None = None  # the child's chunk boundaries -> its chunks from there
        for ch in cutter(avg).cut_stream(reader):
            sizes.append(ch.length)
            digests.append(_digest(ch.data))
            pos += ch.length
            if pos < start:
                continue
            if ends is None:
                csizes, cdigests = _read_child(r)
                ends = {}
                if sum(csizes) == size - start:  # (else the child failed, or the file changed)
                    for k, end in enumerate(accumulate(csizes, initial=start)):
                        ends[end] = k
            k = ends.get(pos)
            if k is not None:  # met: the rest of the child's chunks are this file's
                sizes.extend(csizes[k:])
                digests.append(cdigests[k * 16:])
                buf = memoryview(bytearray(READ_SIZE))
                while reader.readinto(buf):  # (only hashed for the whole-file digest)
                    pass
                return tuple(sizes), b"".join(digests), whole.digest(), reader.total
        return tuple(sizes), b"".join(digests), whole.digest(), reader.total
    finally:
        os.close(r)
        try:
            os.kill(pid, 9)  # (done by now, unless this process stopped early)
        except OSError:
            pass
        os.waitpid(pid, 0)


def _read_child(fd: int) -> tuple[list[int], bytes]:
    """The child's (sizes, digests), or nothing when it failed (the parent then goes on alone)."""
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    data = b"".join(chunks)
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if n < 0 or n % 8 or len(data) < 8 + n:  # (a child that died while writing)
        return [], b""
    sizes = array("Q")
    sizes.frombytes(data[8:8 + n])
    digests = data[8 + n:]
    if len(digests) != 16 * len(sizes):
        return [], b""
    return sizes.tolist(), digests
