"""Atomic file writes: write to a temporary sibling, fsync, then rename over the final name.

Every artefact the toolkit leaves behind (store shards, manifests, PNGs, checkpoints, pointers) goes through here, so a
reader never sees a torn file: a path either does not exist or holds complete content. Files get the mode a plain
``open()`` would give them (0666 minus the umask), not ``mkstemp``'s private 0600, so a research group shares its stores
and checkpoints as its umask says. A failing disk (full, over quota, I/O error) becomes one :class:`DiskError` naming
the file; the temporary file is removed, and the final one is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


class DiskError(OSError):
    """Writing a file failed for a reason of the disk (full, quota, read-only, I/O); the message names the file."""


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, racing with writer threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_error(path: Path, err: OSError) -> OSError:
    """``err`` as a :class:`DiskError` naming ``path`` when the disk is at fault, else ``err`` itself."""
    if err.errno in _DISK_ERRORS and not isinstance(err, DiskError):
        return DiskError(err.errno, f"{path}: cannot write: {os.strerror(err.errno)}")
    return err


@contextlib.contextmanager
def naming_disk_errors(path: Path) -> Iterator[None]:
    """Re-raise an OSError of the disk inside the block as a :class:`DiskError` naming ``path``."""
    try:
        yield
    except OSError as err:
        converted = _disk_error(path, err)
        if converted is err:
            raise
        raise converted from err


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(root: Path, names: Iterable[str] | None = None) -> int:
    """Delete temporary files that a killed writer left under ``root``; returns how many were removed.

    Only names of the form ``.<final name>.<random>.tmp``, as :func:`atomic_path` makes them, are touched. With
    ``names``, only the temporary files of those final names directly in ``root`` (for a writer that shares its folder
    with other writers, whose temporary files are not its to remove).
    """
    removed = 0
    paths = Path(root).rglob(".*.tmp") if names is None else (
        path for name in names for path in Path(root).glob(f".{glob.escape(name)}.*.tmp"))
    for path in paths:
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``.

    The caller writes the temporary file by any means (h5py, torch.save, …). On an exception the temporary file is
    removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with naming_disk_errors(final):  # no inode left, a read-only or failing disk
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming_disk_errors(final):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file for writing that appears under ``path`` only once it is complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        yield handle


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_open(path) as handle:
        handle.write(data)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
