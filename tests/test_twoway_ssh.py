"""Two-way sync with one side, and with both sides, on the other end of a real sshd.

The remote side runs this checkout's `dirsync agent` (tests/remote_helpers.py); the two-way
state files and the reads of that side's bytes go through the same agent. Each scenario ends
with both trees compared by the independent tree comparison (tests/treecmp.py).
"""

from __future__ import annotations

import json
import os

import pytest

try:
    import sshd as _sshd_plugin
    import treecmp
    from helpers import build_tree, random_bytes, read, run_cli, text_lines, write
    from remote_helpers import TcpProxy, proxy_ssh_config, remote_cmd, ssh_cli_args, ssh_spec
except ImportError:
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import build_tree, random_bytes, read, run_cli, text_lines, write
    from tests.remote_helpers import TcpProxy, proxy_ssh_config, remote_cmd, ssh_cli_args, ssh_spec

pytest_plugins = [_sshd_plugin.__name__]
pytestmark = pytest.mark.ssh


def tw(sshd, a, b, *extra, expect=0):
    cp = run_cli("sync", "--two-way", "--json", *ssh_cli_args(sshd), *extra, a, b)
    assert cp.returncode == expect, cp.stdout + cp.stderr
    assert "Traceback" not in cp.stderr
    return json.loads(cp.stdout) if cp.stdout.strip() else {}


def same(a, b):
    treecmp.assert_trees_equal(a, b)


@pytest.mark.parametrize("remote", ["b", "both"])
def test_two_way_with_ssh_sides(sshd, tmp_path, remote):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"both.txt": b"same\n", "only-a.txt": b"from a\n",
                   "big.bin": random_bytes(3 << 20, 1), "d": {"x.txt": text_lines(20_000, seed=2)}})
    build_tree(b, {"both.txt": b"same\n", "only-b.txt": b"from b\n"})
    spec_a = ssh_spec(sshd, a) if remote == "both" else str(a)
    spec_b = ssh_spec(sshd, b)

    # First run: the union, nothing deleted, no conflict.
    tw(sshd, spec_a, spec_b, "--init")
    same(a, b)
    assert read(b / "only-a.txt") == b"from a\n" and read(a / "only-b.txt") == b"from b\n"

    # One-sided changes propagate both ways; a one-sided delete propagates.
    write(a / "d" / "x.txt", text_lines(20_000, seed=3))
    write(b / "new-on-b.bin", random_bytes(2 << 20, 4))
    os.unlink(b / "only-a.txt")
    tw(sshd, spec_a, spec_b)
    same(a, b)
    assert not (a / "only-a.txt").exists() and (a / "new-on-b.bin").exists()

    # A rename on the remote side costs no data; an edit/edit conflict keeps both versions.
    os.rename(b / "big.bin", b / "moved.bin")
    write(a / "both.txt", b"changed on a\n")
    write(b / "both.txt", b"changed on b, later\n")
    os.utime(b / "both.txt", (2_000_000_000, 2_000_000_000))
    out = tw(sshd, spec_a, spec_b, expect=4)
    same(a, b)
    assert read(a / "both.txt") == b"changed on b, later\n"
    copies = [n for n in os.listdir(a) if n.startswith("both.sync-conflict-")]
    assert len(copies) == 1 and read(a / copies[0]) == b"changed on a\n"
    assert (a / "moved.bin").exists() and not (a / "big.bin").exists()
    assert sum(s["bytes_sent"] for s in out["sides"]) < 64 << 10, out  # the rename re-sent nothing

    # A rerun does nothing.
    tw(sshd, spec_a, spec_b)
    same(a, b)


def test_two_way_plan_over_ssh_changes_nothing(sshd, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(a, {"f.txt": b"a\n"})
    build_tree(b, {"g.txt": b"b\n"})
    before_a, before_b = treecmp.snapshot(a), treecmp.snapshot(b)
    cp = run_cli("plan", "--two-way", "--init", *ssh_cli_args(sshd), a, ssh_spec(sshd, b))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "f.txt" in cp.stdout and "g.txt" in cp.stdout
    assert treecmp.snapshot(a) == before_a and treecmp.snapshot(b) == before_b


def test_remote_side_keeps_the_base_snapshot_and_a_small_change_moves_only_the_delta(sshd, tmp_path):
    """The agent holds the base snapshot in a file of its own (identical to the local side's), so
    a run after a small change moves a record header and the changed rows, not the whole base."""
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        args = ("--ssh-config", cfg, "--remote-cmd", remote_cmd())
        a, b = tmp_path / "a", tmp_path / "b"
        build_tree(a, {f"dir{d:02d}": {f"some-longish-file-name-{i:04d}.txt": f"{d} {i}\n".encode()
                                       for i in range(150)} for d in range(20)})
        spec_b = f"via-proxy:{b}"

        def run(*extra):
            cp = run_cli("sync", "--two-way", "--json", *args, *extra, str(a), spec_b)
            assert cp.returncode == 0, cp.stdout + cp.stderr
            return json.loads(cp.stdout)

        run()
        same(a, b)

        def state(side, suffix):
            return sorted(n for n in os.listdir(side / ".dirsync") if n.startswith("twoway-") and suffix in n)

        snaps = state(a, ".snap-")
        assert len(snaps) == 1 and state(b, ".snap-") == snaps
        snap = read(a / ".dirsync" / snaps[0])
        assert read(b / ".dirsync" / snaps[0]) == snap and len(snap) > 200_000

        write(a / "dir03" / "some-longish-file-name-0007.txt", b"edited on a\n")
        up0, down0 = proxy.counts()
        out = run()
        moved = (proxy.counts()[0] - up0) + (proxy.counts()[1] - down0)
        same(a, b)
        assert out["decisions"]["a_to_b"] == 1
        (base,) = state(b, ".base")
        assert read(b / ".dirsync" / base) == read(a / ".dirsync" / base)
        assert len(read(b / ".dirsync" / base)) < 10_000  # header and one changed row
        assert state(b, ".snap-") == snaps  # the same snapshot, not written again
        # (before: the whole record, snapshot inside, read from the agent and written back)
        assert moved < len(snap) // 2, (moved, len(snap))
    finally:
        proxy.close()


def test_a_remote_side_too_full_for_its_state_stops_cleanly(sshd, tmp_path):
    """The agent cannot write the run's .pending marker (its disk is full): the master reports
    that one error (exit 23), nothing changed on either side, the link stays usable, and with
    room again the next run converges."""
    import contextlib
    import subprocess
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    a = tmp_path / "a"
    build_tree(a, {"a.txt": b"a1\n"})
    b = tempfile.mkdtemp(prefix="dirsync-tmpfs-")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", b]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        spec = ssh_spec(sshd, b)
        tw(sshd, str(a), spec, "--init")
        write(a / "a.txt", b"a2\n")
        filler = os.path.join(b, ".dirsync", "filler")
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        cp = run_cli("sync", "--two-way", *ssh_cli_args(sshd), a, spec)
        assert cp.returncode == 23, cp.stderr
        errs = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
        assert len(errs) == 1 and "write two-way state" in errs[0] and "No space left on device" in errs[0], errs
        assert read(os.path.join(b, "a.txt")) == b"a1\n"
        os.unlink(filler)
        tw(sshd, str(a), spec)
        same(a, b)
        # Nothing to do while the far side is full: the run's "in step" note is only a shortcut
        # that the agent cannot write; the run still succeeds.
        for d in (str(a), b):
            for n in os.listdir(os.path.join(d, ".dirsync")):
                if n.endswith(".step"):
                    os.unlink(os.path.join(d, ".dirsync", n))
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        tw(sshd, str(a), spec)
        same(a, b)
    finally:
        subprocess.run(["umount", "-l", b], check=False)
        os.rmdir(b)
