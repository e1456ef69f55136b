"""Per-pair status records ("when was this replica last synced, by which run") and `dirsync status`.

At the end of every real (not dry-run) sync of a master/replica pair, while still holding the
pair lock, sync.py writes one small JSON record per pair:

  $XDG_STATE_HOME/dirsync/status/<hash of master+replica>.json
  {
    "format": 1,
    "master": "/home/me/site",            real path of the master
    "replica": "/backup/site",            the replica as given (absolute for local paths)
    "last_run":     RUN,                  the latest run, whatever its outcome
    "last_success": RUN | null            the latest run that exited 0 for this replica
  }
  RUN = {"run_id": "20261126T101500Z-3f9a1c", "profile": "backup" | null,
         "started": "2026-11-26T10:15:00Z", "finished": "2026-11-26T10:15:02Z",
         "finished_ts": 1795687502.1, "exit_code": 0, "status": "ok",
         "files_written": 3, "files_deleted": 1, "bytes_sent": 1234, "bytes_reused": 0,
         "errors": 0, "seconds": 1.9, "pid": 4242, "host": "backup-box"}

Beside it, when the run found the two in step (or left them so), its in-step note, which lets
the next run skip planning (see sync.py), as four lines: "dirsync in-step 1", the master's
fingerprint, the replica's (hex), the options it holds for ("delete=1 reserved=...", to the
end): <hash>.step. It is written without fsync: a note that is lost or stale names
fingerprints the trees no longer match, and the next run plans as without one. Both are read
and written without importing json (its import, with re and enum, is ~7 ms of every small
run's start-up): the record through dumps, which writes what json.dumps(indent=1) does (and
sync's --json summary through it too).

Two-way pairs (`sync --two-way`, a `two_way` profile, `watch --two-way`) get their own record,
written by the glue around run_twoway (`run_twoway_recorded`, under a per-pair lock), never by
twoway.py itself. The pair is unordered (A B and B A are one pair):

  $XDG_STATE_HOME/dirsync/status/two-way-<hash of both sides>.json
  {"format": 1, "two_way": true, "a": "/home/me/notes", "b": "usb:/notes",   sides as last run
   "runs": 42,                            real runs recorded for the pair (a watcher's included)
   "last_run": RUN2, "last_success": RUN2 | null}
  RUN2 = RUN (above) plus "conflicts": N (conflicts settled, with or without copies),
         "conflict_copies": N (kept as .sync-conflict- copies: exit 4) and "decisions":
         {"a_to_b", "b_to_a", "merged", "deleted_on_a", "deleted_on_b", "conflicts"}; a run that
         failed before it could sync has "error". A run that kept conflict copies (exit 4)
         counts as a success: both sides ended equal.

`dirsync status` reads these records and, unless `--no-check`, makes a dry-run plan per replica
(for a two-way pair: a dry-run two-way run) to tell whether it is behind now (a plan is not empty).
"""

from __future__ import annotations

import os
import time

from dirsync.record import Record
from dirsync.state import FileLock, _key, state_home, write_atomic

FORMAT = 1


def status_path(master_real: str, replica_key: str) -> str:
    return os.path.join(state_home(), "status", _key(master_real, replica_key) + ".json")


def step_path(master_real: str, replica_key: str) -> str:
    return os.path.join(state_home(), "status", _key(master_real, replica_key) + ".step")


_STEP = "dirsync in-step 1"


def load_in_step(master_real: str, replica_key: str) -> dict | None:
    """The pair's in-step note {"master", "replica", "opts"} (see above), or None."""
    try:
        with open(step_path(master_real, replica_key), "rb") as f:
            parts = f.read(1 << 16).decode("utf-8", "surrogateescape").split("\n", 3)
    except OSError:
        return None
    if len(parts) != 4 or parts[0] != _STEP:
        return None
    return {"master": parts[1], "replica": parts[2], "opts": parts[3]}


def _save_in_step(master_real: str, replica_key: str, step: dict | None) -> None:
    path = step_path(master_real, replica_key)
    if step is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    text = "\n".join((_STEP, step["master"], step["replica"], step["opts"]))
    write_atomic(path, text.encode("utf-8", "surrogateescape"), durable=False)


def dumps(obj, indent: int = 1) -> str:
    """json.dumps(obj, indent=indent) for what a record or a run's --json summary holds (dict,
    list, tuple, str, int, float, bool, None), without importing json (see above): byte for
    byte its text, strings through its own C escaper (_json's)."""
    return _dumps(obj, "\n", " " * indent)


def _dumps(obj, ind: str = "\n", step: str = " ") -> str:
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    c = obj.__class__
    if c is str:
        return _quote(obj)
    if c is int:
        return int.__repr__(obj)
    if c is float:
        if obj != obj or obj in (float("inf"), float("-inf")):
            return "NaN" if obj != obj else "Infinity" if obj > 0 else "-Infinity"
        return float.__repr__(obj)
    inner = ind + step
    if c is dict:
        if not obj:
            return "{}"
        for k in obj:
            if k.__class__ is not str:
                raise TypeError(f"record keys are strings, not {k!r}")
        return "{" + ",".join(inner + _quote(k) + ": " + _dumps(v, inner, step) for k, v in obj.items()) + ind + "}"
    if c in (list, tuple):
        if not obj:
            return "[]"
        return "[" + ",".join(inner + _dumps(v, inner, step) for v in obj) + ind + "]"
    raise TypeError(f"a record holds no {c.__name__}")


try:
    from _json import encode_basestring_ascii as _quote
except ImportError:  # (not CPython)
    from json.encoder import encode_basestring_ascii as _quote


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _read_record(path: str) -> dict | None:
    """A status record of this format, or None when there is none (or it is unreadable)."""
    import json  # (here: `dirsync status`, a failed run's record; see above)

    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def load_record(master_real: str, replica_key: str) -> dict | None:
    """The pair's record, or None when there is none (or it is unreadable)."""
    return _read_record(status_path(master_real, replica_key))


def _run_fields(run_id: str, profile: str | None, started: float, now: float, code: int, status: str) -> dict:
    """The fields every run record starts with (one-way and two-way alike)."""
    return {"run_id": run_id, "profile": profile, "started": iso(started), "finished": iso(now),
            "finished_ts": round(now, 3), "exit_code": code, "status": status}


def _process_fields() -> dict:
    return {"pid": os.getpid(), "host": os.uname().nodename}  # nodename = gethostname(), no socket import


def record_run(master_real: str, replica_key: str, summary, *, run_id: str, started: float,
               profile: str | None = None) -> None:
    """Write the pair's record after a run (call with the pair lock held). Raises OSError."""
    now = time.time()
    run = {
        **_run_fields(run_id, profile, started, now, summary.exit_code, summary.status),
        "files_written": summary.files_written,
        "files_deleted": summary.files_deleted,
        "bytes_sent": summary.bytes_sent,
        "bytes_reused": summary.bytes_reused,
        "errors": len(summary.errors),
        "seconds": round(summary.seconds, 3),
        **_process_fields(),
    }
    rec = {
        "format": FORMAT,
        "master": master_real,
        "replica": replica_key,
        "last_run": run,
        "last_success": run if summary.exit_code == 0 else (load_record(master_real, replica_key) or {}).get(
            "last_success"),
    }
    write_atomic(status_path(master_real, replica_key), (dumps(rec) + "\n").encode())
    _save_in_step(master_real, replica_key, summary.in_step or None)


def running_pid(master_real: str, replica_key: str) -> int | None:
    """Best effort: the pid written in the pair's lock file, if that process is alive."""
    from dirsync.state import pair_lock_path

    return _lock_holder(pair_lock_path(master_real, replica_key))


def _lock_holder(lock_path: str) -> int | None:
    """Only reads the file: taking the lock, even briefly, could make a real run exit 3."""
    try:
        with open(lock_path, encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


class PairStatus(Record):
    _fields = (
        "replica", "record", "running_pid", "behind", "pending", "error", "exit_code", "two_way", "side_a",
    )

    def __init__(
        self,
        replica: str,
        record: dict | None = None,
        running_pid: int | None = None,
        behind: bool | None = None,  # None: not checked (or the check failed)
        pending: dict | None = None,  # the dry-run plan's totals
        error: str | None = None,
        exit_code: int = 0,  # of the check, when it failed
        two_way: bool = False,
        side_a: str | None = None,  # two-way: the other side (`replica` is side b)
    ) -> None:
        self.replica = replica
        self.record = record
        self.running_pid = running_pid
        self.behind = behind
        self.pending = pending
        self.error = error
        self.exit_code = exit_code
        self.two_way = two_way
        self.side_a = side_a

    def to_json(self) -> dict:
        rec = self.record or {}
        out = {
            "replica": self.replica,
            "two_way": self.two_way,
            "last_success": rec.get("last_success"),
            "last_run": rec.get("last_run"),
            "running_pid": self.running_pid,
            "behind": self.behind,
            "pending": self.pending,
            "error": self.error,
        }
        if self.two_way:
            out["a"], out["b"], out["runs"] = self.side_a, self.replica, rec.get("runs", 0)
        return out

    def render(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        rec = self.record or {}
        ok, last = rec.get("last_success"), rec.get("last_run")
        if self.error:
            state = f"CHECK FAILED: {self.error}"
        elif self.behind is None:
            state = "not checked"
        elif self.behind and self.two_way:
            p = self.pending or {}
            state = (f"BEHIND ({p.get('a_to_b', 0)} a → b, {p.get('b_to_a', 0)} a ← b, "
                     f"{p.get('deleted_on_a', 0) + p.get('deleted_on_b', 0)} to delete, "
                     f"{p.get('conflicts', 0)} conflict(s))")
        elif self.behind:
            p = self.pending or {}
            moves = f", {p['dir_moves']} dirs to move" if p.get("dir_moves") else ""
            state = (f"BEHIND ({p.get('writes', 0)} to write, {p.get('deletes', 0)} to delete{moves}, "
                     f"{_size(p.get('send_bytes', 0))} to send)")
        else:
            state = "up to date"
        name = f"{self.side_a} ⇄ {self.replica} (two-way)" if self.two_way else self.replica
        parts = [f"{name}: {state}"]
        if ok:
            parts.append(f"last synced {ok['finished']} ({_ago(now - ok['finished_ts'])} ago) by run {ok['run_id']}"
                         + (f" (profile {ok['profile']})" if ok.get("profile") else "")
                         + (f", {ok['conflict_copies']} conflict copy(ies) kept" if ok.get("conflict_copies") else ""))
        else:
            parts.append("never synced successfully")
        if last and last is not ok and last != ok:
            parts.append(f"last run {last['run_id']} at {last['finished']} exited {last['exit_code']} "
                         f"({last['status']})" + (f": {last['error']}" if last.get("error") else ""))
        if self.running_pid:
            parts.append(f"a run is in progress (pid {self.running_pid})")
        return "\n    ".join(parts)


def _ago(s: float) -> str:
    s = max(0, int(s))
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s // n} {unit}"
    return f"{s} s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_status(cfg, reporter, *, check: bool = True) -> list[PairStatus]:
    """Status of every replica of `cfg` (a sync.SyncConfig): records, and a dry-run plan each."""
    from dirsync.errors import DirsyncError
    from dirsync.sync import _replica_key, run_sync

    out = [PairStatus(r) for r in cfg.replicas]
    try:
        real = os.path.realpath(cfg.master)
        for ps in out:
            key = _replica_key(ps.replica)
            ps.record = load_record(real, key)
            ps.running_pid = running_pid(real, key)
        if not check:
            return out
        run = run_sync(cfg.replace(dry_run=True), reporter)
    except DirsyncError as e:
        for ps in out:
            ps.error, ps.exit_code = str(e), int(e.exit_code)
        return out
    plans = dict(run.plans)
    for ps, summary in zip(out, run.replicas):
        if summary.fatal:  # refused, unreachable ... (a tripped delete guard still has a plan)
            ps.error, ps.exit_code = summary.fatal, summary.exit_code or 1
        plan = plans.get(ps.replica)
        if plan is None:
            continue
        t = plan.totals()
        ps.behind = bool(plan.actions)
        ps.pending = {"actions": len(plan.actions), "writes": t.writes, "deletes": t.deletes,
                      "send_bytes": t.send_bytes, "reuse_bytes": t.reuse_bytes, "mkdirs": t.mkdirs,
                      "links": t.links, "meta": t.meta, "dir_moves": t.dir_moves}
    return out


# -- two-way pairs ---------------------------------------------------------------------------


def side_key(spec: str) -> str:
    """How a two-way side is named in records and lock names: a remote spec as given, a local
    path as its real path (as twoway.py's base records name it)."""
    from dirsync.transport import is_remote_spec

    return spec if is_remote_spec(spec) else os.path.realpath(spec)


def twoway_pair_id(a: str, b: str) -> str:
    """Names the unordered pair: `A B` and `B A` share one record, one lock and one watcher."""
    return "two-way-" + _key("two-way", *sorted((side_key(a), side_key(b))))


def twoway_status_path(a: str, b: str) -> str:
    return os.path.join(state_home(), "status", twoway_pair_id(a, b) + ".json")


def twoway_lock_path(a: str, b: str) -> str:
    """One two-way run at a time per pair (the sides' own locks only cover one run's open sides)."""
    return os.path.join(state_home(), "locks", twoway_pair_id(a, b) + ".lock")


def load_twoway_record(a: str, b: str) -> dict | None:
    rec = _read_record(twoway_status_path(a, b))
    return rec if rec is not None and rec.get("two_way") else None


def _twoway_status(code: int) -> str:
    names = {0: "ok", 4: "conflicts", 23: "partial", 25: "refused", 12: "refused", 130: "interrupted"}
    return names.get(code, "failed")


def record_twoway_run(a: str, b: str, summ, *, run_id: str, started: float, profile: str | None = None,
                      error=None) -> None:
    """Write the pair's record after a real run (call with twoway_lock_path held). `summ` is the
    TwoWaySummary, or None with `error` (the DirsyncError that stopped the run). Raises OSError."""
    now = time.time()
    sides = summ.sides if summ is not None else []
    counts = summ.decisions.counts() if summ is not None and summ.decisions else {}
    conflicts = summ.conflicts if summ is not None else []
    code = summ.exit_code if summ is not None else int(error.exit_code)
    run = {
        **_run_fields(run_id, profile, started, now, code, _twoway_status(code)),
        "conflicts": len(conflicts),
        "conflict_copies": sum(1 for c in conflicts if c.copy),
        "decisions": {"a_to_b": counts.get("a>b", 0), "b_to_a": counts.get("b>a", 0),
                      "merged": counts.get("both", 0), "deleted_on_a": counts.get("del-a", 0),
                      "deleted_on_b": counts.get("del-b", 0), "conflicts": counts.get("conflict", 0)},
        "files_written": sum(s.files_written for s in sides),
        "files_deleted": sum(s.files_deleted for s in sides),
        "bytes_sent": sum(s.bytes_sent for s in sides),
        "bytes_reused": sum(s.bytes_reused for s in sides),
        "errors": sum(len(s.errors) for s in sides) + (len(summ.scan_errors) if summ is not None else 0),
        "seconds": round(summ.seconds if summ is not None else now - started, 3),
        **_process_fields(),
    }
    if error is not None:
        run["error"] = str(error)
    old = load_twoway_record(a, b) or {}
    rec = {
        "format": FORMAT,
        "two_way": True,
        "a": side_key(a),
        "b": side_key(b),
        "runs": int(old.get("runs", 0)) + 1,
        "last_run": run,
        "last_success": run if code in (0, 4) else old.get("last_success"),
    }
    write_atomic(twoway_status_path(a, b), (dumps(rec) + "\n").encode())


def run_twoway_recorded(cfg, reporter, should_stop=lambda: False, *, profile: str | None = None,
                        wait_s: float = 0.0):
    """One real two-way run (cfg: a TwoWayConfig, not dry-run) under the pair lock, recorded in
    the pair's status record. Returns (TwoWaySummary, run_id). Raises LockedError when another
    run holds the pair (after `wait_s`), and whatever DirsyncError stopped the run (recorded
    first). A status record that cannot be written is a warning."""
    from dirsync.errors import DirsyncError
    from dirsync.sync import new_run_id
    from dirsync.twoway import run_twoway

    assert not cfg.dry_run, "dry runs are neither locked nor recorded"
    lock = FileLock(twoway_lock_path(cfg.a, cfg.b), f"two-way pair {cfg.a} ⇄ {cfg.b}").acquire(wait_s)
    try:
        run_id, started = new_run_id(), time.time()
        summ = err = None
        try:
            summ = run_twoway(cfg, reporter, should_stop)
        except DirsyncError as e:
            err = e
        try:
            record_twoway_run(cfg.a, cfg.b, summ, run_id=run_id, started=started, profile=profile, error=err)
        except OSError as e:
            reporter.warn(f"{cfg.a} ⇄ {cfg.b}: could not write the status record: {e.strerror or e}")
        if err is not None:
            raise err
        return summ, run_id
    finally:
        lock.release()


def check_twoway_status(cfg, reporter, *, check: bool = True) -> PairStatus:
    """Status of a two-way pair (cfg: a TwoWayConfig): its record, and a dry-run two-way run."""

    from dirsync.errors import DirsyncError
    from dirsync.twoway import run_twoway

    ps = PairStatus(cfg.b, two_way=True, side_a=cfg.a)
    ps.record = load_twoway_record(cfg.a, cfg.b)
    ps.running_pid = _lock_holder(twoway_lock_path(cfg.a, cfg.b))
    if not check:
        return ps
    try:
        summ = run_twoway(cfg.replace(dry_run=True), reporter)
    except DirsyncError as e:
        ps.error, ps.exit_code = str(e), int(e.exit_code)
        return ps
    dec, plans = summ.decisions, summ.plans or ()
    c = dec.counts() if dec else {}
    ps.behind = any(not p.empty for p in plans) or bool(summ.carried)
    ps.pending = {"a_to_b": c.get("a>b", 0), "b_to_a": c.get("b>a", 0), "merged": c.get("both", 0),
                  "deleted_on_a": c.get("del-a", 0), "deleted_on_b": c.get("del-b", 0),
                  "conflicts": c.get("conflict", 0)}
    for side, p in zip("ab", plans):
        t = p.totals()
        ps.pending[side] = {"actions": len(p.actions), "writes": t.writes, "deletes": t.deletes,
                            "send_bytes": t.send_bytes, "reuse_bytes": t.reuse_bytes}
    return ps
