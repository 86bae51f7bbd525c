"""Files that hold secrets: read only when private, written atomically and private.

A config, password file or docker config.json that group or others may access (or that
another non-root user owns) is refused, not just warned about: whoever can change it
decides which credentials the kubelet pulls with, and whoever can read it has them.
Checks run on the opened descriptor (fstat), so the file checked is the file read.
"""

from __future__ import annotations

import os
import stat

from credprovider.errors import ProviderError


def _check_private(info: os.stat_result, path: str, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ProviderError(f"{what} {path} is not a regular file")
    if info.st_mode & 0o077:
        mode = stat.S_IMODE(info.st_mode)
        raise ProviderError(
            f"{what} {path} is accessible by group or others (mode {mode:04o}); "
            "refusing it: chmod 600 it"
        )
    if info.st_uid not in (0, os.geteuid()):
        raise ProviderError(f"{what} {path} is owned by uid {info.st_uid}, not by root or us")


def read_private(path: str, what: str) -> bytes:
    """The bytes of a file only its owner (root or us) can access; ProviderError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ProviderError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise ProviderError(f"cannot open {what} {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        _check_private(info, path, what)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as error:
        raise ProviderError(f"cannot read {what} {path}: {error.strerror}") from None
    finally:
        os.close(fd)


def read_secret(path: str, what: str) -> str:
    """A password or token file's text, without the newline editors add."""
    try:
        text = read_private(path, what).decode("utf-8")
    except UnicodeDecodeError:
        raise ProviderError(f"{what} {path} is not UTF-8") from None
    return text.removesuffix("\n").removesuffix("\r")


def private_dir(path: str) -> str:
    """Create (0700) or check a directory for cached secrets; return its path."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise ProviderError(f"cannot create cache directory {path}: {error.strerror}") from None
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o077 or info.st_uid != os.geteuid():
        raise ProviderError(f"cache directory {path} must be a directory of ours with mode 0700")
    return path


def write_private(path: str, data: bytes) -> None:
    """Replace `path` atomically with a 0600 file: readers see the old or the new whole."""
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
