"""Prove a replica equals the master: rehash both sides without trusting caches, compare.

Comparison descends a Merkle tree of directory digests (manifest.tree_digests), so equal
subtrees are skipped as a whole and only differing directories are listed entry by entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dirsync.errors import display_path
from dirsync.manifest import DirEntry, Entry, FileEntry, LinkEntry, Manifest, parent_of, tree_digests


@dataclass
class Difference:
    kind: str  # missing | extra | content | type | metadata
    path: str
    detail: str = ""

    def render(self) -> str:
        shown = display_path(self.path) or "."
        return f"{self.kind:<9}{shown}" + (f"  ({self.detail})" if self.detail else "")

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": os.fsencode(self.path).decode("utf-8", "backslashreplace"),
                "detail": self.detail}


@dataclass
class VerifyResult:
    replica: str
    master_root: bytes = b""
    replica_root: bytes = b""
    differences: list[Difference] = field(default_factory=list)

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


def run_verify(master: str, replicas: list[str], excludes: list[str], transport_opts, reporter,
               quick: bool = False) -> list[VerifyResult]:
    """Rescan master and each replica (ignoring caches unless quick) and compare them."""
    from dirsync.scan import Excluder, read_ignore_file, scan_tree
    from dirsync.state import load_manifest_file, master_cache_path
    from dirsync import chunking
    from dirsync.sync import check_master
    from dirsync.transport import open_transport

    real = check_master(master)
    patterns = list(excludes) + read_ignore_file(real)
    cache = None
    if quick:
        cache = load_manifest_file(master_cache_path(real), chunking.CHUNKER_ID).manifest
    mscan = scan_tree(real, excluder=Excluder(patterns), cache=cache)
    for e in mscan.errors:
        reporter.error(f"master: {e}")
    results = []
    for spec in replicas:
        t = open_transport(spec, transport_opts)
        t.open(readonly=True)
        try:
            rscan = t.scan(patterns, fresh=not quick)
        finally:
            t.close(save=False)
        for e in rscan.errors:
            reporter.error(f"{spec}: {e}")
        mroot, rroot, diffs = compare(mscan.manifest, rscan.manifest)
        for e in list(mscan.errors) + list(rscan.errors):
            diffs.append(Difference("unread", e.path, str(e)))
        results.append(VerifyResult(spec, mroot, rroot, diffs))
    return results
