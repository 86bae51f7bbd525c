"""The btrfs operations of the pool, as ioctls (structures from the kernel's uapi linux/btrfs.h).

The Python bindings on PyPI do not fit (pybtrfs is GPL-2.0; btrfsutil needs a C
build and has no qgroup limit), and the `btrfs` command costs a process per step,
so the few calls the pool needs are here, through fcntl.ioctl. Every function is
synchronous: callers run it in a thread. Paths are the pool's own (never from a
request); a subvolume is created, snapshotted and deleted by name relative to its
parent directory's descriptor, as the kernel's interface has it.

The daemon runs as root (CAP_SYS_ADMIN): deleting a read-only snapshot, creating
qgroups and searching the quota tree need it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from csi.system import SyscallError, io, ioctl, ior, iow, iowr

_MAGIC = 0x94
_VOL_NAME_BYTES = 4088  # BTRFS_PATH_NAME_MAX + 1
_SUBVOL_NAME_BYTES = 4040  # BTRFS_SUBVOL_NAME_MAX + 1
_SUBVOL_RDONLY = 1 << 1
# The same in the root item's flags (linux/btrfs_tree.h), which GET_SUBVOL_INFO returns.
_ROOT_SUBVOL_RDONLY = 1 << 0
_QGROUP_LIMIT_MAX_RFER = 1 << 0
_QUOTA_CTL_ENABLE = 1
_QUOTA_TREE_OBJECTID = 8
_QGROUP_INFO_KEY = 242
_SEARCH_BUFFER_BYTES = 4096 - 104  # BTRFS_SEARCH_ARGS_BUFSIZE
# FS_IOC_SETFLAGS (linux/fs.h): the inode flag that turns copy-on-write off for a file.
_FS_NOCOW_FL = 0x00800000


class _VolArgs(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int64), ("name", ctypes.c_char * _VOL_NAME_BYTES)]


class _VolArgsV2(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_int64),
        ("transid", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("unused", ctypes.c_uint64 * 4),
        ("name", ctypes.c_char * _SUBVOL_NAME_BYTES),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_uint64), ("nsec", ctypes.c_uint32)]


class _SubvolInfo(ctypes.Structure):
    _fields_ = [
        ("treeid", ctypes.c_uint64),
        ("name", ctypes.c_char * 256),
        ("parent_id", ctypes.c_uint64),
        ("dirid", ctypes.c_uint64),
        ("generation", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("uuid", ctypes.c_uint8 * 16),
        ("parent_uuid", ctypes.c_uint8 * 16),
        ("received_uuid", ctypes.c_uint8 * 16),
        ("ctransid", ctypes.c_uint64),
        ("otransid", ctypes.c_uint64),
        ("stransid", ctypes.c_uint64),
        ("rtransid", ctypes.c_uint64),
        ("ctime", _Timespec),
        ("otime", _Timespec),
        ("stime", _Timespec),
        ("rtime", _Timespec),
        ("reserved", ctypes.c_uint64 * 8),
    ]


class _QgroupLimit(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("max_rfer", ctypes.c_uint64),
        ("max_excl", ctypes.c_uint64),
        ("rsv_rfer", ctypes.c_uint64),
        ("rsv_excl", ctypes.c_uint64),
    ]


class _QgroupLimitArgs(ctypes.Structure):
    _fields_ = [("qgroupid", ctypes.c_uint64), ("lim", _QgroupLimit)]


class _QgroupCreateArgs(ctypes.Structure):
    _fields_ = [("create", ctypes.c_uint64), ("qgroupid", ctypes.c_uint64)]


class _QuotaCtlArgs(ctypes.Structure):
    _fields_ = [("cmd", ctypes.c_uint64), ("status", ctypes.c_uint64)]


class _SearchKey(ctypes.Structure):
    _fields_ = [
        ("tree_id", ctypes.c_uint64),
        ("min_objectid", ctypes.c_uint64),
        ("max_objectid", ctypes.c_uint64),
        ("min_offset", ctypes.c_uint64),
        ("max_offset", ctypes.c_uint64),
        ("min_transid", ctypes.c_uint64),
        ("max_transid", ctypes.c_uint64),
        ("min_type", ctypes.c_uint32),
        ("max_type", ctypes.c_uint32),
        ("nr_items", ctypes.c_uint32),
        ("unused", ctypes.c_uint32),
        ("unused1", ctypes.c_uint64 * 4),
    ]


class _SearchArgs(ctypes.Structure):
    _fields_ = [("key", _SearchKey), ("buf", ctypes.c_uint8 * _SEARCH_BUFFER_BYTES)]


class _SearchHeader(ctypes.Structure):
    _fields_ = [
        ("transid", ctypes.c_uint64),
        ("objectid", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


class _QgroupInfoItem(ctypes.LittleEndianStructure):
    # On-disk item (little-endian), as the tree search returns it.
    _pack_ = 1
    _fields_ = [
        ("generation", ctypes.c_uint64),
        ("rfer", ctypes.c_uint64),
        ("rfer_cmpr", ctypes.c_uint64),
        ("excl", ctypes.c_uint64),
        ("excl_cmpr", ctypes.c_uint64),
    ]


SUBVOL_CREATE = iow(_MAGIC, 14, ctypes.sizeof(_VolArgs))
TREE_SEARCH = iowr(_MAGIC, 17, ctypes.sizeof(_SearchArgs))
START_SYNC = ior(_MAGIC, 24, 8)
SNAP_CREATE_V2 = iow(_MAGIC, 23, ctypes.sizeof(_VolArgsV2))
QUOTA_CTL = iowr(_MAGIC, 40, ctypes.sizeof(_QuotaCtlArgs))
QGROUP_CREATE = iow(_MAGIC, 42, ctypes.sizeof(_QgroupCreateArgs))
# _IOR although the kernel reads it: so the uapi header declares it.
QGROUP_LIMIT = ior(_MAGIC, 43, ctypes.sizeof(_QgroupLimitArgs))
QUOTA_RESCAN_WAIT = io(_MAGIC, 46)
GET_SUBVOL_INFO = ior(_MAGIC, 60, ctypes.sizeof(_SubvolInfo))
SNAP_DESTROY_V2 = iow(_MAGIC, 63, ctypes.sizeof(_VolArgsV2))
FS_IOC_GETFLAGS = ior(ord("f"), 1, ctypes.sizeof(ctypes.c_long))
FS_IOC_SETFLAGS = iow(ord("f"), 2, ctypes.sizeof(ctypes.c_long))


@dataclass(frozen=True, slots=True)
class SubvolumeInfo:
    # The subvolume's id (its tree id, also its level-0 qgroup's id).
    id: int
    # The last transaction that changed it, and the one that created it.
    generation: int
    created: int
    readonly: bool


@contextlib.contextmanager
def _directory(path: Path) -> Iterator[int]:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _name(path: Path, size: int) -> bytes:
    name = os.fsencode(path.name)
    if not name or len(name) >= size or name in {b".", b".."}:
        raise SyscallError(
            f"btrfs: subvolume name {path.name!r}", OSError(errno.EINVAL, "bad name")
        )
    return name


def create_subvolume(path: Path) -> None:
    """An empty subvolume at path (its parent must exist)."""
    arguments = _VolArgs(fd=0, name=_name(path, _VOL_NAME_BYTES))
    with _directory(path.parent) as parent:
        ioctl(parent, SUBVOL_CREATE, arguments, f"btrfs subvolume create {path}")


def snapshot(source: Path, target: Path, readonly: bool) -> None:
    """A snapshot of the subvolume at source, at target; its creation commits a transaction."""
    with _directory(source) as origin, _directory(target.parent) as parent:
        arguments = _VolArgsV2(
            fd=origin,
            flags=_SUBVOL_RDONLY if readonly else 0,
            name=_name(target, _SUBVOL_NAME_BYTES),
        )
        ioctl(parent, SNAP_CREATE_V2, arguments, f"btrfs subvolume snapshot {source} {target}")


def delete_subvolume(path: Path) -> None:
    """Delete the subvolume at path (read-only or not); the kernel drops its data later."""
    arguments = _VolArgsV2(name=_name(path, _SUBVOL_NAME_BYTES))
    with _directory(path.parent) as parent:
        ioctl(parent, SNAP_DESTROY_V2, arguments, f"btrfs subvolume delete {path}")


def info(path: Path) -> SubvolumeInfo:
    found = _SubvolInfo()
    with _directory(path) as subvolume:
        ioctl(subvolume, GET_SUBVOL_INFO, found, f"btrfs subvolume show {path}")
    return SubvolumeInfo(
        id=found.treeid,
        generation=found.generation,
        created=found.otransid,
        readonly=bool(found.flags & _ROOT_SUBVOL_RDONLY),
    )


def set_limit(path: Path, limit: int) -> None:
    """Limit the bytes the subvolume at path references (its level-0 qgroup's max_rfer)."""
    # qgroupid 0: the qgroup of the subvolume the descriptor is in.
    arguments = _QgroupLimitArgs(
        qgroupid=0, lim=_QgroupLimit(flags=_QGROUP_LIMIT_MAX_RFER, max_rfer=limit)
    )
    with _directory(path) as subvolume:
        ioctl(subvolume, QGROUP_LIMIT, arguments, f"btrfs qgroup limit {limit} {path}")


def destroy_qgroup(filesystem: Path, qgroup_id: int) -> None:
    """Destroy a level-0 qgroup: EBUSY while its deleted subvolume is not dropped yet,
    ENOENT once it is gone (Linux 6.7+ removes it with the subvolume)."""
    arguments = _QgroupCreateArgs(create=0, qgroupid=qgroup_id)
    with _directory(filesystem) as descriptor:
        ioctl(descriptor, QGROUP_CREATE, arguments, f"btrfs qgroup destroy 0/{qgroup_id}")


def referenced(filesystem: Path, qgroup_id: int) -> int | None:
    """The bytes a level-0 qgroup references, as of the last commit; None if it has none."""
    key = _SearchKey(
        tree_id=_QUOTA_TREE_OBJECTID,
        min_offset=qgroup_id,
        max_offset=qgroup_id,
        max_transid=2**64 - 1,
        min_type=_QGROUP_INFO_KEY,
        max_type=_QGROUP_INFO_KEY,
        nr_items=1,
    )
    search = _SearchArgs(key=key)
    with _directory(filesystem) as descriptor:
        ioctl(descriptor, TREE_SEARCH, search, f"btrfs qgroup show 0/{qgroup_id}")
    if search.key.nr_items == 0:
        return None
    header = _SearchHeader.from_buffer(search.buf)
    if header.type != _QGROUP_INFO_KEY or header.offset != qgroup_id:
        return None
    item = _QgroupInfoItem.from_buffer(search.buf, ctypes.sizeof(_SearchHeader))
    return int(item.rfer)


def enable_quota(filesystem: Path) -> None:
    """Turn quotas on (nothing if they are) and wait for the rescan that counts what exists."""
    with _directory(filesystem) as descriptor:
        ioctl(descriptor, QUOTA_CTL, _QuotaCtlArgs(cmd=_QUOTA_CTL_ENABLE), "btrfs quota enable")
        # Until the rescan ends, usage figures count only part of the data.
        ioctl(descriptor, QUOTA_RESCAN_WAIT, 0, "btrfs quota rescan -w")


def start_commit(filesystem: Path) -> int:
    """Start committing the running transaction; its id (the last committed, if none runs)."""
    transaction = ctypes.c_uint64()
    with _directory(filesystem) as descriptor:
        ioctl(descriptor, START_SYNC, transaction, "btrfs: start a commit")
    return transaction.value


def set_nocow(descriptor: int) -> None:
    """Turn copy-on-write off for an empty file (btrfs applies it only while it is empty)."""
    # The macros name a long; the kernel reads and writes an int.
    flags = ctypes.c_uint()
    ioctl(descriptor, FS_IOC_GETFLAGS, flags, "lsattr")
    flags.value |= _FS_NOCOW_FL
    ioctl(descriptor, FS_IOC_SETFLAGS, flags, "chattr +C")
