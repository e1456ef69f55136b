"""Command line: parses options, builds a config and a reporter, runs, and turns errors into exit codes.

This is the one place that prints errors and chooses exit codes. No decisions about files here.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Callable, List, Optional

import typer

from dirsync.errors import DirsyncError, ExitCode

app = typer.Typer(no_args_is_help=True, add_completion=True, rich_markup_mode=None,
                  help="Mirror a master directory to replicas (local paths or user@host:path over SSH).")


def _run(job: Callable[[], int], reporter) -> int:
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


def _on_sigterm(signum, frame):  # SIGTERM unwinds like Ctrl-C so temps are removed and locks dropped
    raise KeyboardInterrupt


def _transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, compress):
    from dirsync.transport import TransportOptions

    return TransportOptions(port=port, identity=identity, ssh_config=ssh_config, remote_cmd=remote_cmd,
                            accept_new_host_key=accept_new_host_key, compress=compress)


# Options shared by sync and plan.
O_EXCLUDE = typer.Option(None, "--exclude", "-x", help="gitignore-style pattern to leave out (repeatable).")
O_PORT = typer.Option(None, "--port", "-p", help="SSH port for remote replicas.")
O_IDENTITY = typer.Option(None, "--identity", "-i", help="SSH private key file.")
O_SSH_CONFIG = typer.Option(None, "--ssh-config", help="SSH config file (default ~/.ssh/config).")
O_REMOTE_CMD = typer.Option(None, "--remote-cmd", help="Command that runs dirsync on the remote side.")
O_ACCEPT = typer.Option(False, "--accept-new-host-key", help="Trust and record an unknown SSH host key.")
O_COMPRESS = typer.Option(False, "--compress", "-z", help="Compress data sent to remote replicas (zstd).")


@app.command()
def sync(
    master: str = typer.Argument(..., help="The directory whose contents are the truth."),
    replicas: List[str] = typer.Argument(..., help="Replica directories: PATH, [user@]host:PATH or ssh://..."),
    delete: bool = typer.Option(True, "--delete/--no-delete", help="Delete replica files the master lacks."),
    exclude: Optional[List[str]] = O_EXCLUDE,
    init: bool = typer.Option(False, "--init", help="Accept a non-empty directory never synced before."),
    max_delete: Optional[int] = typer.Option(None, "--max-delete", help="Delete nothing if more than N deletions."),
    allow_mass_delete: bool = typer.Option(False, "--allow-mass-delete",
                                           help="Allow emptying a replica / deleting over half of it."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Print the plan, change nothing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print a summary line even when not on a terminal."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    log_file: Optional[str] = typer.Option(None, "--log-file", help="Append timestamped lines to this file."),
    wait: float = typer.Option(0.0, "--wait", help="Wait up to SECONDS for a lock held by another run."),
    port: Optional[int] = O_PORT,
    identity: Optional[str] = O_IDENTITY,
    ssh_config: Optional[str] = O_SSH_CONFIG,
    remote_cmd: Optional[str] = O_REMOTE_CMD,
    accept_new_host_key: bool = O_ACCEPT,
    compress: bool = O_COMPRESS,
) -> None:
    """Make each REPLICA an exact mirror of MASTER.

    Example: dirsync sync ~/site /backup/site deploy@web1:/srv/site
    """
    from dirsync.progress import make_reporter
    from dirsync.sync import SyncConfig, run_sync

    reporter = make_reporter(quiet=quiet or as_json and not verbose, log_file=log_file, verbose=verbose)
    cfg = SyncConfig(master=master, replicas=tuple(replicas), delete=delete, init=init,
                     excludes=tuple(exclude or ()), max_delete=max_delete, allow_mass_delete=allow_mass_delete,
                     dry_run=dry_run, lock_wait_s=wait,
                     transport=_transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, compress))

    def job() -> int:
        run = run_sync(cfg, reporter)
        if dry_run:
            _print_plans(run, as_json)
        elif as_json:
            print(json.dumps(run.to_json(), indent=2))
        return run.exit_code

    signal.signal(signal.SIGTERM, _on_sigterm)
    raise typer.Exit(_run(job, reporter))


def _print_plans(run, as_json: bool) -> None:
    if as_json:
        out = run.to_json()
        for r, (name, plan) in zip(out["replicas"], run.plans):
            t = plan.totals()
            r["plan"] = {"lines": plan.render().splitlines(), "send_bytes": t.send_bytes,
                         "reuse_bytes": t.reuse_bytes, "writes": t.writes, "deletes": t.deletes}
        print(json.dumps(out, indent=2))
        return
    for name, plan in run.plans:
        if len(run.plans) > 1:
            print(f"== {name}")
        print(plan.render())


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
    accept_new_host_key: bool = O_ACCEPT,
) -> None:
    """Print what sync would do, one line per action, and change nothing (same as sync --dry-run).

    Example: dirsync plan ~/site /backup/site
    """
    from dirsync.progress import make_reporter
    from dirsync.sync import SyncConfig, run_sync

    reporter = make_reporter()
    cfg = SyncConfig(master=master, replicas=tuple(replicas), delete=delete, init=init,
                     excludes=tuple(exclude or ()), max_delete=max_delete, allow_mass_delete=allow_mass_delete,
                     dry_run=True,
                     transport=_transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, False))

    def job() -> int:
        run = run_sync(cfg, reporter)
        _print_plans(run, as_json)
        return run.exit_code

    raise typer.Exit(_run(job, reporter))


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
    accept_new_host_key: bool = O_ACCEPT,
) -> None:
    """Prove each REPLICA equals MASTER by rehashing both sides; list every difference.

    Exits 0 only when every replica is identical (1 when one differs).
    Example: dirsync verify ~/site /backup/site
    """
    from dirsync.progress import make_reporter
    from dirsync.verify import run_verify

    reporter = make_reporter(quiet=quiet)

    def job() -> int:
        results = run_verify(master, list(replicas), list(exclude or ()),
                             _transport_opts(port, identity, ssh_config, remote_cmd, accept_new_host_key, False),
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

    raise typer.Exit(_run(job, reporter))


def main() -> None:
    app()
