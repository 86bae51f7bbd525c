"""csi.loop against real loop devices, checked with what `losetup` and `blockdev` report."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import loop
from csi.system import SyscallError
from tests.csi.conftest import detach_loops, sh

pytestmark = pytest.mark.root

MiB = 1024**2


@pytest.fixture
def backing(short_tmp: Path) -> Iterator[Path]:
    """A 4 MiB file; every loop device on it is detached at the end, whatever happens."""
    file = short_tmp / "disk"
    with file.open("wb") as handle:
        handle.truncate(4 * MiB)
    try:
        yield file
    finally:
        detach_loops([file])


def losetup_devices(file: Path) -> list[str]:
    return sorted(line.split(":")[0] for line in sh("losetup", "-j", str(file)).splitlines())


def test_structures_have_the_sizes_of_the_kernels() -> None:
    # sizeof() in a C program built against linux/loop.h.
    assert ctypes.sizeof(loop._Info64) == 232
    assert ctypes.sizeof(loop._Config) == 304


def test_attach_find_refresh_detach_as_losetup_sees_them(backing: Path) -> None:
    writable = loop.attach(backing)
    readonly = loop.attach(backing, readonly=True)
    assert sorted(loop.devices_of(backing)) == losetup_devices(backing)
    assert sorted([writable, readonly]) == losetup_devices(backing)
    assert sh("blockdev", "--getro", writable).strip() == "0"
    assert sh("blockdev", "--getro", readonly).strip() == "1"
    assert sh("losetup", "--noheadings", "-O", "BACK-FILE", writable).strip() == str(backing)

    data = os.urandom(4096)
    with Path(writable).open("r+b", buffering=0) as device:
        device.write(data)
        os.fsync(device.fileno())
    with backing.open("rb") as file:
        assert file.read(4096) == data
    with pytest.raises(OSError), Path(readonly).open("r+b", buffering=0) as device:
        device.write(data)

    os.truncate(backing, 8 * MiB)
    assert int(sh("blockdev", "--getsize64", writable)) == 4 * MiB
    loop.refresh(writable)
    assert int(sh("blockdev", "--getsize64", writable)) == 8 * MiB

    loop.detach(readonly)
    assert loop.devices_of(backing) == [writable] == losetup_devices(backing)
    loop.detach(writable)
    assert loop.devices_of(backing) == [] == losetup_devices(backing)


def test_another_file_with_a_loop_device_is_not_taken_for_ours(
    backing: Path, short_tmp: Path
) -> None:
    other = short_tmp / "other"
    with other.open("wb") as handle:
        handle.truncate(MiB)
    try:
        theirs = loop.attach(other)
        assert loop.devices_of(backing) == []
        assert loop.devices_of(other) == [theirs]
    finally:
        detach_loops([other])


def test_a_missing_file_has_no_devices_and_cannot_be_attached(short_tmp: Path) -> None:
    missing = short_tmp / "missing"
    assert loop.devices_of(missing) == []
    with pytest.raises(FileNotFoundError):
        loop.attach(missing)


def test_detaching_a_free_device_says_so(backing: Path) -> None:
    device = loop.attach(backing)
    loop.detach(device)
    with pytest.raises(SyscallError) as error:
        loop.detach(device)
    assert f"losetup -d {device}" in str(error.value)
