"""Small helpers shared by widget modules."""

from __future__ import annotations


def chunks(seq, size):
    """Yield successive ``size``-sized slices of ``seq``."""
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
