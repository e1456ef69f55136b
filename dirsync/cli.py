"""Command line: parses options, builds a config and a reporter, runs, and turns errors into exit codes.

With dirsync.commands (the bodies of sync and plan, and run_job, which maps errors to exit codes;
shared with the typer-free fast path dirsync.fastcli) this is the one place that prints errors and
chooses exit codes. No decisions about files here. Changing an option of sync or plan means
changing dirsync.fastcli.OPTIONS too (tests/test_fastcli.py checks that they agree).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import List, Optional

import typer

from dirsync import commands
from dirsync.commands import on_sigterm, print_plans, run_job, run_two_way, transport_opts, two_way_config
from dirsync.errors import DirsyncError, ExitCode

app = typer.Typer(no_args_is_help=True, add_completion=True, rich_markup_mode=None,
                  help="Mirror a master directory to replicas (local paths or user@host:path over SSH).")


def _rate_option(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    from dirsync.apply import parse_rate

    try:
        return parse_rate(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


# Options shared by sync and plan.
O_EXCLUDE = typer.Option(None, "--exclude", "-x", help="gitignore-style pattern to leave out (repeatable).")
O_INIT = typer.Option(False, "--init", help="Accept a non-empty directory never synced before.")
O_MAX_DELETE = typer.Option(None, "--max-delete", help="Delete nothing if more than N deletions.")
O_DRY_RUN = typer.Option(False, "--dry-run", "-n", help="Print the plan, change nothing.")
O_QUIET = typer.Option(False, "--quiet", "-q", help="Print only errors.")
O_VERBOSE = typer.Option(False, "--verbose", "-v", help="Print a summary line even when not on a terminal.")
O_JSON = typer.Option(False, "--json", help="Print a JSON summary on stdout.")
O_LOG_FILE = typer.Option(None, "--log-file", help="Append timestamped lines to this file.")
O_ALLOW_MASS_DELETE = typer.Option(False, "--allow-mass-delete",
                                   help="Allow emptying a replica / deleting over half of it.")
O_PORT = typer.Option(None, "--port", "-p", help="SSH port for remote replicas.")
O_IDENTITY = typer.Option(None, "--identity", "-i", help="SSH private key file.")
O_SSH_CONFIG = typer.Option(None, "--ssh-config", help="SSH config file (default ~/.ssh/config).")
O_REMOTE_CMD = typer.Option(None, "--remote-cmd", help="Command that runs dirsync on the remote side.")
O_RSH = typer.Option(None, "--rsh", metavar="CMD",
                     help="Run SSH sessions through this ssh client, e.g. 'ssh' (OpenSSH, its own config and "
                          "known_hosts), as rsync -e; default: $DIRSYNC_RSH, else the built-in client.")
O_ACCEPT = typer.Option(False, "--accept-new-host-key", help="Trust and record an unknown SSH host key.")
O_COMPRESS = typer.Option(False, "--compress", "-z", help="Compress data sent to remote replicas (zstd).")
O_BACKUP_DIR = typer.Option(None, "--backup-dir", metavar="DIR",
                            help="Keep replica files that are overwritten or deleted in DIR/<UTC time>/<path> "
                                 "(relative DIR: inside each replica root, left out of the sync).")
O_BACKUP_KEEP = typer.Option(None, "--backup-keep", min=1, metavar="N",
                             help="With --backup-dir: keep only the newest N run folders (default: all).")
O_BWLIMIT = typer.Option(None, "--bwlimit", metavar="RATE", callback=_rate_option,
                         help="Limit master data sent to each replica, bytes/second: 500K, 10M (1024-based).")
O_JOBS = typer.Option(None, "--jobs", "-j", min=1, metavar="N",
                      help="Local replicas synced at the same time, each by its own process "
                           "(default: one per core, at least 4; 1: one after another).")
O_TWO_WAY = typer.Option(False, "--two-way", help="Sync MASTER and one REPLICA both ways (three-way against the last "
                                                 "run; differing changes are kept as .sync-conflict- copies, exit 4).")
O_PREFER = typer.Option(None, "--prefer", metavar="a|b|newer",
                        help="With --two-way: settle conflicts without copies, keeping side a's, b's or the newer version.")
O_CONFIG = typer.Option(None, "--config", "-c", metavar="FILE",
                        help="Profiles file (default $XDG_CONFIG_HOME/dirsync/config.toml).")


@app.command()
def sync(
    master: str = typer.Argument(..., help="The directory whose contents are the truth."),
    replicas: List[str] = typer.Argument(..., help="Replica directories: PATH, [user@]host:PATH or ssh://..."),
    delete: bool = typer.Option(True, "--delete/--no-delete", help="Delete replica files the master lacks."),
    exclude: Optional[List[str]] = O_EXCLUDE,
    init: bool = O_INIT,
    max_delete: Optional[int] = O_MAX_DELETE,
    allow_mass_delete: bool = O_ALLOW_MASS_DELETE,
    dry_run: bool = O_DRY_RUN,
    quiet: bool = O_QUIET,
    verbose: bool = O_VERBOSE,
    as_json: bool = O_JSON,
    log_file: Optional[str] = O_LOG_FILE,
    wait: float = typer.Option(0.0, "--wait", help="Wait up to SECONDS for a lock held by another run."),
    port: Optional[int] = O_PORT,
    identity: Optional[str] = O_IDENTITY,
    ssh_config: Optional[str] = O_SSH_CONFIG,
    remote_cmd: Optional[str] = O_REMOTE_CMD,
    rsh: Optional[str] = O_RSH,
    accept_new_host_key: bool = O_ACCEPT,
    compress: bool = O_COMPRESS,
    backup_dir: Optional[str] = O_BACKUP_DIR,
    backup_keep: Optional[int] = O_BACKUP_KEEP,
    bwlimit: Optional[str] = O_BWLIMIT,
    jobs: Optional[int] = O_JOBS,
    two_way: bool = O_TWO_WAY,
    prefer: Optional[str] = O_PREFER,
) -> None:
    """Make each REPLICA an exact mirror of MASTER (with --two-way: sync MASTER and REPLICA both ways).

    Example: dirsync sync ~/site /backup/site deploy@web1:/srv/site
    """
    raise typer.Exit(commands.sync(
        master=master, replicas=replicas, delete=delete, exclude=exclude, init=init, max_delete=max_delete,
        allow_mass_delete=allow_mass_delete, dry_run=dry_run, quiet=quiet, verbose=verbose, as_json=as_json,
        log_file=log_file, wait=wait, port=port, identity=identity, ssh_config=ssh_config, remote_cmd=remote_cmd,
        accept_new_host_key=accept_new_host_key, compress=compress, backup_dir=backup_dir, backup_keep=backup_keep,
        bwlimit=bwlimit, jobs=jobs, two_way=two_way, prefer=prefer, rsh=rsh))  # type: ignore[arg-type] # bwlimit: parsed by its callback


@app.command()
def plan(
    master: str = typer.Argument(...),
    replicas: List[str] = typer.Argument(...),
    delete: bool = typer.Option(True, "--delete/--no-delete"),
    exclude: Optional[List[str]] = O_EXCLUDE,
    init: bool = typer.Option(False, "--init", help="Plan as if --init were given to sync."),
    max_delete: Optional[int] = typer.Option(None, "--max-delete"),
    allow_mass_delete: bool = typer.Option(False, "--allow-mass-delete"),
    as_json: bool = typer.Option(False, "--json"),
    port: Optional[int] = O_PORT,
    identity: Optional[str] = O_IDENTITY,
    ssh_config: Optional[str] = O_SSH_CONFIG,
    remote_cmd: Optional[str] = O_REMOTE_CMD,
    rsh: Optional[str] = O_RSH,
    accept_new_host_key: bool = O_ACCEPT,
    two_way: bool = O_TWO_WAY,
    prefer: Optional[str] = O_PREFER,
) -> None:
    """Print what sync would do, one line per action, and change nothing (same as sync --dry-run).

    Example: dirsync plan ~/site /backup/site
    """
    raise typer.Exit(commands.plan(
        master=master, replicas=replicas, delete=delete, exclude=exclude, init=init, max_delete=max_delete,
        allow_mass_delete=allow_mass_delete, as_json=as_json, port=port, identity=identity, ssh_config=ssh_config,
        remote_cmd=remote_cmd, accept_new_host_key=accept_new_host_key, two_way=two_way, prefer=prefer, rsh=rsh))


@app.command()
def verify(
    master: str = typer.Argument(...),
    replicas: List[str] = typer.Argument(...),
    exclude: Optional[List[str]] = O_EXCLUDE,
    quick: bool = typer.Option(False, "--quick", help="Trust the caches: compare cached root digests only."),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    port: Optional[int] = O_PORT,
    identity: Optional[str] = O_IDENTITY,
    ssh_config: Optional[str] = O_SSH_CONFIG,
    remote_cmd: Optional[str] = O_REMOTE_CMD,
    rsh: Optional[str] = O_RSH,
    accept_new_host_key: bool = O_ACCEPT,
    backup_dir: Optional[str] = typer.Option(None, "--backup-dir", metavar="DIR",
                                             help="The --backup-dir used by sync (left out when inside a replica)."),
) -> None:
    """Prove each REPLICA equals MASTER by rehashing both sides; list every difference.

    Exits 0 only when every replica is identical (1 when one differs). --quick rehashes and
    walks nothing: it compares the Merkle roots of the cached manifests (master cache in the
    state dir, replica cache in REPLICA/.dirsync), i.e. whether the last scans agree.

    Example: dirsync verify ~/site /backup/site
    """
    from dirsync.progress import make_reporter
    from dirsync.verify import run_verify

    reporter = make_reporter(quiet=quiet)

    def job() -> int:
        results = run_verify(master, list(replicas), list(exclude or ()),
                             transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, False,
                                            backup_dir, rsh=rsh),
                             reporter, quick=quick)
        if as_json:
            print(json.dumps({"replicas": [{"replica": r.replica, "equal": r.equal,
                                            "master_root": r.master_root.hex(), "replica_root": r.replica_root.hex(),
                                            "differences": [d.to_json() for d in r.differences]}
                                           for r in results]}, indent=2))
        elif not quiet:
            for r in results:
                if r.equal:
                    print(f"{r.replica}: identical (root {r.master_root.hex()[:16]})")
                else:
                    print(f"{r.replica}: {len(r.differences)} difference(s)")
                    for d in r.differences:
                        print("  " + d.render())
        return 0 if all(r.equal for r in results) else 1

    raise typer.Exit(run_job(job, reporter))


def _fail_early(e: DirsyncError) -> "typer.Exit":
    """A config problem found before a reporter exists: print it like _run would."""
    print(f"error: {e}", file=sys.stderr)
    if e.hint:
        print(f"hint: {e.hint}", file=sys.stderr)
    return typer.Exit(int(e.exit_code))


def _or(flag, profile, key: str, default=None):
    """A command-line value wins over the profile's; None means "not given"."""
    return flag if flag is not None else profile.get(key, default)


@app.command()
def run(
    name: str = typer.Argument(..., help="Profile name: a [profile.NAME] table of the config file."),
    config: Optional[str] = O_CONFIG,
    delete: Optional[bool] = typer.Option(None, "--delete/--no-delete", help="Override the profile's delete."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", "-x",
                                                help="Another pattern to leave out (added to the profile's)."),
    init: bool = O_INIT,
    max_delete: Optional[int] = O_MAX_DELETE,
    allow_mass_delete: bool = O_ALLOW_MASS_DELETE,
    dry_run: bool = O_DRY_RUN,
    quiet: bool = O_QUIET,
    verbose: bool = O_VERBOSE,
    as_json: bool = O_JSON,
    log_file: Optional[str] = O_LOG_FILE,
    wait: Optional[float] = typer.Option(None, "--wait", help="Wait up to SECONDS for a lock held by another run."),
    backup_dir: Optional[str] = O_BACKUP_DIR,
    backup_keep: Optional[int] = O_BACKUP_KEEP,
    bwlimit: Optional[str] = O_BWLIMIT,
    jobs: Optional[int] = O_JOBS,
    port: Optional[int] = O_PORT,
    identity: Optional[str] = O_IDENTITY,
    ssh_config: Optional[str] = O_SSH_CONFIG,
    remote_cmd: Optional[str] = O_REMOTE_CMD,
    rsh: Optional[str] = O_RSH,
    accept_new_host_key: bool = O_ACCEPT,
    compress: Optional[bool] = typer.Option(None, "--compress/--no-compress", "-z",
                                            help="Compress data sent to remote replicas (zstd)."),
    prefer: Optional[str] = typer.Option(None, "--prefer", metavar="a|b|newer",
                                         help="Override a two_way profile's prefer (settle conflicts without copies)."),
) -> None:
    """Run the profile NAME from the config file; command-line flags override it.

    \b
    Example: dirsync run backup --quiet
    crontab: */5 * * * * dirsync run backup

    \b
    ~/.config/dirsync/config.toml (or --config FILE):
      [profile.backup]
      master      = "~/site"
      replicas    = ["/mnt/backup/site", "deploy@web1:/srv/site"]
      exclude     = ["*.log", "build/"]
      max_delete  = 200
      backup_dir  = ".dirsync-backup"
      backup_keep = 14
      bwlimit     = "10M"
      wait        = 300
    Other keys: delete, init, allow_mass_delete, compress, jobs, log_file, quiet, verbose, json,
    port, identity, ssh_config, remote_cmd, rsh ("ssh": OpenSSH), accept_new_host_key, connect_timeout,
    two_way (true: sync master and its one replica both ways), prefer ("a", "b" or "newer").

    \b
    Exit codes: 0 ok (or nothing to do), 2 usage/config error, 3 locked, 4 two-way conflicts
    kept as copies, 10 connection, 11 protocol, 12 refused by a safety guard, 23 partial,
    25 delete limit, 130 interrupted.
    """
    from dirsync import profiles
    from dirsync.progress import make_reporter
    from dirsync.sync import SyncConfig, run_sync

    try:
        prof = profiles.load(config).profile(name)
        two_way = prof.get("two_way", False)
        if prefer is not None and not two_way:
            from dirsync.errors import ConfigError

            raise ConfigError(f"--prefer only applies to a two-way profile; {name!r} has no two_way = true")
    except DirsyncError as e:
        raise _fail_early(e)
    as_json = as_json or prof.get("json", False)
    verbose = verbose or prof.get("verbose", False)
    quiet = quiet or prof.get("quiet", False)
    reporter = make_reporter(quiet=quiet or as_json and not verbose, log_file=_or(log_file, prof, "log_file"),
                             verbose=verbose)
    more = {"connect_timeout": prof.get("connect_timeout")} if prof.get("connect_timeout") is not None else {}
    more["rsh"] = _or(rsh, prof, "rsh")
    cfg = SyncConfig(
        master=prof.get("master"), replicas=tuple(prof.get("replicas")), delete=_or(delete, prof, "delete", True),
        init=init or prof.get("init", False), excludes=tuple(prof.get("exclude", [])) + tuple(exclude or ()),
        max_delete=_or(max_delete, prof, "max_delete"),
        allow_mass_delete=allow_mass_delete or prof.get("allow_mass_delete", False), dry_run=dry_run,
        lock_wait_s=_or(wait, prof, "wait", 0.0), bwlimit=_or(bwlimit, prof, "bwlimit"), profile=name,
        jobs=_or(jobs, prof, "jobs", 0),
        transport=transport_opts(_or(port, prof, "port"), _or(identity, prof, "identity"),
                                 _or(ssh_config, prof, "ssh_config"), _or(remote_cmd, prof, "remote_cmd"),
                                 accept_new_host_key or prof.get("accept_new_host_key", False),
                                 _or(compress, prof, "compress", False), _or(backup_dir, prof, "backup_dir"),
                                 _or(backup_keep, prof, "backup_keep"), **more))

    def job() -> int:
        if two_way:
            return run_two_way(cfg, True, _or(prefer, prof, "prefer"), reporter, as_json, show_plan=dry_run)
        result = run_sync(cfg, reporter)
        if dry_run:
            print_plans(result, as_json)
        elif as_json:
            out = result.to_json()
            out["profile"] = name
            print(json.dumps(out, indent=2))
        return result.exit_code

    signal.signal(signal.SIGTERM, on_sigterm)
    raise typer.Exit(run_job(job, reporter))


@app.command()
def status(
    targets: Optional[List[str]] = typer.Argument(None, metavar="[PROFILE | MASTER REPLICA...]",
                                                  help="A profile name, or MASTER and its replicas; "
                                                       "nothing: every profile of the config file."),
    config: Optional[str] = O_CONFIG,
    exclude: Optional[List[str]] = O_EXCLUDE,
    no_check: bool = typer.Option(False, "--no-check", help="Only show the records; do not scan to see "
                                                             "whether a replica is behind."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object on stdout."),
    backup_dir: Optional[str] = typer.Option(None, "--backup-dir", metavar="DIR",
                                             help="The --backup-dir used by sync (MASTER REPLICA form)."),
    two_way: bool = typer.Option(False, "--two-way", help="MASTER REPLICA form: the pair is synced two-way (the "
                                                          "default when only a two-way record exists for it)."),
    port: Optional[int] = O_PORT,
    identity: Optional[str] = O_IDENTITY,
    ssh_config: Optional[str] = O_SSH_CONFIG,
    remote_cmd: Optional[str] = O_REMOTE_CMD,
    rsh: Optional[str] = O_RSH,
    accept_new_host_key: bool = O_ACCEPT,
) -> None:
    """For each replica: when it was last synced successfully, by which run, and whether it is
    behind the master now (a dry-run plan is not empty). A two-way pair (a two_way profile, or
    A B synced with --two-way) is shown as "A ⇄ B (two-way)": behind means a dry-run two-way
    sync would change something on either side.

    Exits 0 when every replica is up to date, 1 when one is behind, or the code of the error
    that stopped a check (e.g. 10 for an unreachable host, 12 for a missing master).

    Example: dirsync status backup        (or: dirsync status ~/site /backup/site)
    """
    import os

    from dirsync import profiles
    from dirsync.progress import make_reporter
    from dirsync.status import check_status, check_twoway_status, load_record, load_twoway_record
    from dirsync.sync import _SEVERITY, SyncConfig, _replica_key

    targets = list(targets or [])
    # (profile name, config, two-way prefer or None, two-way?)
    groups: list[tuple[Optional[str], SyncConfig, Optional[str], bool]] = []
    try:
        if len(targets) >= 2:
            cfg = SyncConfig(master=targets[0], replicas=tuple(targets[1:]), excludes=tuple(exclude or ()),
                             transport=transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key,
                                                      False, backup_dir, rsh=rsh))
            if not two_way and len(targets) == 2 and load_twoway_record(targets[0], targets[1]) is not None:
                two_way = load_record(os.path.realpath(targets[0]), _replica_key(targets[1])) is None
            groups.append((None, cfg, None, two_way))
        else:
            cfgfile = profiles.load(config)
            names = targets or sorted(cfgfile.profiles)
            for n in names:
                p = cfgfile.profile(n)
                groups.append((n, SyncConfig(
                    master=p.get("master"), replicas=tuple(p.get("replicas")), delete=p.get("delete", True),
                    excludes=tuple(p.get("exclude", [])) + tuple(exclude or ()), max_delete=p.get("max_delete"),
                    allow_mass_delete=p.get("allow_mass_delete", False), profile=n,
                    transport=transport_opts(p.get("port"), p.get("identity"), p.get("ssh_config"),
                                             p.get("remote_cmd"), p.get("accept_new_host_key", False), False,
                                             p.get("backup_dir"), p.get("backup_keep"), rsh=_or(rsh, p, "rsh"))),
                               p.get("prefer"), p.get("two_way", False)))
        twc = {i: two_way_config(g[1], True, g[2]) for i, g in enumerate(groups) if g[3]}
    except DirsyncError as e:
        raise _fail_early(e)
    reporter = make_reporter(quiet=True)

    def job() -> int:
        codes = set()  # of failed checks
        behind = False
        out = []
        for i, (n, cfg, _, is_two_way) in enumerate(groups):
            if is_two_way:
                pairs = [check_twoway_status(twc[i], reporter, check=not no_check)]
            else:
                pairs = check_status(cfg, reporter, check=not no_check)
            for ps in pairs:
                if ps.exit_code:
                    codes.add(ps.exit_code)
                behind = behind or bool(ps.behind)
            out.append({"profile": n, "master": cfg.master, "two_way": is_two_way,
                        "replicas": [ps.to_json() for ps in pairs]})
            if not as_json:
                if n is not None or len(groups) > 1:
                    print(f"== {n or cfg.master}: {cfg.master}" + (" (two-way)" if is_two_way else ""))
                for ps in pairs:
                    print(ps.render())
        if as_json:
            print(json.dumps({"profiles": out}, indent=2))
        for c in _SEVERITY:  # a failed check outranks "behind"
            if int(c) in codes and c != ExitCode.OK:
                return int(c)
        return 1 if behind or codes else 0

    raise typer.Exit(run_job(job, reporter))


@app.command()
def watch(
    master: str = typer.Argument(..., help="The directory whose contents are the truth."),
    replicas: List[str] = typer.Argument(..., help="Replica directories: PATH, [user@]host:PATH or ssh://..."),
    delay: float = typer.Option(0.2, "--delay", min=0.0, help="Seconds of quiet before a batch of changes syncs."),
    max_latency: float = typer.Option(2.0, "--max-latency", min=0.0,
                                      help="Sync a batch this many seconds after its first change at the latest."),
    rescan_interval: float = typer.Option(3600.0, "--rescan-interval", min=1.0,
                                          help="Seconds between full rescans (catch what events missed)."),
    delete: bool = typer.Option(True, "--delete/--no-delete", help="Delete replica files the master lacks."),
    exclude: Optional[List[str]] = O_EXCLUDE,
    init: bool = O_INIT,
    max_delete: Optional[int] = O_MAX_DELETE,
    allow_mass_delete: bool = O_ALLOW_MASS_DELETE,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only warnings and errors."),
    log_file: Optional[str] = O_LOG_FILE,
    port: Optional[int] = O_PORT,
    identity: Optional[str] = O_IDENTITY,
    ssh_config: Optional[str] = O_SSH_CONFIG,
    remote_cmd: Optional[str] = O_REMOTE_CMD,
    rsh: Optional[str] = O_RSH,
    accept_new_host_key: bool = O_ACCEPT,
    compress: bool = O_COMPRESS,
    backup_dir: Optional[str] = O_BACKUP_DIR,
    backup_keep: Optional[int] = O_BACKUP_KEEP,
    bwlimit: Optional[str] = O_BWLIMIT,
    two_way: bool = typer.Option(False, "--two-way", help="Keep MASTER and one REPLICA in step both ways (a two-way "
                                                         "sync per batch of changes on either local side)."),
    prefer: Optional[str] = O_PREFER,
    interval: Optional[float] = typer.Option(None, "--interval", min=0.0, metavar="SECONDS",
                                             help="With --two-way: also sync every SECONDS (a remote side raises no "
                                                  "events here; default 30 when a side is remote, 0 = off)."),
) -> None:
    """Keep each REPLICA in sync with MASTER as files change (one sync at start, then on events).

    A replica that fails (host down, disk unmounted) is retried with backoff while the others go
    on. SIGINT/SIGTERM: the current file is finished or dropped (no temp left), locks are
    released, exit 0; a second signal interrupts at once (exit 130). A second watcher of the
    same master/replica pair exits 3. One info line per synced batch unless --quiet.

    With --two-way A B: each batch of changes on a local side runs one two-way sync of the pair
    (plus one every --interval seconds); conflicts are kept as copies and logged as warnings,
    the watcher goes on.

    Example: dirsync watch ~/site /backup/site deploy@web1:/srv/site --log-file ~/dirsync.log
    """
    import threading

    from dirsync.progress import Reporter
    from dirsync.sync import SyncConfig
    from dirsync.watch import run_watch, run_watch_twoway

    reporter = Reporter(sys.stderr, quiet=quiet, log_file=log_file, verbose=not quiet)
    cfg = SyncConfig(master=master, replicas=tuple(replicas), delete=delete, init=init,
                     excludes=tuple(exclude or ()), max_delete=max_delete, allow_mass_delete=allow_mass_delete,
                     bwlimit=bwlimit,  # type: ignore[arg-type] # parsed by its callback
                     transport=transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, compress,
                                              backup_dir, backup_keep, rsh=rsh))
    stop = threading.Event()

    def on_signal(signum, frame):  # first: finish cleanly; second: unwind now (temps removed, 130)
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def job() -> int:
        if two_way or prefer:
            return run_watch_twoway(two_way_config(cfg, two_way, prefer), reporter, stop, delay_s=delay,
                                    max_latency_s=max(max_latency, delay), rescan_interval_s=rescan_interval,
                                    interval_s=interval, ignore_paths=[log_file] if log_file else [])
        if interval is not None:
            from dirsync.errors import ConfigError

            raise ConfigError("--interval only applies with --two-way",
                              hint="one-way watching rescans the master every --rescan-interval seconds")
        return run_watch(cfg, reporter, stop, delay_s=delay, max_latency_s=max(max_latency, delay),
                         rescan_interval_s=rescan_interval, ignore_paths=[log_file] if log_file else [])

    raise typer.Exit(run_job(job, reporter))


@app.command(hidden=True)
def agent() -> None:
    """Serve one replica over stdin/stdout (started by a remote `dirsync sync` through SSH).

    Example: dirsync agent   (run by `ssh HOST dirsync agent`; it speaks frames, not text)
    """
    from dirsync.transport.agent import main as agent_main

    raise typer.Exit(agent_main())


def main() -> None:
    app()
