"""The bench changes its master in place between timed runs (bench/data.py, Mutator). On a
real full disk a change that fails half way must be undone exactly: the bench then reports
the case as not measured and goes on, with the master as it was for the next cases."""

from __future__ import annotations

import errno
import importlib.util
import os
import sys

import pytest

try:
    from helpers import tiny_tmpfs
except ImportError:
    from tests.helpers import tiny_tmpfs

_spec = importlib.util.spec_from_file_location(
    "bench_data", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "data.py"))
data = importlib.util.module_from_spec(_spec)
sys.modules["bench_data"] = data  # (its dataclasses look their module up)
_spec.loader.exec_module(data)  # type: ignore[union-attr]

T = 1_700_000_000_000_000_000


def _state(root: str) -> tuple[dict, dict]:
    snap = data.snapshot(root)
    content = {}
    for p, v in snap.items():
        if v[0] == "f":
            with open(os.path.join(root, p), "rb") as f:
                content[p] = f.read()
    return snap, content


@pytest.mark.parametrize("failing", ["create", "replace", "append"])
def test_a_change_a_full_disk_stops_is_undone_exactly(failing):
    with tiny_tmpfs("1m") as root:
        master = os.path.join(root, "m")
        os.makedirs(os.path.join(master, "d"))
        for i, name in enumerate("abc"):
            p = os.path.join(master, "d", name)
            with open(p, "wb") as f:
                f.write(bytes([65 + i]) * 4096)
            os.utime(p, ns=(T, T + i))
        before = _state(master)
        big = b"x" * (2 << 20)  # more than the whole disk
        ops = [
            data.Op("append", "d/a", b"tail"),
            data.Op("rename", "d/b", dest="e/f/b2"),
            data.Op("patch", "d/c", b"PATCH", offset=10),
            {"create": data.Op("create", "new/dir/big", big),
             "replace": data.Op("replace", "d/a", big),
             "append": data.Op("append", "d/c", big)}[failing],
        ]
        mut = data.Mutator(master, os.path.join(root, "stash"), ops, "test")
        with pytest.raises(OSError) as got:
            mut.apply()
        assert got.value.errno == errno.ENOSPC
        assert _state(master) != before  # (the ops before the failing one were made)
        mut.undo()
        assert _state(master) == before
        assert not os.path.exists(os.path.join(master, "new")) and not os.path.exists(os.path.join(master, "e"))


def test_a_changes_new_content_counts_what_the_tree_did_not_hold(tmp_path):
    """The bench's bytes floor for a change case: appended, patched and created data, and the
    lines a replaced file gains; nothing for renames and deletes; None for a swapped variant."""
    import zlib

    master = tmp_path / "m"
    (master / "d").mkdir(parents=True)
    (master / "d" / "a").write_bytes(b"one\ntwo\nthree\n")
    (master / "d" / "b").write_bytes(b"x" * 100)
    ops = [data.Op("append", "d/b", b"tail"), data.Op("patch", "d/b", b"PATCH", offset=3),
           data.Op("create", "d/new", b"created"), data.Op("rename", "d/b", dest="e/b"),
           data.Op("delete", "d/gone"),
           data.Op("replace", "d/a", b"one\nTWO\nthree\nthree\n")]  # gains "TWO\n" and a second "three\n"
    raw = b"tail" + b"PATCH" + b"created" + b"TWO\n" + b"three\n"
    got = data.Mutator(str(master), str(tmp_path / "stash"), ops, "t").new_content()
    assert got is not None and got[0] == len(raw) == 26, got
    assert got[1] == len(zlib.compress(b"tailPATCHcreatedTWO\nthree\n", 6))
    moves = data.Mutator(str(master), str(tmp_path / "stash"), [data.Op("rename", "d/a", dest="x/a")], "t")
    assert moves.new_content() == (0, 0)  # (not zlib's 8-byte empty stream)
    swap = data.Mutator(str(master), str(tmp_path / "stash"), [data.Op("swap", "d/a")], "t")
    assert swap.new_content() is None
