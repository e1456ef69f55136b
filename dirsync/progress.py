"""How a run talks to people: a tqdm bar on a terminal, plain lines for logs and cron, nothing when quiet.

Only this module imports tqdm. Nothing below cli.py prints except through a Reporter.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # importing typing costs ~6 ms of every start; annotations are never evaluated
    from typing import TextIO


class Reporter:
    """Plain reporter: warnings and item errors as lines on stderr (what cron mail should hold)."""

    def __init__(self, stream: TextIO = sys.stderr, *, quiet: bool = False, log_file: str | None = None,
                 verbose: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.show_info = verbose or (not quiet and stream.isatty())  # cron mail holds only problems
        self.log = open(log_file, "a", encoding="utf-8") if log_file else None

    def _log(self, level: str, msg: str) -> None:
        if self.log:
            self.log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {level} {msg}\n")
            self.log.flush()

    def info(self, msg: str) -> None:
        self._log("info", msg)
        if self.show_info:
            self._print(msg)

    def warn(self, msg: str) -> None:
        self._log("warning", msg)
        if not self.quiet:
            self._print(f"warning: {msg}")

    def error(self, msg: str) -> None:
        self._log("error", msg)
        self._print(f"error: {msg}")

    def fatal(self, msg: str, hint: str | None = None) -> None:
        self._log("error", msg)
        self._print(f"error: {msg}")
        if hint:
            self._print(f"hint: {hint}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    # progress hooks: no-ops unless a bar is shown
    def begin(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def end(self) -> None: ...

    def close(self) -> None:
        self.end()
        if self.log:
            self.log.close()
            self.log = None


class TqdmReporter(Reporter):
    """Adds a byte progress bar (only used when stderr is a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr, **kw) -> None:
        super().__init__(stream, **kw)
        self.bar = None

    def begin(self, label: str, total: int) -> None:
        from tqdm import tqdm

        self.end()
        self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                        leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            super()._print(line)


def make_reporter(*, quiet: bool = False, log_file: str | None = None, verbose: bool = False,
                  stream: TextIO = sys.stderr) -> Reporter:
    if not quiet and stream.isatty():
        return TqdmReporter(stream, quiet=quiet, log_file=log_file, verbose=verbose)
    return Reporter(stream, quiet=quiet, log_file=log_file, verbose=verbose)
