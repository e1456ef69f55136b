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
    changed; when an entry under it changed or went, it is moved file by file. Whatever else
    changed, the strict writer model ends at the master."""
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
    renamed = {dst + k[len(src):]: e for k, e in replica.entries.items() if k == src or k.startswith(src + "/")}
    mine = {k: e for k, e in master.entries.items() if k == dst or k.startswith(dst + "/")}
    if how in ("edited", "gone") and {k: entry_key(e) for k, e in renamed.items()} != {
            k: entry_key(e) for k, e in mine.items()}:
        assert not any(a.src == src for a in moves), plan.render()
