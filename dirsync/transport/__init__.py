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
  cached_root(patterns) -> bytes | None
                                       OPTIONAL (verify --quick): Merkle root digest of the
                                       replica's saved manifest, filtered by `patterns`, without
                                       walking the tree; None when there is no usable cache.
                                       Callers fall back to scan() when a transport lacks it.
  closed_fingerprint: bytes            OPTIONAL: after close(), the fingerprint of the replica
                                       cache it left (b"" when none); a sync whose plan was
                                       carried out cleanly records it as "in step" with the
                                       master's (sync._sync_one). The agent reports it in `closed`.

Options that the replica side must honour (carried in TransportOptions):
  backup_dir, backup_keep              --backup-dir/--backup-keep. The replica side builds
                                       Replica(root, backup=backup_options(opts)); Replica._retire
                                       then keeps every file/link it replaces or deletes (see
                                       replica.BackupOptions). open() reports backup dirs inside
                                       the replica (this run's, and earlier runs' still present,
                                       kept in .dirsync/reserved.json) in OpenInfo.reserved; the
                                       replica's scans skip them and sync.py/verify.py drop those
                                       relpaths from the master manifest.
--bwlimit is not a transport option: it throttles MasterReader on the master side, so it
limits the bytes of send ops (before compression) to each replica, whatever the transport.
"""

from __future__ import annotations


from dirsync.apply import MasterReader, Sink
from dirsync.plan import Action
from dirsync.record import Record
from dirsync.replica import BackupOptions, OpenInfo
from dirsync.scan import ScanResult

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable, Sequence


class TransportOptions(Record):
    _fields = (
        "port", "identity", "ssh_config", "remote_cmd", "accept_new_host_key", "compress", "connect_timeout",
        "backup_dir", "backup_keep", "rsh",
    )

    def __init__(
        self,
        port: int | None = None,
        identity: str | None = None,
        ssh_config: str | None = None,
        remote_cmd: str | None = None,
        accept_new_host_key: bool = False,
        compress: bool = False,
        connect_timeout: float = 15.0,
        backup_dir: str | None = None,  # absolute, or relative to the replica root
        backup_keep: int | None = None,  # keep the newest N backup run folders
        rsh: str | None = None,  # an external ssh client command line; None: $DIRSYNC_RSH, else paramiko
    ) -> None:
        self.port = port
        self.identity = identity
        self.ssh_config = ssh_config
        self.remote_cmd = remote_cmd
        self.accept_new_host_key = accept_new_host_key
        self.compress = compress
        self.connect_timeout = connect_timeout
        self.backup_dir = backup_dir
        self.backup_keep = backup_keep
        self.rsh = rsh


def backup_options(opts: TransportOptions) -> BackupOptions | None:
    return BackupOptions(opts.backup_dir, opts.backup_keep) if opts.backup_dir else None


class Transport:
    """(An interface.) What sync.py drives: LocalTransport and RemoteTransport."""

    name: str
    is_remote: bool
    dir_moves: int  # PlanOptions.dir_moves for this replica (known once open() returned)

    def open(self, *, init: bool = False, readonly: bool = False) -> OpenInfo: ...
    def expect_plan(self, decode: bool = True) -> None: ...  # a hint before scan(): a plan will follow
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

    return LocalTransport(spec, opts)
