"""Manifest data and its on-disk form: round-trips, rejection of bad bytes, Merkle digests."""

from __future__ import annotations

import os

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirsync.manifest import (
    FORMAT_VERSION,
    MAGIC,
    DirEntry,
    FileEntry,
    LinkEntry,
    Manifest,
    ManifestFormatError,
    encode_rows,
    load,
    pack_sizes,
    parent_of,
    from_bytes,
    to_bytes,
    tree_digests,
    unpack_sizes,
)

try:
    from strategies import any_manifests, file_entry, manifests
except ImportError:  # tests/ imported as a package
    from tests.strategies import any_manifests, file_entry, manifests

CHUNKER = "test-chunker/v1"
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cache_facts(m: Manifest) -> dict:
    return {p: (e.ino, e.ctime_ns, e.trusted) for p, e in m.entries.items() if isinstance(e, FileEntry)}


@SETTINGS
@given(any_manifests(), st.booleans(), st.booleans())
def test_round_trip(m, own, packed):
    """Both decoders (peer rows fully checked; our own cache files, cheaper) give back the same,
    from both row forms (format 2: chunk sizes as ints; 4, cache files: packed, row index)."""
    data = to_bytes(m, CHUNKER, packed=packed)
    assert data[len(MAGIC)] == (4 if packed else 2) and size_forms(data) <= ({bytes, list} if packed else {list})
    back = load(data, CHUNKER, own=own).manifest
    assert back == m
    assert back.keys() == m.keys()
    # Fields left out of equality (the cache facts) must survive too: the scanner relies on them.
    assert cache_facts(back) == cache_facts(m)
    # Paths keep their exact bytes, also when they are not UTF-8.
    assert sorted(os.fsencode(p) for p in back.entries) == sorted(os.fsencode(p) for p in m.entries)


def size_forms(data: bytes) -> set:
    """The Python types the file rows of a format 2/3/4 manifest hold their chunk sizes in."""
    rest = data[len(MAGIC) + 9:]
    at = 4 + int.from_bytes(rest[:4], "little")
    if data[len(MAGIC)] == 4:  # (the row index)
        at += 4 + int.from_bytes(rest[at:at + 4], "little")
    _, rows, _ = msgpack.unpackb(rest[at:])
    return {type(r[7]) for r in rows if r[0] == 0}


@SETTINGS
@given(st.lists(st.integers(1, (1 << 16) - 1)) | st.lists(st.integers(1, (1 << 32) - 1), min_size=1))
def test_packed_sizes_round_trip(sizes):
    raw = pack_sizes(tuple(sizes))
    assert raw is not None and len(raw) == (2 if max(sizes, default=0) < 1 << 16 else 4) * len(sizes)
    assert unpack_sizes(raw, len(sizes)) == tuple(sizes)
    with pytest.raises(ValueError):
        unpack_sizes(raw + b"\0", len(sizes))
    assert pack_sizes((*sizes, 1 << 32)) is None  # kept as ints in the row


def test_cache_rows_pack_their_sizes():
    m = Manifest({"a": file_entry("a", [0, 1]), "b": file_entry("b", [2]), "c": file_entry("c", [])})
    assert size_forms(to_bytes(m, CHUNKER, packed=True)) == {bytes}


def test_packed_sizes_are_unpacked_on_first_use_only():
    e = file_entry("f", [0, 1, 2])
    back = load(to_bytes(Manifest({"f": e}), CHUNKER, packed=True), CHUNKER, own=True).manifest.entries["f"]
    assert isinstance(back.held_sizes, bytes) and back.nchunks == 3
    assert back.sizes == e.sizes and back.held_sizes == e.sizes  # unpacked once, then kept
    assert back == e and hash(back) == hash(e)


def sample_manifest() -> Manifest:
    bad = os.fsdecode(b"caf\xe9-\xff")  # Latin-1 bytes: not UTF-8
    return Manifest({
        "": DirEntry("", 0o755, 1),
        "docs": DirEntry("docs", 0o700, 2),
        "docs/café.txt": file_entry("docs/café.txt", [0, 1, 2], 0o644, 3),
        bad: file_entry(bad, [3], 0o600, 4),
        "docs/empty": file_entry("docs/empty", [], 0o644, 5),
        "link": LinkEntry("link", os.fsdecode(b"docs/\xfe"), 6),
    })


def test_non_utf8_round_trip_exact():
    m = sample_manifest()
    back = from_bytes(to_bytes(m, CHUNKER), CHUNKER)
    assert back == m
    assert os.fsencode(back.entries["link"].target) == b"docs/\xfe"
    assert b"caf\xe9-\xff" in {os.fsencode(p) for p in back.entries}


def test_encoding_is_deterministic():
    m = sample_manifest()
    assert to_bytes(m, CHUNKER) == to_bytes(Manifest(dict(m.entries)), CHUNKER)


def test_wrong_chunker_rejected():
    data = to_bytes(sample_manifest(), CHUNKER)
    with pytest.raises(ManifestFormatError, match="chunker"):
        from_bytes(data, "other-chunker/v2")


def test_wrong_version_rejected():
    data = bytearray(to_bytes(sample_manifest(), CHUNKER))
    data[len(MAGIC)] = FORMAT_VERSION + 1
    with pytest.raises(ManifestFormatError, match="version"):
        from_bytes(bytes(data), CHUNKER)


@pytest.mark.parametrize("data", [b"", b"DSYNC", MAGIC, b"not a manifest at all, just text", b"\0" * 64])
def test_garbage_rejected(data):
    with pytest.raises(ManifestFormatError):
        from_bytes(data, CHUNKER)


def test_every_truncation_rejected():
    data = to_bytes(sample_manifest(), CHUNKER)
    for n in range(len(data)):
        with pytest.raises(ManifestFormatError):
            from_bytes(data[:n], CHUNKER)


def test_every_single_byte_corruption_rejected():
    data = to_bytes(sample_manifest(), CHUNKER)
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= flip
            with pytest.raises(ManifestFormatError):
                from_bytes(bytes(bad), CHUNKER)


def test_trailing_garbage_rejected():
    data = to_bytes(sample_manifest(), CHUNKER)
    with pytest.raises(ManifestFormatError):
        from_bytes(data + b"\0", CHUNKER)


def forge(rows, chunker: str = CHUNKER, version: int = FORMAT_VERSION) -> bytes:
    """Bytes with a valid header and checksum around an arbitrary body (what a buggy writer or a
    hostile peer could produce): only the body validation stands in the way. Version 1 (no
    header, still read) or the current one (a header the rows are not checked against)."""
    body = msgpack.packb((chunker, rows), use_bin_type=True)
    if version == 1:
        return MAGIC + b"\x01" + xxhash.xxh3_64_digest(body) + body
    header = msgpack.packb((chunker, "", b"", 0), use_bin_type=True)
    rest = len(header).to_bytes(4, "little") + header + (b"\0\0\0\0" if version >= 4 else b"") + body  # (no index)
    # from format 3 on, the checksum covers the version byte too
    check = xxhash.xxh3_64_digest(bytes([version]) + rest if version >= 3 else rest)
    return MAGIC + bytes([version]) + check + rest


def good_file_row(path=b"f"):
    (row,) = encode_rows([file_entry(os.fsdecode(path), [0, 1])])
    return list(row)


def packed_row(row):
    return _with(row, 7, pack_sizes(tuple(row[7])))


@pytest.mark.parametrize("version", [1, 2, 3, FORMAT_VERSION])
@pytest.mark.parametrize("own", [False, True])
def test_forged_valid_body_accepted(version, own):
    # The control for the cases below: forge() itself makes readable manifests.
    rows = [good_file_row(), packed_row(good_file_row(b"p")), (1, b"d", 0o755, 1), (2, b"l", b"t", 1)]
    m = load(forge(rows, version=version), CHUNKER, own=own).manifest
    assert set(m.entries) == {"f", "p", "d", "l"} and m.entries["p"].sizes == m.entries["f"].sizes


def test_own_cache_rows_still_have_their_paths_checked():
    for bad in (b"../escape", b"/abs", b"a//b", b"a\0b"):
        with pytest.raises(ManifestFormatError):
            load(forge([_with(good_file_row(), 1, bad)]), CHUNKER, own=True).manifest


def test_own_cache_rows_have_the_length_of_packed_sizes_checked():
    with pytest.raises(ManifestFormatError):
        load(forge([_with(good_file_row(), 7, b"\x0d\0\0")]), CHUNKER, own=True).manifest


def _with(row, i, value):
    row = list(row)
    row[i] = value
    return row


@pytest.mark.parametrize("rows", [
    [_with(good_file_row(), 1, b"../escape")],
    [_with(good_file_row(), 1, b"/abs")],
    [_with(good_file_row(), 1, b"a//b")],
    [_with(good_file_row(), 1, b"a\0b")],
    [_with(good_file_row(), 2, 999)],  # sizes do not sum to size
    [_with(good_file_row(), 5, b"short")],  # whole digest of the wrong length
    [_with(good_file_row(), 8, b"\0" * 7)],  # chunk digests of the wrong length
    [_with(good_file_row(), 7, [0, 13])],  # a zero-size chunk
    [_with(good_file_row(), 7, b"\0\0\x0d\0")],  # a zero-size chunk, packed
    [_with(good_file_row(), 7, b"\x0d\0\0")],  # packed sizes of the wrong length
    [_with(good_file_row(), 3, "0644")],  # mode not an int
    [good_file_row()[:5]],  # short row
    [(1, b"d", "rwx", 1)],
    [(2, b"l", b"", 1)],  # empty link target
    [(2, b"l", b"a\0b", 1)],
    [(7, b"x", 1, 2)],  # unknown entry type
    "not a list of rows",
    [None],
])
@pytest.mark.parametrize("version", [1, 2, 3, FORMAT_VERSION])
def test_forged_bad_body_rejected(rows, version):
    with pytest.raises(ManifestFormatError):
        from_bytes(forge(rows, version=version), CHUNKER)


# -- tree_digests -----------------------------------------------------------------------


def tree() -> Manifest:
    return Manifest({
        "": DirEntry("", 0o755, 1),
        "a": DirEntry("a", 0o755, 2),
        "a/b": DirEntry("a/b", 0o755, 3),
        "a/b/f": file_entry("a/b/f", [0, 1], 0o644, 4),
        "a/b/l": LinkEntry("a/b/l", "f", 5),
        "a/g": file_entry("a/g", [2], 0o644, 6),
        "z": DirEntry("z", 0o755, 7),
        "z/h": file_entry("z/h", [3], 0o644, 8),
    })


def changed(m: Manifest, path: str, **kw) -> Manifest:
    e = dict(m.entries)
    e[path] = e[path].replace(**kw)
    return Manifest(e)


def other_content(e: FileEntry) -> FileEntry:
    return file_entry(e.path, [4]).replace(mode=e.mode, mtime_ns=e.mtime_ns)


MUTATIONS = [
    ("file content", lambda m: Manifest({**m.entries, "a/b/f": other_content(m.entries["a/b/f"])}), "a/b/f"),
    ("file digest only", lambda m: changed(m, "a/b/f", digest=b"\1" * 16), "a/b/f"),
    ("file mode", lambda m: changed(m, "a/b/f", mode=0o600), "a/b/f"),
    ("file mtime", lambda m: changed(m, "a/b/f", mtime_ns=44), "a/b/f"),
    ("link target", lambda m: changed(m, "a/b/l", target="g"), "a/b/l"),
    ("link mtime", lambda m: changed(m, "a/b/l", mtime_ns=55), "a/b/l"),
    ("dir mode", lambda m: changed(m, "a/b", mode=0o700), "a/b/x"),
    ("dir mtime", lambda m: changed(m, "a/b", mtime_ns=33), "a/b/x"),
    ("new file", lambda m: Manifest({**m.entries, "a/b/n": file_entry("a/b/n", [])}), "a/b/n"),
    ("removed file", lambda m: Manifest({p: e for p, e in m.entries.items() if p != "a/b/f"}), "a/b/f"),
    ("file becomes link", lambda m: Manifest({**m.entries, "a/b/f": LinkEntry("a/b/f", "x", 4)}), "a/b/f"),
]


@pytest.mark.parametrize("name,mutate,where", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_tree_digests_change_up_the_path_only(name, mutate, where):
    m = tree()
    before = tree_digests(m)
    after = tree_digests(mutate(m))
    assert set(before) == {"", "a", "a/b", "z"}
    # Every directory above the change sees it ...
    for d in ("", "a", "a/b"):
        assert after[d] != before[d], f"{name}: digest of {d!r} did not change"
    # ... and a directory beside it does not.
    assert after["z"] == before["z"]


def test_tree_digests_ignore_cache_facts_and_rebuild():
    m = tree()
    m2 = changed(m, "a/b/f", ino=99, ctime_ns=12345, trusted=True)
    assert tree_digests(m2) == tree_digests(m)
    assert tree_digests(Manifest(dict(reversed(list(m.entries.items()))))) == tree_digests(m)


def test_tree_digests_rename_changes_digest():
    m = tree()
    e = dict(m.entries)
    f = e.pop("a/g")
    e["a/h"] = f.replace(path="a/h")
    after = tree_digests(Manifest(e))
    assert after["a"] != tree_digests(m)["a"]


def test_tree_digests_deep_tree():
    # No recursion limit on deep trees (1500 levels: a path still under check_relpath's 4096 chars).
    e = {"": DirEntry("", 0o755, 0)}
    p = ""
    for _ in range(1500):
        p = f"{p}/d" if p else "d"
        e[p] = DirEntry(p, 0o755, 0)
    e[p + "/f"] = file_entry(p + "/f", [0])
    out = tree_digests(Manifest(e))
    assert len(out) == 1501
    assert out[p] != out[parent_of(p)]


@SETTINGS
@given(any_manifests(), st.data())
def test_keys_differ_exactly_when_entry_facts_differ(m, data):
    # entry_key (what the planner compares) sees content and metadata, never cache facts.
    files = [e for e in m.entries.values() if isinstance(e, FileEntry)]
    if not files:
        return
    f = data.draw(st.sampled_from(files))
    cache_only = Manifest({**m.entries, f.path: f.replace(ino=f.ino + 1, ctime_ns=f.ctime_ns + 1,
                                                        trusted=not f.trusted)})
    assert cache_only.keys() == m.keys()
    touched = Manifest({**m.entries, f.path: f.replace(mtime_ns=f.mtime_ns + 1)})
    assert touched.keys() != m.keys()


@settings(max_examples=300, deadline=None)
@given(manifests(), manifests())
def test_root_digest_equal_exactly_when_trees_equal(m1, m2):
    # verify compares trees by their root digest: it must see every difference entry_key sees.
    same = m1.keys() == m2.keys()
    assert (tree_digests(m1)[""] == tree_digests(m2)[""]) == same
    if same:
        assert tree_digests(m1) == tree_digests(m2)


# -- saving again from the rows a cache was decoded from -----------------------------------


def _edit(m: Manifest, other: Manifest, data) -> dict:
    """`m`'s entries after random edits: drops, entries of `other` (new paths or replacing),
    and equal-but-new objects (which must be encoded again, not copied)."""
    out = dict(m.entries)
    for p in data.draw(st.lists(st.sampled_from(sorted(out)), unique=True)) if out else ():
        how = data.draw(st.sampled_from(("drop", "copy", "touch")))
        if how == "drop":
            del out[p]
        elif how == "copy":
            out[p] = out[p].replace()
        elif isinstance(out[p], FileEntry):
            out[p] = out[p].replace(ino=out[p].ino + 1, trusted=not out[p].trusted)
        else:
            out[p] = out[p].replace(mtime_ns=out[p].mtime_ns + 1)
    for p, e in other.entries.items():
        if data.draw(st.booleans()):
            out[p] = e
    return out


def _skipped_row_offsets(body) -> list[int]:
    """Where each row of a manifest body starts (and the last ends), found by skipping rows."""
    up = msgpack.Unpacker(max_buffer_size=len(body) + 1)
    up.feed(body)
    up.read_array_header()
    up.skip()  # the chunker
    offs = []
    for _ in range(up.read_array_header()):
        offs.append(up.tell())
        up.skip()
    offs.append(up.tell())
    return offs


@SETTINGS
@given(any_manifests(), any_manifests(), st.data())
def test_save_reusing_rows_decodes_to_the_entries(m, other, data):
    """A manifest saved from another one's decoded rows (entries that are still the same
    objects copied as bytes) reads back exactly as if every row had been encoded."""
    was_packed, packed = data.draw(st.booleans()), data.draw(st.booleans())
    decoded = load(to_bytes(m, CHUNKER, packed=was_packed), CHUNKER, own=True).manifest
    assert decoded.rows is not None
    # The row offsets noted while decoding are those found by skipping the rows.
    src = decoded.rows
    assert list(src.offs) == _skipped_row_offsets(src.body)
    # Saved again unchanged: the very bytes an encode of every row gives.
    assert to_bytes(Manifest(dict(decoded.entries), generation="g", rows=src), CHUNKER, b"f", packed=was_packed) \
        == to_bytes(Manifest(dict(decoded.entries), generation="g"), CHUNKER, b"f", packed=was_packed)
    edited = _edit(decoded, other, data)
    saved = to_bytes(Manifest(edited, generation="g2", rows=decoded.rows), CHUNKER, b"fp", packed=packed)
    # a file of either format holds rows of its own form only (copied rows of the other are not)
    assert size_forms(saved) <= ({bytes, list} if packed else {list})  # (list: a chunk of 4 GiB or more)
    back = load(saved, CHUNKER, own=data.draw(st.booleans()))
    assert back.fingerprint == b"fp" and back.generation == "g2" and back.count == len(edited)
    assert back.manifest.entries == edited and back.manifest.generation == "g2"
    assert cache_facts(back.manifest) == cache_facts(Manifest(edited))
    # Rows of another chunker are never copied.
    other_chunker = to_bytes(Manifest(edited, rows=decoded.rows), "other/v1")
    assert load(other_chunker, "other/v1").manifest.entries == edited


def test_rows_are_kept_only_for_own_caches_decoded_whole():
    m = sample_manifest()
    assert load(to_bytes(m, CHUNKER), CHUNKER, own=False).manifest.rows is None  # peer bytes
    assert load(to_bytes(m, CHUNKER), CHUNKER, own=True).manifest.rows is not None


def test_rows_stay_paired_with_their_entries_when_the_decoded_dict_changes():
    """Code that edits a decoded cache's dict in place (drops a path, puts another object at
    one) must not shift which row bytes a later save copies for which entry."""
    m = sample_manifest()
    decoded = load(to_bytes(m, CHUNKER), CHUNKER, own=True).manifest
    paths = sorted(p for p in decoded.entries if p)
    del decoded.entries[paths[0]]  # in place: the dict the rows were decoded into
    f = next(p for p in paths[1:] if isinstance(decoded.entries[p], FileEntry))
    decoded.entries[f] = decoded.entries[f].replace(ino=decoded.entries[f].ino + 99, trusted=True)
    edited = dict(decoded.entries)
    back = load(to_bytes(Manifest(edited, rows=decoded.rows), CHUNKER), CHUNKER).manifest
    assert back.entries == edited and cache_facts(back) == cache_facts(Manifest(edited))


def test_a_large_cache_file_is_mapped_and_outlives_its_replacement(tmp_path):
    """Caches of MAP_MIN bytes or more are mapped, not read (state._map_or_read). The rows
    decode, and a later save copies row bytes from the mapping, even after the file was
    replaced (as every save replaces it: by rename); a corrupted file is still refused."""
    import mmap

    from dirsync.state import MAP_MIN, load_manifest_file, save_manifest_file, write_atomic

    entries = {"": DirEntry("", 0o755, 1)}
    for i in range(3000):
        e = file_entry(f"d{i % 7}/f{i}", [i % 5, (i + 1) % 5])
        entries[e.path] = e.replace(ino=i + 1, ctime_ns=5, trusted=True)
    for d in range(7):
        entries[f"d{d}"] = DirEntry(f"d{d}", 0o755, 1)
    path = str(tmp_path / "manifest")
    save_manifest_file(path, Manifest(entries), CHUNKER)
    assert os.path.getsize(path) >= MAP_MIN
    got = load_manifest_file(path, CHUNKER, lazy=True)
    assert got.status == "ok" and isinstance(got.saved._body.obj, mmap.mmap)

    save_manifest_file(path, Manifest({"": DirEntry("", 0o700, 2)}), CHUNKER)  # replaced underneath
    decoded = got.saved.manifest
    assert decoded.entries == entries and cache_facts(decoded) == cache_facts(Manifest(entries))
    edited = dict(decoded.entries)
    edited["d1/f1"] = edited["d1/f1"].replace(mtime_ns=7)
    save_manifest_file(path, Manifest(edited, rows=decoded.rows), CHUNKER)  # rows copied from the map
    back = load_manifest_file(path, CHUNKER)
    assert back.status == "ok" and back.saved.manifest.entries == edited

    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40
    write_atomic(path, bytes(data))
    assert load_manifest_file(path, CHUNKER, lazy=True).status == "unusable"


def test_a_saved_cache_is_written_from_pieces_byte_for_byte(tmp_path):
    """save_manifest_file writes to_pieces() without joining them (views of the mapped old
    file among them): the file is exactly what to_bytes gives, for a fresh encode and for one
    copying most rows from the old file."""
    from dirsync.manifest import to_pieces
    from dirsync.state import load_manifest_file, save_manifest_file

    entries = {"": DirEntry("", 0o755, 1)}
    for i in range(3000):
        e = file_entry(f"d{i % 7}/f{i}", [i % 5, (i + 1) % 5])
        entries[e.path] = e.replace(ino=i + 1, ctime_ns=5, trusted=True)
    path = str(tmp_path / "manifest")
    save_manifest_file(path, Manifest(entries), CHUNKER, b"fp")
    with open(path, "rb") as f:
        assert f.read() == to_bytes(Manifest(entries), CHUNKER, b"fp", packed=True)
    decoded = load_manifest_file(path, CHUNKER, lazy=True).saved.manifest
    edited = dict(decoded.entries)
    for i in range(0, 3000, 97):
        p = f"d{i % 7}/f{i}"
        edited[p] = edited[p].replace(mtime_ns=9)
    m = Manifest(edited, rows=decoded.rows)
    pieces = to_pieces(m, CHUNKER, b"fp2", packed=True)
    assert len(pieces) > 60 and any(isinstance(p, memoryview) for p in pieces)
    save_manifest_file(path, m, CHUNKER, b"fp2")
    with open(path, "rb") as f:
        assert f.read() == b"".join(pieces) == to_bytes(Manifest(edited), CHUNKER, b"fp2", packed=True)


def test_write_pieces_goes_on_after_short_writes():
    """A writev cut short (here by signals while a slow reader drains a pipe) writes the rest,
    in order, from where it stopped."""
    import signal
    import threading

    from dirsync.state import write_pieces

    pieces = [bytes([i % 251]) * (1000 + 37 * i) for i in range(1500)]  # more than one writev's worth
    want = b"".join(pieces)
    r, w = os.pipe()
    got: list[bytes] = []
    counts: list[int] = []

    def drain():
        while b := os.read(r, 4096):
            got.append(b)

    real_writev = os.writev

    def counting_writev(fd, bufs):
        n = real_writev(fd, bufs)
        counts.append(int(n < sum(len(b) for b in bufs)))
        return n

    old = signal.signal(signal.SIGALRM, lambda *a: None)
    reader = threading.Thread(target=drain)
    reader.start()
    try:
        os.writev = counting_writev
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        write_pieces(w, pieces)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
        os.writev = real_writev
        os.close(w)
        reader.join(10)
        os.close(r)
    assert b"".join(got) == want
    assert sum(counts) >= 1, "no write was cut short: the test proved nothing"


def test_changed_entries_skips_shared_objects_and_finds_every_difference():
    """changed_entries(old, new): what `new` adds or holds otherwise, whether the entry is the
    same object (skipped unexamined), an equal copy (not reported), or another value."""
    from dirsync.manifest import DirEntry, FileEntry, LinkEntry, changed_entries

    f = FileEntry("a", 3, 0o644, 5, b"d" * 16, 3, (3,), b"d" * 16)
    d = DirEntry("d", 0o755, 7)
    link = LinkEntry("l", "a", 9)
    old = {"a": f, "d": d, "l": link, "gone": DirEntry("gone", 0o755, 1)}
    new = {"a": f, "d": DirEntry("d", 0o755, 7), "l": LinkEntry("l", "b", 9),
           "n": FileEntry("n", 0, 0o644, 1, b"e" * 16, 0, (), b"")}
    assert {e.path for e in changed_entries(old, new)} == {"l", "n"}
    assert changed_entries(old, dict(old)) == []
    assert [e.path for e in changed_entries(old, {**old, "a": f.replace(mode=0o600)})] == ["a"]


# -- the row index (format 4) and the Overlay over it ------------------------------------


def _saved_with_index(m: Manifest, fp: bytes = b""):
    saved = load(to_bytes(m, CHUNKER, fp, packed=True), CHUNKER, own=True)
    rows = saved.rows()
    assert rows is not None and rows.paths == list(m.entries)
    return saved, rows


@SETTINGS
@given(any_manifests(), any_manifests(), st.data())
def test_an_overlay_reads_and_changes_like_a_dict_and_saves_what_it_holds(m, other, data):
    """Overlay (Replica.current over a cache read row by row) against a dict model: the same
    lookups, membership, length, contents and changes after random edits; saved, it reads back
    as the model (rows copied and encoded alike); its fingerprint is the model's."""
    from dirsync.manifest import Overlay, fingerprint

    fp = fingerprint(m.entries)
    saved, rows = _saved_with_index(m, fp)
    ov, model = Overlay(rows), dict(m.entries)
    for p in model:  # every row decodes to its entry, cache facts included
        assert ov.get(p) == model[p] and cache_facts(Manifest({p: ov.get(p)})) == cache_facts(Manifest({p: model[p]}))
    ov, model = Overlay(rows), dict(m.entries)  # (fresh: nothing decoded yet)
    edited = _edit(m, other, data)
    for p in [p for p in model if p not in edited]:
        assert ov.pop(p) is not None
        del model[p]
    for p, e in edited.items():
        if model.get(p) is not e:
            ov[p] = model[p] = e
    if data.draw(st.booleans()) and edited:  # a path dropped and set again
        p = data.draw(st.sampled_from(sorted(edited)))
        e = ov.pop(p)
        assert p not in ov and ov.get(p) is None and ov.pop(p, "none") == "none"
        with pytest.raises(KeyError):
            ov[p]  # noqa: B018
        ov[p] = e
    assert len(ov) == len(model) and bool(ov) == bool(model)
    assert set(ov) == set(model) and ov == model and dict(ov.items()) == model
    for p in list(model) + ["not/there"]:
        assert (p in ov) == (p in model) and ov.get(p) == model.get(p)
    changed, gone = ov.changes()
    assert sorted(e.path for e in changed) == sorted(p for p, e in model.items() if m.entries.get(p) != e)
    assert sorted(gone) == sorted(p for p in m.entries if p not in model)
    # (conservative: a path dropped and set again, or set to an equal entry, counts as changed)
    assert ov.changed() >= bool(changed or gone)
    assert not Overlay(rows).changed()
    assert ov.fingerprint(fp) == fingerprint(model)
    back = load(to_bytes(Manifest(ov, generation="g2"), CHUNKER, b"fp2", packed=True), CHUNKER, own=True)
    assert back.count == len(model) and back.rows() is not None and set(back.rows().paths) == set(model)
    again = Overlay(back.rows())
    assert again == model and cache_facts(Manifest(dict(again.items()))) == cache_facts(Manifest(model))
    assert back.manifest.entries == model and cache_facts(back.manifest) == cache_facts(Manifest(model))


def test_the_row_index_is_checked_against_the_rows():
    """A row index that does not fit its body is not used (the whole body is then decoded, and
    it reports what is wrong); a row that is not the one the index names is refused."""
    m = sample_manifest()
    data = bytearray(to_bytes(m, CHUNKER, packed=True))
    saved = load(bytes(data), CHUNKER, own=True)
    rows = saved.rows()
    assert rows is not None and len(rows.paths) == len(m.entries) > 2
    # The index pointing one row further along: row 0 is then not the row of paths[0].
    shifted = type(rows)(rows.body, rows.offs[1:] + rows.offs[-1:], rows.paths, CHUNKER, True)
    with pytest.raises(ManifestFormatError):
        shifted.entry(0)
    # Peer bytes and manifests decoded whole have no rows to read one by one.
    assert load(bytes(data), CHUNKER, own=False).rows() is None
    saved.manifest  # noqa: B018
    assert saved.rows() is None
    # An index whose counts do not match: not used; the body still decodes.
    bad = _with_index(bytes(data), lambda paths, offs: (paths, offs[:-8]))
    assert load(bad, CHUNKER, own=True).rows() is None and load(bad, CHUNKER, own=True).manifest == m
    twice = _with_index(bytes(data), lambda paths, offs: (paths.replace(b"\0link", b"\0docs", 1), offs))
    assert load(twice, CHUNKER, own=True).rows() is None and load(twice, CHUNKER, own=True).manifest == m


def _with_index(data: bytes, change) -> bytes:
    """A format 4 file with its row index changed (and its checksum made valid again)."""
    rest = data[len(MAGIC) + 9:]
    at = 4 + int.from_bytes(rest[:4], "little")
    ilen = int.from_bytes(rest[at:at + 4], "little")
    paths, offs = msgpack.unpackb(rest[at + 4:at + 4 + ilen])
    index = msgpack.packb(change(paths, offs), use_bin_type=True)
    rest = rest[:at] + len(index).to_bytes(4, "little") + index + rest[at + 4 + ilen:]
    return MAGIC + b"\x04" + xxhash.xxh3_64_digest(b"\x04" + rest) + rest
