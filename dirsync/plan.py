"""Pure diff of a master and a replica manifest into an ordered Plan of typed actions. No I/O.

Order (what the replica writer relies on):
  0. MoveDir: a directory renamed on the master, renamed whole on the replica (see _dir_moves);
  1. MakeDir for new directories whose parents exist and whose path is free;
  2. WriteFile (staged in the replica's temp area) interleaved with Commit batches; a path is
     committed only once no later WriteFile copies from it, so swaps and renames are safe;
  3. Delete of replica entries in the way of a type change (deepest first);
  4. the remaining MakeDir, Commit, then MakeLink;
  5. SetMeta of files and links;
  6. Delete of what the master no longer has (deepest first), only with opts.delete;
  7. SetMeta of directories, deepest first, the root last (their mtimes change with their contents).
"""

from __future__ import annotations

import sys
from collections import Counter
from bisect import bisect_left, bisect_right
from itertools import accumulate, compress
from operator import attrgetter

from dirsync.errors import display_path
from dirsync.manifest import DIGEST_SIZE, DirEntry, Entry, FileEntry, LinkEntry, Manifest, covered, is_under, parent_of
from dirsync.record import Record


class CopyOp(Record):
    """Bytes the replica already has: `size` bytes of replica file `src` at `offset`."""

    _fields = ("src", "offset", "size")
    __slots__ = _fields

    def __init__(self, src: str, offset: int, size: int) -> None:
        self.src = src
        self.offset = offset
        self.size = size


class SendOp(Record):
    """Bytes the master must send: `size` bytes of the target content at `offset`."""

    _fields = ("offset", "size")
    __slots__ = _fields

    def __init__(self, offset: int, size: int) -> None:
        self.offset = offset
        self.size = size


Op = CopyOp | SendOp


def expect_of(e: Entry | None) -> tuple | None:
    """What a replica path must still look like before it is replaced or deleted."""
    if e is None:
        return None
    if isinstance(e, FileEntry):
        return ("f", e.size, e.mtime_ns)
    if isinstance(e, LinkEntry):
        return ("l", e.target)
    return ("d",)


class MakeDir(Record):
    _fields = ("path", "mode")
    __slots__ = _fields

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.mode = mode


class WriteFile(Record):
    _fields = ("target", "ops", "expect", "move", "derive")
    __slots__ = _fields

    def __init__(
        self,
        target: FileEntry,  # what the file must become (content, mode, mtime)
        ops: tuple[Op, ...],  # tile [0, target.size) in order
        expect: tuple | None,  # what is at the path when it is committed (None: nothing)
        # True: ops is one whole-file copy from a path this plan deletes, holding the same mode and
        # mtime (a moved file): the writer may hard-link that file instead of copying its bytes.
        move: bool = False,
        # True: every op is a send op and target.digests is a placeholder; the writer computes the
        # chunk digests from the bytes it writes (an SSH agent told so: they need not travel).
        derive: bool = False,
    ) -> None:
        self.target = target
        self.ops = ops
        self.expect = expect
        self.move = move
        self.derive = derive

    @property
    def path(self) -> str:
        return self.target.path

    @property
    def send_bytes(self) -> int:
        return sum(o.size for o in self.ops if isinstance(o, SendOp))


class Commit(Record):
    """Move these staged files to their final names."""

    _fields = ("paths",)
    __slots__ = _fields

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = paths


class MakeLink(Record):
    _fields = ("path", "target", "mtime_ns", "expect")
    __slots__ = _fields

    def __init__(self, path: str, target: str, mtime_ns: int, expect: tuple | None) -> None:
        self.path = path
        self.target = target
        self.mtime_ns = mtime_ns
        self.expect = expect


class SetMeta(Record):
    _fields = ("path", "kind", "mode", "mtime_ns")
    __slots__ = _fields

    def __init__(
        self,
        path: str,
        kind: str,  # "f" | "d" | "l"
        mode: int,
        mtime_ns: int,
    ) -> None:
        self.path = path
        self.kind = kind
        self.mode = mode
        self.mtime_ns = mtime_ns


class Delete(Record):
    _fields = ("path", "kind", "expect", "obstruction")
    __slots__ = _fields

    def __init__(
        self,
        path: str,
        kind: str,
        expect: tuple | None,
        obstruction: bool = False,  # removed to make room for a type change, not a mirror delete
    ) -> None:
        self.path = path
        self.kind = kind
        self.expect = expect
        self.obstruction = obstruction


class MoveDir(Record):
    """Rename replica directory `src` to `path` (a new path whose parent the replica has), with
    everything in it. `moved` lists what the plan knows is there, as suffixes of `src` ("" for
    the directory itself, then "/a", "/a/b" ...): the writer moves their records with them.
    One rename instead of a link, a rename and an unlink per file; what changed in it on the
    master follows at the new paths (see _dir_moves)."""

    _fields = ("src", "path", "moved")
    __slots__ = _fields

    def __init__(self, src: str, path: str, moved: tuple[str, ...]) -> None:
        self.src = src
        self.path = path
        self.moved = moved


Action = MoveDir | MakeDir | WriteFile | Commit | MakeLink | SetMeta | Delete

# Commit batch size, in files that replace one, where freed inodes linger (ext4 without a
# journal: a create skips every inode freed in the last minute or more, ~1.5 us each). A run
# that frees hundreds only after creating all its files leaves them for each create of the next
# runs to skip (a release step of 425 files: 0.6 s when run every few seconds, 0.35 s fresh);
# freed 32 at a time, the same run's next files take most of them over within the second.
# Elsewhere the default holds: a journaled ext4 commits its journal for each batch's syncfs
# (20,000 files replaced: 6.8 s in batches of 32, 5.7 s in one).
REPLACED_BATCH = 32


class PlanOptions(Record):
    _fields = ("delete", "protect", "commit_bytes", "commit_files", "commit_replaced", "local", "dir_moves")

    def __init__(
        self,
        delete: bool = True,
        protect: frozenset[str] = frozenset(),  # master paths with read problems: leave replica alone there
        commit_bytes: int = 256 << 20,
        commit_files: int = 4096,
        # At most this many files in a batch replace a file (free its inode when renamed over it).
        # The sync sets REPLACED_BATCH for a replica where freed inodes linger (replica.frees_linger).
        commit_replaced: int = 4096,
        # The replica is on this machine: a sent chunk costs no transfer, only a read of the
        # master, so chunks are looked for in other replica files only when enough are wanted
        # to pay for indexing every replica chunk (see ChunkIndex.want).
        local: bool = False,
        # The replica's writer renames a directory whole (MoveDir) when its list of entries
        # takes at most this many bytes (move_size): a local one without a limit, an agent that
        # announced it within a frame. 0: a renamed directory is moved file by file (WriteFile.move).
        dir_moves: int = 0,
    ) -> None:
        self.delete = delete
        self.protect = protect
        self.commit_bytes = commit_bytes
        self.commit_files = commit_files
        self.commit_replaced = commit_replaced
        self.local = local
        self.dir_moves = dir_moves


class Totals(Record):
    _fields = ("writes", "send_bytes", "reuse_bytes", "deletes", "mkdirs", "links", "meta", "dir_moves")

    def __init__(
        self,
        writes: int = 0,
        send_bytes: int = 0,
        reuse_bytes: int = 0,
        deletes: int = 0,
        mkdirs: int = 0,
        links: int = 0,
        meta: int = 0,
        dir_moves: int = 0,
    ) -> None:
        self.writes = writes
        self.send_bytes = send_bytes
        self.reuse_bytes = reuse_bytes
        self.deletes = deletes
        self.mkdirs = mkdirs
        self.links = links
        self.meta = meta
        self.dir_moves = dir_moves


class Plan(Record):
    _fields = ("actions", "skipped")

    def __init__(
        self,
        actions: tuple[Action, ...],
        skipped: tuple[tuple[str, str], ...] = (),  # (path, why) left alone by this plan
    ) -> None:
        self.actions = actions
        self.skipped = skipped

    def totals(self) -> Totals:
        w = s = r = d = mk = ln = mt = mv = 0
        for a in self.actions:
            if isinstance(a, WriteFile):
                w += 1
                for o in a.ops:
                    if isinstance(o, SendOp):
                        s += o.size
                    else:
                        r += o.size
            elif isinstance(a, Delete):
                d += 1
            elif isinstance(a, MakeDir):
                mk += 1
            elif isinstance(a, MakeLink):
                ln += 1
            elif isinstance(a, SetMeta):
                mt += 1
            elif isinstance(a, MoveDir):
                mv += 1
        return Totals(w, s, r, d, mk, ln, mt, mv)

    @property
    def empty(self) -> bool:
        return not self.actions

    def deletes(self) -> list[Delete]:
        return [a for a in self.actions if isinstance(a, Delete)]

    def render(self) -> str:
        """One stable line per action, then a totals line."""
        lines = []
        for a in self.actions:
            line = render_action(a)
            if line:
                lines.append(line)
        for path, why in self.skipped:
            lines.append(f"skip    {display_path(path)}: {why}")
        t = self.totals()
        lines.append(
            f"total: {t.writes} to write (send {human_size(t.send_bytes)}, reuse {human_size(t.reuse_bytes)}), "
            f"{t.deletes} to delete, {t.mkdirs} dirs, {t.links} links, {t.meta} metadata"
            + (f", {t.dir_moves} dirs moved" if t.dir_moves else "")
        )
        return "\n".join(lines)

    def apply_to(self, replica: Manifest) -> Manifest:
        """The manifest the replica has after this plan succeeds (the model used by tests)."""
        entries = dict(replica.entries)
        staged: dict[str, FileEntry] = {}
        for a in self.actions:
            if isinstance(a, MoveDir):
                for x in a.moved:
                    entries[a.path + x] = entries.pop(a.src + x).replace(path=a.path + x)
            elif isinstance(a, MakeDir):
                entries[a.path] = DirEntry(a.path, a.mode, 0)
            elif isinstance(a, WriteFile):
                staged[a.path] = a.target
            elif isinstance(a, Commit):
                for p in a.paths:
                    entries[p] = staged.pop(p)
            elif isinstance(a, MakeLink):
                entries[a.path] = LinkEntry(a.path, a.target, a.mtime_ns)
            elif isinstance(a, SetMeta):
                e = entries.get(a.path)
                if e is None and a.kind == "d":  # a replica root the writer creates (fresh replica)
                    e = DirEntry(a.path, a.mode, a.mtime_ns)
                if isinstance(e, LinkEntry):
                    entries[a.path] = e.replace(mtime_ns=a.mtime_ns)
                else:
                    entries[a.path] = e.replace(mode=a.mode, mtime_ns=a.mtime_ns)
            elif isinstance(a, Delete):
                del entries[a.path]
        assert not staged, f"staged but never committed: {sorted(staged)}"
        return Manifest(entries)


def render_action(a: Action) -> str:
    if isinstance(a, MoveDir):
        n = len(a.moved) - 1
        return (f"move    {display_path(a.src)}/ -> {display_path(a.path)}/  "
                f"({n} {'entry' if n == 1 else 'entries'} in it)")
    if isinstance(a, MakeDir):
        return f"mkdir   {display_path(a.path)}/"
    if isinstance(a, WriteFile):
        send = a.send_bytes
        reuse = a.target.size - send
        line = f"write   {display_path(a.path)}  {human_size(a.target.size)}"
        copies = [o for o in a.ops if isinstance(o, CopyOp)]
        if len(a.ops) == 1 and copies and copies[0].src != a.path:
            if a.move:
                return line + f"  moved from {display_path(copies[0].src)}"
            return line + f"  reuse all from {display_path(copies[0].src)}"
        if reuse:
            line += f"  reuse {human_size(reuse)}"
        return line + f"  send {human_size(send)}"
    if isinstance(a, MakeLink):
        return f"link    {display_path(a.path)} -> {display_path(a.target)}"
    if isinstance(a, SetMeta):
        suffix = "/" if a.kind == "d" else ""
        shown = display_path(a.path) + suffix if a.path else "./"
        when = _utc(a.mtime_ns)
        if a.kind == "l":
            return f"meta    {shown}  mtime {when}"
        return f"meta    {shown}  mode {a.mode:04o}  mtime {when}"
    if isinstance(a, Delete):
        return f"delete  {display_path(a.path)}{'/' if a.kind == 'd' else ''}"
    return ""  # Commit: an ordering barrier, not a change a person needs to read


def _utc(mtime_ns: int) -> str:
    """An mtime as people read it (UTC, seconds), for plan lines."""
    import time

    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime_ns // 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return f"{mtime_ns}ns"


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


# -- diff ----------------------------------------------------------------------------


class ChunkIndex:
    """Where the replica already has each chunk digest and each whole file. A chunk is looked
    for first in the replica's file at the target's own path (its basis: an edited or appended
    file reads from itself, in order), then anywhere (first location wins).

    Chunks are keyed by their digest's first 8 bytes (a native int, read straight from the joined
    digests) and confirmed by the whole digest on use, so a prefix collision only costs reuse.
    `want(targets)` narrows the global index to the digests those files could use and their
    bases lack: one C-level intersection over every replica chunk, then positions only for what
    matched (a 1% change of a 600,000-chunk replica spent 0.6 s on a dict over every chunk).
    It also keeps, per basis, the digest prefixes it lacks, so that find() does not scan the
    basis for a chunk that cannot be there.

    Nothing is built per replica file up front: a plan of 10 files in a 100,000-file replica
    spent ~70 ms on dicts of every file's path and whole content; now a basis is the replica
    entry at the target's path, want() finds the targets' whole contents in one C-level pass,
    and where each file's chunks start is summed only once a global lookup hits.
    """

    def __init__(self, replica: Manifest, local: bool = False) -> None:
        self._entries = replica.entries
        self._local = local  # (PlanOptions.local)
        self._files: list[FileEntry] | None = None  # every non-empty replica file, in manifest order
        if type(replica) is not Manifest:  # one whose files() are not just its entries' (twoway._ScopedSide)
            self._files = [f for f in replica.files() if f.size]
            self._entries = {f.path: f for f in self._files}
        # (size, digest) -> the first replica path with that content: for every file once whole()
        # needs one want() did not look for, else only for want()'s targets (None: no such file).
        self._wholes: dict[tuple[int, bytes], str] | None = None
        self._some_wholes: dict[tuple[int, bytes], str | None] = {}
        self._alld = b""
        self._by_key: dict[int, int] | None = None  # digest prefix -> chunk number over all files
        self._starts: list[int] | None = None  # byte offset in _alld of each file's first digest
        self._offs: dict[str, list[int]] = {}  # path -> chunk offsets in that file
        self._lacks: dict[str, set[int]] = {}  # basis path -> its target's prefixes it lacks
        # The last basis: its path, its digest -> chunk dict (once built), lookups so far.
        self._basis: tuple[str | None, dict[bytes, int] | None, int] = (None, None, 0)

    @property
    def files(self) -> list[FileEntry]:
        if self._files is None:
            self._files = [e for e in self._entries.values() if e.__class__ is FileEntry and e.size]
        return self._files

    def whole(self, size: int, digest: bytes) -> str | None:
        """The first replica path holding exactly this content, if any."""
        key = (size, digest)
        if self._wholes is None:
            if key in self._some_wholes:
                return self._some_wholes[key]
            self._wholes = w = {}
            for f in reversed(self.files):  # reversed + overwrite: the first file wins
                w[(f.size, f.digest)] = f.path
        return self._wholes.get(key)

    def _basis_of(self, path: str) -> FileEntry | None:
        b = self._entries.get(path)
        return b if b.__class__ is FileEntry and b.size else None  # type: ignore[union-attr,return-value]

    def want(self, targets: "list[FileEntry]") -> None:
        """Index only the chunks these files could reuse from other files (call before file_delta).
        Set arithmetic on 8-byte digest prefixes (C-level; a 1 GiB file has 130,000 chunks):
        a prefix shared by chunks that differ only costs a send, find() checks whole digests."""
        files = self.files
        if not files:  # an empty replica (an initial copy): nothing to index
            return
        some = self._some_wholes
        for t in targets:
            if t.size:
                some[(t.size, t.digest)] = None
        digests = {d for _, d in some}
        for f in compress(files, map(digests.__contains__, map(attrgetter("digest"), files))):
            if some.get((f.size, f.digest), "") is None:  # the first file with it wins
                some[(f.size, f.digest)] = f.path
        wanted: set[int] = set()
        for t in targets:
            if not t.size or some[(t.size, t.digest)] is not None:
                continue
            b = self._basis_of(t.path)
            if b is None:
                wanted.update(_prefix_view(t.digests))
            else:
                lacks = self._lacks[t.path] = _basis_lacks(t.digests, b.digests)
                wanted.update(lacks)
        if self._local:
            # A local replica, and few chunks wanted (fewer than the replica holds, over
            # LOCAL_INDEX_SHARE): each costs little more sent (read from the master) than copied,
            # while indexing every replica chunk costs ~60 ns each (a 1% change of the mixed tree:
            # 25-30 ms for its 410,000, and no chunk found). The replica's chunks are counted only
            # until they are enough (summing all of them was ~3% of that run).
            need, have = len(wanted) * LOCAL_INDEX_SHARE * DIGEST_SIZE, 0
            for d in map(_DIGESTS, files):
                have += len(d)
                if have > need:
                    self._by_key = {}  # find() looks in the target's own basis only
                    return
        self._build(wanted)

    def find(self, digest: bytes, path: str = "") -> tuple[FileEntry, int, int] | None:
        """(file, chunk number in it, offset) of a chunk in the replica with this digest: in the
        file at `path` if it has one, else the first in the replica."""
        f = self._basis_of(path) if path else None
        i = None
        if f is not None:
            lacks = self._lacks.get(path)
            if lacks is None or int.from_bytes(digest[:8], _ORDER) not in lacks:
                i = self._basis_find(f, digest)
        if i is None:
            if self._by_key is None:
                self._build(None)
            k = self._by_key.get(int.from_bytes(digest[:8], _ORDER))  # type: ignore[union-attr]
            if k is None or self._alld[k * DIGEST_SIZE:(k + 1) * DIGEST_SIZE] != digest:
                return None
            starts = self._starts
            if starts is None:
                starts = self._starts = list(accumulate(map(len, map(attrgetter("digests"), self.files)), initial=0))
            pos = k * DIGEST_SIZE
            j = bisect_right(starts, pos) - 1
            f, i = self.files[j], (pos - starts[j]) // DIGEST_SIZE
        offs = self._offs.get(f.path)
        if offs is None:
            offs = self._offs[f.path] = list(accumulate(f.sizes, initial=0))
        return f, i, offs[i]

    def _basis_find(self, f: FileEntry, digest: bytes) -> int | None:
        """The first chunk of basis file f with this digest. A scattered edit of a big file needs
        a lookup or two per changed spot: each scans its digests (memmem); only after
        BASIS_SCANS lookups in one file is a dict of them built (for a 1 GiB file's 107,000
        chunks that took 84 ms of a 153 ms plan)."""
        _, index, scans = self._basis if self._basis[0] == f.path else (f.path, None, 0)
        d, n = f.digests, DIGEST_SIZE
        if index is None and scans >= BASIS_SCANS:
            index = {d[i:i + n]: i // n for i in range(len(d) - n, -1, -n)}  # (backwards: the first wins)
        self._basis = (f.path, index, scans + 1)
        if index is not None:
            return index.get(digest)
        pos = d.find(digest)
        while pos > 0 and pos % n:
            pos = d.find(digest, pos + 1)
        return pos // n if pos >= 0 else None

    def _build(self, wanted: "set[int] | None") -> None:
        # Chunk numbers map back to files by bisect; offsets are summed per file only when a
        # chunk is used. The first location of a digest wins.
        self._by_key, self._offs = {}, {}
        files = self.files
        if not files or wanted is not None and not wanted:
            return
        self._alld = alld = b"".join(map(attrgetter("digests"), files))
        self._starts = None
        keys = _prefix_view(alld)
        n = len(keys)
        if wanted is None:
            self._by_key = dict(zip(keys[::-1], range(n - 1, -1, -1)))
            return
        hits = wanted.intersection(keys)
        if len(hits) > 32:
            self._by_key = {x: i for i, x in zip(range(n - 1, -1, -1), keys[::-1]) if x in hits}
            return
        for x in hits:  # a few: find each (memmem over the joined digests) at a digest boundary
            pat = x.to_bytes(8, _ORDER)
            pos = alld.find(pat)
            while pos > 0 and pos % DIGEST_SIZE:
                pos = alld.find(pat, pos + 1)
            if pos >= 0:
                self._by_key[x] = pos // DIGEST_SIZE


_ORDER = sys.byteorder
# A local replica's chunks are indexed for reuse from other files only when at least one in this
# many is wanted: sending a chunk of a few KiB through Python instead of copying it in the
# kernel costs ~3-4 us more, indexing one replica chunk ~60 ns.
LOCAL_INDEX_SHARE = 64
_DIGESTS = attrgetter("digests")
BASIS_SCANS = 64  # lookups by scanning one basis file's digests before indexing them
WALK_MIN = 1024  # chunks in a target before _basis_lacks walks it along its basis
NEAR = 256  # chunks either side of the walk's place in the basis where a chunk is looked for


def _basis_lacks(td: bytes, bd: bytes) -> set[int]:
    """The digest prefixes of target digests `td` that basis digests `bd` lack (exactly).

    Sets over every chunk of both cost ~40 ms for a 1 GiB file (107,000 chunks) with a few
    edits. A big target is first walked along its basis a block of digests at a time (C-level
    compares, as file_delta extends its runs), looking each chunk that differs up near the
    walk's place in the basis (memmem over a few KiB); only the chunks not found there are
    then checked against the whole basis. A target too unlike its basis for that to pay gets
    the plain set difference."""
    N = DIGEST_SIZE
    nt, nb = len(td) // N, len(bd) // N
    if nt < WALK_MIN or not nb:
        return set(_prefix_view(td)).difference(_prefix_view(bd))
    budget = 256 + (nt >> 6)  # chunks the walk may miss before the set difference is cheaper
    missed: list[int] = []
    i = j = 0
    while i < nt:
        k = _RUN_BLOCK
        while k:
            if i + k <= nt and j + k <= nb and td[i * N:(i + k) * N] == bd[j * N:(j + k) * N]:
                i += k
                j += k
            else:
                k >>= 2
        if i >= nt:
            break
        d = td[i * N:(i + 1) * N]
        lo, hi = max(0, j - NEAR) * N, min(nb, j + NEAR) * N
        pos = bd.find(d, lo, hi)
        while pos > 0 and pos % N:
            pos = bd.find(d, pos + 1, hi)
        if pos >= 0:
            j = pos // N  # back in step: the run goes on from there (it matches at least td[i])
            continue
        missed.append(i)
        if len(missed) > budget:
            return set(_prefix_view(td)).difference(_prefix_view(bd))
        i += 1
    tv = _prefix_view(td)
    cands = {tv[i] for i in missed}
    return cands.difference(cands.intersection(_prefix_view(bd))) if cands else cands


def _prefix_view(digests: bytes) -> memoryview:
    """The first 8 bytes of each DIGEST_SIZE-byte digest, as native unsigned ints (no copy)."""
    return memoryview(digests).cast("Q")[::DIGEST_SIZE // 8]


def file_delta(target: FileEntry, have: ChunkIndex) -> tuple[Op, ...]:
    """Copy each chunk the replica already has (from any file); send the rest. Merges runs."""
    if target.size == 0:
        return ()
    whole = have.whole(target.size, target.digest)
    if whole is not None:
        return (CopyOp(whole, 0, target.size),)
    if not have.files:  # nothing to reuse (an initial copy): no lookups
        return (SendOp(0, target.size),)
    ops: list[Op] = []
    N = DIGEST_SIZE
    td, tsizes = target.digests, target.sizes
    count = len(tsizes)
    src: FileEntry | None = None  # the copy run being built: src's chunks from src_ci on
    ssizes: tuple[int, ...] = ()
    sd = b""
    src_ci = src_off = run = 0
    send_off = send = 0  # the send run being built
    off = 0
    i = 0
    while i < count:
        n = tsizes[i]
        if src is not None:
            # The next chunks of the run's source file, if they are these, extend the run with no
            # lookup: compared a block at a time (C-level slices; a long unchanged stretch of a
            # big file costs a compare per block), chunk by chunk near a difference.
            k = _RUN_BLOCK
            while k:
                if src_ci + k <= len(ssizes) and i + k <= count and \
                        sd[src_ci * N:(src_ci + k) * N] == td[i * N:(i + k) * N] and \
                        ssizes[src_ci:src_ci + k] == tsizes[i:i + k]:
                    m = sum(tsizes[i:i + k])
                    src_ci += k
                    run += m
                    off += m
                    i += k
                else:
                    k >>= 2
            if i >= count:
                break
            n = tsizes[i]
            if src_ci < len(ssizes) and ssizes[src_ci] == n and sd[src_ci * N:(src_ci + 1) * N] == td[i * N:(i + 1) * N]:
                src_ci += 1
                run += n
                off += n
                i += 1
                continue
            ops.append(CopyOp(src.path, src_off, run))
            src = None
        d = td[i * N:(i + 1) * N]
        loc = have.find(d, target.path)
        if loc is not None and loc[0].sizes[loc[1]] == n:
            if send:
                ops.append(SendOp(send_off, send))
                send = 0
            src, src_ci, src_off = loc[0], loc[1] + 1, loc[2]
            ssizes, sd = src.sizes, src.digests
            run = n
        else:
            if not send:
                send_off = off
            send += n
        off += n
        i += 1
    if src is not None:
        ops.append(CopyOp(src.path, src_off, run))
    if send:
        ops.append(SendOp(send_off, send))
    return tuple(ops)


_RUN_BLOCK = 256  # chunks compared at once when extending a copy run (then 64, 16, 4, 1)


class _Acc:
    """What diff collects, by kind, before ordering it into a plan (always starts empty)."""

    def __init__(self) -> None:
        self.early_dirs: list[MakeDir] = []
        self.writes: list[tuple[WriteFile, bool]] = []  # (write, can commit early)
        self.clears: list[Delete] = []
        self.late_dirs: list[MakeDir] = []
        self.links: list[MakeLink] = []
        self.file_meta: list[SetMeta] = []
        self.dir_meta: dict[str, SetMeta] = {}
        self.touched_dirs: set[str] = set()
        self.deletes: list[Delete] = []
        self.skipped: list[tuple[str, str]] = []
        self.no_copies = False  # no write copies from the replica (nothing there to reuse)


def diff(master: Manifest, replica: Manifest, opts: PlanOptions = PlanOptions(),
         only: "set[str] | None" = None) -> Plan:
    """Return the actions that turn `replica` into `master` (see the module docstring for order).

    Paths in opts.protect (and below) are neither changed nor deleted. Without opts.delete,
    nothing the master lacks is deleted, and a type change that would remove a non-empty
    replica directory is skipped and listed in Plan.skipped.

    `only`: the paths where the two may differ, from a caller that knows the replica holds
    exactly what the master has at every other path (sync.py: a replica left in step with the
    scan the master's cache records). Only those paths are looked at; the plan is the same
    (the loop below takes no action for a path the replica holds as the master has it,
    whatever its parent's state), without a pass over every path of a large tree.
    """
    M, R = master.entries, replica.entries
    protect = opts.protect

    def protected(p: str) -> bool:
        return bool(protect) and covered(p, protect)

    acc = _Acc()
    r_children: dict[str, list[str]] = {}

    def r_subtree(p: str) -> list[str]:
        if not r_children:  # built for the first type change only: most plans have none
            for q in R:
                if q:
                    r_children.setdefault(parent_of(q), []).append(q)
        out, stack = [], [p]
        while stack:
            q = stack.pop()
            out.append(q)
            stack.extend(r_children.get(q, ()))
        return out

    late: set[str] = set()  # master paths that must wait for a type-change clear
    blocked: set[str] = set()  # master paths we may not touch this run
    cleared: set[str] = set()  # replica paths removed by type-change clears
    deltas: list[tuple[FileEntry, tuple | None, bool]] = []  # writes, made after the walk
    touched = acc.touched_dirs
    r_get = R.get

    # (The loop runs once per master path, 100,000 times for a large tree: the usual cases are
    # tested first and inline. A file or directory the replica holds exactly as the master
    # needs no action whatever its parent's state: noting it blocked or late would only matter
    # to paths under it, and a file has none, while under a blocked or late directory the
    # replica holds nothing that could match, or the path is protected itself.)
    for p in sorted(M) if only is None else sorted([q for q in only if q in M]):
        if not p:
            continue
        m = M[p]
        r = r_get(p)
        c = m.__class__
        if r is not None and r.__class__ is c and r.mtime_ns == m.mtime_ns and (
                c is FileEntry and r.size == m.size and r.digest == m.digest and r.mode == m.mode
                or c is DirEntry and r.mode == m.mode):
            continue
        i = p.rfind("/")
        par = p[:i] if i >= 0 else ""
        if par in blocked or protect and covered(p, protect):
            blocked.add(p)
            continue
        is_late = par in late
        if r is None and not is_late and c is FileEntry:  # a new file
            deltas.append((m, None, True))
            touched.add(par)
            continue
        obstructed = r is not None and r.kind != m.kind and (r.kind == "d" or m.kind == "d")
        if obstructed:
            assert r is not None
            sub = r_subtree(p)
            if any(protected(q) for q in sub):
                blocked.add(p)
                acc.skipped.append((p, "the replica has something else here under a path the master could not read"))
                continue
            if r.kind == "d" and len(sub) > 1 and not opts.delete:
                blocked.add(p)
                acc.skipped.append((p, "replaces a non-empty replica directory; not done without deletes"))
                continue
            for q in sorted(sub, reverse=True):
                acc.clears.append(Delete(q, R[q].kind, expect_of(R[q]), obstruction=True))
                cleared.add(q)
            is_late = True
            r = None
        if is_late:
            late.add(p)
        if isinstance(m, DirEntry):
            if r is None:
                (acc.late_dirs if is_late else acc.early_dirs).append(MakeDir(p, m.mode))
                acc.touched_dirs.add(par)
                acc.dir_meta[p] = SetMeta(p, "d", m.mode, m.mtime_ns)
            elif not isinstance(r, DirEntry) or r.mode != m.mode or r.mtime_ns != m.mtime_ns:
                acc.dir_meta[p] = SetMeta(p, "d", m.mode, m.mtime_ns)
        elif isinstance(m, FileEntry):
            if isinstance(r, FileEntry) and m.same_content(r):
                if r.mode != m.mode or r.mtime_ns != m.mtime_ns:
                    acc.file_meta.append(SetMeta(p, "f", m.mode, m.mtime_ns))
                continue
            deltas.append((m, expect_of(r), not is_late))
            acc.touched_dirs.add(par)
        else:
            assert isinstance(m, LinkEntry)
            if isinstance(r, LinkEntry) and r.target == m.target:
                if r.mtime_ns != m.mtime_ns:
                    acc.file_meta.append(SetMeta(p, "l", 0, m.mtime_ns))
                continue
            acc.links.append(MakeLink(p, m.target, m.mtime_ns, expect_of(r)))
            acc.touched_dirs.add(par)

    if deltas:
        index = ChunkIndex(replica, opts.local)
        if index.files:
            index.want([m for m, _, _ in deltas])
            acc.writes = [(WriteFile(m, file_delta(m, index), e), early) for m, e, early in deltas]
        else:  # nothing to reuse (an initial copy): file_delta's answer, without a call per file
            acc.writes = [(WriteFile(m, (SendOp(0, m.size),) if m.size else (), e), early) for m, e, early in deltas]
            acc.no_copies = True

    if opts.delete:
        gone = R.keys() - M.keys() if only is None else [q for q in only if q in R and q not in M]
        for p in sorted(gone, reverse=True):
            if p and p not in cleared and not protected(p):
                acc.deletes.append(Delete(p, R[p].kind, expect_of(R[p])))
                acc.touched_dirs.add(parent_of(p))
    for q in cleared:
        acc.touched_dirs.add(parent_of(q))

    _mark_moves(acc, R)
    moves = _dir_moves(acc, M, R, protect, opts.dir_moves) if opts.dir_moves and acc.deletes else []
    actions: list[Action] = [*moves, *acc.early_dirs]
    actions += _writes_with_commits(acc.writes, opts, acc.no_copies)
    actions += acc.clears
    actions += acc.late_dirs
    late_commits = tuple(w.path for w, early in acc.writes if not early)
    if late_commits:
        actions.append(Commit(late_commits))
    actions += acc.links
    actions += acc.file_meta
    for d in acc.touched_dirs:
        md = M.get(d)
        if isinstance(md, DirEntry) and d not in acc.dir_meta and d not in blocked and not protected(d):
            acc.dir_meta[d] = SetMeta(d, "d", md.mode, md.mtime_ns)
    root = M.get("")
    if isinstance(root, DirEntry) and "" not in acc.dir_meta and not protected(""):
        rr = R.get("")
        if not isinstance(rr, DirEntry) or rr.mode != root.mode or rr.mtime_ns != root.mtime_ns:
            acc.dir_meta[""] = SetMeta("", "d", root.mode, root.mtime_ns)
    # Deepest first so setting a child's metadata never disturbs a parent already done; root last.
    actions += acc.deletes
    actions += _deepest_first(acc.dir_meta)  # after deletes: removing an entry changes its parent's mtime
    return Plan(tuple(actions), tuple(acc.skipped))


def _mark_moves(acc: "_Acc", R: dict[str, Entry]) -> None:
    """Mark writes that only take over a file this plan deletes (see WriteFile.move); each
    deleted file is taken over at most once (two live paths must never share an inode)."""
    gone = {d.path for d in acc.deletes if d.kind == "f"}
    if not gone:
        return
    taken: set[str] = set()
    for i, (w, early) in enumerate(acc.writes):
        if len(w.ops) != 1 or not isinstance(w.ops[0], CopyOp):
            continue
        op, t = w.ops[0], w.target
        src = R.get(op.src)
        if (op.src in gone and op.src not in taken and op.offset == 0 and op.size == t.size
                and isinstance(src, FileEntry) and src.mode == t.mode and src.mtime_ns == t.mtime_ns):
            taken.add(op.src)
            acc.writes[i] = (WriteFile(t, w.ops, w.expect, move=True), early)


def move_size(moved: tuple[str, ...]) -> int:
    """What a MoveDir's list of entries weighs, against PlanOptions.dir_moves (a bound on its
    encoded size: 8 bytes an entry covers the framing)."""
    return sum(map(len, moved)) + 8 * len(moved)


def _dir_moves(acc: "_Acc", M: dict[str, Entry], R: dict[str, Entry], protect: frozenset[str],
               limit: int) -> list[MoveDir]:
    """Directories renamed on the master, found from the new files that hold the bytes of a
    deleted file of the same name in a deleted directory, as MoveDirs; takes out of `acc` what
    each one makes unneeded.

    A replica directory S this plan deletes moves to a directory D it makes when D's parent is
    on the replica already, nothing under either is protected and the move is worth it
    (_worth_moving). Then S's deletes and D's MakeDirs, writes and links for the entries the
    move puts in place go, save what changed: a file's new content is written over the moved
    file (expecting it, reusing its bytes), its new mode or mtime set, a link remade; an entry
    the master no longer has is deleted at its new path. D's directory times are still set,
    what else D holds is made after the move, as planned, and other writes that copy from
    under S read the same bytes under D (a moved file the plan keeps is no longer free to be
    linked: copied instead).
    The outermost such pair is taken: a file moved from S/x/f to D/x/f names (S/x, D/x), then
    (S, D) when S/x and D/x are in them."""
    gone_dirs = {d.path for d in acc.deletes if d.kind == "d"}
    new_dirs = {d.path for d in acc.early_dirs}
    if not gone_dirs or not new_dirs:
        return []
    gone_files: dict[tuple[int, bytes], list[str]] = {}  # by content: the files deleted in a deleted directory
    for a in acc.deletes:
        if a.kind == "f" and parent_of(a.path) in gone_dirs:
            e = R[a.path]
            gone_files.setdefault((e.size, e.digest), []).append(a.path)  # type: ignore[union-attr]
    pairs: set[tuple[str, str]] = set()
    for w, _ in acc.writes:
        d, t = parent_of(w.path), w.target
        if w.expect is not None or d not in new_dirs:
            continue
        name = w.path[len(d) + bool(d):]
        for q in gone_files.get((t.size, t.digest), ())[:8]:  # (the same bytes under the same name)
            s = parent_of(q)
            if q[len(s) + bool(s):] == name:
                pairs.add(_outermost(s, d, gone_dirs, new_dirs))
    if not pairs:
        return []
    gone = sorted(d.path for d in acc.deletes)
    moves: list[MoveDir] = []
    taken_src: list[str] = []
    taken_dst: list[str] = []
    for s, d in sorted(pairs, key=lambda p: (p[0].count("/"), p)):
        pd = parent_of(d)
        if (any(is_under(s, t) for t in taken_src) or any(is_under(d, t) for t in taken_dst)
                or not isinstance(R.get(pd), DirEntry) or not isinstance(M.get(pd), DirEntry)
                or protect and any(is_under(p, s) or is_under(p, d) for p in protect)):
            continue
        under = gone[bisect_left(gone, s + "/"):bisect_left(gone, s + "0")]  # ("0" follows "/")
        moved = ("", *(q[len(s):] for q in under))
        if move_size(moved) <= limit and _worth_moving(s, d, moved, M, R):
            moves.append(MoveDir(s, d, moved))
            taken_src.append(s)
            taken_dst.append(d)
    if not moves:
        return []
    old: dict[str, str] = {}  # replica path under a moved directory -> where it is after the move
    for m in moves:
        for x in m.moved:
            old[m.src + x] = m.path + x
    there = {q: R[p] for p, q in old.items() if q in M}  # what the master keeps: there after the move
    deletes = []
    for a in acc.deletes:
        q = old.get(a.path)
        if q is None:
            deletes.append(a)
        elif q not in there:  # gone from the master: deleted after the move, at its new path
            deletes.append(Delete(q, a.kind, a.expect))
            acc.touched_dirs.add(parent_of(q))
    acc.deletes = sorted(deletes, key=attrgetter("path"), reverse=True)
    acc.early_dirs = [a for a in acc.early_dirs if a.path not in there]
    links = []
    for a in acc.links:
        r = there.get(a.path)
        if r is None:
            links.append(a)
        elif r.target != a.target:  # type: ignore[union-attr]
            links.append(MakeLink(a.path, a.target, a.mtime_ns, expect_of(r)))
        elif r.mtime_ns != a.mtime_ns:
            acc.file_meta.append(SetMeta(a.path, "l", 0, a.mtime_ns))
    acc.links = links
    deleted = {a.path for a in deletes if a.kind == "f"}
    writes = []
    for w, early in acc.writes:
        r, t = there.get(w.path), w.target
        if r is not None and r.same_content(t):  # (the moved file: at most its metadata changed)
            if r.mode != t.mode or r.mtime_ns != t.mtime_ns:  # type: ignore[union-attr]
                acc.file_meta.append(SetMeta(w.path, "f", t.mode, t.mtime_ns))
            continue
        if r is not None or any(o.__class__ is CopyOp and o.src in old for o in w.ops):
            ops = tuple(CopyOp(old[o.src], o.offset, o.size) if o.__class__ is CopyOp and o.src in old else o
                        for o in w.ops)
            # (a moved file it took over stays free to link when the plan deletes it afterwards)
            move = w.move and ops[0].src in deleted  # type: ignore[union-attr]
            w = WriteFile(t, ops, expect_of(r) if r is not None else w.expect, move=move, derive=w.derive)
        writes.append((w, early))
    acc.writes = writes
    return moves


def _worth_moving(s: str, d: str, moved: tuple[str, ...], M: dict[str, Entry], R: dict[str, Entry]) -> bool:
    """Is directory s, renamed to d, moved whole? When every entry under it that the master
    still has at the same place under d is of the same kind there (a type change would need
    clearing first) and at least half of its files are there with the same content; the
    others are replaced or deleted after the move."""
    files = same = 0
    for x in moved:
        r, m = R[s + x], M.get(d + x)
        if m is not None and m.__class__ is not r.__class__:
            return False
        if r.__class__ is FileEntry:
            files += 1
            same += m is not None and r.same_content(m)  # type: ignore[union-attr]
    return 2 * same >= files and same > 0


def _outermost(s: str, d: str, gone_dirs: set[str], new_dirs: set[str]) -> tuple[str, str]:
    """Climb from (s, d) while both parents are a deleted and a made directory of the same name."""
    while True:
        ps, pd = parent_of(s), parent_of(d)
        if ps in gone_dirs and pd in new_dirs and s[len(ps) + bool(ps):] == d[len(pd) + bool(pd):]:
            s, d = ps, pd
        else:
            return s, d


def _deepest_first(metas: dict[str, SetMeta]) -> list[SetMeta]:
    return [metas[p] for p in sorted(metas, key=lambda p: (-p.count("/") if p else 1, p))]


def _writes_with_commits(writes: list[tuple[WriteFile, bool]], opts: PlanOptions,
                         no_copies: bool = False) -> list[Action]:
    """WriteFiles in order with Commit batches; a path is never committed while a later write copies from it.
    `no_copies`: no write has a copy op (an initial copy), so none waits for another."""
    if no_copies:
        return _commit_in_batches(writes, opts)
    srcs = [{o.src for o in w.ops if o.__class__ is CopyOp} for w, _ in writes]
    need: Counter[str] = Counter()
    for s in srcs:
        for src in s:
            need[src] += 1
    out: list[Action] = []
    pending: list[WriteFile] = []
    pending_bytes = pending_replaced = 0
    for (w, early), s in zip(writes, srcs):
        out.append(w)
        for src in s:
            need[src] -= 1
        if early:
            pending.append(w)
            pending_bytes += w.target.size
            if w.expect is not None:
                pending_replaced += 1
        if pending and (pending_bytes >= opts.commit_bytes or len(pending) >= opts.commit_files
                        or pending_replaced >= opts.commit_replaced):
            ready = [x for x in pending if need[x.path] <= 0] if need else pending
            if ready:
                out.append(Commit(tuple(x.path for x in ready)))
                pending = [x for x in pending if need[x.path] > 0]
                pending_bytes = sum(x.target.size for x in pending)
                pending_replaced = sum(1 for x in pending if x.expect is not None)
    if pending:
        out.append(Commit(tuple(x.path for x in pending)))
    return out


def _commit_in_batches(writes: list[tuple[WriteFile, bool]], opts: PlanOptions) -> list[Action]:
    """_writes_with_commits when no write copies from another path: each early write is
    committed in the first batch that reaches opts.commit_bytes, opts.commit_files or
    opts.commit_replaced (files that replace one)."""
    out: list[Action] = []
    pending: list[str] = []
    pending_bytes = pending_replaced = 0
    max_bytes, max_files, max_replaced = opts.commit_bytes, opts.commit_files, opts.commit_replaced
    for w, early in writes:
        out.append(w)
        if early:
            pending.append(w.target.path)
            pending_bytes += w.target.size
            if w.expect is not None:
                pending_replaced += 1
            if pending_bytes >= max_bytes or len(pending) >= max_files or pending_replaced >= max_replaced:
                out.append(Commit(tuple(pending)))
                pending, pending_bytes, pending_replaced = [], 0, 0
    if pending:
        out.append(Commit(tuple(pending)))
    return out
