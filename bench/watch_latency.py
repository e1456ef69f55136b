#!/usr/bin/env python3
"""Latency of `dirsync watch` (issue 4): time from a change's completion until the
replica matches, with the daemon running against a local replica.

    python bench/watch_latency.py [--quick] [--reps N] [--churn-minutes M] [--keep]

Scenarios (each repeated --reps times, except the burst):
  small    write a new 4 KiB file
  bigedit  overwrite 64 KiB in the middle of a 100 MiB file (in place)
  dirmove  rename a directory of 1,000 files (back and forth)
  burst    create 10,000 small files at once (quick: 2,000); compared with the time
           `rsync -a` takes to copy the same directory into an empty one
Also: the daemon's CPU while idle (5 s), its RSS before and after (and over
--churn-minutes of continuous small changes), and that SIGTERM stops it (exit 0).

"Matches" is checked by polling the replica every 10 ms with cheap checks (file
present with the master's size and mtime, directory entry counts); the content of
every changed file is compared once at the end of each scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import data  # noqa: E402
from fs import FsError, LoopFs, bench_python, loop_possible, python_env  # noqa: E402

MiB = data.MiB


def now() -> float:
    return time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(cond, timeout: float, interval: float = 0.01) -> float | None:
    """Poll cond() until true; return the time it became true (perf_counter) or None."""
    deadline = now() + timeout
    while True:
        if cond():
            return now()
        if now() > deadline:
            return None
        time.sleep(interval)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def same_meta(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except FileNotFoundError:
        return False
    return sa.st_size == sb.st_size and sa.st_mtime_ns == sb.st_mtime_ns


def count(path: str) -> int:
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return -1


def pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per single-change scenario (10; quick 5)")
    ap.add_argument("--churn-minutes", type=float, default=0.0, help="minutes of continuous churn for the RSS check")
    ap.add_argument("--delay", type=float, default=None, help="pass --delay to dirsync watch")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one change to arrive")
    ap.add_argument("--work", default=os.path.join(os.environ.get("BENCH_DIR") or "/var/tmp/dirsync-bench", "watch"))
    ap.add_argument("--fs", choices=("auto", "loop", "direct"), default="auto")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    reps = args.reps or (5 if args.quick else 10)
    burst_n = 2_000 if args.quick else 10_000
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    loop = None
    base = work
    if args.fs != "direct" and not loop_possible():
        loop = LoopFs(work)
        try:
            loop.setup(reuse=False, size=min(40 << 30, os.statvfs(work).f_bavail * os.statvfs(work).f_frsize - (8 << 30)))
            base = loop.mountpoint
        except (FsError, OSError) as e:
            log(f"loop file system failed ({e}); writing in {work}")
            loop = None
    master, replica = os.path.join(base, "master"), os.path.join(base, "replica")
    state = os.path.join(base, "state")
    for p in (master, replica, state):
        subprocess.run(["rm", "-rf", p], check=True)
    results: dict = {"quick": args.quick, "reps": reps, "scenarios": {}}
    daemon = None
    try:
        # -- data: a base tree, a 100 MiB file, a directory of 1,000 files ------------
        # ~2,500 text files: the 1,000-file directory stays a minority of the
        # tree (dirsync's default mass-delete guard refuses deleting over half a replica)
        data.gen_source(master, args.seed, data.PROFILES["full"])
        stream = data.ByteStream(args.seed, "watch")
        big = os.path.join(master, "big.bin")
        with open(big, "wb") as f:
            for _ in range(100):
                f.write(stream.read(MiB))
        os.makedirs(os.path.join(master, "dirA"))
        for i in range(1000):
            with open(os.path.join(master, "dirA", f"f{i:04d}.txt"), "wb") as f:
                f.write(stream.read(1000 + i))
        os.sync()
        env = python_env(dict(os.environ, XDG_STATE_HOME=state, PYTHONPATH=REPO), REPO)
        cmd = [bench_python(work), "-m", "dirsync", "watch", master, replica, "--log-file", os.path.join(work, "watch.log")]
        if args.delay is not None:
            cmd += ["--delay", str(args.delay)]
        log("starting: " + " ".join(cmd))
        t0 = now()
        daemon = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "watch.stderr"), "wb"))
        t = wait_for(lambda: same_meta(big, os.path.join(replica, "big.bin"))
                     and count(os.path.join(replica, "dirA")) == 1000, timeout=600, interval=0.05)
        if t is None:
            raise RuntimeError("the initial sync did not complete within 600 s")
        results["initial_sync_s"] = round(t - t0, 3)
        time.sleep(1.0)
        rss0 = proc_rss_kb(daemon.pid)
        cpu0 = proc_cpu(daemon.pid)
        time.sleep(5.0)
        results["idle_cpu_percent"] = round((proc_cpu(daemon.pid) - cpu0) / 5.0 * 100, 2)
        results["rss_kb_start"] = rss0

        def scenario(name: str, change, check, verify) -> None:
            lat = []
            for i in range(reps):
                t_done = change(i)
                t_ok = wait_for(lambda: check(i), timeout=args.timeout)
                if t_ok is None:
                    results["scenarios"][name] = {"error": f"rep {i + 1}: replica did not match within {args.timeout} s"}
                    log(f"{name}: timeout")
                    return
                lat.append(t_ok - t_done)
                time.sleep(0.3)  # let the daemon go idle between repetitions
            bad = verify()
            results["scenarios"][name] = {"latencies_s": [round(x, 4) for x in lat], "p50_s": round(pct(lat, 50), 4),
                                          "p95_s": round(pct(lat, 95), 4), "max_s": round(max(lat), 4),
                                          "verify": bad or "ok"}
            log(f"{name}: p50 {pct(lat, 50):.3f}s p95 {pct(lat, 95):.3f}s max {max(lat):.3f}s verify {bad or 'ok'}")

        # small file
        def small(i: int) -> float:
            with open(os.path.join(master, f"small{i:03d}.txt"), "wb") as f:
                f.write(stream.read(4096))
            return now()
        scenario("small", small, lambda i: same_meta(os.path.join(master, f"small{i:03d}.txt"),
                                                     os.path.join(replica, f"small{i:03d}.txt")),
                 lambda: "; ".join(data.compare_trees(master, replica, content=[f"small{i:03d}.txt" for i in range(reps)])))

        # 64 KiB in the middle of the 100 MiB file
        def bigedit(i: int) -> float:
            with open(big, "r+b") as f:
                f.seek(50 * MiB + i * 4096)
                f.write(stream.read(64 * 1024))
            return now()
        scenario("bigedit", bigedit, lambda i: same_meta(big, os.path.join(replica, "big.bin")),
                 lambda: "; ".join(data.compare_trees(master, replica, content=["big.bin"])))

        # rename a directory of 1,000 files, back and forth
        def dirmove(i: int) -> float:
            a, b = ("dirA", "dirB") if i % 2 == 0 else ("dirB", "dirA")
            os.rename(os.path.join(master, a), os.path.join(master, b))
            return now()

        def moved(i: int) -> bool:
            a, b = ("dirA", "dirB") if i % 2 == 0 else ("dirB", "dirA")
            return count(os.path.join(replica, b)) == 1000 and count(os.path.join(replica, a)) == -1
        scenario("dirmove", dirmove, moved, lambda: "; ".join(data.compare_trees(master, replica)))

        # burst of small files, vs rsync -a of the same directory into an empty one
        bdir = os.path.join(master, "burst")
        os.makedirs(bdir)
        time.sleep(1.0)
        for i in range(burst_n):
            with open(os.path.join(bdir, f"b{i:05d}.dat"), "wb") as f:
                f.write(stream.read(i % 4096))
        t_done = now()
        t_ok = wait_for(lambda: count(os.path.join(replica, "burst")) == burst_n
                        and same_meta(os.path.join(bdir, f"b{burst_n - 1:05d}.dat"),
                                      os.path.join(replica, "burst", f"b{burst_n - 1:05d}.dat")),
                        timeout=max(args.timeout, 300), interval=0.05)
        bad = "; ".join(data.compare_trees(master, replica))
        os.sync()
        scratch = os.path.join(base, "rsync-burst")
        t = now()
        subprocess.run(["rsync", "-a", bdir + "/", scratch + "/"], check=True)
        rsync_s = now() - t
        results["scenarios"]["burst"] = {"files": burst_n, "converge_s": round(t_ok - t_done, 3) if t_ok else None,
                                         "rsync_a_s": round(rsync_s, 3), "verify": bad or "ok"}
        log(f"burst of {burst_n}: converged in {(t_ok - t_done) if t_ok else float('nan'):.2f}s; "
            f"rsync -a of the same directory {rsync_s:.2f}s; verify {bad or 'ok'}")

        if args.churn_minutes > 0:
            end = now() + args.churn_minutes * 60
            samples = []
            i = 0
            while now() < end:
                with open(os.path.join(master, f"churn{i % 200:03d}.txt"), "wb") as f:
                    f.write(stream.read(2048))
                i += 1
                if i % 50 == 0:
                    samples.append(proc_rss_kb(daemon.pid))
                time.sleep(0.05)
            results["churn"] = {"minutes": args.churn_minutes, "changes": i, "rss_kb_samples": samples}
        results["rss_kb_end"] = proc_rss_kb(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        try:
            results["sigterm_exit"] = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            results["sigterm_exit"] = "did not exit within 30 s"
        daemon = None
    finally:
        if daemon and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        out = os.path.join(work, "watch_results.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(json.dumps(results, indent=1))
        print(f"results: {out}")
        if not args.keep:
            if loop:
                loop.teardown(delete_image=True)
            else:
                for p in (master, replica, state, os.path.join(base, "rsync-burst")):
                    subprocess.run(["rm", "-rf", p])
        elif loop:
            loop.teardown(delete_image=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
