#!/usr/bin/env python3
"""Regenerate sample_dirs/master and sample_dirs/replica deterministically.

    python3 sample_dirs/make_samples.py

``master/`` is a small project-like tree.  ``replica/`` is a *stale* copy of
an older state of it, so that ``dirsync plan/sync`` has something to do:

* identical files       README.md, LICENSE, docs/api/..., config/logging.ini, ...
* edited files          docs/guide.md (one line in a ~30 KiB file),
                        src/widget/core.py, data/records.csv, CHANGELOG.md
* renamed / moved       assets/blob.bin        (replica: data/blob.bin)
                        src/widget/io/formats/csv_fmt.py
                                               (replica: src/widget/csv_fmt.py)
* missing in replica    docs/café-menü.txt, src/widget/io/writer.py,
                        notes/todo.txt
* extra in replica      docs/old-guide.md, src/widget/legacy.py
* symlink changed       latest -> docs/guide.md  (replica: -> docs/old-guide.md)
* mode changed          scripts/build.sh 0755  (replica: 0644)
* empty file            data/empty.txt

Git cannot store empty directories, so ``make demo`` creates
``master/data/cache/`` itself.  Git does not keep mtimes either; that is fine.

Everything is derived from fixed seeds / SHA-256 counters, so re-running the
script produces byte-identical output.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
from pathlib import Path

HERE = Path(__file__).resolve().parent
MASTER = HERE / "master"
REPLICA = HERE / "replica"

WORDS = (
    "sync replica master chunk manifest digest block stream window boundary "
    "hash file directory tree mtime mode link target delta transfer verify "
    "plan apply stale fresh ignore pattern remote local channel batch retry "
    "atomic rename temporary commit journal snapshot index cache buffer "
    "the a of to and in is for with on that by as be this are it from or "
    "each every when then which will can must should may not only all"
).split()


def prose(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        n = rng.randint(6, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + ".")
    return " ".join(out)


def paragraphs(rng: random.Random, count: int) -> str:
    return "\n\n".join(prose(rng, rng.randint(3, 7)) for _ in range(count))


def blob(size: int, seed: bytes) -> bytes:
    """Deterministic binary-ish data: a header, structured records and noise."""
    out = bytearray(b"WBLOB\x00\x01\x00" + size.to_bytes(8, "little"))
    counter = 0
    while len(out) < size:
        d = hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        if counter % 8 == 0:
            # a little structure so compressors find something
            out += b"\x00" * 16 + counter.to_bytes(4, "little") + b"REC!" + d[:8]
        else:
            out += d
        counter += 1
    return bytes(out[:size])


# --------------------------------------------------------------------------
# file contents
# --------------------------------------------------------------------------

README = """\
# widget

`widget` is a tiny example project used as sample data for the dirsync demo.
It reads and writes tabular records and ships a user guide.

## Layout

- `src/widget/` – the library
- `docs/` – user guide and API reference
- `data/` – example data files
- `scripts/build.sh` – build helper

## Quick start

```
./scripts/build.sh
python -m widget --help
```

See `docs/guide.md` (also reachable through the `latest` link).
"""

LICENSE = """\
MIT License

Copyright (c) 2024 The widget authors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
"""

CHANGELOG_OLD = """\
# Changelog

## 1.1.0
- CSV reader accepts quoted separators.
- Faster record parsing.

## 1.0.0
- First public release.
"""

CHANGELOG_NEW = """\
# Changelog

## 1.2.0
- New writer module (`widget.io.writer`).
- CSV format moved to `widget.io.formats`.
- Removed the legacy API.

""" + CHANGELOG_OLD.split("\n", 2)[2]

BUILD_SH = """\
#!/bin/sh
# Build helper for widget.
set -eu
cd "$(dirname "$0")/.."
python3 -m compileall -q src
echo "build ok"
"""

SETTINGS_JSON = """\
{
  "name": "widget",
  "version": "1.2.0",
  "io": {"default_format": "csv", "encoding": "utf-8", "buffer_size": 65536},
  "features": ["reader", "writer", "formats"]
}
"""

LOGGING_INI = """\
[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
formatter=plain
args=(sys.stderr,)

[formatter_plain]
format=%(asctime)s %(levelname)s %(name)s: %(message)s
"""

CAFE = """\
Café Menü — Frühstück
=====================

Croissant ............................ 2,50 €
Pain au chocolat ..................... 2,80 €
Crème brûlée ......................... 4,20 €
Smørrebrød ........................... 6,90 €
Tè verde / 绿茶 ...................... 3,10 €
Kaffee (groß) ........................ 3,40 €
"""

TODO = """\
TODO
----
- [ ] document the writer module
- [ ] add JSON format
- [x] move csv format into io/formats
- [ ] benchmark reader on 1 GB files
"""

INIT_PY = '''\
"""widget: read and write tabular records."""

__version__ = "1.2.0"

from .core import Record, Table  # noqa: F401
'''

UTIL_PY = '''\
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
'''

READER_PY = '''\
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
'''

WRITER_PY = '''\
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
'''

CSV_FMT_PY = '''\
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
    return "".join(SEP.join(quote(str(f)) for f in row) + "\\n" for row in rows)
'''

LEGACY_PY = '''\
"""Deprecated 1.0 API (removed in 1.2.0)."""

import warnings

from .core import Table


def load(path):
    warnings.warn("widget.legacy.load is deprecated", DeprecationWarning)
    from .csv_fmt import parse

    with open(path, encoding="utf-8") as f:
        rows = parse(f.read())
    return Table(rows[0], rows[1:])
'''


def core_py(new: bool) -> str:
    rng = random.Random(7)
    parts = [
        '"""Core data model for widget."""\n\n'
        "from __future__ import annotations\n\n"
        "from dataclasses import dataclass, field\n\n\n"
        "@dataclass\n"
        "class Record:\n"
        "    values: dict = field(default_factory=dict)\n\n"
        "    def get(self, key, default=None):\n"
        "        return self.values.get(key, default)\n\n\n"
        "class Table:\n"
        "    def __init__(self, header, records):\n"
        "        self.header = list(header)\n"
        "        self.records = list(records)\n\n"
        "    def __iter__(self):\n"
        "        return iter(self.records)\n\n"
        "    def __len__(self):\n"
        "        return len(self.records)\n\n"
    ]
    for i in range(40):
        name = f"{rng.choice(WORDS[:40])}_{rng.choice(WORDS[:40])}_{i}"
        doc = prose(rng, 2)
        body = (
            f"    def {name}(self, key, limit={rng.randint(1, 999)}):\n"
            f'        """{doc}"""\n'
            "        out = []\n"
            "        for rec in self.records:\n"
            f"            if len(out) >= limit:\n"
            "                break\n"
            f"            if rec.get(key) is not None:\n"
            "                out.append(rec)\n"
            "        return out\n\n"
        )
        if i == 17:
            # the function that changed between replica (old) and master (new)
            body = (
                f"    def {name}(self, key, limit={rng.randint(1, 999)}):\n"
                f'        """{doc}"""\n'
                + (
                    "        return [r for r in self.records if r.get(key) is not None][:limit]\n\n"
                    if new
                    else "        out = []\n"
                    "        for rec in self.records:\n"
                    "            if rec.get(key) is not None:\n"
                    "                out.append(rec)\n"
                    "        return out[:limit]\n\n"
                )
            )
        parts.append(body)
    return "".join(parts).rstrip() + "\n"


def guide_md(new: bool) -> str:
    rng = random.Random(42)
    out = ["# widget user guide\n"]
    for s in range(1, 25):
        out.append(f"\n## {s}. {prose(rng, 1)[:-1].title()}\n\n")
        out.append(paragraphs(rng, 4) + "\n")
        if s == 13:
            out.append(
                "\nThe default buffer size is **65536** bytes.\n"
                if new
                else "\nThe default buffer size is **8192** bytes.\n"
            )
    return "".join(out)


def old_guide_md() -> str:
    rng = random.Random(41)
    out = ["# widget user guide (1.0, obsolete)\n"]
    for s in range(1, 5):
        out.append(f"\n## {s}. {prose(rng, 1)[:-1].title()}\n\n")
        out.append(paragraphs(rng, 3) + "\n")
    return "".join(out)


def api_md(title: str, seed: int, n: int) -> str:
    rng = random.Random(seed)
    out = [f"# {title}\n"]
    for i in range(n):
        out.append(f"\n### `{rng.choice(WORDS[:40])}_{i}()`\n\n{prose(rng, 4)}\n")
    return "".join(out)


def records_csv(new: bool) -> str:
    rng = random.Random(99)
    lines = ["id,name,city,amount,updated"]
    cities = ["Berlin", "Lyon", "Zürich", "Oslo", "Kraków", "Porto", "Gent"]
    n = 520 if new else 500
    for i in range(n):
        name = f"{rng.choice(WORDS[:40])} {rng.choice(WORDS[:40])}"
        amount = rng.randint(1, 99999) / 100
        day = 1 + i % 28
        if new and i in (13, 250):
            amount += 1
        lines.append(f"{i},{name},{rng.choice(cities)},{amount:.2f},2024-03-{day:02d}")
    return "\n".join(lines) + "\n"


def index_md() -> str:
    return (
        "# API reference\n\n"
        "- [Classes](reference/classes.md)\n"
        "- [Functions](reference/functions.md)\n\n"
        + paragraphs(random.Random(5), 2)
        + "\n"
    )


# --------------------------------------------------------------------------


def master_files() -> dict[str, bytes]:
    t = {
        "README.md": README,
        "LICENSE": LICENSE,
        "CHANGELOG.md": CHANGELOG_NEW,
        "docs/guide.md": guide_md(new=True),
        "docs/café-menü.txt": CAFE,
        "docs/api/index.md": index_md(),
        "docs/api/reference/classes.md": api_md("Classes", 11, 12),
        "docs/api/reference/functions.md": api_md("Functions", 12, 25),
        "src/widget/__init__.py": INIT_PY,
        "src/widget/core.py": core_py(new=True),
        "src/widget/util.py": UTIL_PY,
        "src/widget/io/__init__.py": "",
        "src/widget/io/reader.py": READER_PY,
        "src/widget/io/writer.py": WRITER_PY,
        "src/widget/io/formats/__init__.py": '"""Record formats."""\n',
        "src/widget/io/formats/csv_fmt.py": CSV_FMT_PY,
        "scripts/build.sh": BUILD_SH,
        "config/settings.json": SETTINGS_JSON,
        "config/logging.ini": LOGGING_INI,
        "data/records.csv": records_csv(new=True),
        "data/empty.txt": "",
        "notes/todo.txt": TODO,
    }
    files = {k: v.encode("utf-8") for k, v in t.items()}
    files["assets/blob.bin"] = blob(200 * 1024, b"widget-assets-blob")
    return files


def replica_files(master: dict[str, bytes]) -> dict[str, bytes]:
    files = dict(master)
    # edited
    files["docs/guide.md"] = guide_md(new=False).encode()
    files["src/widget/core.py"] = core_py(new=False).encode()
    files["data/records.csv"] = records_csv(new=False).encode()
    files["CHANGELOG.md"] = CHANGELOG_OLD.encode()
    files["config/settings.json"] = SETTINGS_JSON.replace("1.2.0", "1.1.0").encode()
    # renamed / moved (same content, different path)
    files["data/blob.bin"] = files.pop("assets/blob.bin")
    files["src/widget/csv_fmt.py"] = files.pop("src/widget/io/formats/csv_fmt.py")
    del files["src/widget/io/formats/__init__.py"]
    # missing
    for p in ("docs/café-menü.txt", "src/widget/io/writer.py", "notes/todo.txt"):
        del files[p]
    # extra
    files["docs/old-guide.md"] = old_guide_md().encode()
    files["src/widget/legacy.py"] = LEGACY_PY.encode()
    return files


def write_tree(root: Path, files: dict[str, bytes], link_target: str, exec_build: bool) -> None:
    if root.exists() or root.is_symlink():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for rel, data in sorted(files.items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, 0o644)
    build = root / "scripts/build.sh"
    os.chmod(build, 0o755 if exec_build else 0o644)
    os.symlink(link_target, root / "latest")


def main() -> None:
    m = master_files()
    r = replica_files(m)
    write_tree(MASTER, m, "docs/guide.md", exec_build=True)
    write_tree(REPLICA, r, "docs/old-guide.md", exec_build=False)
    for name, root in (("master", MASTER), ("replica", REPLICA)):
        total = n = 0
        for dirpath, _dirs, fnames in os.walk(root):
            for f in fnames:
                st = os.lstat(os.path.join(dirpath, f))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
                n += 1
        print(f"{name}: {n} entries, {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
