"""Planner examples: the cases a person thinks of first, with the exact actions expected.

The generated-manifest properties live in test_plan_props.py; every plan here also goes
through the same strict writer model (strategies.simulate).
"""

from __future__ import annotations

import os

import pytest

from dirsync.manifest import DirEntry, FileEntry, LinkEntry, Manifest
from dirsync.plan import (
    ChunkIndex,
    Commit,
    CopyOp,
    Delete,
    MakeLink,
    PlanOptions,
    SendOp,
    SetMeta,
    WriteFile,
    diff,
    file_delta,
    human_size,
)

try:
    from strategies import CHUNK_POOL, file_entry, simulate
except ImportError:  # tests/ imported as a package
    from tests.strategies import CHUNK_POOL, file_entry, simulate

ROOT = DirEntry("", 0o755, 100)
T = 1_000_000_000


def tree(*entries) -> Manifest:
    m = {"": ROOT}
    for e in entries:
        m[e.path] = e
    return Manifest(m)


def d(path, mode=0o755, mtime=T):
    return DirEntry(path, mode, mtime)


def f(path, chunks, mode=0o644, mtime=T):
    return file_entry(path, chunks, mode, mtime)


def ln(path, target, mtime=T):
    return LinkEntry(path, target, mtime)


def kinds(plan) -> list[tuple[str, str]]:
    out = []
    for a in plan.actions:
        if isinstance(a, Commit):
            out.append(("Commit", ",".join(a.paths)))
        else:
            out.append((type(a).__name__, a.path))
    return out


def check(master, replica, opts=PlanOptions()):
    plan = diff(master, replica, opts)
    state = simulate(plan, master, replica, opts.protect)
    if opts.delete and not opts.protect and not plan.skipped:
        assert Manifest(state).keys() == master.keys()
        assert plan.apply_to(replica).keys() == master.keys()
    return plan


def test_new_file_is_sent():
    plan = check(tree(f("a", [0, 1])), tree())
    assert kinds(plan) == [("WriteFile", "a"), ("Commit", "a"), ("SetMeta", "")]
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert w.ops == (SendOp(0, len(CHUNK_POOL[0] + CHUNK_POOL[1])),)  # runs of sends merge
    assert w.expect is None


def test_rename_sends_nothing_and_deletes_old_name_last():
    old = f("dir/old", [0, 1, 2, 3])
    plan = check(tree(d("dir"), f("dir/new", [0, 1, 2, 3])), tree(d("dir"), old))
    assert kinds(plan) == [("WriteFile", "dir/new"), ("Commit", "dir/new"), ("Delete", "dir/old"),
                           ("SetMeta", "dir")]
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert w.ops == (CopyOp("dir/old", 0, old.size),) and w.move  # the writer may hard-link it
    assert plan.totals().send_bytes == 0
    assert "write   dir/new  " in plan.render() and "moved from dir/old" in plan.render()


def test_move_is_marked_only_when_the_old_file_goes_and_metadata_matches():
    old = f("dir/old", [0, 1, 2, 3])
    # the old name stays: a copy (two live paths must never share an inode)
    plan = check(tree(d("dir"), old, f("dir/new", [0, 1, 2, 3])), tree(d("dir"), old))
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert w.ops == (CopyOp("dir/old", 0, old.size),) and not w.move
    # two new names for one deleted file: at most one takes it over
    plan = check(tree(d("dir"), f("dir/a", [0, 1, 2, 3]), f("dir/b", [0, 1, 2, 3])), tree(d("dir"), old))
    assert sorted(a.move for a in plan.actions if isinstance(a, WriteFile)) == [False, True]
    # another mode at the new name: copied (linking would change the old file's mode before its delete)
    plan = check(tree(d("dir"), f("dir/new", [0, 1, 2, 3], mode=0o600)), tree(d("dir"), old))
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert not w.move


def test_move_into_new_directory():
    plan = check(tree(d("n"), f("n/x", [3, 4])), tree(f("x", [3, 4])))
    assert kinds(plan)[:3] == [("MakeDir", "n"), ("WriteFile", "n/x"), ("Commit", "n/x")]
    assert plan.totals().send_bytes == 0


def test_mid_file_insertion_sends_one_chunk():
    # 0 1 | 2 3  ->  0 1 4 2 3: copy a run, send the new chunk, copy a run.
    r = f("big", [0, 1, 2, 3])
    m = f("big", [0, 1, 4, 2, 3], mtime=T + 1)
    plan = check(tree(m), tree(r))
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    n01 = len(CHUNK_POOL[0] + CHUNK_POOL[1])
    n4 = len(CHUNK_POOL[4])
    assert w.ops == (CopyOp("big", 0, n01), SendOp(n01, n4), CopyOp("big", n01, r.size - n01))
    assert w.send_bytes == n4
    assert w.expect == ("f", r.size, r.mtime_ns)


def test_same_bytes_other_chunking_copies_whole_file():
    # "alpha-bravo!!" as two chunks on the replica, as one chunk on the master.
    r = f("x", [0, 1])
    m = f("y", [5])
    assert m.digest == r.digest and m.digests != r.digests
    plan = check(tree(m), tree(r))
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert w.ops == (CopyOp("x", 0, r.size),)


def test_chunk_of_other_size_is_not_reused():
    # Same digest, other size: never trust a digest alone.
    r = f("x", [0])
    m = f("y", [2])
    bad = FileEntry("x", len(CHUNK_POOL[0]), 0o644, T, r.digest, 512, r.sizes, m.digests)  # forged
    idx = ChunkIndex(tree(bad))
    assert file_delta(m, idx) == (SendOp(0, m.size),)


def _fe(path, ids):
    """A FileEntry made of the chunks b"chunk-<i>;" (any number of distinct chunks)."""
    import xxhash

    parts = [b"chunk-%d;" % i for i in ids]
    dg = xxhash.xxh3_128_digest
    return FileEntry(path, sum(map(len, parts)), 0o644, T, dg(b"".join(parts)), 512,
                     tuple(len(p) for p in parts), b"".join(dg(p) for p in parts))


def test_chunk_is_taken_from_the_files_own_basis_first():
    # Chunk 1 is in "a" (earlier) and in "b" itself: an edited file reads from its own old version.
    a, b = _fe("a", [0, 1, 2]), _fe("b", [3, 1])
    m = _fe("b", [1, 3, 4])
    idx = ChunkIndex(tree(a, b))
    idx.want([m])
    assert file_delta(m, idx) == (CopyOp("b", 8, 8), CopyOp("b", 0, 8), SendOp(16, 8))


@pytest.mark.parametrize("n", [3, 40], ids=["few-hits", "many-hits"])
def test_chunks_from_other_files_are_found_after_want(n):
    # A new file made of chunks spread over other files (few or many distinct ones): every chunk
    # is copied from its first location, none is sent; with no hits, everything is sent.
    others = [_fe(f"o{i}", [i, 1000 + i]) for i in range(n)] + [_fe("later", list(range(n)))]
    m = _fe("new", list(reversed(range(n))))
    idx = ChunkIndex(tree(*others))
    idx.want([m])
    ops = file_delta(m, idx)
    assert ops == tuple(CopyOp(f"o{i}", 0, len(b"chunk-%d;" % i)) for i in reversed(range(n)))
    fresh = _fe("fresh", [5000, 5001])
    idx = ChunkIndex(tree(*others))
    idx.want([fresh])
    assert file_delta(fresh, idx) == (SendOp(0, fresh.size),)


def test_whole_files_are_found_first_wins_with_and_without_want():
    """A target whose whole content the replica holds is one copy from the first replica file
    with it (manifest order), whether want() looked for it in its one pass over the replica or
    file_delta asks for a content want() was not given (then every file's is indexed); a file
    with the same digest but another size is no match; want() builds nothing per file."""
    a1, a2 = _fe("z-first", [1, 2]), _fe("a-second", [1, 2])
    b = _fe("b", [3])
    forged = FileEntry("forged", b.size + 1, 0o644, T, b.digest, 512, (b.size + 1,), b.digests)
    replica = tree(forged, a1, a2, _fe("b-other", [3]), _fe("c", [4]))
    ma, mb = _fe("new-a", [1, 2]), _fe("new-b", [3])
    idx = ChunkIndex(replica)
    idx.want([ma, mb])
    assert idx._wholes is None  # found by want()'s pass, no dict of every file's content
    assert file_delta(ma, idx) == (CopyOp("z-first", 0, ma.size),)
    assert file_delta(mb, idx) == (CopyOp("b-other", 0, mb.size),)
    assert idx._wholes is None
    mc = _fe("new-c", [4])  # not given to want(): found through the full index
    assert file_delta(mc, idx) == (CopyOp("c", 0, mc.size),)
    assert idx._wholes is not None
    fresh = ChunkIndex(replica)  # no want() at all
    assert [file_delta(m, fresh) for m in (ma, mb, mc)] == [
        (CopyOp("z-first", 0, ma.size),), (CopyOp("b-other", 0, mb.size),), (CopyOp("c", 0, mc.size),)]


def test_a_basis_is_the_replica_file_at_the_same_path_only():
    # An edited file reads from its old version at its own path; a directory or an empty file
    # there is no basis, and a chunk found elsewhere is copied from where it is.
    old, other = _fe("f", [1, 2, 3]), _fe("g", [9, 2])
    target = _fe("f", [1, 2, 7])
    idx = ChunkIndex(tree(old, other))
    idx.want([target])
    assert file_delta(target, idx) == (CopyOp("f", 0, 16), SendOp(16, 8))
    for there in (d("f"), FileEntry("f", 0, 0o644, T, b"\0" * 16, 0, (), b"")):
        idx = ChunkIndex(tree(there, other))
        idx.want([target])
        assert file_delta(target, idx) == (SendOp(0, 8), CopyOp("g", 8, 8), SendOp(16, 8))


def _delta_chunk_by_chunk(target, have):
    """file_delta's rule, one chunk at a time (the model the block-wise run extension must match)."""
    ops, src, src_ci, src_off, run, send_off, send, off = [], None, 0, 0, 0, 0, 0, 0
    N = 16
    for i, n in enumerate(target.sizes):
        dg = target.digests[i * N:(i + 1) * N]
        if src is not None:
            if src_ci < len(src.sizes) and src.sizes[src_ci] == n and src.digests[src_ci * N:(src_ci + 1) * N] == dg:
                src_ci, run, off = src_ci + 1, run + n, off + n
                continue
            ops.append(CopyOp(src.path, src_off, run))
            src = None
        loc = have.find(dg, target.path)
        if loc is not None and loc[0].sizes[loc[1]] == n:
            if send:
                ops.append(SendOp(send_off, send))
                send = 0
            src, src_ci, src_off, run = loc[0], loc[1] + 1, loc[2], n
        else:
            if not send:
                send_off = off
            send += n
        off += n
    if src is not None:
        ops.append(CopyOp(src.path, src_off, run))
    if send:
        ops.append(SendOp(send_off, send))
    return tuple(ops)


@pytest.mark.parametrize("seed", range(12))
def test_long_runs_are_extended_a_block_at_a_time_with_the_same_ops(seed):
    """Files of thousands of chunks (a 1 GiB file has ~130,000): edits, inserts, deletes and
    moves at random places, next to block edges and at the ends, give exactly the ops of the
    chunk-by-chunk rule, and those ops rebuild the target."""
    import random

    rnd = random.Random(seed)
    base = list(range(rnd.choice([1, 255, 256, 257, 1024, 3000])))
    new = list(base)
    for _ in range(rnd.randrange(0, 8)):
        at = rnd.choice([0, len(new), rnd.randrange(len(new) + 1), 256, 257, 255, 1020])
        at = min(at, len(new))
        how = rnd.choice(["edit", "insert", "delete", "move"])
        if how == "edit" and at < len(new):
            new[at] = 100_000 + rnd.randrange(1000)
        elif how == "insert":
            new[at:at] = [200_000 + rnd.randrange(1000) for _ in range(rnd.randrange(1, 5))]
        elif how == "delete":
            del new[at:at + rnd.randrange(1, 300)]
        elif new:
            cut = new[at:at + rnd.randrange(1, 600)]
            del new[at:at + len(cut)]
            pos = rnd.randrange(len(new) + 1)
            new[pos:pos] = cut
    other = _fe("other", [100_000 + k for k in range(0, 1000, 7)])
    old, target = _fe("f", base), _fe("f", new)
    idx = ChunkIndex(tree(old, other))
    idx.want([target])
    ops = file_delta(target, idx)
    assert ops == _delta_chunk_by_chunk(target, idx)
    content = {"f": b"".join(b"chunk-%d;" % i for i in base), "other": b"".join(b"chunk-%d;" % k for k in range(100_000, 101_000, 7))}
    want = b"".join(b"chunk-%d;" % i for i in new)
    built = b"".join(content[o.src][o.offset:o.offset + o.size] if isinstance(o, CopyOp) else want[o.offset:o.offset + o.size]
                     for o in ops)
    assert built == want
    assert sum(o.size for o in ops) == target.size


@pytest.mark.parametrize("seed", range(16))
def test_what_a_basis_lacks_is_found_exactly_by_walking_it(seed):
    """A big target's chunks its own old file lacks are found by walking the two along each
    other and looking each differing chunk up near the walk's place (plan._basis_lacks): the
    answer must be exactly the set difference of their digest prefixes, whatever the change:
    scattered edits, inserts, deletes, blocks moved further than the walk looks, repeated
    chunks, a shorter or longer file, or one too unlike its basis for the walk to pay."""
    import random

    from dirsync import plan as plan_mod

    rnd = random.Random(seed)
    base = [rnd.randrange(4000) if seed % 4 == 3 else k for k in range(rnd.choice([1024, 1500, 4000]))]
    new = list(base)
    if seed % 5 == 4:
        new = [50_000 + k for k in range(len(base))]  # all new: over the walk's budget
    for n in range(rnd.randrange(1, 12)):
        at = rnd.randrange(len(new) + 1)
        how = "move" if n == 0 else rnd.choice(["edit", "insert", "delete", "move", "repeat"])
        if how == "edit" and at < len(new):
            new[at:at + 8] = [100_000 + rnd.randrange(10**6) for _ in range(rnd.randrange(1, 9))]
        elif how == "insert":
            new[at:at] = [200_000 + rnd.randrange(10**6) for _ in range(rnd.randrange(1, 5))]
        elif how == "delete":
            del new[at:at + rnd.randrange(1, 300)]
        elif how == "move":  # far: beyond plan.NEAR chunks from where the walk is
            cut = new[at:at + rnd.randrange(1, 600)]
            del new[at:at + len(cut)]
            pos = (at + plan_mod.NEAR * 3) % (len(new) + 1)
            new[pos:pos] = cut
        else:
            new[at:at] = [new[at - 1] if at else 7] * rnd.randrange(1, 40)
    new += [300_000 + k for k in range(rnd.choice([0, 0, 500]))]  # sometimes longer
    old, target = _fe("f", base), _fe("f", new)
    view = plan_mod._prefix_view
    assert plan_mod._basis_lacks(target.digests, old.digests) == set(view(target.digests)) - set(view(old.digests))


def test_metadata_only_changes():
    r = tree(f("a", [0]), ln("l", "a"), d("d"))
    m = tree(f("a", [0], mode=0o600, mtime=T + 5), ln("l", "a", mtime=T + 6), d("d", mode=0o700))
    plan = check(m, r)
    assert not [a for a in plan.actions if isinstance(a, (WriteFile, MakeLink, Delete))]
    assert SetMeta("a", "f", 0o600, T + 5) in plan.actions
    assert SetMeta("l", "l", 0, T + 6) in plan.actions
    assert SetMeta("d", "d", 0o700, T) in plan.actions


def test_empty_file():
    plan = check(tree(f("e", [])), tree())
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert w.ops == () and w.target.size == 0
    assert "write   e  0 B  send 0 B" in plan.render()


def test_replace_file_used_as_source_elsewhere():
    # b is rewritten; a new file c copies chunks from the old b: b must be committed after c is staged.
    r = tree(f("b", [0, 1]))
    m = tree(f("b", [2], mtime=T + 1), f("c", [0, 1, 3]))
    plan = check(m, r)
    order = kinds(plan)
    assert order.index(("WriteFile", "c")) < [i for i, k in enumerate(order) if k[0] == "Commit" and "b" in
                                              k[1].split(",")][0]


def test_commit_batches_respect_sources():
    # Tiny batches: a file is still never committed before a later write has copied from it.
    r = tree(f("a", [0]), f("b", [1]), f("c", [2]))
    m = tree(f("a", [1]), f("b", [2]), f("c", [0]))  # a rotation
    plan = check(m, r, PlanOptions(commit_files=1, commit_bytes=1))
    assert plan.totals().send_bytes == 0


def test_commit_batching_splits():
    m = tree(*(f(n, [i % 6]) for i, n in enumerate("abcdef")))
    plan = check(m, tree(), PlanOptions(commit_files=2))
    commits = [a.paths for a in plan.actions if isinstance(a, Commit)]
    assert commits == [("a", "b"), ("c", "d"), ("e", "f")]


def test_files_that_replace_others_are_committed_in_small_batches():
    """A batch holds at most commit_replaced files that replace a replica file (each frees an
    inode when renamed over it); new files do not count."""
    names = [f"r{i:02d}" for i in range(10)]
    r = tree(*(f(n, [i % 2]) for i, n in enumerate(names)))  # (no new content is in the replica: no copies)
    m = tree(*(f(n, [2 + i % 4]) for i, n in enumerate(names)), *(f(f"new{i}", [2 + i % 4, 5]) for i in range(5)))
    plan = check(m, r, PlanOptions(commit_replaced=3))
    commits = [a.paths for a in plan.actions if isinstance(a, Commit)]
    assert [sum(p.startswith("r") for p in c) for c in commits] == [3, 3, 3, 1]
    assert sorted(p for c in commits for p in c) == sorted(set(m.keys()) - {""})
    assert len([a for a in check(m, r).actions if isinstance(a, Commit)]) == 1  # (the default: no such limit)


# -- type changes --------------------------------------------------------------------------------

def test_file_to_dir():
    plan = check(tree(d("x"), f("x/y", [0])), tree(f("x", [1])))
    order = kinds(plan)
    assert order.index(("Delete", "x")) < order.index(("MakeDir", "x")) < order.index(("Commit", "x/y"))
    (dl,) = plan.deletes()
    assert dl.obstruction and dl.expect == ("f", len(CHUNK_POOL[1]), T)


def test_dir_to_file_removes_subtree_deepest_first():
    r = tree(d("x"), d("x/y"), f("x/y/z", [0]), ln("x/l", "y"))
    plan = check(tree(f("x", [0])), r)
    dels = [a.path for a in plan.deletes()]
    assert dels == ["x/y/z", "x/y", "x/l", "x"]
    assert all(a.obstruction for a in plan.deletes())
    # The new file reuses the chunk of a file inside the directory it replaces: staged first.
    order = kinds(plan)
    assert order.index(("WriteFile", "x")) < order.index(("Delete", "x/y/z"))
    assert plan.totals().send_bytes == 0


def test_dir_to_file_without_delete_is_skipped():
    r = tree(d("x"), f("x/keep", [0]))
    plan = check(tree(f("x", [1])), r, PlanOptions(delete=False))
    assert [p for p, _ in plan.skipped] == ["x"]
    assert not plan.deletes()
    assert not [a for a in plan.actions if getattr(a, "path", None) == "x"]
    assert "skip    x: replaces a non-empty replica directory" in plan.render()


def test_empty_dir_to_file_without_delete_is_done():
    plan = check(tree(f("x", [1])), tree(d("x")), PlanOptions(delete=False))
    assert plan.skipped == ()
    assert [a.path for a in plan.deletes()] == ["x"]


def test_link_file_swaps():
    r = tree(ln("a", "t"), f("b", [0]))
    m = tree(f("a", [0]), ln("b", "t"))
    plan = check(m, r)
    assert not plan.deletes()  # a file replaces a link (and back) by rename, no delete needed
    mk = [a for a in plan.actions if isinstance(a, MakeLink)]
    assert mk == [MakeLink("b", "t", T, ("f", len(CHUNK_POOL[0]), T))]
    assert plan.totals().send_bytes == 0


def test_dir_to_link():
    plan = check(tree(ln("x", "elsewhere")), tree(d("x"), f("x/f", [0])))
    order = kinds(plan)
    assert order.index(("Delete", "x")) < order.index(("MakeLink", "x"))


def test_link_target_change():
    plan = check(tree(ln("l", "new")), tree(ln("l", "old")))
    assert [a for a in plan.actions if isinstance(a, MakeLink)] == [MakeLink("l", "new", T, ("l", "old"))]


# -- deletes -------------------------------------------------------------------------------------

def test_deletes_deepest_first_then_dir_meta():
    r = tree(d("gone"), d("gone/sub"), f("gone/sub/f", [0]), f("gone/g", [1]), f("keep", [2]))
    plan = check(tree(f("keep", [2])), r)
    assert [a.path for a in plan.deletes()] == ["gone/sub/f", "gone/sub", "gone/g", "gone"]
    assert kinds(plan)[-1] == ("SetMeta", "")


def test_no_delete():
    r = tree(f("extra", [0]), d("extra-dir"))
    plan = check(tree(), r, PlanOptions(delete=False))
    assert plan.actions == ()


def test_protect_keeps_replica_side():
    r = tree(d("p"), f("p/x", [0]), f("q", [1]))
    m = tree(d("p", mode=0o700), f("q", [2]))
    plan = check(m, r, PlanOptions(protect=frozenset({"p"})))
    paths = {getattr(a, "path", None) for a in plan.actions}
    assert "p" not in paths and "p/x" not in paths
    assert ("WriteFile", "q") in kinds(plan)


def test_protected_root_is_left_alone():
    # The master root could not be listed: nothing, not even the root's metadata, is changed.
    r = Manifest({"": DirEntry("", 0o700, 1), "x": f("x", [0])})
    m = Manifest({"": DirEntry("", 0o755, 5)})
    plan = check(m, r, PlanOptions(protect=frozenset({""})))
    assert plan.actions == ()


# -- fresh replica, rendering --------------------------------------------------------------------

def test_fresh_replica_without_root_entry():
    # A replica that does not exist yet scans as an empty manifest (no root entry).
    m = tree(d("a"), f("a/f", [0]), ln("l", "a/f"))
    plan = diff(m, Manifest())
    simulate(plan, m, Manifest())
    assert plan.apply_to(Manifest()).keys() == m.keys()


def test_render_exact():
    # Chunk sizes: 0 "alpha-" 6, 1 "bravo!!" 7, 2 "c" 1, 3 "delta delta delta" 17, 4 "echo-echo" 9,
    # 5 "alpha-bravo!!" 13 (a chunk the replica does not have).
    bad = os.fsdecode(b"caf\xe9")
    r = tree(d("docs"), f("docs/old.md", [0, 1, 2, 3]), f("stale", [4]), ln("latest", "docs/old.md"))
    m = tree(d("docs"), f("docs/new.md", [0, 1, 2, 3]), f("docs/edit.md", [0, 1, 3, 2]), f(bad, []),
             ln("latest", "docs/new.md"), d("empty", mode=0o700), f("docs/sent.txt", [5, 3]))
    plan = check(m, r)
    assert plan.render().splitlines() == [
        "mkdir   empty/",
        "write   caf\\xe9  0 B  send 0 B",
        "write   docs/edit.md  31 B  reuse 31 B  send 0 B",
        "write   docs/new.md  31 B  moved from docs/old.md",
        "write   docs/sent.txt  30 B  reuse 17 B  send 13 B",
        "link    latest -> docs/new.md",
        "delete  stale",
        "delete  docs/old.md",
        "meta    docs/  mode 0755  mtime 1970-01-01T00:00:01Z",
        "meta    empty/  mode 0700  mtime 1970-01-01T00:00:01Z",
        "meta    ./  mode 0755  mtime 1970-01-01T00:00:00Z",
        "total: 4 to write (send 13 B, reuse 79 B), 2 to delete, 1 dirs, 1 links, 3 metadata",
    ]


def test_render_has_one_line_per_visible_action():
    m = tree(*(f(n, [i]) for i, n in enumerate("abc")))
    plan = check(m, tree(), PlanOptions(commit_files=1))
    visible = [a for a in plan.actions if not isinstance(a, Commit)]
    assert len(plan.render().splitlines()) == len(visible) + 1


@pytest.mark.parametrize("n,text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                    (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"), (5000 << 30, "5000.0 GiB")])
def test_human_size(n, text):
    assert human_size(n) == text


def test_commit_batches_without_copies_match_the_general_rule():
    """_commit_in_batches (an initial copy: no write copies from another) commits exactly as
    _writes_with_commits does, for any mix of early and late writes and batch limits."""
    import random

    from dirsync.plan import PlanOptions, SendOp, WriteFile, _commit_in_batches, _writes_with_commits

    rng = random.Random(11)
    for case in range(200):
        writes = []
        for i in range(rng.randrange(0, 40)):
            size = rng.choice([0, 1, 100, 5000, 70000])
            t = FileEntry(f"d/f{i}", size, 0o644, 1, b"x" * 16, 0, (size,) if size else (), b"x" * 16 if size else b"")
            expect = ("f", 1, 1, 1) if rng.random() < 0.5 else None  # (replaces a file, or a new name)
            writes.append((WriteFile(t, (SendOp(0, size),) if size else (), expect), rng.random() < 0.8))
        opts = PlanOptions(commit_bytes=rng.choice([1, 6000, 100000, 256 << 20]), commit_files=rng.choice([1, 3, 7, 4096]),
                           commit_replaced=rng.choice([1, 2, 5, 32]))
        assert _commit_in_batches(writes, opts) == _writes_with_commits(writes, opts), case


def test_initial_copy_plan_with_protected_and_new_paths():
    """The new-file fast path of diff keeps the general rules: a protected path (and what is
    under it) is left alone, every new file is written and committed, and directories get their
    metadata after the writes."""
    from dirsync.plan import Commit, MakeDir, PlanOptions, SetMeta, WriteFile, diff

    def f(p, n=3):
        return FileEntry(p, n, 0o644, 7, b"h" * 16, 0, (n,), b"h" * 16)

    master = Manifest({"": DirEntry("", 0o755, 1), "a": DirEntry("a", 0o755, 2), "a/x": f("a/x"),
                       "b": DirEntry("b", 0o700, 3), "b/y": f("b/y"), "z": f("z", 0)})
    plan = diff(master, Manifest({"": DirEntry("", 0o755, 1)}), PlanOptions(delete=True, protect=frozenset({"b"})))
    kinds = [type(a).__name__ for a in plan.actions]
    writes = [a.path for a in plan.actions if isinstance(a, WriteFile)]
    assert writes == ["a/x", "z"]
    assert [a.path for a in plan.actions if isinstance(a, MakeDir)] == ["a"]
    assert sorted(p for a in plan.actions if isinstance(a, Commit) for p in a.paths) == ["a/x", "z"]
    assert not any(getattr(a, "path", "").startswith("b") for a in plan.actions)
    assert kinds.index("SetMeta") > max(i for i, k in enumerate(kinds) if k in ("WriteFile", "Commit"))
    assert [a.path for a in plan.actions if isinstance(a, SetMeta)][-1] == ""


def test_paths_under_an_unchanged_protected_directory_stay_untouched():
    """diff skips a directory the replica holds exactly as the master without looking at its
    parent or at `protect`: what lies under it must still be left alone when it is protected
    (here a changed file, a new file and a deleted one), and be planned when it is not."""
    from dirsync.plan import Delete, PlanOptions, WriteFile, diff

    def f(p, digest, n=3):
        return FileEntry(p, n, 0o644, 7, digest * 16, 0, (n,), digest * 16)

    base = {"": DirEntry("", 0o755, 1), "p": DirEntry("p", 0o755, 2), "p/q": DirEntry("p/q", 0o755, 2)}
    replica = Manifest({**base, "p/q/a": f("p/q/a", b"a"), "p/q/gone": f("p/q/gone", b"g"), "z": f("z", b"z")})
    master = Manifest({**base, "p/q/a": f("p/q/a", b"b"), "p/q/new": f("p/q/new", b"n"), "z": f("z", b"y")})
    guarded = diff(master, replica, PlanOptions(delete=True, protect=frozenset({"p"})))
    assert [a.path for a in guarded.actions if isinstance(a, (WriteFile, Delete))] == ["z"]
    free = diff(master, replica, PlanOptions(delete=True))
    assert sorted(a.path for a in free.actions if isinstance(a, (WriteFile, Delete))) == [
        "p/q/a", "p/q/gone", "p/q/new", "z"]


def test_a_scoped_side_reuses_every_file_of_the_side():
    """Two-way plans on a side restricted to the changed paths (twoway._ScopedSide), whose
    files() still yields every file of the side: a new file copies from one outside the scope."""
    from dirsync import twoway

    b, other = _fe("b", [1, 2]), _fe("x", [7])
    side = tree(b, other)
    scoped = twoway._restrict(side, {"", "x"}, every_file=True)
    m = _fe("c", [1, 2])
    assert "b" not in scoped.entries
    assert file_delta(m, ChunkIndex(scoped)) == (CopyOp("b", 0, m.size),)
    idx = ChunkIndex(scoped)
    edited = _fe("b", [1, 3])  # a basis outside the scope too
    idx.want([edited])
    assert file_delta(edited, idx) == (CopyOp("b", 0, 8), SendOp(8, 8))


def test_a_local_replica_looks_for_chunks_in_other_files_only_when_enough_are_wanted():
    """PlanOptions.local: a chunk sent to a replica on this machine costs only a read of the
    master, so the replica's every chunk is indexed (for chunks other files hold) only when at
    least one in LOCAL_INDEX_SHARE of them is wanted; a file's own basis and whole-file copies
    are found either way; a remote replica (the default) always looks."""
    from dirsync.plan import LOCAL_INDEX_SHARE

    n = 8 * LOCAL_INDEX_SHARE  # replica chunks (5 wanted below: too few)
    big = _fe("big", range(n))
    own = _fe("own", [9000, 9001, 9002])
    replica = tree(big, own, _fe("whole", [9100, 9101]))
    few = _fe("few", [0, 1, 2, 3000])  # with the edit, 5 wanted: < n / LOCAL_INDEX_SHARE
    edited = _fe("own", [9000, 3001, 9002])  # its own basis has two of its chunks
    moved = _fe("moved", [9100, 9101])  # whole content at another path
    many = _fe("many", list(range(n // 2)) + [3002])  # n/2 + 1 wanted: enough
    cases = {"few": few, "own": edited, "moved": moved}
    for local in (False, True):
        plan = diff(tree(big, edited, _fe("whole", [9100, 9101]), few, moved), replica, PlanOptions(local=local))
        w = {a.path: a for a in plan.actions if isinstance(a, WriteFile)}
        assert set(w) == set(cases)
        assert w["own"].ops == (CopyOp("own", 0, 11), SendOp(11, 11), CopyOp("own", 22, 11))
        assert w["moved"].ops == (CopyOp("whole", 0, moved.size),)
        if local:  # too few wanted for the index: sent
            assert w["few"].ops == (SendOp(0, few.size),)
        else:
            assert w["few"].ops == (CopyOp("big", 0, 24), SendOp(24, 11))
    plan = diff(tree(big, own, _fe("whole", [9100, 9101]), many), replica, PlanOptions(local=True))
    (w,) = [a for a in plan.actions if isinstance(a, WriteFile)]
    assert w.ops[-1] == SendOp(many.size - 11, 11)
    assert all(isinstance(o, CopyOp) and o.src == "big" for o in w.ops[:-1])
