"""Watch mode: events mark master paths dirty, a debouncer batches them, each batch is rescanned and pushed.

Events are hints, the scan is the truth (DESIGN §2.4). Three parts:
  Debouncer   pure: dirty relpaths in, batches out; time is passed in, never read.
  Watcher     owns the one extra thread (watchdog's observer, stopped and joined on exit); its
              handler only puts relpaths (or a Rescan marker) on a queue.
  run_watch   the main-thread loop: initial sync, then batch -> incremental master scan ->
              run_sync per replica, with per-replica backoff and a periodic full rescan.
  run_watch_twoway
              the same loop (_Loop: debouncer, health checks, backoff) over the local sides of a
              two-way pair (one Watcher each): every batch, and every --interval when a side is
              remote, is one run_twoway of the pair, recorded for `dirsync status`.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from typing import Callable, Iterable, NamedTuple

from dirsync import chunking
from dirsync.errors import ExitCode, RefusedError, SourceChangedError, describe
from dirsync.manifest import DirEntry, Manifest, is_under, parent_of
from dirsync.progress import Reporter
from dirsync.record import Record
from dirsync.replica import MARKER
from dirsync.scan import STATE_DIR, TMP_PREFIX, Excluder, ScanResult, read_ignore_file, scan_tree
from dirsync.state import FileLock, master_cache_path, pair_lock_path, save_manifest_file, state_home
from dirsync.sync import SyncConfig, check_master, check_overlap, run_sync, scan_master
from dirsync.transport import is_remote_spec

# Syncthing's aggregator limits (maxFilesPerDir 128, maxFiles 512), doubled: a rescan of a
# directory reuses every unchanged entry from the cache, so widening costs lstat calls, not reads.
MAX_PER_DIR = 256
MAX_PATHS = 1024
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
CACHE_SAVE_INTERVAL_S = 10.0  # the master cache is an optimisation; a stale one is only re-hashed
HEALTH_CHECK_S = 5.0  # how often the observer threads are checked for life
FALLBACK_RESCAN_S = 60.0  # full rescans this often while events cannot be trusted
MAX_WAIT_S = 0.5  # a signal handler cannot wake a blocked queue.get: bound the reaction time


class Rescan(NamedTuple):
    """Queue marker: events were lost (overflow, observer error); rescan the whole tree."""

    reason: str


# -- Debouncer (pure) --------------------------------------------------------------------------


class Batch(Record):
    _fields = ("paths", "first_s", "events", "reason")

    def __init__(
        self,
        paths: frozenset[str],  # relpaths to rescan; frozenset({""}) is the whole tree
        first_s: float,  # clock time of the batch's first event (latency is measured from here)
        events: int,  # raw events folded into it
        reason: str = "",  # why it became the whole tree, when an event source said so
    ) -> None:
        self.paths = paths
        self.first_s = first_s
        self.events = events
        self.reason = reason

    @property
    def full(self) -> bool:
        return "" in self.paths


def _ancestors_and_self(p: str) -> list[str]:
    out = [p]
    while p:
        p = parent_of(p)
        out.append(p)
    return out


def widen(paths: set[str], max_per_dir: int, max_paths: int) -> set[str]:
    """Replace crowded directories' children by the directory, then climb until few enough remain."""
    paths = _drop_nested(paths)
    if "" in paths:
        return {""}
    per_dir: dict[str, int] = {}
    for p in paths:
        d = parent_of(p)
        per_dir[d] = per_dir.get(d, 0) + 1
    crowded = {d for d, n in per_dir.items() if n > max_per_dir}
    if crowded:
        paths = _drop_nested({parent_of(p) if parent_of(p) in crowded else p for p in paths})
    while len(paths) > max_paths and "" not in paths:
        depth = max(p.count("/") for p in paths)
        paths = _drop_nested({parent_of(p) if p.count("/") == depth else p for p in paths})
    return {""} if "" in paths else paths


def _drop_nested(paths: set[str]) -> set[str]:
    if "" in paths:
        return {""}
    out = set()
    for p in paths:
        q = p
        nested = False
        while q:
            q = parent_of(q)
            if q in paths:
                nested = True
                break
        if not nested:
            out.add(p)
    return out


class Debouncer:
    """Collects dirty relpaths; a batch is due once they have been quiet for `delay_s`, or
    `max_latency_s` after the first of them (so a file written continuously still syncs).

    Pure: no I/O, no clock; `now` is any monotonic time in seconds, passed in.
    """

    def __init__(self, delay_s: float = 0.2, max_latency_s: float = 2.0, *, max_per_dir: int = MAX_PER_DIR,
                 max_paths: int = MAX_PATHS) -> None:
        if delay_s < 0 or max_latency_s < delay_s:
            raise ValueError("need 0 <= delay_s <= max_latency_s")
        self.delay_s = delay_s
        self.max_latency_s = max_latency_s
        self.max_per_dir = max_per_dir
        self.max_paths = max_paths
        self._reset()

    def _reset(self) -> None:
        self.paths: set[str] = set()
        self.first_s: float | None = None
        self.last_s: float | None = None
        self.events = 0
        self.reason = ""

    def __bool__(self) -> bool:
        return self.first_s is not None

    @property
    def full(self) -> bool:
        return "" in self.paths

    def add(self, path: str, now: float) -> None:
        """Mark `path` (a relpath; "" is the whole tree) dirty at time `now`."""
        self._touch(now)
        if "" in self.paths:
            return
        self.paths.add(path)
        if len(self.paths) > 8 * self.max_paths:  # bound memory during a storm
            self.paths = widen(self.paths, self.max_per_dir, self.max_paths)

    def add_all(self, now: float, reason: str = "") -> None:
        """Everything is dirty (events were lost, or a periodic rescan is due)."""
        self._touch(now)
        self.paths = {""}
        if reason and not self.reason:
            self.reason = reason

    def _touch(self, now: float) -> None:
        if self.first_s is None:
            self.first_s = now
        self.last_s = now
        self.events += 1

    def deadline(self) -> float | None:
        """When the pending batch becomes due (None when nothing is pending)."""
        if self.first_s is None or self.last_s is None:
            return None
        return min(self.last_s + self.delay_s, self.first_s + self.max_latency_s)

    def due(self, now: float) -> Batch | None:
        """The pending batch if it is due at `now` (and forget it), else None."""
        d = self.deadline()
        if d is None or now < d:
            return None
        assert self.first_s is not None
        b = Batch(frozenset(widen(self.paths, self.max_per_dir, self.max_paths)), self.first_s, self.events,
                  self.reason)
        self._reset()
        return b


# -- Watcher (owns the observer thread) -----------------------------------------------------


def _event_types() -> list[type]:
    from watchdog import events as ev

    # Not DirModifiedEvent (every one comes with an event for the child that changed, and the
    # rescan refreshes parents), nor opened/closed-without-write (our own reads would echo).
    return [ev.FileCreatedEvent, ev.DirCreatedEvent, ev.FileDeletedEvent, ev.DirDeletedEvent, ev.FileMovedEvent,
            ev.DirMovedEvent, ev.FileModifiedEvent, ev.FileClosedEvent, ev.FileAttribEvent, ev.DirAttribEvent]


def _make_handler(root: str, q: "queue.SimpleQueue", ignore: tuple[str, ...]):
    from watchdog.events import FileSystemEventHandler

    prefix = root.rstrip("/") + "/"

    def relpath(p: str) -> str | None:
        if p == root:
            return ""
        if not p.startswith(prefix):
            return None
        rel = p[len(prefix):]
        if rel == STATE_DIR or rel.startswith(STATE_DIR + "/") or rel.startswith(TMP_PREFIX) or \
                "/" + TMP_PREFIX in rel:  # (a temp, or anything in a directory under a temp name)
            return None
        if any(is_under(rel, i) for i in ignore):
            return None
        return rel

    class Handler(FileSystemEventHandler):
        """Runs on the observer thread: no I/O, no decisions, just queue the relpaths."""

        def dispatch(self, event) -> None:
            for p in (event.src_path, getattr(event, "dest_path", "")):
                if p:
                    rel = relpath(os.fsdecode(p))
                    if rel is not None:
                        q.put(rel)

    return Handler()


class _LostEvents(logging.Handler):
    """watchdog reports a kernel queue overflow (and failed re-watching) only as log records."""

    def __init__(self, q: "queue.SimpleQueue") -> None:
        super().__init__(logging.WARNING)
        self.q = q

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "overflow" in msg.lower():
            self.q.put(Rescan("inotify event queue overflowed (fs.inotify.max_queued_events)"))
        elif record.levelno >= logging.ERROR:
            self.q.put(Rescan(f"file watcher error: {msg}"))


_WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


class Watcher:
    """Watches `root` recursively, putting relpaths of changed entries on `q`.

    A context manager: entering starts watchdog's observer, leaving stops and joins it (with
    the threads it owns). Starting never raises for an OS error (e.g. the inotify watch limit):
    the error is kept in `problem()` and a Rescan marker is queued instead.
    """

    def __init__(self, root: str, q: "queue.SimpleQueue", *, ignore: Iterable[str] = (),
                 observer_factory: Callable[[], object] | None = None) -> None:
        self.root = root
        self.q = q
        self.ignore = tuple(ignore)
        self.observer_factory = observer_factory
        self.observer = None
        self.error: str | None = None
        self.root_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the root being watched
        self._log_handler = _LostEvents(q)

    def __enter__(self) -> "Watcher":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.observer_factory is None:
            from watchdog.observers import Observer

            factory: Callable[[], object] = Observer
        else:
            factory = self.observer_factory
        for name in _WATCHDOG_LOGGERS:
            logging.getLogger(name).addHandler(self._log_handler)
        self.error = None
        obs = None
        try:
            st = os.stat(self.root)
            self.root_id = (st.st_dev, st.st_ino)
            obs = factory()
            obs.schedule(_make_handler(self.root, self.q, self.ignore), self.root, recursive=True,
                         event_filter=_event_types())
            obs.start()
        except OSError as e:
            self.error = f"cannot watch {self.root}: {describe(e)}"
            if obs is not None:
                _stop_observer(obs)
            return
        self.observer = obs

    def stop(self) -> None:
        obs, self.observer = self.observer, None
        try:
            if obs is not None:
                _stop_observer(obs)
        finally:
            for name in _WATCHDOG_LOGGERS:
                logging.getLogger(name).removeHandler(self._log_handler)

    def restart(self) -> None:
        self.stop()
        self.start()

    def problem(self) -> str | None:
        """Why events cannot be trusted right now (None when the observer and its threads run)."""
        if self.error:
            return self.error
        obs = self.observer
        if obs is None:
            return "file watcher not running"
        threads = [obs, *getattr(obs, "emitters", ())]
        fd_thread = getattr(obs, "_inotify_fd", None)  # watchdog's inotify reader (Linux)
        if fd_thread is not None and hasattr(fd_thread, "is_alive"):
            threads.append(fd_thread)
        if not all(t.is_alive() for t in threads):
            return "file watcher stopped unexpectedly (watched root removed, or an error in its thread)"
        try:
            st = os.stat(self.root)
        except OSError as e:
            return f"cannot stat the watched directory {self.root}: {describe(e)}"
        if (st.st_dev, st.st_ino) != self.root_id:  # inotify follows the old inode, not the path
            return f"the watched directory {self.root} was replaced or remounted"
        return None

    def watch_count(self) -> int | None:
        """inotify watches this observer holds (from /proc), or None when unknown."""
        fd = getattr(getattr(self.observer, "_inotify_fd", None), "_inotify_fd", None)
        if not isinstance(fd, int):
            return None
        try:
            with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
                return sum(1 for line in f if line.startswith(b"inotify wd:"))
        except OSError:
            return None


def _stop_observer(obs) -> None:
    obs.stop()  # also stops its emitters and, for inotify, the reader thread (joined there)
    if getattr(obs, "ident", None) is not None:
        obs.join()


# -- run_watch (main thread) -----------------------------------------------------------------


def watch_lock_path(master_real: str, replica: str) -> str:
    """One watcher per master/replica pair; a different file from run_sync's per-run pair lock."""
    return os.path.join(state_home(), "watch", os.path.basename(pair_lock_path(master_real, replica)))


def replica_key(spec: str) -> str:
    return spec if is_remote_spec(spec) else os.path.abspath(spec)


def _marked(spec: str) -> bool:
    return os.path.isfile(os.path.join(spec, STATE_DIR, MARKER))


class _ReplicaState(Record):
    _fields = ("spec", "local", "seen", "failures", "retry_at", "in_sync", "last_fatal")

    def __init__(
        self,
        spec: str,
        local: bool,
        seen: bool = False,  # has been a dirsync replica during this run: never recreate it when gone
        failures: int = 0,
        retry_at: float | None = None,  # in backoff until then
        in_sync: bool = False,  # the last push of the current master manifest succeeded fully
        last_fatal: str = "",
    ) -> None:
        self.spec = spec
        self.local = local
        self.seen = seen
        self.failures = failures
        self.retry_at = retry_at
        self.in_sync = in_sync
        self.last_fatal = last_fatal


class _Muted:
    """Reporter proxy for run_sync inside the loop: drops its per-replica info lines (the loop
    prints one line per batch instead) and holds back its fatal lines (the loop decides whether
    to repeat a failure it already reported)."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
        self.fatals: list[tuple[str, str | None]] = []

    def info(self, msg: str) -> None:
        pass

    def fatal(self, msg: str, hint: str | None = None) -> None:
        self.fatals.append((msg, hint))

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class _Totals(Record):
    _fields = (
        "written", "deleted", "other", "sent", "reused", "errors", "replicas_ok", "replicas_tried", "failed",
    )

    def __init__(
        self,
        written: int = 0,
        deleted: int = 0,
        other: int = 0,  # dirs made, links made, metadata set
        sent: int = 0,
        reused: int = 0,
        errors: int = 0,
        replicas_ok: int = 0,
        replicas_tried: int = 0,
        failed: list[str] | None = None,
    ) -> None:
        self.written = written
        self.deleted = deleted
        self.other = other
        self.sent = sent
        self.reused = reused
        self.errors = errors
        self.replicas_ok = replicas_ok
        self.replicas_tried = replicas_tried
        self.failed = [] if failed is None else failed

    @property
    def did_something(self) -> bool:
        return bool(self.written or self.deleted or self.other or self.errors or self.failed)


def run_watch(cfg: SyncConfig, reporter: Reporter, stop_event, *, delay_s: float = 0.2, max_latency_s: float = 2.0,
              rescan_interval_s: float = 3600.0, backoff_min_s: float = BACKOFF_MIN_S,
              backoff_max_s: float = BACKOFF_MAX_S, ignore_paths: Iterable[str] = (),
              observer_factory: Callable[[], object] | None = None,
              clock: Callable[[], float] = time.monotonic) -> int:
    """Keep every replica of cfg.master in sync until `stop_event` (a threading.Event) is set.

    Raises RefusedError (master unusable, replica overlapping it) and LockedError (another
    watcher holds one of the pairs) before anything starts; RefusedError later if the master
    goes away. Replica failures never end the loop: they are retried with capped exponential
    backoff. Returns 0 after a requested stop.
    """
    master_real = check_master(cfg.master)
    for r in cfg.replicas:
        check_overlap(master_real, r)
    locks: list[FileLock] = []
    try:
        for r in cfg.replicas:
            locks.append(FileLock(watch_lock_path(master_real, replica_key(r)),
                                  f"watch of {cfg.master} -> {r}").acquire())
        ignore = _ignored_relpaths(master_real, [*ignore_paths, state_home()])
        loop = _WatchLoop(cfg, master_real, reporter, stop_event, clock, Debouncer(delay_s, max_latency_s),
                          rescan_interval_s, backoff_min_s, backoff_max_s)
        q: queue.SimpleQueue = queue.SimpleQueue()
        with Watcher(master_real, q, ignore=ignore, observer_factory=observer_factory) as watcher:
            loop.run(q, watcher)
    finally:
        for lk in locks:
            lk.release()
    return 0


def _ignored_relpaths(master_real: str, paths: Iterable[str]) -> list[str]:
    """Our own files inside the master (log file, state dir) must not trigger events or loops."""
    out = []
    for p in paths:
        rp = os.path.realpath(p)
        if is_under(rp, master_real) and rp != master_real:
            out.append(rp[len(master_real.rstrip("/")) + 1:])
    return out


class _Loop:
    """The event loop shared by one-way and two-way watching: queued events -> debouncer -> batches,
    periodic full runs, watcher health checks, capped exponential backoff per target.

    Runs on the main thread only. Subclasses say what the initial run, a batch and a retry do.
    `watcher` is anything with problem() / restart() / watch_count() (a Watcher, or _Watchers).
    """

    retry_note = "other replicas continue, "  # said before "retrying in Ns" when a target fails

    def __init__(self, reporter: Reporter, stop_event, clock, debouncer: Debouncer, rescan_interval_s: float,
                 backoff_min_s: float, backoff_max_s: float, targets: dict[str, _ReplicaState]) -> None:
        self.reporter = reporter
        self.stop = stop_event
        self.clock = clock
        self.debouncer = debouncer
        self.rescan_interval_s = rescan_interval_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.replicas = targets
        self.excluder = Excluder()
        self.next_full_s = clock() + rescan_interval_s
        self.next_health_s = clock() + HEALTH_CHECK_S
        self.degraded: str | None = None  # events cannot be trusted: rescan every FALLBACK_RESCAN_S
        self.watcher = None

    # -- the loop ---------------------------------------------------------------------------

    def run(self, q: "queue.SimpleQueue", watcher) -> None:
        self.watcher = watcher
        self.initial_sync()
        self.reporter.info(self.ready_line())
        while not self.stop.is_set():
            now = self.clock()
            wait = max(0.0, min(self.deadlines(now)) - now)
            items = []
            try:
                items.append(q.get(timeout=min(wait, MAX_WAIT_S)))
                while True:  # drain: a burst is folded into the debouncer in one go
                    items.append(q.get_nowait())
            except queue.Empty:
                pass
            now = self.clock()
            for it in items:
                if isinstance(it, Rescan):
                    if not (self.debouncer.full and self.debouncer.reason == it.reason):  # one line per storm
                        self.reporter.warn(f"{it.reason}; rescanning everything")
                    self.debouncer.add_all(now, it.reason)
                elif not self.excluded(it):
                    self.debouncer.add(it, now)
            if self.stop.is_set():
                break
            if now >= self.next_health_s:
                self.check_watcher(now)
            if now >= self.next_full_s:
                self.next_full_s = now + self.full_rescan_every()  # once, or it would keep the batch from settling
                self.debouncer.add_all(now)
            batch = self.debouncer.due(now)
            if batch is not None:
                self.sync_batch(batch)
            self.retry_replicas()
            self.idle()
        self.finish()
        self.reporter.info(self.stopped_line())

    def deadlines(self, now: float) -> list[float]:
        out = [now + MAX_WAIT_S, self.next_full_s, self.next_health_s]
        d = self.debouncer.deadline()
        if d is not None:
            out.append(d)
        out += [st.retry_at for st in self.replicas.values() if st.retry_at is not None]
        return out + self.more_deadlines()

    def excluded(self, rel: str) -> bool:
        """Drop events inside excluded directories (an excluded log file written all day must not
        cost a sync per write). The path itself is left to the scanner, which knows its type."""
        if not self.excluder.patterns or not rel:
            return False
        q = parent_of(rel)
        while q:
            if self.excluder.excluded(q, True):
                return True
            q = parent_of(q)
        return self.excluder.excluded(rel, True) and self.excluder.excluded(rel, False)

    def check_watcher(self, now: float) -> None:
        watcher = self.watcher
        self.next_health_s = now + HEALTH_CHECK_S
        problem = watcher.problem()
        if problem is None:
            return
        if problem != self.degraded:  # a watcher that cannot start is retried quietly
            self.reporter.warn(f"{problem}; restarting the file watcher and rescanning everything")
        watcher.restart()
        after = watcher.problem()
        self.debouncer.add_all(now, after or "file watcher restarted")
        if after:
            self.set_degraded(after)
            self.next_health_s = now + FALLBACK_RESCAN_S
        elif self.degraded and not self.degraded.startswith("only "):
            self.reporter.info("file watching works again")
            self.degraded = None

    def full_rescan_every(self) -> float:
        return min(self.rescan_interval_s, FALLBACK_RESCAN_S) if self.degraded else self.rescan_interval_s

    def set_degraded(self, why: str) -> None:
        if self.degraded != why:
            self.degraded = why
            self.reporter.warn(f"{why}: changes may be missed; rescanning everything every "
                               f"{self.full_rescan_every():g}s")
        self.next_full_s = min(self.next_full_s, self.clock() + self.full_rescan_every())

    def failed(self, st: _ReplicaState, msg: str, hint: str | None) -> None:
        st.failures += 1
        st.in_sync = False
        delay = min(self.backoff_max_s, self.backoff_min_s * 2 ** (st.failures - 1))
        st.retry_at = self.clock() + delay
        if msg != st.last_fatal:
            self.reporter.fatal(f"{msg}; {self.retry_note}retrying in {delay:g}s (backing off up to "
                                f"{self.backoff_max_s:g}s)", hint)
        st.last_fatal = msg

    # -- what a subclass does -------------------------------------------------------------------

    def initial_sync(self) -> None:
        raise NotImplementedError

    def sync_batch(self, batch: Batch) -> None:
        raise NotImplementedError

    def retry_replicas(self) -> None:
        raise NotImplementedError

    def ready_line(self) -> str:
        raise NotImplementedError

    def stopped_line(self) -> str:
        raise NotImplementedError

    def idle(self) -> None:
        """Called once per loop turn."""

    def finish(self) -> None:
        """Called once after a requested stop."""

    def more_deadlines(self) -> list[float]:
        return []


class _WatchLoop(_Loop):
    """One-way: incremental master rescans pushed to every replica."""

    def __init__(self, cfg: SyncConfig, master_real: str, reporter: Reporter, stop_event, clock, debouncer: Debouncer,
                 rescan_interval_s: float, backoff_min_s: float, backoff_max_s: float) -> None:
        super().__init__(reporter, stop_event, clock, debouncer, rescan_interval_s, backoff_min_s, backoff_max_s,
                         {s: _ReplicaState(s, not is_remote_spec(s)) for s in cfg.replicas})
        self.cfg = cfg
        self.master_real = master_real
        for st in self.replicas.values():
            st.seen = st.local and _marked(st.spec)
        self.manifest = Manifest()
        self.protect: set[str] = set()
        self.patterns: list[str] = []
        self.cache_ok = True
        self.cache_dirty = False
        self.cache_saved_s = clock()
        self.changing: set[str] = set()  # master files seen changing while read (reported once)

    def ready_line(self) -> str:
        return (f"watching {self.cfg.master} -> {', '.join(self.cfg.replicas)} "
                f"(delay {self.debouncer.delay_s:g}s, max latency {self.debouncer.max_latency_s:g}s, "
                f"full rescan every {self.rescan_interval_s:g}s)")

    def stopped_line(self) -> str:
        return f"stopped watching {self.cfg.master}"

    def idle(self) -> None:
        self.maybe_save_cache()

    def finish(self) -> None:
        self.save_cache()

    def more_deadlines(self) -> list[float]:
        return [self.cache_saved_s + CACHE_SAVE_INTERVAL_S] if self.cache_dirty else []

    def check_watch_count(self) -> None:
        watcher = self.watcher
        """watchdog silently skips subdirectories it cannot watch (the inotify watch limit):
        compare the watches it holds with the directories the scan found."""
        n = watcher.watch_count()
        if n is None or watcher.problem():
            return
        dirs = sum(1 for e in self.manifest.entries.values() if isinstance(e, DirEntry))
        if n < dirs:
            self.set_degraded(f"only {n} of {dirs} directories are watched (inotify watch limit "
                              "fs.inotify.max_user_watches reached?)")
        elif self.degraded and self.degraded.startswith("only "):
            self.degraded = None

    # -- scanning -------------------------------------------------------------------------------

    def load_patterns(self) -> bool:
        """Re-read the excludes; True when they changed (the whole tree must be rescanned)."""
        patterns = list(self.cfg.excludes) + read_ignore_file(self.master_real)
        changed = patterns != self.patterns
        if changed:
            self.patterns = patterns
            self.excluder = Excluder(patterns)
        return changed

    def initial_sync(self) -> None:
        watcher = self.watcher
        t0 = self.clock()
        self.load_patterns()
        res, self.cache_ok = scan_master(self.master_real, self.patterns, self.reporter)
        self.manifest, self.protect = res.manifest, set(res.protect)
        self.cache_saved_s = self.clock()
        self.check_watch_count()
        if watcher.problem():
            self.set_degraded(watcher.problem() or "")
        self.push(res, list(self.replicas), t0, "initial sync", always=True)
        self.cache_ok = True  # later scans start from this full one

    def sync_batch(self, batch: Batch) -> None:
        check_master(self.cfg.master)  # the master gone: RefusedError ends the daemon
        full = batch.full or self.load_patterns()
        if full:
            res = scan_tree(self.master_real, excluder=self.excluder, cache=self.manifest)
            protect = set(res.protect)
            self.next_full_s = self.clock() + self.full_rescan_every()
        else:
            only = anchor(batch.paths, self.manifest)
            res = scan_tree(self.master_real, excluder=self.excluder, cache=self.manifest, only=only)
            # Entries that could not be read earlier are absent from the cache: keep protecting
            # them from deletion unless this scan looked at them again.
            protect = set(res.protect) | {p for p in self.protect if not any(is_under(p, k) for k in only)}
            res.protect = protect
        changed = res.manifest.entries != self.manifest.entries or protect != self.protect
        self.manifest, self.protect = res.manifest, protect
        if changed:
            self.cache_dirty = True
        for w in res.warnings:
            self.reporter.warn(w)
        for e in res.errors:
            if isinstance(e, SourceChangedError):  # still being written: the next event retries it
                if e.path not in self.changing:
                    self.reporter.warn(f"{e}")
                self.changing.add(e.path)
            else:
                self.reporter.error(str(e))
        self.changing -= {p for p in self.changing if p in res.manifest.entries}
        res.errors, res.warnings = [], []  # reported once, here (res is this batch's own scan)
        targets = [s for s, st in self.replicas.items() if st.retry_at is None and (full or changed or not st.in_sync)]
        label = "full rescan" if full else f"{len(batch.paths)} path(s)"
        self.push(res, targets, batch.first_s, label, always=full)
        if full:
            self.save_cache()
            self.check_watch_count()

    # -- pushing --------------------------------------------------------------------------------

    def push(self, res: ScanResult, specs: list[str], first_s: float, label: str, *, always: bool = False) -> None:
        tot = _Totals()
        for spec in specs:
            if self.stop.is_set():
                return
            self.push_one(res, spec, tot)
        if tot.did_something or (always and tot.replicas_tried):
            parts = [f"{tot.written} written", f"{tot.deleted} deleted"]
            if tot.other:
                parts.append(f"{tot.other} dir/link/metadata")
            if tot.errors:
                parts.append(f"{tot.errors} failed")
            self.reporter.info(
                f"synced {label}: {', '.join(parts)}, sent {_size(tot.sent)}, reused {_size(tot.reused)}, "
                f"{tot.replicas_ok}/{tot.replicas_tried} replica(s) ok, latency {self.clock() - first_s:.2f}s")

    def push_one(self, res: ScanResult, spec: str, tot: _Totals) -> None:
        st = self.replicas[spec]
        tot.replicas_tried += 1
        if st.local and st.seen and not _marked(spec):
            self.failed(st, f"{spec}: replica is gone (renamed, deleted or unmounted); not recreating it", None)
            tot.failed.append(spec)
            return
        muted = _Muted(self.reporter)
        try:
            run = run_sync(self.cfg.replace(replicas=(spec,)), muted, self.stop.is_set,  # type: ignore[arg-type]
                           master_scan=(res, self.cache_ok))
        except OSError as e:  # e.g. the replica vanished under an open: one replica's problem
            self.failed(st, f"{spec}: {describe(e)}", None)
            tot.failed.append(spec)
            return
        s = run.replicas[0]
        tot.written += s.files_written
        tot.deleted += s.files_deleted
        tot.other += s.dirs_created + s.links_made + s.meta_set + s.dirs_moved
        tot.sent += s.bytes_sent
        tot.reused += s.bytes_reused
        tot.errors += len(s.errors)
        if s.fatal is not None and s.exit_code != ExitCode.DELETE_LIMIT:
            msg, hint = muted.fatals[0] if muted.fatals else (f"{spec}: {s.fatal}", None)
            self.failed(st, msg, hint)
            tot.failed.append(spec)
            return
        if s.fatal is not None:  # delete limit: the rest was synced; the next change re-plans
            for msg, hint in muted.fatals:
                self.reporter.fatal(msg, hint)
        if st.failures:
            self.reporter.info(f"{spec}: replica is back after {st.failures} failed attempt(s); caught up")
        st.failures, st.retry_at, st.last_fatal, st.seen = 0, None, "", True
        st.in_sync = s.fatal is None and not s.errors and not self.stop.is_set()
        tot.replicas_ok += 1

    def retry_replicas(self) -> None:
        now = self.clock()
        due = [s for s, st in self.replicas.items() if st.retry_at is not None and st.retry_at <= now]
        if due and not self.stop.is_set():
            for s in due:
                self.replicas[s].retry_at = None
            self.push(ScanResult(self.manifest, protect=set(self.protect)), due, now, "retry", always=False)

    # -- master cache ---------------------------------------------------------------------------

    def maybe_save_cache(self) -> None:
        if self.cache_dirty and self.clock() - self.cache_saved_s >= CACHE_SAVE_INTERVAL_S:
            self.save_cache()

    def save_cache(self) -> None:
        if not self.cache_dirty:
            return
        path = master_cache_path(self.master_real)
        try:
            save_manifest_file(path, self.manifest, chunking.CHUNKER_ID)
        except OSError as e:
            self.reporter.warn(f"could not save the master cache {path}: {describe(e)}")
        self.cache_dirty = False
        self.cache_saved_s = self.clock()


# -- two-way (run_watch_twoway) -----------------------------------------------------------------


REMOTE_INTERVAL_S = 30.0  # default --interval when a side is remote (its changes raise no events here)


class _Watchers:
    """The Watchers of a two-way pair's local sides (none when both are remote), seen by the
    loop as one watcher. Owns them: start() and stop() start and join their threads."""

    def __init__(self, watchers: list[Watcher]) -> None:
        self.watchers = watchers

    def __enter__(self) -> "_Watchers":
        try:
            for w in self.watchers:
                w.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()

    def problem(self) -> str | None:
        return next((p for p in (w.problem() for w in self.watchers) if p), None)

    def restart(self) -> None:
        for w in self.watchers:
            if w.problem():
                w.restart()

    def watch_count(self) -> int | None:
        return None


class _TwoWayLoop(_Loop):
    """Two-way: every batch (events from either local side, or the periodic timer) is one full
    run_twoway of the pair, under the pair lock and recorded in its status record.

    Our own writes do raise events on the side they land on; they only cause one follow-up run,
    which finds both sides equal, changes nothing outside .dirsync (never watched) and so raises
    no event: the loop settles. Events during a run are never dropped, so a change someone makes
    while we sync is always picked up by that follow-up run.
    """

    retry_note = ""

    def __init__(self, cfg, reporter: Reporter, stop_event, clock, debouncer: Debouncer, periodic_s: float,
                 backoff_min_s: float, backoff_max_s: float, local_sides: list[str]) -> None:
        self.label = f"{cfg.a} ⇄ {cfg.b}"
        super().__init__(reporter, stop_event, clock, debouncer, periodic_s, backoff_min_s, backoff_max_s,
                         {self.label: _ReplicaState(self.label, local=False)})
        self.cfg = cfg
        self.pair = self.replicas[self.label]
        # local side -> it has been a synced side during this daemon's life: never recreate it when gone
        self.seen = {s: _marked(s) for s in local_sides}
        self.load_patterns()

    def load_patterns(self) -> None:
        """Only to drop events in excluded directories; run_twoway reads every pattern itself."""
        patterns = list(self.cfg.excludes)
        for s in self.seen:
            patterns += read_ignore_file(os.path.realpath(s))
        if patterns != self.excluder.patterns:
            self.excluder = Excluder(patterns)

    def ready_line(self) -> str:
        every = (f"a run every {self.rescan_interval_s:g}s" if self.rescan_interval_s < 3600 else
                 f"full run every {self.rescan_interval_s:g}s")
        return (f"watching {self.label} (two-way; delay {self.debouncer.delay_s:g}s, max latency "
                f"{self.debouncer.max_latency_s:g}s, {every})")

    def stopped_line(self) -> str:
        return f"stopped watching {self.label}"

    def initial_sync(self) -> None:
        self.sync_pair(self.clock(), "initial sync", initial=True)
        watchers = self.watcher
        if any(w.error for w in watchers.watchers):  # e.g. a side the initial run has just created
            watchers.restart()
            self.debouncer.add_all(self.clock())  # what changed before its watch existed
        if watchers.problem():
            self.set_degraded(watchers.problem() or "")

    def sync_batch(self, batch: Batch) -> None:
        if self.pair.retry_at is not None:
            return  # backing off: the retry is a full run and covers this batch
        self.load_patterns()
        self.sync_pair(batch.first_s, "periodic run" if batch.full else f"{len(batch.paths)} changed path(s)")

    def retry_replicas(self) -> None:
        st = self.pair
        if st.retry_at is not None and st.retry_at <= self.clock() and not self.stop.is_set():
            st.retry_at = None
            self.sync_pair(self.clock(), "retry")

    def sync_pair(self, first_s: float, label: str, *, initial: bool = False) -> None:
        """One two-way run. At start a refusal or a configuration error ends the daemon (exit 12
        or 2: nothing will change by waiting); later, any failure is retried with backoff."""
        from dirsync.errors import ConfigError, DirsyncError, RefusedError
        from dirsync.status import run_twoway_recorded

        st = self.pair
        self.next_full_s = self.clock() + self.full_rescan_every()
        for spec, seen in self.seen.items():
            if seen and not _marked(spec):
                self.failed(st, f"{spec}: side is gone (renamed, deleted or unmounted); not recreating it", None)
                return
        try:
            summ, _ = run_twoway_recorded(self.cfg, self.reporter, self.stop.is_set)
        except (ConfigError, RefusedError) as e:
            if initial:
                raise
            self.failed(st, str(e), e.hint)
            return
        except DirsyncError as e:
            self.failed(st, str(e), e.hint)
            return
        except OSError as e:  # e.g. a side vanished under an open
            self.failed(st, f"{self.label}: {describe(e)}", None)
            return
        if st.failures:
            self.reporter.info(f"{self.label}: back after {st.failures} failed attempt(s); caught up")
        st.failures, st.retry_at, st.last_fatal = 0, None, ""
        for spec in self.seen:
            self.seen[spec] = self.seen[spec] or _marked(spec)
        self.report(summ, first_s, label, always=initial)

    def report(self, summ, first_s: float, label: str, *, always: bool) -> None:
        """Conflicts as warnings (the daemon goes on); one info line for a run that did something.
        run_twoway has reported its own warnings and errors."""
        from dirsync.errors import display_path

        copies = [c for c in summ.conflicts if c.copy]
        for c in copies:
            self.reporter.warn(f"conflict: {display_path(c.path)}: {c.reason}")
        n = summ.decisions.counts() if summ.decisions else {}
        sides = summ.sides
        written = sum(s.files_written for s in sides)
        deleted = sum(s.files_deleted for s in sides)
        other = sum(s.dirs_created + s.links_made + s.meta_set + s.dirs_moved for s in sides)
        errors = sum(len(s.errors) for s in sides) + len(summ.scan_errors)
        if not (always or written or deleted or other or errors or copies or any(n.values())):
            return
        parts = [f"{n.get('a>b', 0)} a → b", f"{n.get('b>a', 0)} a ← b",
                 f"{n.get('del-a', 0) + n.get('del-b', 0)} deleted", f"{len(copies)} conflict(s)"]
        if errors:
            parts.append(f"{errors} failed")
        self.reporter.info(
            f"synced {label} two-way: {', '.join(parts)}; sent {_size(sum(s.bytes_sent for s in sides))}, "
            f"reused {_size(sum(s.bytes_reused for s in sides))}, exit {summ.exit_code}, "
            f"latency {self.clock() - first_s:.2f}s")


def run_watch_twoway(cfg, reporter: Reporter, stop_event, *, delay_s: float = 0.2, max_latency_s: float = 2.0,
                     rescan_interval_s: float = 3600.0, interval_s: float | None = None,
                     backoff_min_s: float = BACKOFF_MIN_S, backoff_max_s: float = BACKOFF_MAX_S,
                     ignore_paths: Iterable[str] = (), observer_factory: Callable[[], object] | None = None,
                     clock: Callable[[], float] = time.monotonic) -> int:
    """Keep the two sides of `cfg` (a twoway.TwoWayConfig) in step until `stop_event` is set.

    Local sides are watched; a remote side cannot be, so the pair is also synced every
    `interval_s` (None: REMOTE_INTERVAL_S when a side is remote, else off; 0: off) and at least
    every `rescan_interval_s`. Raises RefusedError (overlapping sides; at the first run: a guard),
    ConfigError (at the first run) and LockedError (another watcher of the pair, two-way or
    one-way) before the loop starts. Returns 0 after a requested stop.
    """
    local = [s for s in (cfg.a, cfg.b) if not is_remote_spec(s)]
    if len(local) == 2:
        ra, rb = (os.path.realpath(s) for s in local)
        if ra == rb or is_under(ra, rb) or is_under(rb, ra):
            raise RefusedError(f"{cfg.a} and {cfg.b} overlap; two-way sync needs two separate trees")
    if interval_s is None:
        interval_s = REMOTE_INTERVAL_S if len(local) < 2 else 0.0
    periodic_s = min(interval_s, rescan_interval_s) if interval_s else rescan_interval_s
    from dirsync.status import twoway_pair_id

    what = f"watch of {cfg.a} ⇄ {cfg.b}"
    paths = [os.path.join(state_home(), "watch", twoway_pair_id(cfg.a, cfg.b) + ".lock")]
    for x, y in ((cfg.a, cfg.b), (cfg.b, cfg.a)):  # a one-way watcher of the same two would fight this one
        if not is_remote_spec(x):
            paths.append(watch_lock_path(os.path.realpath(x), replica_key(y)))
    locks: list[FileLock] = []
    try:
        for lp in paths:
            locks.append(FileLock(lp, what).acquire())
        q: queue.SimpleQueue = queue.SimpleQueue()
        watchers = []
        for s in local:
            root = os.path.realpath(s)
            watchers.append(Watcher(root, q, ignore=_ignored_relpaths(root, [*ignore_paths, state_home()]),
                                    observer_factory=observer_factory))
        loop = _TwoWayLoop(cfg, reporter, stop_event, clock, Debouncer(delay_s, max_latency_s), periodic_s,
                           backoff_min_s, backoff_max_s, local)
        with _Watchers(watchers) as ws:
            loop.run(q, ws)
    finally:
        for lk in locks:
            lk.release()
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def anchor(paths: Iterable[str], cached: Manifest) -> list[str]:
    """The paths to rescan so that each dirty path is really looked at.

    scan_tree(only=...) skips a path whose parent is not a directory in the cache (it expects
    the parent's own rescan to cover it). An event whose parent's creation was never seen
    (lost event, or a directory made before its watch existed) would be skipped, so such a
    path is replaced by its highest ancestor missing from the cache.
    """
    out = set()
    entries = cached.entries
    for p in paths:
        chain = _ancestors_and_self(p)[1:]  # parent, grandparent, ..., ""
        top = p
        for a in chain:
            if a and not isinstance(entries.get(a), DirEntry):
                top = a
        out.add(top)
    return sorted(_drop_nested(out))


__all__ = ["Batch", "Debouncer", "Rescan", "Watcher", "anchor", "run_watch", "run_watch_twoway", "widen",
           "watch_lock_path"]
