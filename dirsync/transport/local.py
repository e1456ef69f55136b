"""LocalTransport: the replica writer called in-process."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from dirsync.apply import MasterReader, Sink, apply_actions
from dirsync.plan import Action
from dirsync.replica import OpenInfo, Replica
from dirsync.scan import Excluder, ScanResult
from dirsync.transport import TransportOptions, backup_options
from dirsync.verify import cached_root


class LocalTransport:
    is_remote = False

    def __init__(self, root: str, opts: TransportOptions | None = None) -> None:
        self.root = os.path.abspath(root)
        self.name = root
        self.opts = opts or TransportOptions()
        self.replica: Replica | None = None

    def open(self, *, init: bool = False, readonly: bool = False) -> OpenInfo:
        self.replica = Replica(self.root, readonly=readonly, backup=backup_options(self.opts))
        try:
            return self.replica.open(init=init)
        except BaseException:
            self.replica.close(save=False)
            raise

    def scan(self, patterns: list[str], *, fresh: bool = False) -> ScanResult:
        assert self.replica is not None
        return self.replica.manifest(Excluder(patterns), fresh=fresh)

    def cached_root(self, patterns: list[str]) -> bytes | None:
        assert self.replica is not None
        if self.replica.cache is None:
            return None
        return cached_root(self.replica.cache.manifest, patterns, self.replica.reserved)

    def apply(self, actions: Sequence[Action], master: MasterReader, sink: Sink,
              should_stop: Callable[[], bool] = lambda: False) -> None:
        assert self.replica is not None
        apply_actions(self.replica, actions, master.sends, sink, should_stop)

    def close(self, *, save: bool = True) -> None:
        if self.replica is not None:
            self.replica.close(save=save)
            self.replica = None
