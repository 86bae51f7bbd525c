"""Request paths opened without following symlinks, and mounts made through descriptors.

A path that is checked and then used by name can be swapped in between: a symlink
put in place of a directory after the check makes mkdir and `mount --bind` act
outside the kubelet's directory. Everything here works on file descriptors
instead, as runc and Kubernetes' mount-utils do:

- a request path is resolved beneath its root with openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS), to an O_PATH descriptor: a symlink anywhere on the way,
  the last component included, is refused, and so is any way out of the root;
- the last component is created relative to its verified parent's descriptor;
- a bind mount is made with the new mount API: open_tree clones the source into a
  detached mount, mount_setattr makes it read-only (and applies the other
  per-mount flags) before anyone can see it, and move_mount attaches it onto the
  opened target. A detached mount that is never attached goes away when its
  descriptor is closed, so a failure leaves nothing mounted;
- unmounts and removals name the path through the parent's descriptor
  (/proc/self/fd/N/<name>, UMOUNT_NOFOLLOW), so no component can be swapped.

This needs Linux 5.12 (mount_setattr; openat2 is 5.6, open_tree and move_mount
5.2). The calls are synchronous and quick, but they take kernel locks: callers run
them in a thread (asyncio.to_thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from csi.errors import InvalidArgumentError

# System call numbers: the same on every architecture for calls added since Linux 5.1.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

_OPEN_TREE_CLONE = 0x1
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8

_ATTR_RDONLY = 0x1
_ATTR_NOSUID = 0x2
_ATTR_NODEV = 0x4
_ATTR_NOEXEC = 0x8
_ATTR_ATIME_MASK = 0x70
_ATTR_RELATIME = 0x0
_ATTR_NOATIME = 0x10
_ATTR_STRICTATIME = 0x20
_ATTR_NODIRATIME = 0x80
_ATTR_NOSYMFOLLOW = 0x200000

# Mount options a bind mount can carry (per-mount flags): name -> (set, clear).
# "rw" and "bind" say what a publication is anyway; "ro" makes it read-only.
_FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "bind": (0, 0),
    "rw": (0, 0),
    "ro": (_ATTR_RDONLY, 0),
    "nosuid": (_ATTR_NOSUID, 0),
    "suid": (0, _ATTR_NOSUID),
    "nodev": (_ATTR_NODEV, 0),
    "dev": (0, _ATTR_NODEV),
    "noexec": (_ATTR_NOEXEC, 0),
    "exec": (0, _ATTR_NOEXEC),
    "nodiratime": (_ATTR_NODIRATIME, 0),
    "diratime": (0, _ATTR_NODIRATIME),
    "nosymfollow": (_ATTR_NOSYMFOLLOW, 0),
    "symfollow": (0, _ATTR_NOSYMFOLLOW),
}
# One of these at most takes effect (the last): the kernel sets atime as one value.
_ATIME_OPTIONS = {
    "noatime": _ATTR_NOATIME,
    "relatime": _ATTR_RELATIME,
    "strictatime": _ATTR_STRICTATIME,
}
MOUNT_OPTIONS = frozenset(_FLAG_OPTIONS) | frozenset(_ATIME_OPTIONS)

_libc = ctypes.CDLL(None, use_errno=True)


class PathError(InvalidArgumentError):
    """A request path that leaves its root, goes through a symlink, or cannot be used."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result


def _syscall(number: int, *arguments: object) -> int:
    return _check(_libc.syscall(ctypes.c_long(number), *arguments))


@contextlib.contextmanager
def _closing(descriptor: int) -> Iterator[int]:
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _relative(root: Path, path: Path) -> str:
    relative = path.relative_to(root)
    if relative == Path():
        raise PathError(f"{path} is its root itself")
    return str(relative)


def _open_beneath(directory: int, relative: str, flags: int, shown: Path) -> int:
    how = _OpenHow(
        flags=flags | os.O_CLOEXEC,
        mode=0,
        resolve=_RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
    )
    try:
        return _syscall(
            _SYS_OPENAT2,
            ctypes.c_int(directory),
            ctypes.c_char_p(os.fsencode(relative)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    except OSError as error:
        if error.errno in {errno.ELOOP, errno.EXDEV}:
            raise PathError(f"{shown} goes through a symlink or out of its root") from None
        if error.errno in {errno.ENOENT, errno.ENOTDIR}:
            raise PathError(f"{shown} does not exist (or changed while in use)") from None
        raise


@contextlib.contextmanager
def opened(root: Path, path: Path, flags: int = os.O_PATH) -> Iterator[int]:
    """A descriptor of path (beneath root, no symlinks on the way), closed on exit."""
    with (
        _closing(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) as top,
        _closing(_open_beneath(top, _relative(root, path), flags, path)) as descriptor,
    ):
        yield descriptor


@contextlib.contextmanager
def parent(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """Path's parent directory opened beneath root, and path's last component."""
    _relative(root, path)
    if path.parent == root:
        with _closing(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) as directory:
            yield directory, path.name
        return
    with opened(root, path.parent, os.O_PATH | os.O_DIRECTORY) as directory:
        yield directory, path.name


@contextlib.contextmanager
def _vanishing(path: Path) -> Iterator[None]:
    """A parent directory removed under an open descriptor: the request's path is gone."""
    try:
        yield
    except FileNotFoundError:
        raise PathError(f"the directory of {path} was removed while in use") from None


def make_directory(root: Path, path: Path, mode: int) -> None:
    """Create path as a directory (if it is not one) relative to its verified parent."""
    with parent(root, path) as (directory, name), _vanishing(path):
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=directory)
        found = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if not stat.S_ISDIR(found.st_mode):
            raise PathError(f"{path} exists and is not a directory")


def make_file(root: Path, path: Path, mode: int) -> None:
    """Create path as an empty file (if it is not one) relative to its verified parent."""
    with parent(root, path) as (directory, name), _vanishing(path):
        try:
            descriptor = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=directory,
            )
        except OSError as error:
            if error.errno in {errno.ELOOP, errno.EISDIR}:
                raise PathError(f"{path} exists and is not a file") from None
            raise
        os.close(descriptor)


def remove(root: Path, path: Path) -> None:
    """Remove the empty directory or the file at path, if any (never what a symlink names)."""
    with parent(root, path) as (directory, name):
        try:
            found = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if stat.S_ISDIR(found.st_mode):
                os.rmdir(name, dir_fd=directory)
            else:
                os.unlink(name, dir_fd=directory)
        except FileNotFoundError:
            pass


def mount_attributes(options: Iterable[str], readonly: bool) -> tuple[int, int]:
    """mount_setattr's (attr_set, attr_clr) for bind-mount options (MOUNT_OPTIONS), in order."""
    attr_set = attr_clr = 0
    atime: int | None = None
    for option in options:
        if option in _ATIME_OPTIONS:
            atime = _ATIME_OPTIONS[option]
            continue
        add, drop = _FLAG_OPTIONS[option]
        attr_set = (attr_set & ~drop) | add
        attr_clr = (attr_clr & ~add) | drop
    if readonly:
        attr_set |= _ATTR_RDONLY
        attr_clr &= ~_ATTR_RDONLY
    if atime is not None:
        attr_set |= atime
        attr_clr |= _ATTR_ATIME_MASK
    return attr_set, attr_clr


@contextlib.contextmanager
def cloned(source: Path) -> Iterator[int]:
    """A detached copy of the mount at a path the driver owns (not from a request)."""
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_SYMLINK_NOFOLLOW
    tree = _syscall(
        _SYS_OPEN_TREE,
        ctypes.c_int(-100),  # AT_FDCWD
        ctypes.c_char_p(os.fsencode(source)),
        ctypes.c_uint(flags),
    )
    with _closing(tree):
        yield tree


@contextlib.contextmanager
def cloned_beneath(root: Path, source: Path) -> Iterator[int]:
    """A detached copy of the mount at a request path, opened beneath root."""
    with opened(root, source) as descriptor:
        tree = _syscall(
            _SYS_OPEN_TREE,
            ctypes.c_int(descriptor),
            ctypes.c_char_p(b""),
            ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH),
        )
    with _closing(tree):
        yield tree


def attach(tree: int, root: Path, target: Path, attributes: tuple[int, int], file: bool) -> None:
    """Mount a detached tree at target beneath root, created as a directory or a file.

    The attributes (read-only first) are set on the detached tree, so the mount is
    never visible with fewer restrictions than asked for.
    """
    attr = _MountAttr(attr_set=attributes[0], attr_clr=attributes[1])
    _syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(tree),
        ctypes.c_char_p(b""),
        ctypes.c_uint(_AT_EMPTY_PATH),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if file:
        make_file(root, target, 0o600)
    else:
        make_directory(root, target, 0o750)
    with opened(root, target) as descriptor:
        _syscall(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(tree),
            ctypes.c_char_p(b""),
            ctypes.c_int(descriptor),
            ctypes.c_char_p(b""),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH),
        )


def unmount(root: Path, path: Path) -> int:
    """Unmount every mount stacked at path, topmost first (lazily if busy); how many.

    umount2 answers EINVAL once nothing is mounted at path any more, so the mount
    table is never read.
    """
    count = 0
    with parent(root, path) as (directory, name):
        through_parent = ctypes.c_char_p(os.fsencode(f"/proc/self/fd/{directory}/{name}"))
        while True:
            try:
                _check(_libc.umount2(through_parent, ctypes.c_int(_UMOUNT_NOFOLLOW)))
            except OSError as error:
                if error.errno in {errno.EINVAL, errno.ENOENT}:
                    return count
                if error.errno != errno.EBUSY:
                    raise
                flags = _UMOUNT_NOFOLLOW | _MNT_DETACH
                _check(_libc.umount2(through_parent, ctypes.c_int(flags)))
            count += 1
