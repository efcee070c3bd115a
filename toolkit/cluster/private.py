"""Private folders for pickled jobs: created 0700, and an existing one used only if no one else could have written it.

submitit's log folders and the pipeline's ``.pipeline/`` hold pickles that a job unpickles, i.e. runs as code. A
folder that another user owns, or that its group or anyone may write, could hold a pickle planted there, so it is
refused (naming it and why) rather than used; a new one is made ``0700`` whatever the umask. A symlink in its place
is refused too: it could lead anywhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeFolder(FileExistsError):
    """A pre-existing folder (or file) that others could have written; the message names it and says why."""


def check_private(path: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsafeFolder` unless ``path`` (a folder or a file, not a symlink) belongs to this user and
    neither its group nor others may write it."""
    path = Path(path)
    info = path.lstat()
    why = None
    if stat.S_ISLNK(info.st_mode):
        why = "is a symbolic link"
    elif info.st_uid != os.geteuid():
        why = f"belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"may be written by its group or by others (mode {stat.S_IMODE(info.st_mode):04o})"
    if why:
        raise UnsafeFolder(f"{path}: {why}; it holds pickled jobs, which run as code, so it is not used "
                           "(remove it, or `chmod go-w` it if it is yours)")


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder only this user can write: made ``0700`` (its parents as usual) when missing, otherwise
    checked with :func:`check_private`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        check_private(path)
        if not path.is_dir():
            raise UnsafeFolder(f"{path}: exists and is not a folder") from None
    else:
        os.chmod(path, 0o700)  # the umask may take owner bits from mkdir's mode too (e.g. 0277)
    return path
