#!/usr/bin/env python3
"""dirsync vs rsync benchmark: same generated data, same machine, same run.

    python bench/run.py [--quick] [--cases a,b,...] [--runs N] [--no-ssh] [--keep]

See bench/README.md for what each case does and how to read the table.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import data  # noqa: E402
from fs import FsError, LoopFs, bench_python, loop_possible, python_env  # noqa: E402
from proxy import CountingProxy  # noqa: E402
from sshd import Sshd, SshdError, descendants  # noqa: E402

# ---------------------------------------------------------------------------
# Cases (run in this order)


# A run starts once the master's last change is this old, as a cron job's run does: dirsync
# does not trust what it recorded of a file stamped within its last 0.1 s (the stamps come
# from a coarse clock: scan.RACY_NS), so a change made just before a run is read again by
# the run after it, and that run cannot be planned from the changes alone. rsync is
# unaffected either way.
SETTLE_S = 0.25


def settle_after(changed_at: float) -> None:
    left = changed_at + SETTLE_S - time.monotonic()
    if left > 0:
        time.sleep(left)


@dataclass(frozen=True)
class Case:
    name: str
    dataset: str
    kind: str  # initial | noop | change
    desc: str
    mutation: str | None = None
    replicas: int = 1
    pool: str = "main"  # replicas are shared by cases of the same pool and dataset
    rsync_opts: tuple = ()
    dirsync_opts: tuple = ()
    transports: tuple = ("local", "ssh")
    floor: bool = False  # also time `cp -a` (local initial copies)
    delta_local: bool = False  # rsync --no-whole-file locally too (it is the default over ssh)


CASES = [
    Case("many-initial", "many", "initial", "many small files (0-4 KiB) into an empty replica", floor=True),
    Case("mixed-initial", "mixed", "initial", "mixed tree into an empty replica", floor=True),
    Case("many-noop", "many", "noop", "re-run on the many-files tree, nothing changed"),
    Case("mixed-noop", "mixed", "noop", "re-run on the mixed tree, nothing changed"),
    Case("mixed-change", "mixed", "change", "1% of files appended/edited/deleted/renamed/new", mutation="mixed"),
    Case("bigedit", "big", "change", "16 scattered 64 KiB overwrites in one big file", mutation="bigedit",
         delta_local=True),
    Case("insert", "big", "change", "100 bytes inserted at offset 0 and in the middle of the big file",
         mutation="insert", delta_local=True),
    Case("move", "move", "change", "directory of large files renamed into another parent", mutation="move"),
    Case("source", "source", "change", "release-like update of a source tree", mutation="release"),
    Case("source-z", "source", "change", "same update, rsync -z vs dirsync --compress", mutation="release",
         rsync_opts=("-z",), dirsync_opts=("--compress",), transports=("ssh",)),
    Case("fanout-initial", "mixed", "initial", "mixed tree into 3 empty replicas: one dirsync run vs 3 rsync runs",
         replicas=3, pool="fan"),
    Case("fanout-change", "mixed", "change", "1% change to 3 replicas: one dirsync run vs 3 rsync runs",
         mutation="mixed", replicas=3, pool="fan"),
]
CASE_NAMES = [c.name for c in CASES]


# ---------------------------------------------------------------------------
# Small helpers


def now() -> float:
    return time.perf_counter()


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}" if n / k < 100 else f"{n / k:.0f} {unit}"
    return f"{int(n)} B"


def fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fs_type(path: str) -> str:
    best, typ = "", "?"
    path = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, t, opts = line.split()[:4]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, typ = mnt, f"{t} ({opts}) on {mnt}"
    except OSError:
        pass
    return typ


def first_error_line(text: str) -> str:
    lines = [ln.strip(" \t│╭╮╰╯─") for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):  # a Python exception line (e.g. from a traceback) names the cause
        if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", ln):
            return ln[:300]
    for ln in reversed(lines):  # else the last "error"-ish line
        if re.search(r"error|denied|refused|failed|no such|not found|unknown|usage|invalid|cannot|lost",
                     ln, re.I):
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


@dataclass
class Proc:
    rc: int
    wall: float
    maxrss_kb: int
    cpu: float
    stdout: str
    stderr: str
    timed_out: bool = False


# ru_maxrss of a child forked from this (large) Python process starts at the parent's
# own high-water mark: exec records the old mm's peak.  So the command is started by
# a small launcher that forks it and reports the grandchild's peak RSS: GNU time
# (~1 MB image) if installed, else `python -S` (~8 MB floor, noted in the results).
_PY_LAUNCHER = (
    "import os,sys\n"
    "out,argv=sys.argv[1],sys.argv[2:]\n"
    "pid=os.fork()\n"
    "if pid==0:\n"
    "    try: os.execvp(argv[0],argv)\n"
    "    except OSError as e: sys.stderr.write(f'{argv[0]}: {e}\\n'); os._exit(127)\n"
    "_,st,ru=os.wait4(pid,0)\n"
    "open(out,'w').write(str(ru.ru_maxrss))\n"
    "c=os.waitstatus_to_exitcode(st)\n"
    "sys.exit(c if c>=0 else 128-c)\n"
)


def _find_launcher() -> tuple[list[str], str]:
    t = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if t:
        try:
            v = subprocess.run([t, "--version"], capture_output=True, text=True, timeout=10)
            if "GNU" in v.stdout + v.stderr:
                return [t, "-f", "%M", "-o", "{out}", "--"], "GNU time (%M of the command)"
        except (OSError, subprocess.SubprocessError):
            pass
    return [sys.executable, "-S", "-c", _PY_LAUNCHER, "{out}"], "python -S launcher (~8 MB floor)"


LAUNCHER, RSS_METHOD = _find_launcher()


def run_cmd(argv: list[str], env: dict | None = None, timeout: float = 600, cwd: str | None = None) -> Proc:
    """Run argv; return its wall time (spawn to reap), peak RSS and CPU time.

    Peak RSS comes from the launcher (see above): the largest of the command and the
    descendants it reaped (rsync's receiver, the ssh client).  CPU time is from wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="bench-rss-") as rssf:
        full = [x.replace("{out}", rssf.name) for x in LAUNCHER] + list(argv)
        killed = threading.Event()
        t0 = now()
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
                             start_new_session=True)

        def kill() -> None:
            killed.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            while True:
                try:
                    _, status, ru = os.wait4(p.pid, 0)
                    break
                except InterruptedError:
                    continue
        except BaseException:
            kill()
            raise
        t1 = now()
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        rc = p.returncode
        if rc < 0:
            rc = 128 - rc
        rss = 0
        try:
            with open(rssf.name) as f:
                nums = re.findall(r"^\s*(\d+)\s*$", f.read(), re.M)
                rss = int(nums[-1]) if nums else 0
        except OSError:
            pass
        out.seek(0)
        err.seek(0)
        return Proc(rc, t1 - t0, rss, ru.ru_utime + ru.ru_stime,
                    out.read().decode(errors="replace"), err.read().decode(errors="replace"), killed.is_set())


class RemoteRss:
    """Samples VmHWM of the processes sshd runs for us (rsync --server, dirsync agent):
    the far side's peak RSS, which wait4 cannot see.  Polls every 50 ms, so a process
    that lives for less than that may be missed (reported as 0)."""

    def __init__(self, sshd_pid: int):
        self.sshd_pid = sshd_pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="remote-rss")

    def __enter__(self) -> "RemoteRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(0.05):
                self._sample()
                return

    def _sample(self) -> None:
        for pid in descendants(self.sshd_pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    text = f.read()
            except OSError:
                continue
            name = text.split("\n", 1)[0].split(":", 1)[1].strip()
            if name.startswith("sshd"):
                continue
            m = re.search(r"VmHWM:\s+(\d+) kB", text)
            if m:
                self.peak_kb = max(self.peak_kb, int(m.group(1)))


# ---------------------------------------------------------------------------
# Measurements and results


@dataclass
class Meas:
    wall: float
    rss_kb: int
    cpu: float
    sent: int | None = None  # bytes master -> replica side (see legend)
    received: int | None = None  # bytes replica side -> master
    remote_rss_kb: int | None = None
    commands: int = 1
    detail: dict = field(default_factory=dict)  # dirsync: totals from its --json summary


@dataclass
class ToolResult:
    tool: str
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    runs: list[Meas] = field(default_factory=list)
    verify: str = ""  # "" not checked, "ok", or the differences
    command: str = ""

    def fail(self, reason: str, status: str = "failed") -> None:
        if self.status == "ok":
            self.status, self.reason = status, reason

    def median(self) -> float | None:
        return statistics.median(m.wall for m in self.runs) if self.runs else None

    def summary(self) -> dict:
        d = {"tool": self.tool, "status": self.status, "reason": self.reason, "verify": self.verify,
             "command": self.command, "runs": [m.__dict__ for m in self.runs]}
        if self.runs:
            walls = [m.wall for m in self.runs]
            d.update(median_s=statistics.median(walls), min_s=min(walls), max_s=max(walls),
                     peak_rss_kb=max(m.rss_kb for m in self.runs),
                     cpu_s=statistics.median(m.cpu for m in self.runs))
            for k in ("sent", "received", "remote_rss_kb"):
                vals = [getattr(m, k) for m in self.runs if getattr(m, k) is not None]
                if vals:
                    d[k if k != "remote_rss_kb" else "remote_peak_rss_kb"] = (
                        int(statistics.median(vals)) if k != "remote_rss_kb" else max(vals))
        return d


@dataclass
class Row:
    case: Case
    transport: str
    tools: dict[str, ToolResult]
    notes: list[str] = field(default_factory=list)
    new_content: tuple[int, int] | None = None  # a change case's bytes floor (data.Mutator.new_content)


# ---------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.profile = "quick" if args.quick else "full"
        self.p = data.PROFILES[self.profile]
        self.work = os.path.abspath(args.work)
        self.loop: LoopFs | None = None
        self.set_base(self.work)
        self.results_dir = os.path.abspath(args.out or os.path.join(self.work, "results"))
        self.log_path = os.path.join(self.results_dir, "bench.log")
        self.t_start = now()
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.meta: dict = {}
        self.gen_info: dict[str, dict] = {}
        self.sshd: Sshd | None = None
        self.proxy: CountingProxy | None = None
        self.ssh_reason = ""  # why SSH cases cannot run at all
        self.dirsync_local_reason = ""
        self.dirsync_ssh_reason = ""
        self.registry: dict[tuple, list[str]] = {}  # (pool, dataset, tool, transport) -> replica paths
        self.mutators: dict[str, data.Mutator] = {}
        self.counter = 0
        self.trash_bytes = 0
        py = bench_python(self.work) if not (os.environ.get("BENCH_DIRSYNC_CMD")
                                             and os.environ.get("BENCH_DIRSYNC_REMOTE_CMD")) else sys.executable
        base = shlex.split(os.environ["BENCH_DIRSYNC_CMD"]) if os.environ.get("BENCH_DIRSYNC_CMD") else [
            py, "-m", "dirsync"]
        self.dirsync_base = base
        self.remote_cmd = os.environ.get("BENCH_DIRSYNC_REMOTE_CMD") or (
            f"env PYTHONPATH={shlex.quote(REPO)} {shlex.quote(py)} -m dirsync")
        self.timeout = args.timeout or (300 if args.quick else 1200)
        self._log = None

    def set_base(self, base: str) -> None:
        """Where data and replicas live: the work dir, or the bench's own file system."""
        self.base = base
        self.data_dir = os.path.join(base, "data", f"{self.profile}-seed{self.args.seed}")
        self.run_dir = os.path.join(base, "run")
        self.trash_dir = os.path.join(self.run_dir, "trash")

    def stop_stale_sshd(self) -> None:
        """A run killed with SIGKILL leaves its sshd behind (holding the log file open)."""
        for base in (self.work, os.path.join(self.work, "mnt")):
            pidfile = os.path.join(base, "run", "ssh", "sshd.pid")
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip())
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError):
                continue
            if os.path.join(base, "run", "ssh", "sshd_config").encode() in cmd:
                self.log(f"stopping sshd {pid} left behind by an earlier run")
                for k in [pid, *descendants(pid)]:
                    try:
                        os.kill(k, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)

    def setup_fs(self) -> None:
        self.stop_stale_sshd()
        mode = self.args.fs
        why = loop_possible() if mode in ("auto", "loop") else "--fs direct"
        if mode == "loop" and why:
            raise SystemExit(f"--fs loop: {why}")
        if not why:
            free = free_bytes(self.work)
            size = min(200 << 30, free - (8 << 30))
            kept = os.path.exists(LoopFs(self.work).image)  # already holds the data: its own free space counts
            if size < (4 << 30 if self.args.quick else 24 << 30) and not kept:
                why = f"only {human_bytes(free)} free in {self.work}"
            else:
                self.loop = LoopFs(self.work)
                try:
                    t = now()
                    reused = self.loop.setup(reuse=True, size=size)
                    self.set_base(self.loop.mountpoint)
                    self.meta["fs_mode"] = (f"own ext4 (no journal, nodiscard) in {self.loop.image}, loop device "
                                            f"{self.loop.device} {'direct-io' if self.loop.direct_io else 'buffered'}")
                    self.log(f"file system: {'re-mounted kept' if reused else 'made'} {self.meta['fs_mode']} "
                             f"at {self.loop.mountpoint} in {now() - t:.1f}s")
                    return
                except (FsError, OSError, subprocess.SubprocessError) as e:
                    why = f"loop file system failed: {e}"
                    try:
                        self.loop.teardown(delete_image=True)
                    except (FsError, OSError):
                        pass
                    self.loop = None
            if mode == "loop":
                raise SystemExit(f"--fs loop: {why}")
        self.meta["fs_mode"] = f"direct on {self.work} ({why})"
        self.log(f"file system: writing directly in {self.work} ({why}); old replicas are moved aside and only "
                 "deleted at the end")

    # -- logging ------------------------------------------------------------
    def log(self, msg: str, console: bool = True) -> None:
        line = f"[{now() - self.t_start:7.1f}s] {msg}"
        if console:
            print(line, file=sys.stderr, flush=True)
        if self._log:
            self._log.write(line + "\n")
            self._log.flush()

    # -- paths ----------------------------------------------------------------
    def master(self, dataset: str) -> str:
        return os.path.join(self.data_dir, dataset)

    def stash(self, dataset: str) -> str:
        return os.path.join(self.data_dir, "stash-" + dataset)

    def fresh(self, kind: str) -> str:
        self.counter += 1
        parent = os.path.join(self.run_dir, "rep")
        os.makedirs(parent, exist_ok=True)
        return os.path.join(parent, f"{self.counter:04d}-{kind}")

    def trash(self, path: str) -> None:
        """Move a replica aside instead of deleting it (see README: ext4 slowdown)."""
        if os.path.lexists(path):
            os.makedirs(self.trash_dir, exist_ok=True)
            os.rename(path, os.path.join(self.trash_dir, f"{self.counter:04d}-{os.path.basename(path)}"))
            self.counter += 1

    def empty_trash(self, why: str, note: bool = True) -> None:
        if os.path.isdir(self.trash_dir) and os.listdir(self.trash_dir):
            t = now()
            subprocess.run(["rm", "-rf", self.trash_dir], check=False)
            self.log(f"  emptied the trash ({why}) in {now() - t:.1f}s")
            if note:
                self.notes.append(f"trash emptied {why}")

    def make_room(self, need: int, where: str) -> None:
        if free_bytes(self.run_dir) < need + (2 << 30):
            self.empty_trash(f"{where} (free space low)")

    # -- environment ----------------------------------------------------------
    def make_home(self, path: str) -> str:
        """A private $HOME/XDG tree for dirsync (its master caches live in $XDG_STATE_HOME)."""
        os.makedirs(os.path.join(path, ".ssh"), exist_ok=True)
        for sub in ("state", "config", "cache"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        if self.sshd:
            shutil.copyfile(self.sshd.known_hosts, os.path.join(path, ".ssh", "known_hosts"))
        return path

    def env_for(self, tool: str, home: str | None = None) -> dict:
        env = dict(os.environ)
        env.pop("SSH_AUTH_SOCK", None)
        env["LC_ALL"] = "C"
        if tool == "dirsync":
            home = home or self.main_home
            env.update(HOME=home, XDG_STATE_HOME=os.path.join(home, "state"),
                       XDG_CONFIG_HOME=os.path.join(home, "config"), XDG_CACHE_HOME=os.path.join(home, "cache"))
            env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env = python_env(env, REPO)
        return env

    def c_loops(self) -> str:
        """Which of dirsync's C loops the timed runs use: "walk, rows, files" when
        dirsync/_walk.c, _rows.c and _files.c were built (the install compiles them in place;
        `make bench` installs first), "none" when none was (their Python loops run)."""
        if os.environ.get("BENCH_DIRSYNC_CMD"):
            return "?"  # (a command of the caller's: not necessarily this repo's Python)
        probe = ("from dirsync import manifest, replica, scan; print(', '.join(n for n, m in (('walk', scan._walk), "
                 "('rows', manifest._rows), ('files', replica._files)) if m is not None) or 'none')")
        r = run_cmd([self.dirsync_base[0], "-c", probe], env=self.env_for("dirsync", home=self.work), timeout=60)
        got = r.stdout.strip() if r.rc == 0 else "?"
        if got != "walk, rows, files":
            self.log(f"note: dirsync's C loops built: {got} (`make venv` builds dirsync/_walk.c, _rows.c and _files.c)")
        return got

    def target(self, path: str, transport: str) -> str:
        return f"{self.sshd.user}@127.0.0.1:{path}" if transport == "ssh" else path

    def commands(self, tool: str, case: Case | None, master: str, paths: list[str], transport: str) -> list[list[str]]:
        if tool == "cp":
            return [["cp", "-a", master, p] for p in paths]
        if tool == "rsync":
            opts = ["-a", "--delete", "--stats"]
            if transport == "ssh" or (case and case.delta_local):
                opts.append("--no-whole-file")
            if case:
                opts += list(case.rsync_opts)
            if transport == "ssh":
                opts += ["-e", f"ssh -F {self.sshd.client_config}"]
            return [["rsync", *opts, master + "/", self.target(p, transport) + "/"] for p in paths]
        argv = [*self.dirsync_base, "sync", master, *(self.target(p, transport) for p in paths), "--json"]
        if case:
            argv += list(case.dirsync_opts)
        if transport == "ssh":
            argv += ["-p", str(self.proxy.port), "-i", self.sshd.client_key, "--ssh-config",
                     self.sshd.client_config, "--remote-cmd", self.remote_cmd]
        return [argv]

    # -- one measured (or untimed) sync ---------------------------------------
    def sync(self, tool: str, case: Case | None, master: str, paths: list[str], transport: str,
             home: str | None = None, timed: bool = False) -> tuple[Meas | None, str]:
        """Run tool from master into paths.  Returns (measurement, "") or (None, reason).

        Before a timed run, dirty pages left by earlier steps are written back (sync(2),
        untimed; the page cache stays warm), so no run pays for another's writeback."""
        cmds = self.commands(tool, case, master, paths, transport)
        if timed:
            os.sync()
        env = self.env_for(tool, home)
        ssh = transport == "ssh"
        m = Meas(wall=0.0, rss_kb=0, cpu=0.0, commands=len(cmds))
        if ssh:
            up0, down0, conns0 = self.proxy.snapshot()
        sampler = RemoteRss(self.sshd.pid) if ssh else None
        if sampler:
            sampler.__enter__()
        try:
            for argv in cmds:
                r = run_cmd(argv, env=env, timeout=self.timeout)
                self.log(f"    $ {shlex.join(argv)}  -> rc={r.rc} {r.wall:.3f}s", console=False)
                if r.stderr.strip():
                    self.log("      stderr: " + r.stderr.strip()[-2000:].replace("\n", "\n      "), console=False)
                if r.timed_out:
                    return None, f"timed out after {self.timeout:.0f}s"
                m.wall += r.wall
                m.rss_kb = max(m.rss_kb, r.maxrss_kb)
                m.cpu += r.cpu
                if tool == "dirsync":
                    summary, why = parse_dirsync_json(r.stdout)
                    if r.rc != 0:
                        return None, f"exit {r.rc}: " + (why if summary else first_error_line(r.stderr or r.stdout))
                    if why:
                        return None, why
                    if not ssh:
                        m.sent = (m.sent or 0) + sum(int(x.get("bytes_sent") or 0) for x in summary["replicas"])
                    for x in summary["replicas"]:
                        for k in ("files_written", "bytes_sent", "bytes_reused", "files_deleted"):
                            if isinstance(x.get(k), int):
                                m.detail[k] = m.detail.get(k, 0) + x[k]
                    scan = summary.get("master_scan")
                    if isinstance(scan, dict):
                        for k in ("files_hashed", "bytes_hashed"):
                            if isinstance(scan.get(k), int):
                                m.detail["master_" + k] = m.detail.get("master_" + k, 0) + scan[k]
                else:
                    if r.rc != 0:
                        return None, f"exit {r.rc}: {first_error_line(r.stderr)}"
                    if tool == "rsync" and not ssh:
                        s, rcv = parse_rsync_stats(r.stdout)
                        m.sent = (m.sent or 0) + s
                        m.received = (m.received or 0) + rcv
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
        if ssh:
            if not self.proxy.settle(conns0):
                self.log("    warning: a proxied connection was still open 5 s after the command ended")
            up1, down1, _ = self.proxy.snapshot()
            m.sent, m.received = up1 - up0, down1 - down0
            m.remote_rss_kb = sampler.peak_kb
        return m, ""

    # -- set-up ---------------------------------------------------------------
    def prepare_data(self, datasets: set[str]) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        for ds in data.DATASETS:
            if ds not in datasets:
                continue
            root, stamp = self.master(ds), os.path.join(self.data_dir, ds + ".stamp")
            want = data.stamp_for(ds, self.args.seed, self.profile)
            dirty = os.path.exists(os.path.join(self.stash(ds), "DIRTY"))
            if os.path.isdir(root) and os.path.exists(stamp) and not dirty:
                with open(stamp) as f:
                    saved = json.load(f)
                if saved.get("stamp") == want:
                    self.gen_info[ds] = saved["info"]
                    self.log(f"data {ds}: reusing kept data ({saved['info']['files']} files, "
                             f"{human_bytes(saved['info']['bytes'])})")
                    continue
            for p in (root, self.stash(ds), stamp):
                if os.path.lexists(p):
                    subprocess.run(["rm", "-rf", p], check=True)
            t = now()
            info = data.generate(ds, root, self.args.seed, self.profile)
            self.gen_info[ds] = {"files": info.files, "dirs": info.dirs, "bytes": info.bytes}
            if ds == "big" and ({"insert"} & {c.mutation for c in self.cases}):
                data.make_insert_variant(root, self.stash(ds), self.args.seed, self.p)
            with open(stamp, "w") as f:
                json.dump({"stamp": want, "info": self.gen_info[ds]}, f)
            self.log(f"data {ds}: generated {info.files} files in {info.dirs} dirs, {human_bytes(info.bytes)} "
                     f"in {now() - t:.1f}s")
        os.sync()

    def mutator(self, case: Case) -> data.Mutator:
        key = case.mutation
        if key not in self.mutators:
            ds, root, seed = case.dataset, self.master(case.dataset), self.args.seed
            if key == "mixed":
                ops = data.plan_mixed_change(root, seed)
            elif key == "release":
                ops = data.plan_release(root, seed)
            elif key == "bigedit":
                ops = data.plan_bigedit(root, seed, self.p)
            elif key == "insert":
                ops = data.make_insert_variant(root, self.stash(ds), seed, self.p)
            elif key == "move":
                ops = data.plan_move(root)
            else:
                raise ValueError(key)
            self.mutators[key] = data.Mutator(root, self.stash(ds), ops, key)
        return self.mutators[key]

    def start_ssh(self) -> None:
        try:
            self.sshd = Sshd(os.path.join(self.run_dir, "ssh")).start()
        except (SshdError, OSError, subprocess.SubprocessError) as e:
            self.sshd = None
            self.ssh_reason = f"could not start sshd: {e}"
            self.log("SSH cases skipped: " + self.ssh_reason)
            return
        self.proxy = CountingProxy(self.sshd.port).start()
        self.sshd.write_client_files(self.proxy.port)
        self.meta["ssh"] = self.sshd.negotiated(self.proxy.port)
        self.log(f"sshd pid {self.sshd.pid} on 127.0.0.1:{self.sshd.port}, counting proxy on :{self.proxy.port}; "
                 f"OpenSSH negotiates {self.meta['ssh'].get('cipher', '?')}")

    def probe(self, transports: list[str]) -> None:
        """Can dirsync (and rsync over ssh) run at all?  Cases degrade to rsync-only rows with a reason."""
        pm = os.path.join(self.run_dir, "probe", "master")
        os.makedirs(os.path.join(pm, "sub"), exist_ok=True)
        for name, text in (("a.txt", "alpha\n"), ("sub/b.txt", "beta\n" * 100)):
            with open(os.path.join(pm, name), "w") as f:
                f.write(text)
        for transport in transports:
            if transport == "ssh" and not self.sshd:
                continue
            for tool in ("rsync", "dirsync"):
                dst = self.fresh(f"probe-{tool}-{transport}")
                m, why = self.sync(tool, None, pm, [dst], transport)
                if not why:
                    diffs = data.compare_trees(pm, dst, content=["a.txt", "sub/b.txt"])
                    if diffs:
                        why = "probe replica differs from master: " + "; ".join(diffs[:3])
                if why:
                    self.log(f"probe: {tool} over {transport} does not work: {why}")
                    if tool == "dirsync":
                        if transport == "local":
                            self.dirsync_local_reason = why
                        else:
                            self.dirsync_ssh_reason = why
                    elif transport == "ssh":
                        self.ssh_reason = f"rsync over ssh fails: {why}"
                else:
                    self.log(f"probe: {tool} over {transport} ok ({m.wall:.2f}s)")

    def unavailable(self, tool: str, transport: str) -> str:
        if transport == "ssh" and self.ssh_reason:
            return self.ssh_reason
        if tool == "dirsync":
            if self.dirsync_local_reason:
                return "dirsync does not run: " + self.dirsync_local_reason
            if transport == "ssh" and self.dirsync_ssh_reason:
                return "dirsync over SSH not available yet: " + self.dirsync_ssh_reason
        return ""

    # -- replicas ---------------------------------------------------------------
    def ensure_replicas(self, case: Case, tool: str, transport: str) -> tuple[list[str] | None, str, bool]:
        """Replicas in sync with the dataset's base state, made by a real sync (or cp -a for rsync).
        Returns (paths, reason if impossible, whether they were just made by this tool)."""
        key = (case.pool, case.dataset, tool, transport)
        paths = self.registry.get(key)
        if paths and all(os.path.isdir(p) for p in paths):
            return paths, "", False
        master = self.master(case.dataset)
        paths = [self.fresh(f"{case.dataset}-{tool}-{transport}-{case.pool}{i}") for i in range(case.replicas)]
        t = now()
        if tool == "rsync":
            for p in paths:
                r = run_cmd(["cp", "-a", master, p], timeout=self.timeout)
                if r.rc != 0:
                    return None, f"cp -a failed: {first_error_line(r.stderr)}", False
        else:
            m, why = self.sync(tool, case, master, paths, transport)
            if why:
                for p in paths:
                    self.trash(p)
                return None, f"preparing the replica failed: {why}", False
        self.log(f"  prepared {len(paths)} {tool} replica(s) for {case.dataset}/{transport} in {now() - t:.1f}s")
        self.registry[key] = paths
        return paths, "", tool != "rsync"

    def verify(self, res: ToolResult, master: str, paths: list[str], content: list[str]) -> None:
        diffs = []
        for p in paths:
            diffs += data.compare_trees(master, p, content=content)
        res.verify = "ok" if not diffs else "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
        if diffs:
            self.log(f"  VERIFY {res.tool}: replica differs from master: {res.verify}")

    def sample_content(self, master: str) -> list[str]:
        files = data.list_files(master)
        step = max(1, len(files) // 200)
        picked = files[::step]
        biggest = max(files, key=lambda f: os.path.getsize(os.path.join(master, f)), default=None)
        if biggest and biggest not in picked:
            picked.append(biggest)
        return picked

    # -- cases --------------------------------------------------------------------
    def tools_for(self, case: Case, transport: str) -> list[str]:
        tools = ["rsync", "dirsync"]
        if case.floor and transport == "local" and case.kind == "initial" and case.replicas == 1:
            tools.append("cp")
        return tools

    def record(self, case: Case, transport: str, tool: str, i: int, m: Meas) -> None:
        extra = ""
        if m.sent is not None:
            extra = f", sent {human_bytes(m.sent)}" + (f", received {human_bytes(m.received)}"
                                                        if m.received is not None else "")
        rr = f", remote RSS {m.remote_rss_kb / 1024:.0f} MB" if m.remote_rss_kb else ""
        self.log(f"  {case.name} {transport} {tool} #{i + 1}: {m.wall:.3f}s{extra}, RSS {m.rss_kb / 1024:.0f} MB{rr}")

    def run_case(self, case: Case, transport: str) -> Row:
        tools = self.tools_for(case, transport)
        row = Row(case, transport, {t: ToolResult(t) for t in tools})
        for t in tools:
            why = self.unavailable(t, transport)
            if why:
                row.tools[t].fail(why, "skipped")
        active = [t for t in tools if row.tools[t].status == "ok"]
        master = self.master(case.dataset)
        for t in active:
            cmd = self.commands(t, case, master, ["REPLICA"] * case.replicas, transport)
            row.tools[t].command = " ; ".join(shlex.join(c) for c in cmd)
        self.log(f"== {case.name} ({transport}): {case.desc}")
        if case.kind == "initial":
            self.case_initial(case, transport, row, active, master)
        else:
            self.case_update(case, transport, row, active, master)
        return row

    def order(self, tools: list[str], i: int) -> list[str]:
        return tools if i % 2 == 0 else list(reversed(tools))

    def case_initial(self, case: Case, transport: str, row: Row, tools: list[str], master: str) -> None:
        runs = self.args.runs
        content = self.sample_content(master)
        for i in range(runs):
            last = i == runs - 1
            for tool in self.order(tools, i):
                res = row.tools[tool]
                if res.status != "ok":
                    continue
                paths = [self.fresh(f"{case.dataset}-{tool}-{transport}-{case.pool}{k}") for k in range(case.replicas)]
                # dirsync's master cache starts cold, as on a first sync: a fresh $XDG_STATE_HOME per run
                home = self.make_home(self.fresh("home-cold")) if tool == "dirsync" else None
                self.make_room(self.tree_bytes(case.dataset) * case.replicas, f"before {case.name} run {i + 1}")
                m, why = self.sync(tool, case, master, paths, transport, home=home, timed=True)
                if why:
                    res.fail(why)
                    self.log(f"  {case.name} {transport} {tool} FAILED: {why}")
                else:
                    res.runs.append(m)
                    self.record(case, transport, tool, i, m)
                keep = last and not why and tool != "cp"
                if last and not why:
                    self.verify(res, master, paths, content)
                if keep and res.verify == "ok":
                    old = self.registry.get((case.pool, case.dataset, tool, transport))
                    for p in old or ():
                        self.trash(p)
                    self.registry[(case.pool, case.dataset, tool, transport)] = paths
                else:
                    for p in paths:
                        self.trash(p)
                if home:
                    self.trash(home)

    def case_update(self, case: Case, transport: str, row: Row, tools: list[str], master: str) -> None:
        replicas: dict[str, list[str]] = {}
        for tool in tools:
            paths, why, just_synced = self.ensure_replicas(case, tool, transport)
            if why:
                row.tools[tool].fail(why)
                self.log(f"  {tool}: {why}")
                continue
            replicas[tool] = paths
            if just_synced:
                continue
            # warm-up: one untimed no-op run per tool (page cache, dirsync's master cache)
            m, why = self.sync(tool, case, master, paths, transport)
            if why:
                row.tools[tool].fail(f"warm-up run failed: {why}")
                self.log(f"  {tool}: warm-up run failed: {why}")
                self.registry.pop((case.pool, case.dataset, tool, transport), None)
                del replicas[tool]
        tools = [t for t in tools if t in replicas]
        mut = self.mutator(case) if case.kind == "change" else None
        content = mut.changed_paths() if mut else self.sample_content(master)[:20]
        if mut:
            row.new_content = mut.new_content()  # (computed at its first case, the master in its base state)
        for i in range(self.args.runs):
            last = i == self.args.runs - 1
            if mut:
                try:
                    mut.apply()
                    changed_at = time.monotonic()
                except OSError as e:  # e.g. a full disk: the case is reported, not the bench ended
                    why = f"could not change the master before run {i + 1}: {e}"
                    self.log(f"  {case.name} {transport}: {why}")
                    for tool in tools:
                        row.tools[tool].fail(why)
                    mut.undo()
                    return
            try:
                if mut:
                    settle_after(changed_at)
                for tool in self.order(tools, i):
                    res = row.tools[tool]
                    if res.status != "ok":
                        continue
                    m, why = self.sync(tool, case, master, replicas[tool], transport, timed=True)
                    if why:
                        res.fail(why)
                        self.log(f"  {case.name} {transport} {tool} FAILED: {why}")
                        continue
                    res.runs.append(m)
                    self.record(case, transport, tool, i, m)
                    if last:
                        self.verify(res, master, replicas[tool], content)
            finally:
                if mut:
                    mut.undo()
                    changed_at = time.monotonic()
            if mut:  # put every replica back to the base state (untimed, with the same tool)
                settle_after(changed_at)
                for tool in tools:
                    m, why = self.sync(tool, case, master, replicas[tool], transport)
                    if why:
                        row.tools[tool].fail(f"revert sync failed: {why}")
                        self.log(f"  {tool}: revert sync failed: {why}")
                        for p in self.registry.pop((case.pool, case.dataset, tool, transport), []):
                            self.trash(p)
                tools = [t for t in tools if row.tools[t].status == "ok"]

    # -- disk --------------------------------------------------------------------
    def tree_bytes(self, dataset: str) -> int:
        info = self.gen_info.get(dataset, {"bytes": 0, "files": 0})
        return info["bytes"] + 4096 * (info["files"] + info.get("dirs", 0))

    def need_bytes(self, case: Case, transports: list[str]) -> int:
        per = self.tree_bytes(case.dataset)
        if case.kind != "initial":
            return per * case.replicas * 2 * len(transports)
        tools = 2 + (1 if case.floor else 0)
        return per * case.replicas * tools * self.args.runs * len(transports)

    # -- main ----------------------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.results_dir, exist_ok=True)
        self._log = open(self.log_path, "w")
        selected = [c for c in CASES if not self.args.cases or c.name in self.args.cases]
        self.cases = selected
        transports = [t for t in ("local", "ssh") if t in self.args.transports]
        self.collect_meta()
        self.log(f"dirsync bench: profile {self.profile}, seed {self.args.seed}, {self.args.runs} runs, "
                 f"cases {','.join(c.name for c in selected)}, transports {','.join(transports)}; work dir {self.work}")
        try:
            self.setup_fs()
            if os.path.exists(self.run_dir):
                # The last bench's replicas (100,000-file trees among them) go to the trash, which
                # is emptied after the timing: ext4 creates files 3-16x slower for minutes after a
                # mass delete (see README), and the first case creates 100,000 files.
                aside = os.path.join(os.path.dirname(self.run_dir), f"previous-run-{int(time.time())}")
                os.rename(self.run_dir, aside)
                os.makedirs(self.trash_dir)
                os.rename(aside, os.path.join(self.trash_dir, os.path.basename(aside)))
            os.makedirs(self.run_dir, exist_ok=True)
            self.main_home = os.path.join(self.run_dir, "home")
            if "ssh" in transports:
                self.start_ssh()
            self.make_home(self.main_home)
            self.prepare_data({c.dataset for c in selected})
            self.probe(transports)
            total_need = sum(self.need_bytes(c, [t for t in transports if t in c.transports]) for c in selected)
            self.log(f"disk: about {human_bytes(total_need)} of replicas will be written; "
                     f"{human_bytes(free_bytes(self.run_dir))} free")
            budget = self.args.budget * 60
            for case in selected:
                for transport in transports:
                    if transport not in case.transports:
                        continue
                    if now() - self.t_start > budget:
                        row = Row(case, transport, {t: ToolResult(t) for t in self.tools_for(case, transport)})
                        for res in row.tools.values():
                            res.fail(f"not run: time budget of {self.args.budget:g} min used up", "skipped")
                        self.rows.append(row)
                        continue
                    try:
                        row = self.run_case(case, transport)
                    except OSError as e:  # the bench's own file work (a full disk): report the case, go on
                        self.log(f"  {case.name} {transport}: bench error: {e}")
                        row = Row(case, transport, {t: ToolResult(t) for t in self.tools_for(case, transport)})
                        for res in row.tools.values():
                            res.fail(f"not measured: bench error: {e}")
                    self.rows.append(row)
                    self.log("  " + " | ".join(self.table_cells(row)))
                    self.write_results(partial=True)
                    # The trash is emptied at the end (or when space runs low, make_room), never
                    # between cases: the next case would create its files on a file system still
                    # busy with the mass delete (see README: ext4 slowdown).
        except KeyboardInterrupt:
            self.log("interrupted: writing what was measured")
            self.notes.append("interrupted before all cases ran")
        finally:
            self.undo_all()
            if self.proxy:
                self.proxy.stop()
            if self.sshd:
                self.sshd.stop()
            self.meta["total_seconds"] = round(now() - self.t_start, 1)
            self.meta["load_avg_at_end"] = os.getloadavg()
            busy = max(self.meta["load_avg_at_start"][0], self.meta["load_avg_at_end"][0])
            if busy > 0.5 * (os.cpu_count() or 1):
                self.notes.append(f"the machine was busy with other work (load average up to {busy:.1f} on "
                                  f"{os.cpu_count()} cores): figures are noisier and slower than on an idle machine")
            self.write_results(partial=False)
            self.empty_trash("after the timing", note=False)
            print(self.markdown(), flush=True)
            print(f"\nresults: {self.json_path}\nmarkdown: {self.md_path}\nlog: {self.log_path}", flush=True)
            self.cleanup()
        return 0

    def undo_all(self) -> None:
        for mut in self.mutators.values():
            if mut.undo_log:
                mut.undo()

    def cleanup(self) -> None:
        t = now()
        if self.loop:
            if self.args.keep:
                self.log(f"--keep: data and replicas kept in {self.loop.image} (mounted again by the next run)")
            try:
                self.loop.teardown(delete_image=not self.args.keep)
            except (FsError, OSError) as e:
                self.log(f"cleanup problem: {e}")
            if not self.args.keep:
                self.log(f"cleaned up (unmounted and deleted {self.loop.image}) in {now() - t:.1f}s; "
                         f"results kept in {self.results_dir}")
            else:
                try:
                    held = os.stat(self.loop.image).st_blocks * 512
                    self.log(f"--keep: the image holds {held / 2**30:.1f} GiB of the host's disk "
                             f"(delete {self.loop.image} when done)")
                except OSError:
                    pass
            return
        if self.args.keep:
            self.log(f"--keep: data and replicas left in {self.base}")
            return
        self.log("deleting data and replicas (on this file system that can take minutes: see bench/fs.py)")
        for p in (self.run_dir, os.path.join(self.base, "data")):
            if os.path.exists(p):
                subprocess.run(["rm", "-rf", p], check=False)
        self.log(f"cleaned up data and replicas in {now() - t:.1f}s (results kept in {self.results_dir})")

    # -- metadata and output ------------------------------------------------------
    def collect_meta(self) -> None:
        def out(cmd: list[str]) -> str:
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""
        cpu = ""
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.*)", f.read())
                cpu = m.group(1) if m else ""
        except OSError:
            pass
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip() if shutil.which("ssh") else ""
        commit = out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
        dirty = out(["git", "-C", REPO, "status", "--porcelain", "--", "dirsync"])
        self.meta.update(
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            host=platform.node(), cpu=cpu, cores=os.cpu_count(), memory_gib=round(mem / 2**30, 1),
            kernel=platform.release(), python=platform.python_version(), work_dir=self.work,
            filesystem=fs_type(self.work), rsync=out(["rsync", "--version"]).split("\n")[0],
            openssh=ssh_v, dirsync_commit=commit + ("+dirty" if dirty else ""), c_loops=self.c_loops(),
            dirsync_cmd=shlex.join(self.dirsync_base), remote_cmd=self.remote_cmd,
            profile=self.profile, seed=self.args.seed, runs=self.args.runs, generator=data.GENERATOR,
            rss_method=RSS_METHOD,
            load_avg_at_start=os.getloadavg())

    def table_cells(self, row: Row) -> list[str]:
        d, r = row.tools.get("dirsync"), row.tools.get("rsync")
        floor = row.tools.get("cp")

        def time_cell(res: ToolResult | None) -> str:
            if not res:
                return "–"
            if not res.runs:
                return res.status
            ws = [m.wall for m in res.runs]
            cell = f"{fmt_s(statistics.median(ws))} ({fmt_s(min(ws))}–{fmt_s(max(ws))})"
            if res.status != "ok":
                cell += " " + res.status
            if res.verify and res.verify != "ok":
                cell += " ✗differs"
            return cell

        def bytes_cell(res: ToolResult | None) -> str:
            if not res or not res.runs:
                return "–"
            s = statistics.median(m.sent for m in res.runs if m.sent is not None) if any(
                m.sent is not None for m in res.runs) else None
            rv = [m.received for m in res.runs if m.received is not None]
            if s is None:
                return "–"
            return f"{human_bytes(s)} / {human_bytes(statistics.median(rv))}" if rv else human_bytes(s)

        def rss_cell(res: ToolResult | None) -> str:
            if not res or not res.runs:
                return "–"
            cell = f"{max(m.rss_kb for m in res.runs) / 1024:.0f}"
            rem = [m.remote_rss_kb for m in res.runs if m.remote_rss_kb]
            if rem:
                cell += f" (far {max(rem) / 1024:.0f})"
            return cell

        rt, rb = self.ratios(row)
        ratio_t = f"{rt:.2f}" if rt is not None else "–"
        ratio_b = f"{rb:.2f}" if rb is not None else "–"
        fl = "–"
        if floor and floor.runs:
            fl = f"cp -a {fmt_s(floor.median())}"
        elif row.new_content:
            fl = f"new {human_bytes(row.new_content[0])} ({human_bytes(row.new_content[1])} deflated)"
        return [row.case.name, row.transport, time_cell(d), time_cell(r), ratio_t, bytes_cell(d), bytes_cell(r),
                ratio_b, f"{rss_cell(d)} / {rss_cell(r)}", fl]

    @staticmethod
    def ratios(row: Row) -> tuple[float | None, float | None]:
        """(dirsync/rsync median wall time, dirsync/rsync median bytes) or None where not measurable."""
        d, r = row.tools.get("dirsync"), row.tools.get("rsync")
        if not (d and r and d.runs and r.runs):
            return None, None
        ssh = row.transport == "ssh"
        rt = d.median() / r.median()
        ds = [(m.sent or 0) + ((m.received or 0) if ssh else 0) for m in d.runs if m.sent is not None]
        rs = [(m.sent or 0) + ((m.received or 0) if ssh else 0) for m in r.runs if m.sent is not None]
        rb = statistics.median(ds) / statistics.median(rs) if ds and rs and statistics.median(rs) > 0 else None
        return rt, rb

    HEADER = ["case", "where", "dirsync s", "rsync s", "time d/r", "dirsync bytes", "rsync bytes", "bytes d/r",
              "peak RSS MB d / r", "floor"]

    def markdown(self) -> str:
        m = self.meta
        ssh = m.get("ssh", {})
        lines = [
            f"dirsync vs rsync, {m.get('date', '')}: {self.profile} profile (seed {self.args.seed}), "
            f"{self.args.runs} runs each, median (min–max) wall seconds.",
            f"Machine: {m.get('cpu', '?')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB RAM, "
            f"kernel {m.get('kernel', '?')}; work dir on {m.get('filesystem', '?')}; replicas on "
            f"{m.get('fs_mode', '?')}; {m.get('rsync', '')}; {m.get('openssh', '')} "
            f"(cipher {ssh.get('cipher', '?')}); dirsync {m.get('dirsync_commit', '?')} (C loops: "
            f"{m.get('c_loops', '?')}); Python {m.get('python')}; "
            f"load average at start {m.get('load_avg_at_start', ['?'])[0]:.2f}"
            f"{', at end ' + format(m['load_avg_at_end'][0], '.2f') if m.get('load_avg_at_end') else ''}"
            f"; total {m.get('total_seconds', '?')} s.",
            "",
            "| " + " | ".join(self.HEADER) + " |",
            "|" + "---|" * len(self.HEADER),
        ]
        for row in self.rows:
            lines.append("| " + " | ".join(self.table_cells(row)) + " |")
        lines += [
            "",
            "Bytes: `ssh` rows count every TCP byte both ways through the same counting proxy "
            "(sent = towards the replica / received = back); `local` rows show dirsync's JSON `bytes_sent` "
            "(the plan's literal data: what a remote replica would be sent) and rsync's `--stats` Total bytes "
            "sent / received between "
            "its own processes. Ratios < 1 favour dirsync. RSS: peak of the local process tree "
            "(+ far side's peak, sampled, for ssh). Floor: `cp -a`'s time for a local initial copy; for a "
            "change, the bytes it brings that the tree did not hold (appended, patched, created data and "
            "replaced files' new lines), raw and deflated: no tool sends less without compressing more.",
        ]
        problems = []
        for row in self.rows:
            for res in row.tools.values():
                if res.status != "ok" or (res.verify and res.verify != "ok"):
                    problems.append(f"- {row.case.name}/{row.transport} {res.tool}: {res.status}"
                                    f"{': ' + res.reason if res.reason else ''}"
                                    f"{'; replica differs: ' + res.verify if res.verify not in ('', 'ok') else ''}")
        if problems:
            lines += ["", "Not measured or not equal:", *dict.fromkeys(problems)]
        if self.notes:
            lines += ["", "Notes: " + "; ".join(dict.fromkeys(self.notes))]
        return "\n".join(lines)

    def write_results(self, partial: bool) -> None:
        self.json_path = os.path.join(self.results_dir, "last_results.json")
        self.md_path = os.path.join(self.results_dir, "last_results.md")
        out = {
            "meta": self.meta, "partial": partial, "notes": self.notes, "datasets": self.gen_info,
            "unavailable": {"ssh": self.ssh_reason, "dirsync_local": self.dirsync_local_reason,
                            "dirsync_ssh": self.dirsync_ssh_reason},
            "rows": [],
        }
        for row in self.rows:
            rt, rb = self.ratios(row)
            out["rows"].append({"case": row.case.name, "transport": row.transport, "description": row.case.desc,
                                "replicas": row.case.replicas, "time_ratio": rt, "bytes_ratio": rb,
                                "new_content": row.new_content,
                                "tools": {k: v.summary() for k, v in row.tools.items()}})
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, self.json_path)
        with open(self.md_path, "w") as f:
            f.write(self.markdown() + "\n")


def parse_dirsync_json(stdout: str) -> tuple[dict | None, str]:
    text = stdout.strip()
    start = text.find("{")
    if start < 0:
        return None, "no JSON summary on stdout"
    try:
        obj = json.loads(text[start:])
    except ValueError:
        try:  # maybe several lines: take the last JSON line
            obj = json.loads(text.splitlines()[-1])
        except (ValueError, IndexError):
            return None, "unparsable JSON summary"
    reps = obj.get("replicas") if isinstance(obj, dict) else None
    if not isinstance(reps, list):
        return None, "JSON summary has no replicas list"
    errs = [e for r in reps for e in (r.get("errors") or [])]
    if errs:
        return obj, f"{len(errs)} error(s), first: {str(errs[0])[:200]}"
    return obj, ""


def parse_rsync_stats(stdout: str) -> tuple[int, int]:
    def num(label: str) -> int:
        m = re.search(label + r":\s*([\d,.]+)", stdout)
        return int(m.group(1).replace(",", "").replace(".", "")) if m else 0
    return num("Total bytes sent"), num("Total bytes received")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data set (1-2 minutes)")
    ap.add_argument("--cases", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                    help="comma-separated subset of: " + ",".join(CASE_NAMES))
    ap.add_argument("--runs", type=int, default=None, help="timed runs per tool and case (default 3; quick 2)")
    ap.add_argument("--no-ssh", action="store_true", help="local replicas only")
    ap.add_argument("--no-local", action="store_true", help="SSH replicas only")
    ap.add_argument("--keep", action="store_true", help="keep generated data and replicas (data is reused next time)")
    ap.add_argument("--seed", type=int, default=1, help="data seed (default 1)")
    ap.add_argument("--work", default=os.environ.get("BENCH_DIR") or "/var/tmp/dirsync-bench",
                    help="work directory (default $BENCH_DIR or /var/tmp/dirsync-bench); never inside the repo")
    ap.add_argument("--out", default=None, help="results directory (default WORK/results)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per-command timeout in seconds (default 300 quick, 1200 full)")
    ap.add_argument("--budget", type=float, default=None,
                    help="minutes after which remaining cases are skipped (default 15 quick, 60 full)")
    ap.add_argument("--fs", choices=("auto", "loop", "direct"), default="auto",
                    help="auto (default): the bench's own ext4 in WORK/fs.img when root, else direct; "
                         "direct: write in the work dir itself (see bench/fs.py)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:15} {'/'.join(c.transports):10} {c.desc}")
        return 0
    unknown = set(args.cases or ()) - set(CASE_NAMES)
    if unknown:
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}; choose from {', '.join(CASE_NAMES)}")
    if args.runs is None:
        args.runs = 2 if args.quick else 3
    if args.budget is None:
        args.budget = 15 if args.quick else 60
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    args.transports = [t for t, off in (("local", args.no_local), ("ssh", args.no_ssh)) if not off]
    work = os.path.realpath(args.work)
    if work == os.path.realpath(REPO) or work.startswith(os.path.realpath(REPO) + os.sep):
        ap.error("the work directory must be outside the repository")
    if not shutil.which("rsync"):
        ap.error("rsync is not installed")
    os.makedirs(work, exist_ok=True)
    lock = open(os.path.join(work, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"another benchmark is running in {work}", file=sys.stderr)
        return 3
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return Bench(args).run()


if __name__ == "__main__":
    sys.exit(main())
