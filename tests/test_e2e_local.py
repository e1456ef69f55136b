"""End to end on real trees through the real CLI (`python -m dirsync sync`), no mocks.

Each test builds a master, syncs, mutates, syncs again and checks with the independent
tree comparison (tests/treecmp.py) that the replica equals the master: bytes, modes, mtimes
(directories and the root included) and symlink targets.
"""

from __future__ import annotations

import os
import time

import pytest

try:
    import treecmp
    from helpers import (
        File, J, Link, append, build_tree, insert, overwrite_same_size_and_mtime, random_bytes, read,
        remove, replace_with_dir, replace_with_file, replace_with_link, run_cli, settle, stray_temps, swap,
        sync_json, text_lines, tmp_entries, touch, truncate, write,
    )
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import (
        File, J, Link, append, build_tree, insert, overwrite_same_size_and_mtime, random_bytes, read,
        remove, replace_with_dir, replace_with_file, replace_with_link, run_cli, settle, stray_temps, swap,
        sync_json, text_lines, tmp_entries, touch, truncate, write,
    )

MiB = 1 << 20
KiB = 1 << 10


def synced(master, replica, *, args=()) -> dict:
    """Sync through the CLI, then check: exit 0, replica == master, master untouched, no temps."""
    before = treecmp.snapshot(master)
    _, out = sync_json(master, replica, args=args)
    assert treecmp.snapshot(master) == before, "sync modified the master"
    treecmp.assert_trees_equal(master, replica)
    assert tmp_entries(replica) == []
    assert stray_temps(replica) == []
    r = out["replicas"][0]
    assert r["errors"] == [] and r["status"] == "ok", r
    return r


def initial_tree() -> dict:
    return {
        "README.md": text_lines(3 * KiB, seed=1),
        "empty.txt": b"",
        "emptydir": {},
        "src": {
            "main.py": text_lines(20 * KiB, seed=2),
            "util.py": text_lines(2 * KiB, seed=3),
            "pkg": {"__init__.py": b"", "deep": {"deeper": {"x.txt": b"deep\n", "y.bin": random_bytes(5000, 4)}}},
        },
        "data": {"big.bin": random_bytes(400 * KiB, 5), "small.bin": random_bytes(3000, 6)},
        "docs": {"guide.md": text_lines(6 * KiB, seed=7), "café-menü.txt": "crème brûlée\n".encode(),
                 "日本語.txt": "こんにちは\n".encode()},
        b"bad\xffname.txt": b"latin-1 name\n",
        b"dir\xfe": {b"inner\xfd": b"x"},
        "ro.txt": File(b"read only\n", mode=0o444),
        "exec.sh": File(b"#!/bin/sh\necho hi\n", mode=0o755),
        "private": {"secret.txt": File(b"s\n", mode=0o600)},
        "link-rel": Link("docs/guide.md"),
        "link-abs": Link("/etc/passwd"),
        "link-dangling": Link("does/not/exist"),
        "link-dir": Link("src"),
        "spaces and\nnewline.txt": b"odd name\n",
    }


def test_mutation_rounds(tmp_path):
    m, r = tmp_path / "master", tmp_path / "replica"
    build_tree(m, initial_tree())
    os.chmod(m / "private", 0o700)
    first = synced(m, r)
    assert first["files_written"] >= 14 and first["links_made"] == 4 and first["bytes_sent"] > 400 * KiB, first

    # Round 1: content edits, metadata, new names of every flavour.
    guide = read(m / "docs/guide.md")
    write(m / "docs/guide.md", guide.replace(b"\n", b"\nEDITED LINE\n", 1))
    append(m / "README.md", b"appended line\n")
    insert(m / "data/big.bin", 200 * KiB, b"<inserted>" * 10)
    truncate(m / "data/small.bin", 1000)
    os.chmod(m / "exec.sh", 0o700)
    touch(m / "src/util.py", 1_500_000_000_123_456_789)
    old = read(m / "src/main.py")
    overwrite_same_size_and_mtime(m / "src/main.py", old[:100] + b"X" * 10 + old[110:])
    build_tree(m, {"a/b/c/new-empty.txt": b"", "newdir/empty-sub": {}, "ünïcödé/名前.txt": "u\n".encode(),
                   b"new\x80\xffraw": {b"f\xc3\x28": b"invalid utf-8 name\n"}})
    os.chmod(m / "src", 0o750)
    synced(m, r)

    # Round 2: renames of files and directories (with non-UTF-8 names), deletes.
    os.makedirs(m / "moved")
    os.rename(m / "data/big.bin", m / "moved/big2.bin")
    os.rename(m / "src/pkg", m / "src/pkg2")
    os.rename(J(m, b"bad\xffname.txt"), J(m, b"renamed\xfe.txt"))
    os.rename(J(m, b"new\x80\xffraw"), J(m, b"raw-renamed\x81"))
    os.rename(m / "link-rel", m / "link-renamed")
    remove(m / "docs/café-menü.txt")
    remove(m / "emptydir")
    remove(J(m, b"dir\xfe"))
    rep = synced(m, r)
    assert rep["bytes_sent"] < 4 * KiB, f"renames should be copied locally, sent {rep['bytes_sent']}"

    # Round 3: type changes in every direction.
    replace_with_dir(m / "README.md", {"inside.txt": b"README is a directory now\n", "sub": {}})
    replace_with_file(m / "data", b"data is a file now\n")
    replace_with_link(m / "exec.sh", "src/util.py")
    replace_with_file(m / "link-renamed", b"was a link\n")
    replace_with_link(m / "docs", "src")
    replace_with_dir(m / "link-dir", {"f.txt": b"link became a dir\n"})
    replace_with_link(m / "link-abs", "/tmp")
    replace_with_link(m / "empty.txt", "dangling-target")
    synced(m, r)

    # Round 4: swap, truncate to zero, copy, directory metadata, deeper deletes, back-and-forth types.
    build_tree(m, {"swap-a": random_bytes(70 * KiB, 11), "swap-b": random_bytes(90 * KiB, 12)})
    synced(m, r)
    swap(m / "swap-a", m / "swap-b")
    truncate(m / "src/util.py", 0)
    write(m / "copy-of-main.py", read(m / "src/main.py"))
    touch(m / "newdir", 1_400_000_000_000_000_000)
    os.chmod(m / "a/b", 0o711)
    remove(m / "src/pkg2/deep/deeper")
    replace_with_file(m / "README.md", b"README is a file again\n")
    replace_with_dir(m / "empty.txt")
    rep = synced(m, r)
    assert rep["bytes_sent"] < 4 * KiB, f"swap and copy should reuse replica bytes, sent {rep['bytes_sent']}"

    # Round 5: nothing changed: nothing to do.
    rep = synced(m, r)
    assert (rep["files_written"], rep["bytes_sent"], rep["files_deleted"], rep["metadata_set"]) == (0, 0, 0, 0), rep


def test_plan_is_empty_after_sync_and_sync_is_idempotent(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, initial_tree())
    synced(m, r)
    cp = run_cli("plan", m, r)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("total: 0 to write"), cp.stdout


def test_two_replicas_and_a_failing_one_does_not_stop_the_others(tmp_path):
    m = tmp_path / "m"
    build_tree(m, initial_tree())
    bad_file = tmp_path / "is-a-file"
    write(bad_file, b"not a directory\n")
    stranger = tmp_path / "stranger"
    build_tree(stranger, {"precious.txt": b"never synced by dirsync\n"})
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    stranger_before = treecmp.snapshot(stranger)

    cp, out = sync_json(m, bad_file, r1, stranger, r2, expect=12)
    reps = {os.path.basename(x["replica"]): x for x in out["replicas"]}
    assert reps["is-a-file"]["status"] == "refused" and reps["is-a-file"]["exit_code"] == 12
    assert "not a directory" in reps["is-a-file"]["fatal"]
    assert reps["stranger"]["status"] == "refused" and reps["stranger"]["exit_code"] == 12
    assert reps["r1"]["status"] == "ok" and reps["r2"]["status"] == "ok"
    treecmp.assert_trees_equal(m, r1)
    treecmp.assert_trees_equal(m, r2)
    assert read(bad_file) == b"not a directory\n"
    assert treecmp.snapshot(stranger) == stranger_before
    assert not os.path.exists(stranger / ".dirsync")
    # One line per failed replica on stderr, naming it.
    errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
    assert any(str(bad_file) in ln for ln in errs) and any(str(stranger) in ln for ln in errs), cp.stderr

    # Both good replicas stay in step on the next run.
    write(m / "docs/guide.md", b"changed\n")
    _, out = sync_json(m, r1, r2)
    assert [x["files_written"] for x in out["replicas"]] == [1, 1]
    treecmp.assert_trees_equal(m, r1)
    treecmp.assert_trees_equal(m, r2)


# -- bytes on the wire (measured with --json) ---------------------------------------------


def _sent(m, r) -> int:
    rep = synced(m, r)
    print(f"bytes_sent={rep['bytes_sent']} bytes_reused={rep['bytes_reused']}")
    return rep["bytes_sent"]


def test_moving_a_large_file_sends_nothing(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"in": {"big.bin": random_bytes(20 * MiB, 21)}, "elsewhere": {"deeper": {}}})
    assert _sent(m, r) == 20 * MiB
    os.rename(m / "in/big.bin", m / "elsewhere/deeper/big-moved.bin")
    assert _sent(m, r) == 0


@pytest.mark.parametrize("case", ["plain", "backup", "shared"])
def test_a_moved_directory_is_renamed_or_hard_linked_into_place_not_copied(tmp_path, case):
    """A directory rename reaches the replica as one rename of the directory (same inodes, no
    byte read or written; a file that shares its inode with a name outside moves with it, as
    `mv` would); with --backup-dir the old names are backed up, so the files are copied."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"in": {f"f{i}.bin": random_bytes(200_000, 30 + i) for i in range(5)}, "keep.txt": "x\n"})
    backup = case == "backup"
    args = ("--backup-dir", str(tmp_path / "bak")) if backup else ()
    sync_json(m, r, args=args)
    settle(m, r)
    sync_json(m, r, args=args)  # replica entries written in the racy window are re-read, now trusted
    if case == "shared":
        os.link(r / "in" / "f0.bin", tmp_path / "outside-link")  # someone else's name for it
    settle(r)
    inodes = {n: os.stat(r / "in" / n).st_ino for n in os.listdir(r / "in")}
    os.rename(m / "in", m / "out")
    _, out = sync_json(m, r, args=args)
    assert out["replicas"][0]["bytes_sent"] == 0
    treecmp.assert_trees_equal(m, r)
    moved = {n: os.stat(r / "out" / n).st_ino for n in os.listdir(r / "out")}
    if backup:
        assert not set(moved.values()) & set(inodes.values())
        assert sorted(os.listdir(next((tmp_path / "bak").iterdir()) / "in")) == sorted(inodes)
    else:
        assert moved == inodes
        assert out["replicas"][0]["dirs_moved"] == 1 and out["replicas"][0]["files_written"] == 0
        if case == "shared":
            assert os.stat(tmp_path / "outside-link").st_ino == moved["f0.bin"]
    assert tmp_entries(r) == [] and stray_temps(r) == []


def test_mid_file_insertion_sends_about_two_chunks(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    data = random_bytes(20 * MiB, 22)
    build_tree(m, {"big.bin": data})
    _sent(m, r)
    insert(m / "big.bin", 10 * MiB + 12345, random_bytes(100, 23))
    sent = _sent(m, r)
    assert 100 <= sent < 300 * KiB, sent


def test_one_line_edit_in_a_20k_text_file_sends_about_a_kilobyte(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    text = text_lines(20 * KiB, seed=24)
    build_tree(m, {"src": {"module.py": text}})
    _sent(m, r)
    lines = text.splitlines(keepends=True)
    lines[len(lines) // 2] = b"    return compute(value, count)  # edited\n"
    write(m / "src/module.py", b"".join(lines))
    sent = _sent(m, r)
    assert 0 < sent <= 2 * KiB + 512, sent


def test_swap_sends_nothing_and_converges(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    a, b = random_bytes(3 * MiB, 25), random_bytes(2 * MiB, 26)
    build_tree(m, {"a": a, "d": {"b": b}})
    _sent(m, r)
    os.rename(m / "a", m / "tmp")
    os.rename(m / "d/b", m / "a")
    os.rename(m / "tmp", m / "d/b")
    assert _sent(m, r) == 0
    assert read(r / "a") == b and read(r / "d/b") == a


def test_copies_and_appends_reuse_replica_bytes(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"log.bin": random_bytes(4 * MiB, 27)})
    _sent(m, r)
    write(m / "copy1.bin", read(m / "log.bin"))
    append(m / "log.bin", random_bytes(1000, 28))
    sent = _sent(m, r)
    assert sent < 300 * KiB, sent  # the tail chunk or two, not the 8 MiB written


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o755, 0o444, 0o4755, 0o1777])
def test_modes_including_special_bits_round_trip(tmp_path, mode):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"f": b"x", "d": {"g": b"y"}})
    os.chmod(m / "f", mode)
    os.chmod(m / "d", mode | 0o700)
    synced(m, r)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o777])
def test_modes_are_exact_whatever_the_umask(tmp_path, umask):
    """New files are created with their final mode when the umask keeps it (no fchmod), and
    given it otherwise: either way every mode lands exactly."""
    m, r = tmp_path / "m", tmp_path / "r"
    modes = {"a": 0o644, "b": 0o600, "c": 0o755, "d": 0o444, "e": 0o000, "f": 0o4755, "g": 0o666, "h": 0o777}
    build_tree(m, {name: name.encode() * 100 for name in modes})
    for name, mode in modes.items():
        os.chmod(m / name, mode)
    cp = run_cli("sync", m, r, preexec_fn=lambda: os.umask(umask))
    assert cp.returncode == 0, cp.stderr
    got = {name: os.stat(r / name).st_mode & 0o7777 for name in modes}
    assert got == modes
    treecmp.assert_trees_equal(m, r)


def test_hard_links_are_copied_as_separate_files(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"a.txt": b"shared content\n", "d": {}})
    os.link(m / "a.txt", m / "d" / "b.txt")
    synced(m, r)
    sa, sb = os.stat(r / "a.txt"), os.stat(r / "d" / "b.txt")
    assert sa.st_ino != sb.st_ino and sa.st_nlink == sb.st_nlink == 1
    append(m / "a.txt", b"written through one link\n")  # both master names change
    synced(m, r)
    assert read(r / "d" / "b.txt") == b"shared content\nwritten through one link\n"


def _photo_tree() -> dict:
    return {"photos": {f"p{i:02d}.jpg": random_bytes(2000, 100 + i) for i in range(30)}, "readme": b"r\n"}


def test_renaming_the_main_directory_sends_nothing_and_loses_nothing(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _photo_tree())
    synced(m, r)
    os.rename(m / "photos", m / "photos-2024")
    _, out = sync_json(m, r, expect=None)
    rep = out["replicas"][0]
    assert rep["exit_code"] == 0 and rep["dirs_moved"] == 1 and rep["files_deleted"] == 0, rep
    assert rep["bytes_sent"] == 0 and rep["files_written"] == 0, rep
    for i in range(30):  # the new names are complete whatever the guard decided
        assert read(r / "photos-2024" / f"p{i:02d}.jpg") == read(m / "photos-2024" / f"p{i:02d}.jpg")
    synced(m, r)  # and the next run converges


def test_renaming_the_main_directory_completes_in_one_run(tmp_path):
    """31 of 32 replica paths go away, but all their content is still on the master: not a mass delete."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _photo_tree())
    synced(m, r)
    os.rename(m / "photos", m / "photos-2024")
    synced(m, r)


@pytest.mark.parametrize("shuffle", ["rotate-three", "shift-chain", "file-into-dir-of-itself",
                                     "dir-collapses-into-file", "dir-rename-over-file"])
def test_reshuffles_of_existing_content_send_nothing(tmp_path, shuffle):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"a": random_bytes(300 * KiB, 31), "b": random_bytes(200 * KiB, 32),
                   "c": random_bytes(100 * KiB, 33), "d": {"x": random_bytes(150 * KiB, 34)}})
    synced(m, r)
    if shuffle == "rotate-three":  # a -> b -> c -> a
        os.rename(m / "a", m / "t")
        os.rename(m / "c", m / "a")
        os.rename(m / "b", m / "c")
        os.rename(m / "t", m / "b")
    elif shuffle == "shift-chain":  # c -> new, b -> c, a -> b
        os.rename(m / "c", m / "new")
        os.rename(m / "b", m / "c")
        os.rename(m / "a", m / "b")
    elif shuffle == "file-into-dir-of-itself":  # a becomes a directory holding a's old content
        os.rename(m / "a", m / "t")
        os.mkdir(m / "a")
        os.rename(m / "t", m / "a" / "inner")
    elif shuffle == "dir-collapses-into-file":  # d/ becomes a file with d/x's content
        os.rename(m / "d" / "x", m / "t")
        os.rmdir(m / "d")
        os.rename(m / "t", m / "d")
    else:  # d/ renamed to where file c was
        os.unlink(m / "c")
        os.rename(m / "d", m / "c")
    assert _sent(m, r) == 0


def test_no_delete_keeps_replica_extras_and_syncs_the_rest(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"keep": b"k\n", "gone": b"g\n", "dir": {"x": b"x\n"}, "f": b"file\n"})
    synced(m, r)
    remove(m / "gone")
    replace_with_file(m / "dir", b"dir became a file\n")  # needs deleting dir/x: skipped without deletes
    replace_with_dir(m / "f", {"y": b"y\n"})  # a file in the way is replaced (not a mirror delete)
    write(m / "keep", b"k2\n")
    cp, out = sync_json(m, r, args=("--no-delete",))
    rep = out["replicas"][0]
    assert rep["files_deleted"] <= 1 and read(r / "gone") == b"g\n"
    assert read(r / "dir" / "x") == b"x\n" and any("dir" in w for w in rep["warnings"]), rep
    assert read(r / "keep") == b"k2\n" and read(r / "f" / "y") == b"y\n"
    synced(m, r)


def test_a_file_edited_just_before_the_run_is_trusted_once_written(tmp_path):
    """The replica trusts the entry of a file it wrote when the file's mtime is clearly older
    than the commit (not than the run's start), so the next run does not reread it: a file
    saved on the master right before the run (watch mode, a big edit) used to be reread on
    the replica every following run."""
    from dirsync import chunking
    from dirsync.progress import Reporter
    from dirsync.scan import RACY_NS
    from dirsync.state import load_manifest_file
    from dirsync.sync import SyncConfig, run_sync

    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"a.bin": random_bytes(300_000, 40), "future.bin": random_bytes(1000, 41)})
    os.utime(m / "future.bin", ns=(time.time_ns() + 10**10,) * 2)  # stamped ahead of the clock
    edited = os.stat(m / "a.bin").st_mtime_ns  # just now: inside the racy window at the start

    class WaitingReporter(Reporter):
        def advance(self, n: int) -> None:  # called as files are staged, before any commit
            deadline = time.monotonic() + 5
            while time.time_ns() <= edited + RACY_NS + 1_000_000:
                assert time.monotonic() < deadline, "clock does not advance"
                time.sleep(0.01)

    run = run_sync(SyncConfig(master=str(m), replicas=(str(r),), init=True), WaitingReporter(quiet=True))
    assert run.replicas[0].exit_code == 0 and run.replicas[0].files_written == 2
    cache = load_manifest_file(str(r / ".dirsync" / "manifest"), chunking.CHUNKER_ID).manifest.entries
    assert cache["a.bin"].trusted
    assert not cache["future.bin"].trusted  # an mtime in the future stays untrusted
    treecmp.assert_trees_equal(m, r)


def _nofile(soft: int, hard: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_changes_across_more_directories_than_it_keeps_open(tmp_path):
    """A change touching one file in each of 300 directories, synced under an open-file limit
    of 256 (so the writer keeps at most 64 directory fds and closes the least recently used
    over and over, in every pass of the plan): the replica converges, nothing is left behind."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {f"d{i:03d}": {"sub": {"f.txt": text_lines(3000, seed=i)}} for i in range(300)})
    synced(m, r)
    for i in range(300):
        append(m / f"d{i:03d}" / "sub" / "f.txt", b"one more line\n")
    cp, out = sync_json(m, r, preexec_fn=_nofile(256, 256))
    treecmp.assert_trees_equal(m, r)
    assert out["replicas"][0]["files_written"] == 300 and tmp_entries(r) == []


def test_keep_freed_memory_makes_malloc_keep_megabyte_buffers_in_its_heap():
    """runtime.keep_freed_memory (the agent calls it when bulk data comes in): afterwards a
    48 MiB buffer comes from malloc's heap, which the process keeps and reuses, instead of a
    mapping of its own, which glibc makes for any block over 32 MiB by default and unmaps
    (so that the next buffer is fresh memory again, a page fault per 4 KiB). Once per process."""
    import ctypes
    import subprocess
    import sys

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or later: no mallinfo2 to look with")
    code = ("import ctypes; from dirsync.runtime import keep_freed_memory\n"
            "class M(ctypes.Structure):\n"
            "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',"
            " 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
            "f = ctypes.CDLL(None).mallinfo2; f.restype = M\n"
            "a = bytearray(48 << 20); mapped_before = f().hblkhd; del a\n"
            "first, again = keep_freed_memory(), keep_freed_memory()\n"
            "b = bytearray(48 << 20); print(mapped_before >= 48 << 20, f().hblkhd >= 48 << 20, first, again)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "True", "False"], out


def test_the_open_file_limit_is_raised_toward_the_hard_one():
    """raise_fd_limit (called at start-up): a soft limit of 256 under a hard one of 2,048
    becomes 2,048, and the writer then keeps up to a quarter of it open (dirfd_cap), never so
    many that a process's fd numbers reach 1,024 (select() takes none higher)."""
    import subprocess
    import sys

    code = ("import resource; from dirsync.runtime import raise_fd_limit; from dirsync.replica import dirfd_cap;"
            "a = (resource.getrlimit(resource.RLIMIT_NOFILE)[0], dirfd_cap()); raise_fd_limit();"
            "print(a, (resource.getrlimit(resource.RLIMIT_NOFILE)[0], dirfd_cap()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=_nofile(256, 2048)).stdout.strip()
    assert out == "(256, 64) (2048, 512)", out
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         preexec_fn=_nofile(256, 20000)).stdout.strip()
    assert out == "(256, 64) (20000, 768)", out
