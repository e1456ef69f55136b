"""Failures of remote replicas, each provoked for real: the agent killed mid-file, the TCP stream
cut or stalled by a proxy, the client killed, wrong keys and host keys, a closed port, a missing
remote dirsync, a remote that prints junk, a peer speaking another protocol version.

What must hold each time: a distinct one-line error (exit 10 for connection problems, 11 for
protocol ones), the replica keeps its old files (nothing half-written), no agent is left
behind holding the replica lock, and a rerun converges. Waits are on conditions with deadlines.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import sys
import time

import pytest

from dirsync.errors import ProtocolError
from dirsync.transport import TransportOptions
from dirsync.transport.remote import RemoteTransport
from dirsync.transport.ssh import SubprocessChannel
from dirsync.transport.wire import PROTO_VERSION

try:
    import sshd as _sshd_plugin
    import treecmp
    from helpers import build_tree, kill_group, popen_cli, random_bytes, read, run_cli, sync_json, tmp_entries, wait_for
    from remote_helpers import TcpProxy, proxy_ssh_config, remote_cmd, ssh_cli_args, ssh_spec
except ImportError:
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import (
        build_tree, kill_group, popen_cli, random_bytes, read, run_cli, sync_json, tmp_entries, wait_for,
    )
    from tests.remote_helpers import TcpProxy, proxy_ssh_config, remote_cmd, ssh_cli_args, ssh_spec

pytest_plugins = [_sshd_plugin.__name__]

MiB = 1 << 20
BIG = 24 * MiB


# -- helpers ------------------------------------------------------------------------------------------


def agent_pids(sshd, replica) -> list[int]:
    """PIDs of dirsync agents under the test sshd that hold files in `replica` open."""
    root = os.path.realpath(replica)
    out = []
    for pid in sshd.session_pids():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if b"agent" not in cmd or not any(b"dirsync" in c for c in cmd):
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(root):
                    out.append(pid)
                    break
        except OSError:
            continue
    return out


def staged_bytes(replica) -> int:
    tmp = os.path.join(replica, ".dirsync", "tmp")
    total = 0
    for name in tmp_entries(replica):
        try:
            total += os.lstat(os.path.join(os.fsencode(tmp), name)).st_size
        except OSError:
            pass
    return total


def big_transfer(m, r, spec, args, env=None):
    """Sync an old BIG file, replace it on the master, start a throttled sync of the new one and
    return (process, old content) once a few MiB of it are staged on the replica."""
    old = random_bytes(BIG, 1)
    build_tree(m, {"big.bin": old, "small.txt": b"small\n"})
    sync_json(m, spec, args=args, env=env)
    (m / "big.bin").write_bytes(random_bytes(BIG, 2))
    p = popen_cli("sync", "--json", "--bwlimit", "6M", *args, m, spec, env=env)
    try:
        wait_for(lambda: staged_bytes(r) >= 2 * MiB or p.poll() is not None, timeout=60, interval=0.01,
                 what="the new big file to be half-way staged")
    except BaseException:
        kill_group(p)
        raise
    assert p.poll() is None, p.communicate()
    return p, old


def finish(p, timeout=60) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        kill_group(p)
        p.communicate()
        raise
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def assert_lost(rc, out, err, what="connection lost to"):
    assert rc == 10, f"exit {rc}\nstdout:{out}\nstderr:{err}"
    assert what in err, err
    assert "Traceback" not in err, err


def converges(m, r, spec, args, env=None):
    _, out = sync_json(m, spec, args=args, env=env)
    assert out["replicas"][0]["status"] == "ok", out
    treecmp.assert_trees_equal(m, r)
    assert tmp_entries(r) == []


# -- the link breaks in the middle of a large file ------------------------------------------------------


@pytest.mark.ssh
def test_agent_killed_mid_file_keeps_the_old_file_and_a_rerun_converges(sshd, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    spec, args = ssh_spec(sshd, r), tuple(ssh_cli_args(sshd))
    p, old = big_transfer(m, r, spec, args)
    pids = agent_pids(sshd, r)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    rc, out, err = finish(p)
    assert_lost(rc, out, err)
    assert read(r / "big.bin") == old, "the replica file must keep its old content"
    converges(m, r, spec, args)


@pytest.mark.ssh
def test_tcp_stream_cut_mid_file_keeps_the_old_file_and_the_agent_exits(sshd, tmp_path):
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        m, r = tmp_path / "m", tmp_path / "r"
        spec, args = f"via-proxy:{r}", ("--ssh-config", cfg, "--remote-cmd", remote_cmd())
        p, old = big_transfer(m, r, spec, args)
        proxy.cut()
        rc, out, err = finish(p)
        assert_lost(rc, out, err)
        assert read(r / "big.bin") == old
        # sshd saw the TCP connection close: the agent reads EOF, cleans up, unlocks and exits.
        wait_for(lambda: not agent_pids(sshd, r), timeout=30, what="the orphaned agent to exit")
        assert tmp_entries(r) == []
        converges(m, r, spec, args)
    finally:
        proxy.close()


@pytest.mark.ssh
def test_client_killed_mid_file_leaves_no_agent_behind(sshd, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    spec, args = ssh_spec(sshd, r), tuple(ssh_cli_args(sshd))
    p, old = big_transfer(m, r, spec, args)
    assert agent_pids(sshd, r)
    kill_group(p, signal.SIGKILL)
    p.communicate()
    wait_for(lambda: not agent_pids(sshd, r), timeout=30, what="the agent of the killed client to exit")
    assert read(r / "big.bin") == old
    converges(m, r, spec, args)  # no LockedError: the agent took the replica lock with it


@pytest.mark.ssh
def test_stalled_link_fails_in_bounded_time_and_the_stranded_agent_gives_up(sshd, tmp_path):
    """A link that stays open but carries nothing: the client gives up after DIRSYNC_IO_TIMEOUT
    (the agent pings meanwhile, so only a dead link is silent that long); the agent, whose master
    is gone without a word, gives up after its idle timeout and releases the replica."""
    proxy = TcpProxy(sshd.port)
    try:
        cfg = proxy_ssh_config(sshd, proxy, tmp_path / "ssh_config")
        m, r = tmp_path / "m", tmp_path / "r"
        args = ("--ssh-config", cfg, "--remote-cmd", remote_cmd({"DIRSYNC_AGENT_IDLE": "6"}))
        spec = f"via-proxy:{r}"
        env = {"DIRSYNC_IO_TIMEOUT": "5"}
        p, old = big_transfer(m, r, spec, args, env=env)
        proxy.stall()
        t0 = time.monotonic()
        rc, out, err = finish(p)
        took = time.monotonic() - t0
        assert_lost(rc, out, err, "no data for 5 s")
        assert took < 25, f"gave up after {took:.1f} s"
        assert read(r / "big.bin") == old
        wait_for(lambda: not agent_pids(sshd, r), timeout=30, what="the stranded agent to give up")
        assert tmp_entries(r) == []
        # The proxied connection is still stalled; the next run goes straight to sshd.
        converges(m, r, ssh_spec(sshd, r), tuple(ssh_cli_args(sshd)))
    finally:
        proxy.close()


def test_default_timeouts_are_sane():
    from dirsync.transport import agent, remote

    assert remote.IO_TIMEOUT_S >= 4 * agent.PING_S  # a few missed pings are not a dead link
    assert remote.PING_S <= remote.IO_TIMEOUT_S / 4
    assert agent.IDLE_S >= remote.IO_TIMEOUT_S  # the agent outwaits the master's own timeout


def test_io_timeout_env_is_validated(monkeypatch):
    from dirsync.transport.remote import IO_TIMEOUT_S, io_timeout

    for value, want in (("2.5", 2.5), ("junk", IO_TIMEOUT_S), ("0", IO_TIMEOUT_S), ("-3", IO_TIMEOUT_S)):
        monkeypatch.setenv("DIRSYNC_IO_TIMEOUT", value)
        assert io_timeout() == want


# -- cannot connect: distinct errors, nothing written -------------------------------------------------


def _home(tmp_path, known_hosts: str | None) -> str:
    """An empty $HOME whose ~/.ssh/known_hosts holds `known_hosts` (None: no file at all)."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True, exist_ok=True)
    kh = h / ".ssh" / "known_hosts"
    if known_hosts is None:
        kh.unlink(missing_ok=True)
    else:
        kh.write_text(known_hosts)
    return str(h)


def _url_run(sshd, tmp_path, *extra, home, port=None, key=None):
    """`dirsync sync` to ssh://user@127.0.0.1:PORT/r with -i KEY, no ssh_config, no agent keys."""
    m, r = tmp_path / "m", tmp_path / "r"
    if not m.exists():
        build_tree(m, {"f.txt": b"x\n"})
    spec = f"ssh://{sshd.user}@127.0.0.1:{port or sshd.port}{r}"
    cp = run_cli("sync", "--ssh-config", os.devnull, "-i", key or sshd.client_key_path, "--remote-cmd",
                 remote_cmd(), *extra, m, spec, env={"HOME": home, "SSH_AUTH_SOCK": ""})
    return cp, r


def _error_line(cp) -> str:
    lines = [ln for ln in cp.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, cp.stderr
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ssh
def test_connection_failures_are_distinct_and_write_nothing(sshd, tmp_path):
    good_kh = open(sshd.known_hosts_path).read()
    wrong_key = tmp_path / "wrong_key"
    _sshd_plugin.make_keypair(wrong_key)
    other_host_pub = _sshd_plugin.make_keypair(tmp_path / "other_host_key")
    cases = {
        "auth": dict(home=_home(tmp_path / "a", good_kh), key=str(wrong_key)),
        "changed": dict(home=_home(tmp_path / "b", f"[127.0.0.1]:{sshd.port} {other_host_pub}\n")),
        "unknown": dict(home=_home(tmp_path / "c", None)),
        "refused": dict(home=_home(tmp_path / "d", good_kh), port=_free_port()),
    }
    expect = {
        "auth": "authentication failed",
        "changed": "HOST KEY CHANGED",
        "unknown": "--accept-new-host-key",
        "refused": "connection refused",
    }
    lines = {}
    for name, kw in cases.items():
        cp, r = _url_run(sshd, tmp_path, **kw)
        assert cp.returncode == 10, f"{name}: exit {cp.returncode}\n{cp.stderr}"
        lines[name] = _error_line(cp)
        assert expect[name] in lines[name], f"{name}: {lines[name]}"
        assert not r.exists(), f"{name}: the replica was created"
    assert len(set(lines.values())) == len(lines), lines
    assert "unknown host key" in lines["unknown"]


@pytest.mark.ssh
@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client (ssh) installed")
def test_dirsync_rsh_runs_the_session_through_the_system_ssh_client(sshd, tmp_path):
    """DIRSYNC_RSH=ssh: a whole sync through OpenSSH's client (its config, keys and
    known_hosts); a refused connection and a missing client are one-line errors, exit 10,
    and nothing is written."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"f.txt": b"x\n", "big.bin": random_bytes(3 << 20, 31), "d": {"g.txt": b"g\n"}})
    cp = run_cli("sync", *ssh_cli_args(sshd), m, ssh_spec(sshd, r), env={"DIRSYNC_RSH": "ssh"})
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, r)

    refused_cfg = tmp_path / "refused_config"
    refused_cfg.write_text(open(sshd.ssh_config_path).read().replace(f"Port {sshd.port}", f"Port {_free_port()}"))
    r2 = tmp_path / "r2"
    cp = run_cli("sync", "--ssh-config", str(refused_cfg), "--remote-cmd", remote_cmd(), m, ssh_spec(sshd, r2),
                 env={"DIRSYNC_RSH": "ssh"})
    assert cp.returncode == 10, cp.stderr
    assert "refused" in _error_line(cp).lower(), cp.stderr
    assert not r2.exists()

    cp = run_cli("sync", *ssh_cli_args(sshd), m, ssh_spec(sshd, r2), env={"DIRSYNC_RSH": "/nonexistent/ssh -v"})
    assert cp.returncode == 10, cp.stderr
    assert "/nonexistent/ssh" in _error_line(cp), cp.stderr
    assert not r2.exists()


@pytest.mark.ssh
@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client (ssh) installed")
def test_rsh_option_and_profile_key_choose_the_ssh_client(sshd, tmp_path):
    """--rsh CMD (sync, and a profile's `rsh` key for run) carries the session through that
    client, and wins over DIRSYNC_RSH; --rsh '' keeps the built-in client. The client here is
    a wrapper that notes its arguments before it runs OpenSSH's ssh."""
    m = tmp_path / "m"
    build_tree(m, {"f.txt": b"x\n", "d": {"g.bin": random_bytes(200_000, 7)}})
    log = tmp_path / "rsh.log"
    wrapper = tmp_path / "my ssh"  # a space: the command is split like a shell would
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\nexec ssh "$@"\n')
    wrapper.chmod(0o755)
    env = {"DIRSYNC_RSH": "/nonexistent/ssh"}  # would fail: the option must win

    cp = run_cli("sync", "--rsh", shlex.quote(str(wrapper)), *ssh_cli_args(sshd), m, ssh_spec(sshd, tmp_path / "r1"),
                 env=env)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, tmp_path / "r1")
    assert "BatchMode=yes" in log.read_text() and sshd.alias in log.read_text()

    log.unlink()
    cp = run_cli("sync", "--rsh", "", *ssh_cli_args(sshd), m, ssh_spec(sshd, tmp_path / "r2"), env=env)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, tmp_path / "r2")
    assert not log.exists()

    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""[profile.p]
master = {json.dumps(str(m))}
replicas = [{json.dumps(ssh_spec(sshd, tmp_path / "r3"))}]
ssh_config = {json.dumps(sshd.ssh_config_path)}
remote_cmd = {json.dumps(remote_cmd())}
rsh = {json.dumps(shlex.quote(str(wrapper)))}
""")
    cp = run_cli("run", "--config", str(cfg), "p", env=env)
    assert cp.returncode == 0, cp.stderr
    treecmp.assert_trees_equal(m, tmp_path / "r3")
    assert "BatchMode=yes" in log.read_text()


@pytest.mark.ssh
def test_accept_new_host_key_records_it_in_dirsyncs_own_file(sshd, tmp_path, _private_state_home):
    home = _home(tmp_path, None)
    cp, r = _url_run(sshd, tmp_path, "--accept-new-host-key", home=home)
    assert cp.returncode == 0, cp.stderr
    own = _private_state_home / "dirsync" / "known_hosts"
    assert f"[127.0.0.1]:{sshd.port} {sshd.host_pub_line}" in own.read_text()
    assert not os.path.exists(os.path.join(home, ".ssh", "known_hosts")), "the user's known_hosts is never written"
    cp, r = _url_run(sshd, tmp_path, home=home)  # known now, without the flag
    assert cp.returncode == 0, cp.stderr


@pytest.mark.ssh
def test_missing_remote_dirsync_gives_a_one_line_hint(sshd, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"f.txt": b"x\n"})
    for cmd in ("/nonexistent/dirsync", "no-such-dirsync-command", f"{sys.executable} -m no_such_module_dirsync"):
        cp = run_cli("sync", "--ssh-config", sshd.ssh_config_path, "--remote-cmd", cmd, m, ssh_spec(sshd, r))
        assert cp.returncode == 10, f"{cmd}: exit {cp.returncode}\n{cp.stderr}"
        line = _error_line(cp)
        assert "could not start dirsync" in line, line
        hints = [ln for ln in cp.stderr.splitlines() if ln.startswith("hint:")]
        assert len(hints) == 1 and "--remote-cmd" in hints[0] and "install" in hints[0], cp.stderr
        assert not r.exists()


@pytest.mark.ssh
def test_remote_that_prints_text_is_a_protocol_error_with_a_hint(sshd, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {"f.txt": b"x\n"})
    for banner in ("Welcome to the server", "hi"):  # a short one arrives together with the agent's hello
        cmd = f"echo {banner}; {remote_cmd()}"
        cp = run_cli("sync", "--ssh-config", sshd.ssh_config_path, "--remote-cmd", cmd, m, ssh_spec(sshd, r))
        assert cp.returncode == 11, cp.stderr
        assert "text instead of a dirsync frame" in _error_line(cp) and banner in cp.stderr
        assert "hint:" in cp.stderr
        assert not r.exists()


def _fake_agent_open(tmp_path, hello_msg: dict, after: tuple = ()) -> ProtocolError:
    """Open a RemoteTransport whose agent says `hello_msg` (then the frames `after`) and then
    waits for EOF."""
    fake_agent = (
        "import sys, msgpack, struct; "
        f"out = [msgpack.packb(m) for m in [{hello_msg!r}, *{list(after)!r}]]; "
        "sys.stdout.buffer.write(b''.join(struct.pack('>I', len(b)) + b for b in out)); sys.stdout.flush(); "
        "sys.stdin.buffer.read()"
    )
    t = RemoteTransport(f"localhost:{tmp_path / 'r'}", TransportOptions(),
                        channel_factory=lambda: SubprocessChannel([sys.executable, "-c", fake_agent]))
    with pytest.raises(ProtocolError) as ei:
        t.open()
    assert not (tmp_path / "r").exists()
    return ei.value


def test_protocol_version_mismatch_names_both_versions(tmp_path):
    e = _fake_agent_open(tmp_path, {"type": "hello", "proto": PROTO_VERSION + 1, "version": "99.0"})
    msg = str(e)
    assert f"speaks {PROTO_VERSION}" in msg and f"speaks {PROTO_VERSION + 1}" in msg and "99.0" in msg, msg


@pytest.mark.parametrize("case", ["not zstd", "nested batch", "bomb"])
def test_a_bad_outcome_batch_from_the_agent_is_a_protocol_error(tmp_path, case):
    """The agent's compressed outcome batches ("zb") are hostile input for the master too."""
    import msgpack
    import zstandard

    def zb(payload: bytes) -> dict:
        z = zstandard.ZstdCompressor().compressobj()
        return {"t": "zb", "b": z.compress(payload) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)}

    inner = msgpack.packb({"t": "zb", "b": b""})
    frame = {"not zstd": {"t": "zb", "b": b"garbage" * 50},
             "nested batch": zb(len(inner).to_bytes(4, "big") + inner),
             "bomb": zb(b"\0" * (40 << 20))}[case]
    from dirsync import chunking

    hello = {"type": "hello", "proto": PROTO_VERSION, "version": "0.9", "chunker": chunking.CHUNKER_ID,
             "features": ["rz"]}
    e = _fake_agent_open(tmp_path, hello, after=(frame,))
    assert any(w in str(e) for w in ("compressed data", "batch inside a batch", "inflates past")), str(e)


def test_chunker_mismatch_is_refused(tmp_path):
    e = _fake_agent_open(tmp_path, {"type": "hello", "proto": PROTO_VERSION, "version": "0.9",
                                    "chunker": "gear/v0"})
    assert "gear/v0" in str(e) and "same dirsync version" in (e.hint or ""), str(e)
