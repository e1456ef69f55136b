"""Where a replica lives. One contract, two implementations: LocalTransport and RemoteTransport.

Contract (what sync.py relies on; the conformance tests check it for every implementation):
  open(init=, readonly=) -> OpenInfo   checks/initialises the replica root, takes its lock;
                                       raises RefusedError / LockedError / ConfigError / ConnectError
  scan(patterns, fresh=False) -> ScanResult
                                       the replica's manifest (cached on the replica's side;
                                       fresh=True rereads every file, for verify)
  apply(actions, master, sink, should_stop)
                                       carries out a Plan's actions in order; item failures go to
                                       sink.failed, only transport failures raise (ConnectError,
                                       ProtocolError)
  close(save=True)                     saves the replica cache, drops temps, releases the lock
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from dirsync.apply import MasterReader, Sink
from dirsync.plan import Action
from dirsync.replica import OpenInfo
from dirsync.scan import ScanResult


@dataclass(frozen=True)
class TransportOptions:
    port: int | None = None
    identity: str | None = None
    ssh_config: str | None = None
    remote_cmd: str | None = None
    accept_new_host_key: bool = False
    compress: bool = False
    connect_timeout: float = 15.0


class Transport(Protocol):
    name: str
    is_remote: bool

    def open(self, *, init: bool = False, readonly: bool = False) -> OpenInfo: ...
    def scan(self, patterns: list[str], *, fresh: bool = False) -> ScanResult: ...
    def apply(self, actions: Sequence[Action], master: MasterReader, sink: Sink,
              should_stop: Callable[[], bool] = lambda: False) -> None: ...
    def close(self, *, save: bool = True) -> None: ...


def is_remote_spec(spec: str) -> bool:
    """rsync's rule: a colon before any slash means host:path (`./a:b` and `/a:b` stay local)."""
    if spec.startswith("ssh://"):
        return True
    colon = spec.find(":")
    if colon <= 0:
        return False
    slash = spec.find("/")
    return slash < 0 or colon < slash


def open_transport(spec: str, opts: TransportOptions = TransportOptions()) -> Transport:
    if is_remote_spec(spec):
        from dirsync.transport.remote import RemoteTransport  # paramiko is imported only when needed

        return RemoteTransport(spec, opts)
    from dirsync.transport.local import LocalTransport

    return LocalTransport(spec)
