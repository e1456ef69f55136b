"""How a run talks to people: a tqdm bar on a terminal, plain lines for logs and cron, nothing when quiet.

Only this module imports tqdm. Nothing below cli.py prints except through a Reporter.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import TextIO


ITEMS_SHOWN = 10  # item errors printed per kind (Reporter.item_errors); the rest in one line


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

    def item_errors(self, prefix: str, errors, skip=()) -> None:
        """Report a replica's item errors (not those in `skip`): each kind (code and cause) is
        printed ITEMS_SHOWN times, then one line counts the rest and names the last; a full
        disk fails every file the same way, and a cron mail of 100,000 identical lines helps
        nobody (--json keeps them all). A master file that changed while it was sent is a
        warning: the next run picks it up (still exit 23), and a watcher under churn must not
        cry error."""
        from dirsync.errors import describe, display_path

        kinds: dict[tuple[str, str], list] = {}  # (code, cause) -> [count, last error]
        for e in errors:
            if e in skip:
                continue
            seen = kinds.setdefault((e.code, describe(e.cause)), [0, e])
            seen[0] += 1
            seen[1] = e
            if seen[0] <= ITEMS_SHOWN:
                (self.warn if e.code == "CHANGED" else self.error)(f"{prefix}: {e}")
        for (code, cause), (n, last) in kinds.items():
            if n > ITEMS_SHOWN:
                (self.warn if code == "CHANGED" else self.error)(
                    f"{prefix}: {n - ITEMS_SHOWN} more paths failed the same way ({cause}), the last: "
                    f"{display_path(last.path) or '.'}; --json lists every one")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    # progress hooks: no-ops unless a bar is shown
    def begin(self, label: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def grow(self, n: int) -> None: ...  # n more bytes to go (fan-out workers begin one by one)
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
        tqdm.monitor_interval = 0  # no monitor thread: forked children need a process with one thread
        self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                        leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def grow(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

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
