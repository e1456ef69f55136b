"""check_relpath (the gate every manifest path passes before use) and the path helpers."""

from __future__ import annotations

import os

import pytest

from dirsync.manifest import check_relpath, is_under, parent_of

REJECTED = [
    ("empty", ""),
    ("dot", "."),
    ("dotdot", ".."),
    ("absolute", "/x"),
    ("absolute root", "/"),
    ("dotdot inside", "a/../b"),
    ("dotdot at end", "a/.."),
    ("dotdot at start", "../a"),
    ("dot inside", "a/./b"),
    ("dot at start", "./a"),
    ("dot at end", "a/."),
    ("double slash", "a//b"),
    ("trailing slash", "a/"),
    ("only slashes", "//"),
    ("NUL alone", "\0"),
    ("NUL in name", "a\0b"),
    ("NUL in dir", "a\0/b"),
    ("too long", "a/" * 2048 + "b"),  # 4097 characters
    ("one long name", "x" * 5000),
]


@pytest.mark.parametrize("path", [p for _, p in REJECTED], ids=[n for n, _ in REJECTED])
def test_rejected(path):
    with pytest.raises(ValueError):
        check_relpath(path)


@pytest.mark.parametrize("value", [None, b"a", 1, ["a"]])
def test_non_str_rejected(value):
    with pytest.raises(ValueError):
        check_relpath(value)  # type: ignore[arg-type]


ACCEPTED = [
    "a",
    "a/b/c",
    "...",  # only "." and ".." are special
    ".hidden",
    "a/..b/c..",
    "with space/ trailing space ",
    "back\\slash",  # a plain character on POSIX
    "café/menü.txt",
    "日本語/ファイル",
    "emoji-\U0001F600",
    os.fsdecode(b"latin1-\xe9\xff"),  # not UTF-8: surrogateescape str
    "new\nline",
    "x" * 255,
    "a/" * 2047 + "b",  # 4095 characters
]


@pytest.mark.parametrize("path", ACCEPTED)
def test_accepted(path):
    assert check_relpath(path) == path


@pytest.mark.parametrize("path,parent", [("a", ""), ("a/b", "a"), ("a/b/c", "a/b"), ("", "")])
def test_parent_of(path, parent):
    assert parent_of(path) == parent


@pytest.mark.parametrize("path,top,expected", [
    ("a", "", True),
    ("", "", True),
    ("a", "a", True),
    ("a/b", "a", True),
    ("ab", "a", False),  # a prefix of the name is not "under"
    ("a", "a/b", False),
    ("b/a", "a", False),
    ("", "a", False),
])
def test_is_under(path, top, expected):
    assert is_under(path, top) is expected
