"""Importing third-party packages behind stand-ins (dirsync.imports): the package works, the
stand-ins are gone afterwards, and a package needing more than a stand-in offers still imports."""

from __future__ import annotations

import os
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
    """Every run that chunks a file (the agent's too) imports pyfastcdc: without typing and
    typing_extensions (with re, enum, inspect: ~10-20 ms) nor pathlib, which it needs for type
    hints and a method dirsync never calls. Run with -S (the packages' directories on the path
    instead): an editable install's .pth hook imports some of these first."""
    import site

    code = textwrap.dedent("""
        import sys
        names = ("typing", "typing_extensions", "pathlib", "inspect", "re", "enum")
        from dirsync.chunking import chunk_buffer, cutter
        data = bytes(range(256)) * 400
        sizes, digests, whole = chunk_buffer(data, 1024)
        assert sum(sizes) == len(data) and len(sizes) > 10 and len(digests) == 16 * len(sizes)
        assert type(cutter(1024)).__module__.startswith("pyfastcdc.cy"), type(cutter(1024))
        hidden = [k for k in names if k in sys.modules]
        import pathlib, typing
        assert pathlib.Path("/a/b").name == "b"   # the real modules, not the stand-ins
        assert typing.Optional[int] == typing.Union[int, None]
        print(hidden, len(sizes))
    """)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": os.pathsep.join([repo, *site.getsitepackages()]), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("[] "), p.stdout


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


def test_the_ssh_client_module_does_not_import_pathlib():
    """Every SSH run imports dirsync.transport.ssh before connecting; pathlib (with urllib.parse)
    cost ~10 ms of that, for paths plain strings serve as well."""
    out = _run("""
        import sys
        names = ("pathlib", "urllib.parse")
        before = {k for k in names if k in sys.modules}  # an editable install's finder imports pathlib
        import dirsync.transport.ssh
        print(sorted(k for k in names if k in sys.modules and k not in before))
    """)
    assert out == "[]", out


def test_an_agent_session_without_writes_imports_no_json_traceback_zstandard_re_or_enum(tmp_path):
    """The agent's start-up is on the critical path of every SSH run: what only a crash
    (traceback), a new replica's marker or a two-way state peek (json), or compressed data
    (zstandard) needs is imported then, not at start. Checked on a second session (the first
    one made the replica)."""
    import time

    from dirsync.transport import TransportOptions
    from dirsync.transport.pipe import SubprocessChannel
    from dirsync.transport.remote import RemoteTransport

    try:
        from remote_helpers import agent_env
    except ImportError:
        from tests.remote_helpers import agent_env
    import site

    root = tmp_path / "replica"
    # -S, with the packages' directories on the path instead: no .pth hook (an editable
    # install's imports re and enum) runs before the agent, so what it imports is its own.
    env = agent_env({"PYTHONPATH": os.pathsep.join([agent_env()["PYTHONPATH"], *site.getsitepackages()])})
    for n, init in ((1, True), (2, False)):
        out = tmp_path / f"modules{n}"
        code = (f"import atexit, sys; atexit.register(lambda: open({str(out)!r}, 'w').write(' '.join(sys.modules))); "
                "from dirsync.__main__ import main; main()")
        t = RemoteTransport(f"localhost:{root}", TransportOptions(),
                            channel_factory=lambda: SubprocessChannel([sys.executable, "-S", "-c", code, "agent"],
                                                                      env=env))
        t.open(init=init)
        t.scan([])
        t.close()
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text()) and time.monotonic() < deadline:  # (it exits after close)
            time.sleep(0.01)
    modules = set(out.read_text().split())
    assert "dirsync.transport.agent" in modules  # it did run the agent
    assert not {"json", "traceback", "zstandard"} & modules, sorted({"json", "traceback", "zstandard"} & modules)
    assert not {"re", "enum", "pickle"} & modules, sorted({"re", "enum", "pickle"} & modules)  # (~5 ms together)


def test_a_built_c_loop_is_the_one_used():
    """A C loop built beside this source (dirsync/_walk*.so, _rows*.so, _files*.so for this
    Python) is the one scans, cache loads and writers use: not ignored as a build of another
    source (its API)."""
    import importlib.machinery

    import dirsync
    from dirsync import manifest, replica, scan

    pkg = os.path.dirname(dirsync.__file__)
    for name, used in (("_walk", scan._walk), ("_rows", manifest._rows), ("_files", replica._files)):
        built = [f for f in os.listdir(pkg) if f in [name + s for s in importlib.machinery.EXTENSION_SUFFIXES]]
        assert not built or used is not None, f"{built} is built but not used"


def test_a_c_loop_built_from_another_source_is_ignored():
    """A build left over from an older _walk.c / _rows.c / _files.c (an install not redone
    after a pull) says another API: the Python loops run instead of calling it wrongly."""
    got = _run("""
        import sys, types
        for name in ("_walk", "_rows", "_files"):
            m = types.ModuleType("dirsync." + name)
            m.API = 0
            sys.modules["dirsync." + name] = m
        from dirsync import manifest, replica, scan
        print(scan._walk is None, manifest._rows is None, replica._files is None)
    """)
    assert got == "True True True"
