"""Prove a replica equals the master: rehash both sides without trusting caches, compare.

Comparison descends a Merkle tree of directory digests (manifest.tree_digests), so equal
subtrees are skipped as a whole and only differing directories are listed entry by entry.

`--quick` rehashes and walks nothing: it compares the Merkle root of the master's cached
manifest (state dir) with that of the replica's cached manifest (`.dirsync/manifest`), both
filtered by the current excludes. It proves only that the last scans of both sides agree
(e.g. that the last sync completed), not that the disks still hold that content.
"""

from __future__ import annotations

import os

from dirsync.errors import display_path
from dirsync.manifest import DirEntry, Entry, FileEntry, LinkEntry, Manifest, parent_of, tree_digests
from dirsync.record import Record


class Difference(Record):
    _fields = ("kind", "path", "detail")

    def __init__(
        self,
        kind: str,  # missing | extra | content | type | metadata
        path: str,
        detail: str = "",
    ) -> None:
        self.kind = kind
        self.path = path
        self.detail = detail

    def render(self) -> str:
        shown = display_path(self.path) or "."
        return f"{self.kind:<9}{shown}" + (f"  ({self.detail})" if self.detail else "")

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": os.fsencode(self.path).decode("utf-8", "backslashreplace"),
                "detail": self.detail}


class VerifyResult(Record):
    _fields = ("replica", "master_root", "replica_root", "differences")

    def __init__(
        self,
        replica: str,
        master_root: bytes = b"",
        replica_root: bytes = b"",
        differences: list[Difference] | None = None,
    ) -> None:
        self.replica = replica
        self.master_root = master_root
        self.replica_root = replica_root
        self.differences = [] if differences is None else differences

    @property
    def equal(self) -> bool:
        return not self.differences


def compare(master: Manifest, replica: Manifest) -> tuple[bytes, bytes, list[Difference]]:
    """(master root digest, replica root digest, differences), descending only where digests differ."""
    md, rd = tree_digests(master), tree_digests(replica)
    out: list[Difference] = []
    if md.get("") == rd.get(""):
        return md.get("", b""), rd.get("", b""), out
    m_children = _children(master)
    r_children = _children(replica)
    stack = [""]
    while stack:
        d = stack.pop()
        me, re_ = master.entries.get(d), replica.entries.get(d)
        if isinstance(me, DirEntry) and isinstance(re_, DirEntry) and (me.mode, me.mtime_ns) != (re_.mode, re_.mtime_ns):
            out.append(Difference("metadata", d, _meta_detail(me, re_)))
        names = sorted(set(m_children.get(d, ())) | set(r_children.get(d, ())))
        for p in names:
            a, b = master.entries.get(p), replica.entries.get(p)
            if b is None:
                out.append(Difference("missing", p))
            elif a is None:
                out.append(Difference("extra", p))
            elif a.kind != b.kind:
                out.append(Difference("type", p, f"master {a.kind}, replica {b.kind}"))
            elif isinstance(a, DirEntry):
                if md.get(p) != rd.get(p):
                    stack.append(p)
            elif isinstance(a, FileEntry):
                assert isinstance(b, FileEntry)
                if not a.same_content(b):
                    out.append(Difference("content", p, f"size {a.size} vs {b.size}" if a.size != b.size else ""))
                elif (a.mode, a.mtime_ns) != (b.mode, b.mtime_ns):
                    out.append(Difference("metadata", p, _meta_detail(a, b)))
            else:
                assert isinstance(a, LinkEntry) and isinstance(b, LinkEntry)
                if a.target != b.target:
                    out.append(Difference("content", p, "link target"))
                elif a.mtime_ns != b.mtime_ns:
                    out.append(Difference("metadata", p, "mtime"))
    out.sort(key=lambda x: x.path)
    return md.get("", b""), rd.get("", b""), out


def _children(m: Manifest) -> dict[str, list[str]]:
    ch: dict[str, list[str]] = {}
    for p in m.entries:
        if p:
            ch.setdefault(parent_of(p), []).append(p)
    return ch


def _meta_detail(a: Entry, b: Entry) -> str:
    parts = []
    if getattr(a, "mode", None) != getattr(b, "mode", None):
        parts.append(f"mode {a.mode:04o} vs {b.mode:04o}")  # type: ignore[union-attr]
    if a.mtime_ns != b.mtime_ns:
        parts.append("mtime")
    return ", ".join(parts)


def filter_manifest(m: Manifest, patterns: list[str], reserved: tuple[str, ...] = ()) -> Manifest:
    """`m` without the entries that `patterns` (or `reserved` relpaths) exclude, with their subtrees."""
    from dirsync.scan import Excluder

    ex = Excluder(patterns)
    dropped: set[str] = set()
    out: dict[str, Entry] = {}
    for p in sorted(m.entries):  # a directory sorts before everything under it
        e = m.entries[p]
        if p and (parent_of(p) in dropped or p in reserved or ex.excluded(p, isinstance(e, DirEntry))):
            dropped.add(p)
            continue
        out[p] = e
    return Manifest(out)


def cached_root(m: Manifest, patterns: list[str], reserved: tuple[str, ...] = ()) -> bytes:
    """Merkle root digest of a cached manifest as a scan with `patterns` would have seen it."""
    return tree_digests(filter_manifest(m, patterns, reserved)).get("", b"")


def run_verify(master: str, replicas: list[str], excludes: list[str], transport_opts, reporter,
               quick: bool = False) -> list[VerifyResult]:
    """Rescan master and each replica without caches and compare them (quick: compare cached roots)."""
    from dirsync.scan import Excluder, read_ignore_file, scan_tree
    from dirsync.state import load_manifest_file, master_cache_path
    from dirsync import chunking
    from dirsync.sync import check_master
    from dirsync.transport import open_transport

    real = check_master(master)
    patterns = list(excludes) + read_ignore_file(real)
    if quick:
        return _quick(real, replicas, patterns, transport_opts,
                      load_manifest_file(master_cache_path(real), chunking.CHUNKER_ID).manifest)
    mscan = scan_tree(real, excluder=Excluder(patterns))
    for e in mscan.errors:
        reporter.error(f"master: {e}")
    results = []
    for spec in replicas:
        t = open_transport(spec, transport_opts)
        info = t.open(readonly=True)
        try:
            rscan = t.scan(patterns, fresh=True)
        finally:
            t.close(save=False)
        for e in rscan.errors:
            reporter.error(f"{spec}: {e}")
        mman = filter_manifest(mscan.manifest, [], info.reserved) if info.reserved else mscan.manifest
        mroot, rroot, diffs = compare(mman, rscan.manifest)
        for e in list(mscan.errors) + list(rscan.errors):
            diffs.append(Difference("unread", e.path, str(e)))
        results.append(VerifyResult(spec, mroot, rroot, diffs))
    return results


def _quick(real: str, replicas: list[str], patterns: list[str], transport_opts,
           mcache: Manifest | None) -> list[VerifyResult]:
    from dirsync.transport import open_transport

    results = []
    for spec in replicas:
        t = open_transport(spec, transport_opts)
        info = t.open(readonly=True)
        try:
            get_root = getattr(t, "cached_root", None)
            if get_root is not None:
                rroot = get_root(patterns)
            else:  # a transport without the optional call: its cached scan is still cheap
                rroot = tree_digests(t.scan(patterns).manifest).get("", b"")
        finally:
            t.close(save=False)
        res = VerifyResult(spec, replica_root=rroot or b"")
        if mcache is None:
            res.differences.append(Difference("nocache", "", "no cached manifest for the master; run sync "
                                                              "or verify without --quick"))
        else:
            res.master_root = cached_root(mcache, patterns, info.reserved)
        if rroot is None:
            res.differences.append(Difference("nocache", "", "no cached manifest on the replica"))
        elif mcache is not None and res.master_root != rroot:
            res.differences.append(Difference("root", "", "cached root digests differ; run verify without "
                                                           "--quick to list the differences"))
        results.append(res)
    return results
