"""Hypothesis strategies for manifests, shared by the unit/property tests.

Planner manifests use a tiny world so that overlaps really happen: names from {a, b, c},
depth <= 3, and chunk contents from a small pool. Every chunk digest stands for real bytes
(`CHUNK_POOL`), so a test can rebuild any file's content (`content_of`) and check that a
CopyOp really points at the bytes it claims. One pool entry is the concatenation of two
others, so two files can hold the same bytes with different chunk lists.
"""

from __future__ import annotations

import os

import xxhash
from hypothesis import strategies as st

from dirsync.manifest import DIGEST_SIZE, DirEntry, Entry, FileEntry, LinkEntry, Manifest, parent_of

_BASE = [b"alpha-", b"bravo!!", b"c", b"delta delta delta", b"echo-echo"]
CHUNK_POOL: tuple[bytes, ...] = tuple(_BASE + [_BASE[0] + _BASE[1]])  # last = alpha-bravo!! as one chunk


def digest(data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


CONTENT_BY_DIGEST: dict[bytes, bytes] = {digest(c): c for c in CHUNK_POOL}
assert len(CONTENT_BY_DIGEST) == len(CHUNK_POOL)

NAMES = "abc"
MAX_DEPTH = 3
FILE_MODES = (0o644, 0o755)
DIR_MODES = (0o755, 0o700)
MTIMES = (1_000_000_000, 2_000_000_000)
LINK_TARGETS = ("a", "b/c", "../x")


def file_entry(path: str, chunk_ids, mode: int = 0o644, mtime_ns: int = MTIMES[0], avg: int = 512) -> FileEntry:
    """A FileEntry whose chunks are CHUNK_POOL[i] for i in chunk_ids (sizes tile the file)."""
    parts = [CHUNK_POOL[i] for i in chunk_ids]
    data = b"".join(parts)
    return FileEntry(path, len(data), mode, mtime_ns, digest(data), avg if parts else 0,
                     tuple(len(p) for p in parts), b"".join(digest(p) for p in parts))


def content_of(e: FileEntry) -> bytes:
    """The bytes a generated FileEntry stands for."""
    out = b"".join(CONTENT_BY_DIGEST[e.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]] for i in range(len(e.sizes)))
    assert len(out) == e.size and digest(out) == e.digest
    return out


def chunk_ids_of(m: Manifest) -> set[int]:
    """Pool indices of every chunk some file of `m` holds."""
    ids = {digest(c): i for i, c in enumerate(CHUNK_POOL)}
    out = set()
    for f in m.files():
        for _off, _n, d in f.chunks():
            out.add(ids[d])
    return out


@st.composite
def manifests(draw, pool: tuple[int, ...] | None = None, root: bool = True, names=NAMES) -> Manifest:
    """A consistent tree (every entry's parent is a directory in it) over `names` ({a,b,c}).

    `pool`: chunk indices files may use (default: all of CHUNK_POOL)."""
    ids = tuple(range(len(CHUNK_POOL))) if pool is None else tuple(pool)
    entries: dict[str, Entry] = {}
    if root:
        entries[""] = DirEntry("", draw(st.sampled_from(DIR_MODES)), draw(st.sampled_from(MTIMES)))

    def fill(prefix: str, depth: int) -> None:
        for name in names:
            if not draw(st.booleans()):
                continue
            path = prefix + name
            kind = draw(st.sampled_from("fdl" if depth < MAX_DEPTH else "fl"))
            if kind == "d":
                entries[path] = DirEntry(path, draw(st.sampled_from(DIR_MODES)), draw(st.sampled_from(MTIMES)))
                fill(path + "/", depth + 1)
            elif kind == "l":
                entries[path] = LinkEntry(path, draw(st.sampled_from(LINK_TARGETS)), draw(st.sampled_from(MTIMES)))
            else:
                chunks = draw(st.lists(st.sampled_from(ids), max_size=4)) if ids else []
                entries[path] = file_entry(path, chunks, draw(st.sampled_from(FILE_MODES)),
                                           draw(st.sampled_from(MTIMES)), draw(st.sampled_from((0, 512, 1024))))

    fill("", 1)
    return Manifest(entries)


@st.composite
def protect_sets(draw, master: Manifest, replica: Manifest) -> frozenset[str]:
    """Paths a master scan could have failed on: each one's parent is a directory in the master
    (the scanner records an error for an entry it found while listing a directory it read)."""
    cands = sorted(p for p in set(master.entries) | set(replica.entries)
                   if p and isinstance(master.entries.get(parent_of(p)), DirEntry))
    if not cands:
        return frozenset()
    return frozenset(draw(st.lists(st.sampled_from(cands), max_size=3)))


# -- manifests for the serialisation tests (any valid path, incl. non-UTF-8 names) --------

_component_bytes = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b
                                                            and b not in (b".", b".."))
_relpaths = st.lists(_component_bytes, min_size=1, max_size=4).map(lambda cs: os.fsdecode(b"/".join(cs)))
_ints = st.integers(min_value=0, max_value=2**63 - 1)
_mtimes = st.integers(min_value=-(2**62), max_value=2**63 - 1)
_digests = st.binary(min_size=DIGEST_SIZE, max_size=DIGEST_SIZE)


@st.composite
def any_file(draw, path: str) -> FileEntry:
    sizes = tuple(draw(st.lists(st.integers(1, 1 << 40), max_size=5)))
    digests = b"".join(draw(_digests) for _ in sizes)
    return FileEntry(path, sum(sizes), draw(st.integers(0, 0o7777)), draw(_mtimes), draw(_digests),
                     draw(st.sampled_from((0, 512, 4096, 65536))), sizes, digests,
                     draw(_ints), draw(_mtimes), draw(st.booleans()))


@st.composite
def any_manifests(draw) -> Manifest:
    """Entries with arbitrary (valid) paths; paths need not form a tree (the codec does not care)."""
    entries: dict[str, Entry] = {}
    if draw(st.booleans()):
        entries[""] = DirEntry("", draw(st.integers(0, 0o7777)), draw(_mtimes))
    for path in draw(st.lists(_relpaths, max_size=8, unique=True)):
        kind = draw(st.sampled_from("fdl"))
        if kind == "f":
            entries[path] = draw(any_file(path))
        elif kind == "d":
            entries[path] = DirEntry(path, draw(st.integers(0, 0o7777)), draw(_mtimes))
        else:
            target = os.fsdecode(draw(st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b)))
            entries[path] = LinkEntry(path, target, draw(_mtimes))
    return Manifest(entries)


# -- plan model checker -------------------------------------------------------------------------

NOW = -1  # a directory's mtime after the writer changed its contents (the time of the run)


def _protected(path: str, protect) -> bool:
    q = path
    while True:
        if q in protect:
            return True
        if not q:
            return False
        q = parent_of(q)


def simulate(plan, master: Manifest, replica: Manifest, protect=frozenset()) -> dict[str, Entry]:
    """Run `plan` on a model of the replica, checking every precondition the replica writer
    relies on; return the final entries. Raises AssertionError naming the first violation.

    Unlike Plan.apply_to (the planner's own model), this one is strict and independent:
    - the parent of every MakeDir / Commit / MakeLink is a directory at that moment;
    - MakeDir targets a free path; Commit and MakeLink never land on a directory;
    - `expect` of WriteFile (checked at Commit), MakeLink and Delete matches the entry there;
    - a directory is empty when deleted; SetMeta targets an entry of its kind;
    - every WriteFile's ops tile the target; a SendOp starts and ends on target chunk
      boundaries (MasterReader insists); a CopyOp reads an unchanged replica file, inside it,
      and its bytes equal the target bytes it stands for (content rebuilt from CHUNK_POOL);
    - no path is committed, linked over or deleted while a later WriteFile copies from it;
    - every staged file is committed exactly once;
    - nothing at or under a protected path is acted on;
    - changing a directory's entries makes its mtime NOW until a later SetMeta fixes it;
    - MoveDir moves a directory of the replica to a free path whose parent is a directory, and
      lists exactly what is in it; nothing under it is needed later at its old path;
      a CopyOp may read a moved file at its new path.
    """
    from dirsync.plan import Commit, CopyOp, Delete, MakeDir, MakeLink, MoveDir, SendOp, SetMeta, WriteFile, expect_of

    state: dict[str, Entry] = dict(replica.entries)
    if "" not in state:  # a replica that does not exist yet: the writer creates the root
        state[""] = DirEntry("", 0o755, NOW)
    orig = dict(replica.entries)  # replica files unchanged so far, by their path now (MoveDir moves them)
    staged: dict[str, object] = {}
    actions = plan.actions
    later: list[set[str]] = [set() for _ in actions]
    acc: set[str] = set()
    for i in range(len(actions) - 1, -1, -1):
        later[i] = set(acc)
        a = actions[i]
        if isinstance(a, WriteFile):
            acc |= {o.src for o in a.ops if isinstance(o, CopyOp)}

    def where(i: int, a) -> str:
        return f"action {i} {a!r}"

    def parent_is_dir(i, a, p):
        par = parent_of(p)
        assert isinstance(state.get(par), DirEntry), f"{where(i, a)}: parent {par!r} of {p!r} is not a directory then"

    def touch_parent(p):
        par = parent_of(p)
        e = state.get(par)
        if isinstance(e, DirEntry):
            state[par] = DirEntry(par, e.mode, NOW)

    def not_protected(i, a, p):
        assert not _protected(p, protect), f"{where(i, a)}: acts on protected path {p!r}"

    def not_needed_later(i, a, p):
        assert p not in later[i], f"{where(i, a)}: {p!r} changes while a later WriteFile copies from it"

    for i, a in enumerate(actions):
        if isinstance(a, MoveDir):
            for x in a.moved:
                not_protected(i, a, a.src + x)
                not_protected(i, a, a.path + x)
                not_needed_later(i, a, a.src + x)
            assert isinstance(state.get(a.src), DirEntry), f"{where(i, a)}: {a.src!r} is not a directory"
            parent_is_dir(i, a, a.path)
            assert a.path not in state, f"{where(i, a)}: path taken by {state[a.path]!r}"
            assert a.moved[0] == "" and not _under(a.path, a.src), f"{where(i, a)}: bad move"
            inside = {q for q in state if _under(q, a.src)}
            assert inside == {a.src + x for x in a.moved}, f"{where(i, a)}: lists {sorted(a.moved)}, holds {sorted(inside)}"
            for x in a.moved:
                e = state.pop(a.src + x)
                state[a.path + x] = e.replace(path=a.path + x)
                if orig.get(a.src + x) is e:
                    orig[a.path + x] = state[a.path + x]
                orig.pop(a.src + x, None)
            touch_parent(a.src)
            touch_parent(a.path)
        elif isinstance(a, MakeDir):
            not_protected(i, a, a.path)
            parent_is_dir(i, a, a.path)
            assert a.path not in state, f"{where(i, a)}: path taken by {state[a.path]!r}"
            state[a.path] = DirEntry(a.path, a.mode, NOW)
            touch_parent(a.path)
        elif isinstance(a, WriteFile):
            not_protected(i, a, a.path)
            assert a.path not in staged, f"{where(i, a)}: staged twice"
            t = a.target
            want = content_of(t)
            bounds = {0}
            for off, n, _d in t.chunks():
                bounds.add(off + n)
            pos = 0
            for op in a.ops:
                assert op.size > 0, f"{where(i, a)}: empty op {op!r}"
                if isinstance(op, SendOp):
                    assert op.offset == pos, f"{where(i, a)}: {op!r} not at {pos}"
                    assert op.offset in bounds and op.offset + op.size in bounds, \
                        f"{where(i, a)}: {op!r} not on target chunk boundaries"
                else:
                    assert isinstance(op, CopyOp)
                    src = orig.get(op.src)
                    assert isinstance(src, FileEntry), f"{where(i, a)}: copy source {op.src!r} is no replica file"
                    assert state.get(op.src) is src, f"{where(i, a)}: copy source {op.src!r} changed before use"
                    assert 0 <= op.offset and op.offset + op.size <= src.size, f"{where(i, a)}: {op!r} outside source"
                    got = content_of(src)[op.offset:op.offset + op.size]
                    assert got == want[pos:pos + op.size], f"{where(i, a)}: {op!r} copies the wrong bytes"
                pos += op.size
            assert pos == t.size, f"{where(i, a)}: ops cover {pos} of {t.size} bytes"
            staged[a.path] = a
        elif isinstance(a, Commit):
            assert a.paths, f"{where(i, a)}: empty commit"
            for p in a.paths:
                not_protected(i, a, p)
                assert p in staged, f"{where(i, a)}: {p!r} committed but not staged (or committed twice)"
                w = staged.pop(p)
                parent_is_dir(i, a, p)
                cur = state.get(p)
                assert not isinstance(cur, DirEntry), f"{where(i, a)}: {p!r} is a directory at commit"
                assert expect_of(cur) == w.expect, f"{where(i, a)}: {p!r} is {cur!r}, expected {w.expect!r}"
                not_needed_later(i, a, p)
                state[p] = w.target
                touch_parent(p)
        elif isinstance(a, MakeLink):
            not_protected(i, a, a.path)
            parent_is_dir(i, a, a.path)
            cur = state.get(a.path)
            assert not isinstance(cur, DirEntry), f"{where(i, a)}: a directory is in the way"
            assert expect_of(cur) == a.expect, f"{where(i, a)}: found {cur!r}"
            not_needed_later(i, a, a.path)
            state[a.path] = LinkEntry(a.path, a.target, a.mtime_ns)
            touch_parent(a.path)
        elif isinstance(a, SetMeta):
            not_protected(i, a, a.path)
            cur = state.get(a.path)
            assert cur is not None and cur.kind == a.kind, f"{where(i, a)}: found {cur!r}"
            if isinstance(cur, LinkEntry):
                state[a.path] = LinkEntry(cur.path, cur.target, a.mtime_ns)
            elif isinstance(cur, DirEntry):
                state[a.path] = DirEntry(cur.path, a.mode, a.mtime_ns)
            else:
                state[a.path] = cur.replace(mode=a.mode, mtime_ns=a.mtime_ns)
        elif isinstance(a, Delete):
            not_protected(i, a, a.path)
            cur = state.get(a.path)
            assert cur is not None and cur.kind == a.kind, f"{where(i, a)}: found {cur!r}"
            assert expect_of(cur) == a.expect, f"{where(i, a)}: found {cur!r}"
            if a.kind == "d":
                kids = [q for q in state if q and parent_of(q) == a.path]
                assert not kids, f"{where(i, a)}: directory not empty: {kids}"
            not_needed_later(i, a, a.path)
            del state[a.path]
            touch_parent(a.path)
        else:
            raise AssertionError(f"unknown action {a!r}")
    assert not staged, f"staged but never committed: {sorted(staged)}"
    return state


def _under(p: str, top: str) -> bool:
    return p == top or p.startswith(top + "/")


def changed_paths(base: dict, entries: dict) -> set[str]:
    """Every path whose entry in `entries` is not the very object `base` holds there (new,
    changed or gone): what a scan's ScanResult.base lists, by definition (the scan finds it
    from the paths it missed instead)."""
    return {p for p in base.keys() | entries.keys() if entries.get(p) is not base.get(p)}
