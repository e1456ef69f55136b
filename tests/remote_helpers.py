"""Shared by the remote-replica tests: how to run `dirsync agent` from THIS checkout, locally
over pipes or behind the test sshd, and how to build the matching transports and CLI options.

The agent must run from the checkout under test (CI clones the repo elsewhere and installs it
editable in a venv), so the remote command is this interpreter with the repo root first on
PYTHONPATH, derived from this file's location, never hard-coded.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from dirsync.transport import TransportOptions
from dirsync.transport.remote import RemoteTransport
from dirsync.transport.ssh import SubprocessChannel

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def agent_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def agent_argv() -> list[str]:
    return [sys.executable, "-m", "dirsync", "agent"]


def remote_cmd(env: dict[str, str] | None = None) -> str:
    """The --remote-cmd that runs this checkout's dirsync on the far side of the test sshd."""
    extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return f"env PYTHONPATH={shlex.quote(REPO_ROOT)} {extra + ' ' if extra else ''}{shlex.quote(sys.executable)} -m dirsync"


def pipe_transport(root: str | os.PathLike, opts: TransportOptions = TransportOptions(),
                   env: dict[str, str] | None = None) -> RemoteTransport:
    """RemoteTransport over a local `python -m dirsync agent` subprocess (no sshd)."""
    return RemoteTransport(f"localhost:{os.fspath(root)}", opts,
                           channel_factory=lambda: SubprocessChannel(agent_argv(), env=agent_env(env)))


def ssh_options(sshd: Any, *, env: dict[str, str] | None = None, **more: Any) -> TransportOptions:
    return TransportOptions(identity=sshd.client_key_path, ssh_config=sshd.ssh_config_path,
                            remote_cmd=remote_cmd(env), **more)


def ssh_spec(sshd: Any, root: str | os.PathLike) -> str:
    """`dirsync-test:/abs/path`: the fixture's Host alias (port, user, key, known_hosts in its config)."""
    return f"{sshd.alias}:{os.path.abspath(os.fspath(root))}"


def ssh_transport(sshd: Any, root: str | os.PathLike, env: dict[str, str] | None = None,
                  **more: Any) -> RemoteTransport:
    return RemoteTransport(ssh_spec(sshd, root), ssh_options(sshd, env=env, **more))


def ssh_cli_args(sshd: Any, env: dict[str, str] | None = None) -> list[str]:
    """CLI options that reach the fixture's sshd through its ssh_config Host alias."""
    return ["--ssh-config", sshd.ssh_config_path, "--remote-cmd", remote_cmd(env)]
