"""Error families and exit codes. Fatal errors propagate; item errors are recorded and the run goes on."""

from __future__ import annotations

import errno as _errno
import os
from contextlib import contextmanager

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Iterator


class ExitCode:
    """The process exit codes: plain ints (an IntEnum would import enum, a few ms of every run's
    start-up, and every small run's time counts against rsync's). `codes()` lists them."""

    OK = 0
    ERROR = 1  # unexpected: a bug
    USAGE = 2  # bad arguments or configuration
    LOCKED = 3  # another run holds the lock for this master/replica pair
    CONNECT = 10  # cannot reach / authenticate / start the agent, or the link dropped
    PROTOCOL = 11  # version mismatch or malformed frame
    REFUSED = 12  # a safety guard stopped the run before it changed anything
    PARTIAL = 23  # some items failed, the rest synced (rsync's number)
    DELETE_LIMIT = 25  # mass-delete guard tripped: nothing was deleted (rsync's number)
    CONFLICTS = 4  # two-way sync: conflicting changes were kept as conflict copies (all else synced)
    INTERRUPTED = 130

    @classmethod
    def codes(cls) -> dict[str, int]:
        return {k: v for k, v in vars(cls).items() if k.isupper() and type(v) is int}


class DirsyncError(Exception):
    """Base class. str(e) is the one-line user-facing message; `hint` says what to do."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(DirsyncError):
    exit_code = ExitCode.USAGE


class LockedError(DirsyncError):
    exit_code = ExitCode.LOCKED


class ConnectError(DirsyncError):
    exit_code = ExitCode.CONNECT


class ProtocolError(DirsyncError):
    exit_code = ExitCode.PROTOCOL


class RefusedError(DirsyncError):
    exit_code = ExitCode.REFUSED


class DeleteLimitError(DirsyncError):
    exit_code = ExitCode.DELETE_LIMIT


class InterruptedRun(DirsyncError):
    exit_code = ExitCode.INTERRUPTED


class ItemError(DirsyncError):
    """One path failed; the run records it and continues (exit 23 at the end)."""

    exit_code = ExitCode.PARTIAL
    code = "IO"

    def __init__(self, path: str, op: str, cause: BaseException | str) -> None:
        self.path = path
        self.op = op
        self.cause = cause
        super().__init__(f"{op} {display_path(path) or '.'}: {describe(cause)}")

    def __reduce__(self):  # pickled by fan-out workers (dirsync.fanout): rebuilt from its own fields
        return self.__class__, (self.path, self.op, self.cause)


class SourceChangedError(ItemError):
    """The master file changed while it was read; it is picked up on the next run."""

    code = "CHANGED"


class ConflictError(ItemError):
    """The replica entry is not in the state the plan expected; it was left alone."""

    code = "CONFLICT"


class InvalidPathError(ItemError):
    code = "INVALID_PATH"


class ItemIOError(ItemError):
    """Wraps an OSError with the operation and path."""

    def __init__(self, path: str, op: str, cause: BaseException | str) -> None:
        super().__init__(path, op, cause)
        e = cause.errno if isinstance(cause, OSError) else None
        self.errno = e
        self.code = {
            _errno.ENOENT: "NOT_FOUND",
            _errno.EACCES: "PERMISSION",
            _errno.EPERM: "PERMISSION",
            _errno.ENOSPC: "NO_SPACE",
            _errno.EDQUOT: "NO_SPACE",
        }.get(e or 0, "IO")


def describe(cause: BaseException | str) -> str:
    """A short cause text: the strerror of an OSError, else str()."""
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


# Control characters in names would break "one line per action/error" (and ESC could drive the terminal).
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]} | {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r"}


def display_path(path: str) -> str:
    """Render a relpath for people on one line: undecodable bytes and control characters are
    shown as \\xNN (\\n, \\t, \\r) escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace").translate(_CONTROL_ESCAPES)


@contextmanager
def io_op(op: str, path: str) -> Iterator[None]:
    """Turn an OSError raised inside into an ItemIOError naming op and path."""
    try:
        yield
    except OSError as e:
        raise ItemIOError(path, op, e) from e
