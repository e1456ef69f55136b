"""Two-way sync properties (hypothesis).

1. The pure reconciler on generated manifests (tiny world: names {a,b,c}, depth <= 3, two mtimes,
   so paths, kinds, contents and mtime ties collide all the time): the target is a consistent tree,
   every byte of it comes from a side, nothing changed since the base is lost, an unchanged side
   just receives the other, the result does not depend on which side is `a`, both plans reach the
   target, and a second run finds nothing to do.
2. A RuleBasedStateMachine on two real directories: random edits on both sides between runs
   (create, modify, delete, rename, type changes, symlinks, chmod); after each run both sides are
   identical (conflict copies live on both), no version either side held at the start of the run
   is lost (it is current content somewhere, possibly in a conflict copy), what both sides kept
   unchanged is still there, and an immediate rerun does nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dirsync.manifest import DirEntry, FileEntry, LinkEntry, Manifest, parent_of
from dirsync.progress import Reporter
from dirsync.twoway import ReconcileOptions, TwoWayConfig, reconcile, run_twoway, side_plans

try:
    import treecmp
    from strategies import manifests
except ImportError:  # tests/ imported as a package
    from tests import treecmp
    from tests.strategies import manifests

try:  # the strict writer model, when the shared strategies module has it
    try:
        from strategies import simulate
    except ImportError:
        from tests.strategies import simulate
except ImportError:
    simulate = None

EXAMPLES = int(os.environ.get("DIRSYNC_PROP_EXAMPLES", "50"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
prefers = st.sampled_from([None, None, "newer", "a", "b"])


def sig(e):
    if isinstance(e, FileEntry):
        return ("f", e.size, e.digest)
    if isinstance(e, LinkEntry):
        return ("l", e.target)
    return ("d",) if e is not None else None


def check_tree(t: Manifest) -> None:
    for p in t.entries:
        if p:
            assert isinstance(t.entries.get(parent_of(p)), DirEntry), f"{p!r}: parent is not a directory in the target"


@SETTINGS
@given(manifests(), manifests(), manifests(), prefers)
def test_target_is_a_tree_built_from_the_sides(base, a, b, prefer):
    dec = reconcile(base, a, b, ReconcileOptions(prefer=prefer))
    t = dec.target
    check_tree(t)
    assert "" in t.entries
    sides = (a, b)
    for p, e in t.entries.items():
        if isinstance(e, FileEntry):
            side, src = dec.origin[p]
            s = sides[side].entries[src]
            assert (s.size, s.digest, s.sizes, s.digests) == (e.size, e.digest, e.sizes, e.digests)
        elif p:
            assert any(sig(m.entries.get(q)) == sig(e) for m in sides for q in m.entries), p
    if prefer is None:
        assert all(c.copy for c in dec.conflicts)


@SETTINGS
@given(manifests(), manifests(), manifests())
def test_nothing_changed_since_the_base_is_lost(base, a, b):
    dec = reconcile(base, a, b)
    kept = {sig(e) for e in dec.target.entries.values()}
    for side in (a, b):
        for p, e in side.entries.items():
            if isinstance(e, DirEntry) or sig(base.entries.get(p)) == sig(e):
                continue
            assert sig(e) in kept, f"{p!r} {e!r} changed since the base but is gone"


@SETTINGS
@given(manifests(), manifests(), prefers)
def test_an_unchanged_side_simply_receives_the_other(base, a, prefer):
    for dec in (reconcile(base, a, base, ReconcileOptions(prefer=prefer)),):
        assert dec.target.keys() == a.keys() and dec.conflicts == []
    dec = reconcile(base, base, a, ReconcileOptions(prefer=prefer))
    assert dec.target.keys() == a.keys() and dec.conflicts == []


@SETTINGS
@given(manifests(), manifests(), manifests(), st.sampled_from([None, "newer", "a"]))
def test_side_order_does_not_matter(base, a, b, prefer):
    d1 = reconcile(base, a, b, ReconcileOptions(prefer=prefer))
    swapped = {"a": "b", "b": "a"}.get(prefer, prefer)  # type: ignore[arg-type]
    d2 = reconcile(base, b, a, ReconcileOptions(prefer=swapped, labels=("b", "a")))
    assert d1.target.keys() == d2.target.keys()
    flip = {"a>b": "b>a", "b>a": "a>b", "del-a": "del-b", "del-b": "del-a"}
    assert sorted((d.path, d.action) for d in d1.decisions) == \
        sorted((d.path, flip.get(d.action, d.action)) for d in d2.decisions)


@SETTINGS
@given(manifests(), manifests(), manifests(), prefers)
def test_plans_reach_the_target_and_a_second_run_does_nothing(base, a, b, prefer):
    dec = reconcile(base, a, b, ReconcileOptions(prefer=prefer))
    pa, pb = side_plans(dec, a, b)
    after = []
    for plan, side in ((pa, a), (pb, b)):
        assert plan.skipped == ()
        got = plan.apply_to(side)
        assert got.keys() == dec.target.keys()
        if simulate is not None:
            assert Manifest(simulate(plan, dec.target, side)).keys() == dec.target.keys()
        after.append(got)
    again = reconcile(dec.target, after[0], after[1], ReconcileOptions(prefer=prefer))
    assert again.decisions == [] and again.conflicts == []
    assert again.target.keys() == dec.target.keys()
    qa, qb = side_plans(again, after[0], after[1])
    assert qa.empty and qb.empty


@SETTINGS
@given(manifests(), manifests(), manifests(), st.data())
def test_unreadable_paths_are_left_alone_on_both_sides(base, a, b, data):
    cands = sorted(p for p in set(a.entries) | set(b.entries) if p)
    if not cands:
        return
    protect = frozenset(data.draw(st.lists(st.sampled_from(cands), min_size=1, max_size=2)))

    def under(p):
        return any(p == q or p.startswith(q + "/") for q in protect)

    dec = reconcile(base, a, b, ReconcileOptions(protect=protect))
    check_tree(dec.target)
    assert not any(under(p) for p in dec.target.entries)
    assert not any(under(d.path) for d in dec.decisions)
    for plan in side_plans(dec, a, b):
        assert not any(under(getattr(x, "path", "")) for x in plan.actions if hasattr(x, "path"))


# -- state machine on real directories --------------------------------------------------------------

S = 1_000_000_000
T0 = 1_600_000_000 * S
PATHS = ["x", "y", "d/x", "d/y", "d/e/z", "e"]
LINK_TARGETS = ["x", "../y", "nowhere"]
sides = st.sampled_from(["a", "b"])
paths = st.sampled_from(PATHS)


def _rm(p: str) -> None:
    if os.path.islink(p) or os.path.isfile(p):
        os.unlink(p)
    elif os.path.isdir(p):
        shutil.rmtree(p)


class TwoWayMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # tmpfs when there is one: a run fsyncs its state files, and the machine does hundreds of runs
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.tmp = tempfile.mkdtemp(prefix="dirsync-twoway-sm-", dir=shm)
        self.root = {"a": os.path.join(self.tmp, "a"), "b": os.path.join(self.tmp, "b")}
        for r in self.root.values():
            os.mkdir(r)
        self.clock = T0
        self.version = 0
        self.last: dict[bytes, tuple] = {}  # both sides after the last run (equal then)
        self.runs = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def tick(self) -> int:
        self.clock += S
        return self.clock

    def at(self, side: str, rel: str) -> str:
        return os.path.join(self.root[side], rel)

    def make_parents(self, side: str, rel: str) -> None:
        """Parents as directories (a file or link in the way is replaced: a type change)."""
        q = parent_of(rel)
        chain = []
        while q:
            chain.append(q)
            q = parent_of(q)
        for q in reversed(chain):
            p = self.at(side, q)
            if os.path.islink(p) or (os.path.exists(p) and not os.path.isdir(p)):
                os.unlink(p)
            if not os.path.isdir(p):
                os.mkdir(p)

    # -- edits --
    @rule(side=sides, rel=paths, big=st.booleans())
    def write(self, side, rel, big):
        self.make_parents(side, rel)
        p = self.at(side, rel)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.islink(p):
            os.unlink(p)
        self.version += 1
        data = (f"version {self.version} of {rel}\n".encode() * (400 if big else 1))
        with open(p, "wb") as f:
            f.write(data)
        t = self.tick()
        os.utime(p, ns=(t, t))

    @rule(side=sides, rel=paths)
    def delete(self, side, rel):
        _rm(self.at(side, rel))

    @rule(side=sides, src=paths, dst=paths)
    def rename(self, side, src, dst):
        s, d = self.at(side, src), self.at(side, dst)
        if src == dst or not os.path.lexists(s) or dst.startswith(src + "/") or src.startswith(dst + "/"):
            return
        _rm(d)
        self.make_parents(side, dst)
        os.rename(s, d)

    @rule(side=sides, rel=paths)
    def make_dir(self, side, rel):
        self.make_parents(side, rel)
        p = self.at(side, rel)
        if not (os.path.isdir(p) and not os.path.islink(p)):
            _rm(p)
            os.mkdir(p)

    @rule(side=sides, rel=paths, to=st.sampled_from(LINK_TARGETS))
    def link(self, side, rel, to):
        self.make_parents(side, rel)
        p = self.at(side, rel)
        _rm(p)
        os.symlink(to, p)
        t = self.tick()
        os.utime(p, ns=(t, t), follow_symlinks=False)

    @rule(side=sides, rel=paths, mode=st.sampled_from([0o644, 0o755, 0o600]))
    def chmod(self, side, rel, mode):
        p = self.at(side, rel)
        if os.path.isfile(p) and not os.path.islink(p):
            os.chmod(p, mode)

    # -- the run and its invariants --
    @rule()
    def sync(self):
        a, b = self.root["a"], self.root["b"]
        start = {s: treecmp.snapshot(self.root[s]) for s in ("a", "b")}
        summ = run_twoway(TwoWayConfig(a, b, init=True, allow_mass_delete=True), Reporter(quiet=True))
        for act in sorted({d.action for d in summ.decisions.decisions}):
            event(f"run with a {act} decision")
        if any(c.path and "/" not in c.path and os.path.isdir(os.path.join(a, c.path)) for c in summ.conflicts):
            event("conflict where a directory kept the name")
        errs = [str(e) for s in summ.sides for e in s.errors]
        assert summ.exit_code in (0, 4), (summ.exit_code, errs, [s.fatal for s in summ.sides])
        assert not errs and not summ.scan_errors
        fa, fb = treecmp.snapshot(a), treecmp.snapshot(b)
        diffs = treecmp.diff_snapshots(fa, fb)
        assert diffs == [], "sides differ after a run:\n" + "\n".join(diffs)
        # No version held at the start of the run is lost.
        final_files = {e[3] for e in fa.values() if e[0] == "f"}
        final_links = {e[3] for e in fa.values() if e[0] == "l"}
        for s in ("a", "b"):
            other = start["b" if s == "a" else "a"]
            for rel, e in start[s].items():
                old = self.last.get(rel)
                if e[0] == "f":
                    if old is None or old[0] != "f" or old[3] != e[3]:
                        assert e[3] in final_files, f"new version of {rel!r} on {s} lost"
                    elif other.get(rel) == e or (other.get(rel, ())[:1] == ("f",) and other[rel][3] == e[3]):
                        assert fa.get(rel, ())[:1] == ("f",) and fa[rel][3] == e[3], \
                            f"{rel!r} unchanged on both sides but not kept"
                elif e[0] == "l":
                    if old is None or old[0] != "l" or old[3] != e[3]:
                        assert e[3] in final_links, f"new link {rel!r} on {s} lost"
        self.last = fa
        self.runs += 1
        # Stable: an immediate rerun has nothing to do (planned only: same scans, no writes).
        again = run_twoway(TwoWayConfig(a, b, dry_run=True), Reporter(quiet=True))
        assert again.exit_code == 0 and again.decisions.decisions == [], again.decisions.render()
        assert all(p.empty for p in again.plans)

    @invariant()
    def no_temps_left(self):
        for r in self.root.values():
            t = os.path.join(r, ".dirsync", "tmp")
            assert not os.path.isdir(t) or os.listdir(t) == []


TwoWayMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("DIRSYNC_SM_EXAMPLES", "25")), stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_two_way_state_machine = TwoWayMachine.TestCase
