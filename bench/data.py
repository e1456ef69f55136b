"""Deterministic benchmark data: tree generators, reversible mutations, tree comparison.

Everything here is a function of (seed, profile): the same seed gives byte-identical
trees, the same file names and the same mtimes on every machine that has the same
generator (``GENERATOR`` below, recorded in the results).

Random bytes come from AES-128-CTR (the ``cryptography`` package, a dependency of
paramiko and therefore of dirsync) keyed by sha256(seed/name): ~5 GB/s, so a 1.4 GB
tree is generated at disk speed.  Without ``cryptography`` a SHAKE-128 stream is
used (slower, and different bytes: the generator name is part of the data stamp).

Text and source-like files are sequences of lines drawn from a pool of 65,536
generated lines, so they compress like text (zstd ~3x) but no two files share a
run of lines long enough to share a content-defined chunk: neither tool gets a
dedup bonus the other cannot get.

Mutations (``Mutator``) are applied to a master in place and undone exactly
(renamed-aside originals are renamed back, appended files truncated, patched
bytes written back, mtimes restored), so the benchmark can repeat "replica at
state A, master at state B" as often as it likes without copying trees.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import random
import stat
import zlib
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Bump when a generator changes the bytes it produces (invalidates kept data).
GEN_VERSION = 2
BASE_MTIME = 1_700_000_000  # 2023-11-14: every generated file gets a fixed, seeded mtime

try:  # fast path
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    GENERATOR = f"aes128-ctr/v{GEN_VERSION}"
except ImportError:  # pragma: no cover - cryptography ships with paramiko
    Cipher = None
    GENERATOR = f"shake128/v{GEN_VERSION}"


# ---------------------------------------------------------------------------
# Profiles (sizes).  "full" follows issue 6; "quick" is the same shape, smaller.

PROFILES: dict[str, dict] = {
    "full": dict(
        mixed_small=10_000, mixed_small_range=(1 * KiB, 64 * KiB),
        mixed_medium=200, mixed_medium_range=(1 * MiB, 8 * MiB),
        mixed_big=2, mixed_big_size=256 * MiB,
        mixed_branching=(6, 5, 4, 3),  # 4-level tree: 6 + 30 + 120 + 360 dirs
        many_files=100_000, many_dirs=(40, 50), many_max=4 * KiB,
        big_size=1 * GiB, big_edits=16, big_edit_size=64 * KiB, insert_size=100,
        move_files=100, move_file_size=2 * MiB, move_others=600,  # 200 MiB directory in a 700-file tree
        source_files=2_500, source_branching=(10, 7, 7), source_range=(1 * KiB, 50 * KiB),
    ),
    "quick": dict(
        mixed_small=1_000, mixed_small_range=(1 * KiB, 64 * KiB),
        mixed_medium=20, mixed_medium_range=(1 * MiB, 8 * MiB),
        mixed_big=2, mixed_big_size=24 * MiB,
        mixed_branching=(4, 3, 3, 2),
        many_files=10_000, many_dirs=(10, 20), many_max=4 * KiB,
        big_size=128 * MiB, big_edits=16, big_edit_size=64 * KiB, insert_size=100,
        move_files=16, move_file_size=2 * MiB, move_others=100,
        source_files=500, source_branching=(5, 4, 5), source_range=(1 * KiB, 50 * KiB),
    ),
}

DATASETS = ("mixed", "many", "big", "move", "source")


# ---------------------------------------------------------------------------
# Byte and decision streams


def rng(seed: int, name: str) -> random.Random:
    """A decision stream: random.Random seeded from a string is stable across Pythons."""
    return random.Random(f"{seed}/{name}")


class ByteStream:
    """Deterministic pseudo-random bytes for (seed, name)."""

    _ZERO = bytes(4 * MiB)

    def __init__(self, seed: int, name: str):
        key = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        if Cipher is not None:
            self._enc = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:32])).encryptor()
        else:
            self._enc = None
            self._key = key
            self._ctr = 0

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        if self._enc is not None:
            if n <= len(self._ZERO):
                return self._enc.update(memoryview(self._ZERO)[:n])
            return self._enc.update(bytes(n))
        out = []
        while n > 0:
            take = min(n, MiB)
            out.append(hashlib.shake_128(self._key + self._ctr.to_bytes(8, "little")).digest(take))
            self._ctr += 1
            n -= take
        return b"".join(out)


_VOCAB_TEXT = (
    "the of and to in is was for that with as on by at from this be are or an it not which "
    "have has had but were all one their there been can more its other new some these two may "
    "time into only over also after first used would between under system data file files "
    "replica master sync manifest chunk block hash network server client error value list "
    "table index state update change record version number result process memory directory "
    "read write open close path size offset length buffer stream frame cache lock event"
).split()

_VOCAB_CODE = (
    "self return if else elif for while in not and or None True False def class import from "
    "try except finally with as raise yield lambda pass break continue assert del global "
    "int str bytes len range list dict set tuple open print isinstance super object "
    "path data buf size offset count index value result items key name node state chunk "
    "manifest replica entry digest reader writer stream frame handler config options args "
    "kwargs error status total start end begin parent child left right temp block hash"
).split()


@functools.lru_cache(maxsize=4)
def _line_pool(seed: int, kind: str, n: int = 65536) -> list[bytes]:
    r = rng(seed, "pool/" + kind)
    out = []
    if kind == "text":
        for _ in range(n):
            k = r.randint(3, 14)
            words = [r.choice(_VOCAB_TEXT) for _ in range(k)]
            if r.random() < 0.3:
                words[0] = words[0].capitalize()
            end = r.choice([".", ".", ",", "", ":", ";"])
            out.append((" ".join(words) + end + "\n").encode())
    else:
        for _ in range(n):
            indent = "    " * r.choice([0, 1, 1, 2, 2, 2, 3, 3, 4])
            form = r.random()
            a, b, c = (r.choice(_VOCAB_CODE) for _ in range(3))
            num = r.randint(0, 4096)
            if form < 0.25:
                line = f"{indent}{a}_{b} = {c}({a}, {num})"
            elif form < 0.4:
                line = f"{indent}if {a}.{b} > {num}:"
            elif form < 0.5:
                line = f"{indent}return {a}_{b}[{c}]"
            elif form < 0.6:
                line = f"{indent}def {a}_{b}_{num}(self, {c}):"
            elif form < 0.7:
                line = f"{indent}# {a} {b} {c}: {r.choice(_VOCAB_TEXT)} {r.choice(_VOCAB_TEXT)}"
            elif form < 0.8:
                line = f"{indent}{a}.{b}({c}_{num}, {r.choice(_VOCAB_CODE)}={r.choice(_VOCAB_CODE)})"
            elif form < 0.9:
                line = f"{indent}for {a} in {b}_{c}({num}):"
            else:
                line = ""
            out.append((line + "\n").encode())
    return out


class TextSource:
    """Text made of lines picked from a pool by pseudo-random 16-bit indices."""

    def __init__(self, seed: int, kind: str):
        self.pool = _line_pool(seed, kind)
        self._get = self.pool.__getitem__

    def make(self, stream: ByteStream, size: int) -> bytes:
        if size <= 0:
            return b""
        parts = []
        have = 0
        while have < size:
            need_lines = max(8, (size - have) // 28 + 8)
            idx = memoryview(stream.read(2 * need_lines)).cast("H")
            chunk = b"".join(map(self._get, idx))
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)[:size]

    def lines(self, stream: ByteStream, n: int) -> list[bytes]:
        idx = memoryview(stream.read(2 * n)).cast("H")
        return list(map(self._get, idx))


def log_uniform(r: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(r.uniform(math.log(lo), math.log(hi))))


# ---------------------------------------------------------------------------
# Writing


def _write(path: str, data: bytes, mtime: int, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


def _write_random(path: str, stream: ByteStream, size: int, mtime: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(stream.read(n))
            left -= n
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


def _tree_dirs(branching: tuple[int, ...], prefix: str = "d") -> list[str]:
    """All directories of a tree with the given branching per level (parents first)."""
    dirs: list[str] = []
    level = [""]
    for depth, width in enumerate(branching):
        nxt = []
        for parent in level:
            for i in range(width):
                rel = f"{parent}/{prefix}{depth}{i:02d}" if parent else f"{prefix}{depth}{i:02d}"
                nxt.append(rel)
        dirs.extend(nxt)
        level = nxt
    return dirs


@dataclass
class GenInfo:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, size: int) -> None:
        self.files += 1
        self.bytes += size


def gen_mixed(root: str, seed: int, p: dict) -> GenInfo:
    r = rng(seed, "mixed")
    text = TextSource(seed, "text")
    stream = ByteStream(seed, "mixed")
    dirs = _tree_dirs(p["mixed_branching"])
    info = GenInfo(dirs=len(dirs))
    os.makedirs(root)
    for d in dirs:
        os.mkdir(os.path.join(root, d))
    every = [""] + dirs
    lo, hi = p["mixed_small_range"]
    for i in range(p["mixed_small"]):
        d = r.choice(every)
        size = log_uniform(r, lo, hi)
        mtime = BASE_MTIME + r.randrange(30 * 86400)
        if i % 2 == 0:
            name = f"t{i:05d}.{r.choice(['txt', 'md', 'csv', 'log', 'html'])}"
            data = text.make(stream, size)
        else:
            name = f"b{i:05d}.{r.choice(['bin', 'dat', 'png', 'gz', 'o'])}"
            data = stream.read(size)
        _write(os.path.join(root, d, name), data, mtime)
        info.add(size)
    lo, hi = p["mixed_medium_range"]
    for i in range(p["mixed_medium"]):
        d = r.choice(dirs[: len(dirs) // 2] or [""])
        size = log_uniform(r, lo, hi)
        _write_random(os.path.join(root, d, f"m{i:04d}.bin"), stream, size, BASE_MTIME + r.randrange(86400))
        info.add(size)
    for i in range(p["mixed_big"]):
        size = p["mixed_big_size"]
        _write_random(os.path.join(root, dirs[i], f"huge{i}.img"), stream, size, BASE_MTIME + i)
        info.add(size)
    return info


def gen_many(root: str, seed: int, p: dict) -> GenInfo:
    r = rng(seed, "many")
    text = TextSource(seed, "text")
    stream = ByteStream(seed, "many")
    a, b = p["many_dirs"]
    dirs = [f"g{i:02d}/h{j:02d}" for i in range(a) for j in range(b)]
    info = GenInfo(dirs=a + len(dirs))
    os.makedirs(root)
    for i in range(a):
        os.mkdir(os.path.join(root, f"g{i:02d}"))
    for d in dirs:
        os.mkdir(os.path.join(root, d))
    n = p["many_files"]
    sizes = [r.randint(0, p["many_max"]) for _ in range(n)]
    for i in range(n):
        d = dirs[i % len(dirs)]
        size = sizes[i]
        if i % 2 == 0:
            data, name = text.make(stream, size), f"n{i:06d}.txt"
        else:
            data, name = stream.read(size), f"n{i:06d}.bin"
        _write(os.path.join(root, d, name), data, BASE_MTIME + (i % 86400))
        info.add(size)
    return info


def gen_big(root: str, seed: int, p: dict) -> GenInfo:
    os.makedirs(root)
    size = p["big_size"]
    _write_random(os.path.join(root, "big.img"), ByteStream(seed, "big"), size, BASE_MTIME)
    info = GenInfo(dirs=0)
    info.add(size)
    return info


def gen_move(root: str, seed: int, p: dict) -> GenInfo:
    r = rng(seed, "move")
    stream = ByteStream(seed, "move")
    text = TextSource(seed, "text")
    os.makedirs(os.path.join(root, "archive"))
    info = GenInfo(dirs=1)
    _write(os.path.join(root, "archive", "README.txt"), text.make(stream, 2000), BASE_MTIME)
    info.add(2000)
    n = p["move_files"]
    subdirs = [f"payload/part{i}" for i in range(4)]
    os.mkdir(os.path.join(root, "payload"))
    info.dirs += 1
    for d in subdirs:
        os.mkdir(os.path.join(root, d))
        info.dirs += 1
    for i in range(n):
        size = p["move_file_size"]
        _write_random(os.path.join(root, subdirs[i % 4], f"asset{i:03d}.bin"), stream, size,
                      BASE_MTIME + r.randrange(86400))
        info.add(size)
    # the rest of the tree: the moved directory is a minority of it, as in real use
    # (dirsync's default mass-delete guard refuses to delete more than half of a replica)
    others = [f"docs/s{i}" for i in range(8)]
    os.mkdir(os.path.join(root, "docs"))
    for d in others:
        os.mkdir(os.path.join(root, d))
    info.dirs += 1 + len(others)
    for i in range(p["move_others"]):
        size = r.randint(100, 16000)
        _write(os.path.join(root, others[i % len(others)], f"note{i:03d}.txt"), text.make(stream, size),
               BASE_MTIME + i)
        info.add(size)
    return info


def gen_source(root: str, seed: int, p: dict) -> GenInfo:
    r = rng(seed, "source")
    code = TextSource(seed, "code")
    stream = ByteStream(seed, "source")
    dirs = _tree_dirs(p["source_branching"], prefix="pkg")
    os.makedirs(root)
    for d in dirs:
        os.mkdir(os.path.join(root, d))
    info = GenInfo(dirs=len(dirs))
    every = [""] + dirs
    lo, hi = p["source_range"]
    for i in range(p["source_files"]):
        d = r.choice(every)
        size = log_uniform(r, lo, hi)
        ext = r.choice(["py", "py", "py", "c", "h", "rs", "md", "toml"])
        _write(os.path.join(root, d, f"mod{i:04d}.{ext}"), code.make(stream, size),
               BASE_MTIME + r.randrange(365 * 86400))
        info.add(size)
    return info


GENERATORS = {"mixed": gen_mixed, "many": gen_many, "big": gen_big, "move": gen_move, "source": gen_source}


def generate(dataset: str, root: str, seed: int, profile: str) -> GenInfo:
    return GENERATORS[dataset](root, seed, PROFILES[profile])


def stamp_for(dataset: str, seed: int, profile: str) -> str:
    return json.dumps({"dataset": dataset, "seed": seed, "profile": profile, "generator": GENERATOR,
                       "params": PROFILES[profile]}, sort_keys=True)


# ---------------------------------------------------------------------------
# Tree listing and comparison


def list_files(root: str) -> list[str]:
    """Relative paths of regular files under root, sorted (deterministic)."""
    out = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    stack.append(r)
                elif e.is_file(follow_symlinks=False):
                    out.append(r)
    out.sort()
    return out


def list_dirs(root: str) -> list[str]:
    out = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    r = f"{rel}/{e.name}" if rel else e.name
                    out.append(r)
                    stack.append(r)
    out.sort()
    return out


def snapshot(root: str, ignore_top: tuple[str, ...] = (".dirsync",)) -> dict[str, tuple]:
    """rel path -> (kind, size, mtime_ns, mode bits, link target) for everything under root."""
    out: dict[str, tuple] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                if not rel and e.name in ignore_top:
                    continue
                r = f"{rel}/{e.name}" if rel else e.name
                st = e.stat(follow_symlinks=False)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    out[r] = ("d", 0, 0, mode, None)
                    stack.append(r)
                elif stat.S_ISLNK(st.st_mode):
                    out[r] = ("l", 0, 0, 0, os.readlink(os.path.join(root, r)))
                else:
                    out[r] = ("f", st.st_size, st.st_mtime_ns, mode, None)
    return out


def same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(4 * MiB)
            y = fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def compare_trees(master: str, replica: str, content: list[str] | tuple = (), limit: int = 5) -> list[str]:
    """Differences between master and replica (empty list: equal).

    Compares type, size, mtime (ns) and permission bits of every entry, the link
    target of symlinks, and the bytes of the files listed in ``content`` (the
    changed ones: checking all bytes of a 1.4 GB tree after every case would cost
    more than the case)."""
    if not os.path.isdir(replica):
        return [f"replica {replica} does not exist"]
    m = snapshot(master)
    r = snapshot(replica)
    diffs: list[str] = []
    for p in sorted(m.keys() - r.keys())[:limit]:
        diffs.append(f"missing {p}")
    for p in sorted(r.keys() - m.keys())[:limit]:
        diffs.append(f"extra {p}")
    for p in sorted(m.keys() & r.keys()):
        if m[p] != r[p]:
            what = [n for n, x, y in zip(("type", "size", "mtime", "mode", "link"), m[p], r[p]) if x != y]
            diffs.append(f"differs {p} ({', '.join(what)})")
            if len(diffs) >= 3 * limit:
                break
    for p in content:
        mp, rp = os.path.join(master, p), os.path.join(replica, p)
        if os.path.isfile(mp) and os.path.isfile(rp) and not same_bytes(mp, rp):
            diffs.append(f"content {p}")
    return diffs


# ---------------------------------------------------------------------------
# Reversible mutations


@dataclass
class Op:
    kind: str  # append | patch | replace | delete | rename | create | swap
    path: str
    data: bytes = b""
    offset: int = 0
    dest: str = ""


class Mutator:
    """Applies a list of Ops to a master in place and undoes them exactly.

    ``stash`` is a directory on the same filesystem used to park originals
    (renames only, so apply/undo cost no copies).  A DIRTY marker next to the
    stash says the master is in a mutated state (kept data is then regenerated).
    """

    def __init__(self, root: str, stash: str, ops: list[Op], name: str):
        self.root, self.stash, self.ops, self.name = root, stash, ops, name
        self.undo_log: list[tuple] = []
        self.marker = os.path.join(stash, "DIRTY")
        self._new_content: tuple[int, int] | None | bool = False  # (False: not computed yet)

    def changed_paths(self) -> list[str]:
        """Paths whose content is new in the mutated state (for content verification)."""
        out = []
        for op in self.ops:
            if op.kind in ("append", "patch", "replace", "create", "swap"):
                out.append(op.path)
            elif op.kind == "rename" and op.dest and not op.dest.endswith("/"):
                out.append(op.dest)
        return out

    def new_content(self) -> tuple[int, int] | None:
        """(bytes, zlib-deflated bytes) of what the change brings that the tree did not hold
        before: appended, patched and created data, and a replaced file's lines the old file
        lacked (a multiset difference); renames and deletes bring none. No tool can send less
        (without other compression): it is the bytes floor of a change case. None when an op
        swaps in a whole variant file (insert), which this does not compare. Computed once, on
        the first call, which must find the tree in its base state."""
        if self._new_content is False:
            self._new_content = self._count_new_content()
        return self._new_content  # type: ignore[return-value]

    def _count_new_content(self) -> tuple[int, int] | None:
        parts = []
        for op in self.ops:
            if op.kind in ("append", "patch", "create"):
                parts.append(op.data)
            elif op.kind == "replace":
                with open(os.path.join(self.root, op.path), "rb") as f:
                    old = collections.Counter(f.read().splitlines(keepends=True))
                new = collections.Counter(op.data.splitlines(keepends=True))
                parts.extend(line * n for line, n in (new - old).items())
            elif op.kind not in ("delete", "rename"):
                return None
        raw = b"".join(parts)
        return len(raw), len(zlib.compress(raw, 6)) if raw else 0

    def apply(self) -> None:
        """Apply every op. Each op is logged before it changes anything, so that undo() puts
        the master back even when an op fails half way (a full disk: OSError, raised)."""
        os.makedirs(self.stash, exist_ok=True)
        with open(self.marker, "w") as f:
            f.write(self.name)
        for n, op in enumerate(self.ops):
            path = os.path.join(self.root, op.path)
            if op.kind == "append":
                st = os.stat(path)
                self.undo_log.append(("truncate", path, st.st_size, st.st_mtime_ns, st.st_atime_ns))
                with open(path, "ab") as f:
                    f.write(op.data)
            elif op.kind == "patch":
                st = os.stat(path)
                with open(path, "r+b") as f:
                    f.seek(op.offset)
                    old = f.read(len(op.data))
                    self.undo_log.append(("unpatch", path, op.offset, old, st.st_mtime_ns, st.st_atime_ns))
                    f.seek(op.offset)
                    f.write(op.data)
            elif op.kind in ("replace", "delete", "swap"):
                parked = os.path.join(self.stash, f"op{n}")
                os.rename(path, parked)
                self.undo_log.append(("unpark", parked, path, op.kind, op.dest))
                if op.kind == "replace":
                    st = os.stat(parked)
                    _write_plain(path, op.data, stat.S_IMODE(st.st_mode))
                elif op.kind == "swap":  # op.dest: a prepared variant in the stash
                    os.rename(op.dest, path)
            elif op.kind == "rename":
                dest = os.path.join(self.root, op.dest.rstrip("/"))
                made = _makedirs(os.path.dirname(dest))
                os.rename(path, dest)
                self.undo_log.append(("unrename", dest, path, made))
            elif op.kind == "create":
                made = _makedirs(os.path.dirname(path))
                self.undo_log.append(("uncreate", path, made))
                _write_plain(path, op.data, 0o644)
            else:
                raise ValueError(op.kind)

    def undo(self) -> None:
        for entry in reversed(self.undo_log):
            kind = entry[0]
            if kind == "truncate":
                _, path, size, mtime, atime = entry
                os.truncate(path, size)
                os.utime(path, ns=(atime, mtime))
            elif kind == "unpatch":
                _, path, offset, old, mtime, atime = entry
                with open(path, "r+b") as f:
                    f.seek(offset)
                    f.write(old)
                os.utime(path, ns=(atime, mtime))
            elif kind == "unpark":
                _, parked, path, opkind, variant = entry
                if opkind == "swap" and not os.path.lexists(variant):  # (else it never left)
                    os.rename(path, variant)
                elif opkind == "replace" and os.path.lexists(path):  # (else it was never written)
                    os.unlink(path)
                os.rename(parked, path)
            elif kind == "unrename":
                _, dest, path, made = entry
                os.rename(dest, path)
                _rmdirs(made)
            elif kind == "uncreate":
                _, path, made = entry
                if os.path.lexists(path):  # (else its create failed)
                    os.unlink(path)
                _rmdirs(made)
        self.undo_log.clear()
        try:
            os.unlink(self.marker)
        except FileNotFoundError:
            pass


def _write_plain(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _makedirs(d: str) -> list[str]:
    made = []
    while not os.path.isdir(d):
        made.append(d)
        d = os.path.dirname(d)
    for x in reversed(made):
        os.mkdir(x)
    return made  # deepest first


def _rmdirs(made: list[str]) -> None:
    for d in made:
        os.rmdir(d)


# ---------------------------------------------------------------------------
# Mutation plans (deterministic from seed and the tree's sorted file list)


def _split_for(r: random.Random, candidates: list[str], counts: list[int]) -> list[list[str]]:
    pool = list(candidates)
    r.shuffle(pool)
    out, i = [], 0
    for c in counts:
        out.append(pool[i:i + c])
        i += c
    return out


def plan_mixed_change(root: str, seed: int, frac: float = 0.01) -> list[Op]:
    """~1% of files: appends, in-place edits, deletes, renames into other dirs, new files."""
    r = rng(seed, "mixed-change")
    stream = ByteStream(seed, "mixed-change")
    text = TextSource(seed, "text")
    files = list_files(root)
    dirs = list_dirs(root)
    small = [f for f in files if os.path.basename(f)[0] in "tb"]
    medium = [f for f in files if os.path.basename(f)[0] == "m"]
    n = max(10, round(frac * (len(small) + len(medium))))
    counts = [n * 25 // 100, n * 25 // 100, n * 15 // 100, n * 20 // 100]
    appends, edits, deletes, renames = _split_for(r, small, counts)
    n_new = n - sum(counts)
    ops: list[Op] = []
    for f in appends:
        k = r.randint(100, 8 * KiB)
        data = text.make(stream, k) if os.path.basename(f)[0] == "t" else stream.read(k)
        ops.append(Op("append", f, data))
    for f in edits:
        size = os.path.getsize(os.path.join(root, f))
        k = min(size, r.randint(16, 4 * KiB))
        ops.append(Op("patch", f, stream.read(k), offset=r.randrange(0, size - k + 1)))
    for f in deletes:
        ops.append(Op("delete", f))
    for f in renames:
        here = os.path.dirname(f)
        target = r.choice([d for d in dirs if d != here] or [""])
        ops.append(Op("rename", f, dest=f"{target}/{os.path.basename(f)}" if target else os.path.basename(f)))
    for i in range(n_new):
        d = r.choice(dirs)
        size = log_uniform(r, 1 * KiB, 64 * KiB)
        if i % 2:
            ops.append(Op("create", f"{d}/new{i:04d}.txt", text.make(stream, size)))
        else:
            ops.append(Op("create", f"{d}/new{i:04d}.bin", stream.read(size)))
    # ~1% of the 1-8 MiB files too: one edited in place, one appended to
    n_med = max(1, round(frac * len(medium))) if medium else 0
    for j, f in enumerate(_split_for(r, medium, [n_med])[0]):
        size = os.path.getsize(os.path.join(root, f))
        if j % 2 == 0:
            ops.append(Op("patch", f, stream.read(64 * KiB), offset=r.randrange(0, max(1, size - 64 * KiB))))
        else:
            ops.append(Op("append", f, stream.read(256 * KiB)))
    return ops


def plan_release(root: str, seed: int) -> list[Op]:
    """A release-like update of a source tree: a few lines edited in ~15% of the files,
    ~2% files added (some in a new directory), ~1% deleted, ~1% renamed."""
    r = rng(seed, "release")
    stream = ByteStream(seed, "release")
    code = TextSource(seed, "code")
    files = list_files(root)
    dirs = list_dirs(root)
    n = len(files)
    edits, deletes, renames = _split_for(r, files, [n * 15 // 100, max(1, n // 100), max(1, n // 100)])
    ops: list[Op] = []
    for f in edits:
        with open(os.path.join(root, f), "rb") as fh:
            lines = fh.read().splitlines(keepends=True)
        for _ in range(r.randint(1, 4)):  # 1-4 hunks of 1-6 lines
            at = r.randrange(0, len(lines) + 1)
            k = r.randint(1, 6)
            what = r.random()
            new = code.lines(stream, k)
            if what < 0.5:
                lines[at:at + k] = new  # replace
            elif what < 0.8:
                lines[at:at] = new  # insert
            else:
                del lines[at:at + k]  # delete
        ops.append(Op("replace", f, b"".join(lines)))
    for f in deletes:
        ops.append(Op("delete", f))
    for j, f in enumerate(renames):
        here = os.path.dirname(f)
        base = os.path.basename(f)
        if j % 2 == 0:
            dest = f"{here}/renamed_{base}" if here else f"renamed_{base}"
        else:
            target = r.choice([d for d in dirs if d != here] or [""])
            dest = f"{target}/{base}" if target else base
        ops.append(Op("rename", f, dest=dest))
    n_new = max(2, n * 2 // 100)
    for i in range(n_new):
        d = "pkg_new/sub" if i < n_new // 3 else r.choice(dirs)
        size = log_uniform(r, 1 * KiB, 50 * KiB)
        ops.append(Op("create", f"{d}/added{i:04d}.py", code.make(stream, size)))
    return ops


def plan_bigedit(root: str, seed: int, p: dict) -> list[Op]:
    """16 scattered 64 KiB overwrites in the big file."""
    r = rng(seed, "bigedit")
    stream = ByteStream(seed, "bigedit")
    size, k, n = p["big_size"], p["big_edit_size"], p["big_edits"]
    slot = size // n
    return [Op("patch", "big.img", stream.read(k), offset=i * slot + r.randrange(0, slot - k)) for i in range(n)]


def make_insert_variant(root: str, stash: str, seed: int, p: dict) -> list[Op]:
    """The big file with 100 bytes inserted at offset 0 and 100 in the middle, prepared
    once in the stash and swapped in by rename (an editor's save is a rewrite too)."""
    stream = ByteStream(seed, "insert")
    k = p["insert_size"]
    src = os.path.join(root, "big.img")
    variant = os.path.join(stash, "insert-variant.img")
    os.makedirs(stash, exist_ok=True)
    if not os.path.exists(variant):
        size = os.path.getsize(src)
        mid = size // 2 + 12345
        tmp = variant + ".tmp"
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            fo.write(stream.read(k))
            left = mid
            while left:
                b = fi.read(min(left, 4 * MiB))
                fo.write(b)
                left -= len(b)
            fo.write(stream.read(k))
            while b := fi.read(4 * MiB):
                fo.write(b)
        t = (BASE_MTIME + 86400) * 10**9
        os.utime(tmp, ns=(t, t))
        os.rename(tmp, variant)
    return [Op("swap", "big.img", dest=variant)]


def plan_move(root: str) -> list[Op]:
    """Rename the 200 MiB directory into another parent."""
    return [Op("rename", "payload", dest="archive/payload-2024/")]
