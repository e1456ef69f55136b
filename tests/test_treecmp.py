"""Tests for tests/treecmp.py (the independent tree referee)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

try:  # pytest "prepend" import mode puts tests/ on sys.path ...
    import treecmp
except ImportError:  # ... unless tests/ is a package
    from tests import treecmp

assert_trees_equal = treecmp.assert_trees_equal
snapshot = treecmp.snapshot

T0 = 1_600_000_000_000_000_000  # fixed base mtime (ns)


def B(p):
    """Any path-like (str, bytes, Path) -> bytes."""
    return os.fsencode(os.fspath(p))


def _utime(p, ns, follow=True):
    os.utime(p, ns=(ns, ns), follow_symlinks=follow)


def make_tree(root):
    """A small tree with every kind of entry we care about; fixed mtimes."""
    root = B(root)
    os.makedirs(os.path.join(root, b"a/b/c"))
    os.makedirs(os.path.join(root, b"empty"))
    files = {
        b"top.txt": b"hello\n",
        b"empty.txt": b"",
        b"a/b/c/deep.bin": bytes(range(256)) * 64,
        "a/café-menü.txt".encode(): "crème brûlée\n".encode(),
        b"a/bad-\xff\xfe-name": b"not utf-8 name\n",
        b"run.sh": b"#!/bin/sh\necho hi\n",
    }
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(root, rel), 0o644)
    os.chmod(os.path.join(root, b"run.sh"), 0o755)
    os.symlink(b"a/b/c/deep.bin", os.path.join(root, b"link"))
    os.symlink(b"../top.txt", os.path.join(root, b"a/rel-link"))
    os.symlink(b"does/not/exist", os.path.join(root, b"dangling"))
    # mtimes: files and links first, then directories bottom-up
    i = 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            i += 1
            _utime(os.path.join(dirpath, name), T0 + i * 1_000_000_123, follow=False)
    for dirpath, _dirnames, _filenames in os.walk(root, topdown=False):
        i += 1
        _utime(dirpath, T0 + i * 7_000_000_001)
    return root


def copy_cp_a(src, dst):
    subprocess.run(["cp", "-a", B(src) + b"/.", B(dst)], check=True)
    # cp -a onto an existing dst dir: make the root's own metadata match too
    shutil.copystat(src, dst)


def copy_shutil(src, dst):
    src, dst = B(src), B(dst)
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    # copytree already copystat()s dirs after their contents; redo bottom-up
    # to be explicit and independent of that implementation detail.
    for dirpath, _dirnames, _filenames in os.walk(src, topdown=False):
        rel = os.path.relpath(dirpath, src)
        shutil.copystat(dirpath, os.path.normpath(os.path.join(dst, rel)))


@pytest.fixture(params=["cp-a", "shutil"])
def pair(request, tmp_path):
    master = make_tree(tmp_path / "master")
    replica = tmp_path / "replica"
    replica.mkdir()
    (copy_cp_a if request.param == "cp-a" else copy_shutil)(master, replica)
    return master, B(replica)


def J(*parts):
    return os.path.join(*parts)


def keep_parent_mtime(path):
    """Return a function that restores the parent directory's current mtime."""
    parent = os.path.dirname(path)
    ns = os.stat(parent).st_mtime_ns
    return lambda: _utime(parent, ns)


def expect_diff(master, replica, *needles, **kw):
    with pytest.raises(AssertionError) as ei:
        assert_trees_equal(master, replica, **kw)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return msg


# --------------------------------------------------------------------------


def test_snapshot_shape(tmp_path):
    root = make_tree(tmp_path / "t")
    snap = snapshot(root)
    assert snap[b""][0] == "d"
    assert snap[b"top.txt"][0] == "f" and snap[b"top.txt"][1] == 0o644
    assert snap[b"run.sh"][1] == 0o755
    assert snap[b"empty"][0] == "d"
    assert snap[b"a/b/c"][0] == "d"
    assert snap[b"a/bad-\xff\xfe-name"][0] == "f"
    assert "a/café-menü.txt".encode() in snap
    assert snap[b"link"] == ("l", None, snap[b"link"][2], b"a/b/c/deep.bin")
    assert snap[b"dangling"][3] == b"does/not/exist"
    assert snap[b"link"][2] == os.lstat(J(root, b"link")).st_mtime_ns
    import hashlib

    assert snap[b"a/b/c/deep.bin"][3] == hashlib.sha256(bytes(range(256)) * 64).hexdigest()
    # str and Path roots give the same result
    assert snapshot(str(tmp_path / "t")) == snap == snapshot(tmp_path / "t")


def test_snapshot_ignores_dirsync(tmp_path):
    root = make_tree(tmp_path / "t")
    before = snapshot(root)
    os.makedirs(J(root, b".dirsync/state"))
    with open(J(root, b".dirsync/state/x"), "wb") as f:
        f.write(b"x")
    after = snapshot(root)
    assert not any(k.startswith(b".dirsync") for k in after)
    assert set(after) == set(before)
    assert b".dirsync" in snapshot(root, ignore=())


def test_faithful_copy_is_equal(pair):
    master, replica = pair
    assert_trees_equal(master, replica)
    assert_trees_equal(os.fsdecode(master), os.fsdecode(replica), check_dir_mtimes=True)


def test_detects_content_change_same_size_same_mtime(pair):
    master, replica = pair
    p = J(replica, b"a/b/c/deep.bin")
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.seek(5000)
        f.write(b"X")
    _utime(p, st.st_mtime_ns)
    assert os.stat(p).st_size == st.st_size
    msg = expect_diff(master, replica, "content differs", "a/b/c/deep.bin")
    assert "1 difference" in msg


def test_detects_mode_change(pair):
    master, replica = pair
    os.chmod(J(replica, b"run.sh"), 0o644)
    msg = expect_diff(master, replica, "mode differs", "run.sh", "mode=0755", "mode=0644")
    assert "1 difference" in msg


def test_detects_root_mode_change(pair):
    master, replica = pair
    os.chmod(replica, 0o700)
    os.chmod(master, 0o755)
    expect_diff(master, replica, "<root>", "mode")


def test_detects_file_mtime_change(pair):
    master, replica = pair
    p = J(replica, b"top.txt")
    _utime(p, os.stat(p).st_mtime_ns + 1)  # 1 ns is enough
    msg = expect_diff(master, replica, "mtime differs", "top.txt")
    assert "1 difference" in msg
    # file mtimes are checked even when directory mtimes are not
    expect_diff(master, replica, "mtime differs", "top.txt", check_dir_mtimes=False)
    assert_trees_equal(master, replica, check_mtimes=False)


def test_dir_mtime_change_respects_flag(pair):
    master, replica = pair
    p = J(replica, b"empty")
    _utime(p, os.stat(p).st_mtime_ns + 10**9)
    expect_diff(master, replica, "mtime differs", "'empty'")
    assert_trees_equal(master, replica, check_dir_mtimes=False)


def test_detects_link_target_change(pair):
    master, replica = pair
    p = J(replica, b"link")
    restore = keep_parent_mtime(p)
    ns = os.lstat(p).st_mtime_ns
    os.unlink(p)
    os.symlink(b"top.txt", p)
    _utime(p, ns, follow=False)
    restore()
    msg = expect_diff(master, replica, "target differs", "'link'", "b'top.txt'")
    assert "1 difference" in msg


def test_detects_link_replaced_by_file(pair):
    master, replica = pair
    p = J(replica, b"a/rel-link")
    restore = keep_parent_mtime(p)
    os.unlink(p)
    with open(p, "wb") as f:
        f.write(b"hello\n")
    restore()
    expect_diff(master, replica, "kind differs", "a/rel-link")


def test_detects_extra_file(pair):
    master, replica = pair
    p = J(replica, b"a/b/extra.txt")
    restore = keep_parent_mtime(p)
    with open(p, "wb") as f:
        f.write(b"extra\n")
    restore()
    msg = expect_diff(master, replica, "extra in replica", "a/b/extra.txt")
    assert "1 difference" in msg


def test_detects_missing_file_and_dir(pair):
    master, replica = pair
    p = J(replica, b"a/bad-\xff\xfe-name")
    restore = keep_parent_mtime(p)
    os.unlink(p)
    restore()
    p = J(replica, b"empty")
    restore = keep_parent_mtime(p)
    os.rmdir(p)
    restore()
    msg = expect_diff(master, replica, "missing in replica", "'empty'", "bad-")
    assert "2 difference" in msg


def test_diff_listing_is_truncated(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(30):
        (b / f"extra{i:02d}").write_text("x")
    shutil.copystat(a, b)
    with pytest.raises(AssertionError) as ei:
        assert_trees_equal(a, b)
    msg = str(ei.value)
    assert "30 difference" in msg
    assert "extra19" in msg and "extra20" not in msg
    assert "and 10 more" in msg
