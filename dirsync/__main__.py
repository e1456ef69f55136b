"""`python -m dirsync` entry point."""

from dirsync.cli import main

if __name__ == "__main__":
    main()
