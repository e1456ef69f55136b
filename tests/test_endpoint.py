"""parse_endpoint: local vs remote (rsync's colon rule), ssh:// URLs, scp style, IPv6, home-relative paths."""

from __future__ import annotations

import pytest

from dirsync.errors import ConfigError
from dirsync.transport.ssh import LocalEndpoint, RemoteEndpoint, parse_endpoint


def R(user: str | None, host: str, port: int | None, path: str) -> RemoteEndpoint:
    return RemoteEndpoint(user=user, host=host, port=port, path=path)


CASES = [
    # local paths
    ("/srv/data", LocalEndpoint("/srv/data")),
    ("data", LocalEndpoint("data")),
    ("./host:x", LocalEndpoint("./host:x")),
    ("/a:b", LocalEndpoint("/a:b")),
    ("a/b:c", LocalEndpoint("a/b:c")),
    (":x", LocalEndpoint(":x")),
    ("[notclosed", LocalEndpoint("[notclosed")),
    ("[x]/y", LocalEndpoint("[x]/y")),
    # scp style
    ("host:path", R(None, "host", None, "path")),
    ("host:/abs/path", R(None, "host", None, "/abs/path")),
    ("host:", R(None, "host", None, ".")),
    ("host:~", R(None, "host", None, ".")),
    ("host:~/x/y", R(None, "host", None, "x/y")),
    ("bob@host:dir/sub", R("bob", "host", None, "dir/sub")),
    ("bob@host:a:b", R("bob", "host", None, "a:b")),
    ("me@corp@host:x", R("me@corp", "host", None, "x")),
    ("host:with/slash:colon", R(None, "host", None, "with/slash:colon")),
    ("[::1]:data", R(None, "::1", None, "data")),
    ("[fe80::1%eth0]:/d", R(None, "fe80::1%eth0", None, "/d")),
    ("bob@[::1]:", R("bob", "::1", None, ".")),
    # ssh:// URLs
    ("ssh://host/srv/data", R(None, "host", None, "/srv/data")),
    ("ssh://bob@host:2222/srv/data", R("bob", "host", 2222, "/srv/data")),
    ("ssh://host", R(None, "host", None, ".")),
    ("ssh://host/", R(None, "host", None, "/")),
    ("ssh://host/~", R(None, "host", None, ".")),
    ("ssh://host/~/backups", R(None, "host", None, "backups")),
    ("ssh://[::1]:2200/x", R(None, "::1", 2200, "/x")),
    ("ssh://[::1]/x", R(None, "::1", None, "/x")),
    ("SSH://h:22/x", R(None, "h", 22, "/x")),
]


@pytest.mark.parametrize(("spec", "expected"), CASES, ids=[c[0] for c in CASES])
def test_parse_endpoint(spec: str, expected: object) -> None:
    assert parse_endpoint(spec) == expected


BAD = [
    "",
    "ssh://host:0/x",
    "ssh://host:65536/x",
    "ssh://host:abc/x",
    "ssh:///x",
    "ssh://@host/x",
    "ssh://[::1/x",
    "ssh://[::1]x/y",
    "host::module",
    "@host:x",
    "-oProxyCommand=evil:x",
    "bob@-host:x",
    "ssh://-host/x",
    "[]:x",
    "http://host/x",
    "file:///x",
]


@pytest.mark.parametrize("spec", BAD)
def test_parse_endpoint_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(spec)


@pytest.mark.parametrize(
    "spec",
    ["ssh://bob@host:2222/srv/data", "ssh://host/~/x", "ssh://[::1]:22/abs", "ssh://h/~"],
)
def test_str_round_trips(spec: str) -> None:
    ep = parse_endpoint(spec)
    assert parse_endpoint(str(ep)) == ep


def test_agrees_with_transport_is_remote_spec() -> None:
    """parse_endpoint and transport.is_remote_spec must agree on which specs are remote."""
    is_remote_spec = pytest.importorskip("dirsync.transport").is_remote_spec
    for spec, expected in CASES:
        assert is_remote_spec(spec) == isinstance(expected, RemoteEndpoint), spec
