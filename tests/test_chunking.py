"""Chunking: golden boundaries, tiling and size bounds, insertion locality, buffer/stream
agreement, and the adaptive chunk class with its hysteresis.

The golden vectors pin the exact boundaries of pyfastcdc with dirsync's parameters. If they
change, every manifest made so far stops matching: bump chunking.CHUNKER_ID (manifests record
it) and regenerate the table below on purpose, never to make the test pass.
"""

from __future__ import annotations

import io
import os
import random
import threading

import pytest
import xxhash

from dirsync import chunking
from dirsync.chunking import MAX_AVG, MIN_AVG, SINGLE_MAX, choose_avg, chunk_buffer, chunk_stream, natural_avg

# avg: (seed, size, whole-file xxh3-128, [(offset, size, chunk xxh3-128), ...]) for
# random.Random(seed).randbytes(size) chunked with chunk_buffer(data, avg).
GOLDEN = {
    512: (1, 12288, "15ec6cb625f61e8b3b206bb85a95d480", [
        (0, 803, "2fb3f7224e244e092294235a0fc0e6b1"),
        (803, 604, "35a612e810e252e3145c993d6659d867"),
        (1407, 1060, "b16efa6ba152179a720ae734cc8489ca"),
        (2467, 861, "a2757befac4248bea2312d0132b49702"),
        (3328, 481, "427f91863e2a44c90aaec8baf7ed2cc9"),
        (3809, 319, "c9517beff5578812a4ec23f05d2121ec"),
        (4128, 245, "62dc33b4cd087b5c228159cbd5e775e5"),
        (4373, 345, "49058edb8cb7f93411abe13c8a1e1ca0"),
        (4718, 191, "26f14864712ddfbeacce2d49fb7ae810"),
        (4909, 251, "815b1e1b947b056e739bba67982d0faf"),
        (5160, 232, "f932444842d4ed29af4a8efe636f350f"),
        (5392, 543, "1f10b7d868c753895a0ce091c52eeaeb"),
        (5935, 575, "ab810d8ccb119ec0ab945ced19f2b4ac"),
        (6510, 189, "00b6359192ac27e48b47f582e9a107ee"),
        (6699, 555, "702b19ceb9e66e4dbdbcc245582e384c"),
        (7254, 634, "a0f45c549a58a94c74168121b2ed70ab"),
        (7888, 204, "d21e4211b4acc1cbc6bad67d2a79ad9f"),
        (8092, 512, "b07457d07a595873940c32c68f0ef854"),
        (8604, 985, "9b126a9b9b01d937cc6daadc9d0b34b9"),
        (9589, 420, "cbf736be07daeeeee72e265713c3c1b6"),
        (10009, 571, "8b41f6db60b1739956fe02ed23179d52"),
        (10580, 390, "fa0dc8977b27190d7de84435d576ce23"),
        (10970, 589, "29ded7980e2aacbf1b7971de5872d586"),
        (11559, 327, "62ee20aee75291e542c15fdd7352b6af"),
        (11886, 402, "64d85d5391149a9ab4832f0b68c4c8b7"),
    ]),
    4096: (2, 98304, "a70a838fdf750b440a5bc4b4b71a251d", [
        (0, 5619, "54dbb5929700f5279e6abdc80a145a6b"),
        (5619, 6587, "1b89589db1004df0f9740bc39f3d9594"),
        (12206, 9102, "8b3025533213a79d65039134cbfd20f0"),
        (21308, 3825, "b9f09c444643db347f92231828ae7753"),
        (25133, 1294, "4f192aab54a11f5efc997f7bf3989e9d"),
        (26427, 5749, "7cc72e9c70f4779fbb450237d38a83c2"),
        (32176, 5741, "2a882fba0d176239e4f0c0bbe12b800e"),
        (37917, 3586, "148fabd83746d120a0a85314af550858"),
        (41503, 4766, "b379b55aee76e87c65c6e83660800837"),
        (46269, 1030, "9b68963b2da2fe816a73f6362e6a7573"),
        (47299, 3962, "e0e474e490ac369c5e641fef661b1795"),
        (51261, 4807, "e0f2cd2c477f540aa5088c79bb5af8f2"),
        (56068, 1341, "7c3b6c31a7ba3e37b6ea01181220d3bd"),
        (57409, 1134, "122eb4e789166aa596314d5f9b52d644"),
        (58543, 3525, "e465232f3e6e998c7879b373f60e7ac3"),
        (62068, 3127, "b2c3ccc011bde21e8655163f250501ee"),
        (65195, 4201, "7e71037d948076612a9d11a7914b4528"),
        (69396, 8907, "d1acca592b32a08fc9215b1cf163590d"),
        (78303, 2096, "db9ad20f1c6fb2e5f4e9fb9fda1bef11"),
        (80399, 1117, "f75c66a1a98633fe34237e2d85ae2c37"),
        (81516, 3729, "03a16d20b86162bd85f684fccc064f87"),
        (85245, 1138, "d3ef3dabd9cf556aaeb088b2d8f83e96"),
        (86383, 2825, "5196efb704fca1ac87f736e0fba205d2"),
        (89208, 3174, "5f2614daf07f73911c4f15e017cad095"),
        (92382, 5922, "e7ec723c6de6d13f39584faf9f355e13"),
    ]),
    65536: (3, 1572864, "0cf44ebda2a83eeda04c0268cbf5c8cb", [
        (0, 26408, "08b5b1e9acdcf346b4fad55e255f223a"),
        (26408, 54590, "68c2dd92ca5c4721c1ba27b59da232b4"),
        (80998, 83806, "4d88ec151e6a7ba50563451092033164"),
        (164804, 66383, "f9ebbfc5ed51271157e1f022538eacea"),
        (231187, 121068, "76a51b33ce187bb3fa9090e103f35f2a"),
        (352255, 88535, "8409d76aded1ed378cf46972d08b305c"),
        (440790, 87985, "723eaa94f1c36d7f639011f8ac224e61"),
        (528775, 42294, "edd37a17eeedb5175507bc0abc100376"),
        (571069, 19113, "ca7d8b8cefdab5f8f9ae1bce51411bd8"),
        (590182, 48849, "31cac21cc76465fc8cf793e5517cf6f6"),
        (639031, 113922, "1d5f54363c9693012c9e29dc86612301"),
        (752953, 72954, "2e73a9cfc53732b95471a6e0fb6b63d0"),
        (825907, 32152, "e8adbefc2e4c6ed58852753222992499"),
        (858059, 42244, "030548d5e1d7b9c16f60c1464e6c05ef"),
        (900303, 36046, "4c95380b6e18b26e5980a1a7394250f4"),
        (936349, 112607, "aa5836682cb7c37e1645e7320f3e66a4"),
        (1048956, 35701, "c5c0e630ba4a442c47f11770d590ca63"),
        (1084657, 195386, "3b7c7aae4833a51d20d09dcabadde3e6"),
        (1280043, 49846, "f0b22f2e157c001db90f667c06c46f99"),
        (1329889, 103223, "caa7d9418de343d73e807a34ab0b49df"),
        (1433112, 132996, "ab070765fe828e8bfa64e45f717e3f29"),
        (1566108, 6756, "6ffbb17443994e4a7db4f786fc55098a"),
    ]),
}


def data_for(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def triples(sizes, digests) -> list[tuple[int, int, str]]:
    out, off = [], 0
    for i, n in enumerate(sizes):
        out.append((off, n, digests[i * 16:(i + 1) * 16].hex()))
        off += n
    return out


def bounds(avg: int) -> tuple[int, int]:
    """(min, max) chunk size of class `avg`: the documented parameters, read from the cutter."""
    c = chunking.cutter(avg)
    return c.min_size, c.max_size


@pytest.mark.parametrize("avg", sorted(GOLDEN))
def test_golden_vectors_buffer(avg):
    seed, n, whole_hex, expected = GOLDEN[avg]
    sizes, digests, whole = chunk_buffer(data_for(seed, n), avg)
    assert triples(sizes, digests) == expected
    assert whole.hex() == whole_hex


@pytest.mark.parametrize("avg", sorted(GOLDEN))
def test_golden_vectors_stream_from_real_file(avg, tmp_path):
    seed, n, whole_hex, expected = GOLDEN[avg]
    p = tmp_path / "data"
    p.write_bytes(data_for(seed, n))
    with open(p, "rb", buffering=0) as f:  # as the scanner opens large files
        sizes, digests, whole, nread = chunk_stream(f, avg)
    assert nread == n
    assert triples(sizes, digests) == expected
    assert whole.hex() == whole_hex


def test_golden_table_is_self_consistent():
    # Guards the pasted table itself: it tiles its input and has enough chunks to mean something.
    for avg, (_seed, n, _w, rows) in GOLDEN.items():
        assert len(rows) >= 10
        assert rows[0][0] == 0 and rows[-1][0] + rows[-1][1] == n
        assert all(a[0] + a[1] == b[0] for a, b in zip(rows, rows[1:]))
        assert len({r[2] for r in rows}) == len(rows)


def test_chunker_params_documented():
    # The parameters the manifest's CHUNKER_ID stands for; a change here must bump the id.
    assert bounds(512) == (128, 2048)
    assert bounds(4096) == (1024, 16384)
    assert bounds(65536) == (16384, 262144)
    assert chunking.cutter(4096).avg_size == 4096


# -- tiling, bounds and digests -------------------------------------------------------------

KINDS = {
    "random": lambda n: data_for(7, n),
    "zeros": lambda n: bytes(n),
    "text": lambda n: (b"the quick brown fox jumps over the lazy dog\n" * (n // 44 + 1))[:n],
    "mixed": lambda n: b"".join(data_for(i, 3000) + bytes(5000) for i in range(n // 8000 + 1))[:n],
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("avg", [512, 1024, 4096, 16384, 65536])
def test_chunks_tile_and_respect_bounds(avg, kind):
    n = max(avg * 40, 3 * avg * 4 + 17)
    data = KINDS[kind](n)
    sizes, digests, whole = chunk_buffer(data, avg)
    lo, hi = bounds(avg)
    assert sum(sizes) == len(data)
    assert len(digests) == 16 * len(sizes)
    assert all(lo <= s <= hi for s in sizes[:-1]), (lo, hi, min(sizes[:-1]), max(sizes[:-1]))
    assert 0 < sizes[-1] <= hi
    assert whole == xxhash.xxh3_128_digest(data)
    off = 0
    for i, s in enumerate(sizes):
        assert digests[i * 16:(i + 1) * 16] == xxhash.xxh3_128_digest(data[off:off + s])
        off += s
    if kind == "zeros":
        # No content to cut on: every chunk but the last is a maximum-size chunk.
        assert set(sizes[:-1]) == {hi}


@pytest.mark.parametrize("n", [1, 63, 64, 127, 128, 129, 2047, 2048, 2049])
def test_short_inputs(n):
    data = data_for(n, n)
    sizes, digests, whole = chunk_buffer(data, 512)
    assert sum(sizes) == n and len(digests) == 16 * len(sizes)
    assert all(s <= 2048 for s in sizes)
    assert whole == xxhash.xxh3_128_digest(data)


def test_empty_input():
    for avg in (0, 512, 65536):
        assert chunk_buffer(b"", avg) == ((), b"", xxhash.xxh3_128_digest(b""))
        assert chunk_stream(io.BytesIO(b""), avg) == ((), b"", xxhash.xxh3_128_digest(b""), 0)


def test_class_zero_is_one_chunk():
    data = data_for(3, 1000)
    d = xxhash.xxh3_128_digest(data)
    assert chunk_buffer(data, 0) == ((1000,), d, d)
    assert chunk_stream(io.BytesIO(data), 0) == ((1000,), d, d, 1000)


def test_memoryview_input():
    data = data_for(4, 50_000)
    assert chunk_buffer(memoryview(data), 1024) == chunk_buffer(data, 1024)


# -- insertion / deletion locality -----------------------------------------------------------

@pytest.mark.parametrize("avg,n", [(512, 64 << 10), (4096, 512 << 10), (65536, 4 << 20)])
@pytest.mark.parametrize("k", [1, 7, 100, 5000])
def test_insertion_changes_few_chunks(avg, n, k):
    data = data_for(11, n)
    mid = n // 2 + 12345 % (n // 4)
    edited = data[:mid] + data_for(1000 + k, k) + data[mid:]
    s0, d0, _ = chunk_buffer(data, avg)
    s1, d1, _ = chunk_buffer(edited, avg)
    old = {d0[i:i + 16] for i in range(0, len(d0), 16)}
    new = [d1[i:i + 16] for i in range(0, len(d1), 16)]
    offs = [sum(s1[:i]) for i in range(len(s1))]
    fresh = [i for i, d in enumerate(new) if d not in old]
    # Chunks made only of inserted bytes are new by necessity; the others must be few.
    around = [i for i in fresh if not (mid <= offs[i] and offs[i] + s1[i] <= mid + k)]
    assert len(new) >= 15  # enough chunks for "few" to mean something
    assert len(around) <= 3, f"{len(around)} of {len(new)} chunks changed around the insertion"
    if k < avg:
        assert len(fresh) <= 3
    # In bytes: roughly two chunks plus the insertion need sending, not the file.
    fresh_bytes = sum(s1[i] for i in fresh)
    assert fresh_bytes <= k + 3 * bounds(avg)[1]
    assert fresh_bytes < n // 4


@pytest.mark.parametrize("avg,n", [(512, 64 << 10), (65536, 4 << 20)])
def test_deletion_changes_few_chunks(avg, n):
    data = data_for(12, n)
    mid = n // 3
    edited = data[:mid] + data[mid + 1000:]
    _, d0, _ = chunk_buffer(data, avg)
    _, d1, _ = chunk_buffer(edited, avg)
    old = {d0[i:i + 16] for i in range(0, len(d0), 16)}
    fresh = [d1[i:i + 16] for i in range(0, len(d1), 16) if d1[i:i + 16] not in old]
    assert len(fresh) <= 3


# -- buffer and stream agree -------------------------------------------------------------------

@pytest.mark.parametrize("avg,n", [(512, 100_000), (4096, 1_000_000), (65536, 20 << 20), (0, 5000)])
def test_buffer_and_stream_agree(avg, n, tmp_path):
    data = data_for(21, n)
    want = chunk_buffer(data, avg)
    got = chunk_stream(io.BytesIO(data), avg)
    assert got == (*want, n)
    p = tmp_path / "f"
    p.write_bytes(data)
    with open(p, "rb", buffering=0) as f:
        assert chunk_stream(f, avg) == (*want, n)


def test_stream_with_short_reads_agrees(tmp_path):
    """A pipe hands out data in small, uneven reads; the boundaries must not depend on them."""
    data = data_for(22, 3 << 20)
    want = chunk_buffer(data, 16384)
    r, w = os.pipe()

    def feed() -> None:
        rng = random.Random(5)
        view = memoryview(data)
        with open(w, "wb", buffering=0) as out:
            while view:
                n = out.write(view[:rng.randint(1, 70_000)])
                view = view[n:]

    t = threading.Thread(target=feed)
    t.start()
    try:
        with open(r, "rb", buffering=0) as f:
            got = chunk_stream(f, 16384)
    finally:
        t.join()
    assert got == (*want, len(data))


# -- chunk class ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,avg", [
    (0, 0), (1, 0), (SINGLE_MAX, 0),
    (SINGLE_MAX + 1, MIN_AVG),
    (20 * 1024, 512),  # 4*sqrt(20 KiB) ~ 572
    ((1 << 16) - 1, 512), (1 << 16, 1024),  # 4*sqrt(64 KiB) = 1024 exactly
    ((1 << 18) - 1, 1024), (1 << 18, 2048),
    (1 << 20, 4096),
    ((1 << 22) - 1, 4096), (1 << 22, MAX_AVG),
    (1 << 40, MAX_AVG),
])
def test_natural_avg_table(size, avg):
    assert natural_avg(size) == avg


def test_natural_avg_shape():
    prev = 0
    for e in range(0, 41):
        for size in {(1 << e) - 1, 1 << e, (1 << e) + 1, 3 << max(e - 2, 0)}:
            a = natural_avg(size)
            if size <= SINGLE_MAX:
                assert a == 0
                continue
            assert a & (a - 1) == 0, "a power of two"
            assert MIN_AVG <= a <= MAX_AVG
            assert a <= max(MIN_AVG, 4 * size ** 0.5) < 2 * max(a, MIN_AVG) or a == MAX_AVG
    sizes = sorted({int(1.07 ** i) for i in range(0, 420)})
    for s in sizes:
        a = natural_avg(s)
        assert a >= prev, f"natural_avg not monotone at {s}"
        prev = a


def test_choose_avg_without_history_is_natural():
    for size in (0, 500, 5000, 70_000, 10 << 20):
        assert choose_avg(size, None) == natural_avg(size)
        assert choose_avg(size, 0) == natural_avg(size)


@pytest.mark.parametrize("size,prev,expected", [
    (70_000, 512, 512),  # grew one class up: keeps 512
    (60_000, 1024, 1024),  # shrank one class down: keeps 1024
    (300_000, 1024, 1024),  # natural 2048: one step, kept
    (300_000, 512, 2048),  # natural 2048: two steps away, switches
    (60_000, 4096, 512),  # natural 512 vs 4096: switches
    (1 << 30, 4096, 4096),  # natural capped at MAX_AVG; 4096 within one step
    (1000, 512, 0),  # small enough for one chunk: always one chunk
    (5000, 100, 512),  # a bogus recorded class is ignored
    (5000, 1 << 20, 512),
])
def test_choose_avg_hysteresis(size, prev, expected):
    assert choose_avg(size, prev) == expected


def test_growth_across_threshold_keeps_chunk_reuse():
    """A file growing across a class threshold keeps its class, so its chunks survive."""
    base = data_for(31, 60_000)
    grown = base + data_for(32, 10_000)
    a0 = choose_avg(len(base), None)
    a1 = choose_avg(len(grown), a0)
    assert (a0, natural_avg(len(grown))) == (512, 1024), "the test must cross a threshold"
    assert a1 == a0
    _, d0, _ = chunk_buffer(base, a0)
    _, d1, _ = chunk_buffer(grown, a1)
    old = [d0[i:i + 16] for i in range(0, len(d0), 16)]
    new = {d1[i:i + 16] for i in range(0, len(d1), 16)}
    kept = sum(d in new for d in old)
    assert kept >= len(old) - 2, f"only {kept} of {len(old)} chunks survive"
    # Without the hysteresis (rechunking at the natural class) reuse would be mostly lost;
    # this is what the hysteresis is for.
    _, d2, _ = chunk_buffer(grown, natural_avg(len(grown)))
    natural = {d2[i:i + 16] for i in range(0, len(d2), 16)}
    assert sum(d in natural for d in old) < len(old) // 2


def test_the_writers_chunk_hasher_matches_the_chunker():
    """An agent told to derive chunk digests ("sd") hashes the bytes it writes, cut at the
    row's chunk sizes, in pieces of any size: it must get what the scanner's chunker got; bytes
    past the last chunk leave it incomplete (the write then fails its content check)."""
    import os as _os

    from dirsync import chunking
    from dirsync.replica import _ChunkHasher

    data = _os.urandom(300_000)
    sizes, digests, _ = chunking.chunk_buffer(data, chunking.natural_avg(len(data)))
    assert len(sizes) > 10
    for step in (1, 7, 4096, 65536, len(data)):
        h = _ChunkHasher(sizes)
        for i in range(0, len(data), step):
            h.update(data[i:i + step])
        assert h.complete and h.digests() == digests, step
    h = _ChunkHasher(sizes)
    h.update(data + b"x")
    assert not h.complete
    h = _ChunkHasher(sizes)
    h.update(data[:-1])
    assert not h.complete


# -- two processes on one large file (chunking.chunk_file_parallel) ---------------------------


def _parallel(path, avg, fork=None):
    from dirsync.state import fork_answering

    fd = os.open(path, os.O_RDONLY)
    try:
        return chunking.chunk_file_parallel(fd, os.path.getsize(path), avg, fork or fork_answering)
    finally:
        os.close(fd)


@pytest.mark.parametrize("avg", [MIN_AVG, 2048, MAX_AVG])
@pytest.mark.parametrize("kind", ["random", "periodic", "zeros"])
def test_two_processes_chunk_a_file_exactly_as_one(avg, kind, tmp_path):
    """Same sizes, digests, whole digest and byte count as chunk_stream, whatever the content:
    random (the halves meet after a chunk or two), a short period (boundaries repeat) and zeros
    (no content-defined boundary at all: only the maximum size cuts)."""
    r = random.Random(hash((avg, kind)) & 0xFFFF)
    for size in (1 << 20, (3 << 20) + 777, 6 << 20):
        data = {"random": lambda: r.randbytes(size),
                "periodic": lambda: (r.randbytes(3000) * (size // 3000 + 1))[:size],
                "zeros": lambda: bytes(size)}[kind]()
        p = tmp_path / f"{kind}-{size}"
        p.write_bytes(data)
        with open(p, "rb", buffering=0) as f:
            want = chunk_stream(f, avg)
        assert _parallel(p, avg) == want


def test_two_processes_without_a_usable_child_chunk_alone(tmp_path):
    """No fork (None: the caller chunks), or a child that sends nothing (this process goes on
    to the end by itself): the result is still chunk_stream's."""
    from dirsync.state import fork_answering

    p = tmp_path / "f"
    p.write_bytes(random.Random(7).randbytes(3 << 20))
    with open(p, "rb", buffering=0) as f:
        want = chunk_stream(f, 2048)
    assert _parallel(p, 2048, fork=lambda work: None) is None
    assert _parallel(p, 2048, fork=lambda work: fork_answering(lambda fd: None)) == want


def test_a_large_file_is_scanned_by_two_processes_alike(tmp_path, monkeypatch):
    """scan_tree uses both processes for files of PARALLEL_MIN bytes or more; the entries are
    those of a scan by one process."""
    from dirsync.scan import scan_tree

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "big.bin").write_bytes(random.Random(8).randbytes(5 << 20))
    one = scan_tree(str(tmp_path / "t")).manifest.entries
    calls = []
    real = chunking.chunk_file_parallel
    monkeypatch.setattr(chunking, "PARALLEL_MIN", 1 << 20)
    monkeypatch.setattr(chunking, "chunk_file_parallel", lambda *a: calls.append(a[1]) or real(*a))
    two = scan_tree(str(tmp_path / "t")).manifest.entries
    assert calls == [5 << 20]
    assert two["big.bin"].sizes == one["big.bin"].sizes and two["big.bin"].digests == one["big.bin"].digests
    assert two["big.bin"].digest == one["big.bin"].digest


def test_a_large_file_is_chunked_by_two_processes_while_another_thread_holds_a_lock(tmp_path, monkeypatch):
    """As on a master whose paramiko thread runs (or an agent with its pinger): the child only
    reads, chunks and writes its pipe, so it forks anyway, and the lock the other thread holds
    does not stop it (a child that took it would hang, and this test with it)."""
    import threading

    from dirsync.scan import scan_tree

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "big.bin").write_bytes(random.Random(10).randbytes(5 << 20))
    one = scan_tree(str(tmp_path / "t")).manifest.entries
    held, stop = threading.Lock(), threading.Event()

    def busy() -> None:
        with held:
            stop.wait(60)

    th = threading.Thread(target=busy, daemon=True)
    th.start()
    forked = []
    real = chunking.chunk_file_parallel

    def spy(fd, size, avg, fork):
        return real(fd, size, avg, lambda work: forked.append(fork(work)) or forked[-1])

    monkeypatch.setattr(chunking, "PARALLEL_MIN", 1 << 20)
    monkeypatch.setattr(chunking, "chunk_file_parallel", spy)
    try:
        assert threading.active_count() > 1
        two = scan_tree(str(tmp_path / "t")).manifest.entries
    finally:
        stop.set()
        th.join()
    assert len(forked) == 1 and forked[0] is not None, "no second process"
    assert (two["big.bin"].sizes, two["big.bin"].digests, two["big.bin"].digest) == \
        (one["big.bin"].sizes, one["big.bin"].digests, one["big.bin"].digest)


def test_a_child_that_dies_mid_answer_leaves_the_work_to_this_process(tmp_path):
    """A truncated answer (a child killed while writing) is no answer: the result is still
    chunk_stream's, with no exception."""
    from dirsync.state import fork_answering

    p = tmp_path / "f"
    p.write_bytes(random.Random(9).randbytes(3 << 20))
    with open(p, "rb", buffering=0) as f:
        want = chunk_stream(f, 2048)
    real = os.write

    def dying(work):
        def half(fd: int) -> None:
            def write_then_die(fd, data):  # the child writes part of its answer, then dies
                real(fd, bytes(data[:13]))
                raise OSError("killed")

            os.write = write_then_die
            work(fd)
        return fork_answering(half)

    assert _parallel(p, 2048, fork=dying) == want
