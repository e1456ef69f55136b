"""`dirsync agent` treats everything it receives as hostile.

Crafted frames go straight to a real `python -m dirsync agent` over pipes; a seeded fuzz loop
mutates valid sessions (fields replaced by values of the wrong type, escaping paths, huge and
negative numbers, corrupted and oversize frames) and runs each against the agent in-process
(the same Agent class on os.pipe()s, so hundreds of cases stay fast). Every case must end in a
protocol error (a `fatal` frame and exit status 11), or be harmless valid input; never an
internal error, and nothing may appear outside the replica root (a sibling directory is checked).
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import threading
import time

import msgpack
import pytest

from dirsync.manifest import encode_rows
from dirsync.scan import scan_tree
from dirsync.transport.agent import Agent
from dirsync.transport.wire import MAX_FRAME, PROTO_VERSION, FrameDecoder, encode, hello

try:
    import treecmp
    from helpers import build_tree, random_bytes, settle
    from remote_helpers import agent_argv, agent_env
except ImportError:
    from tests import treecmp
    from tests.helpers import build_tree, random_bytes, settle
    from tests.remote_helpers import agent_argv, agent_env

DEADLINE_S = 30.0


# -- a world: master files to describe, a replica root, and a sibling that must stay untouched -------


@pytest.fixture
def world(tmp_path):
    m, r, outside = tmp_path / "m", tmp_path / "r", tmp_path / "outside"
    build_tree(m, {"f.txt": b"payload\n", "big.bin": random_bytes(700_000, 1), "h.bin": random_bytes(5000, 2),
                   "e.txt": b""})
    build_tree(outside, {"keep.txt": b"keep\n", "sub": {"x": b"x"}})
    os.mkdir(r)
    snap = treecmp.snapshot(outside, ignore=())
    top = sorted(os.listdir(tmp_path))
    yield World(m, r, outside)
    assert treecmp.snapshot(outside, ignore=()) == snap, "something was written outside the replica root"
    assert sorted(os.listdir(tmp_path)) == top, f"new entries beside the replica: {sorted(os.listdir(tmp_path))}"


class World:
    def __init__(self, m, r, outside):
        self.m, self.r, self.outside = m, r, outside
        entries = scan_tree(str(m)).manifest.entries
        self.row_f = list(encode_rows([entries["f.txt"]], cache_fields=False)[0])
        self.row_big = list(encode_rows([entries["big.bin"]], cache_fields=False)[0])
        self.data_f = b"payload\n"
        self.data_big = (m / "big.bin").read_bytes()
        self.small = {p: (list(encode_rows([entries[p]], cache_fields=False)[0]), (m / p).read_bytes())
                      for p in ("f.txt", "h.bin", "e.txt")}

    def write_batch(self, names=("f.txt", "h.bin", "e.txt"), *, rows=None, data=None, compress=False) -> dict:
        """A write batch ("wb") of these master files (their rows' digests left out, their bytes
        as one payload), its rows in a fresh zstd stream; `rows` / `data` replace the real ones."""
        import zstandard

        zc = zstandard.ZstdCompressor(level=3).compressobj()
        flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        if rows is None:
            rows = [self.small[n][0][:8] + [b""] for n in names]
        if data is None:
            data = b"".join(self.small[n][1] for n in names)
        msg = {"t": "wb", "rz": zc.compress(msgpack.packb(rows, use_bin_type=True)) + zc.flush(flush), "d": data}
        if compress:
            msg["d"], msg["z"] = zc.compress(data) + zc.flush(flush), True
        return msg

    def open(self) -> dict:
        return {"t": "open", "root": os.fsencode(str(self.r)), "init": True, "readonly": False}

    def write_inline(self, path: bytes = b"f.txt") -> dict:
        row = list(self.row_f)
        row[1] = path
        return {"t": "write", "f": row, "ops": [[0, len(self.data_f)]], "x": None, "d": self.data_f}

    def write_packed(self, path: bytes = b"f.txt", blob: bytes | None = None, zc=None) -> dict:
        """write_inline with its row and ops in the session's zstd stream ("rz"; a one-chunk
        file's digests left out), the inline data after them in the same stream."""
        import zstandard

        row = list(self.row_f)
        row[1] = path
        row[8] = b""  # f.txt is one chunk: its digest is the file's
        zc = zc or zstandard.ZstdCompressor(level=3).compressobj()
        flush = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        if blob is None:
            blob = msgpack.packb([row, [[0, len(self.data_f)]]], use_bin_type=True)
        rz = zc.compress(blob) + zc.flush(flush)
        return {"t": "write", "rz": rz, "x": None, "d": zc.compress(self.data_f) + zc.flush(flush), "z": True}

    def commit_packed(self, paths, *, garbage: bool = False, zc=None) -> dict:
        """A commit whose path list continues the session's zstd stream ("pz")."""
        import zstandard

        zc = zc or zstandard.ZstdCompressor(level=3).compressobj()
        blob = b"garbage" * 20 if garbage else zc.compress(msgpack.packb(paths)) + zc.flush(
            zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return {"t": "commit", "pz": blob}

    def packed_write_and_commit(self, path: bytes) -> list[dict]:
        import zstandard

        zc = zstandard.ZstdCompressor(level=3).compressobj()
        return [self.write_packed(path, zc=zc), self.commit_packed([path], zc=zc)]

    def write_derived(self) -> list[dict]:
        """write_streamed with its chunk digests left for the agent to compute ("sd")."""
        first, *rest = self.write_streamed()
        return [{**first, "sd": True, "f": first["f"][:8] + [b""]}, *rest]

    def write_streamed(self) -> list[dict]:
        n = len(self.data_big)
        return [{"t": "write", "f": list(self.row_big), "ops": [[0, n]], "x": None},
                {"t": "data", "b": self.data_big[: n // 2]}, {"t": "data", "b": self.data_big[n // 2:]},
                {"t": "end"}]

    def sessions(self) -> list[list[dict]]:
        """Valid sessions (after hello) that the fuzzer mutates."""
        return [
            [self.open(), {"t": "scan", "patterns": ["*.tmp"], "fresh": False, "base": ""}],
            [self.open(), {"t": "apply"}, {"t": "mkdir", "p": b"d", "mode": 0o755}, {"t": "apply_end"}],
            [self.open(), {"t": "apply"}, self.write_inline(), {"t": "commit", "ps": [b"f.txt"]},
             {"t": "link", "p": b"l", "to": b"f.txt", "mt": 0, "x": None},
             {"t": "meta", "p": b"", "k": "d", "mode": 0o755, "mt": 0}, {"t": "apply_end"}],
            [self.open(), {"t": "apply"}, *self.write_streamed(), {"t": "commit", "ps": [b"big.bin"]},
             {"t": "apply_end"}],
            [self.open(), {"t": "scan", "patterns": [], "fresh": True, "base": ""}, {"t": "apply"},
             {"t": "del", "p": b"gone", "k": "f", "x": ["f", 1, 2], "ob": False}, {"t": "apply_end"},
             {"t": "close", "save": True}],
            [self.open(), {"t": "root", "patterns": []}, {"t": "close", "save": False}],
            [self.open(), {"t": "apply"}, *self.packed_write_and_commit(b"g.txt"), {"t": "apply_end"}],
            [self.open(), {"t": "scan", "patterns": [], "fresh": True, "base": ""}, {"t": "apply"},
             *self.write_derived(), {"t": "commit", "ps": [b"big.bin"]}, {"t": "apply_end"}],
            [self.open(), {"t": "apply"}, self.write_batch(compress=True),
             {"t": "commit", "ps": [b"f.txt", b"h.bin", b"e.txt"]}, {"t": "apply_end"}],
            [self.open(), {"t": "scan", "patterns": [], "fresh": False, "base": ""}, {"t": "prep"},
             {"t": "apply"}, self.write_inline(), {"t": "commit", "ps": [b"f.txt"]}, {"t": "apply_end"},
             {"t": "close", "save": True}],
        ]


# -- the agent as a real process ----------------------------------------------------------------------


def frame(msg) -> bytes:
    return encode(msg)


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def run_agent_process(chunks: list[bytes], *, timeout: float = DEADLINE_S, first=None) -> tuple[int, list, str]:
    """Feed `chunks` (after our hello, or `first`) to `python -m dirsync agent`, then EOF; (status, frames, stderr)."""
    p = subprocess.Popen(agent_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=agent_env())
    try:
        out, err = p.communicate(frame(first or hello("test")) + b"".join(chunks), timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("the agent did not finish in time")
    msgs = [m for m in FrameDecoder().feed(out)] if out else []
    return p.returncode, [m for m in msgs if not (isinstance(m, dict) and m.get("t") == "ping")], err.decode()


def assert_protocol_error(status: int, msgs: list, stderr: str, what: str = "") -> dict:
    assert "Traceback" not in stderr, f"{what}: agent crashed:\n{stderr}"
    assert status == 11, f"{what}: exit status {status}, frames {msgs!r:.500}, stderr {stderr!r}"
    fatal = msgs[-1]
    assert fatal.get("t") == "fatal" and fatal.get("code") == 11, f"{what}: last frame {fatal!r}"
    assert msgs[0].get("type") == "hello"
    return fatal


def test_a_valid_session_works(world):
    """The baseline the hostile cases are variations of."""
    chunks = [frame(m) for s in [world.sessions()[i] for i in (2, 3, 6)] for m in s[1:]]
    status, msgs, err = run_agent_process([frame(world.open()), *chunks, frame({"t": "close", "save": True}),
                                           frame({"t": "bye"})])
    assert status == 0, err
    kinds = [m.get("t") or m.get("type") for m in msgs]
    assert kinds[0] == "hello" and "fatal" not in kinds and kinds[-1] == "closed", kinds
    assert (world.r / "f.txt").read_bytes() == world.data_f and (world.r / "big.bin").read_bytes() == world.data_big
    assert (world.r / "g.txt").read_bytes() == world.data_f  # its row and ops came compressed
    assert "failed" not in kinds, msgs


def test_the_open_reply_says_whether_freed_inodes_linger_on_the_replica(world):
    """frees_linger travels in the opened reply (the master then plans small commit batches);
    an older agent's reply without it reads as false."""
    from dirsync.replica import frees_linger
    from dirsync.transport.proto import dec_open_info

    status, msgs, err = run_agent_process([frame(world.open()), frame({"t": "bye"})])
    assert status == 0, err
    opened = next(m for m in msgs if m.get("t") == "opened")
    fd = os.open(world.r, os.O_RDONLY)
    try:
        here = frees_linger(fd)
    finally:
        os.close(fd)
    assert dec_open_info(opened["info"]).frees_linger is here
    old = {k: v for k, v in opened["info"].items() if k != "frees_linger"}
    assert dec_open_info(old).frees_linger is False


def test_a_derived_write_gets_the_digests_of_what_was_sent(world):
    """A write whose chunk digests the agent computes ("sd"): the file lands, and the replica's
    cache holds the same chunk digests as the master's row (which the master never sent)."""
    from dirsync import chunking
    from dirsync.state import load_manifest_file

    chunks = [frame(m) for m in world.sessions()[7][1:]]
    status, msgs, err = run_agent_process([frame(world.open()), *chunks, frame({"t": "close", "save": True}),
                                           frame({"t": "bye"})])
    assert status == 0, err
    kinds = [m.get("t") or m.get("type") for m in msgs]
    assert "fatal" not in kinds and "failed" not in kinds and kinds[-1] == "closed", msgs
    assert (world.r / "big.bin").read_bytes() == world.data_big
    cache = load_manifest_file(str(world.r / ".dirsync" / "manifest"), chunking.CHUNKER_ID).manifest
    assert len(world.row_big[8]) > 16 and cache.entries["big.bin"].digests == world.row_big[8]
    # The file is as the master sent it, so it goes back as its path only (no row).
    assert [m["paths"] for m in msgs if m.get("t") == "written"] == [[b"big.bin"]], msgs
    assert not [r for m in msgs if m.get("t") == "rows" for r in m["rows"] if r[1] == b"big.bin"], msgs


@pytest.mark.parametrize("dw", [False, True])
def test_a_write_batch_lands_with_the_digests_of_what_was_sent(world, dw):
    """A write batch ("wb"): every file lands (a one-chunk, a many-chunk and an empty one), the
    replica's cache holds the master's chunk digests (derived: they never travelled), and the
    done writes come back one frame each, or as one `dw` path list to a master that takes it."""
    from dirsync import chunking
    from dirsync.state import load_manifest_file

    names = ["f.txt", "h.bin", "e.txt"]
    assert len(world.small["h.bin"][0][7]) > 1  # several chunks: their digests are derived
    first = hello("test", features=["dw"]) if dw else None
    scan = {"t": "scan", "patterns": [], "fresh": True, "base": ""}  # (a cache is saved after a scan)
    status, msgs, err = run_agent_process([frame(world.open()), frame(scan), frame({"t": "apply"}),
                                           frame(world.write_batch()),
                                           frame({"t": "commit", "ps": [os.fsencode(n) for n in names]}),
                                           frame({"t": "apply_end"}), frame({"t": "close", "save": True}),
                                           frame({"t": "bye"})], first=first)
    assert status == 0, err
    kinds = [m.get("t") or m.get("type") for m in msgs]
    assert "fatal" not in kinds and "failed" not in kinds and kinds[-1] == "closed", msgs
    cache = load_manifest_file(str(world.r / ".dirsync" / "manifest"), chunking.CHUNKER_ID).manifest
    for n in names:
        row, data = world.small[n]
        assert (world.r / n).read_bytes() == data
        assert (world.r / n).stat().st_mtime_ns == row[4] and (world.r / n).stat().st_mode & 0o7777 == row[3]
        e = cache.entries[n]
        assert (e.digest, e.sizes, e.digests) == (row[5], tuple(row[7]), row[8]), n
    done = [m["p"] for m in msgs if m.get("t") == "done"]
    listed = [p for m in msgs if m.get("t") == "dw" for p in m["ps"]]
    assert (done, listed) == (([], [os.fsencode(n) for n in names]) if dw else ([os.fsencode(n) for n in names], []))


def test_a_flagged_batch_goes_to_a_helper_that_commits_only_what_it_is_told(world):
    """A batch flagged "h" is written by the agent's helper writer (a forked process): the files
    its commit names land, with the digests derived there in the replica's cache; one the master
    never committed is reported failed, not left behind or silently dropped."""
    from dirsync import chunking
    from dirsync.state import load_manifest_file

    scan = {"t": "scan", "patterns": [], "fresh": True, "base": ""}
    status, msgs, err = run_agent_process([frame(world.open()), frame(scan), frame({"t": "apply"}),
                                           frame({**world.write_batch(), "h": True}),
                                           frame({"t": "commit", "ps": [b"f.txt", b"h.bin"]}),
                                           frame({"t": "apply_end"}), frame({"t": "close", "save": True}),
                                           frame({"t": "bye"})])
    assert status == 0, err
    failed = [m["e"] for m in msgs if m.get("t") == "failed"]
    assert [f[0] for f in failed] == [b"e.txt"] and "never told to commit" in failed[0][3], msgs
    assert sorted(os.listdir(world.r)) == [".dirsync", "f.txt", "h.bin"]
    cache = load_manifest_file(str(world.r / ".dirsync" / "manifest"), chunking.CHUNKER_ID).manifest
    for n in ("f.txt", "h.bin"):
        row, data = world.small[n]
        assert (world.r / n).read_bytes() == data
        assert cache.entries[n].digests == row[8] and cache.entries[n].ino == (world.r / n).stat().st_ino


def test_a_write_batch_whose_bytes_do_not_match_stages_nothing(world):
    """A file of a batch whose bytes differ from its row fails alone, before any temp is made;
    the others land."""
    bad = bytearray(world.small["h.bin"][1])
    bad[100] ^= 1
    data = world.small["f.txt"][1] + bytes(bad) + b""
    status, msgs, err = run_agent_process([frame(world.open()), frame({"t": "apply"}), frame(world.write_batch(data=data)),
                                           frame({"t": "commit", "ps": [b"f.txt", b"h.bin", b"e.txt"]}),
                                           frame({"t": "apply_end"}), frame({"t": "close", "save": True}),
                                           frame({"t": "bye"})])
    assert status == 0, err
    failed = [m["e"] for m in msgs if m.get("t") == "failed"]
    assert len(failed) == 1 and failed[0][0] == b"h.bin" and "content check" in failed[0][3], msgs
    assert sorted(os.listdir(world.r)) == [".dirsync", "e.txt", "f.txt"]


CRAFTED = {
    "mkdir ../": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": b"../escaped", "mode": 0o755}],
    "mkdir a/../../": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": b"a/../../escaped", "mode": 0o755}],
    "mkdir absolute": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": os.fsencode(str(w.outside / "new")), "mode": 0o755}],
    "mkdir NUL": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": b"a\0b", "mode": 0o755}],
    "mkdir path as str": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": "d", "mode": 0o755}],
    "mkdir mode as str": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": b"d", "mode": "755"}],
    "mkdir mode negative": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": b"d", "mode": -1}],
    "mkdir mode huge": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": b"d", "mode": 2**64 - 1}],
    "mkdir in state dir": lambda w: [{"t": "apply"}, {"t": "mkdir", "p": b".dirsync/evil", "mode": 0o755}],
    "write ../": lambda w: [{"t": "apply"}, w.write_inline(b"../escaped.txt")],
    "write absolute": lambda w: [{"t": "apply"}, w.write_inline(os.fsencode(str(w.outside / "keep.txt")))],
    "write over the lock": lambda w: [{"t": "apply"}, w.write_inline(b".dirsync/lock")],
    "write negative offset": lambda w: [{"t": "apply"}, {**w.write_inline(), "ops": [[-8, 8]]}],
    "write zero-size op": lambda w: [{"t": "apply"}, {**w.write_inline(), "ops": [[0, 0], [0, 8]]}],
    "write ops overrun": lambda w: [{"t": "apply"}, {**w.write_inline(), "ops": [[0, 2**62]]}],
    "write ops short": lambda w: [{"t": "apply"}, {**w.write_inline(), "ops": [[0, 4]]}],
    "write copy from ../": lambda w: [{"t": "apply"}, {**w.write_inline(), "ops": [[b"../outside/keep.txt", 0, 8]]}],
    "write copy from absolute": lambda w: [{"t": "apply"}, {**w.write_inline(),
                                                             "ops": [[os.fsencode(str(w.outside / "keep.txt")), 0, 8]]}],
    "write copy negative offset": lambda w: [{"t": "apply"}, {**w.write_inline(), "ops": [[b"x", -1, 8]]}],
    "write huge inline": lambda w: [{"t": "apply"}, {**w.write_inline(), "d": b"x" * (MAX_FRAME - 200)}],
    "write row with huge mtime": lambda w: [{"t": "apply"}, {**w.write_inline(),
                                                              "f": w.row_f[:4] + [2**64 - 1] + w.row_f[5:]}],
    "write row wrong types": lambda w: [{"t": "apply"}, {**w.write_inline(), "f": [0, b"f.txt", "8", 0o644, 0]}],
    "write row not a list": lambda w: [{"t": "apply"}, {**w.write_inline(), "f": {"path": b"f.txt"}}],
    "packed row not zstd": lambda w: [{"t": "apply"}, {**w.write_packed(), "rz": b"garbage" * 100}],
    "packed row ../": lambda w: [{"t": "apply"}, w.write_packed(b"../escaped.txt")],
    "packed row not a pair": lambda w: [{"t": "apply"}, w.write_packed(blob=msgpack.packb([1]))],
    "packed row not msgpack": lambda w: [{"t": "apply"}, w.write_packed(blob=b"\xc1\xc1")],
    "packed row as str": lambda w: [{"t": "apply"}, {**w.write_packed(), "rz": "text"}],
    "packed row one chunk, digests left out, two sizes": lambda w: [{"t": "apply"}, w.write_packed(
        blob=msgpack.packb([[0, b"f.txt", 8, 0o644, 0, b"d" * 16, 0, [4, 4], b""], [[0, 8]]]))],
    "derive with a copy op": lambda w: [{"t": "apply"}, {**w.write_inline(), "sd": True,
                                                          "f": w.row_big[:8] + [b""], "ops": [[b"f.txt", 0, 8]]}],
    "derive with digests given": lambda w: [{"t": "apply"}, {**w.write_inline(), "sd": True}],
    "derive with a digest mask": lambda w: [{"t": "apply"}, {**w.write_inline(), "sd": True, "dm": b"\x01",
                                                              "f": w.row_f[:8] + [b""]}],
    "derive as str": lambda w: [{"t": "apply"}, {**w.write_inline(), "sd": "yes", "f": w.row_f[:8] + [b""]}],
    "batch ../": lambda w: [{"t": "apply"}, w.write_batch(rows=[[0, b"../escaped"] + w.small["f.txt"][0][2:8] + [b""]],
                                                          data=w.data_f)],
    "batch absolute": lambda w: [{"t": "apply"}, w.write_batch(
        rows=[[0, os.fsencode(str(w.outside / "new"))] + w.small["f.txt"][0][2:8] + [b""]], data=w.data_f)],
    "batch in state dir": lambda w: [{"t": "apply"}, w.write_batch(
        rows=[[0, b".dirsync/lock"] + w.small["f.txt"][0][2:8] + [b""]], data=w.data_f)],
    "batch path twice": lambda w: [{"t": "apply"}, w.write_batch(["f.txt", "f.txt"], data=w.data_f)],
    "batch data short": lambda w: [{"t": "apply"}, w.write_batch(data=w.data_f)],
    "batch data long": lambda w: [{"t": "apply"}, w.write_batch(["f.txt"], data=w.data_f + b"x")],
    "batch row with digests": lambda w: [{"t": "apply"}, w.write_batch(rows=[w.small["f.txt"][0]], data=w.data_f)],
    "batch row of a directory": lambda w: [{"t": "apply"}, w.write_batch(rows=[[1, b"d", 0o755, 0]], data=b"")],
    "batch rows empty": lambda w: [{"t": "apply"}, w.write_batch(rows=[], data=b"")],
    "batch rows not a list": lambda w: [{"t": "apply"}, w.write_batch(rows={"a": 1}, data=b"")],
    "batch sizes not the size": lambda w: [{"t": "apply"}, w.write_batch(
        rows=[w.small["f.txt"][0][:7] + [[4, 5]] + [b""]], data=w.data_f)],
    "batch mtime huge": lambda w: [{"t": "apply"}, w.write_batch(
        rows=[w.small["f.txt"][0][:4] + [2**64 - 1] + w.small["f.txt"][0][5:8] + [b""]], data=w.data_f)],
    "batch not zstd": lambda w: [{"t": "apply"}, {**w.write_batch(), "rz": b"garbage" * 100}],
    "batch data bomb": lambda w: [{"t": "apply"}, {**w.write_batch(["f.txt"]), "z": True,
                                                   "d": __import__("zstandard").ZstdCompressor().compress(b"\0" * (40 << 20))}],
    "packed commit ../": lambda w: [{"t": "apply"}, w.commit_packed([b"../x"])],
    "packed commit not a list": lambda w: [{"t": "apply"}, w.commit_packed(b"f.txt")],
    "packed commit not zstd": lambda w: [{"t": "apply"}, w.commit_packed([], garbage=True)],
    "packed row bomb": lambda w: [{"t": "apply"}, w.write_packed(blob=b"\x92" + b"\0" * (40 << 20))],
    "data out of place": lambda w: [{"t": "apply"}, {"t": "data", "b": b"x"}],
    "data of wrong type": lambda w: [{"t": "apply"}, w.write_streamed()[0], {"t": "data", "b": "text"}],
    "data not zstd": lambda w: [{"t": "apply"}, w.write_streamed()[0], {"t": "data", "b": b"garbage" * 100, "z": True}],
    "zstd bomb": lambda w: [{"t": "apply"}, w.write_streamed()[0],
                            {"t": "data", "b": __import__("zstandard").ZstdCompressor().compress(b"\0" * (40 << 20)),
                             "z": True}],
    "commit ../": lambda w: [{"t": "apply"}, {"t": "commit", "ps": [b"../x"]}],
    "commit not a list": lambda w: [{"t": "apply"}, {"t": "commit", "ps": b"f.txt"}],
    "link ../": lambda w: [{"t": "apply"}, {"t": "link", "p": b"../l", "to": b"x", "mt": 0, "x": None}],
    "link empty target": lambda w: [{"t": "apply"}, {"t": "link", "p": b"l", "to": b"", "mt": 0, "x": None}],
    "link mtime huge": lambda w: [{"t": "apply"}, {"t": "link", "p": b"l", "to": b"x", "mt": 2**64 - 1, "x": None}],
    "meta bad kind": lambda w: [{"t": "apply"}, {"t": "meta", "p": b"a", "k": "x", "mode": 0, "mt": 0}],
    "meta root as file": lambda w: [{"t": "apply"}, {"t": "meta", "p": b"", "k": "f", "mode": 0, "mt": 0}],
    "del ../": lambda w: [{"t": "apply"}, {"t": "del", "p": b"../outside/keep.txt", "k": "f", "x": None, "ob": False}],
    "del the state dir": lambda w: [{"t": "apply"}, {"t": "del", "p": b".dirsync", "k": "d", "x": ["d"], "ob": False}],
    "del bad expectation": lambda w: [{"t": "apply"}, {"t": "del", "p": b"a", "k": "f", "x": ["f", -1], "ob": False}],
    "unknown action": lambda w: [{"t": "apply"}, {"t": "chmod", "p": b"a"}],
    "unknown message": lambda w: [{"t": "format-disk"}],
    "precopy ../": lambda w: [{"t": "precopy", "path": b"../outside/keep.txt", "size": 5}],
    "precopy absolute": lambda w: [{"t": "precopy", "path": os.fsencode(str(w.outside / "keep.txt")), "size": 5}],
    "precopy in state dir": lambda w: [{"t": "precopy", "path": b".dirsync/manifest", "size": 5}],
    "precopy size as str": lambda w: [{"t": "precopy", "path": b"f.txt", "size": "5"}],
    "open twice": lambda w: [w.open()],
    "scan with bad patterns": lambda w: [{"t": "scan", "patterns": [1, 2], "fresh": False, "base": ""}],
    "scan fresh as int": lambda w: [{"t": "scan", "patterns": [], "fresh": 1, "base": ""}],
    "close save as str": lambda w: [{"t": "close", "save": "yes"}],
    "message is a list": lambda w: [[1, 2, 3]],
    "message without type": lambda w: [{"p": b"x"}],
}

RAW = {
    "oversize frame": lambda w: struct.pack(">I", MAX_FRAME + 1) + b"x" * 64,
    "4 GiB frame": lambda w: struct.pack(">I", 0xFFFFFFFF),
    "empty frame": lambda w: struct.pack(">I", 0),
    "not msgpack": lambda w: raw_frame(b"\xc1\xc1\xc1"),
    "trailing bytes in body": lambda w: raw_frame(msgpack.packb({"t": "scan"}) + b"\x00"),
    "body is an int": lambda w: raw_frame(msgpack.packb(42)),
    "non-str map keys": lambda w: raw_frame(msgpack.packb({1: 2})),
    "msgpack ext type": lambda w: raw_frame(msgpack.packb({"t": msgpack.ExtType(5, b"x")})),
    "deep nesting": lambda w: raw_frame(b"\x91" * 100_000 + b"\xc0"),
    "cut in a frame": lambda w: struct.pack(">I", 100) + b"\x80" * 10,
    "text instead of frames": lambda w: b"SSH-2.0-hello there\r\n",
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_message_is_a_protocol_error(world, case):
    msgs = CRAFTED[case](world)
    status, out, err = run_agent_process([frame(world.open())] + [frame(m) for m in msgs])
    assert_protocol_error(status, out, err, case)
    assert not (world.r / "escaped").exists() and not (world.r.parent / "escaped").exists()
    assert sorted(os.listdir(world.r)) in ([".dirsync"], []), os.listdir(world.r)


@pytest.mark.parametrize("case", sorted(RAW))
def test_malformed_frame_is_a_protocol_error(world, case):
    status, out, err = run_agent_process([frame(world.open()), RAW[case](world)])
    assert_protocol_error(status, out, err, case)


def test_wrong_hello_is_refused_naming_both_versions(world):
    p = subprocess.Popen(agent_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=agent_env())
    out, err = p.communicate(frame({"type": "hello", "proto": PROTO_VERSION + 1, "version": "9.9"}), timeout=DEADLINE_S)
    msgs = FrameDecoder().feed(out)
    assert p.returncode == 11
    assert msgs[-1]["t"] == "fatal" and f"speaks {PROTO_VERSION}" in msgs[-1]["msg"] and "9.9" in msgs[-1]["msg"]
    assert not os.listdir(world.r)


@pytest.mark.parametrize("msg", [{"t": "scan", "patterns": [], "fresh": False, "base": ""}, {"t": "prep"},
                                 {"t": "precopy", "path": b"f.txt", "size": 1}], ids=["scan", "prep", "precopy"])
def test_request_before_open_is_refused(world, msg):
    status, out, err = run_agent_process([frame(msg)])
    assert_protocol_error(status, out, err)
    assert "no replica open" in out[-1]["msg"]


def _agent_in_thread():
    """(agent, send(msg), recv() -> next non-ping frame, finish() -> exit status) for a real Agent on
    pipes, driven a frame at a time so that the test can look at it between requests."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    agent = Agent(to_r, from_w)
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(status=agent.run()), daemon=True)
    th.start()
    dec, pending = FrameDecoder(), []

    def send(msg) -> None:
        os.write(to_w, encode(msg))

    def recv() -> dict:
        deadline = time.monotonic() + DEADLINE_S
        while not pending:
            assert time.monotonic() < deadline, "the agent said nothing"
            pending.extend(m for m in dec.feed(os.read(from_r, 1 << 20)) if m.get("t") != "ping")
        return pending.pop(0)

    def finish() -> int:
        os.close(to_w)
        th.join(DEADLINE_S)
        os.close(from_r)
        os.close(to_r)
        os.close(from_w)
        return result.get("status", -1)

    send(hello("test"))
    assert recv().get("type") == "hello"
    return agent, send, recv, finish


def test_a_large_frame_begun_in_one_read_is_read_in_place(world):
    """A frame of LARGE_FRAME bytes or more of which a read got only the start is read straight
    into one buffer (Agent._recv_large): a data frame's payload comes out whole as a view of it
    (no copy), and the stream ending inside such a frame is a protocol error, not a hang."""
    from dirsync.transport import agent as agent_mod
    from dirsync.transport.wire import ProtocolError, data_frame_head

    payload = random_bytes(agent_mod.LARGE_FRAME + 12345, 7)
    frame = data_frame_head(len(payload)) + payload
    for ends_early in (False, True):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        agent = Agent(to_r, from_w)
        got: dict = {}

        def take():
            try:
                got["msg"] = agent.recv()
            except ProtocolError as e:
                got["error"] = str(e)

        try:
            os.write(to_w, frame[:1000])  # (all the pipe holds when the agent first reads)
            th = threading.Thread(target=take, daemon=True)
            th.start()
            rest = memoryview(frame)[1000:-1 if ends_early else None]
            while rest:
                rest = rest[os.write(to_w, rest):]
            os.close(to_w)
            th.join(DEADLINE_S)
            assert not th.is_alive(), "the agent did not finish reading the frame"
        finally:
            for fd in (to_r, from_r, from_w):
                os.close(fd)
        if ends_early:
            assert "connection closed in the middle of a frame" in got.get("error", ""), got
        else:
            msg = got["msg"]
            assert msg["t"] == "data" and isinstance(msg["b"], memoryview) and bytes(msg["b"]) == payload


@pytest.mark.parametrize("prep", [True, False])
def test_prep_reads_the_row_index_of_the_saved_manifest_the_scan_took_whole(world, prep):
    """The master's `prep` hint ("a plan follows"): the agent reads the row index of the saved
    manifest its scan took undecoded (the tree matched it) then, while the master plans (its
    actions then decode only the rows they touch; the manifest is never decoded whole), and
    the session goes on as without it."""
    from dirsync.manifest import Overlay

    agent, send, recv, finish = _agent_in_thread()
    send(world.open())
    assert recv()["t"] == "opened"
    send({"t": "scan", "patterns": [], "fresh": True, "base": ""})
    while recv()["t"] != "scan_end":
        pass
    w = world.write_inline()
    w["f"][4] = 1_600_000_000 * 10**9  # an old mtime: the saved row is trusted (racy-clean)
    send({"t": "apply"})
    send(w)
    send({"t": "commit", "ps": [b"f.txt"]})
    send({"t": "meta", "p": b"", "k": "d", "mode": 0o755, "mt": 0})
    send({"t": "apply_end"})
    send({"t": "close", "save": True})
    while (m := recv())["t"] != "closed":
        assert m["t"] not in ("fatal", "failed"), m
    gen = m["gen"]
    assert gen and finish() == 0

    agent, send, recv, finish = _agent_in_thread()
    send(world.open())
    assert recv()["t"] == "opened"
    send({"t": "scan", "patterns": [], "fresh": False, "base": gen})
    while (m := recv())["t"] != "scan_end":
        pass
    assert m["full"] is False and not agent.replica._scan.decoded
    if prep:
        send({"t": "prep"})
    send({"t": "root", "patterns": []})  # answered after the hint was handled
    assert recv()["t"] == "root"
    assert not agent.replica._scan.decoded
    cur = agent.replica._current
    if prep:
        assert isinstance(cur, Overlay) and cur._ix._where is not None and not cur._orig
    else:
        assert cur is None
    send({"t": "close", "save": True})
    assert recv()["t"] == "closed"
    assert finish() == 0
    assert (world.r / "f.txt").read_bytes() == world.data_f


def test_a_precopy_hint_copies_only_a_regular_file_inside_the_replica(world, monkeypatch):
    """The `precopy` hint ("pc"): the agent copies the named file into its .dirsync/tmp ahead
    of the plan, but never through a symlink (the file's or a parent directory's), and a file
    of another size than the master said is left alone; no reply either way, and nothing of it
    outlives the session."""
    from dirsync import replica as replica_mod

    monkeypatch.setattr(replica_mod, "PRECOPY_MIN", 1)  # (the agent runs in this process here)
    (world.r / "big.img").write_bytes(b"b" * 5000)
    os.symlink(world.outside / "keep.txt", world.r / "to-outside")
    os.symlink(world.outside / "sub", world.r / "dir-outside")
    settle(world.r)  # (a file changed in the last RACY_NS is never copied ahead)
    agent, send, recv, finish = _agent_in_thread()
    send({**world.open(), "init": True})
    assert recv()["t"] == "opened"
    tmp = world.r / ".dirsync" / "tmp"
    for path, size in ((b"to-outside", 5), (b"dir-outside/x", 1), (b"big.img", 4999), (b"big.img", 5000)):
        send({"t": "precopy", "path": path, "size": size})
    send({"t": "root", "patterns": []})  # answered after the hints were handled
    assert recv()["t"] == "root"
    assert list(agent.replica._precopies) == ["big.img"]
    assert agent.replica._precopies["big.img"].finish(stop=False)
    assert [(tmp / n).read_bytes() for n in os.listdir(tmp)] == [b"b" * 5000]
    send({"t": "close", "save": False})
    assert recv()["t"] == "closed"
    assert finish() == 0
    assert os.listdir(tmp) == []


def test_refused_open_is_a_fatal_frame_not_a_crash(world):
    (world.r / "stranger.txt").write_bytes(b"not a replica\n")
    status, out, err = run_agent_process([frame({**world.open(), "init": False})])
    assert status == 0 and "Traceback" not in err
    assert out[-1]["t"] == "fatal" and out[-1]["code"] == 12 and "never synced" in out[-1]["msg"]
    assert sorted(os.listdir(world.r)) == ["stranger.txt"]


# -- seeded fuzz, in-process -----------------------------------------------------------------------------


POOL = [
    None, True, False, 0, 1, -1, 7, 2**31, -(2**63), 2**63 - 1, 2**64 - 1, 1.5, float("nan"),
    "", "x", "..", "/etc/passwd", "a\0b", "é" * 3000, "f",
    b"", b".", b"..", b"../x", b"../../outside/keep.txt", b"/", b"/tmp", b"/etc/passwd", b"a/../b", b"a//b",
    b"a/", b"\0", b"a\0b", b".dirsync", b".dirsync/manifest", b"x" * 5000, b"\xff\xfe", b"f.txt",
    [], [None], [1, 2], [b"../x", 0, 8], [[0, 8]], [[-1, 8]], [[b"..", 0, 1]], list(range(70)),
    {}, {"t": "open"}, {"a": 1},
]
PROTECTED = {("open", "root"), ("open", "backup_dir")}  # the master's own choice of root, not data


def mutate(rng: random.Random, session: list[dict]) -> tuple[list[bytes], str]:
    """One random corruption of a valid session; returns the frames and a description."""
    msgs = [dict(m) for m in session]
    i = rng.randrange(len(msgs))
    m = msgs[i]
    how = rng.random()
    if how < 0.6:
        keys = [k for k in m if (m.get("t"), k) not in PROTECTED] or ["t"]
        k = rng.choice(keys)
        v = m[k]
        if isinstance(v, list) and v and rng.random() < 0.5:  # reach into a list (rows, ops)
            v = list(v)
            j = rng.randrange(len(v))
            if isinstance(v[j], list) and v[j] and rng.random() < 0.5:
                inner = list(v[j])
                inner[rng.randrange(len(inner))] = rng.choice(POOL)
                v[j] = inner
            else:
                v[j] = rng.choice(POOL)
            m[k] = v
            desc = f"msg {i} {m.get('t')}.{k}[{j}] changed"
        else:
            m[k] = rng.choice(POOL)
            desc = f"msg {i} {m.get('t')}.{k} = {m[k]!r:.40}"
    elif how < 0.7:
        k = rng.choice(list(m))
        del m[k]
        desc = f"msg {i} lost {k}"
    elif how < 0.8:
        msgs.insert(i, rng.choice(msgs))
        desc = f"msg {i} duplicated"
    else:
        frames = [encode(x) for x in msgs]
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.3:
            b = b[: rng.randrange(len(b))]
        frames[i] = bytes(b)
        return frames, f"msg {i} bytes corrupted"
    try:
        return [encode(x) for x in msgs], desc
    except Exception:  # e.g. a value msgpack cannot pack: corrupt the bytes instead
        return [encode(x) for x in session], desc + " (unpackable, sent as is)"


def run_agent_inprocess(frames: list[bytes], timeout: float = 20.0) -> tuple[int, list]:
    """The real Agent on pipes, in a thread: send hello + frames + EOF, collect what it says."""
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    result: dict = {}

    def serve():
        try:
            result["status"] = Agent(to_agent_r, from_agent_w).run()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["crash"] = e
        finally:
            os.close(from_agent_w)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    out = bytearray()
    writer = threading.Thread(target=_write_all_then_close, args=(to_agent_w, encode(hello("fuzz")) + b"".join(frames)),
                              daemon=True)
    writer.start()
    deadline = time.monotonic() + timeout
    while True:
        b = os.read(from_agent_r, 1 << 20)
        if not b:
            break
        out += b
        assert time.monotonic() < deadline, "agent did not finish"
    os.close(from_agent_r)
    th.join(timeout)
    os.close(to_agent_r)  # a writer still blocked on a full pipe gets EPIPE now
    writer.join(timeout)
    assert "crash" not in result, f"agent raised {result.get('crash')!r}"
    return result["status"], [m for m in FrameDecoder().feed(bytes(out)) if m.get("t") != "ping"]


def _write_all_then_close(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass  # the agent stopped reading (it gave up on the stream): fine
    finally:
        os.close(fd)


FUZZ_CASES = 500
FUZZ_SEED = 20240531


def test_fuzzed_sessions_never_crash_the_agent_or_escape(world, capsys):
    rng = random.Random(FUZZ_SEED)
    sessions = world.sessions()
    outcomes = {"protocol error": 0, "accepted": 0, "other fatal": 0}
    for n in range(FUZZ_CASES):
        frames, desc = mutate(rng, rng.choice(sessions))
        status, out = run_agent_inprocess(frames)
        fatal = [m for m in out if m.get("t") == "fatal"]
        assert status in (0, 11), f"case {n} ({desc}): exit status {status}, frames {out!r:.300}"
        assert not [f for f in fatal if "internal error" in str(f.get("msg"))], f"case {n} ({desc}): {fatal}"
        if status == 11:
            assert fatal and fatal[-1]["code"] == 11, f"case {n} ({desc}): no fatal frame before exit 11"
            outcomes["protocol error"] += 1
        elif fatal:
            outcomes["other fatal"] += 1  # e.g. a refused or locked open: a clean, reported refusal
        else:
            outcomes["accepted"] += 1
        for name in os.listdir(world.r):  # only what a session may create, inside the root
            assert name in (".dirsync", "d", "f.txt", "g.txt", "l", "big.bin", "h.bin", "e.txt"), f"case {n} ({desc}): {name!r} in the replica"
    with capsys.disabled():
        print(f"\nfuzz: {FUZZ_CASES} cases, {outcomes}")
    assert outcomes["protocol error"] > FUZZ_CASES // 3


# -- the compressed data stream (--compress) -------------------------------------------------------------


def test_compressed_stream_round_trips_and_bounds_its_output():
    """The client's _pack and the agent's _Inflater: one zstd stream across payloads (sizes around
    zstd's 128 KiB block), incompressible data sent raw, and a bomb refused at the limit."""
    import zstandard

    from dirsync.errors import ProtocolError as PE
    from dirsync.transport import TransportOptions
    from dirsync.transport.wire import Inflater as _Inflater
    from dirsync.transport.remote import RemoteTransport

    try:
        from helpers import text_lines
    except ImportError:
        from tests.helpers import text_lines
    t = RemoteTransport("localhost:/nowhere", TransportOptions(compress=True), channel_factory=lambda: None)
    inf = _Inflater()
    rng = random.Random(7)
    sizes = [1, 63, 64, 5000, 131071, 131072, 131073, 262144, 3 << 20, 8 << 20] + [rng.randrange(1, 1 << 21)
                                                                                 for _ in range(20)]
    sent = raw = 0
    for i, n in enumerate(sizes):
        piece = text_lines(n, seed=i)[:n] if i % 3 else random_bytes(n, i)
        b, z = t._pack(piece)
        assert inf.inflate(b, len(piece)) == piece if z else b == piece, (i, n)
        if i % 3 == 0 and n >= 4096:
            assert not z, "random data goes raw"
        sent += len(b)
        raw += n
    assert sent < raw
    bomb = zstandard.ZstdCompressor().compressobj()
    z = bomb.compress(b"\0" * (64 << 20)) + bomb.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    with pytest.raises(PE, match="inflates past"):
        _Inflater().inflate(z, 16 << 20)


def test_apply_in_a_read_only_session_is_refused(world):
    """A read-only open takes no lock, so it must not be able to write either."""
    status, out, err = run_agent_process([frame({**world.open(), "readonly": True}), frame({"t": "apply"}),
                                          frame({"t": "mkdir", "p": b"d", "mode": 0o755})])
    assert_protocol_error(status, out, err)
    assert not os.listdir(world.r)


def test_fuzzed_sessions_against_the_real_agent_process(world):
    """A few fuzz cases through `python -m dirsync agent` itself (stdin/stdout as in production)."""
    rng = random.Random(FUZZ_SEED + 1)
    sessions = world.sessions()
    rejected = 0
    for n in range(12):
        frames, desc = mutate(rng, rng.choice(sessions))
        status, out, err = run_agent_process(frames)
        assert "Traceback" not in err, f"case {n} ({desc}): {err}"
        assert status in (0, 11), f"case {n} ({desc}): exit status {status}: {err}"
        if status == 11:
            assert out[-1].get("t") == "fatal" and out[-1].get("code") == 11, f"case {n} ({desc}): {out[-1]}"
            rejected += 1
    assert rejected >= 4


def test_a_batch_decodes_to_what_the_general_row_decoder_gives():
    """proto.dec_batch checks rows inline (it runs once per small file): on valid rows, including
    non-UTF-8 and non-ASCII paths, an empty file and a many-chunk one, it must give the entries
    decode_rows gives for the same rows (with the placeholder digests a derived write carries)."""
    from dirsync.manifest import decode_rows
    from dirsync.transport import proto

    rng = random.Random(5)
    rows = []
    for i, p in enumerate([b"a.txt", "caf\u00e9/men\u00fc.txt".encode(), b"raw/\xff\xfe.bin", b"e", b"d/x/y/z"]):
        sizes = [] if p == b"e" else [rng.randrange(1, 5000) for _ in range(1 + i)]
        rows.append([0, p, sum(sizes), 0o640 + i, 10**18 + i, rng.randbytes(16), 512 << i, sizes, b""])
    writes = proto.dec_batch(msgpack.packb(rows, use_bin_type=True), sum(r[2] for r in rows))
    want = decode_rows([r[:8] + [bytes(16 * len(r[7]))] for r in rows])
    assert [w.target for w in writes] == list(want.values())
    assert all(w.derive and w.expect is None and not w.move for w in writes)
    assert [w.ops for w in writes] == [((proto.SendOp(0, r[2]),) if r[2] else ()) for r in rows]
