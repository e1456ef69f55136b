"""End to end over a real sshd, through the real CLI (`python -m dirsync sync/plan/verify`).

The replicas are reached through the test sshd (tests/sshd.py) with this checkout's dirsync
as the remote command (tests/remote_helpers.py). Each round checks with the independent
tree comparison (tests/treecmp.py) that the replica equals the master. Bytes on the wire are
measured with a counting TCP proxy in front of sshd, next to the --json figures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import pytest

try:
    import sshd as _sshd_plugin
    import treecmp
    from helpers import (
        File, J, Link, append, build_tree, insert, overwrite_same_size_and_mtime, random_bytes, raw_snapshot, read,
        remove, replace_with_dir, replace_with_file, replace_with_link, run_cli, settle, stray_temps, swap,
        sync_json, text_lines, tiny_tmpfs, tmp_entries, touch, truncate, write,
    )
    from remote_helpers import REPO_ROOT, TcpProxy, proxy_ssh_config, remote_cmd, ssh_cli_args, ssh_spec
except ImportError:
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import (
        File, J, Link, append, build_tree, insert, overwrite_same_size_and_mtime, random_bytes, raw_snapshot, read,
        remove, replace_with_dir, replace_with_file, replace_with_link, run_cli, settle, stray_temps, swap,
        sync_json, text_lines, tiny_tmpfs, tmp_entries, touch, truncate, write,
    )
    from tests.remote_helpers import REPO_ROOT, TcpProxy, proxy_ssh_config, remote_cmd, ssh_cli_args, ssh_spec

from dirsync.status import load_record

pytest_plugins = [_sshd_plugin.__name__]
pytestmark = pytest.mark.ssh

KiB, MiB = 1 << 10, 1 << 20


def ssh_synced(sshd, master, replica_spec, replica_path, *, args=(), expect=0) -> dict:
    """Sync over SSH through the CLI; check exit 0, replica == master, master untouched, no temps."""
    before = treecmp.snapshot(master)
    _, out = sync_json(master, replica_spec, args=(*ssh_cli_args(sshd), *args), expect=expect)
    assert treecmp.snapshot(master) == before, "sync modified the master"
    treecmp.assert_trees_equal(master, replica_path)
    assert tmp_entries(replica_path) == [] and stray_temps(replica_path) == []
    r = out["replicas"][0]
    assert r["errors"] == [] and r["status"] == "ok", r
    return r


def tree() -> dict:
    return {
        "README.md": text_lines(3 * KiB, seed=1),
        "empty.txt": b"",
        "emptydir": {},
        "src": {"main.py": text_lines(20 * KiB, seed=2), "util.py": text_lines(2 * KiB, seed=3),
                "pkg": {"__init__.py": b"", "deep": {"deeper": {"x.txt": b"deep\n", "y.bin": random_bytes(5000, 4)}}}},
        "data": {"big.bin": random_bytes(400 * KiB, 5), "small.bin": random_bytes(3000, 6)},
        "docs": {"guide.md": text_lines(6 * KiB, seed=7), "café-menü.txt": "crème brûlée\n".encode()},
        b"bad\xffname.txt": b"latin-1 name\n",
        b"dir\xfe": {b"inner\xfd": b"x"},
        "ro.txt": File(b"read only\n", mode=0o444),
        "exec.sh": File(b"#!/bin/sh\necho hi\n", mode=0o755),
        "private": {"secret.txt": File(b"s\n", mode=0o600)},
        "link-rel": Link("docs/guide.md"),
        "link-abs": Link("/etc/passwd"),
        "link-dangling": Link("does/not/exist"),
        "spaces and\nnewline.txt": b"odd name\n",
    }


def test_mutation_rounds_over_ssh(sshd, tmp_path):
    m, r = tmp_path / "master", tmp_path / "replica"
    spec = ssh_spec(sshd, r)
    build_tree(m, tree())
    first = ssh_synced(sshd, m, spec, r)
    assert first["files_written"] >= 14 and first["links_made"] == 3 and first["bytes_sent"] > 400 * KiB, first

    # Round 1: content edits, metadata, new names of every flavour.
    guide = read(m / "docs/guide.md")
    write(m / "docs/guide.md", guide.replace(b"\n", b"\nEDITED LINE\n", 1))
    append(m / "README.md", b"appended line\n")
    insert(m / "data/big.bin", 200 * KiB, b"<inserted>" * 10)
    truncate(m / "data/small.bin", 1000)
    os.chmod(m / "exec.sh", 0o700)
    touch(m / "src/util.py", 1_500_000_000_123_456_789)
    build_tree(m, {"a/b/c/new-empty.txt": b"", "newdir/empty-sub": {}, "ünïcödé/名前.txt": "u\n".encode(),
                   b"new\x80\xffraw": {b"f\xc3\x28": b"invalid utf-8 name\n"}})
    os.chmod(m / "src", 0o750)
    rep = ssh_synced(sshd, m, spec, r)
    assert rep["bytes_sent"] < 64 * KiB, rep

    # Round 2: renames of files and directories, deletes.
    os.makedirs(m / "moved")
    os.rename(m / "data/big.bin", m / "moved/big2.bin")
    os.rename(m / "src/pkg", m / "src/pkg2")
    os.rename(J(m, b"bad\xffname.txt"), J(m, b"renamed\xfe.txt"))
    os.rename(m / "link-rel", m / "link-renamed")
    remove(m / "docs/café-menü.txt")
    remove(m / "emptydir")
    remove(J(m, b"dir\xfe"))
    rep = ssh_synced(sshd, m, spec, r)
    assert rep["bytes_sent"] < 4 * KiB, f"renames should be copied on the replica, sent {rep['bytes_sent']}"

    # Round 3: type changes in every direction.
    replace_with_dir(m / "README.md", {"inside.txt": b"README is a directory now\n", "sub": {}})
    replace_with_file(m / "data", b"data is a file now\n")
    replace_with_link(m / "exec.sh", "src/util.py")
    replace_with_file(m / "link-renamed", b"was a link\n")
    replace_with_link(m / "docs", "src")
    replace_with_link(m / "empty.txt", "dangling-target")
    ssh_synced(sshd, m, spec, r)

    # Round 4: swap, truncate to zero, copy, directory metadata, deeper deletes.
    build_tree(m, {"swap-a": random_bytes(70 * KiB, 11), "swap-b": random_bytes(90 * KiB, 12)})
    ssh_synced(sshd, m, spec, r)
    swap(m / "swap-a", m / "swap-b")
    truncate(m / "src/util.py", 0)
    write(m / "copy-of-main.py", read(m / "src/main.py"))
    touch(m / "newdir", 1_400_000_000_000_000_000)
    os.chmod(m / "a/b", 0o711)
    remove(m / "src/pkg2/deep/deeper")
    replace_with_file(m / "README.md", b"README is a file again\n")
    rep = ssh_synced(sshd, m, spec, r)
    assert rep["bytes_sent"] < 4 * KiB, f"swap and copy should reuse replica bytes, sent {rep['bytes_sent']}"

    # Round 5: a change made on the replica behind dirsync's back is found (delta scan) and undone.
    write(r / "src/main.py", b"tampered on the replica\n")
    os.unlink(r / "swap-a")
    ssh_synced(sshd, m, spec, r)

    # Round 6: nothing changed: nothing to do.
    rep = ssh_synced(sshd, m, spec, r)
    assert (rep["files_written"], rep["bytes_sent"], rep["files_deleted"], rep["metadata_set"]) == (0, 0, 0, 0), rep


def test_fan_out_to_two_ssh_replicas_and_a_local_one(sshd, tmp_path):
    """One CLI run: an ssh_config alias, a user@host:path with -p/-i and known_hosts from $HOME, a local dir."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(sshd.known_hosts_path, home / ".ssh" / "known_hosts")
    m, r1, r2, r3 = tmp_path / "m", tmp_path / "r1", tmp_path / "r2", tmp_path / "r3"
    build_tree(m, tree())
    specs = [ssh_spec(sshd, r1), f"{sshd.user}@127.0.0.1:{r2}", str(r3)]
    args = ("--ssh-config", sshd.ssh_config_path, "-p", str(sshd.port), "-i", sshd.client_key_path,
            "--remote-cmd", remote_cmd())
    env = {"HOME": str(home)}
    for round_ in range(2):
        _, out = sync_json(m, *specs, args=args, env=env)
        assert [x["status"] for x in out["replicas"]] == ["ok"] * 3, out
        for r in (r1, r2, r3):
            treecmp.assert_trees_equal(m, r)
        if round_ == 0:
            write(m / "docs/guide.md", b"changed for round two\n")
            os.rename(m / "data/big.bin", m / "big-moved.bin")
    sent = [x["bytes_sent"] for x in out["replicas"]]
    assert sent[0] == sent[1] == sent[2] < 1 * KiB, sent  # the edited file; the move reuses bytes
    # Each replica's turn ran in its own fan-out worker, the remote ones connected by theirs.
    pids = {load_record(os.path.realpath(m), spec if ":" in spec else os.path.abspath(spec))["last_run"]["pid"]
            for spec in specs}
    assert len(pids) == 3 and os.getpid() not in pids, pids


def test_fan_out_over_ssh_reports_a_full_replica_disk_per_file(sshd, tmp_path):
    """Fan-out workers hand the agent's item errors to the parent pickled: a replica whose disk
    is full (a tiny tmpfs) must come out as its files' errors (exit 23), the other replica
    synced, not as a crash (the agent's errors did not unpickle: exit 1 with a TypeError)."""
    m, r1 = tmp_path / "m", tmp_path / "r1"
    build_tree(m, {"big.bin": random_bytes(3 * MiB, 8), "small.txt": b"fits\n"})
    with tiny_tmpfs("2m") as r2:
        cp, out = sync_json(m, ssh_spec(sshd, r1), ssh_spec(sshd, r2), args=ssh_cli_args(sshd), expect=23)
        assert "Traceback" not in cp.stderr and "TypeError" not in cp.stderr, cp.stderr
        ok, full = out["replicas"]
        assert ok["status"] == "ok" and full["status"] == "partial", out
        assert [e["path"] for e in full["errors"]] == ["big.bin"], full["errors"]
        assert "No space left on device" in full["errors"][0]["message"], full["errors"]
        assert read(os.path.join(r2, "small.txt")) == b"fits\n" and not os.path.exists(os.path.join(r2, "big.bin"))
        assert tmp_entries(r2) == [] and stray_temps(r2) == []
    treecmp.assert_trees_equal(m, r1)


def test_compress_sends_less_and_converges(sshd, tmp_path):
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        m = tmp_path / "m"
        build_tree(m, {"src": {f"mod{i}.py": text_lines(40 * KiB, seed=i) for i in range(12)},
                       "noise.bin": random_bytes(300 * KiB, 99)})
        ups = {}
        for flag in ("", "--compress"):
            r = tmp_path / f"r{flag}"
            before = proxy.counts()[0]
            _, out = sync_json(m, f"via-proxy:{r}", args=("--ssh-config", cfg, "--remote-cmd", remote_cmd(),
                                                          *([flag] if flag else [])))
            ups[flag] = proxy.counts()[0] - before
            treecmp.assert_trees_equal(m, r)
            assert out["replicas"][0]["bytes_sent"] > 780 * KiB  # the plan's figure: before compression
        print(f"\nwire bytes up: plain {ups['']}, --compress {ups['--compress']}")
        assert ups["--compress"] < 0.6 * ups[""], ups
    finally:
        proxy.close()


def patched_agent_cmd(assignment: str) -> str:
    """A --remote-cmd running this checkout's agent with one module constant of
    dirsync.transport.agent set otherwise (e.g. an agent that announces no features)."""
    import shlex
    import sys

    code = (f"import sys, runpy; import dirsync.transport.agent as a; a.{assignment}; "
            "sys.argv[0] = 'dirsync'; runpy.run_module('dirsync', run_name='__main__')")
    return f"env PYTHONPATH={shlex.quote(REPO_ROOT)} {shlex.quote(sys.executable)} -c {shlex.quote(code)}"


@pytest.mark.parametrize("flags", [(), ("--compress",)])
def test_write_rows_are_packed_and_an_agent_without_it_still_works(sshd, tmp_path, flags):
    """The rows and ops of writes go in a zstd stream (with --compress, the data's), when the
    agent announces it ("rz" in its hello): paths and chunk sizes compress well; and a new
    file's chunk digests are computed by the agent as it writes ("sd"). A release-like
    step (one line edited in each of 80 files under a deep folder) and a first copy of 400 small
    files must then move fewer bytes than with an agent that does not announce it, which must
    still be served correctly."""
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        old_agent = patched_agent_cmd("FEATURES = ()")
        deep = "project/src/dirsync_example/subsystem/handlers"
        m = tmp_path / "m"
        build_tree(m, {deep: {f"handler_module_{i:03d}.py": text_lines(12 * KiB, seed=i) for i in range(80)}})
        build_tree(m, {"assets/icons/small": {f"icon_{i:04d}.svg": text_lines(64 + 9 * i, seed=i) for i in range(400)}})
        reps = {"rz": (tmp_path / "r-new", remote_cmd()), "plain": (tmp_path / "r-old", old_agent)}
        firsts = {}
        for name, (r, cmd) in reps.items():
            before = proxy.counts()[0]
            sync_json(m, f"via-proxy:{r}", args=("--ssh-config", cfg, "--remote-cmd", cmd, *flags))
            firsts[name] = proxy.counts()[0] - before
        # The new agent computed the chunk digests of what it was sent ("sd"): its cache must
        # hold exactly the master's.
        from dirsync import chunking
        from dirsync.manifest import FileEntry
        from dirsync.scan import scan_tree
        from dirsync.state import load_manifest_file

        want = {p: e.digests for p, e in scan_tree(str(m)).manifest.entries.items() if isinstance(e, FileEntry)}
        got = load_manifest_file(str(reps["rz"][0] / ".dirsync" / "manifest"), chunking.CHUNKER_ID).manifest
        assert {p: e.digests for p, e in got.entries.items() if isinstance(e, FileEntry)} == want
        assert any(len(d) > 16 for d in want.values())  # some files are several chunks
        for i in range(80):
            f = m / deep / f"handler_module_{i:03d}.py"
            text = f.read_bytes()
            f.write_bytes(text[:6000] + b"# edited for the release\n" + text[6000:])
        ups = {}
        for name, (r, cmd) in reps.items():
            before = proxy.counts()[0]
            _, out = sync_json(m, f"via-proxy:{r}", args=("--ssh-config", cfg, "--remote-cmd", cmd, *flags))
            ups[name] = proxy.counts()[0] - before
            assert out["replicas"][0]["files_written"] == 80, out
            treecmp.assert_trees_equal(m, r)
        print(f"\n{flags}: wire bytes up, rows packed / plain: first copy {firsts['rz']} / {firsts['plain']}, "
              f"release step {ups['rz']} / {ups['plain']}")
        assert firsts["rz"] < firsts["plain"] and ups["rz"] < 0.9 * ups["plain"], (firsts, ups)
    finally:
        proxy.close()


@pytest.mark.parametrize("flags", [(), ("--compress",)])
def test_small_new_files_travel_in_write_batches(sshd, tmp_path, flags):
    """New files of up to 64 KiB go as write batches ("wb": rows in one blob, bytes in one
    payload) to an agent that announces it, and their done outcomes come back as path lists
    ("dw": they save CPU, not bytes, as the outcomes travel compressed anyway). A first copy of
    1,500 small files (some several chunks, some empty, one changed mode) and a step that adds
    300 more beside 20 edits must then send fewer bytes than to an agent that does not announce
    "wb" (which still gets the same result): at least 25 bytes less per new file (measured:
    ~45; a frame, its keys and a zstd block header each); and the replica's cache must hold the
    master's chunk digests."""
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        m = tmp_path / "m"
        build_tree(m, {f"d{j:02d}": {f"f{i:03d}.txt": text_lines(i * 37 % 4000, seed=i + 100 * j) for i in range(100)}
                       for j in range(15)})
        os.chmod(m / "d00" / "f005.txt", 0o600)
        reps = {"wb": (tmp_path / "r-wb", remote_cmd()),
                "plain": (tmp_path / "r-plain", patched_agent_cmd("FEATURES = ('rz', 'sd', 'tw2')"))}

        def step(expect_written: int) -> dict:
            moved = {}
            for name, (r, cmd) in reps.items():
                up0, down0 = proxy.counts()
                _, out = sync_json(m, f"via-proxy:{r}", args=("--ssh-config", cfg, "--remote-cmd", cmd, *flags))
                up1, down1 = proxy.counts()
                moved[name] = (up1 - up0, down1 - down0)
                assert out["replicas"][0]["files_written"] == expect_written, (name, out)
                treecmp.assert_trees_equal(m, r)
            return moved

        first = step(1500)
        from dirsync import chunking
        from dirsync.manifest import FileEntry
        from dirsync.scan import scan_tree
        from dirsync.state import load_manifest_file

        want = {p: e.digests for p, e in scan_tree(str(m)).manifest.entries.items() if isinstance(e, FileEntry)}
        got = load_manifest_file(str(reps["wb"][0] / ".dirsync" / "manifest"), chunking.CHUNKER_ID).manifest
        assert {p: e.digests for p, e in got.entries.items() if isinstance(e, FileEntry)} == want
        assert any(len(d) > 16 for d in want.values()) and any(not d for d in want.values())
        build_tree(m, {"new": {f"n{i:03d}.txt": text_lines(500 + i, seed=9000 + i) for i in range(300)}})
        for i in range(20):
            f = m / "d03" / f"f{i + 50:03d}.txt"
            f.write_bytes(f.read_bytes() + b"edited\n")
        second = step(320)
        print(f"\n{flags}: wire bytes (up, down) with write batches / without: first copy {first['wb']} / "
              f"{first['plain']}, step {second['wb']} / {second['plain']}")
        for moved, new in ((first, 1500), (second, 300)):
            assert moved["wb"][0] < moved["plain"][0] - 25 * new, moved
    finally:
        proxy.close()


def test_agent_outcomes_leave_in_batches(sshd, tmp_path):
    """The agent holds its per-file outcomes back until it waits for input and sends them as
    compressed batches ("zb", the master's hello asks for them), so a first copy of 1,500 small
    files gets its reports back in far fewer bytes than from an agent that writes each at once
    (HOLD_MAX 0, and DW_MAX 1 so that done writes are not gathered into path lists either:
    one raw frame each); same result."""
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        eager = patched_agent_cmd("HOLD_MAX = 0; a.DW_MAX = 1")
        m = tmp_path / "m"
        build_tree(m, {f"d{j:02d}": {f"f{i:03d}.txt": b"x%d\n" % i for i in range(100)} for j in range(15)})
        downs = {}
        for name, cmd in (("held", remote_cmd()), ("eager", eager)):
            r = tmp_path / f"r-{name}"
            before = proxy.counts()[1]
            _, out = sync_json(m, f"via-proxy:{r}", args=("--ssh-config", cfg, "--remote-cmd", cmd))
            downs[name] = proxy.counts()[1] - before
            assert out["replicas"][0]["files_written"] == 1500, out
            treecmp.assert_trees_equal(m, r)
        print(f"\nfirst copy of 1,500 files, wire bytes down: held {downs['held']}, eager {downs['eager']}")
        assert downs["held"] < 0.8 * downs["eager"], downs
    finally:
        proxy.close()


def test_moving_a_20mib_file_sends_nothing_over_ssh(sshd, tmp_path, capsys):
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        args = ("--ssh-config", cfg, "--remote-cmd", remote_cmd())
        m, r = tmp_path / "m", tmp_path / "r"
        build_tree(m, {"in": {"big.bin": random_bytes(20 * MiB, 21)}, "elsewhere": {"deeper": {}}})
        _, out = sync_json(m, f"via-proxy:{r}", args=args)
        assert out["replicas"][0]["bytes_sent"] == 20 * MiB
        os.rename(m / "in/big.bin", m / "elsewhere/deeper/big-moved.bin")
        up0, down0 = proxy.counts()
        t0 = time.monotonic()
        _, out = sync_json(m, f"via-proxy:{r}", args=args)
        moved_s = time.monotonic() - t0
        up, down = proxy.counts()[0] - up0, proxy.counts()[1] - down0
        treecmp.assert_trees_equal(m, r)
        assert out["replicas"][0]["bytes_sent"] == 0, out
        assert up < 64 * KiB, f"{up} bytes went up the wire for a moved file"

        up0, down0 = proxy.counts()
        t0 = time.monotonic()
        _, out = sync_json(m, f"via-proxy:{r}", args=args)
        noop_s = time.monotonic() - t0
        noop_up, noop_down = proxy.counts()[0] - up0, proxy.counts()[1] - down0
        assert out["replicas"][0]["files_written"] == 0
        with capsys.disabled():
            print(f"\nmoved 20 MiB file over ssh: bytes_sent 0, wire up {up} B / down {down} B, {moved_s:.2f} s; "
                  f"no-op: wire up {noop_up} B / down {noop_down} B, {noop_s:.2f} s")
    finally:
        proxy.close()


@contextlib.contextmanager
def _synced_through_a_proxy(sshd, tmp_path, tree: dict):
    """A master built from `tree`, synced once to a replica reached through a byte-counting
    proxy. Yields (master, replica, sync): sync() runs one more sync and returns the bytes
    that came down the wire and the replica's JSON summary."""
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        args = ("--ssh-config", cfg, "--remote-cmd", remote_cmd())
        m, r = tmp_path / "m", tmp_path / "r"
        build_tree(m, tree)
        sync_json(m, f"via-proxy:{r}", args=args)

        def sync() -> tuple[int, dict]:
            d0 = proxy.counts()[1]
            _, out = sync_json(m, f"via-proxy:{r}", args=args)
            return proxy.counts()[1] - d0, out["replicas"][0]

        yield m, r, sync
    finally:
        proxy.close()


def test_noop_scan_is_a_delta_on_the_wire(sshd, tmp_path, _private_state_home):
    """After a sync both sides keep the replica manifest under one generation id, so the next
    scan sends only the rows that changed: a no-op over a 3,000-file tree moves a few KiB (mostly
    the SSH handshake), not the whole manifest, and a change made on the replica is still found."""
    tree = {f"d{i}": {f"f{j}.txt": f"{i}/{j}\n" for j in range(100)} for i in range(30)}
    with _synced_through_a_proxy(sshd, tmp_path, tree) as (m, r, down_bytes_of_a_sync):
        delta, rep = down_bytes_of_a_sync()
        assert rep["files_written"] == 0
        write(r / "d3/f7.txt", b"changed on the replica\n")
        delta_with_change, rep = down_bytes_of_a_sync()
        assert rep["files_written"] == 1
        treecmp.assert_trees_equal(m, r)
        shutil.rmtree(_private_state_home / "dirsync" / "replicas")  # forget our copy: a full scan
        full, rep = down_bytes_of_a_sync()
        assert rep["files_written"] == 0
        print(f"\nmanifest down: full {full} B, delta no-op {delta} B, delta with one change {delta_with_change} B")
        assert delta < 16 * KiB and delta * 10 < full, (full, delta)
        assert delta_with_change < 16 * KiB


def test_a_stale_or_torn_copy_of_the_replica_manifest_costs_only_a_full_scan(sshd, tmp_path, _private_state_home):
    """The master's copy of the replica manifest is saved without an fsync: after a crash it
    may be the version before (its rename lost) or unreadable. Either way the next run must
    converge, with the agent sending every row instead of a delta, and must miss nothing the
    replica changed meanwhile."""
    tree = {f"d{i}": {f"f{j}.txt": f"{i}/{j}\n" for j in range(60)} for i in range(20)}
    with _synced_through_a_proxy(sshd, tmp_path, tree) as (m, r, down_bytes_of_a_sync):
        copies = list((_private_state_home / "dirsync" / "replicas").glob("*.manifest"))
        assert len(copies) == 1
        copy = copies[0]
        before = copy.read_bytes()

        write(m / "d1/f1.txt", b"edited on the master\n")
        _, rep = down_bytes_of_a_sync()
        assert rep["files_written"] == 1 and copy.read_bytes() != before
        delta, rep = down_bytes_of_a_sync()  # a no-op against the fresh copy: a delta
        assert rep["files_written"] == 0

        copy.write_bytes(before)  # the last save's rename never reached the disk
        write(r / "d2/f2.txt", b"changed on the replica meanwhile\n")
        stale, rep = down_bytes_of_a_sync()
        assert rep["files_written"] == 1 and rep["exit_code"] == 0
        treecmp.assert_trees_equal(m, r)
        assert stale > 4 * delta, (stale, delta)  # every row came: the copy's generation was not the agent's

        data = copy.read_bytes()
        copy.write_bytes(data[: len(data) // 2])  # torn
        write(r / "d3/f3.txt", b"changed on the replica again\n")
        torn, rep = down_bytes_of_a_sync()
        assert rep["files_written"] == 1 and rep["exit_code"] == 0
        treecmp.assert_trees_equal(m, r)
        assert torn > 4 * delta, (torn, delta)
        again, rep = down_bytes_of_a_sync()
        assert rep["files_written"] == 0 and again < 2 * delta  # the copy was rebuilt


def test_clean_ssh_run_leaves_the_pair_in_step(sshd, tmp_path):
    """The agent reports the fingerprint of the cache it saved: after a clean run the next
    no-op plans nothing, and a silent edit on the far side is still found."""
    args = ssh_cli_args(sshd)
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {f"d{i}": {f"f{j}.txt": f"{i}/{j}\n" for j in range(20)} for i in range(5)})
    settle(m)
    sync_json(m, ssh_spec(sshd, r), args=args)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args)
    assert out["replicas"][0]["planned"] is False
    overwrite_same_size_and_mtime(r / "d2/f3.txt", b"X/3\n")
    _, out = sync_json(m, ssh_spec(sshd, r), args=args)
    assert out["replicas"][0]["planned"] is True and out["replicas"][0]["files_written"] == 1
    treecmp.assert_trees_equal(m, r)


def test_plan_and_verify_against_an_ssh_replica(sshd, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    spec = ssh_spec(sshd, r)
    build_tree(m, tree())
    ssh_synced(sshd, m, spec, r)
    ssh = ssh_cli_args(sshd)

    cp = run_cli("verify", *ssh, m, spec)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cp = run_cli("verify", "--quick", *ssh, m, spec)
    assert cp.returncode == 0, cp.stdout + cp.stderr

    write(r / "src/util.py", b"edited on the replica\n")
    os.unlink(r / "README.md")
    write(m / "new-on-master.txt", b"new\n")
    before = raw_snapshot(r)
    cp = run_cli("plan", *ssh, m, spec)
    assert cp.returncode == 0, cp.stderr
    assert "new-on-master.txt" in cp.stdout and "README.md" in cp.stdout and "src/util.py" in cp.stdout, cp.stdout
    assert raw_snapshot(r) == before, "plan changed the replica"

    cp = run_cli("verify", *ssh, m, spec)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "src/util.py" in cp.stdout and "README.md" in cp.stdout and "new-on-master.txt" in cp.stdout, cp.stdout
    assert raw_snapshot(r) == before, "verify changed the replica"

    ssh_synced(sshd, m, spec, r)
    cp = run_cli("verify", *ssh, m, spec)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_replica_path_is_never_seen_by_the_remote_shell(sshd, tmp_path):
    """The root travels inside the open message, not on the remote command line: spaces, quotes,
    `$(...)` and non-UTF-8 bytes are just bytes of a path."""
    m = tmp_path / "m"
    build_tree(m, {"f.txt": b"x\n", "d": {"g": b"y\n"}})
    parent = os.path.join(os.fsencode(str(tmp_path)), b"odd dir 'q' $(touch PWNED) \xff")
    os.makedirs(parent)
    r = os.path.join(parent, b"replica")
    spec = os.fsencode(sshd.alias) + b":" + r
    _, out = sync_json(m, spec, args=tuple(ssh_cli_args(sshd)))
    assert out["replicas"][0]["status"] == "ok", out
    treecmp.assert_trees_equal(m, r)
    assert not os.path.exists(os.path.join(os.path.expanduser("~"), "PWNED")) and not (tmp_path / "PWNED").exists()


def test_a_large_replica_walked_by_the_agent_in_two_processes_stays_exact(sshd, tmp_path):
    """From SPLIT_MIN cached entries on, the agent walks its replica with two processes (each
    takes every other top-level directory): a change on either side, in either half, is seen."""
    from dirsync.scan import SPLIT_MIN

    m, r = tmp_path / "m", tmp_path / "r"
    per = SPLIT_MIN // 6 + 50
    build_tree(m, {f"top{i}/f{k:04d}.txt": f"{i}/{k}\n" for i in range(6) for k in range(per)})
    spec = ssh_spec(sshd, r)
    ssh_synced(sshd, m, spec, r)
    for i in range(6):  # the master changes a file in every top directory
        write(m / f"top{i}/f0001.txt", b"changed on the master\n")
    remove(m / "top2/f0002.txt")
    rep = ssh_synced(sshd, m, spec, r)
    assert rep["files_written"] == 6 and rep["files_deleted"] == 1
    for i in range(6):  # now the replica drifts, in both halves of the walk
        write(r / f"top{i}/f0003.txt", b"changed on the replica\n")
    write(r / "top5/stray.txt", b"not on the master\n")
    settle(r)
    rep = ssh_synced(sshd, m, spec, r)
    assert rep["files_written"] == 6 and rep["files_deleted"] == 1


@pytest.mark.parametrize("agent", ["md", "without-md"])
def test_a_renamed_directory_is_renamed_whole_by_an_agent_that_announces_it(sshd, tmp_path, agent):
    """The agent renames the directory ("mvdir", when its hello lists "md"): same inodes, no
    file written or deleted, the replica equal, and the moved entries' rows do not travel back
    (a `moved` list: the master moves its own copy's rows, which the next run finds right).
    An agent that does not announce it is sent the file-by-file move, which converges too."""
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        m, r = tmp_path / "m", tmp_path / "r"
        # 4 MiB files: 8 KiB chunks, 8 KiB of chunk digests a file, were their rows to travel
        build_tree(m, {"photos": {"a": {f"p{i}.raw": random_bytes(4 * MiB, i) for i in range(4)},
                                  "b.txt": "b\n", "empty": {}}, "keep": {"x.txt": "x\n"}})
        cmd = remote_cmd() if agent == "md" else patched_agent_cmd(
            "FEATURES = tuple(f for f in a.FEATURES if f != 'md')")
        args = ("--ssh-config", cfg, "--remote-cmd", cmd)
        spec = f"via-proxy:{r}"
        settle(m)
        sync_json(m, spec, args=args)
        settle(r)
        sync_json(m, spec, args=args)
        before = {n: os.lstat(r / "photos" / "a" / n).st_ino for n in os.listdir(r / "photos" / "a")}
        os.rename(m / "photos", m / "keep" / "pictures")
        up0, down0 = proxy.counts()
        _, out = sync_json(m, spec, args=args)
        up, down = proxy.counts()
        rep = out["replicas"][0]
        treecmp.assert_trees_equal(m, r)
        assert rep["errors"] == [] and rep["bytes_sent"] == 0, rep
        if agent == "md":
            assert (rep["dirs_moved"], rep["files_written"], rep["files_deleted"]) == (1, 0, 0), rep
            assert {n: os.lstat(r / "keep" / "pictures" / "a" / n).st_ino for n in before} == before
            assert down - down0 < 16 * KiB, (up - up0, down - down0)  # (the rows alone: 32 KiB)
        else:
            assert rep["dirs_moved"] == 0 and rep["files_deleted"] == 8, rep
        _, out = sync_json(m, spec, args=args)  # the master's copy of the replica's cache followed:
        assert out["replicas"][0]["files_written"] == 0 and out["replicas"][0]["dirs_moved"] == 0
        write(m / "keep" / "pictures" / "a" / "p1.raw", random_bytes(4 * MiB, 1)[:-100] + b"x" * 100)
        _, out = sync_json(m, spec, args=args)  # ... and its rows serve a delta at the new path
        assert 0 < out["replicas"][0]["bytes_sent"] < 64 * KiB, out["replicas"][0]
        treecmp.assert_trees_equal(m, r)
    finally:
        proxy.close()
