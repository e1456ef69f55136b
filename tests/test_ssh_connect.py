"""ssh.py against a real sshd on 127.0.0.1 (no paramiko mocks), plus the pure known_hosts parser and SubprocessChannel."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import socket
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest

from dirsync.errors import ConfigError, ConnectError, ExitCode
from dirsync.transport.ssh import (
    KnownHosts,
    ParamikoChannel,
    SubprocessChannel,
    connect,
    dirsync_known_hosts_path,
    fingerprint,
    host_key_name,
    parse_known_hosts,
    remote_command,
)
try:  # plain `pytest` puts tests/ on sys.path; `python -m pytest` also has the repo root
    import sshd as _sshd_plugin
except ImportError:
    from tests import sshd as _sshd_plugin

SshdInfo = _sshd_plugin.SshdInfo
make_keypair = _sshd_plugin.make_keypair
pytest_plugins = [_sshd_plugin.__name__]  # the `sshd` fixture; deduplicated if conftest loads it too


def _read_all(ch: ParamikoChannel | SubprocessChannel) -> bytes:
    out = b""
    while True:
        b = ch.recv(65536)
        if not b:
            return out
        out += b


def _run(client: paramiko.SSHClient, command: str) -> tuple[bytes, str, int | None]:
    with ParamikoChannel(client, command) as ch:
        ch.settimeout(10)
        out = _read_all(ch)
        deadline = time.monotonic() + 5
        while ch.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return out, ch.stderr_text(), ch.exit_status()


def _empty(tmp_path: Path) -> str:
    p = tmp_path / "empty_known_hosts"
    p.write_text("")
    return str(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- pure: known_hosts parsing and matching ----------------------------------------------


def test_parse_known_hosts_is_tolerant() -> None:
    good = base64.b64encode(b"\0\0\0\x0bssh-ed25519" + b"\0\0\0\x20" + b"k" * 32).decode()
    text = "\n".join(
        [
            "# comment",
            "",
            "garbage",
            "host only-two-fields",
            "host ssh-ed25519 !!!notbase64!!!",
            f"host ssh-rsa {good}",  # type field disagrees with the blob
            f"@unknown-marker host ssh-ed25519 {good}",
            f"@revoked * ssh-ed25519 {good}",
            f"@cert-authority *.example.com ssh-ed25519 {good}",
            f"a.example.com,[b.example.com]:2222 ssh-ed25519 {good} a comment",
        ]
    )
    entries = parse_known_hosts(text, "kh")
    assert [(e.marker, e.patterns) for e in entries] == [
        ("@revoked", ("*",)),
        ("@cert-authority", ("*.example.com",)),
        (None, ("a.example.com", "[b.example.com]:2222")),
    ]
    assert entries[2].source == "kh:10"


def test_host_patterns() -> None:
    salt = os.urandom(20)
    digest = hmac.new(salt, b"[10.0.0.1]:2222", hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    blob = b"\0\0\0\x0bssh-ed25519"
    entries = parse_known_hosts(
        f"{hashed} ssh-ed25519 {base64.b64encode(blob).decode()}\n"
        f"*.corp,!bad.corp ssh-ed25519 {base64.b64encode(blob).decode()}\n"
        f"Host?.Example ssh-ed25519 {base64.b64encode(blob).decode()}\n",
        "kh",
    )
    h, w, q = entries
    assert h.matches("[10.0.0.1]:2222") and not h.matches("10.0.0.1") and not h.matches("[10.0.0.1]:22")
    assert w.matches("a.corp") and w.matches("A.CORP") and not w.matches("bad.corp") and not w.matches("corp")
    assert q.matches("host1.example") and not q.matches("host12.example")


def test_host_key_name() -> None:
    assert host_key_name("Example.COM", 22) == "example.com"
    assert host_key_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"
    assert host_key_name("::1", 2222) == "[::1]:2222"


def test_known_hosts_add_is_atomic_append(tmp_path: Path) -> None:
    own = tmp_path / "state" / "dirsync" / "known_hosts"
    own.parent.mkdir(parents=True)
    own.write_text("# keep me\nold.example ssh-ed25519 AAAA")  # no trailing newline
    key = paramiko.Ed25519Key.from_private_key_file(_keyfile(tmp_path))
    kh = KnownHosts([], own)
    kh.add("[h]:2", key)
    text = own.read_text()
    assert text.startswith("# keep me\nold.example ssh-ed25519 AAAA\n")
    assert text.endswith(f"[h]:2 ssh-ed25519 {key.get_base64()}\n")
    assert [p.name for p in own.parent.iterdir() if p.name.endswith(".tmp")] == []
    kh.verify("[h]:2", key, accept_new=False, label="x")  # now known in memory
    KnownHosts([], own).verify("[h]:2", key, accept_new=False, label="x")  # and on disk


def _keyfile(tmp_path: Path) -> str:
    p = tmp_path / "k_ed25519"
    if not p.exists():
        make_keypair(p)
    return str(p)


def test_remote_command_quotes() -> None:
    assert remote_command(["dirsync", "agent", "--root", "a b;rm -rf ~"]) == "dirsync agent --root 'a b;rm -rf ~'"


# --- SubprocessChannel (no sshd) ---------------------------------------------------------


def test_subprocess_channel_round_trip() -> None:
    with SubprocessChannel(["cat"]) as ch:
        ch.settimeout(5)
        ch.send(b"hello\n")
        assert ch.recv(100) == b"hello\n"
        ch.send_eof()
        assert ch.recv(100) == b""


def test_subprocess_channel_large_transfer_and_stderr() -> None:
    data = os.urandom(8 << 20)
    code = "import sys,hashlib; d=sys.stdin.buffer.read(); sys.stderr.write('warn\\n'); print(hashlib.sha256(d).hexdigest()); sys.exit(4)"
    with SubprocessChannel([sys.executable, "-c", code]) as ch:
        ch.settimeout(10)
        ch.send(data)
        ch.send_eof()
        assert _read_all(ch).decode().strip() == hashlib.sha256(data).hexdigest()
        deadline = time.monotonic() + 5
        while ch.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ch.exit_status() == 4
        assert ch.stderr_text() == "warn\n"


def test_subprocess_channel_recv_timeout_is_bounded() -> None:
    ch = SubprocessChannel(["sleep", "30"], label="slow agent")
    try:
        ch.settimeout(0.5)
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match="connection lost to slow agent: no data for 0.5 s"):
            ch.recv(10)
        assert time.monotonic() - t0 < 3
    finally:
        t0 = time.monotonic()
        ch.close(grace_s=0.2)  # `sleep` ignores EOF: close must terminate it
        assert time.monotonic() - t0 < 2
        assert ch.exit_status() is not None


def test_subprocess_channel_send_timeout_is_bounded() -> None:
    # `sleep` never reads stdin: the pipe fills and send must give up.
    ch = SubprocessChannel(["sleep", "30"])
    try:
        ch.settimeout(0.5)
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match="could not send"):
            ch.send(b"x" * (4 << 20))
        assert time.monotonic() - t0 < 3
    finally:
        ch.close(grace_s=0.2)


def test_subprocess_channel_dead_peer() -> None:
    with SubprocessChannel(["sh", "-c", "echo boom >&2; exit 9"]) as ch:
        ch.settimeout(5)
        assert ch.recv(10) == b""
        time.sleep(0.1)
        with pytest.raises(ConnectError, match=r"agent exited with status 9.*boom"):
            for _ in range(100):
                ch.send(b"x" * 65536)


def test_subprocess_channel_missing_program() -> None:
    with pytest.raises(ConnectError, match="cannot start"):
        SubprocessChannel(["/nonexistent/dirsync-agent"])


# --- real sshd ---------------------------------------------------------------------------


@pytest.mark.ssh
def test_connect_and_run_command(sshd: SshdInfo) -> None:
    client = connect(sshd.url("/tmp"), **sshd.connect_kwargs())
    try:
        t = client.get_transport()
        assert t is not None and t.is_authenticated()
        assert t.local_cipher == "aes128-gcm@openssh.com"
        # Nagle's algorithm off: each handshake exchange had waited ~40 ms for a delayed ACK.
        assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert client.label == f"{sshd.user}@127.0.0.1:{sshd.port}"
        out, err, status = _run(client, "echo hi; echo oops >&2; exit 3")
        assert (out, err, status) == (b"hi\n", "oops\n", 3)
    finally:
        client.close()


@pytest.mark.ssh
def test_channel_bulk_upload_integrity(sshd: SshdInfo) -> None:
    data = os.urandom(6 << 20)
    with connect(sshd.url("/"), **sshd.connect_kwargs()) as client:
        with ParamikoChannel(client, "sha256sum") as ch:
            ch.settimeout(20)
            for i in range(0, len(data), 1 << 20):
                ch.send(data[i : i + (1 << 20)])
            ch.send_eof()
            assert _read_all(ch).split()[0].decode() == hashlib.sha256(data).hexdigest()


@pytest.mark.ssh
def test_channel_bulk_download(sshd: SshdInfo) -> None:
    with connect(sshd.url("/"), **sshd.connect_kwargs()) as client:
        with ParamikoChannel(client, "head -c 6000000 /dev/zero") as ch:
            ch.settimeout(20)
            assert len(_read_all(ch)) == 6_000_000


@pytest.mark.ssh
def test_dead_link_fails_in_bounded_time(sshd: SshdInfo) -> None:
    with connect(sshd.url("/"), **sshd.connect_kwargs()) as client:
        with ParamikoChannel(client, "cat >/dev/null") as ch:
            ch.settimeout(1)
            t0 = time.monotonic()
            with pytest.raises(ConnectError, match=rf"connection lost to .*127\.0\.0\.1:{sshd.port}.*no data"):
                ch.recv(10)
            assert time.monotonic() - t0 < 4


@pytest.mark.ssh
def test_killed_session_is_connection_lost(sshd: SshdInfo) -> None:
    before = set(sshd.session_pids())
    with connect(sshd.url("/"), **sshd.connect_kwargs()) as client:
        with ParamikoChannel(client, "cat >/dev/null") as ch:
            ch.settimeout(10)
            time.sleep(0.3)
            mine = [p for p in sshd.session_pids() if p not in before]
            assert mine
            for pid in reversed(mine):
                with contextlib.suppress(ProcessLookupError):  # older sessions may be exiting
                    os.kill(pid, 9)
            t0 = time.monotonic()
            with pytest.raises(ConnectError, match="connection lost"):
                ch.recv(10)
            assert time.monotonic() - t0 < 5
            with pytest.raises(ConnectError, match="connection lost"):
                ch.send(b"x")


@pytest.mark.ssh
def test_unknown_host_key_is_refused_with_hint(sshd: SshdInfo, tmp_path: Path) -> None:
    kw = {**sshd.connect_kwargs(), "known_hosts_files": [_empty(tmp_path)]}
    with pytest.raises(ConnectError) as ei:
        connect(sshd.url("/"), **kw)
    assert "--accept-new-host-key" in str(ei.value)
    assert f"[127.0.0.1]:{sshd.port}" in str(ei.value)
    assert "SHA256:" in str(ei.value)
    assert ei.value.exit_code == ExitCode.CONNECT
    assert not Path(dirsync_known_hosts_path()).exists()


@pytest.mark.ssh
def test_accept_new_host_key_records_in_own_file(sshd: SshdInfo, tmp_path: Path) -> None:
    user_kh = _empty(tmp_path)
    kw = {**sshd.connect_kwargs(), "known_hosts_files": [user_kh]}
    own = Path(dirsync_known_hosts_path())
    assert str(own).startswith(os.environ["XDG_STATE_HOME"])
    with connect(sshd.url("/"), accept_new_host_key=True, **kw):
        pass
    assert own.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_pub_line}\n"
    assert Path(user_kh).read_text() == ""  # never the user's file
    with connect(sshd.url("/"), **kw) as client:  # second time: known, no flag needed
        assert _run(client, "echo again")[0] == b"again\n"


@pytest.mark.ssh
@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_is_always_refused(sshd: SshdInfo, tmp_path: Path, accept_new: bool) -> None:
    other = make_keypair(tmp_path / "impostor")
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    kw = {**sshd.connect_kwargs(), "known_hosts_files": [str(kh)]}
    with pytest.raises(ConnectError, match="HOST KEY CHANGED") as ei:
        connect(sshd.url("/"), accept_new_host_key=accept_new, **kw)
    assert f"{kh}:1" in str(ei.value)
    assert kh.read_text() == f"[127.0.0.1]:{sshd.port} {other}\n"
    assert not Path(dirsync_known_hosts_path()).exists()


@pytest.mark.ssh
def test_changed_key_in_own_file_is_refused(sshd: SshdInfo, tmp_path: Path) -> None:
    other = make_keypair(tmp_path / "impostor")
    own = Path(dirsync_known_hosts_path())
    own.parent.mkdir(parents=True)
    own.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    kw = {**sshd.connect_kwargs(), "known_hosts_files": [_empty(tmp_path)]}
    with pytest.raises(ConnectError, match="HOST KEY CHANGED"):
        connect(sshd.url("/"), accept_new_host_key=True, **kw)


@pytest.mark.ssh
def test_revoked_host_key_is_refused(sshd: SshdInfo, tmp_path: Path) -> None:
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_pub_line}\n@revoked * {sshd.host_pub_line}\n")
    kw = {**sshd.connect_kwargs(), "known_hosts_files": [str(kh)]}
    with pytest.raises(ConnectError, match="@revoked"):
        connect(sshd.url("/"), accept_new_host_key=True, **kw)


@pytest.mark.ssh
def test_messy_known_hosts_with_hashed_entry_works(sshd: SshdInfo, tmp_path: Path) -> None:
    name = f"[127.0.0.1]:{sshd.port}".encode()
    salt = os.urandom(20)
    hashed = "|1|{}|{}".format(
        base64.b64encode(salt).decode(), base64.b64encode(hmac.new(salt, name, hashlib.sha1).digest()).decode()
    )
    kh = tmp_path / "kh"
    kh.write_text(
        "this line is junk\n"
        "@cert-authority *.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI\n"
        f"other.example {sshd.host_pub_line}\n"
        f"{hashed} {sshd.host_pub_line}\n"
    )
    with connect(sshd.url("/"), **{**sshd.connect_kwargs(), "known_hosts_files": [str(kh)]}):
        pass


@pytest.mark.ssh
def test_wrong_client_key_is_auth_error(sshd: SshdInfo, tmp_path: Path) -> None:
    make_keypair(tmp_path / "stranger")
    cfg = tmp_path / "cfg"
    cfg.write_text("Host *\n  IdentitiesOnly yes\n")
    kw = {**sshd.connect_kwargs(), "identity": str(tmp_path / "stranger"), "ssh_config_file": str(cfg)}
    with pytest.raises(ConnectError, match=rf"authentication failed for {sshd.user}@127\.0\.0\.1:{sshd.port}"):
        connect(sshd.url("/"), **kw)


@pytest.mark.ssh
def test_no_key_at_all_is_auth_error(sshd: SshdInfo, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    cfg.write_text("Host *\n  IdentitiesOnly yes\n")
    kw = {**sshd.connect_kwargs(), "identity": None, "ssh_config_file": str(cfg)}
    with pytest.raises(ConnectError, match="authentication failed .*no SSH key"):
        connect(sshd.url("/"), **kw)


def test_missing_identity_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="identity file not found"):
        connect("host:/x", identity=str(tmp_path / "nope"), ssh_config_file=os.devnull)


def test_closed_port_fails_fast(tmp_path: Path) -> None:
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectError, match=rf"connection refused by \S+@127\.0\.0\.1:{port}"):
        connect(f"ssh://127.0.0.1:{port}/x", ssh_config_file=os.devnull, known_hosts_files=[_empty(tmp_path)])
    assert time.monotonic() - t0 < 2


def test_dns_failure(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match=r"cannot resolve host name 'no-such-host\.invalid'"):
        connect("no-such-host.invalid:/x", ssh_config_file=os.devnull, known_hosts_files=[_empty(tmp_path)])


def test_silent_server_times_out(tmp_path: Path) -> None:
    """A port that accepts but never speaks SSH: bounded by connect_timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept)
    th.start()
    try:
        port = srv.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match=rf"127\.0\.0\.1:{port}") as ei:
            connect(
                f"ssh://u@127.0.0.1:{port}/x",
                ssh_config_file=os.devnull,
                known_hosts_files=[_empty(tmp_path)],
                connect_timeout=1,
            )
        assert time.monotonic() - t0 < 5
        assert "no SSH server answered" in str(ei.value) or "timed out" in str(ei.value)
    finally:
        stop.set()
        th.join()
        for c in conns:
            c.close()
        srv.close()


@pytest.mark.ssh
def test_ssh_config_alias(sshd: SshdInfo) -> None:
    with connect("dirsync-test:data", ssh_config_file=sshd.ssh_config_path) as client:
        assert client.label == f"{sshd.user}@127.0.0.1:{sshd.port} (dirsync-test)"
        assert _run(client, "echo alias")[0] == b"alias\n"


@pytest.mark.ssh
def test_ssh_config_strict_accept_new(sshd: SshdInfo, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    cfg.write_text(
        f"Host t\n  HostName 127.0.0.1\n  Port {sshd.port}\n  IdentityFile {sshd.client_key_path}\n"
        f"  UserKnownHostsFile {_empty(tmp_path)}\n  StrictHostKeyChecking accept-new\n"
    )
    with connect("t:/", ssh_config_file=str(cfg)):
        pass
    assert Path(dirsync_known_hosts_path()).read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")


def _jump_config(sshd: SshdInfo, tmp_path: Path, target_port: int | None = None) -> Path:
    cfg = tmp_path / "jump_config"
    cfg.write_text(
        f"Host target\n"
        f"  HostName 127.0.0.1\n"
        f"  Port {target_port or sshd.port}\n"
        f"  ProxyJump hop\n"
        f"Host hop\n"
        f"  HostName 127.0.0.1\n"
        f"  Port {sshd.port}\n"
        f"Host *\n"
        f"  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key_path}\n"
        f"  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {sshd.known_hosts_path}\n"
    )
    return cfg


@pytest.mark.ssh
def test_proxyjump_through_itself(sshd: SshdInfo, tmp_path: Path) -> None:
    with connect("target:/", ssh_config_file=str(_jump_config(sshd, tmp_path))) as client:
        assert len(client.jumps) == 1
        assert _run(client, "echo jumped")[0] == b"jumped\n"
        hop_transport = client.jumps[0].get_transport()
        assert hop_transport is not None and hop_transport.is_active()
    assert not hop_transport.is_active()  # closing the client closes its hops


@pytest.mark.ssh
def test_proxyjump_two_hops_inline(sshd: SshdInfo, tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    hop = f"{sshd.user}@127.0.0.1:{sshd.port}"
    cfg.write_text(f"Host t\n  HostName 127.0.0.1\n  ProxyJump {hop},ssh://{hop}\n")
    kw = {**sshd.connect_kwargs(), "ssh_config_file": str(cfg)}
    with connect(f"ssh://t:{sshd.port}/", **kw) as client:
        assert len(client.jumps) == 2
        assert _run(client, "echo two")[0] == b"two\n"


@pytest.mark.ssh
def test_proxyjump_target_unreachable(sshd: SshdInfo, tmp_path: Path) -> None:
    cfg = _jump_config(sshd, tmp_path, target_port=_free_port())
    with pytest.raises(ConnectError, match="could not open a tunnel to"):
        connect("target:/", ssh_config_file=str(cfg))


@pytest.mark.ssh
def test_proxycommand(sshd: SshdInfo, tmp_path: Path) -> None:
    relay = tmp_path / "relay.py"
    relay.write_text(
        "import os, select, socket, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
        "while True:\n"
        "    r, _, _ = select.select([0, s], [], [])\n"
        "    if 0 in r:\n"
        "        d = os.read(0, 65536)\n"
        "        if not d: break\n"
        "        s.sendall(d)\n"
        "    if s in r:\n"
        "        d = s.recv(65536)\n"
        "        if not d: break\n"
        "        os.write(1, d)\n"
    )
    cfg = tmp_path / "cfg"
    cfg.write_text(f"Host viaproxy\n  HostName 127.0.0.1\n  ProxyCommand {sys.executable} {relay} %p\n")
    kw = {**sshd.connect_kwargs(), "ssh_config_file": str(cfg)}
    with connect(f"ssh://viaproxy:{sshd.port}/", **kw) as client:
        assert _run(client, "echo proxied")[0] == b"proxied\n"


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    import subprocess

    make_keypair(tmp_path / "k")
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True, check=True)
    blob = base64.b64decode((tmp_path / "k.pub").read_text().split()[1])
    assert fingerprint(blob) == out.stdout.split()[1]


# --- the fixture's own contract -----------------------------------------------------------


def test_start_sshd_reports_missing_sshd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sshd_plugin, "SSHD_CANDIDATES", ("/nonexistent/sshd",))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(_sshd_plugin.SshdUnavailable, match="sshd not found"):
        _sshd_plugin.start_sshd(tmp_path / "s")


@pytest.mark.parametrize(("required", "outcome"), [("1", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_unavailable_sshd_fails_only_when_required(
    monkeypatch: pytest.MonkeyPatch, required: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("DIRSYNC_REQUIRE_SSH", required)
    with pytest.raises(outcome):
        _sshd_plugin._unavailable("test")


@pytest.mark.ssh
def test_extra_sshd_stops_cleanly(tmp_path: Path) -> None:
    info = _sshd_plugin.start_sshd(tmp_path / "s2")
    try:
        client = connect(info.url("/"), **info.connect_kwargs())
        ch = ParamikoChannel(client, "cat >/dev/null")
        time.sleep(0.2)
        kids = info.session_pids()
        assert kids
    finally:
        info.stop()
    assert not os.path.exists(f"/proc/{info.pid}")
    time.sleep(0.2)
    assert [p for p in kids if _alive(p)] == []
    with pytest.raises(ConnectError, match="connection lost"):
        ch.settimeout(5)
        ch.recv(1)
    client.close()


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_match_exec_in_ssh_config_still_runs(tmp_path: Path) -> None:
    """dirsync keeps paramiko from importing `invoke` at start-up (it costs 0.15 s); a config
    with "Match exec" must still be evaluated, with the command really run. (In a child
    process: invoke reads stdin, which pytest captures.)"""
    import subprocess

    flag = tmp_path / "ran"
    cfg = tmp_path / "config"
    code = ("import sys; from dirsync.transport.ssh import load_ssh_config; "
            "print(load_ssh_config(sys.argv[1]).lookup('example.org').get('port'))")

    def port_for(text: str) -> str:
        cfg.write_text(text)
        cp = subprocess.run([sys.executable, "-c", code, str(cfg)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        return cp.stdout.strip()

    assert port_for(f"Match exec \"touch {flag} && true\"\n  Port 2222\n") == "2222"
    assert flag.exists()
    assert port_for("Match exec false\n  Port 2222\n") == "None"


def test_paramiko_import_leaves_no_stand_ins_behind() -> None:
    """dirsync imports paramiko with `invoke` hidden and importlib.metadata stood in for (both
    are slow to import and paramiko needs only the version): afterwards paramiko has its real
    version, and both names import for real. (In a child process: a fresh interpreter.)"""
    import subprocess

    code = ("import sys; import dirsync.transport.ssh as s; "
            "assert 'importlib.metadata' not in sys.modules and 'invoke' not in sys.modules; "
            "assert not hasattr(s.paramiko.metadata, 'distributions'); "  # the stand-in did serve
            "import importlib.metadata as m, invoke, paramiko, paramiko.transport as t; "
            "assert m.version('paramiko') == paramiko.__version__ != '', paramiko.__version__; "
            "assert t.Transport._CLIENT_ID == 'paramiko_' + m.version('paramiko'); "
            "assert hasattr(m, 'distributions') and hasattr(invoke, 'run'); print('ok')")
    cp = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        timeout=60)
    assert cp.returncode == 0 and cp.stdout.strip() == "ok", cp.stderr
