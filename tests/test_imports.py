"""Importing third-party packages behind stand-ins (dirsync.imports): the package works, the
stand-ins are gone afterwards, and a package needing more than a stand-in offers still imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str, *paths: str) -> str:
    env_path = ":".join([*paths, *sys.path])
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_chunker_imports_without_its_type_hint_modules_and_leaves_the_real_ones_importable():
    out = _run("""
        import sys
        names = ("typing_extensions", "pathlib", "inspect")
        before = {k for k in names if k in sys.modules}  # an editable install's finder imports pathlib
        from dirsync.chunking import chunk_buffer, cutter
        data = bytes(range(256)) * 400
        sizes, digests, whole = chunk_buffer(data, 1024)
        assert sum(sizes) == len(data) and len(sizes) > 10 and len(digests) == 16 * len(sizes)
        hidden = [k for k in names if k in sys.modules and k not in before]
        import pathlib
        assert pathlib.Path("/a/b").name == "b"   # the real module, not the stand-in
        print(hidden, len(sizes))
    """)
    assert out.startswith("[] "), out


def test_a_package_needing_more_than_the_stand_in_is_imported_plainly(tmp_path):
    (tmp_path / "helperx.py").write_text("NEEDED = 42\nOTHER = 1\n")
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text("from helperx import NEEDED, OTHER\nfrom pkgx import sub\n")
    (tmp_path / "pkgx" / "sub.py").write_text("VALUE = 7\n")
    out = _run("""
        import sys
        from dirsync.imports import import_hiding, stand_in
        m = import_hiding("pkgx", {"helperx": stand_in("helperx", NEEDED=1)})  # no OTHER: fails, retried
        import helperx
        print(m.NEEDED, m.sub.VALUE, helperx.OTHER, sys.modules["pkgx.sub"] is m.sub)
    """, str(tmp_path))
    assert out == "42 7 1 True"


def test_stand_ins_serve_the_import_and_are_taken_out(tmp_path):
    (tmp_path / "helpery.py").write_text("raise SystemExit('the real helpery must not be imported here')\n")
    (tmp_path / "pkgy.py").write_text("from helpery import NEEDED\n")
    out = _run("""
        import sys
        from dirsync.imports import import_hiding, stand_in
        m = import_hiding("pkgy", {"helpery": stand_in("helpery", NEEDED=5)})
        print(m.NEEDED, "helpery" in sys.modules)
    """, str(tmp_path))
    assert out == "5 False"
