"""The driver's own files and directories: readable by the daemon's user only.

The pool image holds every volume's data and the state file names every volume,
so both are 0600 and the directories the driver keeps them in 0700: a local user
must not read a volume's files out of pool.img. Directories and files the driver
finds already there are tightened to those modes; one that is a symlink, not of
the expected kind, or owned by another user is refused, since its owner could
loosen it again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

from csi.errors import SetupError

log = logging.getLogger(__name__)

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


class UnsafeFileError(SetupError):
    """A path the driver keeps private is of the wrong kind or someone else's."""


def _tighten(path: Path, mode: int, directory: bool) -> None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    what = "directory" if directory else "regular file"
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno in {errno.ELOOP, errno.ENOTDIR}:
            raise UnsafeFileError(f"{path} is not a {what} (a symlink?): remove it") from None
        raise
    try:
        found = os.fstat(descriptor)
        kind = stat.S_IFDIR if directory else stat.S_IFREG
        if stat.S_IFMT(found.st_mode) != kind:
            raise UnsafeFileError(f"{path} is not a {what}: remove it")
        if found.st_uid != os.geteuid():
            raise UnsafeFileError(
                f"{path} belongs to uid {found.st_uid}, not to the daemon's user: chown it "
                "or choose another path"
            )
        if stat.S_IMODE(found.st_mode) & ~mode:
            os.fchmod(descriptor, mode)
            log.warning(
                "tightened the mode of a private path",
                extra={
                    "path": str(path),
                    "from": oct(stat.S_IMODE(found.st_mode)),
                    "to": oct(mode),
                },
            )
    finally:
        os.close(descriptor)


def private_directory(path: Path) -> None:
    """Make path a directory of mode 0700 (created, with missing parents, or tightened)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=DIRECTORY_MODE)
    _tighten(path, DIRECTORY_MODE, directory=True)


def private_file(path: Path) -> None:
    """Make an existing file mode 0600 (tightened if looser)."""
    _tighten(path, FILE_MODE, directory=False)
