"""widget: read and write tabular records."""

__version__ = "1.2.0"

from .core import Record, Table  # noqa: F401
