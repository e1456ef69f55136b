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
    "in_step": {"master": FP, "replica": FP, "opts": "..."}   (only when this run found the two
                                          in step; lets the next run skip planning, see sync.py)
  }
  RUN = {"run_id": "20261126T101500Z-3f9a1c", "profile": "backup" | null,
         "started": "2026-11-26T10:15:00Z", "finished": "2026-11-26T10:15:02Z",
         "finished_ts": 1795687502.1, "exit_code": 0, "status": "ok",
         "files_written": 3, "files_deleted": 1, "bytes_sent": 1234, "bytes_reused": 0,
         "errors": 0, "seconds": 1.9, "pid": 4242, "host": "backup-box"}

`dirsync status` reads these records and, unless `--no-check`, makes a dry-run plan per replica
to tell whether it is behind the master now (the plan is not empty).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from dirsync.state import _key, state_home, write_atomic

FORMAT = 1


def status_path(master_real: str, replica_key: str) -> str:
    return os.path.join(state_home(), "status", _key(master_real, replica_key) + ".json")


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def load_record(master_real: str, replica_key: str) -> dict | None:
    """The pair's record, or None when there is none (or it is unreadable)."""
    try:
        with open(status_path(master_real, replica_key), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None


def record_run(master_real: str, replica_key: str, summary, *, run_id: str, started: float,
               profile: str | None = None) -> None:
    """Write the pair's record after a run (call with the pair lock held). Raises OSError."""
    now = time.time()
    run = {
        "run_id": run_id,
        "profile": profile,
        "started": iso(started),
        "finished": iso(now),
        "finished_ts": round(now, 3),
        "exit_code": summary.exit_code,
        "status": summary.status,
        "files_written": summary.files_written,
        "files_deleted": summary.files_deleted,
        "bytes_sent": summary.bytes_sent,
        "bytes_reused": summary.bytes_reused,
        "errors": len(summary.errors),
        "seconds": round(summary.seconds, 3),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    old = load_record(master_real, replica_key) or {}
    rec = {
        "format": FORMAT,
        "master": master_real,
        "replica": replica_key,
        "last_run": run,
        "last_success": run if summary.exit_code == 0 else old.get("last_success"),
    }
    if summary.in_step:
        rec["in_step"] = summary.in_step
    write_atomic(status_path(master_real, replica_key), (json.dumps(rec, indent=1) + "\n").encode())


def running_pid(master_real: str, replica_key: str) -> int | None:
    """Best effort: the pid written in the pair's lock file, if that process is alive.

    Only reads the file: taking the lock, even briefly, could make a real run exit 3."""
    from dirsync.state import pair_lock_path

    try:
        with open(pair_lock_path(master_real, replica_key), encoding="ascii") as f:
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


@dataclass
class PairStatus:
    replica: str
    record: dict | None = None
    running_pid: int | None = None
    behind: bool | None = None  # None: not checked (or the check failed)
    pending: dict | None = None  # the dry-run plan's totals
    error: str | None = None
    exit_code: int = 0  # of the check, when it failed

    def to_json(self) -> dict:
        rec = self.record or {}
        return {
            "replica": self.replica,
            "last_success": rec.get("last_success"),
            "last_run": rec.get("last_run"),
            "running_pid": self.running_pid,
            "behind": self.behind,
            "pending": self.pending,
            "error": self.error,
        }

    def render(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        rec = self.record or {}
        ok, last = rec.get("last_success"), rec.get("last_run")
        if self.error:
            state = f"CHECK FAILED: {self.error}"
        elif self.behind is None:
            state = "not checked"
        elif self.behind:
            p = self.pending or {}
            state = (f"BEHIND ({p.get('writes', 0)} to write, {p.get('deletes', 0)} to delete, "
                     f"{_size(p.get('send_bytes', 0))} to send)")
        else:
            state = "up to date"
        parts = [f"{self.replica}: {state}"]
        if ok:
            parts.append(f"last synced {ok['finished']} ({_ago(now - ok['finished_ts'])} ago) by run {ok['run_id']}"
                         + (f" (profile {ok['profile']})" if ok.get("profile") else ""))
        else:
            parts.append("never synced successfully")
        if last and last is not ok and last != ok:
            parts.append(f"last run {last['run_id']} at {last['finished']} exited {last['exit_code']} "
                         f"({last['status']})")
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
        from dataclasses import replace

        run = run_sync(replace(cfg, dry_run=True), reporter)
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
                      "links": t.links, "meta": t.meta}
    return out
