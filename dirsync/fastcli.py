"""Typer-free fast path for `dirsync sync` and `dirsync plan`.

Importing typer/click and building the command tree costs ~0.1 s, as much as a whole no-op sync.
parse() accepts only plainly valid command lines of these two commands and returns None for
anything else (an unknown option, --help, a missing value or argument, a bad number, a failing
--bwlimit, short-flag clusters such as -nq, ...); the caller then runs typer, which parses the
same arguments again and prints its own help or usage error with its own exit code. So this
module never reports a usage error itself.

The option tables below must equal the typer declarations in dirsync.cli (tests/test_fastcli.py
checks every option against the click command built from the typer app). An accepted command
line yields exactly the values typer would pass, and runs the same function of dirsync.commands.
"""

from __future__ import annotations

import errno
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable, Optional

FLAG, STR, STRS, INT, FLOAT = "flag", "str", "strs", "int", "float"  # STRS: repeatable STR (a list or None)


class Opt:
    """One option (a plain class: typing.NamedTuple would import typing on this fast path)."""

    __slots__ = ("name", "flags", "kind", "default", "off", "min", "convert")

    def __init__(self, name: str, flags: tuple[str, ...], kind: str, default: object = None,
                 off: tuple[str, ...] = (), min: Optional[int] = None,
                 convert: Optional[Callable[[str], object]] = None) -> None:
        self.name = name  # the command function's parameter
        self.flags = flags  # the option strings; a FLAG option sets True
        self.kind = kind  # FLAG, STR, STRS, INT or FLOAT
        self.default = default
        self.off = off  # FLAG only: option strings that set False (--no-delete)
        self.min = min  # INT only: lower bound, as click.IntRange(min=...)
        self.convert = convert  # STR only: typer's callback; ValueError -> not accepted


def _parse_rate(text: str) -> int:
    from dirsync.apply import parse_rate

    return parse_rate(text)


_SHARED = (  # options of both sync and plan
    Opt("delete", ("--delete",), FLAG, True, off=("--no-delete",)),
    Opt("exclude", ("--exclude", "-x"), STRS),
    Opt("init", ("--init",), FLAG, False),
    Opt("max_delete", ("--max-delete",), INT),
    Opt("allow_mass_delete", ("--allow-mass-delete",), FLAG, False),
    Opt("as_json", ("--json",), FLAG, False),
    Opt("port", ("--port", "-p"), INT),
    Opt("identity", ("--identity", "-i"), STR),
    Opt("ssh_config", ("--ssh-config",), STR),
    Opt("remote_cmd", ("--remote-cmd",), STR),
    Opt("rsh", ("--rsh",), STR),
    Opt("accept_new_host_key", ("--accept-new-host-key",), FLAG, False),
    Opt("two_way", ("--two-way",), FLAG, False),
    Opt("prefer", ("--prefer",), STR),
)

OPTIONS: dict[str, tuple[Opt, ...]] = {  # command -> its options (both take MASTER REPLICA...)
    "sync": _SHARED + (
        Opt("dry_run", ("--dry-run", "-n"), FLAG, False),
        Opt("quiet", ("--quiet", "-q"), FLAG, False),
        Opt("verbose", ("--verbose", "-v"), FLAG, False),
        Opt("log_file", ("--log-file",), STR),
        Opt("wait", ("--wait",), FLOAT, 0.0),
        Opt("compress", ("--compress", "-z"), FLAG, False),
        Opt("backup_dir", ("--backup-dir",), STR),
        Opt("backup_keep", ("--backup-keep",), INT, min=1),
        Opt("bwlimit", ("--bwlimit",), STR, convert=_parse_rate),
        Opt("jobs", ("--jobs", "-j"), INT, min=1),
    ),
    "plan": _SHARED,
}

# Plain ASCII numbers only; anything else click might read differently ("1_000", "inf", " 5",
# "٣") falls back. (Checked by hand: the re module would cost this fast path its import.)
_DIGITS = frozenset("0123456789")


def _plain_int(text: str) -> bool:
    """-?[0-9]{1,18}"""
    d = text[1:] if text[:1] == "-" else text
    return 0 < len(d) <= 18 and _DIGITS.issuperset(d)


def _plain_float(text: str) -> bool:
    """-?([0-9]{1,30}(\\.[0-9]{0,30})?|\\.[0-9]{1,30})"""
    d = text[1:] if text[:1] == "-" else text
    whole, _, frac = d.partition(".")
    if not _DIGITS.issuperset(whole) or not _DIGITS.issuperset(frac) or len(whole) > 30 or len(frac) > 30:
        return False
    return bool(whole) or bool(frac)


def parse(args: list[str]) -> Optional[tuple[str, dict]]:
    """`sync ...` / `plan ...` (sys.argv[1:]) -> (command, its keyword arguments), as typer would
    call dirsync.commands.<command>; None when typer must handle the command line."""
    table = OPTIONS.get(args[0]) if args else None
    if table is None:
        return None
    by_flag = {f: (o, True) for o in table for f in o.flags}
    by_flag.update({f: (o, False) for o in table for f in o.off})
    values: dict = {o.name: o.default for o in table}
    positional: list[str] = []
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--":  # the rest is positional, as for click
            positional.extend(rest)
            break
        if arg[:1] != "-" or arg == "-":  # click: a lone "-" is a positional argument; options may follow arguments
            positional.append(arg)
            continue
        flag, eq, value = arg.partition("=") if arg[:2] == "--" else (arg, "", "")
        hit = by_flag.get(flag)  # None: unknown, --help, -nq, -xVALUE, -x=V, a negative number...
        if hit is None:
            return None
        opt, on = hit
        if opt.kind == FLAG:
            if eq:  # click: "Option '--init' does not take a value."
                return None
            values[opt.name] = on
            continue
        if not eq:
            value = next(rest, None)
            if value is None or value[:1] == "-" and value != "-":  # missing, or looks like an option
                return None
        if opt.kind == STRS:
            values[opt.name] = (values[opt.name] or []) + [value]
        elif opt.kind == INT:
            if not _plain_int(value) or opt.min is not None and int(value) < opt.min:
                return None
            values[opt.name] = int(value)
        elif opt.kind == FLOAT:
            if not _plain_float(value):
                return None
            values[opt.name] = float(value)
        else:  # STR; the last occurrence wins, as for click
            values[opt.name] = value
    if len(positional) < 2:  # MASTER and at least one REPLICA
        return None
    for o in table:
        if o.convert is not None and values[o.name] is not None:
            try:
                values[o.name] = o.convert(values[o.name])
            except ValueError:
                return None
    values["master"], values["replicas"] = positional[0], positional[1:]
    return args[0], values


class _PacifyFlushWrapper:
    """A stream whose flush ignores EPIPE (click's wrapper of the same name): no second error at exit."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def flush(self) -> None:
        try:
            self.wrapped.flush()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise

    def __getattr__(self, attr):
        return getattr(self.wrapped, attr)


def run(args: list[str]) -> None:
    """Run the command line `args` (sys.argv[1:]) and exit, if parse() accepts it; else return
    having done nothing. Exits like typer's main does: the command's exit code; 130 for an
    interrupt that escapes the command; 1, silently, when stdout is a closed pipe. (An unexpected
    exception, i.e. a bug, shows Python's plain traceback instead of typer's pretty one; exit 1.)"""
    parsed = parse(args)
    if parsed is None:
        return
    command, kwargs = parsed
    from dirsync import commands

    try:
        code = getattr(commands, command)(**kwargs)
    except KeyboardInterrupt:
        code = 130
    except OSError as e:
        if e.errno != errno.EPIPE:
            raise
        sys.stdout = _PacifyFlushWrapper(sys.stdout)
        sys.stderr = _PacifyFlushWrapper(sys.stderr)
        code = 1
    # The command has closed everything it opened (replicas, locks, log file, children reaped):
    # leave without the interpreter's teardown, which frees every object of the run one by one
    # (~50 ms after a 10,000-file change, more for bigger trees).
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 1
    os._exit(code)
