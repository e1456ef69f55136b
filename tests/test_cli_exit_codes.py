"""The command line as a user and cron see it: exit codes, `plan` output, `--json`, quiet output,
and never a Python traceback for an expected failure. Every case runs `python -m dirsync`."""

from __future__ import annotations

import fcntl
import json
import os
import re

import pytest

try:
    import treecmp
    from helpers import Link, build_tree, raw_snapshot, read, remove, run_cli, sync_json, write
except ImportError:
    from tests import treecmp
    from tests.helpers import Link, build_tree, raw_snapshot, read, remove, run_cli, sync_json, write

from dirsync.errors import ExitCode
from dirsync.state import pair_lock_path

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

TREE = {
    "keep.txt": b"same on both sides\n",
    "edit.txt": b"version 1\n",
    "gone.txt": b"deleted on the master later\n",
    "dir": {"inner.txt": b"inner\n"},
    "link": Link("keep.txt"),
}

ACTION_RE = re.compile(r"^(mkdir|write|link|meta|delete|skip) {1,4}\S")


@pytest.fixture
def pair(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, TREE)
    sync_json(m, r)
    return m, r


# -- usage errors -----------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    (),
    ("sync",),
    ("sync", "/only-a-master"),
    ("sync", "--no-such-option", "a", "b"),
    ("sync", "--max-delete", "lots", "a", "b"),
    ("frobnicate",),
])
def test_usage_errors_exit_2_without_traceback(args):
    cp = run_cli(*args)
    assert cp.returncode == int(ExitCode.USAGE), (args, cp.returncode, cp.stderr)


def test_help_exits_0():
    cp = run_cli("sync", "--help")
    assert cp.returncode == 0 and "--max-delete" in cp.stdout and "--init" in cp.stdout


# -- one case per exit code ----------------------------------------------------------------


def test_exit_0_and_quiet_when_not_a_terminal(pair):
    m, r = pair
    write(m / "edit.txt", b"version 2\n")
    cp = run_cli("sync", m, r)
    assert cp.returncode == 0
    assert cp.stdout == "" and cp.stderr == "", "non-TTY output without --verbose should be empty on success"
    cp = run_cli("sync", "--verbose", m, r)
    assert cp.returncode == 0 and str(r) in cp.stderr  # a summary line when asked for
    cp = run_cli("sync", "--quiet", m, r)
    assert cp.returncode == 0 and cp.stdout == "" and cp.stderr == ""


def test_exit_12_refused(tmp_path):
    cp = run_cli("sync", tmp_path / "missing-master", tmp_path / "r")
    assert cp.returncode == int(ExitCode.REFUSED)
    lines = cp.stderr.splitlines()
    assert lines and lines[0].startswith("error: ") and "missing-master" in lines[0]
    assert not os.path.exists(tmp_path / "r")


def test_exit_23_partial_names_path_op_and_cause(pair):
    m, r = pair
    # An item error the root user cannot bypass: the master has a file where the replica
    # has a directory it may not remove because an excluded file lives inside.
    remove(m / "dir")
    write(m / "dir", b"now a file\n")
    write(r / "dir" / "local.keep", b"excluded, so dirsync must not delete it\n")
    write(m / "edit.txt", b"version 2\n")
    cp = run_cli("sync", "--exclude", "*.keep", m, r)
    assert cp.returncode == int(ExitCode.PARTIAL), cp.stderr
    errors = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all("dir" in ln for ln in errors), cp.stderr
    assert read(r / "edit.txt") == b"version 2\n"  # the rest synced
    assert read(r / "dir" / "local.keep").startswith(b"excluded")


def test_exit_25_delete_limit(pair):
    m, r = pair
    remove(m / "gone.txt")
    remove(m / "dir")
    cp = run_cli("sync", "--max-delete", "1", m, r)
    assert cp.returncode == int(ExitCode.DELETE_LIMIT), cp.stderr
    assert os.path.exists(r / "gone.txt") and os.path.exists(r / "dir/inner.txt")


def test_exit_3_when_the_pair_is_locked(pair):
    m, r = pair
    lock = pair_lock_path(os.path.realpath(m), os.path.abspath(r))
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)
        write(m / "edit.txt", b"version 2\n")
        cp = run_cli("sync", m, r)
        assert cp.returncode == int(ExitCode.LOCKED), cp.stderr
        assert "locked" in cp.stderr and "4242" in cp.stderr
        assert read(r / "edit.txt") == b"version 1\n"
        # plan (a dry run) takes no lock and still works
        cp = run_cli("plan", m, r)
        assert cp.returncode == 0 and "edit.txt" in cp.stdout
    finally:
        os.close(fd)
    assert run_cli("sync", m, r).returncode == 0  # released: the next run goes ahead
    assert read(r / "edit.txt") == b"version 2\n"


def test_exit_3_when_the_replica_is_locked_by_another_master(pair, tmp_path):
    m, r = pair
    fd = os.open(r / ".dirsync" / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cp = run_cli("sync", m, r)
        assert cp.returncode == int(ExitCode.LOCKED), cp.stderr
        assert "locked" in cp.stderr
    finally:
        os.close(fd)


def test_readme_documents_every_exit_code():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    codes = ExitCode.codes()
    assert len(codes) >= 11 and codes["PARTIAL"] == 23
    for name, code in codes.items():
        assert re.search(rf"^\|\s*{code}\s*\|", text, re.M), f"exit code {code} ({name}) not in README"


# -- plan --------------------------------------------------------------------------------


def test_plan_prints_one_line_per_action_and_changes_nothing(pair):
    m, r = pair
    write(m / "edit.txt", b"version 2, longer\n")
    remove(m / "gone.txt")
    build_tree(m, {"newdir": {"new.txt": b"new\n"}, "newlink": Link("edit.txt")})
    os.chmod(m / "keep.txt", 0o600)
    before_r, before_m = raw_snapshot(r), treecmp.snapshot(m)
    cp = run_cli("plan", m, r)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[-1].startswith("total: "), lines
    assert all(ACTION_RE.match(ln) for ln in lines[:-1]), lines
    assert "mkdir   newdir/" in lines
    assert any(ln.startswith("write   edit.txt") for ln in lines)
    assert any(ln.startswith("write   newdir/new.txt") for ln in lines)
    assert "link    newlink -> edit.txt" in lines
    assert "delete  gone.txt" in lines
    assert any(ln.startswith("meta    keep.txt  mode 0600") for ln in lines)
    assert re.match(r"total: 2 to write \(send \d+ B, reuse \d+ B\), 1 to delete, 1 dirs, 1 links, \d+ metadata",
                    lines[-1]), lines[-1]
    assert raw_snapshot(r) == before_r and treecmp.snapshot(m) == before_m

    # sync --dry-run prints the same plan and changes nothing either
    cp2 = run_cli("sync", "--dry-run", m, r)
    assert cp2.returncode == 0 and cp2.stdout == cp.stdout
    assert raw_snapshot(r) == before_r

    # then the real sync does exactly that
    _, out = sync_json(m, r)
    rep = out["replicas"][0]
    assert (rep["files_written"], rep["files_deleted"], rep["dirs_created"], rep["links_made"]) == (2, 1, 1, 1)
    treecmp.assert_trees_equal(m, r)


def test_plan_against_a_new_replica_creates_nothing(tmp_path):
    m = tmp_path / "m"
    build_tree(m, TREE)
    cp = run_cli("plan", m, tmp_path / "new-replica")
    assert cp.returncode == 0, cp.stderr
    assert not os.path.exists(tmp_path / "new-replica")
    assert sum(ln.startswith("write ") for ln in cp.stdout.splitlines()) == 4


def test_plan_json_lists_lines_and_totals(pair):
    m, r = pair
    write(m / "edit.txt", b"version 2\n")
    cp = run_cli("plan", "--json", m, r)
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)
    p = out["replicas"][0]["plan"]
    assert p["writes"] == 1 and p["deletes"] == 0 and p["send_bytes"] + p["reuse_bytes"] == 10
    assert p["lines"][-1].startswith("total:")


def test_plan_with_two_replicas_labels_each(pair, tmp_path):
    m, r = pair
    cp = run_cli("plan", m, r, tmp_path / "r2")
    assert cp.returncode == 0, cp.stderr
    assert f"== {r}" in cp.stdout and f"== {tmp_path / 'r2'}" in cp.stdout
    assert cp.stdout.count("total:") == 2


# -- --json ----------------------------------------------------------------------------------


def test_json_summary_has_the_documented_keys(pair, tmp_path):
    m, r = pair
    write(m / "edit.txt", b"version 2\n")
    remove(m / "gone.txt")
    bad = tmp_path / "file-not-dir"
    write(bad, b"x")
    cp, out = sync_json(m, r, bad, expect=int(ExitCode.REFUSED))
    assert cp.stderr == "" or all(ln.startswith(("error:", "hint:", "warning:")) for ln in cp.stderr.splitlines())
    assert {"master", "exit_code", "seconds", "master_scan", "replicas"} <= set(out)
    assert out["exit_code"] == int(ExitCode.REFUSED)
    assert {"files_hashed", "bytes_hashed", "errors", "warnings"} <= set(out["master_scan"])
    keys = {"replica", "status", "exit_code", "files_written", "bytes_sent", "bytes_reused", "files_deleted",
            "errors", "warnings", "seconds"}
    ok, refused = out["replicas"]
    assert keys <= set(ok) and keys <= set(refused)
    assert ok["status"] == "ok" and ok["exit_code"] == 0
    assert (ok["files_written"], ok["files_deleted"], ok["bytes_sent"]) == (1, 1, 10)
    assert refused["status"] == "refused" and refused["exit_code"] == int(ExitCode.REFUSED) and refused["fatal"]
    assert isinstance(ok["seconds"], (int, float)) and ok["seconds"] >= 0


def test_json_item_errors_carry_path_op_code_and_message(pair):
    m, r = pair
    remove(m / "dir")
    write(m / "dir", b"now a file\n")
    write(r / "dir" / "local.keep", b"excluded\n")
    cp, out = sync_json(m, r, args=("--exclude", "*.keep"), expect=int(ExitCode.PARTIAL))
    errs = out["replicas"][0]["errors"]
    assert errs and {"path", "op", "code", "message"} <= set(errs[0])
    assert any(e["path"] == "dir" for e in errs), errs


def test_non_utf8_paths_are_escaped_in_messages(tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {b"caf\xe9": {b"x": b"1"}})
    sync_json(m, r)
    remove(os.path.join(os.fsencode(m), b"caf\xe9"))
    write(os.path.join(os.fsencode(m), b"caf\xe9"), b"file now\n")
    write(os.path.join(os.fsencode(r), b"caf\xe9", b"y.keep"), b"excluded\n")
    cp, out = sync_json(m, r, args=("--exclude", "*.keep"), expect=int(ExitCode.PARTIAL))
    assert any(e["path"] == "caf\\xe9" for e in out["replicas"][0]["errors"]), out
    json.dumps(out, ensure_ascii=True)  # all of it is plain, printable JSON


def test_control_characters_in_names_never_break_a_line(tmp_path):
    """`plan` is one line per action and errors are one line: a newline or an ESC in a file
    name is shown escaped, never raw (a raw ESC could also rewrite the user's terminal)."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"two\nlines.txt": b"x", "esc\x1b[31mred.txt": b"y", "tab\there": b"z",
                   "dir\nname": {"f": b"f"}})
    cp = run_cli("plan", m, r)
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert all(ACTION_RE.match(ln) for ln in lines[:-1]) and lines[-1].startswith("total: 4 to write"), lines
    assert "\x1b" not in cp.stdout and "\t" not in cp.stdout
    assert "write   two\\nlines.txt  1 B  send 1 B" in lines, lines
    sync_json(m, r)
    treecmp.assert_trees_equal(m, r)
    # An item error about such a name is one line too.
    remove(m / "dir\nname")
    write(m / "dir\nname", b"a file now")
    write(r / "dir\nname" / "local.keep", b"excluded: blocks the type change")
    cp = run_cli("sync", "--exclude", "*.keep", m, r)
    assert cp.returncode == int(ExitCode.PARTIAL), cp.stderr
    assert cp.stderr and all(ln.startswith(("error:", "warning:", "hint:")) for ln in cp.stderr.splitlines()), cp.stderr
    assert "dir\\nname" in cp.stderr
