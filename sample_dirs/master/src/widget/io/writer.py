"""Record writers (new in 1.2.0)."""

from __future__ import annotations

from pathlib import Path

from ..core import Table
from .formats import csv_fmt


def write(table: Table, path: str | Path, fmt: str = "csv") -> None:
    if fmt != "csv":
        raise ValueError(f"unsupported format: {fmt}")
    rows = [table.header] + [[r.get(h, "") for h in table.header] for r in table]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(csv_fmt.format_rows(rows), encoding="utf-8")
    tmp.replace(path)
