"""Deprecated 1.0 API (removed in 1.2.0)."""

import warnings

from .core import Table


def load(path):
    warnings.warn("widget.legacy.load is deprecated", DeprecationWarning)
    from .csv_fmt import parse

    with open(path, encoding="utf-8") as f:
        rows = parse(f.read())
    return Table(rows[0], rows[1:])
