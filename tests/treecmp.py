"""Independent directory-tree comparison for end-to-end tests.

This module deliberately does NOT import ``dirsync``: it is the referee that
checks dirsync's results, so it must not share code (or bugs) with it.

``snapshot(root)`` walks a tree with ``os.scandir`` on *bytes* paths (so
non-UTF-8 file names work) and returns ``{relpath_bytes: entry}`` where the
root itself has relpath ``b""`` and ``entry`` is a tuple:

    ('f', mode, mtime_ns, sha256_hex)   regular file
    ('d', mode, mtime_ns)               directory
    ('l', None, mtime_ns, target_bytes) symlink (lstat mtime; mode skipped)
    ('?', mode, mtime_ns)               anything else (fifo, socket, device)

``mode`` is ``stat.S_IMODE(st_mode)``.  Relative paths use ``b"/"``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Iterable

__all__ = ["snapshot", "diff_snapshots", "assert_trees_equal", "format_entry"]

KIND, MODE, MTIME = 0, 1, 2


def _fsbytes(p: str | bytes | os.PathLike) -> bytes:
    return os.fsencode(os.fspath(p))


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry(path: bytes, st: os.stat_result) -> tuple:
    m = st.st_mode
    if stat.S_ISLNK(m):
        return ("l", None, st.st_mtime_ns, os.readlink(path))
    if stat.S_ISREG(m):
        return ("f", stat.S_IMODE(m), st.st_mtime_ns, _sha256(path))
    if stat.S_ISDIR(m):
        return ("d", stat.S_IMODE(m), st.st_mtime_ns)
    return ("?", stat.S_IMODE(m), st.st_mtime_ns)


def snapshot(
    root: str | bytes | os.PathLike, ignore: Iterable[str | bytes] = (".dirsync",)
) -> dict[bytes, tuple]:
    """Return ``{relpath: entry}`` for ``root`` and everything below it.

    Names in ``ignore`` are skipped at *every* level (with their subtrees).
    The root is followed if it is itself a symlink to a directory.
    """
    rootb = _fsbytes(root)
    ignored = {_fsbytes(n) for n in ignore}
    snap: dict[bytes, tuple] = {b"": _entry(rootb, os.stat(rootb))}
    if snap[b""][KIND] != "d":
        raise NotADirectoryError(f"not a directory: {os.fsdecode(rootb)!r}")

    stack = [(rootb, b"")]
    while stack:
        dirpath, rel = stack.pop()
        with os.scandir(dirpath) as it:
            entries = list(it)
        for de in entries:
            if de.name in ignored:
                continue
            relpath = rel + b"/" + de.name if rel else de.name
            st = de.stat(follow_symlinks=False)
            ent = _entry(de.path, st)
            snap[relpath] = ent
            if ent[KIND] == "d":
                stack.append((de.path, relpath))
    return snap


def format_entry(ent: tuple | None) -> str:
    if ent is None:
        return "<absent>"
    kind, mode, mtime = ent[0], ent[1], ent[2]
    parts = [{"f": "file", "d": "dir", "l": "link"}.get(kind, "other")]
    if mode is not None:
        parts.append(f"mode={mode:04o}")
    parts.append(f"mtime_ns={mtime}")
    if kind == "f":
        parts.append(f"sha256={ent[3][:16]}")
    elif kind == "l":
        parts.append(f"-> {ent[3]!r}")
    return " ".join(parts)


def _show(rel: bytes) -> str:
    return repr(rel.decode("utf-8", "surrogateescape")) if rel else "<root>"


def diff_snapshots(
    master: dict[bytes, tuple],
    replica: dict[bytes, tuple],
    check_dir_mtimes: bool = True,
    check_mtimes: bool = True,
) -> list[str]:
    """Return human-readable difference lines (empty list means equal)."""
    out: list[str] = []
    for rel in sorted(master.keys() | replica.keys()):
        a, b = master.get(rel), replica.get(rel)
        if b is None:
            out.append(f"{'missing in replica:':<23} {_show(rel)}  [{format_entry(a)}]")
            continue
        if a is None:
            out.append(f"{'extra in replica:':<23} {_show(rel)}  [{format_entry(b)}]")
            continue
        if a[KIND] != b[KIND]:
            out.append(f"{'kind differs:':<23} {_show(rel)}  master[{format_entry(a)}] replica[{format_entry(b)}]")
            continue
        what = []
        if a[MODE] != b[MODE]:
            what.append("mode")
        if check_mtimes and a[MTIME] != b[MTIME] and (check_dir_mtimes or a[KIND] != "d"):
            what.append("mtime")
        if a[3:] != b[3:]:
            what.append("content" if a[KIND] == "f" else "target")
        if what:
            out.append(
                f"{'/'.join(what) + ' differs:':<23} {_show(rel)}  "
                f"master[{format_entry(a)}] replica[{format_entry(b)}]"
            )
    return out


def assert_trees_equal(
    master: str | bytes | os.PathLike,
    replica: str | bytes | os.PathLike,
    check_dir_mtimes: bool = True,
    *,
    check_mtimes: bool = True,
    ignore: Iterable[str | bytes] = (".dirsync",),
    max_items: int = 20,
) -> None:
    """Raise AssertionError listing differences between two trees.

    Compares kind, permission bits, mtimes (dir mtimes only if
    ``check_dir_mtimes``; no mtimes at all if ``check_mtimes`` is false),
    file contents (sha256) and symlink targets.  The roots' own mode and
    mtime are compared too (root relpath ``b""``).
    """
    ignore = tuple(ignore)
    diffs = diff_snapshots(
        snapshot(master, ignore), snapshot(replica, ignore), check_dir_mtimes, check_mtimes
    )
    if diffs:
        shown = diffs[:max_items]
        more = len(diffs) - len(shown)
        msg = (
            f"trees differ ({len(diffs)} difference(s))\n"
            f"  master:  {os.fsdecode(_fsbytes(master))}\n"
            f"  replica: {os.fsdecode(_fsbytes(replica))}\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
        raise AssertionError(msg)


if __name__ == "__main__":  # tiny CLI: python tests/treecmp.py A B
    import sys

    try:
        assert_trees_equal(sys.argv[1], sys.argv[2], check_dir_mtimes="--no-dir-mtimes" not in sys.argv)
    except AssertionError as e:
        print(e)
        sys.exit(1)
    print("trees equal")
