"""`python -m dirsync` entry point.

`dirsync agent` (started over SSH for every remote replica) skips the CLI framework: importing
typer would add about a third of a second to every remote connection.
"""

import sys


def main() -> None:
    if sys.argv[1:] == ["agent"]:
        from dirsync.transport.agent import main as agent_main

        sys.exit(agent_main())
    from dirsync.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
