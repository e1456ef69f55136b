"""record.Record: equality, hashing, repr, replace() and asdict() from a class's field list."""

from __future__ import annotations

import pickle

import pytest

from dirsync.manifest import FileEntry, Manifest
from dirsync.plan import WriteFile
from dirsync.record import Record


class Point(Record):
    _fields = ("x", "y", "note")
    __slots__ = _fields
    _compare = ("x", "y")

    def __init__(self, x: int, y: int, note: str = "") -> None:
        if x < 0:
            raise ValueError("x < 0")
        self.x, self.y, self.note = x, y, note


class Labelled(Point):
    _fields = Point._fields + ("label",)
    __slots__ = ("label",)

    def __init__(self, x: int, y: int, note: str = "", label: str = "") -> None:
        super().__init__(x, y, note)
        self.label = label


def test_equality_and_hash_use_the_compared_fields_only():
    a, b = Point(1, 2, "first"), Point(1, 2, "second")
    assert a == b and hash(a) == hash(b)
    assert a != Point(1, 3) and a != Point(2, 2)
    assert len({a, b, Point(1, 3)}) == 2


def test_records_of_different_classes_are_never_equal():
    assert Point(1, 2) != Labelled(1, 2)  # same compared values, other class
    assert Point(1, 2) != (1, 2)


def test_a_subclass_compares_its_new_fields_and_what_its_base_compares():
    assert Labelled(1, 2, label="a") != Labelled(1, 2, label="b")
    assert Labelled(1, 2, "n", "a") == Labelled(1, 2, "m", "a")  # note: not compared by the base
    assert hash(Labelled(1, 2, "n", "a")) == hash(Labelled(1, 2, "m", "a"))


def test_replace_goes_through_init_and_keeps_the_rest():
    a = Labelled(1, 2, "n", "a")
    b = a.replace(y=5)
    assert (b.x, b.y, b.note, b.label) == (1, 5, "n", "a") and (a.y, type(b)) == (2, Labelled)
    with pytest.raises(ValueError):
        a.replace(x=-1)  # the constructor's checks hold
    with pytest.raises(TypeError):
        a.replace(z=1)  # no such field


def test_repr_and_asdict_list_every_field():
    a = Point(1, 2, "n")
    assert repr(a) == "Point(x=1, y=2, note='n')"
    assert a.asdict() == {"x": 1, "y": 2, "note": "n"}


def test_slotted_records_take_no_stray_attributes():
    with pytest.raises(AttributeError):
        Point(1, 2).z = 3  # type: ignore[attr-defined]


def test_entries_and_actions_survive_pickling_and_compare_as_before():
    e = FileEntry("a/b", 3, 0o644, 10, b"d" * 16, 0, (3,), b"d" * 16, ino=7, ctime_ns=9, trusted=True)
    assert e == e.replace(ino=8, ctime_ns=1, trusted=False)  # cache-only facts are not compared
    assert e != e.replace(mtime_ns=11)
    w = WriteFile(e, (), None)
    back = pickle.loads(pickle.dumps((e, w, Manifest({"a/b": e}))))
    assert back[0] == e and back[0].ino == 7 and back[1] == w and back[2] == Manifest({"a/b": e})
    assert Manifest({"a/b": e}, generation="x") == Manifest({"a/b": e}, generation="y")


def test_every_item_error_survives_a_fan_out_workers_pickle() -> None:
    """Fan-out workers send their replica's item errors to the parent pickled: each kind must
    come back as itself, with its path, operation, code and message (RemoteItemError, the
    agent's, did not: its constructor takes a code too, and unpickling raised TypeError)."""
    import errno as _errno

    from dirsync import errors
    from dirsync.transport.proto import RemoteItemError

    made = [cls("a/b.txt", "write", cause) for cls in (errors.ItemError, errors.SourceChangedError,
                                                         errors.ConflictError, errors.InvalidPathError,
                                                         errors.ItemIOError)
            for cause in ("why", OSError(_errno.ENOSPC, "No space left on device"))]
    made.append(RemoteItemError("a/b.txt", "write", "NOSPACE", "write a/b.txt: No space left on device"))
    for e in made:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e)
        assert (back.path, back.op, back.code, str(back)) == (e.path, e.op, e.code, str(e))
