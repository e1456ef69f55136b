"""SSH plumbing: endpoint parsing, ~/.ssh/config, host-key verification, paramiko connect, byte channels.

What this module owns:

* ``parse_endpoint`` turns a command-line replica spec into a Local/RemoteEndpoint.
* ``connect`` opens an authenticated ``paramiko.SSHClient``. Host keys are
  checked by dirsync itself (``KnownHosts``), never by paramiko's own
  known_hosts code: that loader fails on ``@revoked`` lines and its save
  truncates the user's file. The policy is reject-by-default; trust on first
  use happens only with ``accept_new_host_key=True`` and is written to
  dirsync's own known_hosts file, never to ``~/.ssh/known_hosts``.
* ``Channel`` is the byte pipe RemoteTransport speaks ``wire`` over:
  ``ParamikoChannel`` (a command run over SSH) and ``SubprocessChannel`` (a
  local process; used by tests and as the no-sshd path). Both fail in bounded
  time on a dead link once ``settimeout`` is set.

Supported ``ssh_config`` keywords: HostName, User, Port, IdentityFile,
IdentitiesOnly, UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias,
ProxyJump (any number of hops), ProxyCommand, StrictHostKeyChecking
(``accept-new``/``no`` both mean "accept new keys", a changed key is always
refused), ConnectTimeout, ServerAliveInterval. ``Include`` and
``@cert-authority`` are not supported.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno as _errno
import fcntl
import getpass
import hashlib
import hmac
import os
import re
import shlex
import socket
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import sys
import types

from dirsync.imports import import_hiding, stand_in
from dirsync.record import Record
from dirsync.transport.pipe import STDERR_KEEP, SubprocessChannel, _lost  # (SubprocessChannel: re-exported)

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Any


def _dist_version(name: str) -> str:
    """A distribution's version from its .dist-info folder name (what importlib.metadata would
    find first on sys.path); raises LookupError when there is none."""
    prefix = name.replace("-", "_").lower() + "-"
    for d in sys.path:
        try:
            names = os.listdir(d or ".")
        except OSError:
            continue
        for n in names:
            if n.endswith(".dist-info") and n.lower().startswith(prefix):
                return n[len(prefix):-len(".dist-info")]
    raise LookupError(name)


def _import_paramiko() -> types.ModuleType:
    """Import paramiko without two costly imports it makes on the way (this is on the critical
    path of every SSH run): paramiko.config imports `invoke` (~0.15 s here) only to run
    ssh_config's "Match exec" (SshConfig.lookup fetches it when a config uses exec), and
    paramiko/__init__ imports importlib.metadata (~40 ms: email, zipfile, csv...) only for
    metadata.version("paramiko"), answered here from the .dist-info folder name."""
    return import_hiding("paramiko", {"invoke": None,
                                      "importlib.metadata": stand_in("importlib.metadata", version=_dist_version)})


paramiko = _import_paramiko()

from dirsync.errors import ConfigError, ConnectError

__all__ = [
    "Channel",
    "ConfigError",
    "ConnectError",
    "DirsyncSSHClient",
    "KnownHosts",
    "LocalEndpoint",
    "ParamikoChannel",
    "RemoteEndpoint",
    "SubprocessChannel",
    "connect",
    "dirsync_known_hosts_path",
    "host_key_name",
    "parse_endpoint",
    "remote_command",
]

DEFAULT_PORT = 22
# Measured on loopback (paramiko 5.1 <-> OpenSSH 9.2, 100 MiB through `cat`/`head`):
# upload ~108 MiB/s for aes128-ctr+hmac-sha2-256 and aes128-gcm alike, download
# ~70-100 MiB/s with ctr vs ~120-180 MiB/s with gcm (AEAD skips paramiko's
# separate MAC pass). aes256-ctr was slower. paramiko lists gcm last by default.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

# Receive window for our session channels. Bigger is not better here: paramiko
# buffers unread data in an array and every partial read shifts the whole
# buffer, so 16 MiB with 32 KiB packets fell to 17-55 MiB/s when the reader
# lagged; 4 MiB with 128 KiB packets measured 100-150 MiB/s (2 MiB default: 70-180).
CHANNEL_WINDOW = 4 * 1024 * 1024
SEND_PIECE = 32 * 1024  # at most this (or the peer's larger packet size) copied per channel send
CHANNEL_MAX_PACKET = 128 * 1024
MAX_JUMP_DEPTH = 8


# ---------------------------------------------------------------------------
# Endpoints


class LocalEndpoint(Record):
    """A replica on this machine."""

    _fields = ("path",)
    __slots__ = _fields

    def __init__(self, path: str) -> None:
        self.path = path


class RemoteEndpoint(Record):
    """A replica reached over SSH. ``user``/``port`` are None when not given (ssh_config or defaults decide).

    ``path`` is absolute, or relative to the login's home directory ("." is the home itself).
    """

    _fields = ("user", "host", "port", "path")
    __slots__ = _fields

    def __init__(self, user: str | None, host: str, port: int | None, path: str) -> None:
        self.user = user
        self.host = host
        self.port = port
        self.path = path

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        if self.path.startswith("/"):
            return f"ssh://{user}{host}{port}{self.path}"
        return f"ssh://{user}{host}{port}/~/{self.path}" if self.path != "." else f"ssh://{user}{host}{port}/~"


Endpoint = LocalEndpoint | RemoteEndpoint

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BRACKET_RE = re.compile(r"^(?:(?P<user>[^/]*)@)?\[(?P<host>[^\]/]*)\]:(?P<path>.*)$", re.S)


def parse_endpoint(spec: str) -> LocalEndpoint | RemoteEndpoint:
    """Parse a replica spec.

    * ``ssh://[user@]host[:port][/path]``; ``host`` may be ``[ipv6]``. The path
      is absolute (``/srv/x``); ``/~/x`` or ``/~`` mean the login's home.
    * ``[user@]host:path`` (scp style). rsync's rule: it is remote only when a
      colon comes before any slash, so ``./a:b`` and ``/a:b`` are local.
      ``[ipv6]:path`` works; an empty path (``host:``) means the home directory.
      A leading ``~/`` is the home directory too.
    * anything else is a local path, returned verbatim.

    Raises ``ConfigError`` for an empty spec, an empty or option-like host, a
    bad port, an unknown URL scheme, or rsync daemon syntax (``host::mod``).
    """
    if not spec:
        raise ConfigError("empty replica path")
    m = _SCHEME_RE.match(spec)
    if m:
        if m.group(1).lower() != "ssh":
            raise ConfigError(f"unsupported URL scheme {m.group(1)!r} in {spec!r}", hint="use ssh://… or a path")
        return _parse_ssh_url(spec, spec[m.end() :])
    m = _BRACKET_RE.match(spec)
    if m:
        return _remote(spec, m.group("user"), m.group("host"), None, m.group("path"))
    if spec.startswith("["):
        return LocalEndpoint(spec)
    colon = spec.find(":")
    slash = spec.find("/")
    if colon <= 0 or (0 <= slash < colon):
        return LocalEndpoint(spec)
    userhost, path = spec[:colon], spec[colon + 1 :]
    if path.startswith(":"):
        raise ConfigError(f"rsync daemon syntax is not supported: {spec!r}", hint="use host:path or ssh://host/path")
    user, sep, host = userhost.rpartition("@")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return _remote(spec, user if sep else None, host, None, path)


def _parse_ssh_url(spec: str, rest: str) -> RemoteEndpoint:
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    userinfo, sep, hostport = authority.rpartition("@")
    user = userinfo if sep else None
    port: int | None = None
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise ConfigError(f"unterminated '[' in {spec!r}")
        host, tail = hostport[1:close], hostport[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise ConfigError(f"unexpected {tail!r} after ']' in {spec!r}")
            port = _parse_port(tail[1:], spec)
    else:
        host, csep, port_s = hostport.partition(":")
        if csep:
            port = _parse_port(port_s, spec)
    if path in ("", "/~") or path == "/~/":
        path = "."
    elif path.startswith("/~/"):
        path = path[3:]
    return _remote(spec, user, host, port, path)


def _parse_port(s: str, spec: str) -> int:
    if not s.isdigit() or not 0 < int(s) < 65536:
        raise ConfigError(f"bad port {s!r} in {spec!r}")
    return int(s)


def _remote(spec: str, user: str | None, host: str, port: int | None, path: str) -> RemoteEndpoint:
    if user is not None and not user:
        raise ConfigError(f"empty user name in {spec!r}")
    if not host:
        raise ConfigError(f"empty host name in {spec!r}")
    if host.startswith("-") or any(c.isspace() for c in host) or (user and user.startswith("-")):
        raise ConfigError(f"invalid host or user name in {spec!r}")
    if path in ("", "~", "~/"):
        path = "."
    elif path.startswith("~/"):
        path = path[2:]
    return RemoteEndpoint(user=user, host=host, port=port, path=path)


def remote_command(argv: Sequence[str]) -> str:
    """Quote ``argv`` into one command line for the remote login shell (what exec_command takes)."""
    return shlex.join(argv)


# ---------------------------------------------------------------------------
# Known hosts


def dirsync_known_hosts_path() -> str:
    """dirsync's own known_hosts: ``$XDG_STATE_HOME/dirsync/known_hosts`` (default ``~/.local/state/...``).
    (Paths here are plain strings: pathlib costs every SSH run ~10 ms of imports.)"""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "dirsync", "known_hosts")


def host_key_name(host: str, port: int) -> str:
    """The name OpenSSH files a host key under: ``host`` on port 22, else ``[host]:port``."""
    host = host.lower()
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def fingerprint(blob: bytes) -> str:
    """OpenSSH-style ``SHA256:…`` fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class KnownHostEntry(Record):
    """One parsed known_hosts line."""

    _fields = ("source", "marker", "patterns", "keytype", "blob")
    __slots__ = _fields

    def __init__(
        self,
        source: str,  # "path:lineno", for messages
        marker: str | None,  # None, "@revoked" or "@cert-authority"
        patterns: tuple[str, ...],
        keytype: str,
        blob: bytes,
    ) -> None:
        self.source = source
        self.marker = marker
        self.patterns = patterns
        self.keytype = keytype
        self.blob = blob

    def matches(self, name: str) -> bool:
        """OpenSSH host matching: comma list, ``*``/``?`` wildcards, ``!`` negation, ``|1|`` hashed names."""
        name = name.lower()
        hit = False
        for pat in self.patterns:
            neg = pat.startswith("!")
            if neg:
                pat = pat[1:]
            if _pattern_matches(pat, name):
                if neg:
                    return False
                hit = True
        return hit


def _pattern_matches(pat: str, name: str) -> bool:
    if pat.startswith("|1|"):
        parts = pat.split("|")
        if len(parts) != 4:
            return False
        try:
            salt = base64.b64decode(parts[2], validate=True)
            want = base64.b64decode(parts[3], validate=True)
        except (binascii.Error, ValueError):
            return False
        got = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(got, want)
    pat = pat.lower()
    if "*" not in pat and "?" not in pat:
        return pat == name
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pat)
    return re.fullmatch(rx, name) is not None


def _blob_type(blob: bytes) -> str | None:
    if len(blob) < 4:
        return None
    n = int.from_bytes(blob[:4], "big")
    if n > 64 or len(blob) < 4 + n:
        return None
    try:
        return blob[4 : 4 + n].decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_known_hosts(text: str, source: str) -> list[KnownHostEntry]:
    """Parse known_hosts text, skipping (not failing on) any line that is not understood."""
    out: list[KnownHostEntry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = None
        if fields[0].startswith("@"):
            marker = fields[0].lower()
            if marker not in ("@revoked", "@cert-authority"):
                continue
            fields = fields[1:]
        if len(fields) < 3:
            continue
        patterns, keytype, b64 = fields[0], fields[1], fields[2]
        try:
            blob = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            continue
        if _blob_type(blob) != keytype:
            continue
        out.append(KnownHostEntry(f"{source}:{lineno}", marker, tuple(p for p in patterns.split(",") if p), keytype, blob))
    return out


def _rsa_family(keytype: str) -> tuple[str, ...]:
    return ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa") if keytype == "ssh-rsa" else (keytype,)


class KnownHosts:
    """Host keys from several known_hosts files, plus dirsync's own file that new keys are added to.

    Verification (``verify``), for a server key K presented under name N:

    1. K is listed ``@revoked`` for N → refused.
    2. K is listed for N → accepted.
    3. N has other keys listed → refused as CHANGED (even with accept_new).
    4. N is unknown → refused, unless accept_new, which appends N K to the own file.
    """

    def __init__(self, files: Iterable[str | os.PathLike[str]], own_file: str | os.PathLike[str]) -> None:
        self.own_file = os.fspath(own_file)
        self.files = [os.fspath(f) for f in files]
        if self.own_file not in self.files:
            self.files.append(self.own_file)
        self.entries: list[KnownHostEntry] = []
        for f in self.files:
            self.entries.extend(self._load(f))

    @staticmethod
    def _load(path: str) -> list[KnownHostEntry]:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return []
        except OSError as e:
            raise ConnectError(f"cannot read known_hosts file {path}: {e.strerror}") from e
        return parse_known_hosts(data.decode("utf-8", "replace"), str(path))

    def known_key_types(self, name: str) -> list[str]:
        """Key types listed (not revoked) for ``name``, as paramiko host-key algorithm names."""
        out: list[str] = []
        for e in self.entries:
            if e.marker is None and e.matches(name):
                out.extend(t for t in _rsa_family(e.keytype) if t not in out)
        return out

    def verify(self, name: str, key: paramiko.PKey, *, accept_new: bool, label: str) -> None:
        """Accept ``key`` for ``name`` or raise ``ConnectError`` (see the class docstring)."""
        blob = key.asbytes()
        keytype = key.get_name()
        fp = f"{keytype} {fingerprint(blob)}"
        matching = [e for e in self.entries if e.matches(name)]
        for e in matching:
            if e.marker == "@revoked" and e.blob == blob:
                raise ConnectError(
                    f"host key for {name} ({fp}) is marked @revoked in {e.source}; refusing to connect to {label}",
                    hint="the server's key was revoked on purpose; ask its administrator",
                )
        plain = [e for e in matching if e.marker is None]
        if any(e.blob == blob for e in plain):
            return
        if plain:
            old = next((e for e in plain if e.keytype == keytype), plain[0])
            raise ConnectError(
                f"HOST KEY CHANGED for {name}: {label} presented {fp}, but {old.source} has "
                f"{old.keytype} {fingerprint(old.blob)}; refusing to connect (possible man-in-the-middle)",
                hint=f"if the change is expected, remove the old entry: ssh-keygen -R '{name}' -f "
                f"{old.source.rsplit(':', 1)[0]}",
            )
        if not accept_new:
            ca = " (@cert-authority entries are not supported)" if matching else ""
            raise ConnectError(
                f"unknown host key for {name} ({fp}){ca}; verify it, then rerun with "
                f"--accept-new-host-key to trust it",
                hint=f"or add it yourself: ssh-keyscan -p PORT HOST >> {self.own_file}",
            )
        self.add(name, key)

    def add(self, name: str, key: paramiko.PKey) -> None:
        """Append ``name key`` to the own known_hosts file: lock, temp file, fsync, rename."""
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        path = self.own_file
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            with open(path + ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    with open(path, "rb") as f:
                        old = f.read()
                except FileNotFoundError:
                    old = b""
                if old and not old.endswith(b"\n"):
                    old += b"\n"
                fd, tmp = tempfile.mkstemp(dir=parent, prefix=".known_hosts.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(old + line.encode())
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise ConnectError(f"cannot record the host key for {name} in {path}: {e.strerror or e}") from e
        self.entries.extend(parse_known_hosts(line, str(path)))


class _VerifyPolicy(paramiko.RejectPolicy):
    """Reject unless ``KnownHosts.verify`` accepts.

    The SSHClient is given no host keys of its own, so paramiko calls this
    policy for every server key and all checking happens in ``KnownHosts``.
    """

    def __init__(self, known: KnownHosts, name: str, accept_new: bool, label: str) -> None:
        self.known, self.name, self.accept_new, self.label = known, name, accept_new, label

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known.verify(self.name, key, accept_new=self.accept_new, label=self.label)


# ---------------------------------------------------------------------------
# ssh_config


class HostSettings(Record):
    """Connection settings for one host after applying ssh_config and explicit arguments."""

    _fields = (
        "alias", "hostname", "port", "user", "identity_files", "identities_only", "known_hosts_files",
        "host_key_alias", "proxy_jump", "proxy_command", "accept_new", "connect_timeout", "keepalive",
    )
    __slots__ = _fields

    def __init__(
        self,
        alias: str,
        hostname: str,
        port: int,
        user: str,
        identity_files: tuple[str, ...],
        identities_only: bool,
        known_hosts_files: tuple[str, ...],
        host_key_alias: str | None,
        proxy_jump: str | None,
        proxy_command: str | None,
        accept_new: bool,
        connect_timeout: float | None,
        keepalive: int | None,
    ) -> None:
        self.alias = alias
        self.hostname = hostname
        self.port = port
        self.user = user
        self.identity_files = identity_files
        self.identities_only = identities_only
        self.known_hosts_files = known_hosts_files
        self.host_key_alias = host_key_alias
        self.proxy_jump = proxy_jump
        self.proxy_command = proxy_command
        self.accept_new = accept_new
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive

    @property
    def label(self) -> str:
        base = f"{self.user}@{self.hostname}:{self.port}"
        return base if self.alias == self.hostname else f"{base} ({self.alias})"

    @property
    def key_name(self) -> str:
        return self.host_key_alias or host_key_name(self.hostname, self.port)


class SshConfig:
    """An ssh_config file's text; ``lookup`` applies it to one host with explicit overrides.

    Overrides are injected as a leading ``Host <alias>`` block (ssh_config is
    first-match-wins), so tokens such as ``%p``/``%r`` in ProxyCommand expand to
    the port and user actually used, as with ``ssh -p``/``-l``.
    """

    def __init__(self, text: str = "", source: str = "<none>") -> None:
        self.text = text
        self.source = source
        self.lookup("localhost")  # report syntax errors now, not at the first connect

    def lookup(self, alias: str, *, port: int | None = None, user: str | None = None) -> paramiko.SSHConfigDict:
        head = ""
        if port is not None:
            head += f"  Port {port}\n"
        if user is not None and not any(c.isspace() or c == '"' for c in user):
            head += f"  User {user}\n"
        text = (f"Host {alias}\n" + head + self.text) if head else self.text
        try:
            if _MATCH_EXEC.search(text) and paramiko.config.invoke is None:
                import invoke  # what "Match exec" runs commands with (see the import above)

                paramiko.config.invoke = invoke
            return paramiko.SSHConfig.from_text(text).lookup(alias)
        except paramiko.ssh_exception.ConfigParseError as e:
            raise ConfigError(f"cannot parse ssh config {self.source}: {e}") from e


_MATCH_EXEC = re.compile(r"^\s*match\b.*\bexec\b", re.IGNORECASE | re.MULTILINE)


def load_ssh_config(path: str | os.PathLike[str] | None) -> SshConfig:
    """Read ``path`` (default ``~/.ssh/config`` if it exists). Raises ``ConfigError`` if it cannot be read or parsed."""
    explicit = path is not None
    p = os.fspath(path) if path is not None else os.path.expanduser("~/.ssh/config")
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"ssh config file not found: {p}") from None
        return SshConfig()
    except OSError as e:
        raise ConfigError(f"cannot read ssh config {p}: {e.strerror}") from e
    return SshConfig(text, str(p))


def _files(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(os.path.expanduser(v) for v in shlex.split(value) if v.lower() != "none")


def resolve_host(
    cfg: SshConfig,
    alias: str,
    *,
    user: str | None = None,
    port: int | None = None,
    identity: str | None = None,
    known_hosts_files: Sequence[str | os.PathLike[str]] | None = None,
) -> HostSettings:
    """Apply ssh_config to ``alias``; explicit arguments win over the config, the config over defaults."""
    o = cfg.lookup(alias, port=port, user=user)
    try:
        cfg_port = int(o["port"]) if "port" in o else None
    except ValueError:
        raise ConfigError(f"bad Port {o['port']!r} for host {alias} in ssh config") from None
    real_port = port or cfg_port or DEFAULT_PORT
    if not 0 < real_port < 65536:
        raise ConfigError(f"bad port {real_port} for host {alias}")
    ids: list[str] = []
    if identity is not None:
        ids.append(os.path.expanduser(str(identity)))
    ids.extend(os.path.expanduser(i) for i in o.get("identityfile", []))
    if known_hosts_files is not None:
        kh = tuple(str(f) for f in known_hosts_files)
    else:
        kh = _files(o.get("userknownhostsfile")) or (os.path.expanduser("~/.ssh/known_hosts"),)
        kh += _files(o.get("globalknownhostsfile")) or ("/etc/ssh/ssh_known_hosts",)
    strict = str(o.get("stricthostkeychecking", "")).lower()
    jump = o.get("proxyjump")
    if jump and jump.lower() == "none":
        jump = None

    def _num(key: str) -> int | None:
        try:
            return int(o[key]) if key in o else None
        except ValueError:
            raise ConfigError(f"bad {key} {o[key]!r} for host {alias} in ssh config") from None

    return HostSettings(
        alias=alias,
        hostname=o.get("hostname", alias),
        port=real_port,
        user=user or o.get("user") or getpass.getuser(),
        identity_files=tuple(ids),
        identities_only=str(o.get("identitiesonly", "no")).lower() == "yes",
        known_hosts_files=kh,
        host_key_alias=o.get("hostkeyalias"),
        proxy_jump=jump,
        proxy_command=o.get("proxycommand"),
        accept_new=strict in ("accept-new", "no", "off"),
        connect_timeout=_num("connecttimeout"),
        keepalive=_num("serveraliveinterval"),
    )


def _parse_hop(hop: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` (one ProxyJump element)."""
    spec = hop.strip()
    if not spec:
        raise ConfigError("empty ProxyJump host")
    if spec.lower().startswith("ssh://"):
        ep = _parse_ssh_url(spec, spec[6:])
        return ep.user, ep.host, ep.port
    user, sep, hostport = spec.rpartition("@")
    if hostport.startswith("["):
        close = hostport.find("]")
        host, tail = hostport[1:close], hostport[close + 1 :]
        port = _parse_port(tail[1:], hop) if tail.startswith(":") else None
    else:
        host, csep, p = hostport.partition(":")
        port = _parse_port(p, hop) if csep else None
    if not host or host.startswith("-"):
        raise ConfigError(f"bad ProxyJump host {hop!r}")
    return (user if sep else None), host, port


# ---------------------------------------------------------------------------
# Connecting


class DirsyncSSHClient(paramiko.SSHClient):
    """An SSHClient that also owns the jump-host clients it was tunnelled through."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.jumps: list[paramiko.SSHClient] = []

    def close(self) -> None:
        try:
            super().close()
        finally:
            while self.jumps:
                self.jumps.pop().close()


def _prefer(current: Sequence[str], first: Sequence[str]) -> tuple[str, ...]:
    head = [x for x in first if x in current]
    return tuple(head + [x for x in current if x not in head])


class _Options(Record):
    _fields = (
        "cfg", "known_hosts_files", "accept_new", "connect_timeout", "keepalive", "compress", "identity",
        "own_known_hosts",
    )

    def __init__(
        self,
        cfg: SshConfig,
        known_hosts_files: Sequence[str | os.PathLike[str]] | None,
        accept_new: bool,
        connect_timeout: float,
        keepalive: int,
        compress: bool = False,
        identity: str | None = None,
        own_known_hosts: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.known_hosts_files = known_hosts_files
        self.accept_new = accept_new
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.compress = compress
        self.identity = identity
        self.own_known_hosts = dirsync_known_hosts_path() if own_known_hosts is None else own_known_hosts


def connect(
    ep: RemoteEndpoint | str,
    *,
    port: int | None = None,
    identity: str | os.PathLike[str] | None = None,
    ssh_config_file: str | os.PathLike[str] | None = None,
    known_hosts_files: Sequence[str | os.PathLike[str]] | None = None,
    accept_new_host_key: bool = False,
    connect_timeout: float = 10,
    keepalive: int = 15,
    compress: bool = False,
) -> DirsyncSSHClient:
    """Open an authenticated SSH connection to ``ep`` and return the client (the caller closes it).

    * ``ssh_config_file``: default ``~/.ssh/config`` if present (see the module
      docstring for the keywords honoured).
    * ``known_hosts_files``: default the config's UserKnownHostsFile (else
      ``~/.ssh/known_hosts``) and GlobalKnownHostsFile (else
      ``/etc/ssh/ssh_known_hosts``). dirsync's own file
      (``dirsync_known_hosts_path()``) is always consulted as well.
    * ``compress``: zlib compression on the SSH transport (worth it only on slow links).
    * ``accept_new_host_key``: trust an unknown host key and record it in
      dirsync's own known_hosts. A changed or revoked key is always refused.
    * Authentication: ``identity``, then the config's IdentityFile entries,
      then the SSH agent and ``~/.ssh/id_*`` (those two unless IdentitiesOnly).
      ProxyJump hops are resolved the same way (``identity`` is offered to them too).

    Raises ``ConnectError`` (one line naming user@host:port) for DNS failure,
    refused/unreachable port, timeout, an unknown, changed or revoked host key,
    and authentication failure; ``ConfigError`` for an unreadable ssh config or
    a missing identity file.
    """
    if isinstance(ep, str):
        parsed = parse_endpoint(ep)
        if not isinstance(parsed, RemoteEndpoint):
            raise ConfigError(f"not a remote endpoint: {ep!r}")
        ep = parsed
    if identity is not None and not os.path.exists(os.path.expanduser(str(identity))):
        raise ConfigError(f"identity file not found: {identity}")
    opts = _Options(
        cfg=load_ssh_config(ssh_config_file),
        identity=str(identity) if identity is not None else None,
        known_hosts_files=known_hosts_files,
        accept_new=accept_new_host_key,
        connect_timeout=connect_timeout,
        keepalive=keepalive,
        compress=compress,
    )
    settings = resolve_host(
        opts.cfg,
        ep.host,
        user=ep.user,
        port=port or ep.port,
        identity=str(identity) if identity is not None else None,
        known_hosts_files=known_hosts_files,
    )
    return _connect_host(settings, opts, via=None, depth=0)


def _connect_host(
    s: HostSettings, opts: _Options, *, via: paramiko.SSHClient | None, depth: int
) -> DirsyncSSHClient:
    timeout = opts.connect_timeout if s.connect_timeout is None else min(opts.connect_timeout, s.connect_timeout)
    client = DirsyncSSHClient(s.label)
    try:
        sock: Any = None
        if via is not None:
            sock = _direct_tcpip(via, s, timeout)
        elif s.proxy_jump:
            if depth >= MAX_JUMP_DEPTH:
                raise ConnectError(f"too many ProxyJump hops (more than {MAX_JUMP_DEPTH}) reaching {s.label}")
            prev: paramiko.SSHClient | None = None
            for hop in s.proxy_jump.split(","):
                huser, hhost, hport = _parse_hop(hop)
                hs = resolve_host(
                    opts.cfg,
                    hhost,
                    user=huser,
                    port=hport,
                    identity=opts.identity,
                    known_hosts_files=opts.known_hosts_files,
                )
                prev = _connect_host(hs, opts, via=prev, depth=depth + 1)
                client.jumps.append(prev)
            assert prev is not None
            sock = _direct_tcpip(prev, s, timeout)
        elif s.proxy_command:
            try:
                sock = paramiko.ProxyCommand(s.proxy_command)
            except (paramiko.ssh_exception.ProxyCommandFailure, OSError) as e:
                raise ConnectError(f"ProxyCommand for {s.label} failed: {e}") from e
        _handshake(client, s, opts, sock, timeout)
    except BaseException:
        client.close()
        raise
    return client


def _direct_tcpip(via: paramiko.SSHClient, s: HostSettings, timeout: float) -> paramiko.Channel:
    t = via.get_transport()
    if t is None or not t.is_active():
        raise ConnectError(f"jump host connection closed before reaching {s.label}")
    try:
        return t.open_channel("direct-tcpip", (s.hostname, s.port), ("127.0.0.1", 0), timeout=timeout)
    except (paramiko.SSHException, OSError, EOFError) as e:
        jl = getattr(via, "label", "jump host")
        raise ConnectError(f"jump host {jl} could not open a tunnel to {s.label}: {e or type(e).__name__}") from e


def _handshake(client: DirsyncSSHClient, s: HostSettings, opts: _Options, sock: Any, timeout: float) -> None:
    known = KnownHosts(s.known_hosts_files, opts.own_known_hosts)
    key_name = s.key_name
    known_types = known.known_key_types(key_name)
    client.set_missing_host_key_policy(_VerifyPolicy(known, key_name, opts.accept_new or s.accept_new, s.label))

    def transport_factory(sock: Any, disabled_algorithms: Any = None) -> paramiko.Transport:
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The handshake sends small packets back to back; with Nagle's algorithm on, one sent
            # while the one before was unacknowledged waited for the peer's delayed ACK: ~40 ms
            # in the key exchange and again in the auth (connect: 115 -> ~30 ms on loopback).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = paramiko.Transport(
            sock,
            disabled_algorithms=disabled_algorithms,
            default_window_size=CHANNEL_WINDOW,
            default_max_packet_size=CHANNEL_MAX_PACKET,
        )
        sec = t.get_security_options()
        sec.ciphers = _prefer(sec.ciphers, FAST_CIPHERS)
        if known_types:
            # Ask for a key type we can verify (what OpenSSH does): a server with
            # both ed25519 and RSA keys must not be judged "changed" because it
            # offered the type we do not have on file.
            sec.key_types = _prefer(sec.key_types, [k for k in known_types if k in t._key_info])
        return t

    key_files = [f for f in s.identity_files if os.path.exists(f)]
    missing = [f for f in s.identity_files if not os.path.exists(f)]
    label = s.label
    try:
        client.connect(
            s.hostname,
            port=s.port,
            username=s.user,
            key_filename=key_files or None,
            allow_agent=not s.identities_only,
            look_for_keys=not s.identities_only,
            timeout=timeout,
            compress=opts.compress,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            sock=sock,
            transport_factory=transport_factory,
        )
    except ConnectError:
        raise
    except paramiko.BadHostKeyException as e:  # pragma: no cover - our policy handles keys first
        raise ConnectError(f"host key mismatch for {label}: {e}") from e
    except paramiko.AuthenticationException as e:
        tried = ", ".join(key_files) or "no key files"
        extra = "" if s.identities_only else " and the SSH agent / ~/.ssh/id_* keys"
        raise ConnectError(
            f"authentication failed for {label} (tried {tried}{extra})",
            hint="check the user name and that your public key is in the remote authorized_keys"
            + (f"; missing identity files: {', '.join(missing)}" if missing else ""),
        ) from e
    except socket.gaierror as e:
        raise ConnectError(f"cannot resolve host name {s.hostname!r} for {label}: {e.strerror}") from e
    except paramiko.ssh_exception.NoValidConnectionsError as e:
        if {x.errno for x in e.errors.values()} == {_errno.ECONNREFUSED}:
            raise ConnectError(f"connection refused by {label} (no SSH server listening?)") from e
        raise ConnectError(f"host unreachable: {label}") from e
    except (socket.timeout, TimeoutError) as e:
        raise ConnectError(f"timed out after {timeout:g} s connecting to {label}") from e
    except paramiko.SSHException as e:
        msg = str(e)
        if "No authentication methods available" in msg:
            raise ConnectError(
                f"authentication failed for {label}: no SSH key to offer",
                hint="pass --identity, set IdentityFile in ~/.ssh/config, or start an SSH agent",
            ) from e
        if msg in ("No existing session", "Negotiation failed."):
            # start_client() gave up at `timeout` before the server finished the key exchange
            raise ConnectError(f"timed out after {timeout:g} s in the SSH handshake with {label}") from e
        if "banner" in msg.lower():
            raise ConnectError(f"no SSH server answered at {label} within {timeout:g} s ({msg})") from e
        raise ConnectError(f"SSH handshake with {label} failed: {msg or type(e).__name__}") from e
    except EOFError as e:
        raise ConnectError(f"{label} closed the connection during the SSH handshake") from e
    except OSError as e:
        raise ConnectError(f"cannot connect to {label}: {e.strerror or e}") from e
    t = client.get_transport()
    assert t is not None
    ka = s.keepalive or opts.keepalive
    if ka:
        t.set_keepalive(ka)


# ---------------------------------------------------------------------------
# Channels


class Channel:
    """(An interface.) A bidirectional byte pipe to a remote agent (stdin/stdout of a command).

    All methods raise ``ConnectError("connection lost to …")`` when the link
    breaks or, after ``settimeout(s)``, when no progress is possible for ``s``
    seconds.
    """

    label: str

    def send(self, data: bytes) -> None:
        """Send all of ``data``."""

    def recv(self, n: int) -> bytes:
        """Return 1..n bytes, or b"" when the peer closed its output (EOF)."""

    def send_eof(self) -> None:
        """Close our sending side; the peer reads EOF."""

    def settimeout(self, seconds: float | None) -> None:
        """Bound each send/recv to ``seconds`` (None: wait forever)."""

    def stderr_text(self) -> str:
        """What the peer has written to stderr so far (the last 64 KiB), for error messages."""

    def exit_status(self) -> int | None:
        """The remote command's exit status, or None if it has not exited (yet)."""

    def close(self) -> None:
        """Release the pipe (and stop the command if it is still running)."""


def _closed() -> int:
    raise EOFError("the channel was closed")


class ParamikoChannel:
    """``command`` run over an SSH session channel; its stdin/stdout are the pipe.

    The session is opened with a larger receive window than paramiko's default
    (see ``CHANNEL_WINDOW``) so manifests from the agent stream with fewer stalls.
    """

    def __init__(
        self,
        client: paramiko.SSHClient,
        command: str,
        *,
        label: str | None = None,
        owns_client: bool = False,
        window_size: int = CHANNEL_WINDOW,
        max_packet_size: int = CHANNEL_MAX_PACKET,
        open_timeout: float = 30,
    ) -> None:
        self.label = label or getattr(client, "label", "remote host")
        self._client = client
        self._owns_client = owns_client
        self._timeout: float | None = None
        self._stderr = bytearray()
        t = client.get_transport()
        if t is None or not t.is_active():
            raise _lost(self.label, "SSH transport is closed")
        try:
            self._chan = t.open_session(window_size=window_size, max_packet_size=max_packet_size, timeout=open_timeout)
            self._chan.settimeout(open_timeout)
            self._chan.exec_command(command)
            self._chan.settimeout(None)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise _lost(self.label, f"cannot start remote command: {e or type(e).__name__}") from e

    def settimeout(self, seconds: float | None) -> None:
        self._timeout = seconds
        self._chan.settimeout(seconds)

    def send(self, data: bytes) -> None:
        """Send all of `data`, one packet's worth at a time. (paramiko's sendall slices the
        rest of its argument after every packet: a copy of what is left each 32 KiB, so a
        4 MiB buffer cost 256 MiB of copying; it held bulk uploads near 50 MB/s here.)"""
        chan = self._chan
        try:
            if len(data) <= SEND_PIECE:
                chan.sendall(data)
                return
            view = memoryview(data)
            pos, end = 0, len(data)
            n = max(SEND_PIECE, getattr(chan, "out_max_packet_size", 0) or 0)
            while pos < end:
                pos += chan.send(bytes(view[pos:pos + n])) or _closed()
        except (socket.timeout, TimeoutError) as e:
            raise _lost(self.label, f"could not send for {self._timeout:g} s", self.stderr_text()) from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _lost(self.label, f"send failed: {e or type(e).__name__}", self.stderr_text()) from e

    def recv(self, n: int) -> bytes:
        try:
            data: bytes = self._chan.recv(n)
        except (socket.timeout, TimeoutError) as e:
            raise _lost(self.label, f"no data for {self._timeout:g} s", self.stderr_text()) from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise _lost(self.label, f"receive failed: {e or type(e).__name__}", self.stderr_text()) from e
        self._drain_stderr()
        if not data:
            t = self._chan.get_transport()
            if t is None or not t.is_active():
                raise _lost(self.label, "SSH connection closed", self.stderr_text())
        return data

    def send_eof(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._chan.shutdown_write()

    def _drain_stderr(self) -> None:
        # Unread stderr still counts against the channel window, so keep it drained.
        while self._chan.recv_stderr_ready():
            self._stderr += self._chan.recv_stderr(65536)
            if len(self._stderr) > STDERR_KEEP:
                del self._stderr[: len(self._stderr) - STDERR_KEEP]

    def stderr_text(self) -> str:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._drain_stderr()
        return self._stderr.decode("utf-8", "replace")

    def exit_status(self) -> int | None:
        if self._chan.exit_status_ready():
            return int(self._chan.recv_exit_status())
        return None

    def close(self) -> None:
        try:
            self._chan.close()
        finally:
            if self._owns_client:
                self._client.close()

    def __enter__(self) -> ParamikoChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_frames_from(chan: Channel, decoder: Any, bufsize: int = 256 * 1024) -> Iterator[Any]:
    """Yield decoded messages from ``chan`` until EOF (helper for agent/remote; ``decoder`` is a wire.FrameDecoder).

    At EOF a cut-short frame raises ``ProtocolError`` via ``decoder.check_eof()``.
    """
    while True:
        data = chan.recv(bufsize)
        if not data:
            decoder.check_eof()
            return
        yield from decoder.feed(data)
