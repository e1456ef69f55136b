"""Minimal CSV format with quoted fields."""

from __future__ import annotations

SEP = ","
QUOTE = '"'


def split_line(line: str) -> list[str]:
    out, cur, quoted = [], [], False
    for ch in line:
        if ch == QUOTE:
            quoted = not quoted
        elif ch == SEP and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def parse(text: str) -> list[list[str]]:
    return [split_line(line) for line in text.splitlines() if line.strip()]


def quote(field: str) -> str:
    if SEP in field or QUOTE in field:
        return QUOTE + field.replace(QUOTE, QUOTE * 2) + QUOTE
    return field


def format_rows(rows) -> str:
    return "".join(SEP.join(quote(str(f)) for f in row) + "\n" for row in rows)
