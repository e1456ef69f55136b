"""dirsync's messages on the wire: encoding and (hostile-input) decoding of actions, entries,
errors and open results. Pure: no I/O. Framing and validators live in wire.py.

Both sides use these functions, so a message is described in one place. See PROTOCOL.md.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from itertools import accumulate

import msgpack

from dirsync.errors import (
    ConfigError,
    ConnectError,
    DirsyncError,
    ExitCode,
    ItemError,
    LockedError,
    ProtocolError,
    RefusedError,
)
from dirsync.manifest import _FSENC, DIGEST_SIZE, Entry, FileEntry, _or_all, decode_rows, encode_rows, is_under
from dirsync.plan import Action, Commit, CopyOp, Delete, MakeDir, MakeLink, MoveDir, SendOp, SetMeta, WriteFile
from dirsync.replica import OpenInfo
from dirsync.scan import STATE_DIR
from dirsync.transport.wire import v_bool, v_bytes, v_code, v_int, v_list, v_map, v_relpath as _v_relpath, v_str

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Any, Callable

MAX_OPS = 1 << 22
MAX_ROWS = 1 << 16  # rows per frame
MOVE_MAX = 8 << 20  # an mvdir's list of entries, as plan.move_size weighs it: well within a frame
MAX_MODE = 0o7777
I64 = 2**63 - 1
ROWS_PER_FRAME = 4096

_enc = os.fsencode
_STATE = STATE_DIR.encode()


def v_relpath(b: Any) -> str:
    """wire.v_relpath, and never inside the replica's own state folder (`.dirsync/...`)."""
    path = _v_relpath(b)
    if b == _STATE or b.startswith(_STATE + b"/"):
        raise ProtocolError(f"path inside the replica state folder {STATE_DIR}: {path[:80]!r}")
    return path


def v_path(b: Any) -> bytes:
    """A replica root or backup dir as the master names it (absolute, or relative to the agent's
    home): bytes, at most 4096, no NUL. b"" means the home directory."""
    b = v_bytes(b, 4096)
    if b"\0" in b:
        raise ProtocolError("path contains NUL")
    return b


def _path(b: Any, *, root_ok: bool = False) -> str:
    if root_ok and b == b"":
        return ""
    return v_relpath(b)


def enc_expect(x: tuple | None) -> Any:
    if x is None:
        return None
    if x[0] == "l":
        return ["l", _enc(x[1])]
    return list(x)


def dec_expect(x: Any) -> tuple | None:
    if x is None:
        return None
    x = v_list(x, 3)
    kind = v_str(x[0], 1) if x else ""
    if kind == "f" and len(x) == 3:
        return ("f", v_int(x[1], 0, I64), v_int(x[2], -I64, I64))
    if kind == "l" and len(x) == 2:
        return ("l", os.fsdecode(v_bytes(x[1], 4096)))
    if kind == "d" and len(x) == 1:
        return ("d",)
    raise ProtocolError(f"bad expectation {x!r:.80}")


def enc_action(a: Action) -> dict:
    if isinstance(a, WriteFile):
        ops = [[_enc(o.src), o.offset, o.size] if isinstance(o, CopyOp) else [o.offset, o.size] for o in a.ops]
        msg = {"t": "write", "f": encode_rows([a.target], cache_fields=False)[0], "ops": ops,
               "x": enc_expect(a.expect)}
        if a.move:
            msg["mv"] = True
        return msg
    if isinstance(a, Commit):
        return {"t": "commit", "ps": [_enc(p) for p in a.paths]}
    if isinstance(a, MakeDir):
        return {"t": "mkdir", "p": _enc(a.path), "mode": a.mode}
    if isinstance(a, MakeLink):
        return {"t": "link", "p": _enc(a.path), "to": _enc(a.target), "mt": a.mtime_ns, "x": enc_expect(a.expect)}
    if isinstance(a, SetMeta):
        return {"t": "meta", "p": _enc(a.path), "k": a.kind, "mode": a.mode, "mt": a.mtime_ns}
    if isinstance(a, Delete):
        return {"t": "del", "p": _enc(a.path), "k": a.kind, "x": enc_expect(a.expect), "ob": a.obstruction}
    if isinstance(a, MoveDir):  # (only to an agent that announced "md")
        return {"t": "mvdir", "s": _enc(a.src), "p": _enc(a.path), "m": [_enc(x) for x in a.moved]}
    raise TypeError(f"unknown action {a!r}")


_TYPES = {WriteFile: "write", Commit: "commit", MakeDir: "mkdir", MakeLink: "link", SetMeta: "meta", Delete: "del",
          MoveDir: "mvdir"}


def action_type(a: Action) -> str:
    """enc_action(a)["t"], without encoding a."""
    return _TYPES[a.__class__]


def pack_row(msg: dict) -> bytes:
    """A write message's row and ops as one msgpack blob, sent compressed as "rz" (paths and
    chunk sizes compress well against the rows sent before them). A one-chunk file's chunk
    digest is its whole digest: left out (b""), unless the row is compacted ("dm")."""
    row = msg.pop("f")
    if len(row[7]) == 1 and row[8] == row[5] and "dm" not in msg:
        row = [*row[:8], b""]
    return msgpack.packb([row, msg.pop("ops")], use_bin_type=True)


def _unpack_blob(blob: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(blob, raw=False, use_list=True, max_bin_len=len(blob), max_str_len=len(blob),
                               max_array_len=len(blob), max_map_len=0, max_ext_len=0)
    except Exception as e:
        raise ProtocolError(f"{what}: packed field unreadable ({str(e)[:80]})") from None


def dec_packed_row(blob: bytes, compacted: bool) -> dict:
    """Inverse of pack_row: {"f": row, "ops": ops}, for dec_action to check like any other.
    `compacted`: the message has "dm" (its digests field then is what _expand_digests reads)."""
    got = _unpack_blob(blob, "write")
    if not isinstance(got, list) or len(got) != 2:
        raise ProtocolError("write: packed row is not [row, ops]")
    row = got[0]
    if not compacted and isinstance(row, list) and len(row) == 9 and row[8] == b"" and isinstance(row[7], list) \
            and len(row[7]) == 1:
        row = [*row[:8], row[5]]  # one chunk: its digest is the file's (checked as any row's)
    return {"f": row, "ops": got[1]}


WB_FILES = 1024  # files in one write batch at most (the master's choice: the agent takes MAX_ROWS)
WB_BYTES = 1 << 20  # bytes of data in one write batch, about (the agent takes 16 MiB)
WB_FILE_MAX = 64 << 10  # the largest file a write batch carries


def batchable(w: WriteFile) -> bool:
    """Can `w` travel in a write batch ("wb", see PROTOCOL.md)? A new path (nothing expected
    there), not a move, every byte sent by the master, at most WB_FILE_MAX bytes."""
    ops = w.ops
    return (w.expect is None and not w.move and w.target.size <= WB_FILE_MAX
            and (not ops or (len(ops) == 1 and ops[0].__class__ is SendOp)))


def pack_batch(targets: list) -> bytes:
    """A write batch's rows (FileEntry targets) as one msgpack blob, sent compressed as "rz":
    wire file rows with the digests field empty (the agent derives them, as for "sd")."""
    return msgpack.packb([r[:8] + (b"",) for r in encode_rows(targets, cache_fields=False)], use_bin_type=True)


def dec_batch(blob: bytes, data_len: int) -> list[WriteFile]:
    """Inverse of pack_batch, checked like any write (hostile input): one derived WriteFile per
    row, in order, each with one send op for all its bytes. `data_len`: the bytes the batch
    carries, which must be exactly the files' sizes summed.

    The checks are v_relpath's and decode_rows's (a relpath as bytes, outside the state folder;
    ints where ints belong, a mode of 0..0o7777, a 16-byte digest, positive chunk sizes that add
    up to the size, an mtime within int64) done inline: this runs once per small file written,
    and the general decoders cost twice as much."""
    rows = _unpack_blob(blob, "write batch")
    if not isinstance(rows, list) or not rows or len(rows) > MAX_ROWS:
        raise ProtocolError("write batch: rows are not a list of 1..65536")
    out = []
    total = 0
    seen: set[bytes] = set()
    fsenc = _FSENC
    state, state_in = _STATE, _STATE + b"/"
    for r in rows:
        try:
            t, p, size, mode, mtime, digest, avg, sizes, digests = r
            ok = (t == 0 and digests == b"" and sizes.__class__ is list and p.__class__ is bytes
                  and digest.__class__ is bytes and len(digest) == DIGEST_SIZE)
            if ok:
                size | mode | mtime | avg | _or_all(sizes)  # (TypeError for anything but ints)
                ok = 0 <= mode <= MAX_MODE and -I64 <= mtime <= I64 and sum(sizes) == size and size >= 0 \
                    and (not sizes or min(sizes) > 0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ProtocolError(f"write batch: a row is not a file row with its digests left out: {str(r)[:80]}")
        w = b"/" + p + b"/"
        if not p or b"//" in w or b"/./" in w or b"/../" in w or b"\0" in p or len(p) > 4096:
            v_relpath(p)  # raises with the reason
        if p == state or p.startswith(state_in):
            raise ProtocolError(f"path inside the replica state folder {STATE_DIR}: {p[:80]!r}")
        if p in seen:
            raise ProtocolError(f"write batch: a path comes twice: {p[:80]!r}")
        seen.add(p)
        sizes = tuple(sizes)
        # The chunk digests are a placeholder: the writer derives them (WriteFile.derive).
        f = FileEntry(p.decode(fsenc, "surrogateescape"), size, mode, mtime, digest, avg, sizes,
                      bytes(DIGEST_SIZE * len(sizes)), 0, 0, False)
        total += size
        out.append(WriteFile(f, (SendOp(0, size),) if size else (), None, False, True))
    if total != data_len:
        raise ProtocolError(f"write batch: {data_len} bytes of data for {total} bytes of files")
    return out


def pack_paths(msg: dict) -> bytes:
    """A commit message's path list as one msgpack blob, sent compressed as "pz"."""
    return msgpack.packb(msg.pop("ps"), use_bin_type=True)


def dec_packed_paths(blob: bytes) -> list:
    """A commit's path list sent compressed as "pz" (checked by dec_action like "ps")."""
    got = _unpack_blob(blob, "commit")
    if not isinstance(got, list):
        raise ProtocolError("commit: packed paths are not a list")
    return got


def compact_digests(w: WriteFile, replica: dict) -> tuple[bytes, bytes] | None:
    """(mask, digests left) for a write whose chunk digests the agent can mostly look up itself.

    Bit i of mask is set when target chunk i lies inside a copy op and the replica (as
    scanned) has a chunk of the same size and digest at the matching source offset; those
    digests are left out. None when no chunk qualifies (send the full row).

    A copy op's chunks are first compared with the source's as one run (a slice comparison:
    a moved file, the unchanged stretches of an edited one), and only one by one when that
    fails. Measured: 220 ms a lookup per chunk for a 1 GiB file after 16 edits (131,000
    chunks), and as long again for the agent to expand them (_expand_digests)."""
    t = w.target
    sizes, digests, D = t.sizes, t.digests, DIGEST_SIZE
    n = len(sizes)
    offs = list(accumulate(sizes, initial=0))  # chunk k is offs[k]..offs[k + 1]
    mask = bytearray((n + 7) // 8)
    left: list[bytes] = []
    starts: dict[str, list[int]] = {}
    tables: dict[str, dict[int, tuple[int, bytes]]] = {}
    pos = 0
    for op in w.ops:
        end = pos + op.size
        k0, k1 = bisect_left(offs, pos, 0, n), bisect_left(offs, end, 0, n)  # the chunks starting in op
        src = replica.get(op.src) if op.__class__ is CopyOp else None
        full = k1 - 1 if k1 > k0 and offs[k1] > end else k1  # (a chunk running past the op is sent)
        if not isinstance(src, FileEntry) or full == k0:
            left.append(digests[k0 * D:k1 * D])
        elif _run_of(src, starts, op.offset + offs[k0] - pos, sizes, k0, full) == digests[k0 * D:full * D]:
            _set_bits(mask, k0, full)
            left.append(digests[full * D:k1 * D])
        else:
            table = tables.get(op.src)
            if table is None:
                table = tables[op.src] = {off: (m, d) for off, m, d in src.chunks()}
            for k in range(k0, k1):
                d = digests[k * D:(k + 1) * D]
                if k < full and table.get(op.offset + offs[k] - pos) == (sizes[k], d):
                    mask[k >> 3] |= 1 << (k & 7)
                else:
                    left.append(d)
        pos = end
    return (bytes(mask), b"".join(left)) if any(mask) else None


def _run_of(src: FileEntry, starts: dict[str, list[int]], so: int, sizes, k0: int, k1: int) -> bytes | None:
    """The digests of src's chunks from offset `so` on when their sizes are sizes[k0:k1] (one
    run of whole chunks); None when they are not."""
    s_offs = starts.get(src.path)
    if s_offs is None:
        s_offs = starts[src.path] = list(accumulate(src.sizes, initial=0))
    j0, m = bisect_left(s_offs, so), k1 - k0
    if j0 + m >= len(s_offs) or s_offs[j0] != so or src.sizes[j0:j0 + m] != tuple(sizes[k0:k1]):
        return None
    return src.digests[j0 * DIGEST_SIZE:(j0 + m) * DIGEST_SIZE]


def _set_bits(mask: bytearray, k0: int, k1: int) -> None:
    """Set bits k0..k1-1 of mask (bit k is bit k & 7 of byte k >> 3)."""
    while k0 < k1 and k0 & 7:
        mask[k0 >> 3] |= 1 << (k0 & 7)
        k0 += 1
    a, b = k0 >> 3, k1 >> 3
    if b > a:
        mask[a:b] = b"\xff" * (b - a)
        k0 = b << 3
    while k0 < k1:
        mask[k0 >> 3] |= 1 << (k0 & 7)
        k0 += 1


def _bits(mask: bytes, k0: int, k1: int) -> int:
    """Bits k0..k1-1 of mask as an int (bit k0 lowest)."""
    return int.from_bytes(mask[k0 >> 3:(k1 + 7) >> 3], "little") >> (k0 & 7) & ((1 << (k1 - k0)) - 1)


def dec_action(m: dict, chunk_at: Callable[[str, int], tuple[int, bytes] | None] | None = None,
               source: Callable[[str], FileEntry | None] | None = None) -> Action:
    """Decode and validate one action from the client (everything is hostile until checked).

    `chunk_at(src, offset)` gives the (size, digest) of the replica chunk at that offset; it
    fills in the digests a compacted write row left out (see compact_digests). `source(src)`
    gives the replica's entry for src as scanned (then a copy op's chunks are taken as one run
    of that file's where they are one)."""
    t = m.get("t")
    if t == "write":
        ops: list = []
        pos = 0
        for o in v_list(m.get("ops"), MAX_OPS):
            o = v_list(o, 3)
            if len(o) == 3:
                op = CopyOp(v_relpath(o[0]), v_int(o[1], 0, I64), v_int(o[2], 1, I64))
            elif len(o) == 2:
                op = SendOp(v_int(o[0], 0, I64), v_int(o[1], 1, I64))
                if op.offset != pos:
                    raise ProtocolError(f"write: send op at {op.offset}, expected {pos}")
            else:
                raise ProtocolError("write: malformed op")
            pos += op.size
            ops.append(op)
        row = m.get("f")
        derive = v_bool(m.get("sd", False))
        if derive:  # the agent computes the chunk digests from the bytes sent (see WriteFile.derive)
            if m.get("dm") is not None or not all(isinstance(o, SendOp) for o in ops):
                raise ProtocolError("write: digests to derive, but not every op is a send op")
            row = v_list(row, 9)
            if len(row) != 9 or row[8] != b"":
                raise ProtocolError("write: digests to derive, but the row has some")
            row = [*row[:8], bytes(DIGEST_SIZE * len(v_list(row[7], MAX_OPS)))]
        elif m.get("dm") is not None:
            row = _expand_digests(row, v_bytes(m.get("dm"), MAX_OPS), ops, chunk_at, source)
        target = dec_rows([row])
        f = next(iter(target.values())) if len(target) == 1 else None
        if not isinstance(f, FileEntry) or not f.path:
            raise ProtocolError("write: target is not a file row")
        v_relpath(_enc(f.path))
        v_int(f.mtime_ns, -I64, I64)
        v_int(f.size, 0, I64)
        if pos != f.size:
            raise ProtocolError(f"write {f.path!r}: ops cover {pos} bytes of {f.size}")
        return WriteFile(f, tuple(ops), dec_expect(m.get("x")), move=v_bool(m.get("mv", False)), derive=derive)
    if t == "commit":
        return Commit(tuple(v_relpath(p) for p in v_list(m.get("ps"), MAX_OPS)))
    if t == "mkdir":
        return MakeDir(v_relpath(m.get("p")), v_int(m.get("mode"), 0, MAX_MODE))
    if t == "link":
        target = v_bytes(m.get("to"), 4096)
        if not target or b"\0" in target:
            raise ProtocolError("link: empty target or NUL in target")
        return MakeLink(v_relpath(m.get("p")), os.fsdecode(target), v_int(m.get("mt"), -I64, I64),
                        dec_expect(m.get("x")))
    if t == "meta":
        kind = v_str(m.get("k"), 1)
        if kind not in ("f", "d", "l"):
            raise ProtocolError(f"meta: bad kind {kind!r}")
        return SetMeta(_path(m.get("p"), root_ok=kind == "d"), kind, v_int(m.get("mode"), 0, MAX_MODE),
                       v_int(m.get("mt"), -I64, I64))
    if t == "del":
        kind = v_str(m.get("k"), 1)
        if kind not in ("f", "d", "l"):
            raise ProtocolError(f"del: bad kind {kind!r}")
        return Delete(v_relpath(m.get("p")), kind, dec_expect(m.get("x")), v_bool(m.get("ob", False)))
    if t == "mvdir":
        src, dst = v_relpath(m.get("s")), v_relpath(m.get("p"))
        if is_under(dst, src) or is_under(src, dst):
            raise ProtocolError("mvdir: a directory cannot move into itself or its own parent")
        moved = dec_suffixes(m.get("m"), src)
        if not moved or moved[0] != "":
            raise ProtocolError("mvdir: the entries moved must start with the directory itself")
        return MoveDir(src, dst, tuple(moved))
    raise ProtocolError(f"unknown action type {str(t)[:40]!r}")


def dec_suffixes(items: Any, src: str) -> list[str]:
    """A MoveDir's entries, as suffixes of `src` ("" or "/a", "/a/b" ...): each checked as a
    path under it."""
    out = [os.fsdecode(v_bytes(x, 4096)) for x in v_list(items, MOVE_MAX // 8)]
    for x in out:
        if x and not x.startswith("/"):
            raise ProtocolError("bad suffix of a moved directory's entry")
        if x:
            v_relpath(os.fsencode(src + x))
    return out


def _expand_digests(row: Any, mask: bytes, ops: list, chunk_at, source=None) -> list:
    """Put back the chunk digests a compacted write row left out (hostile input: check all)."""
    row = v_list(row, 9)
    if len(row) != 9 or chunk_at is None:
        raise ProtocolError("write: compacted row without a replica to complete it")
    sizes = v_list(row[7], MAX_OPS)
    left = v_bytes(row[8], 16 * len(sizes))
    if len(mask) != (len(sizes) + 7) // 8:
        raise ProtocolError("write: digest mask of the wrong length")
    if source is not None and sizes and set(map(type, sizes)) == {int} and 0 < min(sizes) and max(sizes) <= I64:
        got = _expand_runs(sizes, mask, left, ops, source)
        if got is not None:
            return [*row[:8], got]
    out = []
    off = i_left = 0
    pos, k = 0, 0
    for i, n in enumerate(sizes):
        n = v_int(n, 1, I64)
        if mask[i >> 3] >> (i & 7) & 1:
            while k < len(ops) and pos + ops[k].size <= off:
                pos += ops[k].size
                k += 1
            op = ops[k] if k < len(ops) else None
            if not isinstance(op, CopyOp) or off + n > pos + op.size:
                raise ProtocolError("write: a looked-up chunk is not inside a copy op")
            hit = chunk_at(op.src, op.offset + off - pos)
            if hit is None or hit[0] != n:
                raise ProtocolError(f"write: the replica has no chunk of {n} bytes at {op.src!r}+{op.offset + off - pos}")
            out.append(hit[1])
        else:
            if i_left + 16 > len(left):
                raise ProtocolError("write: too few chunk digests")
            out.append(left[i_left:i_left + 16])
            i_left += 16
        off += n
    if i_left != len(left):
        raise ProtocolError("write: too many chunk digests")
    return [*row[:8], b"".join(out)]


def _expand_runs(sizes: list, mask: bytes, left: bytes, ops: list, source) -> bytes | None:
    """_expand_digests a copy op at a time (see compact_digests): where every chunk inside a copy
    op is looked up and they are one run of the source's chunks, their digests are one slice of
    the source's; the others come from `left`. None when any op is not that simple (mixed bits,
    a looked-up chunk across an op's end, a source without that run): the caller then goes
    chunk by chunk, which also says what is wrong with a hostile row."""
    D = DIGEST_SIZE
    n = len(sizes)
    offs = list(accumulate(sizes, initial=0))
    out: list[bytes] = []
    starts: dict[str, list[int]] = {}
    i_left = pos = 0
    for op in ops:
        end = pos + op.size
        k0, k1 = bisect_left(offs, pos, 0, n), bisect_left(offs, end, 0, n)
        full = k1 - 1 if k1 > k0 and offs[k1] > end else k1
        if op.__class__ is CopyOp and full > k0 and _bits(mask, k0, full) == (1 << (full - k0)) - 1:
            src = source(op.src)
            run = _run_of(src, starts, op.offset + offs[k0] - pos, sizes, k0, full) if src is not None else None
            if run is None:
                return None
            out.append(run)
            k0 = full
        if k1 > k0:
            if _bits(mask, k0, k1) or i_left + (k1 - k0) * D > len(left):
                return None
            out.append(left[i_left:i_left + (k1 - k0) * D])
            i_left += (k1 - k0) * D
        pos = end
    if i_left != len(left) or pos != offs[n]:
        return None
    return b"".join(out)


def dec_rows(rows: Any) -> dict[str, Entry]:
    try:
        return decode_rows(v_list(rows, MAX_ROWS))
    except ProtocolError:
        raise
    except Exception as e:  # any shape problem in peer data is a protocol error
        raise ProtocolError(f"bad manifest rows from the peer: {e}") from None


def dec_paths(x: Any) -> list[str]:
    """A `removed` frame's paths (relpaths, validated like any path from the peer)."""
    return [v_relpath(p) for p in v_list(x, MAX_ROWS)]


def enc_item_error(e: ItemError) -> list:
    return [_enc(e.path), e.op, e.code, str(e)]


class RemoteItemError(ItemError):
    """An item error that happened on the far side; its message is kept as the agent wrote it."""

    def __init__(self, path: str, op: str, code: str, message: str) -> None:
        self.code = code
        super().__init__(path, op, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # (see ItemError.__reduce__: its fields are not this one's)
        return self.__class__, (self.path, self.op, self.code, self.args[0])


def dec_item_error(x: Any) -> ItemError:
    x = v_list(x, 4)
    if len(x) != 4:
        raise ProtocolError("bad item error")
    path = os.fsdecode(v_bytes(x[0], 4096))
    return RemoteItemError(path, v_str(x[1], 100), v_code(x[2]), v_str(x[3], 4096))


_FATAL = {int(ExitCode.USAGE): ConfigError, int(ExitCode.LOCKED): LockedError, int(ExitCode.REFUSED): RefusedError,
          int(ExitCode.CONNECT): ConnectError, int(ExitCode.PROTOCOL): ProtocolError}


def enc_fatal(e: DirsyncError) -> dict:
    return {"t": "fatal", "code": int(e.exit_code), "msg": str(e), "hint": e.hint or ""}


def dec_fatal(m: dict, where: str) -> DirsyncError:
    """The agent's `fatal` frame as the error to raise; it keeps the agent's exit code."""
    code = v_int(m.get("code"), 0, 255)
    cls = _FATAL.get(code, DirsyncError)
    hint = v_str(m.get("hint", ""), 4096) or None
    err = cls(f"{where}: {v_str(m.get('msg'), 4096)}", hint=hint)
    if cls is DirsyncError and code in ExitCode.codes().values():
        err.exit_code = code  # e.g. 23 for an item error outside apply
    return err


def enc_open_info(info: OpenInfo) -> dict:
    d = info.asdict()
    d["reserved"] = [_enc(p) for p in info.reserved]
    return d


def dec_open_info(x: Any) -> OpenInfo:
    m = v_map(x)
    return OpenInfo(
        created=v_bool(m.get("created", False)),
        initialised=v_bool(m.get("initialised", False)),
        cache_status=v_str(m.get("cache_status", "ok"), 20),
        cache_reason=v_str(m.get("cache_reason", ""), 4096),
        warnings=[v_str(w, 4096) for w in v_list(m.get("warnings", []), 1000)],
        reserved=tuple(_v_relpath(p) for p in v_list(m.get("reserved", []), 16)),  # may be under .dirsync/
        frees_linger=v_bool(m.get("frees_linger", False)),  # (an older agent does not say)
    )
