"""LocalTransport: the replica writer called in-process."""

from __future__ import annotations

import os

from dirsync.apply import MasterReader, Sink, apply_actions
from dirsync.plan import Action
from dirsync.replica import OpenInfo, Replica
from dirsync.scan import Excluder, ScanResult
from dirsync.transport import TransportOptions, backup_options

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable, Sequence


class LocalTransport:
    is_remote = False
    dir_moves = 1 << 62  # (MoveDir of any size)

    def __init__(self, root: str, opts: TransportOptions | None = None) -> None:
        self.root = os.path.abspath(root)
        self.name = root
        self.opts = opts or TransportOptions()
        self.replica: Replica | None = None
        self._info: OpenInfo | None = None  # from open_start, for open_finish
        self._excluder: Excluder | None = None  # the prewalk's (scan must use the same patterns)
        self._patterns: list[str] = []
        self.closed_fingerprint = b""  # the replica cache's fingerprint as close() left it

    def open(self, *, init: bool = False, readonly: bool = False) -> OpenInfo:
        self.replica = Replica(self.root, readonly=readonly, backup=backup_options(self.opts))
        try:
            return self.replica.open(init=init)
        except BaseException:
            self.replica.close(save=False)
            raise

    def open_start(self, patterns: list[str], *, init: bool = False, readonly: bool = False) -> None:
        """open(), then start scan(patterns)'s tree walk in a child process (Replica.prewalk)
        so that it runs beside the master's walk; open_finish() returns the OpenInfo."""
        self._info = self.open(init=init, readonly=readonly)
        self._excluder = Excluder(patterns)
        self._patterns = list(patterns)
        assert self.replica is not None
        self.replica.prewalk(self._excluder)

    def open_finish(self) -> OpenInfo:
        info, self._info = self._info, None
        assert info is not None
        return info

    def expect_plan(self, decode: bool = True) -> None:
        """See RemoteTransport.expect_plan: nothing to do here (this process walks the master
        while a child walks the replica; it has no idle time to decode in)."""

    def scan(self, patterns: list[str], *, fresh: bool = False) -> ScanResult:
        assert self.replica is not None
        ex = self._excluder if self._excluder is not None and list(patterns) == self._patterns else Excluder(patterns)
        self._excluder = None  # the prewalk serves one scan, with this very excluder (Replica.manifest)
        return self.replica.manifest(ex, fresh=fresh)

    def cached_root(self, patterns: list[str]) -> bytes | None:
        assert self.replica is not None
        if self.replica.cache is None:
            return None
        from dirsync.verify import cached_root  # here: only `verify` needs it

        return cached_root(self.replica.cache.manifest, patterns, self.replica.reserved)

    def apply(self, actions: Sequence[Action], master: MasterReader, sink: Sink,
              should_stop: Callable[[], bool] = lambda: False) -> None:
        assert self.replica is not None
        # (a MasterReader may offer a master file to copy in the kernel; a two-way PairReader sends bytes)
        # A MasterReader's reads work in a forked helper writer too (apply._Helper); a throttled
        # one would pace each process on its own, twice the rate.
        split = master.__class__ is MasterReader and master.throttle is None
        self.replica.keep_precopies(actions)
        apply_actions(self.replica, actions, getattr(master, "local_sends", master.sends), sink, should_stop, split)

    def precopy(self, rel: str, size: int) -> None:
        """Replica.precopy: called by the master scan before it hashes a large file again."""
        if self.replica is not None:
            self.replica.precopy(rel, size)

    def forget(self) -> None:
        """A forked worker took this replica over: Replica.forget."""
        if self.replica is not None:
            self.replica.forget()
            self.replica = None

    def close(self, *, save: bool = True) -> str:
        """Replica.close: returns the generation of the cache it left ("" when none)."""
        if self.replica is None:
            return ""
        try:
            return self.replica.close(save=save)
        finally:
            self.closed_fingerprint = self.replica.closed_fingerprint
            self.replica = None
