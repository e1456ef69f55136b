"""The typer-free fast path of `dirsync sync` / `dirsync plan` (dirsync/fastcli.py).

Drift: the fast parser's option tables must equal the typer declarations of dirsync.cli, and any
command line it accepts must give exactly the values typer would pass (checked in-process against
the click command built from the typer app). End to end: real `python -m dirsync` runs on real
trees, the fast path importing neither typer nor click, every fallback printing typer's own
help/error, and both paths (DIRSYNC_NO_FASTCLI=1 forces typer) giving the same output and exit code.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time

import click
import pytest
import typer.main
from hypothesis import event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

try:
    import treecmp
    from helpers import build_tree, cli_env, read, remove, write
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.helpers import build_tree, cli_env, read, remove, write

from dirsync import commands, fastcli
from dirsync.cli import app
from dirsync.scan import RACY_NS

COMMANDS = ("sync", "plan")


# -- the option tables against typer --------------------------------------------------------


def _click_command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _describe_click(p: click.Option) -> tuple:
    """(flags, off flags, kind, default, min, has a callback) of a click option, in fastcli's terms;
    fails for a kind of option fastcli does not handle (teach fastcli.parse first)."""
    assert p.nargs == 1 and not p.count and not p.required and p.envvar is None and p.prompt is None, p.name
    assert p.expose_value and not p.is_eager, p.name
    t, lo = p.type, None
    if p.is_flag:
        assert type(t) is click.types.BoolParamType and not p.multiple, p.name
        kind = fastcli.FLAG
    elif p.multiple:
        assert type(t) is click.types.StringParamType, p.name
        kind = fastcli.STRS
    elif type(t) is click.IntRange:
        assert t.max is None and not t.min_open and not t.clamp, p.name
        kind, lo = fastcli.INT, t.min
    elif type(t) is click.types.IntParamType:
        kind = fastcli.INT
    elif type(t) is click.types.FloatParamType:
        kind = fastcli.FLOAT
    elif type(t) is click.types.StringParamType:
        kind = fastcli.STR
    else:
        pytest.fail(f"option {p.name}: type {t!r} is not handled by dirsync.fastcli")
    return tuple(p.opts), tuple(p.secondary_opts), kind, p.default, lo, p.callback is not None


@pytest.mark.parametrize("name", COMMANDS)
def test_option_table_matches_the_typer_command(name):
    cmd = _click_command(name)
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    assert [(p.name, p.nargs, p.required, type(p.type), p.callback, p.envvar) for p in args] == [
        ("master", 1, True, click.types.StringParamType, None, None),
        ("replicas", -1, True, click.types.StringParamType, None, None)]
    typer_opts = {p.name: _describe_click(p) for p in cmd.params if isinstance(p, click.Option)}
    fast_opts = {o.name: (o.flags, o.off, o.kind, o.default, o.min, o.convert is not None)
                 for o in fastcli.OPTIONS[name]}
    assert fast_opts == typer_opts
    # How click reads the command line: options anywhere, no abbreviations or normalisation.
    assert cmd.context_settings == {} and cmd.allow_interspersed_args
    assert not cmd.ignore_unknown_options and not cmd.allow_extra_args
    assert cmd.make_context(name, ["a", "b"]).token_normalize_func is None
    # and the shared command function takes exactly these values
    sig = inspect.signature(getattr(commands, name)).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty for p in sig.values())
    assert set(sig) == set(fast_opts) | {"master", "replicas"}


# -- the fast parser against typer, in-process --------------------------------------------


def _typer_values(monkeypatch, args: list[str]) -> tuple[int, dict | None, str]:
    """(exit code, the keyword arguments typer's command passed to dirsync.commands, output)."""
    got: list[dict] = []

    def record(**kw):
        got.append(kw)
        return 0

    for name in COMMANDS:
        monkeypatch.setattr(commands, name, record)
    res = CliRunner().invoke(app, args)
    return res.exit_code, (got[0] if got else None), res.output


ACCEPTED = [
    ["sync", "m", "r"],
    ["sync", "m", "r1", "r2", "r3"],
    ["sync", "-x", "a", "-x", "b", "--exclude", "c", "--exclude=d", "m", "r"],
    ["sync", "m", "--max-delete=3", "r", "--wait", "1.5", "--port", "2222"],
    ["sync", "--delete", "--no-delete", "m", "r"],
    ["sync", "--no-delete", "--delete", "m", "r"],
    ["sync", "--init", "-n", "-q", "-v", "--json", "-z", "--allow-mass-delete", "--accept-new-host-key", "m", "r"],
    ["sync", "--dry-run", "--quiet", "--verbose", "--compress", "m", "r"],
    ["sync", "--log-file", "l", "-i", "key", "--ssh-config=cfg", "--remote-cmd", "dirsync", "m", "r"],
    ["sync", "--backup-dir", ".bak", "--backup-keep", "1", "--bwlimit", "10M", "m", "r"],
    ["sync", "--bwlimit=500K", "--backup-keep=07", "m", "r"],
    ["sync", "--two-way", "--prefer", "newer", "m", "r"],
    ["sync", "--port", "1", "--port=2", "m", "r"],  # the last one wins
    ["sync", "--max-delete=-1", "--wait=-2", "--wait=.5", "m", "r"],
    ["sync", "--exclude=", "--log-file=", "m", "r"],
    ["sync", "--", "-m", "--init"],
    ["sync", "m", "--", "--json", "-x"],
    ["sync", "-", "r", "-x", "-"],
    ["sync", "--wait", "0", "--wait", "3.", "m", "r"],
    ["plan", "m", "r"],
    ["plan", "--json", "-x", "a", "--no-delete", "--init", "--max-delete", "0", "--two-way", "m", "r", "s"],
    ["plan", "-p", "22", "-i", "k", "--ssh-config", "c", "--remote-cmd", "x", "--accept-new-host-key", "m", "r"],
]

FALLBACK = [  # left to typer: errors and help, and a few valid spellings fastcli does not take on
    ["sync"], ["sync", "m"], ["sync", "-x", "a", "m"], ["sync", "--", "m"],
    ["sync", "--help", "m", "r"], ["sync", "m", "r", "-h"],
    ["sync", "--no-such-option", "m", "r"], ["sync", "--jso", "m", "r"], ["sync", "-Q", "m", "r"],
    ["sync", "--max-delete", "lots", "m", "r"], ["sync", "--max-delete=1.5", "m", "r"],
    ["sync", "--port", "1_000", "m", "r"], ["sync", "--port", " 5", "m", "r"], ["sync", "--wait", "inf", "m", "r"],
    ["sync", "--backup-keep", "0", "m", "r"], ["sync", "--backup-keep=-3", "m", "r"],
    ["sync", "--bwlimit", "10", "m", "r"], ["sync", "--bwlimit", "fast", "m", "r"], ["sync", "--bwlimit=", "m", "r"],
    ["sync", "m", "r", "--exclude"], ["sync", "m", "r", "--max-delete"],
    ["sync", "--init=yes", "m", "r"], ["sync", "--no-delete=1", "m", "r"],
    ["sync", "-nq", "m", "r"], ["sync", "-xfoo", "m", "r"], ["sync", "-x=foo", "m", "r"],
    ["sync", "-1", "m", "r"], ["sync", "m", "-r"],
    ["sync", "--exclude", "-foo", "m", "r"], ["sync", "--exclude", "--init", "m", "r"],
    ["plan", "--dry-run", "m", "r"], ["plan", "--bwlimit", "1M", "m", "r"], ["plan", "-q", "m", "r"],
    ["plan", "--help"],
    ["verify", "m", "r"], ["run", "x"], ["status"], ["Sync", "m", "r"], [],
]


@pytest.mark.parametrize("args", ACCEPTED, ids=" ".join)
def test_accepted_command_lines_give_typers_values(monkeypatch, args):
    parsed = fastcli.parse(args)
    assert parsed is not None
    code, values, out = _typer_values(monkeypatch, args)
    assert code == 0, out
    assert parsed == (args[0], values)


@pytest.mark.parametrize("args", FALLBACK, ids=lambda a: " ".join(a) or "(none)")
def test_anything_else_is_left_to_typer(args):
    assert fastcli.parse(args) is None


_FLAGS = sorted({f for name in COMMANDS for o in fastcli.OPTIONS[name] for f in o.flags + o.off})
_VALUES = ["m", "r", "-", "--", "", "0", "1", "07", "-1", "2.5", ".5", "10M", "1K", "a=b", "--port=8"]
_ODD = ["1e3", "inf", "1_0", "10", "--help", "-h", "-nq", "-xa", "--json=1", "--bogus", "-Z", "Ü", "٣"]
_UNITS = st.one_of(  # command-line pieces, mostly well-formed
    st.tuples(st.sampled_from(_FLAGS)),
    st.tuples(st.sampled_from(_FLAGS), st.sampled_from(_VALUES)),
    st.builds(lambda f, v: (f"{f}={v}",), st.sampled_from(_FLAGS), st.sampled_from(_VALUES)),
    st.tuples(st.sampled_from(["m", "r", "s", "-", "--"])),
    st.tuples(st.sampled_from(_ODD)),
)


@settings(max_examples=500, deadline=None)
@given(name=st.sampled_from(COMMANDS), units=st.lists(_UNITS, max_size=6),
       tail=st.sampled_from([(), ("m", "r"), ("m", "r", "s"), ("--", "m", "r")]))
def test_whatever_fastcli_accepts_typer_reads_the_same(name, units, tail):
    args = [name, *(t for u in units for t in u), *tail]
    parsed = fastcli.parse(args)
    event("accepted" if parsed is not None else "left to typer")
    if parsed is None:
        return
    with pytest.MonkeyPatch.context() as mp:
        code, values, out = _typer_values(mp, args)
    assert code == 0, (args, out)
    assert parsed == (name, values), args


# -- real runs ------------------------------------------------------------------------------

TREE = {
    "keep.txt": b"same on both sides\n",
    "a.log": b"log a\n",
    "b.tmp": b"temp b\n",
    "dir": {"inner.txt": b"inner\n", "deep": {"x.log": b"x\n"}},
}


def dirsync(*args, cwd, typer_path: bool = False, env: dict | None = None) -> tuple[subprocess.CompletedProcess, set]:
    """`python -X importtime -m dirsync ARGS` -> (the process, with the import-time lines taken out of
    its stderr; the top-level names of the packages it imported). typer_path: DIRSYNC_NO_FASTCLI=1."""
    e = cli_env(env)
    e.pop("DIRSYNC_NO_FASTCLI", None)
    if typer_path:
        e["DIRSYNC_NO_FASTCLI"] = "1"
    cp = subprocess.run([sys.executable, "-X", "importtime", "-m", "dirsync", *map(str, args)], cwd=cwd, env=e,
                        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    lines = cp.stderr.splitlines(keepends=True)
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in lines if ln.startswith("import time:")}
    cp.stderr = "".join(ln for ln in lines if not ln.startswith("import time:"))
    assert "Traceback" not in cp.stderr, cp.stderr
    return cp, imported


def _pair(tmp_path, which: str, spec=TREE):
    d = tmp_path / which
    build_tree(d / "m", spec)
    return d


def test_sync_takes_the_fast_path_and_mirrors(tmp_path):
    d = _pair(tmp_path, "fast")
    cp, imported = dirsync("sync", "m", "r", cwd=d)
    assert cp.returncode == 0 and cp.stdout == "" and cp.stderr == "", cp
    assert "typer" not in imported and "click" not in imported, sorted(imported)
    assert "dirsync" in imported  # the import-time check does see what the run imports
    # start-up: no dataclasses (exec at import), and the chunker's type-hint imports are hidden
    assert not {"dataclasses", "inspect", "typing_extensions"} & imported, sorted(imported)
    treecmp.assert_trees_equal(d / "m", d / "r")
    cp, imported = dirsync("sync", "m", "r", cwd=d)  # a no-op reads no file: not even typing (~6 ms)
    assert cp.returncode == 0 and "dirsync" in imported and "typing" not in imported, sorted(imported)
    _, imported = dirsync("sync", "m", "r", cwd=d, typer_path=True)
    assert {"typer", "click"} <= imported  # DIRSYNC_NO_FASTCLI=1 does force typer


def test_plan_takes_the_fast_path(tmp_path):
    d = _pair(tmp_path, "fast")
    cp, imported = dirsync("plan", "m", "r", cwd=d)
    assert cp.returncode == 0 and "write" in cp.stdout, cp
    assert "typer" not in imported and "click" not in imported
    assert not (d / "r").exists()


@pytest.mark.parametrize("args, code, expect", [
    (["sync", "--help"], 0, "--max-delete"),
    (["sync", "m", "r", "--help"], 0, "Usage:"),
    (["plan", "--help"], 0, "Usage:"),
    (["sync", "--no-such-option", "m", "r"], 2, "No such option"),
    (["sync", "--max-delete", "lots", "m", "r"], 2, "is not a valid integer"),
    (["sync", "--backup-keep", "0", "m", "r"], 2, "--backup-keep"),
    (["sync", "--bwlimit", "10", "m", "r"], 2, "below 1K"),
    (["sync", "m"], 2, "Missing argument"),
    (["sync", "m", "r", "--exclude"], 2, "requires an argument"),
    (["sync", "-nq", "m", "r"], None, None),  # valid; typer parses clusters
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_fallbacks_are_typers_own_output(tmp_path, args, code, expect):
    """Each fallback runs typer (it imports typer) and prints exactly what forced typer prints."""
    d = _pair(tmp_path, "x")
    fast, imported = dirsync(*args, cwd=d)
    assert "typer" in imported
    forced, _ = dirsync(*args, cwd=d, typer_path=True)
    if code is not None:
        assert fast.returncode == code and expect in fast.stdout + fast.stderr, fast
        assert not (d / "r").exists()
    assert (fast.returncode, fast.stdout, fast.stderr) == (forced.returncode, forced.stdout, forced.stderr)


def test_double_dash_ends_options(tmp_path):
    d = tmp_path / "w"
    build_tree(d / "-m", TREE)
    cp, imported = dirsync("sync", "--json", "--", "-m", "--init", cwd=d)  # MASTER "-m", REPLICA "--init"
    assert cp.returncode == 0, cp
    assert "typer" not in imported
    assert json.loads(cp.stdout)["master"] == "-m"
    treecmp.assert_trees_equal(d / "-m", d / "--init")


def test_repeated_and_equals_forms(tmp_path):
    d = _pair(tmp_path, "fast")
    cp, imported = dirsync("sync", "-x", "*.log", "--exclude=*.tmp", "m", "r", "--max-delete=0", cwd=d)
    assert cp.returncode == 0 and "typer" not in imported, cp
    assert sorted(os.listdir(d / "r")) == [".dirsync", "dir", "keep.txt"]
    assert os.listdir(d / "r" / "dir" / "deep") == []
    # --max-delete=0 holds once the master deletes something
    remove(d / "m" / "keep.txt")
    cp, _ = dirsync("sync", "-x", "*.log", "-x", "*.tmp", "--max-delete=0", "m", "r", cwd=d)
    assert cp.returncode == 25 and read(d / "r" / "keep.txt"), cp


def _normalized(cp: subprocess.CompletedProcess, root) -> tuple:
    """(exit code, stdout as JSON with times and run ids dropped, stderr with times blanked), paths
    relative to `root`."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in ("seconds", "run_id")}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v.replace(str(root), "<root>") if isinstance(v, str) else v

    out = clean(json.loads(cp.stdout)) if cp.stdout.strip() else cp.stdout
    return cp.returncode, out, re.sub(r"\b\d+(\.\d+)?s\b", "<t>s", cp.stderr.replace(str(root), "<root>"))


def _settle(root) -> None:
    """Return once every change under root is older than the scanner's racy window: a file
    changed within it is not trusted from the cache and is hashed again by the next run, which
    would make the counts depend on how fast each path starts (typer's takes ~0.1 s longer)."""
    newest = max(os.lstat(os.path.join(dp, n)).st_ctime_ns
                 for dp, ds, fs in os.walk(root) for n in [*fs, *ds, "."])
    deadline = time.monotonic() + 5
    while time.time_ns() <= newest + RACY_NS + 10_000_000:
        assert time.monotonic() < deadline, "the clock does not move past the files' ctimes"
        time.sleep(0.01)


def test_json_output_and_exit_codes_match_typer(tmp_path):
    """The same runs on two identical pairs, one per path: the same exit codes, JSON and messages."""
    steps = [
        ("sync", "--json", "m", "r"),  # 0, everything written
        ("plan", "--json", "m", "r"),  # 0, nothing left to do
        ("sync", "--json", "--dry-run", "m", "r"),
        ("sync", "--json", "--max-delete=1", "m", "r"),  # 25: the master lost three files
        ("plan", "--json", "--max-delete", "1", "m", "r"),
        ("sync", "--json", "--verbose", "-x", "*.log", "m", "r"),  # 0, deletions made
        ("sync", "--json", "missing", "r"),  # 12: no master
        ("sync", "--json", "--prefer", "a", "m", "r"),  # 2: --prefer without --two-way
        ("sync", "m", "r", "r2"),  # 0, quiet
    ]
    results = {}
    for path in ("fast", "typer"):
        d = _pair(tmp_path, path)
        env = {"XDG_STATE_HOME": str(d / "state")}
        got = []
        for i, args in enumerate(steps):
            if i == 3:
                for p in ("a.log", "b.tmp", "dir/deep/x.log"):
                    remove(d / "m" / p)
                write(d / "m" / "new.txt", b"new\n")
            if i in (0, 3):
                _settle(d / "m")
            cp, imported = dirsync(*args, cwd=d, typer_path=path == "typer", env=env)
            assert ("typer" in imported) == (path == "typer"), args
            got.append(_normalized(cp, d))
        results[path] = got
        treecmp.assert_trees_equal(d / "m", d / "r2")
    assert [g[0] for g in results["fast"]] == [0, 0, 0, 25, 25, 0, 12, 2, 0]
    for step, fast, typer_ in zip(steps, results["fast"], results["typer"]):
        assert fast == typer_, step


@pytest.mark.parametrize("typer_path", [False, True], ids=["fast", "typer"])
def test_sigterm_mid_file_exits_130_on_both_paths(tmp_path, typer_path):
    d = tmp_path / "w"
    build_tree(d / "m", {"small.txt": b"small\n", "big.bin": os.urandom(6 << 20)})
    e = cli_env({"XDG_STATE_HOME": str(d / "state")})
    e.pop("DIRSYNC_NO_FASTCLI", None)
    if typer_path:
        e["DIRSYNC_NO_FASTCLI"] = "1"
    p = subprocess.Popen([sys.executable, "-m", "dirsync", "sync", "--bwlimit", "1M", "m", "r"], cwd=d, env=e,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = d / "r" / ".dirsync" / "tmp"
    try:
        deadline = time.monotonic() + 30
        while not (tmp.is_dir() and os.listdir(tmp)) and p.poll() is None:
            assert time.monotonic() < deadline, "the big file never went in flight"
            time.sleep(0.02)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 130 and "interrupted" in err, (p.returncode, err)
    assert not (d / "r" / "big.bin").exists() and os.listdir(tmp) == []
