"""Two-way sync: a pure three-way reconciler, and a run that applies its result to both sides.

`reconcile(base, a, b, opts)` compares two sides with the manifest both agreed on after the last
successful two-way run (the *base*) and returns `Decisions`: one *target* manifest that BOTH sides
must become (conflict copies included), plus per-path decisions for people. Each side's Plan is
then an ordinary `plan.diff(target, side)`, applied by the ordinary replica writer: chunk reuse
(renames and conflict copies send nothing), staged and verified writes, expect-checks.

Semantics (per path; "changed" = differs from the base):
  * both sides hold the same thing (same kind and content) -> in sync whatever the base says;
    differing metadata is merged field by field (one-sided change wins; both changed: mode of the
    newer file, the later mtime). This is also what makes a rerun after an interrupted run
    converge without spurious conflicts.
  * changed on one side only -> that side's version (or deletion) propagates; a permission-only
    change on the other side is kept (it is not a content conflict).
  * modify beats delete: deleted on one side, changed (content, mode or mtime) on the other ->
    restored everywhere with the change. A directory deleted on one side stays where something
    under it survives.
  * changed differently on both sides -> conflict: the newer version (mtime; ties broken by
    content, so the result does not depend on which side is `a`) keeps the name, the other is kept
    beside it as NAME.sync-conflict-YYYYMMDD-HHMMSS-<side>.EXT on both sides (Syncthing's
    convention; the stamp is the loser's mtime in UTC, so a rerun picks the same name). A directory
    always keeps the name against a file or link. `--prefer a|b|newer` resolves conflicts without
    copies (the loser is overwritten, including a losing directory's new contents).
  * first run (no base): every path is "new" on the side that has it: union, identical files are
    simply in sync (and so enter the base), differing ones are conflicts, nothing is deleted.
    Two non-empty directories that dirsync never synced need --init (as a one-way replica does);
    seeding an empty or new directory does not.
  * a path either side could not read (scan error) is left alone on both sides, with its subtree.

Where the state lives (see `TwoWaySide`): SIDE/.dirsync/twoway-<pairid>.base on both sides,
identical bytes, written only after both sides applied; <pairid> hashes the two sides' marker ids
(SIDE/.dirsync/replica.json), so moving or copying a side keeps its pair. A path whose actions did
not all succeed on both sides keeps its old base entry, so the next run redoes that decision.
A twoway-<pairid>.pending file on both sides marks a run in progress and lists the conflicts it is
resolving; finding it means the last run was interrupted: nothing special is needed (identical
paths are in sync, the rest is redone) except reporting those conflicts again.
A record is a snapshot of the base plus the entries changed since (see encode_base_delta); the
snapshot is a file of its own, twoway-<pairid>.snap-<id> (identical too), so that a run writes
only the record (header and delta) until a new snapshot is due, and reads only a record's
header from a remote side; with an older agent (no snapshot files) it stays inside the record.
Hints, each ignored when it does not match: twoway-<pairid>.tie says a side's scan cache holds
the base (so a run compares that side by identity and needs no base decode, see _read_tie);
twoway-<pairid>.step notes trees a clean run left in step (such a rerun does nothing at all).

Only the paths where a side differs from the base are reconciled and planned (see _scope);
runs with conflicts, unreadable or reserved paths, or an interrupted run's conflicts to report
take the whole trees.

Remote sides: everything a side does goes through `TwoWaySide` (marker peek, state files, open,
scan, apply, close) and `ContentSource` (read the bytes of a file the other side needs). Only the
local implementations exist so far; see the module's end for what a remote one needs.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections import Counter

from dirsync.apply import ReplicaSummary
from dirsync.errors import (
    ConfigError,
    DirsyncError,
    ExitCode,
    ItemError,
    ItemIOError,
    RefusedError,
    SourceChangedError,
    display_path,
)
from dirsync.manifest import DirEntry, Entry, FileEntry, LinkEntry, Manifest, covered, is_under, parent_of
from dirsync.plan import Commit, Plan, PlanOptions, SendOp, WriteFile, diff
from dirsync.record import Record
from dirsync.runtime import gc_paused
from dirsync.state import _sha256  # the built-in SHA-256 (no OpenSSL load), as for state keys

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Any, Callable, Iterable, Iterator, Sequence

CONFLICT_TAG = ".sync-conflict-"
_CONFLICT_RE = re.compile(r"\.sync-conflict-\d{8}-\d{6}-[A-Za-z0-9]+(?:-\d+)?(?:\.[^/]*)?$")

A, B = 0, 1


def is_conflict_copy(path: str) -> bool:
    """True for a name made by conflict handling (NAME.sync-conflict-YYYYMMDD-HHMMSS-SIDE[-N].EXT)."""
    return bool(_CONFLICT_RE.search(path.rsplit("/", 1)[-1]))


def conflict_name(path: str, mtime_ns: int, label: str, n: int = 0) -> str:
    """Syncthing-style conflict copy name beside `path`; `n` > 0 disambiguates a taken name."""
    d, _, name = path.rpartition("/")
    stem, ext = os.path.splitext(name)  # ".bashrc" has no extension; "a.tar.gz" -> "a.tar" + ".gz"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(mtime_ns // 1_000_000_000))
    tag = label if n == 0 else f"{label}-{n + 1}"
    if len(os.fsencode(ext)) > 64:
        stem, ext = stem + ext, ""
    suffix = f"{CONFLICT_TAG}{stamp}-{tag}{ext}"
    room = 255 - len(os.fsencode(suffix))  # NAME_MAX: cut a long stem rather than fail every run
    if len(os.fsencode(stem)) > room:
        cut = os.fsencode(stem)[:room]
        for k in range(4):  # do not split a UTF-8 character (names that are not UTF-8 are cut as bytes)
            try:
                cut[:len(cut) - k].decode("utf-8")
                cut = cut[:len(cut) - k]
                break
            except UnicodeDecodeError:
                continue
        stem = os.fsdecode(cut)
    out = stem + suffix
    return f"{d}/{out}" if d else out


# -- the reconciler (pure) -------------------------------------------------------------------


class ReconcileOptions(Record):
    _fields = ("prefer", "labels", "protect")

    def __init__(
        self,
        prefer: str | None = None,  # None: conflict copies; "a" | "b" | "newer": resolve without copies
        labels: tuple[str, str] = ("a", "b"),  # side names used in conflict copy names and reasons
        protect: frozenset[str] = frozenset(),  # paths (with subtrees) that a side could not read: left alone
    ) -> None:
        self.prefer = prefer
        self.labels = labels
        self.protect = protect


class Conflict(Record):
    _fields = ("path", "winner", "copy", "reason")

    def __init__(
        self,
        path: str,
        winner: int,  # A or B: whose version keeps the name
        copy: str | None,  # where the loser is kept (None: resolved by --prefer, loser dropped)
        reason: str,
    ) -> None:
        self.path = path
        self.winner = winner
        self.copy = copy
        self.reason = reason


class Decision(Record):
    """What happens to one path. action: "a>b" (b gets a's version), "b>a", "both" (each side
    takes part of the other: merged metadata), "del-a" (deleted on a), "del-b", "conflict"."""

    _fields = ("path", "action", "reason", "minor")

    def __init__(
        self,
        path: str,
        action: str,
        reason: str,
        minor: bool = False,  # only a directory mtime moves: not worth a line in `plan`
    ) -> None:
        self.path = path
        self.action = action
        self.reason = reason
        self.minor = minor


class Decisions(Record):
    _fields = ("target", "decisions", "conflicts", "origin", "protect", "labels")

    def __init__(
        self,
        target: Manifest,  # what both sides must become
        decisions: list[Decision],  # sorted by path; paths already in sync are not listed
        conflicts: list[Conflict],
        origin: dict[str, tuple[int, str]],  # target file path -> (side, path there) holding its bytes
        protect: frozenset[str],
        labels: tuple[str, str] = ("a", "b"),
    ) -> None:
        self.target = target
        self.decisions = decisions
        self.conflicts = conflicts
        self.origin = origin
        self.protect = protect
        self.labels = labels

    def counts(self) -> Counter:
        return Counter(d.action for d in self.decisions if not d.minor)

    def render(self) -> str:
        la, lb = self.labels
        sym = {"a>b": f"{la} → {lb}", "b>a": f"{la} ← {lb}", "both": f"{la} ↔ {lb}", "del-a": f"delete {la}",
               "del-b": f"delete {lb}", "conflict": "conflict"}
        copies = {c.copy for c in self.conflicts if c.copy}
        lines = []
        for d in self.decisions:
            if d.minor or d.path in copies:
                continue
            shown = display_path(d.path) or "./"
            lines.append(f"{sym[d.action]:<9} {shown}  ({d.reason})")
        return "\n".join(lines)


def _sig(e: Entry | None) -> tuple | None:
    """What an entry *is* (kind and content), without metadata."""
    if e is None:
        return None
    if isinstance(e, FileEntry):
        return ("f", e.size, e.digest)
    if isinstance(e, LinkEntry):
        return ("l", e.target)
    return ("d",)


def _meta_changed(e: Entry, o: Entry) -> bool:
    """Metadata differs (same kind). Directory mtimes move with their contents: not a change."""
    if isinstance(e, FileEntry):
        return e.mode != o.mode or e.mtime_ns != o.mtime_ns
    if isinstance(e, DirEntry):
        return e.mode != o.mode
    return e.mtime_ns != o.mtime_ns


def _changed(e: Entry | None, o: Entry | None) -> bool:
    if _sig(e) != _sig(o):
        return True
    return e is not None and o is not None and _meta_changed(e, o)


def _pick3(x, y, o, tie: Callable):
    """Three-way merge of one value: equal, or the side that moved away from the base, else tie()."""
    if x == y:
        return x
    if o is not None:
        if x == o:
            return y
        if y == o:
            return x
    return tie(x, y)


def _same_kind(e: Entry | None, o: Entry | None) -> Entry | None:
    return o if e is not None and o is not None and type(e) is type(o) else None


def _merge_meta(ea: Entry, eb: Entry, eo: Entry | None) -> Entry:
    """ea and eb hold the same content: merge their metadata (content and chunks from ea)."""
    o = _same_kind(ea, eo)
    t = _pick3(ea.mtime_ns, eb.mtime_ns, o.mtime_ns if o else None, max)
    if isinstance(ea, LinkEntry):
        return ea.replace(mtime_ns=t)
    assert isinstance(ea, (FileEntry, DirEntry)) and isinstance(eb, (FileEntry, DirEntry))
    if ea.mtime_ns != eb.mtime_ns:
        newer_mode = ea.mode if ea.mtime_ns > eb.mtime_ns else eb.mode
    else:
        newer_mode = max(ea.mode, eb.mode)
    mode = _pick3(ea.mode, eb.mode, o.mode if isinstance(o, (FileEntry, DirEntry)) else None,
                  lambda x, y: newer_mode)
    if mode == ea.mode and t == ea.mtime_ns:
        return ea  # the usual case (both sides agree): no copy
    return ea.replace(mode=mode, mtime_ns=t)


def _take(win: Entry, other: Entry | None, eo: Entry | None) -> Entry:
    """`win`'s content, keeping a permission change the other side made to the same file."""
    if isinstance(win, FileEntry) and isinstance(other, FileEntry):
        o = _same_kind(win, eo)
        mode = _pick3(win.mode, other.mode, o.mode if isinstance(o, FileEntry) else None, lambda x, y: x)
        if mode != win.mode:
            return win.replace(mode=mode)
    return win


def _newer(ea: Entry, eb: Entry) -> int:
    """Which of two differing versions is newer: mtime, then a content-based tie-break (symmetric)."""
    ka = (ea.mtime_ns, repr(_sig(ea)))
    kb = (eb.mtime_ns, repr(_sig(eb)))
    return A if ka > kb else B


def _strip(e: Entry) -> Entry:
    """An entry without cache-only facts (inode, ctime, trusted): the form kept in targets and bases."""
    if e.__class__ is FileEntry and (e.ino or e.ctime_ns or e.trusted):
        # the constructor, not .replace(): this runs for every file of a scanned side
        return FileEntry(e.path, e.size, e.mode, e.mtime_ns, e.digest, e.avg, e.held_sizes, e.digests)
    return e


def reconcile(base: Manifest, a: Manifest, b: Manifest, opts: ReconcileOptions = ReconcileOptions()) -> Decisions:
    """Three-way decisions for sides `a` and `b` given their last agreed `base` (empty: first run).

    Pure: looks only at the manifests. The target it returns is a consistent tree (every entry's
    parent is a directory in it) holding only entries, and bytes, that one of the sides has.
    """
    EA, EB, EO = a.entries, b.entries, base.entries
    la, lb = opts.labels
    label = (la, lb)
    prefer = opts.prefer
    if prefer not in (None, "a", "b", "newer"):
        raise ValueError(f"prefer must be a, b or newer, not {prefer!r}")
    protect = opts.protect

    def protected(p: str) -> bool:
        return bool(protect) and covered(p, protect)

    T: dict[str, Entry] = {}
    origin: dict[str, tuple[int, str]] = {}
    reason: dict[str, str] = {}
    conflicts: dict[str, Conflict] = {}
    pending_copies: list[tuple[str, int, int]] = []  # (path, winner, loser side) needing a copy name
    dropped: list[str] = []  # a non-dir won over a directory with --prefer: nothing stays under it

    def put(p: str, e: Entry, side: int, src: str | None = None) -> None:
        T[p] = _strip(e.replace(path=p) if e.path != p else e)
        if isinstance(e, FileEntry):
            origin[p] = (side, src if src is not None else p)

    # Root: always kept, metadata merged.
    ra, rb = EA.get(""), EB.get("")
    if isinstance(ra, DirEntry) and isinstance(rb, DirEntry):
        put("", _merge_meta(ra, rb, EO.get("")), A)
    elif isinstance(ra, DirEntry) or isinstance(rb, DirEntry):
        put("", ra if isinstance(ra, DirEntry) else rb, A if isinstance(ra, DirEntry) else B)  # type: ignore[arg-type]

    # Pass 1: each path on its own, parents before children (a prefix sorts first).
    for p in sorted((set(EA) | set(EB) | set(EO)) - {""}):
        if protected(p):
            continue
        if dropped and any(is_under(p, d) for d in dropped):
            reason[p] = "replaced by a file or link (--prefer)"
            continue
        ea, eb, eo = EA.get(p), EB.get(p), EO.get(p)
        if ea is not None and ea == eb and ea == eo:  # untouched since the base (most paths)
            put(p, ea, A)  # what _merge_meta would give
            if ea.__class__ is FileEntry:
                reason[p] = "metadata changed"
            continue
        sa, sb, so = _sig(ea), _sig(eb), _sig(eo)
        if sa == sb:
            if ea is None:
                if eo is not None:
                    reason[p] = "deleted on both"
                continue
            assert eb is not None
            put(p, _merge_meta(ea, eb, eo), A)
            if isinstance(ea, FileEntry):
                reason[p] = "metadata changed"
            continue
        ca, cb = sa != so, sb != so  # content (or kind, or existence) changed since the base
        if not ca or not cb:
            # One side changed what the path holds; the other at most its metadata.
            w = B if not ca else A
            ew, eother = (eb, ea) if w == B else (ea, eb)
            lw, lo = label[w], label[1 - w]
            if ew is None:  # the winner deleted it
                assert eother is not None
                if _changed(eother, eo):  # modify beats delete
                    put(p, eother, 1 - w)
                    reason[p] = f"deleted on {lw}, changed on {lo}: restored"
                else:
                    reason[p] = f"deleted on {lw}"
                continue
            put(p, _take(ew, eother, eo), w)
            reason[p] = f"new on {lw}" if eo is None else f"changed on {lw}"
            continue
        # Both changed what the path holds, differently.
        if ea is None or eb is None:  # one deleted, the other changed: modify beats delete
            w = A if ea is not None else B
            put(p, ea if ea is not None else eb, w)  # type: ignore[arg-type]
            reason[p] = f"deleted on {label[1 - w]}, changed on {label[w]}: restored"
            continue
        why = "new on both sides, different" if eo is None else "changed on both sides"
        if prefer in ("a", "b", "newer"):
            w = A if prefer == "a" else B if prefer == "b" else _newer(ea, eb)
            ew = ea if w == A else eb
            put(p, ew, w)
            how = f"--prefer {prefer}" if prefer != "newer" else "--prefer newer"
            conflicts[p] = Conflict(p, w, None, f"{why}; {label[w]}'s version kept ({how})")
            reason[p] = conflicts[p].reason
            if not isinstance(ew, DirEntry):
                dropped.append(p)
            continue
        if isinstance(ea, DirEntry) or isinstance(eb, DirEntry):
            w = A if isinstance(ea, DirEntry) else B
            why += f"; the directory on {label[w]} keeps the name"
        else:
            w = _newer(ea, eb)
            why += f"; {label[w]}'s newer version keeps the name"
        put(p, ea if w == A else eb, w)
        pending_copies.append((p, w, 1 - w))
        reason[p] = why

    # Pass 2: names for conflict copies (after pass 1, so a copy left by an interrupted run is seen).
    def free_name(p: str, loser: Entry, side: int) -> str:
        n = 0
        while True:
            c = conflict_name(p, loser.mtime_ns, label[side], n)
            held = [e for e in (EA.get(c), EB.get(c), T.get(c)) if e is not None]
            if all(_sig(e) == _sig(loser) for e in held) and not protected(c):
                return c
            n += 1

    def add_copy(p: str, w: int, side: int, loser: Entry, why: str) -> None:
        c = free_name(p, loser, side)
        if c not in T:  # else: a copy left by an interrupted run, already kept by pass 1
            put(c, loser, side, src=loser.path)
        conflicts[p] = Conflict(p, w, c, f"{why}; {label[side]}'s version kept as {display_path(c)}")
        reason[p] = conflicts[p].reason

    for p, w, side in pending_copies:
        loser = EA[p] if side == A else EB[p]
        add_copy(p, w, side, loser, reason[p])

    # Pass 3: every entry's parent must be a directory. A directory deleted on one side stays
    # when something under it survives; a file or link standing where a directory must be goes
    # to a conflict copy.
    need: set[str] = set()
    for p in list(T) + [q for q in (set(EA) | set(EB)) if q and protected(q) and not protected(parent_of(q))]:
        q = parent_of(p) if p else None
        while q is not None and q not in need:
            need.add(q)
            q = parent_of(q) if q else None
    for q in sorted(need):
        t = T.get(q)
        if isinstance(t, DirEntry):
            continue
        da, db = EA.get(q), EB.get(q)
        da = da if isinstance(da, DirEntry) else None
        db = db if isinstance(db, DirEntry) else None
        if da is not None and db is not None:
            d: Entry = _merge_meta(da, db, EO.get(q))
        elif da is not None or db is not None:
            d = da if da is not None else db  # type: ignore[assignment]
        else:  # cannot happen for entries taken from a consistent side; keep the tree whole anyway
            d = DirEntry(q, 0o755, 0)
        if t is None:
            put(q, d, A if da is not None else B)
            if q:
                reason[q] = "kept: something inside it was changed or added"
            continue
        # A non-directory won here, but something must live under q: the directory keeps the name.
        side = A if _sig(EA.get(q)) == _sig(t) else B
        loser = t
        dside = A if da is not None else B
        origin.pop(q, None)
        put(q, d, dside)
        add_copy(q, dside, side, loser,
                 f"{label[side]} has a {('file' if isinstance(loser, FileEntry) else 'link')} where "
                 f"{label[dside]} keeps a directory with changes inside")

    # Decisions: compare the target with each side.
    decisions: list[Decision] = []
    for p in sorted((set(EA) | set(EB) | set(T)) - {""}):
        if protected(p):
            continue
        t = T.get(p)
        ea, eb = EA.get(p), EB.get(p)
        oka, okb = _same(t, ea), _same(t, eb)
        if oka and okb:
            continue
        if t is None:
            if ea is not None and eb is not None:  # only through --prefer dropping a subtree
                decisions.append(Decision(p, "del-a", reason.get(p, "dropped")))
                decisions.append(Decision(p, "del-b", reason.get(p, "dropped")))
                continue
            act = "del-a" if ea is not None else "del-b"
        elif p in conflicts:
            act = "conflict"
        elif oka:
            act = "a>b"
        elif okb:
            act = "b>a"
        else:
            act = "both"
        minor = (act != "conflict" and isinstance(t, DirEntry) and _minor_dir(t, ea) and _minor_dir(t, eb))
        decisions.append(Decision(p, act, reason.get(p, _default_reason(act, label)), minor))
    if "" in T:
        t = T[""]
        oka, okb = _same(t, EA.get("")), _same(t, EB.get(""))
        if not (oka and okb):
            act = "a>b" if oka else "b>a" if okb else "both"
            decisions.insert(0, Decision("", act, "root metadata",
                                         _minor_dir(t, EA.get("")) and _minor_dir(t, EB.get(""))))
    conflict_list = [conflicts[p] for p in sorted(conflicts)]
    return Decisions(Manifest(T), decisions, conflict_list, origin, frozenset(protect), (la, lb))


def _same(t: Entry | None, e: Entry | None) -> bool:
    """The side already holds the target entry (content and metadata)."""
    if t is None or e is None:
        return t is None and e is None
    if _sig(t) != _sig(e):
        return False
    if isinstance(t, LinkEntry):
        return t.mtime_ns == e.mtime_ns
    return t.mode == e.mode and t.mtime_ns == e.mtime_ns  # type: ignore[union-attr]


def _minor_dir(t: Entry, e: Entry | None) -> bool:
    """Only a directory's mtime would change (or nothing)."""
    return isinstance(t, DirEntry) and isinstance(e, DirEntry) and t.mode == e.mode


def _default_reason(act: str, label: tuple[str, str]) -> str:
    return {"a>b": f"changed on {label[0]}", "b>a": f"changed on {label[1]}", "both": "metadata merged",
            "del-a": f"deleted on {label[1]}", "del-b": f"deleted on {label[0]}"}.get(act, act)


def side_plans(dec: Decisions, a: Manifest, b: Manifest, *, delete: bool = True) -> tuple[Plan, Plan]:
    """The ordinary Plans that turn each side into the target (pure)."""
    opts = PlanOptions(delete=delete, protect=dec.protect)
    return diff(dec.target, a, opts), diff(dec.target, b, opts)


def settled_base(old: Manifest, dec: Decisions, unsettled: Iterable[str]) -> Manifest:
    """The base to keep after a run: the target, except where some action did not complete on a
    side (and under unreadable paths), where the old base entry stays so the next run decides again."""
    skip = set(unsettled)
    prot = dec.protect

    def protected(p: str) -> bool:
        q = p
        while True:
            if q in prot:
                return True
            if not q:
                return False
            q = parent_of(q)

    out: dict[str, Entry] = {}
    for p in set(dec.target.entries) | set(old.entries):
        e = old.entries.get(p) if (p in skip or (prot and protected(p))) else dec.target.entries.get(p)
        if e is not None:
            out[p] = _strip(e)
    return Manifest(out)


def _scope(base: Manifest, a: Manifest, b: Manifest, refs: tuple[Manifest | None, Manifest | None] = (None, None)
           ) -> set[str]:
    """The paths where a side differs from `base` (entry values: kind, content, chunks, mode,
    mtime), with their ancestors and the root. Everywhere else both sides still hold the base
    entry: in sync, so reconcile, the plans and the new base need look at these paths only.
    refs: per side, a manifest holding the same entries as `base` to compare that side with
    (its scan cache tied to the base: an unchanged file's entry is then the very same object)."""
    out: set[str] = set()
    for E, ref in zip((a.entries, b.entries), refs):
        EO = (ref or base).entries
        get = EO.get
        out.update([p for p, e in E.items() if (o := get(p)) is not e and o != e])
        out.update(EO.keys() - E.keys())
    for p in list(out):
        while p:
            p = parent_of(p)
            if p in out:
                break  # its ancestors are (or will be) added from it
            out.add(p)
    out.add("")
    return out


def _restrict(m: Manifest, scope: set[str], *, every_file: bool = False) -> Manifest:
    """m's entries within `scope`; every_file: a _ScopedSide (files() yields all of m's)."""
    E = m.entries
    sub = {p: E[p] for p in scope if p in E}
    if not every_file:
        return Manifest(sub)
    out = _ScopedSide(sub)
    out.whole = m
    return out


class _ScopedSide(Manifest):
    """A side's entries within a scope whose files() still yields every file of the side, so that
    plan.diff's chunk index can reuse unchanged files too (bytes a remote side is not sent)."""

    __slots__ = ("whole",)

    def files(self) -> Iterator[FileEntry]:
        return self.whole.files()


def _settle_scoped(old: Manifest, dec: Decisions, unsettled: Iterable[str], scope: set[str]
                   ) -> dict[str, Entry | None]:
    """settled_base for a Decisions reconciled on `scope` only (no protected paths), as changes
    to `old` (path -> new base entry, None: removed); `old` holds the base's entries (the
    decoded base, or a side's scan cache tied to it)."""
    skip = set(unsettled)
    T, O = dec.target.entries, old.entries
    changes: dict[str, Entry | None] = {}
    for p in scope:
        e = O.get(p) if p in skip else T.get(p)
        if e != O.get(p):
            changes[p] = None if e is None else _strip(e)
    return changes


def _applied(old: Manifest, changes: dict[str, Entry | None]) -> Manifest:
    """`old` (without cache-only facts) with `changes` applied."""
    new = {p: _strip(e) for p, e in old.entries.items()}
    for p, e in changes.items():
        if e is None:
            new.pop(p, None)
        else:
            new[p] = e
    return Manifest(new)


# -- base records --------------------------------------------------------------------------------

BASE_FORMAT = 2  # 2: a snapshot manifest plus the rows changed since it; 1 (snapshot only) is still read
SPLIT_FORMAT = 3  # 3: as 2, the snapshot in a file of its own (twoway-<pairid>.snap-<id>: two local sides)
_DELTA_MIN = 1024  # a delta may grow to max(this, a quarter of the entries) before a new snapshot


def pair_id(id_a: str, id_b: str) -> str:
    """Name of a pair's state files: hash of the two sides' marker ids (order-independent)."""
    x, y = sorted((id_a, id_b))
    return _sha256(f"{x}\0{y}".encode()).hexdigest()[:32]


class BaseRecord(Record):
    _fields = ("seq", "gen", "specs", "manifest", "snapshot", "delta", "gone", "snap_id")

    def __init__(
        self,
        seq: int,  # 1 for the first committed run of the pair, +1 for each later one
        gen: str,  # random id of this commit (same on both sides when both were written)
        specs: dict[str, str],  # marker id -> how that side was named (a path or host:path)
        manifest: Manifest,
        # The stored form, kept by decode_base so that the next record can reuse the snapshot:
        snapshot: bytes = b"",  # a manifest (manifest.to_bytes), held in the record (format 1, 2)
        delta: tuple = (),  # rows (manifest.encode_rows) that replace or add entries of the snapshot
        gone: tuple = (),  # encoded paths the snapshot has and the record does not
        snap_id: str = "",  # format 3: the snapshot is the file twoway-<pairid>.snap-<snap_id> beside it
    ) -> None:
        self.seq = seq
        self.gen = gen
        self.specs = specs
        self.manifest = manifest
        self.snapshot = snapshot
        self.delta = delta
        self.gone = gone
        self.snap_id = snap_id


def encode_base(rec: BaseRecord, chunker: str) -> bytes:
    """The record with a fresh snapshot of rec.manifest in it (no delta)."""
    from dirsync.manifest import to_bytes

    return _pack_base(rec, to_bytes(rec.manifest, chunker), (), ())


def encode_base_split(rec: BaseRecord, chunker: str) -> tuple[bytes, bytes, str]:
    """(record, snapshot, snapshot id): rec with a fresh snapshot of rec.manifest kept in the
    file twoway-<pairid>.snap-<id> (written before the record, on both sides)."""
    from dirsync.manifest import to_bytes

    sid = os.urandom(8).hex()
    return _pack_base(rec, None, (), (), sid), to_bytes(rec.manifest, chunker), sid


def encode_base_delta(prev: BaseRecord, rec: BaseRecord, changes: dict[str, Entry | None], count: int,
                      chunker: str, *, split: bool = False) -> bytes | None:
    """rec, whose manifest (of `count` entries) is prev's with `changes` applied (path -> new
    entry, None: removed), as prev's snapshot plus a delta: the unchanged entries are not
    encoded again (rec.manifest is not read). `split`: the snapshot stays in its file (prev
    must be format 3), else it is copied into the record (prev must hold it). None when prev
    has no such snapshot, its held one does not check out, or the delta would grow too big:
    write a fresh snapshot then."""
    from dirsync.manifest import _FSENC, encode_rows, load

    if split:
        if not prev.snap_id:
            return None
    else:
        try:
            load(prev.snapshot, chunker)  # framing and checksum only: a damaged snapshot is not passed on
        except ValueError:
            return None
    rows = {r[1]: r for r in prev.delta}
    gone = set(prev.gone)
    for p, e in changes.items():
        if e is None:
            k = p.encode(_FSENC, "surrogateescape")
            rows.pop(k, None)
            gone.add(k)  # harmless when the snapshot lacks it (an earlier delta added it)
    for r in encode_rows([e for e in changes.values() if e is not None]):
        gone.discard(r[1])
        rows[r[1]] = r
    if len(rows) + len(gone) > max(_DELTA_MIN, count // 4):
        return None
    if split:
        return _pack_base(rec, None, tuple(rows.values()), tuple(sorted(gone)), prev.snap_id)
    return _pack_base(rec, prev.snapshot, tuple(rows.values()), tuple(sorted(gone)))


def _pack_base(rec: BaseRecord, snapshot: bytes | None, delta: tuple, gone: tuple, snap_id: str = "") -> bytes:
    import msgpack

    # The header fields first: read_base_head stops at the snapshot (or its id).
    d = {"format": SPLIT_FORMAT if snapshot is None else BASE_FORMAT, "seq": rec.seq, "gen": rec.gen,
         "specs": rec.specs}
    if snapshot is None:
        d["snap"] = snap_id
    else:
        d["manifest"] = snapshot
    d["delta"], d["gone"] = delta, gone
    return msgpack.packb(d, use_bin_type=True)


_SNAP_ID = re.compile(r"[0-9a-f]{16}")


def decode_base(data: bytes, chunker: str, *, header_only: bool = False, own: bool = False,
                snapshot_of: Callable[[str], bytes | None] | None = None) -> BaseRecord:
    """Raises ValueError (ManifestFormatError included) for anything unreadable. `own`: read
    from a local side (our own file), not sent by a remote agent: cheaper row checks.
    `snapshot_of(id)`: the bytes of a format 3 record's snapshot file (None: missing)."""
    import msgpack

    from dirsync.manifest import _decode_own_rows, decode_rows, load

    try:
        d = msgpack.unpackb(data, raw=False, use_list=False)
    except Exception as e:
        raise ValueError(f"two-way base unreadable: {e}") from e
    if not isinstance(d, dict) or d.get("format") not in (1, BASE_FORMAT, SPLIT_FORMAT):
        raise ValueError("not a two-way base record of this version")
    seq, gen, specs = d.get("seq"), d.get("gen"), d.get("specs")
    snapshot, delta, gone = d.get("manifest", b""), d.get("delta", ()), d.get("gone", ())
    snap_id = d.get("snap", "") if d["format"] == SPLIT_FORMAT else ""
    if not isinstance(seq, int) or not isinstance(gen, str) or not isinstance(specs, dict) \
            or not isinstance(snapshot, bytes) or not isinstance(delta, tuple) or not isinstance(gone, tuple) \
            or not all(isinstance(r, tuple) and len(r) > 1 and isinstance(r[1], bytes) for r in delta) \
            or not all(isinstance(g, bytes) for g in gone) \
            or (d["format"] == SPLIT_FORMAT and not (isinstance(snap_id, str) and _SNAP_ID.fullmatch(snap_id))):
        raise ValueError("two-way base record header is malformed")
    m = Manifest()
    if not header_only:
        if snap_id:
            got = snapshot_of(snap_id) if snapshot_of is not None else None
            if got is None:
                raise ValueError(f"two-way base snapshot {snap_id} is missing")
            m = load(got, chunker, own=own).manifest
        else:
            m = load(snapshot, chunker, own=own).manifest
        if delta or gone:
            entries = dict(m.entries)
            for g in gone:
                entries.pop(os.fsdecode(g), None)
            try:
                entries.update((_decode_own_rows if own else decode_rows)(delta))
            except Exception as e:  # a bad path or a row of the wrong shape
                raise ValueError(f"two-way base delta unreadable: {e}") from e
            if "" in m.entries and "" not in entries:
                raise ValueError("two-way base delta drops the root")
            m = Manifest(entries)
    return BaseRecord(seq, gen, {str(k): str(v) for k, v in specs.items()}, m, snapshot, delta, gone, snap_id)


def read_base_head(side: "TwoWaySide", name: str, chunker: str) -> BaseRecord | None:
    """A base record's header (seq, gen, specs; no manifest, no stored form) from the first bytes
    of the file, read whole only when they do not hold it. None: no such file; ValueError: unreadable."""
    import msgpack

    data = side.read_state_head(name)
    if data is None:
        return None
    up = msgpack.Unpacker(raw=False, use_list=False)
    up.feed(data)
    head: dict = {}
    try:
        for _ in range(up.read_map_header()):
            k = up.unpack()
            if k in ("manifest", "snap"):  # the header fields are packed before these (_pack_base)
                break
            head[k] = up.unpack()
        else:
            raise msgpack.OutOfData  # neither: let decode_base say what is wrong
    except msgpack.OutOfData:
        full = side.read_state(name)
        return None if full is None else decode_base(full, chunker, header_only=True)
    except Exception as e:
        raise ValueError(f"two-way base unreadable: {e}") from e
    seq, gen, specs = head.get("seq"), head.get("gen"), head.get("specs")
    if head.get("format") not in (1, BASE_FORMAT, SPLIT_FORMAT):
        raise ValueError("not a two-way base record of this version")
    if not isinstance(seq, int) or not isinstance(gen, str) or not isinstance(specs, dict):
        raise ValueError("two-way base record header is malformed")
    return BaseRecord(seq, gen, {str(k): str(v) for k, v in specs.items()}, Manifest())


def _encode_pending(run_id: str, conflicts: list[Conflict]) -> bytes:
    """The .pending marker: the run and the conflicts it is resolving (so that a rerun after a
    kill still reports them, though the sides may already agree)."""
    import msgpack

    rows = [(os.fsencode(c.path), c.winner, os.fsencode(c.copy), c.reason) for c in conflicts if c.copy]
    return msgpack.packb({"run": run_id, "conflicts": rows}, use_bin_type=True)


def _decode_pending(data: bytes) -> list[Conflict]:
    import msgpack

    try:
        d = msgpack.unpackb(data, raw=False)
        return [Conflict(os.fsdecode(p), int(w), os.fsdecode(c), str(r)) for p, w, c, r in d["conflicts"]]
    except Exception:  # an older or torn marker: it still says "interrupted", nothing more
        return []


# -- sides ---------------------------------------------------------------------------------------

_STATE_NAME = re.compile(r"twoway-[0-9a-f]{32}\.(?:base|pending|step|tie|snap-[0-9a-f]{16})")


class ContentSource:
    """Reads the bytes of one side's files for the other side's send ops (local: from disk)."""

    def __init__(self, root: str, throttle: Callable[[int], None] | None = None) -> None:
        from dirsync.apply import MasterReader

        self.root = root
        self.reader = MasterReader(root, throttle)

    def holds(self, e: FileEntry) -> bool:
        """The file is (still) there as `e` says, by size and mtime; the bytes are verified while read."""
        try:
            st = os.lstat(os.path.join(self.root, e.path))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns

    def sends(self, w: WriteFile) -> Iterator[bytes]:
        return self.reader.sends(w)


class PairReader:
    """The `master` reader for one side's plan: finds each file's bytes wherever the other side
    holds them. Candidates are tried in order; the first whose file still matches is read (every
    chunk is checked against its digest, so a file changed underneath fails that one file)."""

    def __init__(self, candidates: Sequence[tuple[ContentSource, Manifest]]) -> None:
        self.candidates = candidates
        self._index: dict[tuple, list[tuple[ContentSource, FileEntry]]] | None = None

    @property
    def index(self) -> dict[tuple, list[tuple[ContentSource, FileEntry]]]:
        """Built on the first file with bytes to send (a plan of renames and metadata needs none)."""
        if self._index is None:
            self._index = {}
            for src, m in self.candidates:
                for f in m.files():
                    if f.size:
                        self._index.setdefault(_content_key(f), []).append((src, f))
        return self._index

    def sends(self, w: WriteFile) -> Iterator[bytes]:
        if not any(isinstance(o, SendOp) for o in w.ops):
            return
        key = _content_key(w.target)
        for src, m in self.candidates:  # usually the other side holds it at the same path
            e = m.entries.get(w.path)
            if e.__class__ is FileEntry and _content_key(e) == key and src.holds(e):  # type: ignore[arg-type]
                yield from src.sends(WriteFile(e, w.ops, None))  # type: ignore[arg-type]
                return
        for src, e in self.index.get(key, ()):
            if src.holds(e):
                yield from src.sends(WriteFile(e, w.ops, None))
                return
        raise SourceChangedError(w.path, "read", "the other side no longer holds this version; "
                                                 "it will be synced next run")


def _content_key(f: FileEntry) -> tuple:
    # (chunk sizes follow from the content and the chunk class: not unpacked for every file)
    return (f.size, f.digest, f.avg, f.digests)


class TwoWaySide:
    """One side of a two-way pair: a local directory (RemoteTwoWaySide: one behind an agent)."""

    is_remote = False
    keeps_snapshots = True  # can hold a base snapshot file (twoway-<pairid>.snap-<id>) of its own

    def __init__(self, spec: str, label: str, topts=None) -> None:
        from dirsync.transport import TransportOptions
        from dirsync.transport.local import LocalTransport

        self.spec = spec
        self.label = label
        self.root = os.path.abspath(spec)
        self.key = os.path.realpath(spec)  # how base records name this side
        self.transport = LocalTransport(spec, topts or TransportOptions())
        self.info = None

    # state files in SIDE/.dirsync (only twoway-<pairid>.base / .pending)
    def _state(self, name: str) -> str:
        if not _STATE_NAME.fullmatch(name):
            raise ValueError(f"bad two-way state file name {name!r}")
        from dirsync.scan import STATE_DIR

        return os.path.join(self.root, STATE_DIR, name)

    def peek_marker(self) -> str | None:
        """The side's marker id, read without taking anything over (None: no marker)."""
        from dirsync.replica import MARKER
        from dirsync.scan import STATE_DIR

        try:
            with open(os.path.join(self.root, STATE_DIR, MARKER), "rb") as f:
                return str(json.loads(f.read())["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def list_bases(self) -> list[str]:
        from dirsync.scan import STATE_DIR

        try:
            names = os.listdir(os.path.join(self.root, STATE_DIR))
        except OSError:
            return []
        return sorted(n for n in names if _STATE_NAME.fullmatch(n) and n.endswith(".base"))

    def read_state(self, name: str) -> bytes | None:
        """The file's bytes; a base snapshot (megabytes, written only by rename) is mapped
        instead (see state.map_or_read)."""
        try:
            with open(self._state(name), "rb") as f:
                if ".snap-" in name:
                    from dirsync.state import map_or_read

                    return map_or_read(f)  # type: ignore[return-value]
                return f.read()
        except FileNotFoundError:
            return None

    def read_state_head(self, name: str, size: int = 1 << 16) -> bytes | None:
        """The first `size` bytes of a state file (a base record's header is in them)."""
        try:
            with open(self._state(name), "rb") as f:
                return f.read(size)
        except FileNotFoundError:
            return None

    def write_state(self, name: str, data: bytes) -> None:
        """Atomic and durable. A failure (a full disk) ends the run with that one error: before
        applying (the .pending marker) nothing has changed; after (the base record) the sides
        hold their new content and the next run, finding both alike, records it."""
        from dirsync.state import write_atomic

        try:
            write_atomic(self._state(name), data)
        except OSError as e:
            raise ItemIOError(f".dirsync/{name}", "write two-way state", e) from None

    def write_hint(self, name: str, data: bytes) -> None:
        """write_state for a file that is only a shortcut (the .step note): atomic, not fsynced.
        One lost or left stale by a crash names ids and fingerprints that no longer match, and
        one torn does not decode: either way the next run just does the whole work (and so
        when it cannot be written at all)."""
        try:
            _write_unsynced(self._state(name), data)
        except OSError:
            pass

    def remove_state(self, name: str) -> None:
        try:
            os.unlink(self._state(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ItemIOError(f".dirsync/{name}", "remove two-way state", e) from None

    def prune_snapshots(self, pid: str, keep: str) -> None:
        """Remove the pair's base snapshot files other than `keep` (no record names them)."""
        from dirsync.scan import STATE_DIR

        try:
            names = os.listdir(os.path.join(self.root, STATE_DIR))
        except OSError:
            return
        for n in names:
            if n.startswith(f"twoway-{pid}.snap-") and n != f"twoway-{pid}.snap-{keep}" and _STATE_NAME.fullmatch(n):
                try:
                    self.remove_state(n)
                except OSError:
                    pass

    def looks_empty(self) -> bool:
        """Missing, or nothing in it but dirsync's own folder (read without taking anything over)."""
        from dirsync.scan import STATE_DIR

        try:
            return all(n == STATE_DIR for n in os.listdir(self.root))
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def ignore_patterns(self) -> list[str]:
        from dirsync.scan import read_ignore_file

        return read_ignore_file(self.root)

    # the replica contract
    def open(self, *, init: bool, readonly: bool, walk: list[str] | None = None):
        """`walk`: the patterns scan() will get; its tree walk starts now in a child process
        (LocalTransport.open_start), beside whatever this process does until then."""
        if walk is not None and not self.is_remote:
            self.transport.open_start(walk, init=init, readonly=readonly)
            self.info = self.transport.open_finish()
        else:
            self.info = self.transport.open(init=init, readonly=readonly)
        return self.info

    def scan(self, patterns: list[str]):
        return self.transport.scan(patterns)

    def apply(self, actions, reader: PairReader, sink, should_stop: Callable[[], bool]) -> None:
        self.transport.apply(actions, reader, sink, should_stop)  # type: ignore[arg-type]

    def close(self, *, save: bool) -> str:
        """Release the side; returns the generation of its scan cache as saved ("" if none)."""
        return self.transport.close(save=save)

    def source(self, throttle=None) -> ContentSource:
        return ContentSource(self.root, throttle)


class RemoteContentSource(ContentSource):
    """Reads a remote side's file bytes through its agent (every chunk verified there and here)."""

    def __init__(self, transport, throttle: Callable[[int], None] | None = None) -> None:
        self.transport = transport
        self.throttle = throttle

    def holds(self, e: FileEntry) -> bool:
        return True  # checked while reading: a file changed since the scan fails its digests

    def sends(self, w: WriteFile) -> Iterator[bytes]:
        for piece in self.transport.pull(w):
            if self.throttle:
                self.throttle(len(piece))
            yield piece


class RemoteTwoWaySide(TwoWaySide):
    """A side on another machine: the replica contract through RemoteTransport, the two-way
    state files and file reads through requests to the same agent (confined to its root)."""

    is_remote = True

    def __init__(self, spec: str, label: str, topts=None) -> None:
        from dirsync.transport import TransportOptions
        from dirsync.transport.remote import RemoteTransport

        self.spec = spec
        self.label = label
        self.transport = RemoteTransport(spec, topts or TransportOptions())
        self.root = self.transport.path
        self.key = str(self.transport.ep)  # how base records name this side
        self.info = None

    def _tw(self, op: str, **kw):
        return self.transport.twoway_request(op, **kw)

    def peek_marker(self) -> str | None:
        return self._tw("peek")

    def list_bases(self) -> list[str]:
        return [n for n in self._tw("list") if _STATE_NAME.fullmatch(n) and n.endswith(".base")]

    def read_state(self, name: str) -> bytes | None:
        if not _STATE_NAME.fullmatch(name):
            raise ValueError(f"bad two-way state file name {name!r}")
        return self._tw("read", name=name)

    @property
    def keeps_snapshots(self) -> bool:  # type: ignore[override]
        """An agent that takes snapshot files and `head` requests (its hello lists "tw2"); an older
        one keeps records with the snapshot inside, moved whole each run."""
        self.transport._start()  # its hello says (a no-op once connected)
        return self.transport.tw_level >= 2

    def read_state_head(self, name: str, size: int = 1 << 16) -> bytes | None:
        if not self.keeps_snapshots:
            return self.read_state(name)
        if not _STATE_NAME.fullmatch(name):
            raise ValueError(f"bad two-way state file name {name!r}")
        return self._tw("head", name=name, size=max(1, min(size, 1 << 20)))

    def write_state(self, name: str, data: bytes) -> None:
        if not _STATE_NAME.fullmatch(name):
            raise ValueError(f"bad two-way state file name {name!r}")
        self._tw("write", name=name, data=data)

    def write_hint(self, name: str, data: bytes) -> None:
        try:
            self.write_state(name, data)
        except DirsyncError as e:
            if e.exit_code != ExitCode.PARTIAL:  # (the link failed: the next request says so)
                raise
            # the far side could not write it (a full disk): only a shortcut, as on a local side

    def remove_state(self, name: str) -> None:
        if not _STATE_NAME.fullmatch(name):
            raise ValueError(f"bad two-way state file name {name!r}")
        self._tw("remove", name=name)

    def looks_empty(self) -> bool:
        return bool(self._tw("empty"))

    def ignore_patterns(self) -> list[str]:
        return list(self._tw("ignore"))

    def close(self, *, save: bool) -> str:
        self.transport.close(save=save)
        return ""

    def source(self, throttle=None) -> ContentSource:
        return RemoteContentSource(self.transport, throttle)

    def prune_snapshots(self, pid: str, keep: str) -> None:
        if not self.keeps_snapshots:
            return  # an older agent holds no snapshot files (its records keep theirs inside)
        for n in self._tw("list"):
            if n.startswith(f"twoway-{pid}.snap-") and n != f"twoway-{pid}.snap-{keep}" and _STATE_NAME.fullmatch(n):
                self.remove_state(n)


def make_side(spec: str, label: str, topts=None) -> TwoWaySide:
    from dirsync.transport import is_remote_spec

    if is_remote_spec(spec):
        return RemoteTwoWaySide(spec, label, topts)
    return TwoWaySide(spec, label, topts)


# -- a run ---------------------------------------------------------------------------------------


class TwoWayConfig(Record):
    _fields = (
        "a", "b", "prefer", "delete", "init", "excludes", "max_delete", "allow_mass_delete", "dry_run",
        "transport", "bwlimit",
    )

    def __init__(
        self,
        a: str,
        b: str,
        prefer: str | None = None,
        delete: bool = True,
        init: bool = False,
        excludes: tuple[str, ...] = (),
        max_delete: int | None = None,  # per side
        allow_mass_delete: bool = False,
        dry_run: bool = False,
        transport: object = None,  # TransportOptions
        bwlimit: int | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self.prefer = prefer
        self.delete = delete
        self.init = init
        self.excludes = excludes
        self.max_delete = max_delete
        self.allow_mass_delete = allow_mass_delete
        self.dry_run = dry_run
        self.transport = transport
        self.bwlimit = bwlimit

    @classmethod
    def from_sync(cls, cfg, prefer: str | None) -> "TwoWayConfig":
        """From the SyncConfig the `sync`/`plan` commands build (MASTER is side a, the one REPLICA side b)."""
        if len(cfg.replicas) != 1:
            raise ConfigError(f"--two-way takes exactly two directories, got {1 + len(cfg.replicas)}",
                              hint="dirsync sync --two-way A B")
        if prefer not in (None, "a", "b", "newer"):
            raise ConfigError(f"--prefer must be a, b or newer, not {prefer!r}")
        return cls(a=cfg.master, b=cfg.replicas[0], prefer=prefer, delete=cfg.delete, init=cfg.init,
                   excludes=tuple(cfg.excludes), max_delete=cfg.max_delete, allow_mass_delete=cfg.allow_mass_delete,
                   dry_run=cfg.dry_run, transport=cfg.transport, bwlimit=cfg.bwlimit)


class SideSummary(ReplicaSummary):
    """A side's outcomes, also counting completed actions per path (what may enter the base)."""

    _fields = ReplicaSummary._fields + ("done_paths",)

    def __init__(self, replica: str, done_paths: Counter | None = None, **kw: Any) -> None:
        super().__init__(replica, **kw)
        self.done_paths = Counter() if done_paths is None else done_paths

    def done(self, a, path: str) -> None:
        super().done(a, path)
        self.done_paths[path] += 1


def _new_summary(spec: str) -> SideSummary:
    return SideSummary(replica=spec)


class TwoWaySummary(Record):
    _fields = (
        "a", "b", "decisions", "plans", "sides", "scan_errors", "warnings", "dry_run", "base_seq", "seconds",
        "carried", "held",
    )
    _compare = ("a", "b", "decisions", "plans", "sides", "scan_errors", "warnings", "dry_run", "base_seq", "seconds", "carried")

    def __init__(
        self,
        a: str,
        b: str,
        decisions: Decisions | None = None,
        plans: tuple[Plan, Plan] | None = None,
        sides: list | None = None,  # two ReplicaSummary
        scan_errors: list[ItemError] | None = None,
        warnings: list[str] | None = None,
        dry_run: bool = False,
        base_seq: int = 0,
        seconds: float = 0.0,
        carried: list[Conflict] | None = None,  # made by an interrupted run, reported now
        # What the run built (scans, caches, base), kept until the summary goes: freeing a 10,000-
        # file run's entries one by one took ~40 ms, which a CLI run ending in os._exit never pays.
        held: list | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self.decisions = decisions
        self.plans = plans
        self.sides = [] if sides is None else sides
        self.scan_errors = [] if scan_errors is None else scan_errors
        self.warnings = [] if warnings is None else warnings
        self.dry_run = dry_run
        self.base_seq = base_seq
        self.seconds = seconds
        self.carried = [] if carried is None else carried
        self.held = [] if held is None else held

    @property
    def conflicts(self) -> list[Conflict]:
        return (self.decisions.conflicts if self.decisions else []) + self.carried

    @property
    def exit_code(self) -> int:
        codes = {int(s.exit_code) for s in self.sides}
        if self.scan_errors or any(s.errors for s in self.sides):
            codes.add(ExitCode.PARTIAL)
        for c in (ExitCode.INTERRUPTED, ExitCode.ERROR, ExitCode.CONNECT, ExitCode.PROTOCOL, ExitCode.LOCKED,
                  ExitCode.REFUSED, ExitCode.USAGE, ExitCode.DELETE_LIMIT, ExitCode.PARTIAL):
            if c in codes:
                return int(c)
        if any(c.copy for c in self.conflicts):
            return int(ExitCode.CONFLICTS)
        return 0

    def to_json(self) -> dict:
        counts = self.decisions.counts() if self.decisions else Counter()
        return {
            "two_way": True, "a": self.a, "b": self.b, "exit_code": self.exit_code, "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3), "base_seq": self.base_seq,
            "decisions": {"a_to_b": counts["a>b"], "b_to_a": counts["b>a"], "merged": counts["both"],
                          "deleted_on_a": counts["del-a"], "deleted_on_b": counts["del-b"],
                          "conflicts": counts["conflict"]},
            "conflicts": [{"path": display_path(c.path), "winner": self.decisions.labels[c.winner],  # type: ignore[union-attr]
                           "copy": display_path(c.copy) if c.copy else None, "reason": c.reason}
                          for c in self.conflicts],
            "scan_errors": [{"path": display_path(e.path), "op": e.op, "code": e.code, "message": str(e)}
                            for e in self.scan_errors],
            "warnings": self.warnings,
            "sides": [s.to_json() for s in self.sides],
        }


def _check_sides(a: TwoWaySide, b: TwoWaySide) -> None:
    if a.is_remote or b.is_remote:
        if a.key == b.key:
            raise RefusedError(f"{a.spec} and {b.spec} are the same directory")
        return
    ra, rb = a.key, b.key
    if ra == rb or ra.startswith(rb.rstrip("/") + "/") or rb.startswith(ra.rstrip("/") + "/"):
        raise RefusedError(f"{a.spec} and {b.spec} overlap; two-way sync needs two separate trees")


def _guard_markers(x: TwoWaySide, y: TwoWaySide, chunker: str) -> None:
    """Refuse when x is not the directory y was last synced with (marker gone or different):
    an unmounted disk or a replaced folder must not read as "everything was deleted"."""
    mx, my = x.peek_marker(), y.peek_marker()
    if my is None:
        return
    if mx is not None and y.read_state_head(f"twoway-{pair_id(mx, my)}.base", 1) is not None:
        return
    for name in y.list_bases():
        try:
            rec = read_base_head(y, name, chunker)
        except ValueError:
            continue
        if rec is None:
            continue
        for mid, spec in rec.specs.items():
            if spec == x.key and mid != my and mid != mx:
                what = "missing" if mx is None else "not the one it had"
                raise RefusedError(
                    f"{x.spec} is not the directory {y.spec} was last synced with: its .dirsync marker is {what} "
                    "(unmounted, replaced or wiped?); nothing was changed",
                    hint="check that it is mounted; to sync the two as a first run (a union, nothing deleted), "
                         "pass --init")


def run_twoway(cfg: TwoWayConfig, reporter, should_stop: Callable[[], bool] = lambda: False) -> TwoWaySummary:
    """One two-way run between cfg.a and cfg.b (see the module docstring), with the cyclic
    garbage collector paused (runtime.gc_paused: 0.13 s of a 1.2 s run after 1% changes on a
    10,000-file pair, 183 collections, went to walking objects that hold no cycles)."""
    with gc_paused():
        return _run_twoway(cfg, reporter, should_stop)


def _run_twoway(cfg: TwoWayConfig, reporter, should_stop: Callable[[], bool]) -> TwoWaySummary:
    from dirsync import chunking
    from dirsync.apply import Stopwatch, TokenBucket

    watch = Stopwatch()
    chunker = chunking.CHUNKER_ID
    sa, sb = make_side(cfg.a, "a", cfg.transport), make_side(cfg.b, "b", cfg.transport)
    _check_sides(sa, sb)
    if not cfg.init:
        _guard_markers(sa, sb, chunker)
        _guard_markers(sb, sa, chunker)
    summ = TwoWaySummary(cfg.a, cfg.b, dry_run=cfg.dry_run)
    summ.sides = [_new_summary(cfg.a), _new_summary(cfg.b)]
    opened: list[TwoWaySide] = []
    ok = False
    pid: str | None = None
    ties: list[dict | None] = [None, None]  # each side's tie as read (see _tied_cache)
    tied = [False, False]  # the side's replica holds the new base exactly: tie its cache to it
    tie_base = ""
    step_after = False  # note a "nothing to do" finding for the trees this run leaves
    scans: list = []
    base = Manifest()
    # A never-synced, non-empty side needs --init only when the other side is not empty either:
    # seeding an empty or new directory from an existing one is the usual first run.
    init = (cfg.init or sb.looks_empty(), cfg.init or sa.looks_empty())
    # Two local sides: b's tree is walked by a child process while this one scans a.
    patterns = None if sa.is_remote or sb.is_remote else \
        list(cfg.excludes) + sa.ignore_patterns() + sb.ignore_patterns()
    try:
        for s, s_init in zip((sa, sb), init):
            info = s.open(init=s_init, readonly=cfg.dry_run, walk=patterns if s is sb else None)
            opened.append(s)
            for w in info.warnings:
                w = w.replace(", no deletions this run", "")  # the scan cache only: the base decides deletions
                summ.warnings.append(f"{s.spec}: {w}")
                reporter.warn(f"{s.spec}: {w}")

        # The base: the newer record of the two sides (a crash between the two writes leaves one behind).
        ida, idb = sa.peek_marker(), sb.peek_marker()
        pid = pair_id(ida, idb) if ida and idb else None
        base = Manifest()
        earlier: list[Conflict] = []  # conflicts an interrupted run made (its copies may be all that is left)
        clean = False  # both sides hold the same base record and no run was interrupted
        best_rec: BaseRecord | None = None  # the newer record's header
        heads: list[tuple[TwoWaySide, BaseRecord]] = []  # (side, header of its record)
        if pid is not None:
            for s in (sa, sb):
                try:
                    h = read_base_head(s, f"twoway-{pid}.base", chunker)
                except ValueError as e:
                    summ.warnings.append(f"{s.spec}: two-way base unusable ({e})")
                    reporter.warn(f"{s.spec}: two-way base unusable ({e}); using the other side's")
                    continue
                if h is not None:
                    heads.append((s, h))
            recs = [h for _, h in heads]
            if recs:
                best_rec = max(recs, key=lambda r: r.seq)
                summ.base_seq = best_rec.seq
                if len(recs) == 2 and recs[0].gen != recs[1].gen:
                    reporter.warn("the last two-way run stopped while saving its state; using the newer record")
            pend = [d for d in (s.read_state(f"twoway-{pid}.pending") for s in (sa, sb)) if d is not None]
            if pend:
                msg = "the previous two-way run between these directories was interrupted; reconciling"
                summ.warnings.append(msg)
                reporter.warn(msg)
                for d in pend:
                    earlier += [c for c in _decode_pending(d) if c not in earlier]
            clean = (len(recs) == 2 and recs[0].gen == recs[1].gen and not pend
                     and recs[0].specs == {ida: sa.key, idb: sb.key})

        if patterns is None:
            patterns = list(cfg.excludes) + sa.ignore_patterns() + sb.ignore_patterns()
        for s in (sa, sb):  # a remote side walks its tree while the local one is scanned
            if s.is_remote:
                s.transport.scan_start(patterns)
        scans = [s.scan(patterns) for s in (sa, sb)]
        protect: set[str] = set()
        for s, r in zip((sa, sb), scans):
            for w in r.warnings:
                reporter.warn(f"{s.spec}: {w}")
            for e in r.errors:
                summ.scan_errors.append(e)
                reporter.error(f"{s.spec}: {e}")
            protect |= r.protect
        step = _step_key(cfg, recs[0].gen, (ida, idb), [r.fingerprint for r in scans], scans, opened) \
            if clean else None
        if step is not None and step == _read_step(sa, pid):
            # Both trees are exactly as when a clean run last found nothing to do (fingerprints
            # of every path's stat facts, caches racy-clean), and the base is still that run's.
            summ.decisions = Decisions(Manifest(), [], [], {}, frozenset(), (cfg.a, cfg.b))
            summ.plans = (Plan(()), Plan(()))
            for sm in summ.sides:
                sm.planned = False
                if cfg.dry_run:
                    sm.status = "dry-run"
            ok = True
            return summ

        def stored(header_only: bool) -> Iterator[tuple[TwoWaySide, bytes, BaseRecord]]:
            """The base records, read whole: the newer first (a local side's copy first); one that
            does not decode is warned about and skipped (identical records may still differ in
            their snapshot files)."""
            assert best_rec is not None
            for s, _h in sorted(heads, key=lambda x: (x[1].gen != best_rec.gen, x[0].is_remote)):  # type: ignore
                data = s.read_state(f"twoway-{pid}.base")
                if data is None:
                    continue
                try:
                    yield s, data, decode_base(data, chunker, header_only=header_only, own=not s.is_remote,
                                               snapshot_of=lambda i, s=s: s.read_state(f"twoway-{pid}.snap-{i}"))
                except ValueError as e:
                    nonlocal base_trouble
                    base_trouble = True
                    msg = f"two-way base unusable ({e})"
                    if msg not in summ.warnings:
                        summ.warnings.append(msg)
                        reporter.warn(msg)

        def load_base() -> Manifest:
            """Decode the base: the newer record, else the other side's (a base-less run is a
            union that deletes nothing, so even losing both loses no data)."""
            nonlocal base_rec
            for _s, _data, rec in (stored(False) if best_rec is not None else ()):
                base_rec = rec
                return rec.manifest
            return Manifest()

        ma, mb = scans[0].manifest, scans[1].manifest
        reserved = tuple(sorted({r for s in (sa, sb) for r in (s.info.reserved if s.info else ())}))
        ropts = ReconcileOptions(prefer=cfg.prefer, protect=frozenset(protect))
        # Where both sides still hold the base entry there is nothing to decide: reconcile, plan
        # and record only the other paths (the scope). `ref` holds the base's entries: a side's
        # scan cache tied to the base record (no decoding, and its unchanged entries are the
        # very objects the scan returned), else the decoded base. Not with protected or reserved
        # paths or an interrupted run's conflicts to carry, and not when a conflict arises (copy
        # names and --prefer drops look at whole trees): those runs reconcile everything.
        base_rec: BaseRecord | None = None  # the record `ref` holds (snapshot and delta for the next one)
        base_trouble = False  # a record did not decode: the next one gets a fresh snapshot
        ref: Manifest | None = None
        ties = [_read_tie(s, pid) for s in (sa, sb)]
        scopable = best_rec is not None and not protect and not reserved and not earlier
        tied_caches: tuple = (None, None)
        if scopable:
            tied_caches = tuple(_tied_cache(s, tie, best_rec.gen) for s, tie in zip((sa, sb), ties))  # type: ignore
            ref = tied_caches[0] or tied_caches[1]
            if ref is not None:  # the record's stored form (not its rows), for the next one's delta
                base_rec = next((r for _s, _d, r in stored(True) if r.gen == best_rec.gen), None)  # type: ignore
                if base_rec is None:
                    ref, tied_caches = None, (None, None)
        if ref is None:
            base = load_base()
            if reserved:
                from dirsync.verify import filter_manifest

                ma, mb, base = (filter_manifest(m, [], reserved) for m in (ma, mb, base))
            elif scopable and base.entries:
                ref = base
        scope = _scope(ref, ma, mb, tied_caches) if ref is not None else None
        dec = None
        pla, plb = ma, mb  # what the plans are made against
        if scope is not None:
            assert ref is not None
            # A local side copies only from changed files; a remote one from any (sends less).
            sma, smb = (_restrict(m, scope, every_file=s.is_remote) for m, s in ((ma, sa), (mb, sb)))
            dec = reconcile(_restrict(ref, scope), sma, smb, ropts)
            if dec.conflicts:
                dec = scope = None
            else:
                pla, plb = sma, smb
                base = ref
        if dec is None:
            if ref is not None and ref is not base:
                base = load_base()
            dec = reconcile(base, ma, mb, ropts)
        summ.decisions = dec
        now = {c.copy for c in dec.conflicts}
        summ.carried = [c for c in earlier if c.copy and c.copy not in now and c.copy in dec.target.entries]
        pa, pb = side_plans(dec, pla, plb, delete=cfg.delete)
        intended = (pa, pb)  # what reaching the target takes; a guard may hold some of it back
        pa, pb = _guards(cfg, base, (ma, mb), (pa, pb), dec, summ, reporter, (pla, plb))
        summ.plans = (pa, pb)
        if cfg.dry_run:
            for s in summ.sides:
                s.status = "dry-run"
            ok = True
            return summ

        if scope is not None:
            changes = _settle_scoped(base, dec, (), scope)
            same_keys = all(e is not None and p in base.entries for p, e in changes.items())
        else:
            same_keys = settled_base(base, dec, ()).keys() == base.keys()
        if clean and all(p.empty for p in intended) and not summ.carried and same_keys:
            # Nothing to do and nothing new to record: the base stays. Note the finding, so the
            # next run over unchanged trees can skip decoding and reconciling.
            if step is not None and not dec.decisions and not dec.conflicts and not summ.warnings:
                data = _encode_step(step)
                for s in (sa, sb):
                    s.write_hint(f"twoway-{pid}.step", data)
            if scope is not None and base_rec is not None:  # the base stays: tie the caches to it
                tie_base = base_rec.gen
                tied = [_holds(s, scope, base, {}) for s in (sa, sb)]
            ok = True
            return summ

        # Apply: a first (reading b's untouched files), then b (reading a's files where they are now).
        ida, idb = sa.peek_marker(), sb.peek_marker()
        assert ida and idb, "open() leaves a marker on both sides"
        pid = pair_id(ida, idb)
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()
        marker = _encode_pending(run_id, summ.conflicts)
        for s in (sa, sb):
            s.write_state(f"twoway-{pid}.pending", marker)
        srcs_a = sa.source(TokenBucket(cfg.bwlimit) if cfg.bwlimit else None)
        srcs_b = sb.source(TokenBucket(cfg.bwlimit) if cfg.bwlimit else None)
        readers = (PairReader([(srcs_b, mb)]), PairReader([(srcs_a, dec.target), (srcs_a, ma)]))
        for i, (s, plan) in enumerate(((sa, pa), (sb, pb))):
            sm = summ.sides[i]
            if plan.empty:
                continue
            t = plan.totals()
            sm.on_progress = reporter.advance
            reporter.begin(s.spec, t.send_bytes + t.reuse_bytes)
            sw = Stopwatch()
            try:
                s.apply(plan.actions, readers[i], sm, should_stop)
            finally:
                reporter.end()
                sm.seconds = sw.elapsed()
            reporter.item_errors(s.spec, sm.errors)
            for w in sm.warnings:
                reporter.warn(f"{s.spec}: {w}")

        # Commit the base: what both sides now agree on.
        unsettled: set[str] = set()
        for plan, sm in zip(intended, summ.sides):
            need = Counter(a.path for a in plan.actions if not isinstance(a, Commit))  # type: ignore[union-attr]
            unsettled |= {p for p, n in need.items() if sm.done_paths[p] < n}
        rec = BaseRecord(summ.base_seq + 1, os.urandom(8).hex(), {ida: sa.key, idb: sb.key}, Manifest())
        split = sa.keeps_snapshots and sb.keeps_snapshots  # else the snapshot goes inside the record
        data, snap = None, None
        if scope is not None:
            changes = _settle_scoped(base, dec, unsettled, scope)
            if base_rec is not None and not base_trouble and (not base_rec.snap_id or all(
                    s.read_state_head(f"twoway-{pid}.snap-{base_rec.snap_id}", 1) is not None for s in (sa, sb))):
                count = len(base.entries) + sum((e is not None) - (p in base.entries) for p, e in changes.items())
                data = encode_base_delta(base_rec, rec, changes, count, chunker, split=split)
            if data is None:
                rec.manifest = _applied(base, changes)
            tie_base = rec.gen
            tied = [_holds(s, scope, base, changes) for s in (sa, sb)]
            # Both sides left holding the new base exactly, nothing reported: a rerun would find
            # nothing to do. Note it (with the fingerprints of the caches close saves), so that
            # the next run over trees left as they are skips decoding and reconciling.
            step_after = all(tied) and not summ.warnings and not summ.scan_errors and \
                not any(sm.errors or sm.warnings or sm.exit_code for sm in summ.sides)
        else:
            rec.manifest = settled_base(base, dec, unsettled)
            tie_base = rec.gen  # (a first run, conflicts...): compare whole trees for the ties
            tied = [_holds(s, None, rec.manifest, {}) for s in (sa, sb)]
        if data is None and split:
            data, snap, sid = encode_base_split(rec, chunker)
            for s in (sa, sb):
                s.write_state(f"twoway-{pid}.snap-{sid}", snap)
        elif data is None:
            data = encode_base(rec, chunker)
        for s in (sa, sb):
            s.write_state(f"twoway-{pid}.base", data)
        for s in (sa, sb):
            s.remove_state(f"twoway-{pid}.pending")
            if snap is not None or not split:  # both records name the new snapshot, or none
                s.prune_snapshots(pid, keep=sid if snap is not None else "")
        summ.base_seq = rec.seq
        for sm in summ.sides:
            if sm.exit_code == 0 and sm.errors:
                sm.exit_code = int(ExitCode.PARTIAL)
                sm.status = "partial"
        ok = True
    finally:
        summ.held += [scans, base] + [getattr(s.transport, "replica", None) for s in opened]
        gens = [s.close(save=ok) for s in opened]
        summ.seconds = watch.elapsed()
        if ok and pid is not None:  # after the caches are saved: a tie names what was saved
            for s, gen, tie, t in zip(opened, gens, ties, tied):
                if t and gen and tie != {"base": tie_base, "cache": gen}:
                    _write_tie(s, pid, tie_base, gen)
            if step_after and all(gens):
                fps = [getattr(s.transport, "closed_fingerprint", b"") for s in (sa, sb)]
                note = _step_key(cfg, tie_base, (sa.peek_marker(), sb.peek_marker()), fps, scans, (sa, sb))
                for s in (sa, sb) if note is not None else ():
                    try:
                        s.write_hint(f"twoway-{pid}.step", _encode_step(note))
                    except OSError:
                        pass  # a shortcut only
    return summ


def _step_key(cfg: TwoWayConfig, base_gen: str, ids: tuple, fps: Sequence[bytes], scans: list,
              sides: Sequence["TwoWaySide"]) -> dict | None:
    """What must hold again for a "nothing to do" finding to stand (`fps`: the two trees'
    fingerprints), or None when this run cannot take or give one (a tree without a
    fingerprint, anything reported while scanning)."""
    if any(not fp for fp in fps) or any(r.errors or r.warnings for r in scans) or \
            any(s.info is None or s.info.warnings for s in sides):
        return None
    reserved = sorted({r for s in sides for r in s.info.reserved})
    return {"base": base_gen, "fp": {ids[0]: fps[0].hex(), ids[1]: fps[1].hex()},
            "opts": f"prefer={cfg.prefer} delete={int(cfg.delete)} reserved={'/'.join(reserved)}"}


def _encode_step(step: dict) -> bytes:
    return json.dumps(step, sort_keys=True).encode()


def _read_step(side: "TwoWaySide", pid: str) -> dict | None:
    data = side.read_state(f"twoway-{pid}.step")
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


# Ties: SIDE/.dirsync/twoway-<pairid>.tie says that the side's scan cache of generation `cache`
# holds exactly the entries of base record `base` (kind, content, mode, mtime on every path). A
# run writes it after saving the cache, only when the replica was seen to hold the new base (see
# _holds); both ids are random per write, so a tie that names anything else is simply ignored,
# and one lost in a crash costs a base decode. Local sides only.


def _read_tie(side: "TwoWaySide", pid: str | None) -> dict | None:
    if pid is None or side.is_remote:
        return None
    data = side.read_state(f"twoway-{pid}.tie")
    try:
        tie = json.loads(data) if data else None
    except ValueError:
        return None
    return tie if isinstance(tie, dict) else None


def _tied_cache(side: "TwoWaySide", tie: dict | None, base_gen: str) -> Manifest | None:
    """The side's scan cache (as the scan used it) when `tie` says it holds base record `base_gen`."""
    if tie is None or side.is_remote or not base_gen or tie.get("base") != base_gen:
        return None
    rep = getattr(side.transport, "replica", None)
    cache = rep.cache if rep is not None else None
    if cache is None or not cache.generation or tie.get("cache") != cache.generation:
        return None
    try:
        return cache.manifest
    except ValueError:  # rows that do not decode (the scan rebuilt without them)
        return None


def _holds(side: "TwoWaySide", scope: set[str] | None, old: Manifest, changes: dict[str, Entry | None]) -> bool:
    """The side's replica now holds `old` with `changes` on every path of `scope`. Outside the
    scope it holds what its scan found, which `old` holds there (see _scope). scope None:
    compare every path (the replica holds exactly `old`)."""
    rep = None if side.is_remote else getattr(side.transport, "replica", None)
    if rep is None or rep.scanned is None:
        return False
    cur = rep.current if rep.touched else rep.scanned.entries  # reading `current` would copy the scan
    O = old.entries
    if scope is None:
        return not changes and cur == O
    return all(cur.get(p) == (changes[p] if p in changes else O.get(p)) for p in scope)


def _write_tie(side: "TwoWaySide", pid: str, base_gen: str, cache_gen: str) -> None:
    """Atomic but not fsynced: a tie refers only to files already made durable, and one that is
    lost or stale after a crash names ids that no longer match."""
    try:
        _write_unsynced(side._state(f"twoway-{pid}.tie"), json.dumps({"base": base_gen, "cache": cache_gen}).encode())
    except OSError:
        pass


def _write_unsynced(path: str, data: bytes) -> None:
    """Write `path` atomically (a temp beside it, renamed over it) without fsync: for hints only."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _guards(cfg: TwoWayConfig, base: Manifest, sides: tuple[Manifest, Manifest], plans: tuple[Plan, Plan],
            dec: Decisions, summ: TwoWaySummary, reporter,
            planned: tuple[Manifest, Manifest] | None = None) -> tuple[Plan, Plan]:
    """No-wipe guards, checked on both plans before anything happens on either side. `sides`:
    the whole scans; `planned`: what the plans were made against (default: `sides`)."""
    planned = planned or sides
    from dirsync.sync import MASS_DELETE_MIN

    n_base = len(base.entries) - ("" in base.entries)
    names = (cfg.a, cfg.b)
    for i in (A, B):
        n = len(sides[i].entries) - ("" in sides[i].entries)
        other = plans[1 - i]
        if not cfg.allow_mass_delete and n == 0 and n_base > 0 and other.deletes():
            raise RefusedError(
                f"{names[i]} is empty but held {n_base} entries at the last two-way run; refusing to delete "
                f"{len(other.deletes())} entries on {names[1 - i]}; nothing was changed",
                hint="is it mounted? if it really was emptied on purpose, pass --allow-mass-delete")
    out = list(plans)
    for i in (A, B):
        deletes = out[i].deletes()
        if not deletes:
            continue
        n_side = len(sides[i].entries) - ("" in sides[i].entries)
        if cfg.max_delete is not None:
            tripped, limit = len(deletes) > cfg.max_delete, f"--max-delete {cfg.max_delete}"
        else:
            tripped = (not cfg.allow_mass_delete and len(deletes) >= MASS_DELETE_MIN and 2 * len(deletes) > n_side)
            limit = "the default guard (more than half of the side)"
        if not tripped:
            continue
        msg = (f"{names[i]}: {len(deletes)} deletions planned, over {limit}; nothing was deleted there "
               "(pass --max-delete N or --allow-mass-delete to allow it)")
        sm = summ.sides[i]
        sm.fatal, sm.exit_code, sm.status = msg, int(ExitCode.DELETE_LIMIT), "refused"
        reporter.error(msg)
        out[i] = diff(dec.target, planned[i], PlanOptions(delete=False, protect=dec.protect))
    return out[0], out[1]


# -- command line glue ---------------------------------------------------------------------------------


def print_summary(summ: TwoWaySummary, cfg: TwoWayConfig, reporter, *, as_json: bool = False,
                  show_plan: bool = False, extra: dict | None = None) -> None:
    """Print a run's (or with show_plan, a plan's) outcome: JSON on stdout (with `extra` keys,
    e.g. the run id the status record names), else the decisions and a summary line."""
    dec = summ.decisions
    if as_json:
        out = summ.to_json()
        out.update(extra or {})
        if show_plan and dec is not None:
            out["plan"] = dec.render().splitlines()
        print(json.dumps(out, indent=2))
    elif show_plan and dec is not None:
        text = dec.render()
        if text:
            print(text)
        from dirsync.plan import human_size

        for label, plan in zip(dec.labels, summ.plans or ()):
            t = plan.totals()
            print(f"{label}: {t.writes} to write (send {human_size(t.send_bytes)}, reuse {human_size(t.reuse_bytes)}), "
                  f"{t.deletes} to delete, {t.mkdirs} dirs, {t.links} links, {t.meta} metadata")
    if dec is not None and not show_plan:
        c = dec.counts()
        reporter.info(f"{cfg.a} ⇄ {cfg.b}: {c['a>b']} →, {c['b>a']} ←, {c['del-a']} deleted on a, "
                      f"{c['del-b']} deleted on b, {c['conflict']} conflicts in {summ.seconds:.2f}s")
        for cf in summ.conflicts:
            if cf.copy:
                reporter.warn(f"conflict: {display_path(cf.path)}: {cf.reason}")
