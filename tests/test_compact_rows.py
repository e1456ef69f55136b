"""A write's chunk digests that the agent can look up itself are left out of its row
(proto.compact_digests on the master, _expand_digests in the agent's dec_action).

What must hold: a whole file copied from one replica file with the same chunks (a move) is
compacted and expanded by a shortcut that gives exactly what the per-chunk way gives; and a
hostile row that only looks like one (other chunk sizes, an offset, a cleared bit, a file the
replica does not have) gets the per-chunk checks: the right digests, or a ProtocolError.
"""

from __future__ import annotations

import os

import pytest

from dirsync.errors import ProtocolError
from dirsync.manifest import DIGEST_SIZE, FileEntry
from dirsync.plan import CopyOp, WriteFile
from dirsync.transport import proto, wire

SIZES = (5000, 9000, 1, 7000, 12000, 3000, 8000, 4000, 6000, 2000, 11000)  # 11 chunks: a partial mask byte


def _file(path: str, sizes=SIZES, seed: int = 1) -> FileEntry:
    rnd = __import__("random").Random(seed)
    digests = bytes(rnd.getrandbits(8) for _ in range(DIGEST_SIZE * len(sizes)))
    return FileEntry(path, sum(sizes), 0o644, 1_700_000_000_000_000_000, os.urandom(16), 8192, tuple(sizes),
                     digests)


def _move(src: FileEntry, ops=None) -> WriteFile:
    target = FileEntry("new/" + src.path, src.size, src.mode, src.mtime_ns, src.digest, src.avg, src.sizes,
                       src.digests)
    return WriteFile(target, tuple(ops or (CopyOp(src.path, 0, src.size),)), None, True)


def _agent_side(replica: dict):
    def chunk_at(src: str, offset: int):
        e = replica.get(src)
        return next(((n, d) for off, n, d in e.chunks() if off == offset), None) if e else None

    def source(src: str):
        return replica.get(src)

    return chunk_at, source


def _msg(w: WriteFile, compact) -> dict:
    msg = proto.enc_action(w)
    row = list(msg["f"])
    msg["dm"], row[8] = compact
    msg["f"] = row
    return wire._decode_body(wire.encode(msg)[4:])  # as the agent gets it


def test_a_moved_file_is_compacted_to_a_full_mask_as_the_per_chunk_way_would():
    src = _file("a.bin")
    replica = {src.path: src}
    whole = proto.compact_digests(_move(src), replica)
    cut = sum(SIZES[:4])  # the same copy in two ops: the per-chunk way
    split = proto.compact_digests(_move(src, (CopyOp(src.path, 0, cut), CopyOp(src.path, cut, src.size - cut))),
                                  replica)
    assert whole == split == (b"\xff\x07", b"")


def test_a_moved_file_expands_to_its_sources_digests_with_or_without_the_shortcut():
    src = _file("a.bin")
    replica = {src.path: src}
    w = _move(src)
    msg = _msg(w, proto.compact_digests(w, replica))
    chunk_at, source = _agent_side(replica)
    fast = proto.dec_action(msg, chunk_at, source)
    slow = proto.dec_action(msg, chunk_at)
    assert fast.target.digests == slow.target.digests == src.digests
    assert fast.target.sizes == SIZES and fast.move


@pytest.mark.parametrize("lie", ["sizes", "offset", "missing"])
def test_a_row_that_only_looks_like_a_move_gets_the_per_chunk_checks(lie):
    src = _file("a.bin")
    replica = {src.path: src}
    sizes = SIZES
    ops = None
    if lie == "sizes":  # the same total in other chunks: not the replica's chunks
        sizes = (SIZES[1], SIZES[0], *SIZES[2:])
    elif lie == "offset":
        ops = (CopyOp(src.path, 1, src.size),)
    target = FileEntry("new/a.bin", sum(sizes), 0o644, 1, src.digest, 8192, sizes, src.digests)
    w = WriteFile(target, tuple(ops or (CopyOp(src.path, 0, src.size),)), None, True)
    msg = _msg(w, (proto._all_set(len(sizes)), b""))
    chunk_at, source = _agent_side({} if lie == "missing" else replica)
    with pytest.raises(ProtocolError):
        proto.dec_action(msg, chunk_at, source)


def test_a_cleared_bit_takes_its_digest_from_the_row():
    src = _file("a.bin")
    replica = {src.path: src}
    w = _move(src)
    mask = bytearray(proto._all_set(len(SIZES)))
    mask[0] &= ~(1 << 2)  # chunk 2's digest travels in the row
    msg = _msg(w, (bytes(mask), src.digests[2 * DIGEST_SIZE:3 * DIGEST_SIZE]))
    chunk_at, source = _agent_side(replica)
    assert proto.dec_action(msg, chunk_at, source).target.digests == src.digests
    msg = _msg(w, (bytes(mask), b"\0" * DIGEST_SIZE))  # a wrong one is not replaced by the source's
    assert proto.dec_action(msg, chunk_at, source).target.digests != src.digests
