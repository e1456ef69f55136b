"""Record readers."""

from __future__ import annotations

from pathlib import Path

from ..core import Record, Table
from .formats import csv_fmt


def read(path: str | Path, fmt: str = "csv") -> Table:
    if fmt != "csv":
        raise ValueError(f"unsupported format: {fmt}")
    text = Path(path).read_text(encoding="utf-8")
    rows = csv_fmt.parse(text)
    header, body = rows[0], rows[1:]
    return Table(header, [Record(dict(zip(header, r))) for r in body])
