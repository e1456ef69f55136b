"""The only code that writes into a replica. Runs in-process for local replicas and inside the agent.

Every path operation is relative to a directory fd reached from the root fd one component at
a time with O_NOFOLLOW, so a replica directory swapped for a symlink cannot redirect a write
outside the root. Files are built in `.dirsync/tmp/` (same filesystem as the tree), verified
(against the whole-file digest, or chunk by chunk plus the stat facts of trusted reuse
sources: see Replica._build), made durable, and only then renamed to their final name.
Staging in one folder rather than beside the target lets a file be staged before its
directory exists, keeps type changes and swaps simple, and makes stale temps easy to find.

A directory the run creates is built under a temp name (a "fresh" directory, see make_dir):
files inside it are written at their final names, and the whole directory is renamed into
place once they are durable (publish). A file is still never visible at its final path before
its data is durable, and an initial copy saves a rename per file (~25 us of kernel time here,
a third of what creating a small file costs).
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
import threading
import time
from itertools import accumulate

import xxhash

from dirsync import chunking
from dirsync.errors import (
    ConflictError,
    display_path,
    ConfigError,
    InvalidPathError,
    ItemError,
    ItemIOError,
    RefusedError,
    SourceChangedError,
)
from dirsync.manifest import (DirEntry, Entry, FileEntry, LinkEntry, Manifest, Overlay, SavedManifest, check_relpath,
                              fingerprint, fingerprint_update, is_under, parent_of)
from dirsync.plan import CopyOp, Delete, MakeDir, MakeLink, MoveDir, SendOp, SetMeta, WriteFile
from dirsync.record import Record
from dirsync.scan import PRECOPY_MIN, RACY_NS, STATE_DIR, TMP_PREFIX, Excluder, Prewalk, ScanResult, scan_tree
from dirsync.scan import _files  # new small files written in C (dirsync/_files.c), or None: stage() writes them
from dirsync.state import FileLock, fsync_dir_fd, load_manifest_file, save_manifest_file, write_atomic

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Iterator

MARKER = "replica.json"
RESERVED = "reserved.json"  # backup dirs inside the root: left out of later scans while they exist
CACHE = "manifest"
COPY_BLOCK = 4 << 20
BESIDE_MAX = 1 << 20  # files up to this size are staged beside their target (see _stage_dir)
Tmp = tuple  # (directory relpath beside the target, or None for .dirsync/tmp; temp name)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_BATCH = 128  # writes of new small files staged in one _files.write_new call (see stage_new)
NEW_MAX = 64 << 10  # the largest such file is a byte smaller (as apply.DIRECT_MIN: larger ones copy in the kernel)
_NS_MIN, _NS_MAX = -(1 << 63), (1 << 63) - 1  # (stage_new: mtimes it takes, as a C long long)


class OpenInfo(Record):
    _fields = ("created", "initialised", "cache_status", "cache_reason", "warnings", "reserved", "frees_linger")

    def __init__(
        self,
        created: bool = False,  # the root directory was made by this run
        initialised: bool = False,  # the marker was written by this run
        cache_status: str = "ok",  # "ok" | "missing" | "unusable"
        cache_reason: str = "",
        warnings: list[str] | None = None,
        reserved: tuple[str, ...] = (),  # relpaths the replica keeps for itself (an inside backup dir)
        frees_linger: bool = False,  # see frees_linger(): commit replacing files in small batches
    ) -> None:
        self.created = created
        self.initialised = initialised
        self.cache_status = cache_status
        self.cache_reason = cache_reason
        self.warnings = [] if warnings is None else warnings
        self.reserved = reserved
        self.frees_linger = frees_linger

    @property
    def deletes_allowed(self) -> bool:
        """False when the replica's cache was lost unexpectedly: no deletions on such a run."""
        return self.cache_status == "ok" or self.initialised


def frees_linger(fd: int) -> bool:
    """Is the file system holding fd an ext2/3/4 without a journal? There the kernel does not
    hand out an inode freed in the last minute (five, while its inode table block is dirty) and
    checks each such free inode in turn before every create (fs/ext4/ialloc.c, recently_deleted).
    Read from /sys/fs/ext4/<device>/journal_task ("<none>": no journal); False when unknown."""
    try:
        st = os.fstat(fd)
        dev = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"))
        with open(f"/sys/fs/ext4/{dev}/journal_task", "rb") as f:
            return f.read().strip() == b"<none>"
    except OSError:
        return False


_libc = None


class _Commit:
    """A started commit: its files, and the thread flushing their data (None: already fsynced)
    with the error it met (then none of the files is renamed into place)."""

    __slots__ = ("todo", "flush", "error")

    def __init__(self, todo: list) -> None:
        self.todo = todo
        self.flush: threading.Thread | None = None
        self.error: OSError | None = None

    def run_flush(self, fd: int) -> None:
        try:
            _syncfs(fd)
        except OSError as e:
            self.error = e


def _load_libc():
    global _libc
    if _libc is None:
        import ctypes  # here: a run that commits nothing in batches never needs it (~4 ms)

        _libc = ctypes.CDLL(None, use_errno=True)
        for name, types in (("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)),
                            ("renameat2", (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint))):
            try:
                getattr(_libc, name).argtypes = types
            except AttributeError:  # not Linux (or an old libc): callers fall back
                pass
    return _libc


def _syncfs(fd: int) -> None:
    """Flush the file system holding fd. Raises OSError when the kernel reports a write error
    there (some data may not be on disk); sync() where syncfs fails otherwise."""
    if _load_libc().syncfs(fd) != 0:
        import ctypes

        err = ctypes.get_errno()
        if err in (errno.EIO, errno.ENOSPC, errno.EDQUOT):
            raise OSError(err, os.strerror(err))
        os.sync()


DIR_FSYNC_MAX = 16  # directories flushed by an fsync each (~1 ms here); more: one syncfs (see _flush_entries)


def _create_modes() -> int:
    """The permission bits a new file keeps under this process's umask (read from
    /proc/self/status: setting the umask to read it would race other threads). 0 when
    unknown: every file is created 0600 and given its mode with fchmod."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0


_noreplace = True  # renameat2(RENAME_NOREPLACE) works here (cleared at the first ENOSYS/EINVAL)
_RENAME_NOREPLACE = 1


def _holds_bytes(dfd: int, name: str, e: FileEntry) -> bool:
    """Does file `name` hold e's bytes (its whole-file digest), unchanged while read?"""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st0 = os.fstat(fd)
        if not stat.S_ISREG(st0.st_mode) or st0.st_size != e.size:
            return False
        h = xxhash.xxh3_128()
        while b := os.read(fd, 1 << 20):
            h.update(b)
        st1 = os.fstat(fd)
    finally:
        os.close(fd)
    return ((st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns) == (st0.st_size, st0.st_mtime_ns, st0.st_ctime_ns)
            and h.digest() == e.digest)


def _rename_noreplace(sdfd: int, src: str, ddfd: int, dst: str) -> int:
    """renameat2(..., RENAME_NOREPLACE): 0, or the errno (EEXIST: `dst` exists, left alone).
    -1: not available on this system or file system (the caller checks and renames instead)."""
    global _noreplace
    f = getattr(_load_libc(), "renameat2", None)
    if f is None:
        _noreplace = False
        return -1
    if f(sdfd, os.fsencode(src), ddfd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return 0
    import ctypes

    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        _noreplace = False
        return -1
    return err


def _rename_checked(sdfd: int, src: str, ddfd: int, dst: str) -> int:
    """Rename `src` to `dst` unless something is there (checked first: a directory renamed over
    an empty one made in between replaces it). 0, or the errno (EEXIST: `dst` exists)."""
    if os.access(dst, os.F_OK, dir_fd=ddfd, follow_symlinks=False):
        return errno.EEXIST
    try:
        os.rename(src, dst, src_dir_fd=sdfd, dst_dir_fd=ddfd)
    except OSError as e:
        return e.errno or errno.EIO
    return 0


KICK_BYTES = 16 << 20  # start writing a file's data back after this much (see _kick)
_SYNC_FILE_RANGE_WRITE = 2


DIRFD_MAX = 768  # keeps every fd number of a process below 1,024: select() takes no higher one


def dirfd_cap() -> int:
    """Directory fds a Replica keeps open at most (least recently used closed first): a quarter
    of the open-file limit, 64 to DIRFD_MAX. A plan's passes (stage, commit, directory metadata)
    each visit every touched directory in path order; a release-like change touching one file
    in each of 500 directories reopened every one of them in every pass with 256 kept."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return DIRFD_MAX
    return max(64, min(DIRFD_MAX, soft // 4))


def warm_up() -> None:
    """Load now what a plan's writes will need (libc's syncfs, renameat2 and sync_file_range
    through ctypes, ~5-20 ms), for a caller with idle time before they start."""
    _load_libc()


def _kick(fd: int) -> None:
    """Start writing back `fd`'s dirty pages now, without waiting (sync_file_range WRITE).
    Durability still comes from the fsync/syncfs before the rename; this only keeps the disk
    busy while the next bytes are copied, instead of idle until that flush (the kernel's own
    writeback starts only at a tenth of memory dirty)."""
    libc = _load_libc()
    f = getattr(libc, "sync_file_range", None)
    if f is not None:
        f(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


class BackupOptions(Record):
    """--backup-dir: keep what a sync overwrites or deletes on the replica.

    Before an existing file or symlink is replaced or deleted it is hard-linked (copied when
    the backup dir is on another filesystem) to `<dir>/<stamp>/<relpath>`, where `<stamp>` is
    the run's UTC start time like `2026-11-26T101500Z` (`-1`, `-2`... added when two runs share
    a second). A relative `dir` is relative to the replica root; a dir inside the replica is
    left out of its scans (never synced into, never deleted). `keep`: after the run only the
    newest `keep` run folders are kept (None: keep all). When the backup fails the file is
    left as it is and the failure is an item error.
    """

    _fields = ("dir", "keep", "stamp")

    def __init__(
        self,
        dir: str,
        keep: int | None = None,
        stamp: str = "",  # "" = now
    ) -> None:
        self.dir = dir
        self.keep = keep
        self.stamp = stamp


BACKUP_STAMP_RE = r"\d{4}-\d{2}-\d{2}T\d{6}Z(?:-\d+)?"


def backup_stamp(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(time.time() if t is None else t))


class Replica:
    """One replica root. Call open(), then manifest(), then the action methods, then close()."""

    def __init__(self, root: str, *, readonly: bool = False, backup: BackupOptions | None = None) -> None:
        self.root = os.path.abspath(root)
        self.readonly = readonly
        self.backup = backup
        self.backup_dir = ""  # absolute, set by open()
        self.backup_rel: str | None = None  # the backup dir relative to the root, when inside it
        self.reserved: tuple[str, ...] = ()  # backup_rel and earlier runs' backup dirs: never scanned
        self._backup_run: str | None = None  # <dir>/<stamp> once this run made it
        self.root_fd = -1
        self.tmp_fd = -1
        self.lock: FileLock | None = None
        self.cache: SavedManifest | None = None  # the saved cache (rows decoded only when needed)
        self._scan: ScanResult | None = None  # the last scan
        self._prewalk: Prewalk | None = None  # a walk started by prewalk(), taken by manifest()
        self.split_walk = False  # scans walk with two processes (scan.gather_split): set by the agent
        self._prewalk_for: Excluder | None = None  # ... only when called with this very excluder
        self._current: dict[str, Entry] | None = None  # made from the scan on first use
        self.scan_unchanged = False
        self.closed_fingerprint = b""  # set by close: the fingerprint of the cache it left (b"": none)
        self.staged: dict[str, tuple[Tmp, WriteFile]] = {}
        self.building: Tmp | None = None  # the temp stage() is making (see there)
        self.building_many: list[Tmp] | tuple = ()  # the files stage_new is making (see there)
        self._create_modes = _create_modes()  # (read per session: the umask could change between)
        self._flushing: threading.Thread | None = None  # a commit's syncfs in flight (see commit_start)
        # Directories holding entries made since the last flush (renames, new names), flushed at
        # the latest by close; or "many": more than DIR_FSYNC_MAX of them (see _note_dirs).
        self._unflushed: set[str] = set()
        self._unflushed_many = False
        self._links: set[str] = set()  # staged paths that are hard links (no data of theirs to flush)
        self._linked: dict[str, str] = {}  # old name -> new name of files moved by a hard link
        self._dirfds: dict[str, int] = {}
        self._dirfd_max = dirfd_cap()
        self._fresh: dict[str, str] = {}  # directory made under a temp name -> that name (see publish)
        self._in_fresh: set[str] = set()  # those directories and every one made inside them
        self._tainted: set[str] = set()  # fresh directories holding a failed file we could not remove
        self._published = False  # publish() ran: directories are made at their final names now
        self._tmp_seq = 0
        self._tmp_tag = os.urandom(4).hex()  # this session's temp names: TMP_PREFIX + seq + tag
        self._helper = False  # this is a forked helper writer's copy (see become_helper)
        self._precopies: dict[str, _Precopy] = {}  # copies made ahead of the plan (see precopy)
        self.write_start_ns = time.time_ns()

    # -- lifecycle ---------------------------------------------------------------

    def open(self, *, init: bool = False, chunker: str = chunking.CHUNKER_ID) -> OpenInfo:
        """Check the root and take it over for this run.

        Raises RefusedError for a root that is not a directory, or a non-empty directory that
        dirsync never synced (unless init); LockedError when another run holds it.
        A missing root is created (its parent must exist).
        """
        info = OpenInfo()
        root = self.root
        if self.backup is not None:
            self._place_backup(info)
        try:
            st = os.stat(root)
        except FileNotFoundError:
            if self.readonly:
                info.cache_status = "missing"
                info.initialised = True
                return info
            try:
                os.mkdir(root, 0o755)
            except FileNotFoundError:
                raise ConfigError(f"replica {root}: parent directory does not exist") from None
            except OSError as e:
                raise ConfigError(f"replica {root}: cannot create: {e.strerror}") from None
            info.created = True
            st = os.stat(root)
        except OSError as e:
            raise RefusedError(f"replica {root}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise RefusedError(f"replica {root} is not a directory")
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        info.frees_linger = frees_linger(self.root_fd)  # (a dry run plans the batches a run would)
        state = os.path.join(root, STATE_DIR)
        try:  # a symlinked state folder would carry the lock, marker, cache and temps elsewhere
            sst = os.lstat(STATE_DIR, dir_fd=self.root_fd)
        except FileNotFoundError:
            sst = None
        if sst is not None and not stat.S_ISDIR(sst.st_mode):
            raise RefusedError(f"replica {root}: {STATE_DIR} is not a directory (a symlink or a file); refusing",
                               hint=f"dirsync keeps its state in {state}/; remove whatever is there if it is not yours")
        marked = os.path.isfile(os.path.join(state, MARKER))
        if not marked:
            others = [n for n in os.listdir(root) if n != STATE_DIR]
            if others and not init:
                raise RefusedError(
                    f"replica {root} is not empty and was never synced by dirsync",
                    hint="check the path; pass --init to make this directory a replica anyway",
                )
        if self.readonly:
            info.initialised = not marked  # what a real run would do
            if marked:
                load = load_manifest_file(os.path.join(state, CACHE), chunker, lazy=True)
                self.cache, info.cache_status, info.cache_reason = load.saved, load.status, load.reason
                self._reserve(info, state, persist=False)
            else:
                info.cache_status = "missing"
            return info
        try:
            os.makedirs(os.path.join(state, "tmp"), exist_ok=True)
            self.lock = FileLock(os.path.join(state, "lock"), f"replica {root}").acquire()
            if not marked:
                import json
                import uuid  # only here: importing it costs every run ~6 ms

                write_atomic(os.path.join(state, MARKER),
                             json.dumps({"format": 1, "id": str(uuid.uuid4()), "created_ns": time.time_ns()}).encode())
                info.initialised = True
            self.tmp_fd = os.open(os.path.join(state, "tmp"), _O_DIR)
        except OSError as e:  # unwritable root, full disk: this replica cannot be used
            raise ConfigError(f"replica {root}: cannot set up {STATE_DIR}/: {e.strerror}",
                              hint="the replica root must be writable by the user running dirsync") from None
        for name in os.listdir(self.tmp_fd):  # stale temps of an interrupted run: we hold the lock
            if not name.startswith(TMP_PREFIX):
                continue
            try:
                os.unlink(name, dir_fd=self.tmp_fd)
            except IsADirectoryError:
                pass
            except FileNotFoundError:
                pass
        load = load_manifest_file(os.path.join(state, CACHE), chunker, lazy=True)
        self.cache, info.cache_status, info.cache_reason = load.saved, load.status, load.reason
        if load.status == "unusable":
            info.warnings.append(f"replica cache unusable ({load.reason}): rescanning everything, no deletions this run")
        elif load.status == "missing" and marked:
            info.warnings.append("replica cache missing: rescanning everything, no deletions this run")
        self._reserve(info, state, persist=True)
        return info

    def prewalk(self, excluder: Excluder) -> None:
        """Start the next manifest()'s stat walk in a child process (scan.Prewalk), to overlap
        it with the master's walk; manifest() must then get the same excluder."""
        if self.root_fd >= 0 and self._prewalk is None:
            self._prewalk_for = excluder
            if self.reserved:
                excluder = _Reserved(excluder, self.reserved)
            self._prewalk = Prewalk.start(self.root, excluder, self.cache.fingerprint if self.cache else b"", self.cache)

    def manifest(self, excluder: Excluder, *, fresh: bool = False) -> ScanResult:
        """Scan the replica (reusing its cache unless `fresh`) and remember the result."""
        walked, self._prewalk = self._prewalk, None
        if walked is not None and (fresh or excluder is not self._prewalk_for):
            walked.cancel()
            walked = None
        if self.root_fd < 0:
            return ScanResult(Manifest())
        if self.reserved:
            excluder = _Reserved(excluder, self.reserved)
        res = scan_tree(self.root, excluder=excluder, cache=None if fresh else self.cache, walked=walked,
                        split=self.split_walk and walked is None)
        if not self.readonly:
            for rel in res.temps:  # left by an interrupted run; we hold the replica lock
                try:
                    dfd, name = self._at(rel, "remove stale temp")
                    try:
                        os.unlink(name, dir_fd=dfd)
                    except IsADirectoryError:  # a fresh directory (see publish) never put in place
                        _remove_tree(dfd, name)
                except (OSError, ItemError):
                    pass
        self._scan = res
        self._current = None
        self.scan_unchanged = res.unchanged
        return res

    @property
    def scanned(self) -> Manifest | None:
        """The last scan's manifest (decoding the saved cache if the scan took it whole)."""
        return self._scan.manifest if self._scan is not None else None

    @property
    def current(self) -> dict[str, Entry]:
        """What the replica holds now: the scan, then our changes. When the scan took a saved
        cache whole (undecoded) and it has a row index, an Overlay over its rows: a run that
        touches a few paths of a large replica then decodes those rows only."""
        if self._current is None:
            s = self._scan
            rows = s.saved_rows() if s is not None else None
            if rows is not None:
                self._current = Overlay(rows)  # type: ignore[assignment]
            else:
                self._current = dict(s.manifest.entries) if s is not None else {}
        return self._current

    def scanned_entry(self, p: str) -> Entry | None:
        """The entry at p as the last scan found it (None: nothing there)."""
        if self._scan is None:
            return None
        cur = self.current
        if cur.__class__ is Overlay:
            return cur.original(p)  # type: ignore[attr-defined]
        return self._scan.manifest.entries.get(p)

    def ready_rows(self) -> None:
        """Read now what the actions will read of the scan, not at the first action: the row
        index of a cache the scan took whole (`current` is then an Overlay), or else every row.
        Raises ManifestFormatError for rows that do not decode."""
        s = self._scan
        if s is None or self._current is not None:
            return
        if s.saved_rows() is not None:
            self.current._ix.where  # type: ignore[attr-defined]  # noqa: B018
        else:
            s.manifest  # noqa: B018 (decoded once; later reads reuse it)

    @property
    def touched(self) -> bool:
        """False while nothing has looked at or changed `current` since the scan."""
        return self._current is not None

    def settle(self) -> None:
        """The first part of close(), which calls it again (then a no-op): drop unfinished
        temps, put the fresh directories in place (what was committed in them: an interrupted
        run keeps it, as ever) and flush the run's new names. From here on `current` is what
        close() saves (the agent reads it here, to send the master its rows while it saves).
        Raises ItemIOError when the flush fails (the cache must then not be saved)."""
        if self._prewalk is not None:
            self._prewalk.cancel()
            self._prewalk = None
        self._drop_uncommitted()  # (first: an uncommitted file in a fresh directory too)
        if self._fresh and self.root_fd >= 0:
            self.publish()
        if (self._unflushed or self._unflushed_many) and self.root_fd >= 0:
            try:
                self._flush_entries()  # before the cache that records those entries is saved
            except OSError as e:  # not saved: the old cache stays (stat checks catch staleness)
                raise ItemIOError(f"{STATE_DIR}/{CACHE}", "flush the run's renames", e) from None

    def _untouched(self) -> bool:
        """The saved cache is still exact: the scan matched it and nothing changed since."""
        return bool(self._scan is not None and self.scan_unchanged and self.cache is not None
                    and self.cache.generation
                    and (not self._scan.fingerprint or self._scan.fingerprint == self.cache.fingerprint)
                    and (self._current is None or (not self._current.changed() if self._current.__class__ is Overlay
                                                   else self._current == self._scan.manifest.entries)))

    def will_save(self, save: bool = True) -> bool:
        """Whether close(save=save) is to write a cache under a new generation (after settle)."""
        return not self._untouched() and self._may_save(save)

    def _may_save(self, save: bool) -> bool:
        return save and not self.readonly and self.root_fd >= 0 and self._scan is not None and bool(self.current)

    def close(self, *, save: bool = True, chunker: str = chunking.CHUNKER_ID, generation: str = "") -> str:
        """Drop unfinished temps, save the cache of what the replica now holds, release the lock.
        `generation`: the id to save a new cache under (else a fresh random one).

        Returns the generation id of the saved cache ("" when nothing was saved)."""
        new_generation, generation = generation, ""
        try:
            self.settle()
            if self._untouched():
                generation = self.cache.generation  # nothing changed: the saved cache is still exact
                self.closed_fingerprint = self.cache.fingerprint
            elif self._may_save(save):  # (not untouched: will_save)
                generation = new_generation or os.urandom(16).hex()
                cur = self.current
                if cur.__class__ is Overlay:  # (the scan's rows: the cache's own, see Overlay)
                    fp = cur.fingerprint(self._scan.fingerprint)  # type: ignore[attr-defined]
                    new = Manifest(cur, generation=generation)
                else:
                    scanned = self._scan.manifest
                    fp = fingerprint_update(self._scan.fingerprint, scanned.entries, cur) \
                        if self._scan.fingerprint else fingerprint(cur)
                    new = Manifest(cur, generation=generation, rows=scanned.rows)
                try:
                    save_manifest_file(os.path.join(self.root, STATE_DIR, CACHE), new, chunker, fp)
                except OSError as e:  # e.g. a full disk: the old cache stays (stat checks catch staleness)
                    generation = ""
                    raise ItemIOError(f"{STATE_DIR}/{CACHE}", "save replica cache", e) from None
                self.closed_fingerprint = fp
            if self.backup is not None and self.backup.keep and not self.readonly and self.root_fd >= 0:
                self._prune_backups(self.backup.keep)
        finally:
            for fd in self._dirfds.values():
                os.close(fd)
            self._dirfds.clear()
            for fd in (self.tmp_fd, self.root_fd):
                if fd >= 0:
                    os.close(fd)
            self.tmp_fd = self.root_fd = -1
            if self.lock:
                self.lock.release()
                self.lock = None
        return generation

    def forget(self) -> None:
        """A forked worker took this replica over (dirsync.fanout) and has finished with it:
        close this process's descriptors and reap the walk it started, without unlocking,
        saving or removing anything (the worker did all of that, or its end did)."""
        if self._prewalk is not None:
            self._prewalk.cancel()
            self._prewalk = None
        for fd in (*self._dirfds.values(), self.tmp_fd, self.root_fd):
            if fd >= 0:
                os.close(fd)
        self._dirfds.clear()
        self.tmp_fd = self.root_fd = -1
        if self.lock:
            self.lock.forget()
            self.lock = None

    # -- a second writer process (apply._Helper) ----------------------------------------
    # The helper is forked by apply_actions with this object as it is, and writes new files
    # only (each at a path nothing else in the plan touches). It never publishes, saves or
    # unlocks: it tells the parent what it committed, and the parent records it here.

    def can_fork_helper(self, fed: bool = False) -> bool:
        """No commit in flight (its flush thread would be lost in a fork) and nothing staged;
        `fed` (a helper fed its actions one by one, apply._Helper.start_fed): either may be, as
        the parent's alone (become_helper)."""
        return self.root_fd >= 0 and (fed or self._flushing is None and not self.staged)

    def become_helper(self) -> None:
        """In the forked helper: temps get names of their own (the parent goes on naming its own),
        and the entries to flush are its own (the parent flushes those it made before the fork),
        as are what the parent had staged, building or flushing (never committed, removed or
        waited for here)."""
        self._tmp_tag = os.urandom(4).hex()
        self._helper = True
        self._precopies = {}  # (the parent's: their threads and temps are not this process's)
        self._unflushed = set()
        self._unflushed_many = False
        self.staged = {}
        self.building = None
        self.building_many = ()
        self._flushing = None
        self._links = set()
        self._linked = {}

    def end_helper(self) -> list[str]:
        """The helper's end: remove the temps of files it staged but did not commit, make its
        renames durable; returns the fresh directories it could not clean (see _unlink_tmp)."""
        self._drop_uncommitted()
        self._flush_entries()
        return sorted(self._tainted)

    def helper_joined(self) -> None:
        """The helper is gone: the names it made are flushed again by this process's next flush,
        as a syncfs (they are not in this process's notes, and the helper's own flush at its
        end may have failed)."""
        self._unflushed_many = True

    def adopt(self, w: WriteFile, ino: int, ctime_ns: int, trusted: bool, digests: bytes | None = None) -> None:
        """Record a file the helper committed, as commit_finish records its own (`digests`: the
        chunk digests the helper derived from the bytes it wrote, for a derived write)."""
        t = w.target
        self.current[t.path] = FileEntry(t.path, t.size, t.mode, t.mtime_ns, t.digest, t.avg, t.held_sizes,
                                         t.digests if digests is None else digests, ino, ctime_ns, trusted)

    def distrust_sources(self, w: WriteFile) -> None:
        """The helper failed to write `w`: the reuse sources it had (its own old version, for a
        file it replaces) are read again by the next scan, as when this process fails such a
        write on a content check (_forget_sources): the helper's own notes of that are lost."""
        self._forget_sources(w)

    def taint(self, rel: str) -> None:
        """A fresh directory in which the helper left a failed file it could not remove."""
        self._tainted.add(rel)

    def orphaned(self, w: WriteFile) -> bool:
        """The helper died without a word on `w`. In a fresh directory (not yet published, so
        only the helper can have put it there) remove what may be at its name, complete or
        not: False. Elsewhere its commit may have happened unreported (the helper sends its
        outcomes in batches): True when the file at w's path is w's target (regular, its size,
        mode and mtime, and its bytes read again give the digest), recorded then as a commit
        is, but not trusted (the next scan reads it again). Its temps are an interrupted run's,
        removed by the next run."""
        parent = parent_of(w.path)
        if parent in self._in_fresh:
            self._unlink_tmp((parent, w.path.rsplit("/", 1)[-1]))
            return False
        t = w.target
        try:
            dfd, name = self._at(w.path, "check")
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except (OSError, ItemError):
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) != (
                    t.size, t.mtime_ns, t.mode):
                return False
            h = xxhash.xxh3_128()
            cut = _ChunkHasher(t.sizes) if w.derive else None  # (its digests were to be cut from its bytes)
            while data := os.read(fd, COPY_BLOCK):
                h.update(data)
                if cut is not None:
                    cut.update(data)
            if h.digest() != t.digest or (cut is not None and not cut.complete):
                return False
        except OSError:
            return False
        finally:
            os.close(fd)
        self.current[t.path] = FileEntry(t.path, t.size, t.mode, t.mtime_ns, t.digest, t.avg, t.held_sizes,
                                         cut.digests() if cut is not None else t.digests, st.st_ino,
                                         st.st_ctime_ns, False)
        return True

    # -- path resolution -----------------------------------------------------------

    def _dirfd(self, rel: str) -> int:
        """fd of directory `rel`, reached from the root without following any symlink."""
        if not rel:
            return self.root_fd
        fd = self._dirfds.pop(rel, None)
        if fd is not None:
            self._dirfds[rel] = fd  # most recently used last
            return fd
        parent = self._dirfd(parent_of(rel))
        name = self._fresh.get(rel) or rel.rsplit("/", 1)[-1]
        try:
            fd = os.open(name, _O_DIR, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise InvalidPathError(rel, "open directory", "not a directory (or a symlink) on the replica") from None
            raise ItemIOError(rel, "open directory", e) from None
        if len(self._dirfds) >= self._dirfd_max:
            # Close the least recently used quarter; an fd the caller fetched just before stays.
            for k in list(self._dirfds)[:self._dirfd_max // 4]:
                os.close(self._dirfds.pop(k))
        self._dirfds[rel] = fd
        return fd

    def _drop_dirfds(self, top: str) -> None:
        for k in [k for k in self._dirfds if is_under(k, top)]:
            os.close(self._dirfds.pop(k))

    def _at(self, rel: str, op: str) -> tuple[int, str]:
        try:
            check_relpath(rel)
        except ValueError as e:
            raise InvalidPathError(rel, op, str(e)) from None
        return self._dirfd(parent_of(rel)), rel.rsplit("/", 1)[-1]

    def _check_expect(self, rel: str, dfd: int, name: str, expect: tuple | None, op: str) -> None:
        """Raise ConflictError unless the path still looks as the plan expected."""
        if expect is None and not os.access(name, os.F_OK, dir_fd=dfd, follow_symlinks=False):
            return  # the usual case for a new file: no exception built for it (half the cost)
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            if expect is None:
                return
            raise ConflictError(rel, op, "vanished from the replica since it was scanned") from None
        if expect is None:
            raise ConflictError(rel, op, "appeared on the replica since it was scanned; left alone")
        kind = expect[0]
        ok = False
        if kind == "f":
            ok = stat.S_ISREG(st.st_mode) and st.st_size == expect[1] and st.st_mtime_ns == expect[2]
        elif kind == "l":
            ok = stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dfd) == expect[1]
        elif kind == "d":
            ok = stat.S_ISDIR(st.st_mode)
        if not ok:
            raise ConflictError(rel, op, "changed on the replica since it was scanned; left alone")

    # -- actions -------------------------------------------------------------------

    def make_dir(self, a: MakeDir) -> None:
        """Make a directory. Until publish(), one whose parent exists is made under a temp name
        (the directories made inside it get their own names): see publish."""
        dfd, name = self._at(a.path, "mkdir")
        parent = parent_of(a.path)
        if not self._published and _noreplace:
            if a.path in self._in_fresh:
                return  # made already (a plan names a directory once; a peer might twice)
            if parent in self._in_fresh:
                self._in_fresh.add(a.path)  # inside a fresh directory: its own name (fall through)
            else:
                self._tmp_seq += 1
                tmp = f"{TMP_PREFIX}d{self._tmp_seq}-{self._tmp_tag}"
                try:
                    os.mkdir(tmp, 0o700, dir_fd=dfd)
                except OSError as e:
                    raise ItemIOError(a.path, "mkdir", e) from None
                self._fresh[a.path] = tmp
                self._in_fresh.add(a.path)
                self.current[a.path] = DirEntry(a.path, a.mode, 0)
                self._note_dirs((a.path,))  # (its inode: flushed before it goes in place)
                return
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
        except FileExistsError:
            st = os.lstat(name, dir_fd=dfd)
            if not stat.S_ISDIR(st.st_mode):
                raise ConflictError(a.path, "mkdir", "something else appeared there on the replica") from None
        except OSError as e:
            raise ItemIOError(a.path, "mkdir", e) from None
        self.current[a.path] = DirEntry(a.path, a.mode, 0)
        self._note_dirs((parent, a.path))

    def stage(self, w: WriteFile, sends: Iterator[bytes]) -> int:
        """Build w.target in a temp file from copy ops and the bytes of `sends` (the send ops'
        data in order, in pieces of any size); verify and make it durable-ready. Returns bytes
        written. On any failure the temp is removed and an ItemError raised."""
        path = w.path
        try:
            check_relpath(path)
        except ValueError as e:
            raise InvalidPathError(path, "write", str(e)) from None
        parent = parent_of(path)
        over = False  # building over a copy made ahead (see precopy)
        if parent in self._in_fresh:  # in a directory not yet in place: build it at its own name
            tmp: Tmp = (parent, path.rsplit("/", 1)[-1])
            old = self.staged.pop(path, None)
            if old:
                self._unlink_tmp(old[0])  # (before: the new build takes the same name)
        else:
            tmp = self._claim_precopy(w, sends) if self._precopies else None
            if tmp is None:
                self._tmp_seq += 1
                tmp = (self._stage_dir(path, w.target.size), f"{TMP_PREFIX}{self._tmp_seq}-{self._tmp_tag}")
            else:
                over = True
        # Until it is in `staged`, the temp is `building`: an interrupt can land anywhere between
        # its creation and its registration (even between open() and the try that would remove
        # it), and close() removes it then. Measured: Ctrl-C during an initial copy left an
        # empty file at its final name in a new directory, which close() then published.
        self.building = tmp
        if w.move and self.backup is None and self._link_moved(w, tmp):
            total = w.target.size
            self._linked[w.ops[0].src] = path  # type: ignore[union-attr]
            self._links.add(path)
        else:
            self._links.discard(path)
            total, digests = self._build(w, tmp, sends, over)
            if w.derive:  # the content check passed: these are the digests of what was sent
                t = w.target  # (constructors, not .replace(): this runs once per file written)
                w = WriteFile(FileEntry(t.path, t.size, t.mode, t.mtime_ns, t.digest, t.avg, t.held_sizes, digests,
                                        t.ino, t.ctime_ns, t.trusted), w.ops, w.expect, w.move, False)
        old = self.staged.pop(path, None)
        if old:
            self._unlink_tmp(old[0])
        self.staged[path] = (tmp, w)
        self.building = None
        return total

    def new_batch_max(self) -> int:
        """How many writes stage_new takes at a time (0: it takes none: no _files build). Kept
        to half the directory fds held open, so no fd of a batch is closed before it is used."""
        return min(NEW_BATCH, self._dirfd_max // 2) if _files is not None else 0

    def may_stage_new(self, w: WriteFile) -> bool:
        """Can stage_new take `w`: a new small file sent whole, in a fresh directory (made by this
        run, not yet in place: nothing else is at its name), not staged."""
        t = w.target
        return (t.size < NEW_MAX and not w.move and len(w.ops) == 1
                and w.ops[0].__class__ is SendOp and parent_of(w.path) in self._in_fresh
                and _NS_MIN <= t.mtime_ns <= _NS_MAX and w.path not in self.staged)

    def stage_new(self, ws: list[WriteFile], source) -> dict[int, bytes | str | None]:
        """stage() for writes that may_stage_new takes, in one call of _files.write_new.
        source(w) gives each file's bytes, or the master file's path (read there, and checked
        against the size, mtime and whole digest, as MasterReader.sends checks it), or None;
        each is written at its own name in its fresh directory. Returns, by id(w), what source
        gave for those it did not stage (their file is absent): the caller stages each with
        stage(), which writes it or raises."""
        items = []
        tmps = []
        mine = []
        left: dict[int, bytes | str | None] = {}
        seen: set[str] = set()
        cm = self._create_modes
        fsenc = os.fsencode
        for w in ws:
            path, t = w.path, w.target
            given = source(w)
            try:
                check_relpath(path)
                parent, name = path.rpartition("/")[::2]
                dfd = self._dirfd(parent)
            except (ValueError, ItemError):
                left[id(w)] = given  # (stage() says why)
                continue
            if given is None or path in seen:
                left[id(w)] = given  # (a path twice: the second replaces the first, as stage() does)
                continue
            seen.add(path)
            mode = t.mode
            plain = mode == mode & cm
            data = given if given.__class__ is bytes else None
            cuts = None
            if w.derive and len(sizes := t.sizes) > 1:  # (one chunk: its digest is the file's)
                cuts = sizes
            items.append((dfd, fsenc(name), None if data is not None else fsenc(given), data, t.size, t.digest,
                          t.mtime_ns, mode if plain else 0o600, -1 if plain else mode, cuts))
            tmps.append((parent, name))
            mine.append((w, given))
        # Until they are in `staged`, the files are `building` (see stage): an interrupt landing
        # after the call leaves none behind, at a final name in a fresh directory.
        self.building_many = tmps
        codes = _files.write_new(items, xxhash.xxh3_128_digest)
        staged = self.staged
        for (w, given), tmp, code in zip(mine, tmps, codes):
            if code.__class__ is int:
                if code:
                    left[id(w)] = given
                    continue
                if w.derive:  # one chunk (code holds the digests of several)
                    code = w.target.digest if w.target.sizes else b""
            if w.derive:  # the content check passed: these are the digests of what was sent (see stage)
                t = w.target
                w = WriteFile(FileEntry(t.path, t.size, t.mode, t.mtime_ns, t.digest, t.avg, t.held_sizes, code,
                                        t.ino, t.ctime_ns, t.trusted), w.ops, w.expect, w.move, False)
            staged[w.path] = (tmp, w)
        self.building_many = ()
        return left

    def _link_moved(self, w: WriteFile, tmp: Tmp) -> bool:
        """Stage a moved file as a hard link to the file it moves from (no byte is copied), when
        that file is still exactly as scanned (stat facts; racy-clean), so its content is the
        target's. False: build it by copying instead. The old name goes with the plan's delete."""
        op, t = w.ops[0], w.target
        e = self.current.get(op.src)  # type: ignore[union-attr]
        if not (isinstance(e, FileEntry) and e.trusted and e.ino and e.size == t.size and e.digest == t.digest
                and e.mode == t.mode and e.mtime_ns == t.mtime_ns):
            return False
        try:
            sdfd, sname = self._at(op.src, "read")  # type: ignore[union-attr]
            st = os.lstat(sname, dir_fd=sdfd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or (
                    st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns) != (e.size, e.mtime_ns, e.ino, e.ctime_ns):
                return False  # changed, or already sharing its inode with another name: copy
            tdfd = self._tmp_dirfd(tmp)
            os.link(sname, tmp[1], src_dir_fd=sdfd, dst_dir_fd=tdfd, follow_symlinks=False)
            lt = os.lstat(tmp[1], dir_fd=tdfd)
            if (lt.st_ino, lt.st_size, lt.st_mtime_ns) != (e.ino, e.size, e.mtime_ns):
                self._unlink_tmp(tmp)  # changed between the check and the link: copy instead
                return False
        except (OSError, ItemError):
            return False
        return True

    def _build(self, w: WriteFile, tmp: Tmp, sends: Iterator[bytes], over: bool = False) -> tuple[int, bytes]:
        """Write w.target into temp `tmp` from its copy ops and `sends`, verified (see stage).
        Returns (bytes written, the chunk digests of the sent bytes when w.derive else b"").
        `over`: `tmp` is a copy made ahead of w's one reuse source, every copy op of w at its
        own offset there (see _claim_precopy): only the sent ranges are written, over it.

        Two ways to verify. When every reuse source is a cache entry the scan trusted (racy-clean,
        inode known), its ranges are copied in the kernel (copy_file_range: no byte through
        Python) and proven by the source's stat facts staying those of the entry from before the
        first copy to after the last, the proof the scan itself uses to skip rereading a file;
        the sent bytes are checked chunk by chunk against the target's digests. Otherwise every
        byte written is hashed and checked against the whole-file digest.

        `sends` from a master in this process may offer the master file itself (apply.DirectSends,
        for a file the master scan trusted): then the sent ranges are copied from it in the
        kernel too, proven the same way by its check(), and no byte is hashed."""
        path = w.path
        if len(w.ops) <= 1 and (not w.ops or w.ops[0].__class__ is SendOp) or getattr(sends, "whole", False) \
                and not over:
            # The whole file is sent, or its bytes are at hand anyway (apply.WholeSends.whole; not
            # over a copy made ahead, which is of 64 MiB or more: never held).
            data = getattr(sends, "take_all", _nothing)() if w.ops else b""
            if data is not None:  # (it is at hand: a small file)
                return self._build_whole(w, tmp, data)
        direct = getattr(sends, "fd", None)
        if direct is not None and (w.derive or _copy_file_range is None or not self._trusted_sources(w)):
            direct = None  # read the bytes it yields (checked by the master reader) instead
        sent_check = None if direct is not None else self._sent_check(w)
        mode = w.target.mode
        plain = mode == mode & self._create_modes and not over  # created with its final mode: no fchmod
        try:
            if over:
                if direct is None and sent_check is None:  # (_claim_precopy saw to it: cannot happen)
                    self._unlink_tmp(tmp)
                    raise ConflictError(path, "write", "internal: a copy made ahead without a check of the sent bytes")
                fd = os.open(tmp[1], os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._tmp_dirfd(tmp))
            else:
                fd = os.open(tmp[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             mode if plain else 0o600, dir_fd=self._tmp_dirfd(tmp))
        except OSError as e:
            if over:
                self._unlink_tmp(tmp)
            raise ItemIOError(path, "write", e) from None
        ok = False
        srcs: dict[str, int] = {}
        cut = _ChunkHasher(w.target.sizes) if w.derive else sent_check[0] if sent_check else None
        try:
            h = None if sent_check or direct is not None else xxhash.xxh3_128()
            pending = b""
            total = 0
            big = w.target.size > KICK_BYTES
            unkicked = 0  # bytes written through Python since writeback was last started

            def write(data: bytes) -> None:
                """Write through Python; a large file's writeback is started every KICK_BYTES."""
                nonlocal unkicked
                _write_all(fd, data)
                unkicked += len(data)
                if big and unkicked >= KICK_BYTES:
                    _kick(fd)
                    unkicked = 0

            for op in w.ops:
                if over and op.__class__ is CopyOp:  # already there: proven by the copy's thread
                    os.lseek(fd, op.size, os.SEEK_CUR)
                    total += op.size
                elif isinstance(op, CopyOp):
                    sfd = srcs.get(op.src)
                    if sfd is None:
                        sfd = srcs[op.src] = self._open_source(w, op.src, h is None)
                    if h is None:
                        if not _copy_range(sfd, fd, op.offset, op.size, big):
                            raise ConflictError(path, "write", f"reuse source {op.src} shrank since it was scanned")
                    else:
                        off, left = op.offset, op.size
                        while left:
                            buf = os.pread(sfd, min(left, COPY_BLOCK), off)
                            if not buf:
                                raise ConflictError(path, "write", f"reuse source {op.src} shrank since it was scanned")
                            h.update(buf)
                            write(buf)
                            off += len(buf)
                            left -= len(buf)
                    total += op.size
                elif direct is not None:
                    if not _copy_range(direct, fd, op.offset, op.size, big):
                        raise SourceChangedError(path, "read", "shrank on the master since it was scanned; "
                                                 "it will be synced next run")
                    total += op.size
                else:
                    left = op.size
                    while left:
                        if not pending:
                            pending = next(sends, b"")
                            if not pending:
                                raise ConflictError(path, "write", "master sent too little data")
                        piece = pending[:left]
                        pending = pending[len(piece):]
                        if h is not None:
                            h.update(piece)
                        if cut is not None:
                            cut.update(piece)
                        write(piece)
                        left -= len(piece)
                    total += op.size
            if direct is not None:
                sends.check()  # type: ignore[attr-defined]
            elif pending or next(sends, b""):
                raise ConflictError(path, "write", "master sent too much data")
            if h is None:
                for src, sfd in srcs.items():
                    self._check_source(w, src, sfd)
            if total != w.target.size or (h is not None and h.digest() != w.target.digest) or (
                    cut is not None and not cut.complete) or (sent_check and cut.digests() != sent_check[1]):
                self._forget_sources(w)
                raise ConflictError(path, "write",
                                    "content check failed (the replica changed during the sync); retry")
            if not plain:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(w.target.mtime_ns, w.target.mtime_ns))
            if total >= BESIDE_MAX:
                _kick(fd)
            ok = True
        except OSError as e:
            raise ItemIOError(path, "write", e) from None
        finally:
            os.close(fd)
            for sfd in srcs.values():
                os.close(sfd)
            if not ok:
                self._unlink_tmp(tmp)
        return total, cut.digests() if w.derive else b""

    def _build_whole(self, w: WriteFile, tmp: Tmp, data: bytes) -> tuple[int, bytes]:
        """_build for a write whose bytes are all in `data` (a small new file: sends.take_all;
        or a small changed one whose bytes the master scan held, apply.MasterReader.local_sends):
        checked against the whole-file digest before anything is created, then written in one
        call; a derived write's chunk digests are cut from `data` at the row's chunk sizes."""
        t = w.target
        if len(data) != t.size or xxhash.xxh3_128_digest(data) != t.digest:
            raise ConflictError(w.path, "write", "content check failed (the replica changed during the sync); retry")
        if not w.derive:
            digests = b""
        elif len(sizes := t.sizes) == 1:  # (sizes unpacked only here: most writes derive nothing)
            digests = t.digest
        else:
            view, pos, out, h = memoryview(data), 0, [], xxhash.xxh3_128_digest
            for n in sizes:
                out.append(h(view[pos:pos + n]))
                pos += n
            digests = b"".join(out)
        mode = t.mode
        plain = mode == mode & self._create_modes  # created with its final mode: no fchmod
        try:
            fd = os.open(tmp[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode if plain else 0o600, dir_fd=self._tmp_dirfd(tmp))
        except OSError as e:
            raise ItemIOError(w.path, "write", e) from None
        ok = False
        try:
            if data:
                _write_all(fd, data)
            if not plain:
                os.fchmod(fd, mode)
            os.utime(fd, ns=(t.mtime_ns, t.mtime_ns))
            ok = True
        except OSError as e:
            raise ItemIOError(w.path, "write", e) from None
        finally:
            os.close(fd)
            if not ok:
                self._unlink_tmp(tmp)
        return len(data), digests

    def _sent_check(self, w: WriteFile) -> "tuple[_ChunkHasher, bytes] | None":
        """For a write that reuses only trusted sources (see _build): a hasher over the chunks
        its send ops cover and the digests they must give. None: hash the whole file instead
        (a derived write, no reuse, an untrusted source, or a send op off the chunk grid)."""
        t, ops = w.target, w.ops
        if len(ops) == 1 and type(ops[0]) is SendOp:  # (a new file's usual plan: decided at once)
            return None
        if w.derive or not t.digests or _copy_file_range is None or not any(isinstance(o, CopyOp) for o in ops) \
                or not self._trusted_sources(w):
            return None
        sizes, digests = [], []
        offsets: list[int] | None = None
        nsizes = t.sizes
        for op in w.ops:
            if isinstance(op, SendOp) and op.size:
                if offsets is None:
                    offsets = list(accumulate(nsizes, initial=0))
                i = bisect.bisect_left(offsets, op.offset)
                j = bisect.bisect_left(offsets, op.offset + op.size)
                if j >= len(offsets) or offsets[i] != op.offset or offsets[j] != op.offset + op.size:
                    return None
                sizes.extend(nsizes[i:j])
                digests.append(t.digests[i << 4:j << 4])
        return _ChunkHasher(tuple(sizes)), b"".join(digests)

    def _trusted_sources(self, w: WriteFile) -> bool:
        """Every reuse source of w is a replica entry the scan trusted, with its inode known."""
        cur = self.current
        for op in w.ops:
            if isinstance(op, CopyOp):
                e = cur.get(op.src)
                if not (isinstance(e, FileEntry) and e.trusted and e.ino):
                    return False
        return True

    def _open_source(self, w: WriteFile, src: str, trusted: bool) -> int:
        """Open reuse source `src` of w for reading; with `trusted`, it must still be its entry."""
        sdfd, sname = self._at(src, "read")
        try:  # O_NONBLOCK: a FIFO swapped in since the scan must not block the open
            sfd = os.open(sname, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sdfd)
        except OSError as e:
            raise ConflictError(w.path, "write", f"reuse source {src} unreadable: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):
                raise ConflictError(w.path, "write", f"reuse source {src} is no longer a regular file")
            if trusted:
                self._check_source(w, src, sfd)
        except BaseException:
            os.close(sfd)
            raise
        return sfd

    def _check_source(self, w: WriteFile, src: str, sfd: int) -> None:
        """A trusted reuse source still has its cache entry's stat facts (so its bytes)."""
        e = self.current.get(src)
        st = os.fstat(sfd)
        if not (isinstance(e, FileEntry) and (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                == (e.size, e.mtime_ns, e.ctime_ns, e.ino)):
            self._forget_sources(w)
            raise ConflictError(w.path, "write", f"reuse source {src} changed on the replica during the sync; retry")

    # -- copies made ahead of the plan ---------------------------------------------
    # A large file edited in place on the master (a disk image, a database) is rewritten on the
    # replica in a temp: the old version copied in the kernel, the changed chunks written over
    # it. That copy needs only the replica's file, so it can run while the master's new version
    # is still being hashed (the two overlap on two cores), instead of after the plan.

    def precopy(self, rel: str, size: int) -> None:
        """Start copying the replica's file `rel` into a temp on a thread of this object's (joined
        by stage's claim, keep_precopies or close), when it is a regular file of `size` bytes
        whose stat facts are older than RACY_NS: the master is about to hash its version, which
        had that size before (the caller's guess that it was edited in place). Nothing is
        changed on the replica but the temp; any failure just means no copy."""
        if (self.readonly or self._helper or self.root_fd < 0 or self.tmp_fd < 0 or _copy_file_range is None
                or size < PRECOPY_MIN or rel in self._precopies or rel in self.staged):
            return
        try:
            dfd, name = self._at(rel, "read")
            sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except (OSError, ItemError):
            return
        fd = -1
        try:
            st = os.fstat(sfd)
            limit = time.time_ns() - RACY_NS  # (a write during the copy then changes the facts)
            if not (stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_ctime_ns < limit
                    and st.st_mtime_ns < limit):
                return
            _load_libc()  # (for _kick, here rather than on the thread)
            self._tmp_seq += 1
            tmp = (None, f"{TMP_PREFIX}{self._tmp_seq}-{self._tmp_tag}")
            fd = os.open(tmp[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.tmp_fd)
            pre = self._precopies[rel] = _Precopy(sfd, fd, tmp, (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                                 st.st_ino))
            sfd = fd = -1  # the thread's now
            pre.thread.start()
        except (OSError, RuntimeError):  # RuntimeError: no thread could be started
            pre = self._precopies.pop(rel, None)
            if pre is not None:
                os.close(pre.fds[0])
                os.close(pre.fds[1])
                self._unlink_tmp(pre.tmp)
        finally:
            if sfd >= 0:
                os.close(sfd)
            if fd >= 0:
                os.close(fd)
                self._unlink_tmp(tmp)

    def keep_precopies(self, actions=()) -> None:
        """Stop and remove the copies made ahead that no write among `actions` may use."""
        if not self._precopies:
            return
        paths = {a.path for a in actions if a.__class__ is WriteFile}
        for rel in [r for r in self._precopies if r not in paths]:
            pre = self._precopies[rel]
            pre.finish(stop=True)  # (still registered meanwhile: an interrupt leaves it to close)
            del self._precopies[rel]
            self._unlink_tmp(pre.tmp)

    def _claim_precopy(self, w: WriteFile, sends) -> Tmp | None:
        """The temp of the copy made ahead for w.path, to build w over (see _build), when that
        copy is whole and of exactly the replica entry the plan reuses (its stat facts the same
        before and after the copy, as the scan found them, trusted), every copy op of w takes
        that entry's bytes at the offset they keep, and the sent bytes are checked chunk by
        chunk (or copied from the master in the kernel). Else None, the copy removed."""
        pre = self._precopies[w.path]
        whole = pre.finish(stop=False)  # (still registered meanwhile: an interrupt leaves it to close)
        del self._precopies[w.path]
        e = self.current.get(w.path)
        t = w.target
        fits = (whole and not w.derive and not w.move and isinstance(e, FileEntry) and e.trusted and e.ino
                and (e.size, e.mtime_ns, e.ctime_ns, e.ino) == pre.facts and t.size == e.size)
        if fits:
            pos, reused = 0, False
            for op in w.ops:
                if op.__class__ is CopyOp:
                    if op.src != w.path or op.offset != pos:
                        fits = False
                        break
                    reused = True
                pos += op.size
            fits = fits and reused and pos == t.size and (
                getattr(sends, "fd", None) is not None or self._sent_check(w) is not None)
        if fits:
            return pre.tmp
        self._unlink_tmp(pre.tmp)
        return None

    def discard(self, path: str) -> None:
        """Forget a staged file (its master changed after staging)."""
        old = self.staged.pop(path, None)
        if old:
            self._links.discard(path)
            self._unlink_tmp(old[0])

    def commit(self, paths: tuple[str, ...]) -> list[tuple[str, ItemError | None]]:
        """Make staged files durable, then rename each over its final name (after re-checking
        that the replica entry there is still what the plan expected)."""
        return self.commit_finish(self.commit_start(paths))

    def commit_start(self, paths: tuple[str, ...]) -> "_Commit":
        """Begin a commit. A batch of more than 8 files is flushed with one syncfs, run on a
        thread (owned here: joined by commit_finish, or by close) so that the caller can stage
        the next files meanwhile; nothing is renamed before commit_finish sees the flush done."""
        todo = [(p, self.staged[p]) for p in paths if p in self.staged]
        c = _Commit(todo)
        links = self._links
        data = [t for t in todo if t[0] not in links] if links else todo  # (a link's data is its source's)
        if len(data) > 8:
            c.flush = threading.Thread(target=c.run_flush, args=(self.root_fd,), name="dirsync-flush", daemon=True)
            self._flushing = c.flush
            self._unflushed = set()  # that syncfs flushes the entries made so far too
            self._unflushed_many = False
            c.flush.start()
            return c
        for _, (tmp, _w) in data:
            try:
                fd = os.open(tmp[1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._tmp_dirfd(tmp))
            except (OSError, ItemError):
                continue  # reported when its rename fails below
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return c

    def commit_finish(self, c: "_Commit") -> list[tuple[str, ItemError | None]]:
        """Rename a started commit's files into place (see commit)."""
        out: list[tuple[str, ItemError | None]] = []
        if c.flush is not None:
            c.flush.join()
            self._flushing = None
            if c.error is not None:  # their data may not be on disk: none goes in place
                self._unflushed_many = True  # (nor is it known what else that flush left undone)
                for p, (tmp, _w) in c.todo:
                    del self.staged[p]
                    self._links.discard(p)
                    self._unlink_tmp(tmp)
                    out.append((p, ItemIOError(p, "commit", c.error)))
                return out
        dirs: set[str] = set()
        # A file written here is trusted (its next scan takes it from the cache unread) when its
        # mtime is clearly older than this moment: whoever changes it after the lstat below
        # stamps a later mtime, so a stale entry cannot match (a stamp in the same tick as the
        # master's mtime is ruled out). Measured from here, not from the session's start: a
        # file edited on the master just before the run (watch mode, a 1 GiB edit) is then
        # not reread on the replica next run because the run's own hashing took a while.
        racy_limit = time.time_ns() - RACY_NS
        links = self._links
        for p, (tmp, w) in c.todo:
            del self.staged[p]
            if links:
                links.discard(p)
            try:
                # (p was checked by stage: a staged path needs no second check_relpath)
                parent = parent_of(p)
                dfd, name = self._dirfd(parent), p.rsplit("/", 1)[-1]
                tdfd = self._tmp_dirfd(tmp)
                err = -1
                if self._in_place(tmp):
                    err = 0  # built at its own name in a fresh directory: in place once that is
                elif w.expect is None and _noreplace:
                    # A new name: one atomic rename that fails if anything appeared there since
                    # the scan (no check-then-rename window, one syscall fewer).
                    err = _rename_noreplace(tdfd, tmp[1], dfd, name)
                    if err == errno.EEXIST:
                        raise ConflictError(p, "commit", "appeared on the replica since it was scanned; left alone")
                if err < 0:  # a replacement, or no RENAME_NOREPLACE here
                    self._check_expect(p, dfd, name, w.expect, "commit")
                    self._retire(p, dfd, name, w.expect)
                    try:
                        os.replace(tmp[1], name, src_dir_fd=tdfd, dst_dir_fd=dfd)
                        err = 0
                    except OSError as e:
                        err = e.errno
                if err:
                    if err != errno.EXDEV or tmp[0] is not None:
                        raise ItemIOError(p, "commit", OSError(err, os.strerror(err))) from None
                    self._check_expect(p, dfd, name, w.expect, "commit")  # (again after a replace: harmless)
                    self._commit_across_devices(p, tmp[1], dfd, name)
                st = os.lstat(name, dir_fd=dfd)
                trusted = w.target.mtime_ns < racy_limit
                t = w.target  # the constructor, not .replace(): this runs once per file written
                self.current[p] = FileEntry(t.path, t.size, t.mode, t.mtime_ns, t.digest, t.avg, t.held_sizes,
                                            t.digests, st.st_ino, st.st_ctime_ns, trusted)
                dirs.add(parent)
                out.append((p, None))
            except ItemError as e:
                self._unlink_tmp(tmp)
                out.append((p, e))
        # The new names become durable with the next batch's syncfs, or at the latest by close
        # (before the cache that records them is saved): one flush a batch instead of two.
        self._note_dirs(dirs)
        return out

    def move_dir(self, a: MoveDir) -> None:
        """Rename directory a.src to a.path (which must be free), with all it holds, and move the
        records of the entries the plan saw there (a.moved). Whatever else it holds (excluded
        entries, anything made there since the scan) goes with it: nothing is removed. The
        rename is atomic: after a crash the directory is under one name or the other."""
        sdfd, sname = self._at(a.src, "move")
        self._check_expect(a.src, sdfd, sname, ("d",), "move")
        cur = self.current
        for x in a.moved[1:]:  # (what it holds must be as scanned: the plan moves it as the master's)
            self._check_moved(a.src + x, cur.get(a.src + x))
        ddfd, dname = self._at(a.path, "move")
        # (Not renameat2's RENAME_NOREPLACE, as publish uses: it needs ctypes, whose import costs
        # ~4 ms, a tenth of a small move's run. An empty directory made there between the check
        # and the rename would be replaced, which loses nothing.)
        err = _rename_checked(sdfd, sname, ddfd, dname)
        if err in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise ConflictError(a.path, "move", "appeared on the replica since it was scanned; left alone")
        if err:
            raise ItemIOError(a.path, "move", OSError(err, os.strerror(err)))
        self._drop_dirfds(a.src)  # (open under the old name: the cache is by path)
        for x in a.moved:
            e = cur.pop(a.src + x, None)
            if e is not None:
                cur[a.path + x] = e.replace(path=a.path + x)
        self._note_dirs((parent_of(a.src), parent_of(a.path)))

    def _check_moved(self, rel: str, e: Entry | None) -> None:
        """Raise ConflictError unless the entry at `rel` is still `e` as scanned: a file with its
        stat facts when the scan trusted it (racy-clean), else with its bytes (read and hashed,
        as a per-file move would have copied them); a link with its target; a directory. (A
        file that shares its inode with a name elsewhere moves with it, as its directory does:
        the sharing is not made by the move.)"""
        dfd, name = self._at(rel, "move")
        try:
            st = os.lstat(name, dir_fd=dfd)
            c = e.__class__
            if c is FileEntry:
                ok = stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns)  # type: ignore[union-attr]
                if ok and e.trusted and e.ino:  # type: ignore[union-attr]
                    ok = (st.st_ino, st.st_ctime_ns) == (e.ino, e.ctime_ns)  # type: ignore[union-attr]
                elif ok:
                    ok = _holds_bytes(dfd, name, e)  # type: ignore[arg-type]
            elif c is LinkEntry:
                ok = stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dfd) == e.target  # type: ignore[union-attr]
            else:
                ok = c is DirEntry and stat.S_ISDIR(st.st_mode)
        except OSError:
            ok = False
        if not ok:
            raise ConflictError(rel, "move", "changed on the replica since it was scanned (or not known as "
                                             "scanned); its directory was left in place")

    def _note_dirs(self, dirs) -> None:
        """Directories (relpaths) that hold new entries not yet flushed (see _flush_entries)."""
        if not self._unflushed_many:
            self._unflushed.update(dirs)
            if len(self._unflushed) > DIR_FSYNC_MAX:
                self._unflushed_many = True
                self._unflushed = set()

    def _flush_entries(self) -> None:
        """Make the entries noted since the last flush durable: one fsync of each directory
        that holds them when they are few, else one syncfs. Measured here: ~1 ms a directory,
        where a syncfs also writes out every other program's dirty data on this file system
        (120 ms with 200 MB of it) before returning. Raises OSError (a write error)."""
        dirs, many = self._unflushed, self._unflushed_many
        if not many:
            try:
                for rel in sorted(dirs):
                    if not fsync_dir_fd(self._dirfd(rel)):
                        many = True  # (a file system that cannot fsync a directory)
                        break
            except ItemError:
                many = True  # (gone or not a directory now: flush all instead)
        if many:
            _syncfs(self.root_fd)
        self._unflushed = set()
        self._unflushed_many = False

    def publish(self) -> list[tuple[str, ItemError]]:
        """Rename the fresh directories (made under temp names by make_dir) into place, after
        everything committed in them is durable (the data since its commit; the entries made
        there are flushed here, see _flush_entries); from now on directories are
        made at their final names. Call it once the files staged in them are committed (or
        discarded): apply_actions does before the first action that is not a MakeDir, a
        WriteFile or a Commit, close() at the latest. Returns the paths that could not be
        put in place (something appeared there since the scan): they are not on the replica.
        A helper writer never publishes: the parent does, once the helper is done."""
        if self._helper:
            return []
        self._published = True
        if not self._fresh:
            return []
        if self._flushing is not None:
            self._flushing.join()
            self._flushing = None
        failed: list[tuple[str, ItemError]] = []
        for p, (tmp, _w) in list(self.staged.items()):  # (a plan commits what it stages first)
            if self._in_place(tmp):
                del self.staged[p]
                self._unlink_tmp(tmp)
                failed.append((p, ItemIOError(p, "commit", "not committed before its directory was put in place")))
        try:
            self._flush_entries()
            flush_error = None
        except OSError as e:  # some of what they hold may not be on disk: none goes in place
            flush_error = e
        fresh, self._fresh = self._fresh, {}
        self._in_fresh.clear()
        for rel, tmp in fresh.items():
            try:
                dfd = self._dirfd(parent_of(rel))
            except ItemError as e:
                failed.append((rel, e))
                continue
            name = rel.rsplit("/", 1)[-1]
            if flush_error is not None:
                _remove_tree(dfd, tmp)
                failed.append((rel, ItemIOError(rel, "commit", flush_error)))
                continue
            if any(is_under(t, rel) for t in self._tainted):
                _remove_tree(dfd, tmp)  # (what it cannot remove stays under the temp name, unseen)
                failed.append((rel, ItemIOError(rel, "commit", "a file that failed in this new directory could "
                                                                "not be removed; the directory was not put in place")))
                continue
            err = _rename_noreplace(dfd, tmp, dfd, name)
            if err < 0:  # no RENAME_NOREPLACE here: check, then rename
                err = _rename_checked(dfd, tmp, dfd, name)
            if err:
                failed += self._merge_fresh(rel, dfd, tmp, name, err)
                self._drop_dirfds(rel)  # (they were the removed temp's)
                self._unflushed_many = True  # (entries moved into a directory found there, at any depth)
            self._note_dirs((parent_of(rel),))
        for rel, _ in failed:
            self._drop_tree(rel)
        self._tainted.clear()
        return failed

    def _merge_fresh(self, rel: str, dfd: int, tmp: str, name: str, err: int) -> list[tuple[str, ItemError]]:
        """A fresh directory whose name was taken since the scan: when a directory took it, move
        our entries into that one without replacing anything (_merge_into); what is left is
        removed and returned as failed."""
        try:
            taken_by_dir = err == errno.EEXIST and stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode)
        except OSError:
            taken_by_dir = False
        failed = self._merge_into(rel, dfd, tmp, dfd, name) if taken_by_dir else [(rel, _appeared(rel))]
        _remove_tree(dfd, tmp)
        return failed

    def _merge_into(self, rel: str, sdfd: int, sname: str, ddfd: int, dname: str) -> list[tuple[str, ItemError]]:
        """Move the entries of directory sname (in sdfd) into directory dname (in ddfd), each by
        a rename that replaces nothing, recursing where both hold a directory of one name.
        Returns the relpaths left behind, as conflicts."""
        failed: list[tuple[str, ItemError]] = []
        try:
            src = os.open(sname, _O_DIR, dir_fd=sdfd)
        except OSError:
            return [(rel, _appeared(rel))]
        try:
            dst = os.open(dname, _O_DIR, dir_fd=ddfd)
        except OSError:
            os.close(src)
            return [(rel, _appeared(rel))]
        try:
            for child in os.listdir(src):
                sub = f"{rel}/{child}"
                err = _rename_noreplace(src, child, dst, child)
                if err == 0:
                    continue
                try:
                    both_dirs = err == errno.EEXIST and stat.S_ISDIR(os.lstat(child, dir_fd=src).st_mode) \
                        and stat.S_ISDIR(os.lstat(child, dir_fd=dst).st_mode)
                except OSError:
                    both_dirs = False
                failed += self._merge_into(sub, src, child, dst, child) if both_dirs else [(sub, _appeared(sub))]
        finally:
            os.close(src)
            os.close(dst)
        return failed

    def _drop_tree(self, rel: str) -> None:
        """Forget `rel` and everything under it (not on the replica after all)."""
        self._drop_dirfds(rel)
        cur = self.current
        for p in [p for p in cur if is_under(p, rel)]:
            del cur[p]

    def _commit_across_devices(self, p: str, tmp: str, dfd: int, name: str) -> None:
        """The target directory is another mount inside the replica: copy beside it, then rename."""
        side = f"{TMP_PREFIX}x{self._tmp_seq}-{self._tmp_tag}"
        try:
            src = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.tmp_fd)  # a temp in .dirsync/tmp
            try:
                dst = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=dfd)
                try:
                    _copy_fd(src, dst, os.fstat(src))
                    os.fsync(dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            os.replace(side, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            try:
                os.unlink(side, dir_fd=dfd)
            except OSError:
                pass
            raise ItemIOError(p, "commit", e) from None
        self._unlink_tmp((None, tmp))

    def make_link(self, a: MakeLink) -> None:
        dfd, name = self._at(a.path, "link")
        self._tmp_seq += 1
        tmp = f"{TMP_PREFIX}{self._tmp_seq}-{self._tmp_tag}"
        try:
            os.symlink(a.target, tmp, dir_fd=self.tmp_fd)
            os.utime(tmp, ns=(a.mtime_ns, a.mtime_ns), dir_fd=self.tmp_fd, follow_symlinks=False)
            self._check_expect(a.path, dfd, name, a.expect, "link")
            self._retire(a.path, dfd, name, a.expect)
            os.replace(tmp, name, src_dir_fd=self.tmp_fd, dst_dir_fd=dfd)
        except OSError as e:
            self._unlink_tmp((None, tmp))
            raise ItemIOError(a.path, "link", e) from None
        except ItemError:
            self._unlink_tmp((None, tmp))
            raise
        self.current[a.path] = LinkEntry(a.path, a.target, a.mtime_ns)
        self._note_dirs((parent_of(a.path),))

    def set_meta(self, a: SetMeta) -> None:
        rel = a.path
        try:
            if a.kind == "d":
                fd = self.root_fd if not rel else None
                if fd is None:
                    dfd, name = self._at(rel, "set metadata")
                    fd = os.open(name, _O_DIR, dir_fd=dfd)
                try:
                    os.fchmod(fd, a.mode)
                    os.utime(fd, ns=(a.mtime_ns, a.mtime_ns))
                finally:
                    if fd != self.root_fd:
                        os.close(fd)
                self.current[rel] = DirEntry(rel, a.mode, a.mtime_ns)
            elif a.kind == "l":
                dfd, name = self._at(rel, "set metadata")
                os.utime(name, ns=(a.mtime_ns, a.mtime_ns), dir_fd=dfd, follow_symlinks=False)
                e = self.current.get(rel)
                if isinstance(e, LinkEntry):
                    self.current[rel] = e.replace(mtime_ns=a.mtime_ns)
            else:
                dfd, name = self._at(rel, "set metadata")
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    st = os.fstat(fd)
                    e = self.current.get(rel)
                    if not (isinstance(e, FileEntry) and stat.S_ISREG(st.st_mode) and st.st_size == e.size
                            and st.st_mtime_ns == e.mtime_ns and st.st_ctime_ns == e.ctime_ns):
                        raise ConflictError(rel, "set metadata", "changed on the replica since it was scanned")
                    racy_limit = time.time_ns() - RACY_NS  # (as in commit_finish)
                    os.fchmod(fd, a.mode)
                    os.utime(fd, ns=(a.mtime_ns, a.mtime_ns))
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                # Content untouched since the scan (ctime matched), so the digest stays valid.
                self.current[rel] = e.replace(mode=a.mode, mtime_ns=a.mtime_ns, ctime_ns=st.st_ctime_ns,
                                            trusted=e.trusted and a.mtime_ns < racy_limit)
        except OSError as e:
            raise ItemIOError(rel, "set metadata", e) from None

    def delete(self, a: Delete) -> str | None:
        """Remove one entry (a directory must be empty by now). Returns a warning instead of
        raising when a directory still holds entries dirsync does not manage (excluded ones)."""
        dfd, name = self._at(a.path, "delete")
        self._check_expect(a.path, dfd, name, a.expect, "delete")
        if a.path in self._linked and (self._unflushed or self._unflushed_many):
            try:  # the file's new name is durable before its old one goes (a crash keeps one)
                self._flush_entries()
            except OSError as e:
                raise ItemIOError(a.path, "delete", e) from None
        try:
            if a.kind == "d":
                self._drop_dirfds(a.path)
                os.rmdir(name, dir_fd=dfd)
            else:
                self._retire(a.path, dfd, name, a.expect)
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass  # retired (moved to a backup) already
        except OSError as e:
            if a.kind == "d" and e.errno == errno.ENOTEMPTY and not a.obstruction:
                self.current.pop(a.path, None)
                return f"kept directory {display_path(a.path)}/ on the replica: it holds excluded entries"
            raise ItemIOError(a.path, "delete", e) from None
        self.current.pop(a.path, None)
        dst = self._linked.pop(a.path, None)
        if dst is not None:
            self._refresh_ctime(dst)  # unlinking the old name moved the shared inode's ctime
        return None

    def _refresh_ctime(self, rel: str) -> None:
        """Record a file's current ctime (its content is unchanged), so the next scan trusts it."""
        e = self.current.get(rel)
        if not isinstance(e, FileEntry):
            return
        try:
            dfd, name = self._at(rel, "stat")
            st = os.lstat(name, dir_fd=dfd)
        except (OSError, ItemError):
            return
        if st.st_ino == e.ino and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
            self.current[rel] = FileEntry(e.path, e.size, e.mode, e.mtime_ns, e.digest, e.avg, e.held_sizes,
                                          e.digests, e.ino, st.st_ctime_ns, e.trusted)

    # -- hooks and helpers -----------------------------------------------------------

    def _retire(self, rel: str, dfd: int, name: str, expect: tuple | None) -> None:
        """Called just before an existing file or link is replaced or deleted (backup hook).

        With --backup-dir, keeps the entry at <backup dir>/<stamp>/<rel> (see BackupOptions);
        raises ItemIOError (and the caller leaves the entry alone) when that fails."""
        if self.backup is None or expect is None or expect[0] not in ("f", "l"):
            return
        try:
            run = self._backup_run_dir()
            target = os.path.join(run, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            n = 0
            while os.path.lexists(target):  # the same path retired twice in one run
                n += 1
                target = os.path.join(run, f"{rel}.~{n}~")
            try:
                os.link(name, target, src_dir_fd=dfd, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                _copy_entry(dfd, name, target)
        except OSError as e:
            raise ItemIOError(rel, "backup", e) from None

    def _place_backup(self, info: OpenInfo) -> None:
        """Resolve the backup dir; remember it (and report it reserved) when it is inside the root."""
        assert self.backup is not None
        d = os.path.join(self.root, os.path.expanduser(self.backup.dir))
        self.backup_dir = os.path.normpath(d)
        real_root, real_dir = os.path.realpath(self.root), os.path.realpath(self.backup_dir)
        if real_dir == real_root:
            raise ConfigError(f"backup dir {self.backup.dir} is the replica root {self.root}",
                              hint="use a subfolder such as .dirsync-backup, or a path outside the replica")
        if real_dir.startswith(real_root.rstrip("/") + "/"):
            self.backup_rel = os.path.relpath(real_dir, real_root)
            info.reserved = (self.backup_rel,)

    def _reserve(self, info: OpenInfo, state: str, *, persist: bool) -> None:
        """Reserved relpaths: this run's backup dir inside the root, plus those of earlier runs
        (recorded in .dirsync/reserved.json) that still exist as directories, so that a later
        sync without --backup-dir never deletes old backups. Removing such a directory by hand
        ends its reservation."""
        rels = set(info.reserved)
        path = os.path.join(state, RESERVED)
        try:
            with open(path, encoding="utf-8") as f:
                import json  # here: only replicas that ever had a backup dir have the file

                stored = json.load(f).get("reserved", [])
        except (OSError, ValueError, AttributeError):
            stored = []
        for rel in stored if isinstance(stored, list) else ():
            try:
                check_relpath(rel)
                if stat.S_ISDIR(os.lstat(os.path.join(self.root, rel)).st_mode):
                    rels.add(rel)
            except (ValueError, TypeError, OSError):
                pass
        self.reserved = info.reserved = tuple(sorted(rels))
        if persist and sorted(stored if isinstance(stored, list) else []) != list(self.reserved):
            import json

            write_atomic(path, json.dumps({"reserved": list(self.reserved)}).encode())

    def _backup_run_dir(self) -> str:
        """<backup dir>/<stamp>, made on first use (a fresh name if another run took it)."""
        if self._backup_run is None:
            assert self.backup is not None
            os.makedirs(self.backup_dir, exist_ok=True)
            stamp = self.backup.stamp or backup_stamp(self.write_start_ns / 1e9)
            # After the newest of this second's folders: a name freed by pruning (say `stamp`,
            # when `stamp-1` and `stamp-2` were kept) would sort as the oldest, and the next
            # prune would delete this run's backups first.
            taken = [n for n in os.listdir(self.backup_dir) if n == stamp or n.startswith(stamp + "-")]
            n = max((int(t[len(stamp) + 1:]) for t in taken if t[len(stamp) + 1:].isdigit()), default=-1) + 1
            while True:
                cand = os.path.join(self.backup_dir, stamp if n == 0 else f"{stamp}-{n}")
                try:
                    os.mkdir(cand)
                    break
                except FileExistsError:
                    n += 1
            self._backup_run = cand
        return self._backup_run

    def _prune_backups(self, keep: int) -> None:
        """Keep only the newest `keep` run folders in the backup dir (best effort)."""
        import re
        import shutil

        try:
            names = [n for n in os.listdir(self.backup_dir) if re.fullmatch(BACKUP_STAMP_RE, n)]
        except OSError:
            return

        def key(n: str) -> tuple[str, int]:  # 2026-11-26T101500Z, then its -1, -2 ... -10
            return n[:17], int(n[19:] or 0)

        for n in sorted(names, key=key)[:-keep]:
            shutil.rmtree(os.path.join(self.backup_dir, n), ignore_errors=True)

    def _forget_sources(self, w: WriteFile) -> None:
        """A reuse source did not hold what its cache entry said: make the next scan reread it."""
        for op in w.ops:
            if isinstance(op, CopyOp):
                e = self.current.get(op.src)
                if isinstance(e, FileEntry):
                    self.current[op.src] = e.replace(trusted=False)

    def _stage_dir(self, path: str, size: int) -> str | None:
        """Where to build `path`: a small file beside its target when the directory exists, a
        large one (or one whose directory is not there yet) in `.dirsync/tmp`.

        Measured here: 20,000 creates took 13 s in one directory and 4 s spread over 200, so
        thousands of small files must not share one staging folder; for large files the
        directory entry is noise and one folder keeps a crash's leftovers easy to see."""
        if size > BESIDE_MAX:
            return None
        parent = parent_of(path)
        try:
            self._dirfd(parent)
        except ItemError:
            return None
        return parent

    def _drop_uncommitted(self) -> None:
        """Remove what was staged and not committed (a commit left unfinished by an interrupt
        included: its flush is waited for, its files are still staged), and the temp of a
        stage() an interrupt cut short (see stage)."""
        if self._flushing is not None:
            self._flushing.join()
            self._flushing = None
        self.keep_precopies(())
        for tmp, _ in self.staged.values():
            self._unlink_tmp(tmp)
        self.staged.clear()
        self._links.clear()
        tmp, self.building = self.building, None
        if tmp is not None:
            self._unlink_tmp(tmp)
        many, self.building_many = self.building_many, ()
        for tmp in many:  # (those it staged went with `staged` above: a second unlink finds nothing)
            self._unlink_tmp(tmp)

    def _in_place(self, tmp: Tmp) -> bool:
        """A file staged at its own name in a fresh directory (see stage): it needs no rename,
        and is seen as soon as that directory is published."""
        return tmp[0] in self._in_fresh and not tmp[1].startswith(TMP_PREFIX)

    def _tmp_dirfd(self, tmp: Tmp) -> int:
        return self.tmp_fd if tmp[0] is None else self._dirfd(tmp[0])

    def _unlink_tmp(self, tmp: Tmp) -> None:
        try:
            os.unlink(tmp[1], dir_fd=self._tmp_dirfd(tmp))
        except FileNotFoundError:
            pass
        except (OSError, ItemError):
            if self._in_place(tmp):
                self._tainted.add(tmp[0])  # it sits at its final name: publish must not show it


def _appeared(rel: str) -> ConflictError:
    return ConflictError(rel, "commit", "appeared on the replica since it was scanned; left alone")


def _remove_tree(dfd: int, name: str) -> None:
    """Remove directory `name` in dfd and everything in it, never following a symlink."""
    import shutil  # here: only a conflict or a crashed run's leftovers need it

    try:
        shutil.rmtree(name, dir_fd=dfd)
    except OSError:
        pass


class _Reserved:
    """An Excluder that also leaves out reserved relpaths (backup dirs inside the replica)."""

    def __init__(self, inner: Excluder, rels: tuple[str, ...]) -> None:
        self.inner = inner
        self.rels = frozenset(rels)

    def excluded(self, relpath: str, is_dir: bool) -> bool:
        return relpath in self.rels or self.inner.excluded(relpath, is_dir)


class _Precopy:
    """A copy of a replica file into a temp, made on a thread (see Replica.precopy). `facts`:
    the source's (size, mtime, ctime, ino) when it was opened; finish() says whether the whole
    file was copied with those facts unchanged at the end (so the copy holds the bytes a scan
    that found those facts describes)."""

    def __init__(self, sfd: int, fd: int, tmp: Tmp, facts: tuple) -> None:
        self.fds = (sfd, fd)
        self.tmp = tmp
        self.facts = facts
        self.stop = False  # set by finish(stop=True): the thread ends after the range at hand
        self.whole = False
        self.thread = threading.Thread(target=self._run, name="dirsync-precopy", daemon=True)

    def _run(self) -> None:
        sfd, fd = self.fds
        size = self.facts[0]
        try:
            off = 0
            while off < size and not self.stop:
                n = _copy_file_range(sfd, fd, min(KICK_BYTES, size - off), off)  # type: ignore[misc]
                if not n:
                    return  # the source shrank
                off += n
                _kick(fd)
            if off == size:
                st = os.fstat(sfd)
                self.whole = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == self.facts
        except OSError:
            pass  # (e.g. a full disk: the plan's build then copies, or reports it)
        finally:
            os.close(sfd)
            os.close(fd)

    def finish(self, stop: bool) -> bool:
        """Wait for the thread (asking it to stop first when `stop`); True when the copy is whole."""
        self.stop = stop
        if self.thread.ident is not None:  # (None: an interrupt came between registering and starting it)
            self.thread.join()
        return self.whole and not stop


class _ChunkHasher:
    """xxh3-128 of each chunk of a stream of bytes cut at the given chunk sizes. Bytes past
    the last chunk make it incomplete (the writer then fails the content check)."""

    __slots__ = ("_sizes", "_i", "_left", "_h", "_out", "_over")

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self._sizes, self._i, self._out, self._over = sizes, 0, [], False
        self._left = sizes[0] if sizes else 0
        self._h = xxhash.xxh3_128()

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._i >= len(self._sizes):
                self._over = True
                return
            n = min(len(view), self._left)
            self._h.update(view[:n])
            view = view[n:]
            self._left -= n
            if not self._left:
                self._out.append(self._h.digest())
                self._h.reset()
                self._i += 1
                self._left = self._sizes[self._i] if self._i < len(self._sizes) else 0

    @property
    def complete(self) -> bool:
        return self._i == len(self._sizes) and not self._over

    def digests(self) -> bytes:
        return b"".join(self._out)


def _copy_entry(dfd: int, name: str, target: str) -> None:
    """Copy one file or symlink (mode and mtime kept) when a hard link is impossible."""
    st = os.lstat(name, dir_fd=dfd)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=dfd), target)
        os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _copy_fd(src, dst, st)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_fd(src: int, dst: int, st: os.stat_result) -> None:
    """Copy all of src into dst, then give dst the mode and mtime of `st`."""
    while True:
        buf = os.read(src, COPY_BLOCK)
        if not buf:
            break
        _write_all(dst, buf)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_mtime_ns, st.st_mtime_ns))


def _nothing() -> None:
    return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_copy_file_range = getattr(os, "copy_file_range", None)
_NO_CFR = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}


def _copy_range(sfd: int, fd: int, off: int, size: int, kick: bool = False) -> bool:
    """Append `size` bytes of `sfd` at `off` to `fd` (at its file position), in the kernel when
    the file system allows (on ext4 the pages are copied without passing through Python).
    `kick`: start writeback every KICK_BYTES. False: `sfd` ended first."""
    global _copy_file_range
    since = 0
    while size:
        n = 0
        if _copy_file_range is not None:
            try:
                n = _copy_file_range(sfd, fd, min(size, KICK_BYTES) if kick else size, off)
            except OSError as e:
                if e.errno not in _NO_CFR:
                    raise
                if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                    _copy_file_range = None  # (not this kernel: stop asking)
        if not n:  # not copied in the kernel (or at the end of the source): read and write
            buf = os.pread(sfd, min(size, COPY_BLOCK), off)
            if not buf:
                return False
            n = len(buf)
            _write_all(fd, buf)
        off += n
        size -= n
        since += n
        if kick and since >= KICK_BYTES:
            _kick(fd)
            since = 0
    return True
