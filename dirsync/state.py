"""On-disk state outside the trees: where caches and locks live, atomic writes, flock locks.

Master side: $XDG_STATE_HOME/dirsync (default ~/.local/state/dirsync):
  masters/<hash of master path>.manifest   master manifest cache
  locks/<hash of master+replica>.lock      one run at a time per master/replica pair
Replica side: the `.dirsync/` folder at the replica root (see replica.py).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import time

from dirsync.errors import LockedError
from dirsync.manifest import Manifest, ManifestFormatError, SavedManifest, fingerprint, load, to_pieces
from dirsync.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only (annotations are never evaluated): no import at start-up
    from typing import Callable


try:  # the built-in SHA-256: hashlib would load OpenSSL (~5 ms) for these few short keys
    from _sha256 import sha256 as _sha256
except ImportError:  # Python builds without it, and 3.12+ (_sha2)
    from hashlib import sha256 as _sha256


def state_home() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "dirsync")


def _key(*parts: str) -> str:
    return _sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def master_cache_path(master_root: str) -> str:
    return os.path.join(state_home(), "masters", _key(master_root) + ".manifest")


def pair_lock_path(master_root: str, replica_spec: str) -> str:
    return os.path.join(state_home(), "locks", _key(master_root, replica_spec) + ".lock")


class CacheLoad(Record):
    _fields = ("saved", "status", "reason")

    def __init__(
        self,
        saved: SavedManifest | None,
        status: str,  # "ok" | "missing" | "unusable"
        reason: str = "",
    ) -> None:
        self.saved = saved
        self.status = status
        self.reason = reason

    @property
    def manifest(self) -> Manifest | None:
        return None if self.saved is None else self.saved.manifest


def load_manifest_file(path: str, chunker: str, *, lazy: bool = False) -> CacheLoad:
    """Read a manifest cache; a missing file is "missing", anything unreadable is "unusable".
    `lazy`: check only framing, checksum and header now; the rows decode on first use."""
    try:
        with open(path, "rb") as f:
            data = map_or_read(f)
    except FileNotFoundError:
        return CacheLoad(None, "missing")
    except OSError as e:
        return CacheLoad(None, "unusable", e.strerror or str(e))
    try:
        saved = load(data, chunker, own=True)
        if not lazy:
            saved.manifest
        return CacheLoad(saved, "ok")
    except (ManifestFormatError, ValueError) as e:
        return CacheLoad(None, "unusable", str(e))


MAP_MIN = 64 << 10  # smaller files are simply read


def map_or_read(f) -> bytes | mmap.mmap:
    """The whole file, mapped when it is large. A cache is megabytes, and read() into a fresh
    process's heap costs a zero-filled page fault per 4 KiB before the copy: reading two
    5.5 MB caches took ~12 ms of a 0.2 s no-op here, mapping them (page-cache pages, mapped
    a block at a time) ~2 ms. A no-op whose walk matches the fingerprint then touches
    little more than the header and the checksum's single pass. Caches are only ever replaced
    by rename (write_atomic), never rewritten in place, so the mapped file does not change
    under the mapping."""
    size = os.fstat(f.fileno()).st_size
    if size < MAP_MIN:
        return f.read()
    try:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    except (OSError, ValueError):  # a file system that cannot map: read it
        return f.read()


def save_manifest_file(path: str, m: Manifest, chunker: str, fp: bytes | None = None,
                       durable: bool = True) -> None:
    """Save `m`; `fp` is its tree fingerprint when the caller knows it (else it is computed).
    `durable`: see write_atomic."""
    write_atomic(path, to_pieces(m, chunker, fingerprint(m.entries) if fp is None else fp, packed=True), durable)


class PendingSave:
    """A save_manifest_file running in a forked child (save_manifest_file_forked)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self) -> str | None:
        """Reap the child: None when the file was saved, else why not."""
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return "the saving process vanished"
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            return None
        return f"killed by signal {-code}" if code < 0 else os.strerror(code) if code < 254 else "it failed"


def fork_child(work: Callable[[], int], threads_ok: bool = False) -> int | None:
    """Run work() in a forked child, which leaves with its return value as exit status (255 on
    an exception) and without any of this process's cleanup (os._exit). Returns the child's
    pid, or None when forking is not safe here (another thread runs: a lock it holds would stay
    held in the child) or fails: the caller then does the work itself. `threads_ok`: the
    caller vouches that work() takes no lock another thread may hold (it only makes syscalls
    and plain Python objects), so other threads do not rule the fork out."""
    import threading

    if threading.active_count() != 1 and not threads_ok or not hasattr(os, "fork"):
        return None
    try:
        if threading.active_count() != 1:
            import warnings

            with warnings.catch_warnings():  # (Python 3.12 warns of forking with threads: vouched for)
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        else:
            pid = os.fork()
    except OSError:
        return None
    if pid == 0:
        code = 255
        try:
            code = work()
        finally:
            os._exit(code)
    return pid


def fork_answering(work: Callable[[int], object], threads_ok: bool = False) -> tuple[int, int] | None:
    """fork_child for work that answers through a pipe: work(fd) runs in the child and writes
    its answer to fd. Returns (pid, the fd to read the answer from until EOF; the caller closes
    it and reaps the pid), or None when no child was forked (the caller does the work itself)."""
    r, w = os.pipe()

    def child() -> int:
        os.close(r)
        work(w)
        return 0

    pid = fork_child(child, threads_ok)
    os.close(w)
    if pid is None:
        os.close(r)
        return None
    return pid, r


def save_manifest_file_forked(path: str, m: Manifest, chunker: str, fp: bytes | None = None) -> PendingSave | None:
    """save_manifest_file in a forked child (fork_child), so that encoding, writing and fsync
    overlap what the caller does next (a cache is megabytes); None when it cannot fork: save it
    yourself. The child writes only this file (atomically, as ever)."""

    def save() -> int:
        try:
            save_manifest_file(path, m, chunker, fp)
        except OSError as e:
            return e.errno if e.errno and 0 < e.errno < 254 else 254
        return 0

    pid = fork_child(save)
    return PendingSave(pid) if pid is not None else None


def write_atomic(path: str, data: bytes | list, durable: bool = True) -> None:
    """Temp file + fsync + rename + directory fsync: the file is either old or new, never torn.
    `data`: the bytes, or pieces of them (bytes-like) written in order without joining them.
    `durable=False` skips both fsyncs, for a file whose loss or damage in a crash costs only
    work (checksummed, and checked against what it describes before anything relies on it):
    it may then be old, new, or unreadable after a crash, but is never half of each."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_pieces(fd, [data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a full disk must not leave a half-written temp behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(d)


_IOV_MAX = 1024  # Linux's limit on the pieces of one writev


def write_pieces(fd: int, pieces: list) -> None:
    """Write the pieces to fd in order, with writev calls of up to _IOV_MAX pieces, going on
    after a short write (a full disk raises, as os.write does)."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    i = 0
    while i < len(views):
        batch = views[i:i + _IOV_MAX]
        n = os.writev(fd, batch)
        for v in batch:
            if n < len(v):
                views[i] = v[n:]  # a short write: the rest of this piece goes next
                break
            n -= len(v)
            i += 1


def fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not fsync_dir_fd(fd):
            os.sync()
    finally:
        os.close(fd)


def fsync_dir_fd(fd: int) -> bool:
    """fsync a directory; False where the file system cannot (some network and FUSE ones
    answer EINVAL): the caller flushes some other way. Other errors are raised."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            return False
        raise
    return True


class FileLock:
    """An exclusive flock held on a file; the kernel drops it if the process dies (even kill -9)."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self.fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> "FileLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    who = f" by pid {holder}" if holder else ""
                    raise LockedError(f"{self.what} is locked{who}: another dirsync run is using it",
                                      hint="wait for it to finish, or pass --wait SECONDS")
                time.sleep(0.05)
        try:  # the pid is only for "locked by pid N" messages: a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)  # closing alone would not while a forked child holds a copy
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def forget(self) -> None:
        """Close this process's descriptor without unlocking: a forked child holding a copy
        keeps the lock (and releases it); once no copy is open, the kernel drops it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
