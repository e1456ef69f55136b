#!/usr/bin/env python3
"""Two-way sync benchmark: ``dirsync sync --two-way`` against ``unison -batch`` (issue 7).

Both tools get their own copies (A and B trees) of the same generated data and do
the same three cases, each timed ``--runs`` times (whole-process wall time):

  initial   A full (a "mixed"-style tree of small files), B empty
  noop      re-run on the synced pair
  change    ~1% of the files changed on *each* side (in-place edits, appends,
            deletes, new files, renames into other directories; the two sides
            touch disjoint files, so there is no conflict), then sync

Every run does the same work: initial runs start from a fresh ``cp -a`` of the
generated tree, a fresh empty B and fresh tool state; change runs restore A, B
and the tool's state from copies kept after the no-op case, do one untimed
sync (so both tools re-learn the inode numbers/ctimes that ``cp -a`` changed),
then apply the same seeded mutations to both sides.  After every run A and B
are compared (paths, types, sizes, mtimes to the second, and the bytes of every
changed file), and the final trees are checked against the expected path list.

The script never installs anything: without ``unison`` it prints so and reports
dirsync's figures only (exit 0).  See bench/README.md, "Two-way (vs Unison)".
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import data  # noqa: E402
from fs import FsError, LoopFs, bench_python, loop_possible, python_env  # noqa: E402

KiB = 1024
TOOLS = ("dirsync", "unison")
REF = "dirsync-ref"  # --ref: another checkout's dirsync, timed in the same runs
CASES = ("initial", "noop", "change")
UNISON_FLAGS = ["-batch", "-auto", "-times", "-perms", "0", "-confirmbigdel=false", "-ui", "text"]


def profile(quick: bool) -> dict:
    # a "mixed"-style tree with only the small files: 1-64 KiB, half text half random
    return dict(
        mixed_small=2_000 if quick else 10_000, mixed_small_range=(1 * KiB, 64 * KiB),
        mixed_medium=0, mixed_medium_range=(1 << 20, 8 << 20), mixed_big=0, mixed_big_size=0,
        mixed_branching=(4, 3, 3, 2) if quick else (6, 5, 4, 3),  # 124 / 516 dirs
    )


def sh(argv: list[str], timeout: float = 600) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")


def out(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def fmt(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


# ---------------------------------------------------------------------------
# The change set: ~1% of the files on each side, disjoint between the sides


def plan_change(files: list[str], dirs: list[str], seed: int, frac: float = 0.01) -> dict[str, list[tuple]]:
    r = data.rng(seed, "twoway-change")
    pool = list(files)
    r.shuffle(pool)
    n = max(8, round(frac * len(files)))
    plans: dict[str, list[tuple]] = {}
    for side in ("A", "B"):
        stream = data.ByteStream(seed, f"twoway-{side}")
        text = data.TextSource(seed, "text")
        n_edit, n_del, n_ren = n * 40 // 100, n * 20 // 100, max(1, n * 10 // 100)
        n_new = n - n_edit - n_del - n_ren
        mine, pool = pool[: n_edit + n_del + n_ren], pool[n_edit + n_del + n_ren:]
        edits, dels, rens = mine[:n_edit], mine[n_edit:n_edit + n_del], mine[n_edit + n_del:]
        ops: list[tuple] = []
        for i, f in enumerate(edits):
            k = r.randint(100, 4 * KiB)
            chunk = text.make(stream, k) if os.path.basename(f)[0] == "t" else stream.read(k)
            ops.append(("append" if i % 2 else "patch", f, chunk, r.random()))
        for f in dels:
            ops.append(("delete", f))
        for f in rens:
            here = os.path.dirname(f)
            target = r.choice([d for d in dirs if d != here])
            ops.append(("rename", f, f"{target}/{os.path.basename(f)}"))
        for i in range(n_new):
            d = r.choice(dirs)
            size = data.log_uniform(r, 1 * KiB, 64 * KiB)
            if i % 2:
                ops.append(("create", f"{d}/new-{side}{i:04d}.txt", text.make(stream, size)))
            else:
                ops.append(("create", f"{d}/new-{side}{i:04d}.bin", stream.read(size)))
        plans[side] = ops
    return plans


def apply_ops(root: str, ops: list[tuple]) -> None:
    for op in ops:
        path = os.path.join(root, op[1])
        if op[0] == "patch":
            size = os.path.getsize(path)
            chunk = op[2][:size]
            with open(path, "r+b") as f:
                f.seek(int(op[3] * (size - len(chunk) + 1)))
                f.write(chunk)
        elif op[0] == "append":
            with open(path, "ab") as f:
                f.write(op[2])
        elif op[0] == "delete":
            os.unlink(path)
        elif op[0] == "rename":
            os.rename(path, os.path.join(root, op[2]))
        elif op[0] == "create":
            with open(path, "wb") as f:
                f.write(op[2])


def expected_after(files: list[str], plans: dict[str, list[tuple]]) -> tuple[set[str], list[str]]:
    """(the file paths both sides must have after the change sync, the paths with new content)."""
    paths = set(files)
    changed = []
    for ops in plans.values():
        for op in ops:
            if op[0] in ("patch", "append", "create"):
                paths.add(op[1])
                changed.append(op[1])
            elif op[0] == "delete":
                paths.discard(op[1])
            elif op[0] == "rename":
                paths.discard(op[1])
                paths.add(op[2])
                changed.append(op[2])
    return paths, changed


# ---------------------------------------------------------------------------
# Comparison


def file_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compare(a: str, b: str, content: list[str], expect: set[str] | None, limit: int = 5) -> list[str]:
    """Differences between A and B (empty: equal): entries, types, sizes, file mtimes to the
    second (Unison keeps whole seconds), the bytes of ``content``, and the file list against
    ``expect`` (conflict copies or tool temp files would show up there)."""
    sa = data.snapshot(a)
    sb = data.snapshot(b)
    diffs: list[str] = []
    diffs += [f"only in A: {p}" for p in sorted(sa.keys() - sb.keys())[:limit]]
    diffs += [f"only in B: {p}" for p in sorted(sb.keys() - sa.keys())[:limit]]
    for p in sorted(sa.keys() & sb.keys()):
        x, y = sa[p], sb[p]
        bad = [n for n, i in (("type", 0), ("size", 1)) if x[i] != y[i]]
        if x[0] == "f" and abs(x[2] - y[2]) >= 10**9:
            bad.append("mtime")
        if bad:
            diffs.append(f"differs {p} ({', '.join(bad)})")
            if len(diffs) > 3 * limit:
                return diffs
    for p in content:
        pa, pb = os.path.join(a, p), os.path.join(b, p)
        if os.path.isfile(pa) and os.path.isfile(pb) and file_hash(pa) != file_hash(pb):
            diffs.append(f"content {p}")
    if expect is not None:
        have = {p for p, v in sa.items() if v[0] == "f"}
        diffs += [f"missing {p}" for p in sorted(expect - have)[:limit]]
        diffs += [f"unexpected {p}" for p in sorted(have - expect)[:limit]]
    return diffs


# ---------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        default = (os.path.join(os.environ["BENCH_DIR"], "twoway") if os.environ.get("BENCH_DIR")
                   else "/var/tmp/dirsync-bench-twoway")
        self.work = os.path.abspath(args.work or default)
        if os.path.commonpath([self.work, REPO]) == REPO:
            raise SystemExit(f"work dir {self.work} is inside the repository; use --work or $BENCH_DIR")
        self.results = os.path.join(self.work, "results")
        os.makedirs(self.results, exist_ok=True)
        self.loop: LoopFs | None = None
        self.base = self.work
        self.fs_note = ""
        self.unison = shutil.which("unison")
        self.ref = os.path.abspath(args.ref) if args.ref else None
        self.cases = [c for c in CASES if c in (args.cases or CASES)]
        self.tools = [t for t in TOOLS if t == "dirsync" or self.unison]
        if self.ref:
            self.tools.insert(1, REF)
        self.times: dict[tuple[str, str], list[float]] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.trash_n = 0
        self.logf = open(os.path.join(self.results, "twoway.log"), "a")

    # -- plumbing -------------------------------------------------------------------
    def log(self, msg: str, console: bool = True) -> None:
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}"
        self.logf.write(line + "\n")
        self.logf.flush()
        if console:
            print(line, flush=True)

    def setup_fs(self) -> None:
        why = loop_possible() if self.args.fs != "direct" else "--fs direct"
        if not why:
            free = shutil.disk_usage(self.work).free
            size = min(32 << 30, free - (8 << 30))
            if size < (4 << 30):
                why = f"only {free >> 30} GiB free in {self.work}"
            else:
                self.loop = LoopFs(self.work)
                try:
                    self.loop.setup(reuse=self.args.keep, size=size)
                    self.base = self.loop.mountpoint
                    self.fs_note = "own ext4 in a loop image (no journal, nodiscard)"
                    return
                except (FsError, OSError, subprocess.SubprocessError) as e:
                    why = f"loop file system failed: {e}"
                    try:
                        self.loop.teardown(delete_image=True)
                    except (FsError, OSError):
                        pass
                    self.loop = None
        self.fs_note = f"direct on {self.work} ({why})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    def trash(self, p: str) -> None:
        if os.path.lexists(p):
            os.makedirs(self.path("trash"), exist_ok=True)
            self.trash_n += 1
            os.rename(p, self.path("trash", str(self.trash_n)))

    def empty_trash(self) -> None:
        if os.path.exists(self.path("trash")):
            sh(["rm", "-rf", self.path("trash")], timeout=3600)

    def copy(self, src: str, dst: str) -> None:
        self.trash(dst)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        sh(["cp", "-a", src, dst])

    def state(self, tool: str) -> str:
        return self.path(tool, "state")

    def fresh_state(self, tool: str) -> None:
        self.trash(self.state(tool))
        os.makedirs(self.state(tool))
        if tool in ("dirsync", REF):
            for sub in ("home", "state", "config", "cache"):
                os.makedirs(os.path.join(self.state(tool), sub))

    def command(self, tool: str) -> tuple[list[str], dict]:
        a, b = self.path(tool, "A"), self.path(tool, "B")
        env = dict(os.environ)
        if tool in ("dirsync", REF):
            st = self.state(tool)
            repo = self.ref if tool == REF else REPO
            env.update(PYTHONPATH=repo, HOME=os.path.join(st, "home"), XDG_STATE_HOME=os.path.join(st, "state"),
                       XDG_CONFIG_HOME=os.path.join(st, "config"), XDG_CACHE_HOME=os.path.join(st, "cache"))
            return [bench_python(self.work), "-m", "dirsync", "sync", "--two-way", "--json", a, b], python_env(env, repo)
        env["UNISON"] = self.state(tool)
        return [self.unison, a, b, *UNISON_FLAGS], env

    def sync(self, tool: str, label: str) -> tuple[float, str]:
        """Run one sync; returns (wall seconds, problem or '')."""
        argv, env = self.command(tool)
        os.sync()  # untimed: no run pays for the previous one's writeback
        so = open(os.path.join(self.results, "last.out"), "w+")
        se = open(os.path.join(self.results, "last.err"), "w+")
        # A blocking wait, the timeout on a timer: subprocess.run(timeout=...) polls with sleeps
        # of up to 50 ms, which rounded every wall time up to the next 50 ms step.
        timed_out = threading.Event()
        t = time.perf_counter()
        # cwd: the work dir, not the checkout the bench was started in: `python -m` puts the
        # current directory first on sys.path, which made --ref time this checkout's dirsync.
        p = subprocess.Popen(argv, env=env, stdout=so, stderr=se, stdin=subprocess.DEVNULL, cwd=self.work)

        def kill() -> None:
            timed_out.set()
            p.kill()

        timer = threading.Timer(self.args.timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            rc = p.wait()
            wall = time.perf_counter() - t
        finally:
            timer.cancel()
        if timed_out.is_set():
            rc = "timeout"
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
        so.close()
        se.close()
        problem, detail = "", ""
        if tool in ("dirsync", REF):
            try:
                j = json.loads(stdout)
                detail = " ".join(f"{k}={v}" for k, v in j.get("decisions", {}).items() if v)
            except ValueError:
                j = None
            if rc != 0:
                problem = f"exit {rc}: " + (stderr.strip().splitlines() or ["?"])[-1]
            elif j is None:
                problem = "no JSON summary"
        else:
            m = re.search(r"Synchronization complete.*?\((.*?)\)", stdout + stderr)
            detail = m.group(1) if m else ("Nothing to do" if "Nothing to do" in stdout + stderr else "")
            if rc != 0:
                problem = f"exit {rc}: " + (stderr.strip().splitlines() or ["?"])[-1]
        self.log(f"{label} {tool}: {wall:.3f}s rc={rc} {detail}", console=False)
        if problem:
            self.logf.write(f"  cmd: {' '.join(argv)}\n  stderr: {stderr[-2000:]}\n")
        return wall, problem

    def check(self, tool: str, label: str, content: list[str], expect: set[str] | None) -> None:
        d = compare(self.path(tool, "A"), self.path(tool, "B"), content, expect)
        if d:
            self.problems.append(f"{label} {tool}: A and B differ: {'; '.join(d[:6])}")
            self.log(f"{label} {tool}: A and B DIFFER: {'; '.join(d[:6])}")

    def timed(self, case: str, tool: str, i: int, content: list[str], expect: set[str] | None) -> None:
        wall, problem = self.sync(tool, f"{case}#{i}")
        self.times.setdefault((case, tool), []).append(wall)
        if problem:
            self.problems.append(f"{case}#{i} {tool}: {problem}")
            self.log(f"{case}#{i} {tool}: {problem}")
        self.check(tool, f"{case}#{i}", content, expect)

    def order(self, i: int) -> list[str]:
        # Rotated, so that every tool takes every place in turn (the first one after a trash
        # emptying meets the slow file creation a mass delete leaves behind, see bench/fs.py).
        k = i % len(self.tools)
        return self.tools[k:] + self.tools[:k]

    # -- data -------------------------------------------------------------------------
    def prepare(self) -> None:
        pristine = self.path("pristine")
        stamp = f"{data.GENERATOR} seed={self.args.seed} {json.dumps(profile(self.args.quick), sort_keys=True)}"
        stamp_file = self.path("pristine.stamp")
        if os.path.isdir(pristine) and os.path.exists(stamp_file) and open(stamp_file).read() == stamp:
            self.log(f"reusing kept data in {pristine}")
        else:
            self.trash(pristine)
            t = time.perf_counter()
            info = data.gen_mixed(pristine, self.args.seed, profile(self.args.quick))
            with open(stamp_file, "w") as f:
                f.write(stamp)
            self.log(f"generated {info.files} files, {info.dirs} dirs, {info.bytes / 2**20:.0f} MiB "
                     f"in {time.perf_counter() - t:.1f}s")
        self.files = data.list_files(pristine)
        self.dirs = data.list_dirs(pristine)
        self.bytes = sum(os.path.getsize(os.path.join(pristine, f)) for f in self.files)
        self.plans = plan_change(self.files, self.dirs, self.args.seed)
        self.expect_change, self.changed = expected_after(self.files, self.plans)
        self.sample = self.files[:: max(1, len(self.files) // 200)]

    # -- cases ------------------------------------------------------------------------
    def case_initial(self) -> None:
        for i in range(self.args.runs):
            for tool in self.order(i):
                self.copy(self.path("pristine"), self.path(tool, "A"))
                self.trash(self.path(tool, "B"))
                os.makedirs(self.path(tool, "B"))
                self.fresh_state(tool)
                self.timed("initial", tool, i, self.sample, set(self.files))
            self.empty_trash()

    def setup_pair(self) -> None:
        """Without the initial case: the synced pair the other cases start from (untimed)."""
        for tool in self.tools:
            self.copy(self.path("pristine"), self.path(tool, "A"))
            self.trash(self.path(tool, "B"))
            os.makedirs(self.path(tool, "B"))
            self.fresh_state(tool)
            _, problem = self.sync(tool, "setup")
            if problem:
                self.problems.append(f"setup {tool}: {problem}")
        self.empty_trash()

    def case_noop(self) -> None:
        for tool in self.tools:  # one untimed warm-up run each
            _, problem = self.sync(tool, "noop-warmup")
            if problem:
                self.problems.append(f"noop warm-up {tool}: {problem}")
        for i in range(self.args.runs):
            for tool in self.order(i):
                self.timed("noop", tool, i, [], set(self.files))

    def case_change(self) -> None:
        for tool in self.tools:  # the synced pair and the tool's state, to restore before each run
            for part in ("A", "B", "state"):
                self.copy(self.path(tool, part), self.path(tool, "snap", part))
        for i in range(self.args.runs):
            for tool in self.order(i):
                for part in ("A", "B", "state"):
                    self.copy(self.path(tool, "snap", part), self.path(tool, part))
                _, problem = self.sync(tool, f"change#{i}-refresh")  # re-learn inodes changed by cp -a
                if problem:
                    self.problems.append(f"change#{i} refresh {tool}: {problem}")
                apply_ops(self.path(tool, "A"), self.plans["A"])
                apply_ops(self.path(tool, "B"), self.plans["B"])
                self.timed("change", tool, i, self.changed, self.expect_change)
            self.empty_trash()

    # -- output -----------------------------------------------------------------------
    def markdown(self, total: float) -> str:
        cpu = ""
        try:
            m = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
            cpu = m.group(1) if m else ""
        except OSError:
            pass
        commit = out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
        dirty = out(["git", "-C", REPO, "status", "--porcelain", "--", "dirsync"])
        uv = out([self.unison, "-version"]) if self.unison else "not installed"
        n_a, n_b = len(self.plans["A"]), len(self.plans["B"])
        lines = [
            f"dirsync two-way vs Unison, {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}: "
            f"{'quick' if self.args.quick else 'full'} ({len(self.files):,} files of 1–64 KiB, half text half "
            f"random, in {len(self.dirs)} dirs, {self.bytes / 2**20:.0f} MiB; seed {self.args.seed}), "
            f"{self.args.runs} runs each, median (min–max) wall seconds.",
            f"Machine: {cpu}, {os.cpu_count()} cores, kernel {platform.release()}; load average "
            f"{self.load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; trees on {self.fs_note}; "
            f"dirsync {commit}{'+dirty' if dirty else ''} (Python {platform.python_version()}); {uv}; "
            f"total {total:.0f} s.",
            "",
            "| case | dirsync s | unison s | ratio d/u |" + (" ref s | ratio ref/u |" if self.ref else ""),
            "|---|---|---|---|" + ("---|---|" if self.ref else ""),
        ]
        labels = {"initial": "initial (A full, B empty)", "noop": "no-op",
                  "change": f"1% changes on each side ({n_a} + {n_b} ops)"}
        for case in self.cases:
            cells = []
            for tool in (*TOOLS, REF):
                ws = self.times.get((case, tool))
                cells.append(f"{fmt(statistics.median(ws))} ({fmt(min(ws))}–{fmt(max(ws))})" if ws else
                             ("not installed" if tool == "unison" and not self.unison else "–"))
            d, u = self.times.get((case, "dirsync")), self.times.get((case, "unison"))
            ratio = f"{statistics.median(d) / statistics.median(u):.2f}" if d and u else "–"
            row = f"| {labels[case]} | {cells[0]} | {cells[1]} | {ratio} |"
            if self.ref:
                r = self.times.get((case, REF))
                row += f" {cells[2]} | {statistics.median(r) / statistics.median(u):.2f} |" if r and u else f" {cells[2]} | – |"
            lines.append(row)
        lines += ["", f"dirsync: `{bench_python(self.work)} -m dirsync sync --two-way --json A B`; "
                  f"unison: `unison A B {' '.join(UNISON_FLAGS)}` (own `UNISON=` dir). "
                  "Ratio < 1: dirsync faster. After every run A and B were compared (entries, sizes, "
                  "mtimes to the second, bytes of changed/sampled files) and the file list checked."]
        if self.ref:
            ref_commit = out(["git", "-C", self.ref, "rev-parse", "--short", "HEAD"])
            lines += ["", f"ref: the dirsync of {self.ref} ({ref_commit}), timed in the same runs, "
                          "the tools' order alternating run by run."]
        if self.problems:
            lines += ["", "Problems:", *[f"- {p}" for p in dict.fromkeys(self.problems)]]
        else:
            lines += ["", "All runs: A and B equal and as expected for both tools."]
        if self.notes:
            lines += ["", "Notes: " + "; ".join(self.notes)]
        return "\n".join(lines)

    def run(self) -> int:
        t0 = time.perf_counter()
        self.load0 = os.getloadavg()[0]
        if not self.unison:
            print("unison not found on PATH (Debian: apt-get install unison): "
                  "timing dirsync only", flush=True)
            self.notes.append("unison not installed: dirsync figures only")
        self.setup_fs()
        self.log(f"work dir {self.work}; trees on {self.fs_note}")
        try:
            self.prepare()
            if "initial" not in self.cases:
                self.setup_pair()
            for case in self.cases:
                t = time.perf_counter()
                getattr(self, f"case_{case}")()
                self.log(f"{case}: " + ", ".join(
                    f"{tool} {statistics.median(self.times[(case, tool)]):.3f}s"
                    for tool in self.tools if (case, tool) in self.times)
                    + f" (case took {time.perf_counter() - t:.0f}s)")
            md = self.markdown(time.perf_counter() - t0)
            with open(os.path.join(self.results, "twoway.md"), "w") as f:
                f.write(md + "\n")
            with open(os.path.join(self.results, "twoway.json"), "w") as f:
                json.dump({"times": {f"{c}/{t}": v for (c, t), v in self.times.items()},
                           "problems": self.problems, "files": len(self.files), "bytes": self.bytes,
                           "seed": self.args.seed, "quick": self.args.quick}, f, indent=1)
            print("\n" + md + f"\n\n(written to {os.path.join(self.results, 'twoway.md')})", flush=True)
        finally:
            self.cleanup()
        return 1 if self.problems else 0

    def cleanup(self) -> None:
        for p in ("last.out", "last.err"):
            try:
                os.unlink(os.path.join(self.results, p))
            except OSError:
                pass
        if self.args.keep:
            self.empty_trash()
            if self.loop:
                self.loop.teardown(delete_image=False)
                print(f"kept: {self.loop.image} (the next --keep run re-mounts it and reuses the data)")
            else:
                print(f"kept: {self.base}")
            return
        if self.loop:
            self.loop.teardown(delete_image=True)
        else:
            for p in ("pristine", "pristine.stamp", "trash", *TOOLS, REF):
                if os.path.lexists(self.path(p)):
                    sh(["rm", "-rf", self.path(p)], timeout=3600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 files instead of 10,000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", help="work dir (default $BENCH_DIR/twoway or /var/tmp/dirsync-bench-twoway)")
    ap.add_argument("--keep", action="store_true", help="keep the data (reused by the next --keep run)")
    ap.add_argument("--fs", choices=("auto", "direct"), default="auto",
                    help="auto: own loop ext4 when root (see README); direct: write in the work dir")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--cases", type=lambda v: v.split(","), help=f"comma-separated subset of {','.join(CASES)} "
                    "(without initial, the pair is synced once untimed first)")
    ap.add_argument("--ref", metavar="REPO", help="also time the dirsync in this checkout (e.g. a worktree of main) "
                    "in the same runs, as dirsync-ref")
    return Bench(ap.parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
