"""Loop devices for block volumes, through ioctls (structures from the kernel's uapi linux/loop.h).

What `losetup --find --show`, `-d`, `-c` and `-j` do, without a process each:
LOOP_CTL_GET_FREE names a free device and LOOP_CONFIGURE (Linux 5.8) binds the
file and sets its flags in one step, so a device is never seen attached with the
wrong flags; another process may take the same free device first (EBUSY), and
then the next free one is tried. Synchronous: callers run these in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from csi.system import SyscallError, io, ioctl

CONTROL = Path("/dev/loop-control")
_SYS_BLOCK = Path("/sys/block")
_NAME_BYTES = 64  # LO_NAME_SIZE
_FLAGS_READ_ONLY = 1
# Devices tried when others keep taking the free one first.
_ATTEMPTS = 16


class _Info64(ctypes.Structure):
    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_char * _NAME_BYTES),
        ("lo_crypt_name", ctypes.c_char * _NAME_BYTES),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _Config(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _Info64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


_KIND = 0x4C
CLR_FD = io(_KIND, 0x01)
GET_STATUS64 = io(_KIND, 0x05)
SET_CAPACITY = io(_KIND, 0x07)
CONFIGURE = io(_KIND, 0x0A)
CTL_GET_FREE = io(_KIND, 0x82)


class NoFreeLoopDeviceError(SyscallError):
    """Every loop device is taken (or the free one has no device node here)."""


@contextlib.contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    descriptor = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def attach(file: Path, readonly: bool = False) -> str:
    """Attach file to a free loop device (read-only if asked); its path, /dev/loopN."""
    mode = os.O_RDONLY if readonly else os.O_RDWR
    with _opened(file, mode | os.O_NOFOLLOW) as backing, _opened(CONTROL, os.O_RDWR) as control:
        name = os.fsencode(file)[: _NAME_BYTES - 1]
        config = _Config(
            fd=backing,
            info=_Info64(lo_flags=_FLAGS_READ_ONLY if readonly else 0, lo_file_name=name),
        )
        for _ in range(_ATTEMPTS):
            number = ioctl(control, CTL_GET_FREE, 0, "losetup --find")
            device = Path(f"/dev/loop{number}")
            try:
                with _opened(device, mode) as loop:
                    ioctl(loop, CONFIGURE, config, f"losetup {device} {file}")
            except FileNotFoundError:
                raise NoFreeLoopDeviceError(
                    f"losetup --find: {device} has no device node",
                    OSError(errno.ENODEV, "no free loop device"),
                ) from None
            except SyscallError as error:
                if error.errno == errno.EBUSY:
                    continue  # another process took it between the two calls
                raise
            return str(device)
    raise NoFreeLoopDeviceError(
        f"losetup --find {file}", OSError(errno.EBUSY, "every free loop device was taken first")
    )


def detach(device: str) -> None:
    """Detach the loop device (the kernel finishes once it is no longer open)."""
    with _opened(Path(device), os.O_RDONLY) as loop:
        ioctl(loop, CLR_FD, 0, f"losetup -d {device}")


def refresh(device: str) -> None:
    """Make the loop device see its file's new size."""
    with _opened(Path(device), os.O_RDONLY) as loop:
        ioctl(loop, SET_CAPACITY, 0, f"losetup -c {device}")


def _decode(device: int) -> tuple[int, int]:
    # The kernel's new_encode_dev() layout, as loop_info64.lo_device carries it.
    return (device & 0xFFF00) >> 8, (device & 0xFF) | ((device >> 12) & 0xFFF00)


def devices_of(file: Path) -> list[str]:
    """The loop devices backed by file (by device and inode, as `losetup -j` matches)."""
    try:
        found = file.stat()
    except FileNotFoundError:
        return []
    wanted = (os.major(found.st_dev), os.minor(found.st_dev), found.st_ino)
    devices = []
    for entry in sorted(_SYS_BLOCK.glob("loop*/loop")):
        device = Path("/dev") / entry.parent.name
        status = _Info64()
        try:
            with _opened(device, os.O_RDONLY) as loop:
                ioctl(loop, GET_STATUS64, status, f"losetup {device}")
        except (FileNotFoundError, SyscallError):
            continue  # detached meanwhile, or no device node in this mount namespace
        if (*_decode(status.lo_device), status.lo_inode) == wanted:
            devices.append(str(device))
    return devices
