"""Real btrfs on a loop device, a CSI driver on a real Unix socket, cleaned up on failure."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import grpc
import pytest

from csi import mounts
from csi.config import CsiConfig
from csi.driver import CsiDriver
from csi.v1 import csi_pb2, csi_pb2_grpc
from deviceplugin import configkit

DRIVER = "local.csi.nodeplug.io"
NODE = "node-1"
POOL_BYTES = 1024**3
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
ModeValue: TypeAlias = csi_pb2.VolumeCapability.AccessMode.Mode.ValueType


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def detach_loops(files: list[Path]) -> None:
    for file in files:
        for line in sh("losetup", "-j", str(file)).splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False, capture_output=True)


def cleanup_below(root: Path) -> None:
    """Unmount everything below root (innermost first), detaching loop devices of files there.

    A loop device shows its file's path inside the filesystem it lives on, so the
    pool's block files are found by name, not by what losetup prints.
    """
    detach_loops(sorted(root.glob("*/volumes/*/disk")))
    table = mounts.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    for mount in reversed(table):
        if not Path(mount.mount_point).is_relative_to(root):
            continue
        if subprocess.run(
            ["umount", mount.mount_point], check=False, capture_output=True
        ).returncode:
            subprocess.run(["umount", "-l", mount.mount_point], check=False, capture_output=True)
    detach_loops(sorted(root.glob("*.img")))


@pytest.fixture
def btrfs_pool(short_tmp: Path) -> Iterator[Path]:
    """A fresh 1 GiB btrfs filesystem, loop-mounted at <tmp>/pool."""
    image = short_tmp / "pool.img"
    pool = short_tmp / "pool"
    pool.mkdir()
    with image.open("wb") as file:
        file.truncate(POOL_BYTES)
    try:
        sh("mkfs.btrfs", "-q", str(image))
        sh("mount", "-o", "loop", str(image), str(pool))
        yield pool
    finally:
        cleanup_below(short_tmp)


def csi_config(pool: Path, **pool_extra: object) -> CsiConfig:
    return configkit.convert(
        {"driverName": DRIVER, "nodeId": NODE, "pool": {"path": str(pool), **pool_extra}},
        CsiConfig,
    )


@dataclass
class Client:
    driver: CsiDriver
    identity: csi_pb2_grpc.IdentityAsyncStub
    controller: csi_pb2_grpc.ControllerAsyncStub
    node: csi_pb2_grpc.NodeAsyncStub
    group_controller: csi_pb2_grpc.GroupControllerAsyncStub
    kubelet: Path


@contextlib.asynccontextmanager
async def serving(root: Path, pool: Path, state: Path | None = None) -> AsyncIterator[Client]:
    """A started driver on <root>/csi.sock, with stubs; stopped (not cleaned up) on exit."""
    driver = CsiDriver(csi_config(pool), root / "kubelet", state or root / "state")
    (root / "kubelet").mkdir(parents=True, exist_ok=True)
    await driver.start()
    server = grpc.aio.server()
    driver.add_services(server)
    socket = root / "csi.sock"
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            yield Client(
                driver,
                csi_pb2_grpc.IdentityStub(channel),
                csi_pb2_grpc.ControllerStub(channel),
                csi_pb2_grpc.NodeStub(channel),
                csi_pb2_grpc.GroupControllerStub(channel),
                root / "kubelet",
            )
    finally:
        await server.stop(None)
        await driver.stop()
        socket.unlink(missing_ok=True)


@pytest.fixture
async def csi(short_tmp: Path, btrfs_pool: Path) -> AsyncIterator[Client]:
    async with serving(short_tmp, btrfs_pool) as client:
        yield client


def mount_capability(
    mode: ModeValue = Mode.SINGLE_NODE_WRITER, flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def block_capability(mode: ModeValue = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def create_request(
    name: str, size: int = 16 * 1024**2, capability: csi_pb2.VolumeCapability | None = None
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[capability or mount_capability()],
    )
