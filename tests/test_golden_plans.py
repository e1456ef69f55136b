"""Golden plans: the rendered plan for the sample trees, pinned in tests/golden/*.plan.

The trees are copied to a tmp dir and every mode and mtime is pinned first (git keeps neither
mtimes nor exact modes), so the plan depends only on the committed content. When behaviour
changes on purpose, regenerate with

    DIRSYNC_REGEN_GOLDEN=1 python -m pytest tests/test_golden_plans.py

and read the diff of tests/golden/ as the description of what changed.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from dirsync.manifest import Manifest
from dirsync.plan import PlanOptions, diff
from dirsync.scan import Excluder, read_ignore_file, scan_tree

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_dirs"
GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("DIRSYNC_REGEN_GOLDEN") == "1"
PINNED_NS = 1_600_000_000_000_000_000


def pin(root: Path) -> None:
    """Fixed modes (0755 for executables and dirs, else 0644) and one fixed mtime everywhere."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.append(os.path.join(dirpath, name))
    for p in paths:
        st = os.lstat(p)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, 0o755)
        elif stat.S_ISREG(st.st_mode):
            os.chmod(p, 0o755 if st.st_mode & 0o111 else 0o644)
    os.chmod(root, 0o755)
    for p in paths + [str(root)]:
        os.utime(p, ns=(PINNED_NS, PINNED_NS), follow_symlinks=False)


def copy_sample(name: str, dst: Path) -> Path:
    shutil.copytree(SAMPLES / name, dst, symlinks=True,
                    ignore=shutil.ignore_patterns(".dirsync", "__pycache__"))
    return dst


@pytest.fixture
def master(tmp_path) -> Path:
    m = copy_sample("master", tmp_path / "master")
    # Git cannot store empty directories; `make demo` adds this one to the master. Make it here
    # too, so the plan is the same whether or not the demo ran in this checkout.
    (m / "data" / "cache").mkdir(exist_ok=True)
    pin(m)
    return m


def scan(root: Path, patterns) -> Manifest:
    res = scan_tree(str(root), excluder=Excluder(patterns))
    assert not res.errors and not res.warnings, (res.errors, res.warnings)
    return res.manifest


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"regenerated {path}")
        return
    assert path.exists(), f"{path} missing: run with DIRSYNC_REGEN_GOLDEN=1 to create it"
    want = path.read_text(encoding="utf-8")
    assert text == want, f"plan differs from {path} (regenerate with DIRSYNC_REGEN_GOLDEN=1 if intended)"


def plan_text(master: Path, replica: Path) -> tuple[str, Manifest, Manifest, object]:
    patterns = read_ignore_file(str(master))
    m = scan(master, patterns)
    r = scan(replica, patterns)
    plan = diff(m, r, PlanOptions())
    return plan.render() + "\n", m, r, plan


def test_sample_plan(master, tmp_path):
    replica = copy_sample("replica", tmp_path / "replica")
    pin(replica)
    text, m, r, plan = plan_text(master, replica)
    check_golden("sample.plan", text)
    # What the golden file must keep showing (so a bad regeneration is caught in review and here):
    assert plan.apply_to(r).keys() == m.keys()
    assert "write   assets/blob.bin" in text and "moved from data/blob.bin" in text  # moved file: hard-linked
    assert "delete  src/widget/legacy.py" in text
    assert "link    latest -> docs/guide.md" in text
    assert "meta    scripts/build.sh  mode 0755" in text
    assert "mkdir   data/cache/" in text
    t = plan.totals()
    guide = next(a for a in plan.actions if getattr(a, "path", "") == "docs/guide.md")
    # A one-line edit in a ~30 KiB file sends about a kilobyte, not the file.
    assert 0 < guide.send_bytes <= 3 * 1024 < guide.target.size
    assert t.send_bytes < t.reuse_bytes


def test_fresh_replica_plan(master, tmp_path):
    empty = tmp_path / "fresh"
    empty.mkdir()
    pin(empty)
    text, m, r, plan = plan_text(master, empty)
    check_golden("fresh.plan", text)
    assert plan.apply_to(r).keys() == m.keys()
    assert not plan.deletes()


def test_pinning_makes_scans_repeatable(master, tmp_path):
    # The premise of the golden files: two pinned copies scan identically.
    other = copy_sample("master", tmp_path / "again")
    (other / "data" / "cache").mkdir(exist_ok=True)
    pin(other)
    assert scan(master, []).keys() == scan(other, []).keys()
