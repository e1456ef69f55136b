"""Command bodies shared by the typer CLI (dirsync.cli) and its typer-free fast path (dirsync.fastcli).

Every function here takes already parsed and validated option values and returns an exit code;
none imports typer or click, so `dirsync sync` / `dirsync plan` can run without loading them.
The option declarations, help and usage errors live in dirsync.cli only.
"""

from __future__ import annotations

from dirsync.errors import DirsyncError, ExitCode

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable, Optional, Sequence


def run_job(job: Callable[[], int], reporter) -> int:
    """Run `job`, mapping exceptions to exit codes and printing them once."""
    try:
        return job()
    except DirsyncError as e:
        reporter.fatal(str(e), e.hint)
        return int(e.exit_code)
    except KeyboardInterrupt:
        reporter.fatal("interrupted; partial work was discarded, the replica keeps its previous files")
        return int(ExitCode.INTERRUPTED)
    finally:
        reporter.close()


def on_sigterm(signum, frame):  # SIGTERM unwinds like Ctrl-C so temps are removed and locks dropped
    raise KeyboardInterrupt


def transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, compress,
                   backup_dir=None, backup_keep=None, **more):
    # more: connect_timeout, rsh (None: $DIRSYNC_RSH, else the built-in client)
    from dirsync.transport import TransportOptions

    return TransportOptions(port=port, identity=identity, ssh_config=ssh_config, remote_cmd=remote_cmd,
                            accept_new_host_key=accept_new_host_key, compress=compress,
                            backup_dir=backup_dir, backup_keep=backup_keep, **more)


def two_way_config(cfg, two_way: bool, prefer):
    """The TwoWayConfig for a command's SyncConfig (MASTER is side a, the one REPLICA side b)."""
    from dirsync.errors import ConfigError
    from dirsync.twoway import TwoWayConfig

    if not two_way:
        raise ConfigError("--prefer only applies with --two-way")
    return TwoWayConfig.from_sync(cfg, prefer)


# The last two-way summary (with what its run built, TwoWaySummary.held): a command ends the
# process right after it returns (fastcli leaves by os._exit), and freeing a 10,000-file run's
# objects one by one took ~40 ms of a 1% change run. One at a time: the next run replaces it.
_last_two_way = None


def run_two_way(cfg, two_way: bool, prefer, reporter, as_json: bool, show_plan: bool) -> int:
    """Run (show_plan: only plan) a two-way sync and print it. A real run holds the pair lock
    (waiting cfg.lock_wait_s) and is recorded for `dirsync status` (cfg.profile names it)."""
    from dirsync.status import run_twoway_recorded
    from dirsync.twoway import print_summary, run_twoway

    tcfg = two_way_config(cfg, two_way, prefer)
    if tcfg.dry_run:
        summ, run_id = run_twoway(tcfg, reporter), None
    else:
        summ, run_id = run_twoway_recorded(tcfg, reporter, profile=cfg.profile, wait_s=cfg.lock_wait_s)
    extra = {k: v for k, v in (("run_id", run_id), ("profile", cfg.profile)) if v is not None}
    print_summary(summ, tcfg, reporter, as_json=as_json, show_plan=show_plan, extra=extra)
    global _last_two_way
    _last_two_way = summ
    return summ.exit_code


def print_plans(run, as_json: bool) -> None:
    if as_json:
        out = run.to_json()
        for r, (name, plan) in zip(out["replicas"], run.plans):
            t = plan.totals()
            r["plan"] = {"lines": plan.render().splitlines(), "send_bytes": t.send_bytes,
                         "reuse_bytes": t.reuse_bytes, "writes": t.writes, "deletes": t.deletes,
                         "dir_moves": t.dir_moves}
        from dirsync.status import dumps  # (json.dumps's text without importing json: see status.py)

        print(dumps(out, indent=2))
        return
    for name, plan in run.plans:
        if len(run.plans) > 1:
            print(f"== {name}")
        print(plan.render())


# The two commands below take exactly the parameters of their typer commands, keyword-only and
# without defaults (the CLI layers supply every value), with --bwlimit already parsed to bytes/s.


def sync(*, master: str, replicas: Sequence[str], delete: bool, exclude: Optional[Sequence[str]], init: bool,
         max_delete: Optional[int], allow_mass_delete: bool, dry_run: bool, quiet: bool, verbose: bool,
         as_json: bool, log_file: Optional[str], wait: float, port: Optional[int], identity: Optional[str],
         ssh_config: Optional[str], remote_cmd: Optional[str], accept_new_host_key: bool, compress: bool,
         backup_dir: Optional[str], backup_keep: Optional[int], bwlimit: Optional[int], jobs: Optional[int],
         two_way: bool, prefer: Optional[str], rsh: Optional[str]) -> int:
    """`dirsync sync`: the exit code. Installs the SIGTERM handler (SIGTERM unwinds like Ctrl-C)."""
    import _signal as signal  # (the C module, loaded at start-up: signal.py's enums cost ~3 ms)

    from dirsync.progress import make_reporter
    from dirsync.sync import SyncConfig, run_sync

    reporter = make_reporter(quiet=quiet or as_json and not verbose, log_file=log_file, verbose=verbose)
    cfg = SyncConfig(master=master, replicas=tuple(replicas), delete=delete, init=init,
                     excludes=tuple(exclude or ()), max_delete=max_delete, allow_mass_delete=allow_mass_delete,
                     dry_run=dry_run, lock_wait_s=wait, bwlimit=bwlimit, jobs=jobs or 0,
                     transport=transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, compress,
                                              backup_dir, backup_keep, rsh=rsh))

    def job() -> int:
        if two_way or prefer:
            return run_two_way(cfg, two_way, prefer, reporter, as_json, show_plan=dry_run)
        run = run_sync(cfg, reporter)
        if dry_run:
            print_plans(run, as_json)
        elif as_json:
            from dirsync.status import dumps  # (json.dumps's text without importing json: see status.py)

            print(dumps(run.to_json(), indent=2))
        return run.exit_code

    signal.signal(signal.SIGTERM, on_sigterm)
    return run_job(job, reporter)


def plan(*, master: str, replicas: Sequence[str], delete: bool, exclude: Optional[Sequence[str]], init: bool,
         max_delete: Optional[int], allow_mass_delete: bool, as_json: bool, port: Optional[int],
         identity: Optional[str], ssh_config: Optional[str], remote_cmd: Optional[str], accept_new_host_key: bool,
         two_way: bool, prefer: Optional[str], rsh: Optional[str]) -> int:
    """`dirsync plan`: the exit code."""
    from dirsync.progress import make_reporter
    from dirsync.sync import SyncConfig, run_sync

    reporter = make_reporter()
    cfg = SyncConfig(master=master, replicas=tuple(replicas), delete=delete, init=init,
                     excludes=tuple(exclude or ()), max_delete=max_delete, allow_mass_delete=allow_mass_delete,
                     dry_run=True,
                     transport=transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, False,
                                              rsh=rsh))

    def job() -> int:
        if two_way or prefer:
            return run_two_way(cfg, two_way, prefer, reporter, as_json, show_plan=True)
        run = run_sync(cfg, reporter)
        print_plans(run, as_json)
        return run.exit_code

    return run_job(job, reporter)
