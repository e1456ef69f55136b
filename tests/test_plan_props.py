"""Planner properties on generated manifests (hypothesis).

Manifests come from a tiny world (names {a,b,c}, depth <= 3, chunk contents from a pool of
six) so that paths, types and chunks overlap between master and replica all the time. Every
plan is also run through `strategies.simulate`, a strict model of the replica writer that
checks ordering, preconditions and the bytes behind every CopyOp.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirsync.manifest import DirEntry, FileEntry, Manifest, entry_key, parent_of
from dirsync.plan import CopyOp, Delete, MoveDir, PlanOptions, SendOp, WriteFile, diff

try:
    from strategies import changed_paths, chunk_ids_of, file_entry, manifests, protect_sets, simulate
except ImportError:  # tests/ imported as a package
    from tests.strategies import changed_paths, chunk_ids_of, file_entry, manifests, protect_sets, simulate

# DIRSYNC_PROP_EXAMPLES=5000 for a long bug hunt; the default keeps the tier fast.
EXAMPLES = int(os.environ.get("DIRSYNC_PROP_EXAMPLES", "120"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def final_keys(state) -> dict:
    return Manifest(state).keys()


def under_any(path: str, tops) -> bool:
    return any(t == "" or path == t or path.startswith(t + "/") for t in tops)


MOVES = 1 << 40  # PlanOptions.dir_moves: directories may be renamed whole (local replicas, agents)


@SETTINGS
@given(manifests(), manifests(), st.sampled_from((0, MOVES)))
def test_plan_converges(master, replica, moves):
    plan = diff(master, replica, PlanOptions(delete=True, dir_moves=moves))
    assert plan.skipped == ()
    assert plan.apply_to(replica).keys() == master.keys()
    # The strict model agrees, including directory mtimes after their contents changed.
    state = simulate(plan, master, replica)
    assert final_keys(state) == master.keys()


# Names that sort between a directory and its children ("a" < "a-" < "a.b" < "a/x") and a
# non-UTF-8 one: ordering must come from the tree, not from string order by accident.
ODD_NAMES = ("a", "a-", "a.b", "\udcff")


@SETTINGS
@given(manifests(names=ODD_NAMES), manifests(names=ODD_NAMES), st.booleans(), st.sampled_from((0, MOVES)))
def test_plan_converges_with_odd_names(master, replica, delete, moves):
    plan = diff(master, replica, PlanOptions(delete=delete, dir_moves=moves))
    state = simulate(plan, master, replica)
    if delete:
        assert final_keys(state) == master.keys()
        assert plan.apply_to(replica).keys() == master.keys()


@SETTINGS
@given(manifests(), manifests(), st.sampled_from((0, MOVES)))
def test_second_plan_is_empty(master, replica, moves):
    after = diff(master, replica, PlanOptions(dir_moves=moves)).apply_to(replica)
    assert diff(master, after).actions == ()


@st.composite
def renamed_dir(draw, names=ODD_NAMES):
    """(replica, master, src, dst, how): the master is the replica with directory `src` renamed
    to `dst` (parent on the replica), then per `how`: "pure" nothing else; "new" a file added
    under dst; "edited" one file under dst changed; "gone" one entry under dst removed;
    "others" an unrelated second tree's changes outside both."""
    replica = draw(manifests(names=names))
    dirs = sorted(p for p, e in replica.entries.items() if p and isinstance(e, DirEntry))
    if not dirs:
        return None
    src = draw(st.sampled_from(dirs))
    parents = sorted(p for p in [""] + dirs if not (p == src or p.startswith(src + "/")))
    par = draw(st.sampled_from(parents))
    name = draw(st.sampled_from(("m", "n-", "\udcfe")))
    dst = f"{par}/{name}" if par else name
    if dst in replica.entries:
        return None
    entries = {}
    for p, e in replica.entries.items():
        if p == src or p.startswith(src + "/"):
            q = dst + p[len(src):]
            entries[q] = e.replace(path=q)
        else:
            entries[p] = e
    how = draw(st.sampled_from(("pure", "new", "edited", "gone", "others")))
    inside = sorted(q for q in entries if q.startswith(dst + "/"))
    files = [q for q in inside if isinstance(entries[q], FileEntry)]
    if how == "new":
        q = dst + "/zz"
        entries[q] = file_entry(q, draw(st.lists(st.integers(0, 5), max_size=3)))
    elif how == "edited" and files:
        q = draw(st.sampled_from(files))
        e = entries[q]
        entries[q] = file_entry(q, [0, 1, 2], e.mode, e.mtime_ns + 1)
    elif how == "gone" and inside:
        q = draw(st.sampled_from(inside))
        entries = {k: v for k, v in entries.items() if not (k == q or k.startswith(q + "/"))}
    elif how == "others":
        other = draw(manifests(names=names))
        for p, e in other.entries.items():
            if p and not any(p == t or p.startswith(t + "/") or t.startswith(p + "/") for t in (src, dst)) \
                    and isinstance(entries.get(parent_of(p)), DirEntry) and p not in entries:
                entries[p] = e if not isinstance(e, DirEntry) else e  # (a new directory, empty or not)
    master = Manifest({p: e for p, e in entries.items() if p == "" or isinstance(entries.get(parent_of(p)), DirEntry)})
    return replica, master, src, dst, how


@SETTINGS
@given(renamed_dir())
def test_a_renamed_directory_is_moved_whole_or_file_by_file_and_converges(case):
    """With dir_moves, a directory renamed on the master, holding a file that is not empty (the
    planner finds renamed directories from moved files), is one MoveDir when nothing in it
    changed; with an entry under it changed or gone, it may still move whole, and the changes
    follow at the new paths. Whatever else changed, the strict writer model ends at the master."""
    if case is None:
        return
    replica, master, src, dst, how = case
    plan = diff(master, replica, PlanOptions(delete=True, dir_moves=MOVES))
    state = simulate(plan, master, replica)
    assert final_keys(state) == master.keys()
    assert plan.apply_to(replica).keys() == master.keys()
    moves = [a for a in plan.actions if isinstance(a, MoveDir)]
    seeded = any(isinstance(e, FileEntry) and e.size and p.startswith(src + "/") for p, e in replica.entries.items())
    if how == "pure" and seeded:
        assert [(a.src, a.path) for a in moves] == [(src, dst)], plan.render()
        assert [a for a in plan.actions if isinstance(a, (Delete, WriteFile))] == [], plan.render()
    # Moved whole with an entry edited or gone under it: the strict model (above) checked that
    # what follows the move replaces or deletes it at its new path, as the replica holds it then.
    if how in ("edited", "gone") and moves:
        assert not any(isinstance(a, Delete) and (a.path == src or a.path.startswith(src + "/"))
                       for a in plan.actions), plan.render()


@SETTINGS
@given(manifests())
def test_equal_manifests_need_nothing(m):
    assert diff(m, m).actions == ()
    assert diff(m, m, PlanOptions(delete=False)).actions == ()
    # Cache facts (inode, ctime, trusted) are not differences.
    other = Manifest({p: (FileEntry(e.path, e.size, e.mode, e.mtime_ns, e.digest, e.avg, e.sizes, e.digests,
                                    ino=7, ctime_ns=9, trusted=True) if isinstance(e, FileEntry) else e)
                      for p, e in m.entries.items()})
    assert diff(m, other).actions == ()


@SETTINGS
@given(manifests(), manifests())
def test_no_delete_keeps_replica_extras(master, replica):
    plan = diff(master, replica, PlanOptions(delete=False))
    for a in plan.actions:
        if isinstance(a, Delete):
            assert a.obstruction, f"mirror delete without opts.delete: {a!r}"
            assert a.path in master.entries or any(
                under_any(a.path, [q]) for q in master.entries if q
            ), f"obstruction delete of {a.path!r} that nothing on the master stands in for"
    state = simulate(plan, master, replica)
    skipped = [p for p, _ in plan.skipped]
    for p, e in replica.entries.items():
        if p not in master.entries:
            assert p in state and entry_key(state[p]) == entry_key(e), f"{p!r} not kept: {state.get(p)!r}"
    for p, e in master.entries.items():
        if under_any(p, skipped):
            continue
        got = state.get(p)
        if isinstance(e, DirEntry) and p and isinstance(got, DirEntry):
            # A kept directory holding replica extras is still the master's directory.
            assert (got.mode, got.mtime_ns) == (e.mode, e.mtime_ns), f"{p!r}: {got!r} != {e!r}"
        else:
            assert got is not None and entry_key(got) == entry_key(e), f"{p!r}: {got!r} != {e!r}"
    # A skip is only for a type change that would remove a non-empty replica directory.
    for p in skipped:
        r = replica.entries.get(p)
        assert isinstance(r, DirEntry) and not isinstance(master.entries[p], DirEntry)
        assert any(q != p and under_any(q, [p]) for q in replica.entries)
        assert state.get(p) == r


@st.composite
def with_protect(draw):
    master = draw(manifests())
    replica = draw(manifests())
    return master, replica, draw(protect_sets(master, replica)), draw(st.booleans()), draw(st.sampled_from((0, MOVES)))


@SETTINGS
@given(with_protect())
def test_protected_paths_untouched(case):
    master, replica, protect, delete, moves = case
    plan = diff(master, replica, PlanOptions(delete=delete, protect=protect, dir_moves=moves))
    state = simulate(plan, master, replica, protect)  # asserts no action at or under protect
    for p in set(state) | set(replica.entries):
        if under_any(p, protect):
            assert state.get(p) == replica.entries.get(p), f"protected {p!r} changed"
    skipped = [p for p, _ in plan.skipped]
    for p, e in master.entries.items():
        if p and not under_any(p, protect) and not under_any(p, skipped):
            got = state.get(p)
            if isinstance(e, DirEntry) and isinstance(got, DirEntry):
                assert (got.mode, got.mtime_ns) == (e.mode, e.mtime_ns), f"{p!r}: {got!r} != {e!r}"
            else:
                assert got is not None and entry_key(got) == entry_key(e), f"{p!r}: {got!r} != {e!r}"
    if delete:
        for p in state:
            assert p in master.entries or under_any(p, protect), f"{p!r} left on the replica"


@SETTINGS
@given(manifests(), manifests())
def test_parents_before_children_and_dirs_last(master, replica):
    plan = diff(master, replica)
    simulate(plan, master, replica)  # parents exist at MakeDir/Commit/MakeLink time
    # Directory metadata comes after every change inside the directory ...
    seen_meta: set[str] = set()
    for a in plan.actions:
        paths = getattr(a, "paths", None) or ((a.path,) if hasattr(a, "path") else ())
        if a.__class__.__name__ in ("MakeDir", "Commit", "MakeLink", "Delete"):
            for p in paths:
                assert parent_of(p) not in seen_meta, f"{a!r} changes {parent_of(p)!r} after its SetMeta"
        if a.__class__.__name__ == "SetMeta" and a.kind == "d":
            seen_meta.add(a.path)
    # ... and the root's comes last of all.
    metas = [i for i, a in enumerate(plan.actions) if getattr(a, "kind", None) == "d" and a.path == ""
             and a.__class__.__name__ == "SetMeta"]
    if metas:
        assert metas == [len(plan.actions) - 1]


@SETTINGS
@given(manifests(), manifests(), st.integers(1, 3), st.integers(1, 60), st.integers(1, 3))
def test_small_commit_batches_stay_safe(master, replica, files, nbytes, replaced):
    # Many small commit batches exercise "not committed while a later write copies from it".
    plan = diff(master, replica, PlanOptions(commit_files=files, commit_bytes=nbytes, commit_replaced=replaced))
    state = simulate(plan, master, replica)
    assert final_keys(state) == master.keys()


@SETTINGS
@given(manifests(), manifests())
def test_copy_ops_point_at_replica_bytes_and_totals_add_up(master, replica):
    plan = diff(master, replica)
    simulate(plan, master, replica)  # byte-checks every CopyOp against the replica's content
    t = plan.totals()
    writes = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert t.writes == len(writes)
    assert t.send_bytes + t.reuse_bytes == sum(w.target.size for w in writes)
    assert t.send_bytes == sum(w.send_bytes for w in writes)
    # Sending is a last resort: a sent chunk is one the replica has nowhere.
    have = {d for f in replica.files() for _o, _n, d in f.chunks()}
    for w in writes:
        starts = {off: d for off, _n, d in w.target.chunks()}
        for op in w.ops:
            if isinstance(op, SendOp):
                assert starts[op.offset] not in have, f"{w.path}: sends a chunk the replica holds"


@st.composite
def covered(draw):
    """A replica and a master whose every chunk is somewhere in the replica."""
    replica = draw(manifests())
    master = draw(manifests(pool=tuple(sorted(chunk_ids_of(replica)))))
    return master, replica


@SETTINGS
@given(covered())
def test_nothing_sent_when_replica_holds_every_chunk(case):
    master, replica = case
    plan = diff(master, replica)
    assert plan.totals().send_bytes == 0
    assert all(isinstance(o, CopyOp) for a in plan.actions if isinstance(a, WriteFile) for o in a.ops)
    assert final_keys(simulate(plan, master, replica)) == master.keys()


@st.composite
def swapped(draw):
    """A tree and the same tree with the contents of two of its files exchanged."""
    m = draw(manifests())
    files = sorted(p for p, e in m.entries.items() if isinstance(e, FileEntry))
    if len(files) < 2:  # make room for a swap instead of rejecting the example
        m = Manifest(dict(m.entries))
        for name in ("x", "y"):
            m.entries[name] = file_entry(name, draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
        files = sorted(p for p, e in m.entries.items() if isinstance(e, FileEntry))
    a, b = draw(st.lists(st.sampled_from(files), min_size=2, max_size=2, unique=True))
    ea, eb = m.entries[a], m.entries[b]
    r = dict(m.entries)
    r[a] = FileEntry(a, eb.size, ea.mode, ea.mtime_ns, eb.digest, eb.avg, eb.sizes, eb.digests)
    r[b] = FileEntry(b, ea.size, eb.mode, eb.mtime_ns, ea.digest, ea.avg, ea.sizes, ea.digests)
    return m, Manifest(r)


@SETTINGS
@given(swapped())
def test_swap_converges_sending_nothing(case):
    master, replica = case
    plan = diff(master, replica)
    assert plan.totals().send_bytes == 0
    assert final_keys(simulate(plan, master, replica)) == master.keys()
    assert not plan.deletes()


def test_swap_example():
    # a <-> b with distinct contents: both written from each other, committed together.
    fa, fb = file_entry("a", [0, 1]), file_entry("b", [2, 3])
    root = DirEntry("", 0o755, 1)
    master = Manifest({"": root, "a": fa, "b": fb})
    replica = Manifest({"": root, "a": file_entry("b", [2, 3]).__class__(
        "a", fb.size, fa.mode, fa.mtime_ns, fb.digest, fb.avg, fb.sizes, fb.digests),
        "b": FileEntry("b", fa.size, fb.mode, fb.mtime_ns, fa.digest, fa.avg, fa.sizes, fa.digests)})
    plan = diff(master, replica)
    assert plan.totals().send_bytes == 0
    writes = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert {w.path: {o.src for o in w.ops} for w in writes} == {"a": {"b"}, "b": {"a"}}
    assert final_keys(simulate(plan, master, replica)) == master.keys()


@SETTINGS
@given(manifests(), manifests())
def test_basis_lookups_by_scan_and_by_index_plan_alike(master, replica):
    """ChunkIndex looks a digest up in the same path's old file by scanning its digests for the
    first BASIS_SCANS lookups, then through a dict: both give the same plan."""
    import dirsync.plan as plan_mod

    scanned = diff(master, replica)
    saved = plan_mod.BASIS_SCANS
    plan_mod.BASIS_SCANS = 0  # index from the first lookup
    try:
        indexed = diff(master, replica)
    finally:
        plan_mod.BASIS_SCANS = saved
    assert indexed.actions == scanned.actions


def _copy_entry(e):
    """An equal entry as another object (what the replica's own scan decodes), with the
    replica's own inode and ctime for a file."""
    if isinstance(e, FileEntry):
        return FileEntry(e.path, e.size, e.mode, e.mtime_ns, e.digest, e.avg, e.held_sizes, e.digests,
                         e.ino + 7, e.ctime_ns + 11, e.trusted)
    return type(e)(**{k: getattr(e, k) for k in e._fields})


@SETTINGS
@given(manifests(), manifests(), st.lists(st.booleans(), min_size=40, max_size=40), st.booleans(),
       st.sampled_from((0, MOVES)))
def test_planning_only_the_changed_paths_gives_the_same_plan(cached, new, keep, delete, moves):
    """sync.py plans only the paths a master scan did not take over from its cache when the
    replica is known to hold exactly what that cache holds (the pair was left in step): for
    any change of the master since (kept entries are the cache's very objects, as a scan
    leaves them), diff(only=changed_paths(...)) gives the plan diff gives comparing every path."""
    entries = {}
    for i, (p, e) in enumerate(new.entries.items()):
        c = cached.entries.get(p)
        # Keeping the cached entry keeps the entry's kind, so the tree stays consistent.
        entries[p] = c if c is not None and c.kind == e.kind and keep[i % len(keep)] else e
    master = Manifest(entries)
    replica = Manifest({p: _copy_entry(e) for p, e in cached.entries.items()})
    only = changed_paths(cached.entries, master.entries)
    opts = PlanOptions(delete=delete, dir_moves=moves)
    full, part = diff(master, replica, opts), diff(master, replica, opts, only)
    assert part.actions == full.actions and part.skipped == full.skipped
