"""Over SSH, the agent's helper writer for write batches (transport.agent._BatchShare).

The master flags ("h") the write batches whose files nothing else in the plan depends on and
which its first stretch of writes and commits commits; the agent hands about half of them to a
helper process it forks, sends it its part of each commit, and waits for it where the stretch
ends. What must hold, through the real CLI and a real sshd: the copy is exact and so is the
replica's cache (the helper's files with the chunk digests it derived, and their inodes); a
helper killed midway leaves only whole master files and every file it did not commit is
reported, never silently missing; and the next run converges.
"""

from __future__ import annotations

import os
import shlex
import sys

import pytest

try:
    import sshd as _sshd_plugin
    import treecmp
    from helpers import build_tree, files_match_master, random_bytes, settle, stray_temps, sync_json
    from remote_helpers import REPO_ROOT, ssh_spec
except ImportError:  # tests/ imported as a package
    from tests import sshd as _sshd_plugin
    from tests import treecmp
    from tests.helpers import build_tree, files_match_master, random_bytes, settle, stray_temps, sync_json
    from tests.remote_helpers import REPO_ROOT, ssh_spec

from dirsync import apply as apply_mod
from dirsync import replica as replica_mod
from dirsync.chunking import CHUNKER_ID
from dirsync.manifest import FileEntry
from dirsync.scan import scan_tree
from dirsync.state import load_manifest_file

pytest_plugins = [_sshd_plugin.__name__]
pytestmark = pytest.mark.ssh

N = apply_mod.SPLIT_MIN + 1400  # enough new files for a share, and several batches each way


def _tree(n: int = N, dirs: int = 12) -> dict:
    # Sizes up to ~6 KiB: some files are one chunk, most several (their digests are derived).
    return {f"d{i % dirs:02d}/f{i:05d}.txt": (b"line %d of a small file\n" % i) * (i % 250) for i in range(n)}


# The agent runs through this shim: it notes each fed helper it forks (its pid) and, with
# KILL_AT, the helper kills itself as it stages its KILL_AT-th file (KILL_AFTER_COMMIT: as
# its first commit returns, its files renamed into place and no outcome of them sent).
_SHIM = """
import os, signal
import dirsync.apply as ap
import dirsync.replica as rp
real = ap._Helper.start_fed.__func__
def start_fed(cls, *a, **kw):
    h = real(cls, *a, **kw)
    if h is not None:
        with open(os.environ["HELPER_LOG"], "a") as f:
            f.write(f"{h.pid}\\n")
    return h
ap._Helper.start_fed = classmethod(start_fed)
kill_at = int(os.environ.get("KILL_AT", "0"))
if kill_at:
    stage, stage_new = rp.Replica.stage, rp.Replica.stage_new
    seen = [0]
    def staging(self, w, sends):
        if self._helper:
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return stage(self, w, sends)
    def staging_new(self, ws, source):  # (new small files written in C, many at a time)
        if self._helper:
            seen[0] += len(ws)
            if seen[0] >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return stage_new(self, ws, source)
    rp.Replica.stage = staging
    rp.Replica.stage_new = staging_new
if os.environ.get("NEW_LOG"):  # how many files each process staged through stage_new (in C)
    real_new = rp.Replica.stage_new
    def noting(self, ws, source):
        left = real_new(self, ws, source)
        with open(os.environ["NEW_LOG"], "a") as f:
            f.write(f"{'helper' if self._helper else 'agent'} {len(ws) - len(left)}\\n")
        return left
    rp.Replica.stage_new = noting
if os.environ.get("KILL_AFTER_COMMIT"):  # the helper dies with its first commit's renames made, unreported
    commit_finish = rp.Replica.commit_finish
    def committed(self, c):
        out = commit_finish(self, c)
        if self._helper:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    rp.Replica.commit_finish = committed
from dirsync.__main__ import main
main()
"""


def _shim_args(sshd, tmp_path, **env) -> tuple[tuple, str]:
    shim = tmp_path / "agent_shim.py"
    shim.write_text(_SHIM)
    log = str(tmp_path / "helpers.log")
    extra = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in {"HELPER_LOG": log, **env}.items())
    cmd = f"env PYTHONPATH={shlex.quote(REPO_ROOT)} {extra} {shlex.quote(sys.executable)} {shlex.quote(str(shim))}"
    return ("--ssh-config", sshd.ssh_config_path, "--remote-cmd", cmd), log


def _helpers_noted(log: str) -> list[str]:
    try:
        with open(log) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def test_the_agent_shares_an_initial_copy_with_a_helper_and_its_cache_is_exact(sshd, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    spec = _tree()
    spec["d03/big.bin"] = random_bytes(3 << 20, 7)  # too big for a batch: the agent's own, in the stretch
    spec["d05/empty.txt"] = b""
    build_tree(m, spec)
    new_log = tmp_path / "new.log"
    args, log = _shim_args(sshd, tmp_path, NEW_LOG=new_log)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args)
    rep = out["replicas"][0]
    assert rep["errors"] == [] and rep["files_written"] == len(spec)
    assert len(_helpers_noted(log)) == 1  # one helper, on the far side
    if replica_mod._files is not None:  # both wrote most of their files through stage_new (in C)
        staged = {"agent": 0, "helper": 0}
        for line in new_log.read_text().split("\n")[:-1]:
            who, n = line.split()
            staged[who] += int(n)
        assert min(staged.values()) > N // 4 and sum(staged.values()) <= len(spec) - 2, staged
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == []
    cache = load_manifest_file(os.path.join(r, ".dirsync", "manifest"), CHUNKER_ID).manifest
    want = {p: e for p, e in scan_tree(str(m)).manifest.entries.items() if isinstance(e, FileEntry)}
    got = {p: e for p, e in cache.entries.items() if isinstance(e, FileEntry)}
    assert sorted(got) == sorted(want)
    for p, e in got.items():  # the derived chunk digests, the inode of what is there
        assert (e.digest, e.sizes, e.digests) == (want[p].digest, want[p].sizes, want[p].digests), p
        assert os.lstat(os.path.join(r, p)).st_ino == e.ino, p
    assert sum(len(e.sizes) > 1 for e in got.values()) > N // 2
    settle(m, r)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args)
    assert out["replicas"][0]["files_written"] == 0
    treecmp.assert_trees_equal(m, r)


def test_a_helper_killed_midway_loses_nothing_silently_and_the_next_run_converges(sshd, tmp_path):
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree())
    args, log = _shim_args(sshd, tmp_path, KILL_AT=700)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args, expect=None)
    rep = out["replicas"][0]
    assert len(_helpers_noted(log)) == 1
    died = [e for e in rep["errors"] if "writer process died" in e["message"]]
    assert died and len(died) == len(rep["errors"]), rep["errors"][:3]
    assert rep["files_written"] + len(died) == N and out["exit_code"] != 0
    assert files_match_master(m, r) == rep["files_written"]
    assert stray_temps(r) == []
    settle(m, r)
    args, _ = _shim_args(sshd, tmp_path)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args)
    assert out["replicas"][0]["files_written"] == len(died)
    treecmp.assert_trees_equal(m, r)


def test_without_the_flag_no_helper_is_forked(sshd, tmp_path):
    """A plan with fewer new files than a share needs: the agent writes them all itself."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, _tree(apply_mod.SPLIT_MIN - 1))
    args, log = _shim_args(sshd, tmp_path)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args)
    assert out["replicas"][0]["files_written"] == apply_mod.SPLIT_MIN - 1
    assert _helpers_noted(log) == []
    treecmp.assert_trees_equal(m, r)


def test_files_a_killed_helper_committed_unreported_in_existing_directories_are_found_and_recorded(sshd, tmp_path):
    """New files in directories the replica has (no fresh directory hides them): those the helper
    committed before it died, its outcomes for them lost with it, are found in place, whole and
    the master's, and reported written, with the chunk digests cut from their bytes in the
    replica's cache; any others it had are reported failed."""
    m, r = tmp_path / "m", tmp_path / "r"
    build_tree(m, {f"d{i:02d}": {} for i in range(12)})
    args, log = _shim_args(sshd, tmp_path)
    sync_json(m, ssh_spec(sshd, r), args=args)
    spec = _tree()
    build_tree(m, spec)
    settle(m)
    args, log = _shim_args(sshd, tmp_path, KILL_AFTER_COMMIT=1)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args, expect=None)
    rep = out["replicas"][0]
    assert len(_helpers_noted(log)) == 1
    died = [e["path"] for e in rep["errors"] if "writer process died" in e["message"]]
    assert len(died) == len(rep["errors"])  # (none when that commit held all of the helper's files)
    written = [p for p in spec if (r / p).exists()]
    assert rep["files_written"] == len(written) == N - len(died)
    assert all((r / p).read_bytes() == (m / p).read_bytes() for p in written)
    cache = load_manifest_file(os.path.join(r, ".dirsync", "manifest"), CHUNKER_ID).manifest
    want = scan_tree(str(m)).manifest.entries
    for p in written:  # every one recorded as it is (the derived digests too)
        e = cache.entries[p]
        assert (e.digest, e.sizes, e.digests) == (want[p].digest, want[p].sizes, want[p].digests), p
        assert os.lstat(os.path.join(r, p)).st_ino == e.ino, p
    settle(m, r)
    args, _ = _shim_args(sshd, tmp_path)
    _, out = sync_json(m, ssh_spec(sshd, r), args=args)
    assert out["replicas"][0]["files_written"] == len(died)
    treecmp.assert_trees_equal(m, r)
    assert stray_temps(r) == []
