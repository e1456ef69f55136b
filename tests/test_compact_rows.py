"""A write's chunk digests that the agent can look up itself are left out of its row
(proto.compact_digests on the master, _expand_digests in the agent's dec_action).

What must hold: compacting and expanding a copy op's chunks as one run of the source's (a moved
file, the unchanged stretches of an edited one) gives exactly what a lookup per chunk gives,
for any layout of copy and send ops (a randomized comparison with the per-chunk way, kept here
as the reference); and a hostile row that only looks like a run (other chunk sizes, an offset,
a cleared bit, a file the replica does not have) gets the per-chunk checks: the right digests,
or a ProtocolError.
"""

from __future__ import annotations

import os
import random

import pytest

from dirsync.errors import ProtocolError
from dirsync.manifest import DIGEST_SIZE, FileEntry
from dirsync.plan import CopyOp, SendOp, WriteFile
from dirsync.transport import proto, wire

SIZES = (5000, 9000, 1, 7000, 12000, 3000, 8000, 4000, 6000, 2000, 11000)  # 11 chunks: a partial mask byte


def _all_set(n: int) -> bytes:
    return b"\xff" * (n >> 3) + (bytes([(1 << (n & 7)) - 1]) if n & 7 else b"")


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
    msg = _msg(w, (_all_set(len(sizes)), b""))
    chunk_at, source = _agent_side({} if lie == "missing" else replica)
    with pytest.raises(ProtocolError):
        proto.dec_action(msg, chunk_at, source)


def test_a_cleared_bit_takes_its_digest_from_the_row():
    src = _file("a.bin")
    replica = {src.path: src}
    w = _move(src)
    mask = bytearray(_all_set(len(SIZES)))
    mask[0] &= ~(1 << 2)  # chunk 2's digest travels in the row
    msg = _msg(w, (bytes(mask), src.digests[2 * DIGEST_SIZE:3 * DIGEST_SIZE]))
    chunk_at, source = _agent_side(replica)
    assert proto.dec_action(msg, chunk_at, source).target.digests == src.digests
    msg = _msg(w, (bytes(mask), b"\0" * DIGEST_SIZE))  # a wrong one is not replaced by the source's
    assert proto.dec_action(msg, chunk_at, source).target.digests != src.digests


def _per_chunk_compact(w: WriteFile, replica: dict):
    """The reference: compact_digests as a lookup per chunk (the way it was first written)."""
    chunks = list(w.target.chunks())
    mask = bytearray((len(chunks) + 7) // 8)
    left = []
    pos, k = 0, 0
    for op in w.ops:
        end = pos + op.size
        src = replica.get(op.src) if isinstance(op, CopyOp) else None
        table = {off: (n, d) for off, n, d in src.chunks()} if isinstance(src, FileEntry) else None
        while k < len(chunks) and chunks[k][0] < end:
            off, n, d = chunks[k]
            if table is not None and off + n <= end and table.get(op.offset + off - pos) == (n, d):
                mask[k >> 3] |= 1 << (k & 7)
            else:
                left.append(d)
            k += 1
        pos = end
    return (bytes(mask), b"".join(left)) if any(mask) else None


def _random_write(rnd: random.Random, src: FileEntry) -> WriteFile:
    """A target made of runs of src's chunks (at any offset, whole or cut) and new chunks, with
    copy ops that may cover more or less than whole chunks."""
    s_chunks = list(src.chunks())
    sizes, digests, ops = [], [], []
    pos = 0
    for _ in range(rnd.randint(1, 8)):
        if rnd.random() < 0.6:  # a run of the source's chunks
            j0 = rnd.randrange(len(s_chunks))
            j1 = rnd.randint(j0 + 1, min(len(s_chunks), j0 + 6))
            run = s_chunks[j0:j1]
            if rnd.random() < 0.2 and len(run) > 1:  # one chunk of the run differs
                i = rnd.randrange(len(run))
                run[i] = (run[i][0], run[i][1], os.urandom(DIGEST_SIZE))
            start, size = run[0][0], sum(c[1] for c in run)
            cut = rnd.choice([0, 0, 0, 1, -1])  # a copy op shorter or longer than the run
            size = max(1, min(size + cut, src.size - start))
            ops.append(CopyOp(src.path, start, size))
            covered = 0
            for _, n, d in run:
                if covered + n > size:
                    break
                sizes.append(n)
                digests.append(d)
                covered += n
            if covered < size:  # the copy's tail ends a new chunk
                sizes.append(size - covered)
                digests.append(os.urandom(DIGEST_SIZE))
        else:
            n = rnd.randint(1, 9000)
            ops.append(SendOp(pos, n))
            sizes.append(n)
            digests.append(os.urandom(DIGEST_SIZE))
            size = n
        pos += size
    # (op offsets of sends: where they land in the target)
    out, at = [], 0
    for op in ops:
        out.append(SendOp(at, op.size) if isinstance(op, SendOp) else op)
        at += op.size
    target = FileEntry("t/new.bin", sum(sizes), 0o644, 1, os.urandom(16), 8192, tuple(sizes), b"".join(digests))
    return WriteFile(target, tuple(out), None, False)


def test_runs_compact_and_expand_exactly_as_a_lookup_per_chunk():
    rnd = random.Random(12)
    for case in range(300):
        src = _file("a.bin", tuple(rnd.randint(1, 9000) for _ in range(rnd.randint(1, 40))), seed=case)
        replica = {src.path: src}
        w = _random_write(rnd, src)
        want = _per_chunk_compact(w, replica)
        assert proto.compact_digests(w, replica) == want, case
        if want is None:
            continue
        msg = _msg(w, want)
        chunk_at, source = _agent_side(replica)
        got = proto.dec_action(msg, chunk_at, source)
        assert got.target.digests == proto.dec_action(msg, chunk_at).target.digests == w.target.digests, case


def test_an_edited_large_file_is_compacted_to_its_changed_chunks_only():
    sizes = tuple(4096 + (i * 37) % 5000 for i in range(5000))
    src = _file("big.img", sizes)
    k = 2500  # chunk k changed (same size)
    digests = src.digests[:k * DIGEST_SIZE] + b"\1" * DIGEST_SIZE + src.digests[(k + 1) * DIGEST_SIZE:]
    at = sum(sizes[:k])
    target = FileEntry("big.img", src.size, 0o644, 2, os.urandom(16), 8192, sizes, digests)
    w = WriteFile(target, (CopyOp("big.img", 0, at), SendOp(at, sizes[k]),
                           CopyOp("big.img", at + sizes[k], src.size - at - sizes[k])), None, False)
    mask, left = proto.compact_digests(w, {"big.img": src})
    assert left == b"\1" * DIGEST_SIZE
    assert (mask, left) == _per_chunk_compact(w, {"big.img": src})
    chunk_at, source = _agent_side({"big.img": src})
    assert proto.dec_action(_msg(w, (mask, left)), chunk_at, source).target.digests == digests
