"""`python -m dirsync` entry point.

`dirsync agent` (started over SSH for every remote replica) skips the CLI framework: importing
typer would add about a third of a second to every remote connection.

`dirsync sync` and `dirsync plan` try dirsync.fastcli first, which runs plainly valid command
lines without importing typer/click (~0.1 s, as much as a no-op sync) and leaves everything else
(help, usage errors, anything unusual) to typer. DIRSYNC_NO_FASTCLI=1 forces typer; the tests
use it to compare both paths. Shell completion (a _..._COMPLETE variable) always goes to typer.
"""

import os
import sys


def main() -> None:
    from dirsync.runtime import raise_fd_limit

    raise_fd_limit()
    args = sys.argv[1:]
    if args == ["agent"]:
        from dirsync.transport.agent import main as agent_main

        sys.exit(agent_main())
    if (args[:1] in (["sync"], ["plan"]) and os.environ.get("DIRSYNC_NO_FASTCLI", "") in ("", "0")
            and not any(k[:1] == "_" and k.endswith("_COMPLETE") for k in os.environ)):
        from dirsync.fastcli import run

        run(args)  # exits, unless the command line needs typer
    from dirsync.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
