"""One writer per folder: an exclusive POSIX lock on ``FOLDER/.lock``, held for the writer's lifetime.

Every process that writes a run directory, a store, a sweep or a pipeline folder holds :class:`WriterLock` on it. A
second writer fails at once with :class:`LockedError`, one line naming the holder (host, pid, SLURM job id, since
when), and touches nothing. The locks are ``fcntl`` record locks: NFSv4 (and NFSv3 with lockd, Lustre with
``flock``/``localflock``) honours them across nodes, and the kernel (or the NFS server's lease) releases them when the
holding process dies, so a killed or crashed writer leaves nothing to clean up. The lock file itself stays; its
content (the holder's identity, JSON) is informative only: whether a folder is locked is decided by the lock alone.

POSIX record locks belong to a process, and closing *any* descriptor of the file releases them, so this module keeps
a registry of the locks this process holds: a second :class:`WriterLock` on a held folder in the same process is
refused (as from another process), and :func:`holder` answers from the registry rather than opening the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import time
from pathlib import Path
from types import TracebackType
from typing import Any

LOCK = ".lock"

_held: dict[tuple[int, int], WriterLock] = {}  # (st_dev, st_ino) of the lock file → the lock this process holds


class LockedError(RuntimeError):
    """Another writer holds the folder; the message names it."""


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe(info: dict[str, Any] | None) -> str:
    """``host H pid P (SLURM job J) since T`` for a holder record."""
    if not info:
        return "another process (no holder record yet)"
    job = f" (SLURM job {info['slurm_job_id']})" if info.get("slurm_job_id") else ""
    return f"host {info.get('host', '?')} pid {info.get('pid', '?')}{job} since {info.get('since', '?')}"


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode()) if data else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class WriterLock:
    """The exclusive lock on one folder (created if missing); use as a context manager or acquire/release."""

    def __init__(self, folder: str | os.PathLike[str], what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None
        self._key: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WriterLock:
        """Take the lock now or raise :class:`LockedError` naming the holder."""
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        own = _own(path)
        if own is not None:  # checked before opening: closing a second descriptor would release our own lock
            raise LockedError(f"{self.folder}: this {self.what} is already being written by this process "
                              f"({describe(own.info())})")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            info = _read_info(fd)
            os.close(fd)
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise LockedError(f"{self.folder}: this {self.what} is being written by {describe(info)}; "
                              "refusing to write it too") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_identity()) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self._key = fd, key
        _held[key] = self
        return self

    def info(self) -> dict[str, Any] | None:
        """The holder record this lock wrote (only while held)."""
        return _read_info(self._fd) if self._fd is not None else None

    def release(self) -> None:
        """Give the lock up (the lock file stays: unlinking it would let two writers lock two different files)."""
        if self._fd is None:
            return
        _held.pop(self._key, None)  # type: ignore[arg-type]
        fd, self._fd, self._key = self._fd, None, None
        os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _own(path: Path) -> WriterLock | None:
    """The lock this process holds on the lock file ``path``, if any."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _held.get((stat.st_dev, stat.st_ino))


# struct flock on Linux (x86-64 and aarch64): l_type, l_whence (short), l_start, l_len (off_t), l_pid (int)
_FLOCK = "hhqqi4x"


def holder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of the process that holds ``folder``'s lock, or None when nobody does.

    Asks the kernel (``F_GETLK``) without taking the lock, so a writer starting at the same moment is never turned away
    by someone who only looked.
    """
    path = Path(folder) / LOCK
    own = _own(path)
    if own is not None:
        return own.info() or _identity()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, *_ = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
        if l_type == fcntl.F_UNLCK:
            return None
        return _read_info(fd) or {}
    finally:
        os.close(fd)
