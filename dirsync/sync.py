"""One sync run: check the master, scan it once, then for each replica: lock, scan, plan, guard, apply.

Sequences the stages; decides nothing about individual files (that is plan.py's job).
"""

from __future__ import annotations

import os
import stat
import time

from dirsync import chunking
from dirsync.apply import MasterReader, ReplicaSummary, Stopwatch, TokenBucket
from dirsync.errors import ConfigError, DirsyncError, ExitCode, ItemError, RefusedError, display_path
from dirsync.manifest import FileEntry, Manifest
from dirsync.plan import REPLACED_BATCH, Plan, PlanOptions, diff
from dirsync.progress import Reporter
from dirsync.record import Record
from dirsync.runtime import gc_paused
from dirsync.scan import Excluder, Prewalk, ScanResult, read_ignore_file, scan_tree
from dirsync.state import (CacheLoad, FileLock, PendingSave, load_manifest_file, master_cache_path, pair_lock_path,
                           save_manifest_file, save_manifest_file_forked)
from dirsync.transport import Transport, TransportOptions, is_remote_spec, open_transport

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable

MASS_DELETE_MIN = 10  # the default guard ignores runs deleting fewer entries than this
# The master scan keeps the bytes of up to this much of the small files it reads, so that an
# initial copy sends them from memory instead of opening and reading each one again (20,000
# small files here: 0.8 s of a 4.4 s copy went to reading them a second time).
HOLD_BYTES = 64 << 20

# When several replicas end differently, the run's exit code is the most serious one.
_SEVERITY = [ExitCode.INTERRUPTED, ExitCode.ERROR, ExitCode.CONNECT, ExitCode.PROTOCOL, ExitCode.LOCKED,
             ExitCode.REFUSED, ExitCode.USAGE, ExitCode.DELETE_LIMIT, ExitCode.PARTIAL, ExitCode.OK]


class SyncConfig(Record):
    _fields = (
        "master", "replicas", "delete", "init", "excludes", "max_delete", "allow_mass_delete", "dry_run",
        "lock_wait_s", "transport", "bwlimit", "profile", "jobs",
    )

    def __init__(
        self,
        master: str,
        replicas: tuple[str, ...],
        delete: bool = True,
        init: bool = False,
        excludes: tuple[str, ...] = (),
        max_delete: int | None = None,  # more planned deletes than this: none at all happen (exit 25)
        allow_mass_delete: bool = False,  # turn off the default guards (emptied master, >half deleted)
        dry_run: bool = False,
        lock_wait_s: float = 0.0,
        transport: TransportOptions = TransportOptions(),  # also carries --backup-dir/--backup-keep
        bwlimit: int | None = None,  # bytes per second of master data sent to each replica
        profile: str | None = None,  # the profile name, recorded in the pair status record
        jobs: int = 0,  # replicas synced at once (dirsync.fanout); 0: fanout.default_jobs()
    ) -> None:
        self.master = master
        self.replicas = replicas
        self.delete = delete
        self.init = init
        self.excludes = excludes
        self.max_delete = max_delete
        self.allow_mass_delete = allow_mass_delete
        self.dry_run = dry_run
        self.lock_wait_s = lock_wait_s
        self.transport = transport
        self.bwlimit = bwlimit
        self.profile = profile
        self.jobs = jobs


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


class RunSummary(Record):
    _fields = (
        "master", "run_id", "replicas", "scan_errors", "warnings", "plans", "files_hashed", "bytes_hashed",
        "seconds",
    )

    def __init__(
        self,
        master: str,
        run_id: str | None = None,
        replicas: list[ReplicaSummary] | None = None,
        scan_errors: list[ItemError] | None = None,
        warnings: list[str] | None = None,
        plans: list[tuple[str, Plan]] | None = None,
        files_hashed: int = 0,
        bytes_hashed: int = 0,
        seconds: float = 0.0,
    ) -> None:
        self.master = master
        self.run_id = new_run_id() if run_id is None else run_id
        self.replicas = [] if replicas is None else replicas
        self.scan_errors = [] if scan_errors is None else scan_errors
        self.warnings = [] if warnings is None else warnings
        self.plans = [] if plans is None else plans
        self.files_hashed = files_hashed
        self.bytes_hashed = bytes_hashed
        self.seconds = seconds

    @property
    def exit_code(self) -> int:
        codes = {int(r.exit_code) for r in self.replicas}
        if self.scan_errors:
            codes.add(ExitCode.PARTIAL)
        for c in _SEVERITY:
            if c in codes:
                return int(c)
        return 0

    def to_json(self) -> dict:
        return {
            "master": self.master,
            "run_id": self.run_id,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
            "master_scan": {
                "files_hashed": self.files_hashed,
                "bytes_hashed": self.bytes_hashed,
                "errors": [{"path": os.fsencode(e.path).decode("utf-8", "backslashreplace"), "op": e.op,
                            "code": e.code, "message": str(e)} for e in self.scan_errors],
                "warnings": self.warnings,
            },
            "replicas": [r.to_json() for r in self.replicas],
        }


def check_master(master: str) -> str:
    """Absolute real path of a usable master root; RefusedError (replicas untouched) otherwise."""
    try:
        st = os.stat(master)
    except FileNotFoundError:
        raise RefusedError(f"master {master} does not exist; no replica was touched",
                           hint="is the disk mounted? check the path") from None
    except OSError as e:
        raise RefusedError(f"master {master}: {e.strerror}; no replica was touched") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RefusedError(f"master {master} is not a directory; no replica was touched")
    try:
        with os.scandir(master) as it:
            next(it, None)
    except OSError as e:
        raise RefusedError(f"master {master} is unreadable ({e.strerror}); no replica was touched") from None
    return os.path.realpath(master)


def check_overlap(master_real: str, replica: str) -> None:
    """Refuse a local replica that is the master, inside it, or holds it (also through symlinks)."""
    if is_remote_spec(replica):
        return
    rp = os.path.realpath(replica)
    if rp == master_real or rp.startswith(master_real.rstrip("/") + "/") or \
            master_real.startswith(rp.rstrip("/") + "/"):
        raise RefusedError(f"replica {replica} overlaps the master {master_real}; refusing",
                           hint="master and replica must be separate trees")


def check_replicas_apart(replicas: tuple[str, ...] | list[str]) -> None:
    """Refuse two local replicas that are the same directory or one inside the other (also
    through symlinks): each run the outer one would delete the inner one, state included."""
    seen: list[tuple[str, str]] = []
    for spec in replicas:
        if is_remote_spec(spec):
            continue
        rp = os.path.realpath(spec)
        for other, orp in seen:
            if rp == orp or rp.startswith(orp.rstrip("/") + "/") or orp.startswith(rp.rstrip("/") + "/"):
                raise RefusedError(f"replicas {other} and {spec} overlap; refusing",
                                   hint="each replica must be a separate tree")
        seen.append((spec, rp))


def scan_master(master_real: str, patterns: list[str], reporter: Reporter,
                saves: list[PendingSave] | None = None, walk: tuple[CacheLoad, Prewalk | None] | None = None,
                on_rehash: Callable[[str, int], None] | None = None) -> tuple[ScanResult, bool]:
    """Scan the master with its cache; returns (result, cache trustworthy for deletes).
    With `saves`, the cache may be saved by a forked child, added there for the caller to wait for.
    `walk`: the cache already loaded and the tree's walk started by _prewalk_master.
    `on_rehash`: see scan_tree (the replica's precopy, from _precopier)."""
    cache_file = master_cache_path(master_real)
    load, walked = walk or (load_manifest_file(cache_file, chunking.CHUNKER_ID, lazy=True), None)
    cache_ok = load.status != "unusable"
    if not cache_ok:
        reporter.warn(f"master cache unusable ({load.reason}): rescanning everything, no deletions this run")
    res = scan_tree(master_real, excluder=Excluder(patterns), cache=load.saved, walked=walked, hold=HOLD_BYTES,
                    split_reads=True, on_rehash=on_rehash)
    cache_ok = cache_ok and not res.cache_failed
    try:
        # Save a changed tree, and an unchanged one whose cache lacks the fingerprint it now has
        # (an older cache, or files that were racy-clean last time): the next run can skip decoding.
        if not res.unchanged or (res.fingerprint and load.saved is not None
                                 and load.saved.fingerprint != res.fingerprint):
            pending = None
            if saves is not None:
                pending = save_manifest_file_forked(cache_file, res.manifest, chunking.CHUNKER_ID,
                                                    res.fingerprint or None)
            if pending is not None:
                saves.append(pending)  # type: ignore[union-attr]
            else:
                save_manifest_file(cache_file, res.manifest, chunking.CHUNKER_ID, res.fingerprint or None)
    except OSError as e:
        reporter.warn(f"could not save the master cache {cache_file}: {e.strerror}")
    return res, cache_ok


def run_sync(cfg: SyncConfig, reporter: Reporter, should_stop: Callable[[], bool] = lambda: False,
             master_scan: tuple[ScanResult, bool] | None = None) -> RunSummary:
    """Mirror cfg.master to every replica. Fatal problems with the master raise; a fatal problem
    with one replica is recorded in its summary and the other replicas still run."""
    with gc_paused():
        return _run_sync(cfg, reporter, should_stop, master_scan)


def _run_sync(cfg: SyncConfig, reporter: Reporter, should_stop: Callable[[], bool],
              master_scan: tuple[ScanResult, bool] | None) -> RunSummary:
    watch = Stopwatch()
    master_real = check_master(cfg.master)
    for r in cfg.replicas:
        check_overlap(master_real, r)
        check_backup_dir(master_real, r, cfg.transport.backup_dir)
    check_replicas_apart(cfg.replicas)
    patterns = list(cfg.excludes) + read_ignore_file(master_real)
    run = RunSummary(master=cfg.master)
    walk = _prewalk_master(cfg, master_real, patterns) if master_scan is None else None
    early: dict[str, _EarlyReplica] = {}  # _sync_all takes each; what is left here was not reached
    saves: list[PendingSave] = []  # the master cache, saved by a child while the replicas run
    try:
        if master_scan is None:
            early = _open_early(cfg, master_real, patterns)
        mscan, cache_ok = master_scan or scan_master(master_real, patterns, reporter, saves, walk,
                                                     _precopier(cfg, early))
        _sync_all(cfg, master_real, patterns, mscan, cache_ok, early, run, reporter, should_stop)
    finally:
        if walk is not None and walk[1] is not None:
            walk[1].cancel()  # a no-op once the scan took it
        for e in early.values():
            e.abandon()
        for p in saves:
            why = p.wait()
            if why:
                reporter.warn(f"could not save the master cache {master_cache_path(master_real)}: {why}")
    run.seconds = watch.elapsed()
    return run


def _sync_all(cfg: SyncConfig, master_real: str, patterns: list[str], mscan: ScanResult, cache_ok: bool,
              early: dict[str, "_EarlyReplica"], run: RunSummary, reporter: Reporter,
              should_stop: Callable[[], bool]) -> None:
    run.scan_errors = list(mscan.errors)
    run.warnings = list(mscan.warnings)
    run.files_hashed, run.bytes_hashed = mscan.files_read, mscan.bytes_read
    for w in mscan.warnings:
        reporter.warn(w)
    for e in mscan.errors:
        reporter.error(str(e))
    fanned = _fan_out(cfg, master_real, patterns, mscan, cache_ok, early, run, reporter, should_stop)
    for spec in cfg.replicas:
        got = fanned.get(spec)
        if got is None:
            summary = _replica_turn(cfg, master_real, patterns, mscan, cache_ok, early, run, reporter, should_stop,
                                    spec)
        else:
            summary, said = got
            for name, args in said:  # what its worker said, after all the replicas before it
                getattr(reporter, name)(*args)
        run.replicas.append(summary)
        if not cfg.dry_run and summary.fatal is None:
            t = summary
            reporter.info(f"{spec}: {t.files_written} written, {t.files_deleted} deleted, "
                          f"sent {t.bytes_sent} B, reused {t.bytes_reused} B in {t.seconds:.2f}s")


def _fans_out(cfg: SyncConfig) -> bool:
    """Whether the replicas' turns may run at the same time (dirsync.fanout): two or more, not a
    dry run (its plans are printed by this process), and --jobs other than 1."""
    return len(cfg.replicas) >= 2 and not cfg.dry_run and cfg.jobs != 1


def _fan_out(cfg: SyncConfig, master_real: str, patterns: list[str], mscan: ScanResult, cache_ok: bool,
             early: dict[str, "_EarlyReplica"], run: RunSummary, reporter: Reporter,
             should_stop: Callable[[], bool]) -> dict:
    """Run the replicas' turns at the same time in forked workers (dirsync.fanout): each local
    one opened early, each remote one (connected by its worker: this process has no thread to
    fork with). Returns spec -> (summary, what its worker said) for those."""
    if not _fans_out(cfg):
        return {}
    specs = [s for s in cfg.replicas
             if early.get(s) is not None and early[s].transport is not None or is_remote_spec(s) and s not in early]
    if len(specs) < 2:
        return {}
    from dirsync.fanout import run_turns

    def turn(spec: str, opened: dict, rep: Reporter) -> ReplicaSummary:
        return _replica_turn(cfg, master_real, patterns, mscan, cache_ok, opened, run, rep, should_stop, spec)

    return run_turns(specs, turn, early, reporter, cfg.jobs)


def _replica_turn(cfg: SyncConfig, master_real: str, patterns: list[str], mscan: ScanResult, cache_ok: bool,
                  early: dict[str, "_EarlyReplica"], run: RunSummary, reporter: Reporter,
                  should_stop: Callable[[], bool], spec: str) -> ReplicaSummary:
    """One replica's whole turn: lock, open (or take it opened early), sync, record its status,
    unlock. Its failures end up in the summary it returns."""
    summary = ReplicaSummary(replica=spec)
    sw = Stopwatch()
    started = time.time()
    lock = None
    try:
        try:
            info = None
            opened = early.pop(spec, None)
            if opened is not None:
                lock, transport = opened.lock, opened.transport
                if opened.error is not None:
                    raise opened.error
                info = transport.open_finish()  # type: ignore[union-attr]
            else:
                if not cfg.dry_run:
                    lock = _pair_lock(cfg, master_real, spec)
                transport = open_transport(spec, cfg.transport)
            _sync_one(cfg, mscan, cache_ok, patterns, transport, summary, run, reporter, should_stop, info)
        except DirsyncError as e:
            summary.fatal = str(e)
            summary.exit_code = int(e.exit_code)
            summary.status = "refused" if e.exit_code in (ExitCode.REFUSED, ExitCode.DELETE_LIMIT) else "failed"
            reporter.fatal(f"{spec}: {e}", e.hint)
        summary.seconds = sw.elapsed()
        if summary.exit_code == 0 and summary.errors:
            summary.exit_code = int(ExitCode.PARTIAL)
            summary.status = "partial"
        if lock:  # still held: the status record and the run it describes are one step
            _record_status(master_real, spec, summary, run, started, cfg, reporter)
    finally:
        if lock:
            lock.release()
    return summary


def _prewalk_master(cfg: SyncConfig, master_real: str, patterns: list[str]) -> tuple[CacheLoad, Prewalk | None] | None:
    """With a remote replica, start the master's walk in a child (scan.Prewalk) before this
    process imports paramiko and connects (~0.3 s here), which then overlap it (when the turns
    fan out, the workers connect after the scan; the walk still overlaps this process decoding
    the master cache). Local replicas are walked by children instead (_open_early), beside the
    master's walk here."""
    if not any(is_remote_spec(r) for r in cfg.replicas):
        return None
    load = load_manifest_file(master_cache_path(master_real), chunking.CHUNKER_ID, lazy=True)
    return load, Prewalk.start(master_real, Excluder(patterns), load.saved.fingerprint if load.saved else b"", load.saved)


def _pair_lock(cfg: SyncConfig, master_real: str, spec: str) -> FileLock:
    return FileLock(pair_lock_path(master_real, _replica_key(spec)),
                    f"master/replica pair {cfg.master} -> {spec}").acquire(cfg.lock_wait_s)


class _EarlyReplica:
    """A replica locked and opened, its scan under way, before the master scan starts, so that
    its tree is walked while this side walks the master: the first remote replica (connected
    and sent open and scan; answers read later), or else every local one (walked by a child
    process, scan.Prewalk); when the turns fan out (_fans_out), every local one and no remote
    one (connecting starts threads, and the fan-out workers are forked later). A failure is
    kept and raised when the replica's turn comes (reported like any other)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.lock: FileLock | None = None
        self.transport = None
        self.error: DirsyncError | None = None

    def forget(self) -> None:
        """Drop this process's copy of a replica a forked worker took over (dirsync.fanout):
        descriptors closed, nothing unlocked, nothing on the replica touched."""
        if self.transport is not None:
            self.transport.forget()
        if self.lock is not None:
            self.lock.forget()

    def abandon(self) -> None:
        if self.transport is not None:
            try:
                self.transport.open_finish()
            except DirsyncError:
                pass
            else:
                self.transport.close(save=False)
        if self.lock is not None:
            self.lock.release()


def _open_early(cfg: SyncConfig, master_real: str, patterns: list[str]) -> dict[str, _EarlyReplica]:
    remote = next((r for r in cfg.replicas if is_remote_spec(r)), None)
    if _fans_out(cfg):  # every local one; the remote ones are connected by their fan-out workers
        specs = [r for r in cfg.replicas if not is_remote_spec(r)]
    else:
        specs = [remote] if remote is not None else list(cfg.replicas)
    early: dict[str, _EarlyReplica] = {}
    try:
        for spec in specs:
            e = early[spec] = _EarlyReplica(spec)
            t = None
            try:
                if not cfg.dry_run:
                    e.lock = _pair_lock(cfg, master_real, spec)
                t = open_transport(spec, cfg.transport)
                t.open_start(patterns, init=cfg.init, readonly=cfg.dry_run)  # type: ignore[attr-defined]
                e.transport = t
            except DirsyncError as err:
                e.error = err
                if t is not None:
                    t.close(save=False)
    except BaseException:
        for e in early.values():
            e.abandon()
        raise
    return early


def _precopier(cfg: SyncConfig, early: dict[str, _EarlyReplica]) -> Callable[[str, int], None] | None:
    """The master scan's on_rehash: the one replica's precopy (local: Replica.precopy; over
    SSH: the agent's hint), when it was opened early (not with several replicas: fan-out
    workers are forked after the scan, and a thread must not run then; nor in a dry run,
    which writes nothing)."""
    if cfg.dry_run or len(cfg.replicas) != 1:
        return None
    e = early.get(cfg.replicas[0])
    return getattr(e.transport, "precopy", None) if e is not None and e.transport is not None else None


def _record_status(master_real: str, spec: str, summary: ReplicaSummary, run: RunSummary, started: float,
                   cfg: SyncConfig, reporter: Reporter) -> None:
    from dirsync.status import record_run

    try:
        record_run(master_real, _replica_key(spec), summary, run_id=run.run_id, started=started,
                   profile=cfg.profile)
    except OSError as e:
        reporter.warn(f"{spec}: could not write the status record: {e.strerror or e}")


def check_backup_dir(master_real: str, replica: str, backup_dir: str | None) -> None:
    """Refuse a --backup-dir that would land inside the master (it would be synced)."""
    if not backup_dir:
        return
    d = os.path.expanduser(backup_dir)
    if not os.path.isabs(d):
        if is_remote_spec(replica):
            return  # relative to a remote root: never inside the local master
        d = os.path.join(os.path.abspath(replica), d)
    elif is_remote_spec(replica):
        return
    real = os.path.realpath(d)
    if real == master_real or real.startswith(master_real.rstrip("/") + "/"):
        raise ConfigError(f"backup dir {backup_dir} is inside the master {master_real}",
                          hint="put backups inside the replica or somewhere outside both trees")


def _replica_key(spec: str) -> str:
    return spec if is_remote_spec(spec) else os.path.abspath(spec)


def _sync_one(cfg: SyncConfig, mscan: ScanResult, cache_ok: bool, patterns: list[str], t: Transport,
              summary: ReplicaSummary, run: RunSummary, reporter: Reporter, should_stop: Callable[[], bool],
              info=None) -> None:
    """`info`: the transport was opened already (and may have a scan under way)."""
    if info is None:
        info = t.open(init=cfg.init, readonly=cfg.dry_run)
    ok = False
    try:
        for w in info.warnings:
            summary.warn(w)
            reporter.warn(f"{cfg.master} -> {t.name}: {w}")
        last = _last_in_step(cfg, t.name) if mscan.fingerprint else None
        if last is None or last.get("master") != mscan.fingerprint.hex():
            # Not in step before: a plan follows (unless the replica got there itself), against
            # the master's cache when the pair was in step with it (see below), so no copy of
            # the replica's manifest need be decoded for it.
            t.expect_plan(decode=not (mscan.base_manifest is not None and last is not None
                                      and last.get("master") == mscan.base[0].hex()))  # type: ignore[index]
        rscan = t.scan(patterns)
        for e in rscan.errors:
            summary.failed(e.path, e)
            reporter.error(f"{t.name}: {e}")
        deletes_ok = cfg.delete and cache_ok and info.deletes_allowed and not rscan.errors
        step = _in_step_key(mscan, rscan, deletes_ok, info)
        if step is not None and step == last:
            # Both trees are exactly as when a run last found them in step (fingerprints of every
            # path's stat facts, caches all racy-clean): the plan would be empty; skip making it.
            summary.in_step = step
            summary.planned = False
            if cfg.dry_run:
                run.plans.append((t.name, Plan(())))
                summary.status = "dry-run"
            ok = True
            return
        small = {"commit_replaced": REPLACED_BATCH} if info.frees_linger else {}  # (see REPLACED_BATCH)
        opts = PlanOptions(delete=deletes_ok, protect=frozenset(mscan.protect), local=not t.is_remote,
                           dir_moves=0 if cfg.transport.backup_dir else t.dir_moves, **small)
        mman = mscan.manifest
        if info.reserved:  # the replica's own backup dir: nothing of the master goes there
            from dirsync.verify import filter_manifest

            mman = filter_manifest(mman, [], info.reserved)
            if len(mman.entries) != len(mscan.manifest.entries):
                summary.warn(f"master entries under {', '.join(info.reserved)} are not synced: "
                             "the replica keeps its backups there")
        only = _changed_since_in_step(mscan, last, step, deletes_ok, info)
        # In step, the replica holds at every path what the master's cache holds (content and
        # metadata, all the planner reads; chunk boundaries may differ, not the bytes): it is
        # planned against that cache, decoded by the master scan already, and the replica's
        # cache (a remote one's, and our copy of it) is read only at the rows its writes touch
        # (Replica.current, RemoteTransport._scanned_rows).
        rman = mscan.base_manifest if only is not None and mscan.base_manifest is not None else rscan.manifest
        plan = diff(mman, rman, opts, only)
        plan = _guard_deletes(cfg, mman, rman, plan, opts, summary, reporter, t.name)
        for path, why in plan.skipped:
            summary.warn(f"skipped {display_path(path)}: {why}")
        if step is not None and not plan.actions and not plan.skipped and summary.fatal is None:
            summary.in_step = step
        if cfg.dry_run:
            run.plans.append((t.name, plan))
            summary.status = "dry-run"
            ok = True
            return
        totals = plan.totals()
        summary.on_progress = reporter.advance
        reporter.begin(str(t.name), totals.send_bytes + totals.reuse_bytes)
        try:
            throttle = TokenBucket(cfg.bwlimit) if cfg.bwlimit else None  # one bucket per replica
            t.apply(plan.actions, MasterReader(os.path.realpath(cfg.master), throttle, mscan.held), summary,
                    should_stop)
        finally:
            reporter.end()
        reporter.item_errors(str(t.name), summary.errors, skip=rscan.errors)
        for w in summary.warnings:
            if w not in info.warnings:
                reporter.warn(f"{t.name}: {w}")
        ok = True
        done = _in_step_key(mscan, rscan, deletes_ok, info, after=True)
        if done is None or plan.skipped or summary.errors or summary.warnings or summary.fatal or should_stop():
            done = None
    finally:
        t.close(save=ok)
    # The whole plan was carried out cleanly: the replica now is what the master was when it
    # was scanned. Note both trees as in step as they were left (the replica by the cache its
    # close saved), so that the next run skips planning when neither changed since.
    fp = getattr(t, "closed_fingerprint", b"") if done is not None else b""
    if fp:
        summary.in_step = {**done, "replica": fp.hex()}


def _in_step_key(mscan: ScanResult, rscan: ScanResult, deletes_ok: bool, info, after: bool = False) -> dict | None:
    """What must hold again for an earlier "in step" finding to stand, or None when this run
    cannot take or give one (a tree without a fingerprint, anything reported while scanning).
    `after`: for the replica as this run leaves it (its fingerprint is filled in later)."""
    if not (mscan.fingerprint and (after or rscan.fingerprint)) or mscan.errors or mscan.warnings \
            or rscan.errors or rscan.warnings or info.warnings:
        return None
    return {"master": mscan.fingerprint.hex(), "replica": "" if after else rscan.fingerprint.hex(),
            "opts": f"delete={int(deletes_ok)} reserved={'/'.join(info.reserved)}"}


def _changed_since_in_step(mscan: ScanResult, last: dict | None, step: dict | None, deletes_ok: bool,
                           info) -> set[str] | None:
    """The master paths that may differ on the replica, when this is known without comparing
    every path: the last run left (or found) the pair in step, with the master as the cache this
    scan started from records it (same fingerprint) and the replica as it is now (same
    fingerprint, same options). The replica then holds what that cache holds at every path,
    so only the paths whose entry this scan did not take over from the cache can differ
    (diff's `only`). None otherwise (diff compares every path): a scan not started from a
    saved cache, or a replica keeping a backup dir or kept without deletes (it may hold paths
    the master never had)."""
    base = mscan.base
    if (base is None or last is None or step is None or not deletes_ok or info.reserved
            or last.get("opts") != step["opts"] or last.get("replica") != step["replica"]
            or last.get("master") != base[0].hex()):
        return None
    return base[1]


def _last_in_step(cfg: SyncConfig, name: str) -> dict | None:
    from dirsync.status import load_in_step

    return load_in_step(os.path.realpath(cfg.master), _replica_key(name))


def _guard_deletes(cfg: SyncConfig, master: Manifest, replica: Manifest, plan: Plan, opts: PlanOptions,
                   summary: ReplicaSummary, reporter: Reporter, name: str) -> Plan:
    """Mass-delete guards, checked on the plan before anything is deleted."""
    deletes = plan.deletes()
    if not deletes:
        return plan
    n_master = len(master.entries) - ("" in master.entries)
    n_replica = len(replica.entries) - ("" in replica.entries)
    if not cfg.allow_mass_delete and n_master == 0 and n_replica > 0:
        raise RefusedError(
            f"master {cfg.master} is empty but replica {name} holds {n_replica} entries; refusing to delete them",
            hint="if the master really is meant to be empty, pass --allow-mass-delete")
    if cfg.max_delete is not None:
        tripped = len(deletes) > cfg.max_delete
        limit = f"--max-delete {cfg.max_delete}"
    else:
        # Count only deletes whose content the master no longer has anywhere: a renamed or moved
        # directory deletes many paths but loses nothing, and must not trip the guard.
        lost = [d for d in deletes if d.kind != "d"]
        n_files = sum(1 for e in replica.entries.values() if e.kind != "d")
        if not cfg.allow_mass_delete and len(lost) >= MASS_DELETE_MIN and 2 * len(lost) > n_files:
            kept = {(f.size, f.digest) for f in master.files()}  # (only when the guard could trip)
            lost = [d for d in lost if not (
                isinstance(e := replica.entries.get(d.path), FileEntry) and (e.size, e.digest) in kept)]
        tripped = (not cfg.allow_mass_delete and len(lost) >= MASS_DELETE_MIN and 2 * len(lost) > n_files)
        limit = f"the default guard ({len(lost)} of {n_files} replica files would be gone from both sides)"
    if not tripped:
        return plan
    msg = (f"{name}: {len(deletes)} deletions planned, over {limit}; nothing was deleted "
           "(pass --max-delete N or --allow-mass-delete to allow it)")
    summary.fatal = msg
    summary.exit_code = int(ExitCode.DELETE_LIMIT)
    summary.status = "refused"
    reporter.error(msg)
    safe = opts.replace(delete=False)
    return diff(master, replica, safe)
