"""The file system the benchmark writes on.

On this kind of machine the work dir's file system (ext4 on a virtio disk mounted
with ``discard``) pays a synchronous discard for every freed extent: deleting
10,000 small files took 29 s (2-3 ms per file), and creating files soon after a
mass delete is 3-16x slower for minutes.  A benchmark that makes and throws away
millions of files could not clean up after itself in bounded time there.

So by default (``--fs auto`` as root) the bench makes its own ext4 file system
(no journal, like /tmp here, but no online discard) in a sparse image file in the
work dir, attached with a direct-I/O loop device (no second page cache on the
host side) and mounted at WORK/mnt.  Both tools run on it; deletes inside cost
~0.1 ms per file, and at the end the image is one large file to remove.
``--fs direct`` writes on the work dir itself (then old replicas are only moved
aside during the run and the trash is deleted at the end, which can take minutes).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

GiB = 1 << 30


class FsError(RuntimeError):
    pass


def _run(argv: list[str], timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise FsError(f"{' '.join(argv)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip()


def mount_source(mountpoint: str) -> str | None:
    mp = os.path.realpath(mountpoint)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt = line.split()[:2]
                if mnt == mp:
                    return dev
    except OSError:
        pass
    return None


def loop_possible() -> str:
    """'' if a loop file system can be made here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}") and not os.path.exists(f"/sbin/{tool}"):
            return f"{tool} not found"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    return ""


class LoopFs:
    def __init__(self, work: str):
        self.image = os.path.join(work, "fs.img")
        self.mountpoint = os.path.join(work, "mnt")
        self.device: str | None = None
        self.direct_io = False

    def teardown_stale(self) -> None:
        """Undo a previous run that died before unmounting."""
        dev = mount_source(self.mountpoint)
        if dev:
            _run(["umount", self.mountpoint])
        try:
            out = _run(["losetup", "-j", self.image])
        except FsError:
            out = ""
        for line in out.splitlines():
            stale = line.split(":", 1)[0]
            if stale.startswith("/dev/loop"):
                subprocess.run(["losetup", "-d", stale], capture_output=True)

    def setup(self, reuse: bool, size: int) -> bool:
        """Attach and mount the image (made fresh unless ``reuse`` and one exists).
        Returns True if an existing image (kept data) was mounted."""
        self.teardown_stale()
        os.makedirs(self.mountpoint, exist_ok=True)
        reused = reuse and os.path.exists(self.image)
        if not reused:
            if os.path.exists(self.image):
                os.unlink(self.image)
            with open(self.image, "wb") as f:
                f.truncate(size)  # sparse: only written blocks take space on the host
            # Like the host's /tmp (ext4, no journal); nodiscard: never issue discards.
            _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "nodiscard", "-m", "0",
                  "-L", "dsbench", self.image], timeout=600)
        try:
            self.device = _run(["losetup", "--find", "--show", "--direct-io=on", "--sector-size", "4096",
                                self.image])
            self.direct_io = True
        except FsError:
            self.device = _run(["losetup", "--find", "--show", self.image])
            self.direct_io = False
        try:
            _run(["mount", "-t", "ext4", "-o", "nodiscard,relatime", self.device, self.mountpoint])
        except FsError:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)
            self.device = None
            raise
        return reused

    def teardown(self, delete_image: bool) -> None:
        if self.device or mount_source(self.mountpoint):
            os.sync()
            if not delete_image:
                # A kept image holds only the data: one batched discard hands the blocks of
                # deleted replicas back to the host (the loop device punches holes in the
                # sparse image). Without it a kept image grew to 68 GB over a few runs and
                # left the shared disk too full for the test suite.
                subprocess.run(["fstrim", self.mountpoint], capture_output=True, timeout=600)
            for _ in range(3):
                r = subprocess.run(["umount", self.mountpoint], capture_output=True, text=True)
                if r.returncode == 0 or not mount_source(self.mountpoint):
                    break
                subprocess.run(["sleep", "1"])
            else:
                raise FsError(f"could not unmount {self.mountpoint}: {r.stderr.strip()}")
        if self.device:
            subprocess.run(["losetup", "-d", self.device], capture_output=True)
            self.device = None
        if delete_image and os.path.exists(self.image):
            os.unlink(self.image)
        try:
            os.rmdir(self.mountpoint)
        except OSError:
            pass


@functools.lru_cache(maxsize=None)
def bench_python(work: str) -> str:
    """A Python for the timed dirsync runs that imports as a regular `pip install` does: this
    virtualenv's packages on its path through a plain path line, without the editable-install
    hook that `pip install -e` (make venv) puts in site-packages. That hook's finder imports
    pathlib and more when the interpreter starts (~30 ms per dirsync process here, the agent's
    included), which no installed dirsync pays. dirsync itself comes from PYTHONPATH (the
    checkout). Falls back to this interpreter when a virtualenv cannot be made."""
    import sysconfig
    import venv

    home = os.path.join(work, "pyenv")
    py = os.path.join(home, "bin", "python")
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    try:
        if not os.path.exists(py):
            venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(home)
        out = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        with open(os.path.join(out, "dirsync-bench-deps.pth"), "w") as f:
            f.write("\n".join(paths) + "\n")
    except (OSError, subprocess.SubprocessError):
        return sys.executable
    return py


def python_env(env: dict, repo: str) -> dict:
    """The environment to time `python -m dirsync` in, as a pip-installed dirsync runs: its
    modules compiled once (pip compiles them at install time), never recompiled per run.
    PYTHONDONTWRITEBYTECODE in the caller's environment would make every timed run compile
    all of dirsync from source again (~0.1 s per run on this machine)."""
    import compileall

    compileall.compile_dir(os.path.join(repo, "dirsync"), quiet=1)
    env = dict(env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env
