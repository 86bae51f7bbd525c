"""The storage pool: one btrfs filesystem holding every volume and snapshot.

  <pool>/volumes/<id>     a subvolume per volume; filesystem volumes are used as they
                          are (capacity = qgroup limit, enforced by the kernel), block
                          volumes hold one sparse NOCOW file, `disk`, of the capacity
  <pool>/snapshots/<id>   a read-only snapshot of a volume's subvolume

Snapshots, clones and restores are btrfs snapshots, so the data of block files is
shared copy-on-write (a reflink copy, in effect) as much as that of filesystems.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from csi.config import PoolConfig
from csi.errors import CommandError
from csi.mounts import mounted_at
from csi.system import run

log = logging.getLogger(__name__)

VOLUMES = "volumes"
SNAPSHOTS = "snapshots"
DISK = "disk"
# The inode number of every btrfs subvolume's root directory.
_SUBVOLUME_INODE = 256
_LOOP_LINE = re.compile(r"^(/dev/loop\d+): ")


@dataclass(frozen=True, slots=True)
class Usage:
    total: int
    available: int
    used: int
    inodes: int
    inodes_free: int
    inodes_used: int


def is_subvolume(path: Path) -> bool:
    try:
        return path.stat().st_ino == _SUBVOLUME_INODE and path.is_dir()
    except OSError:
        return False


class Pool:
    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.root = config.path
        self.volumes = config.path / VOLUMES
        self.snapshots = config.path / SNAPSHOTS

    def volume_path(self, volume_id: str) -> Path:
        return self.volumes / volume_id

    def disk_path(self, volume_id: str) -> Path:
        return self.volumes / volume_id / DISK

    def snapshot_path(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    # --- pool set-up -----------------------------------------------------------------

    async def open(self) -> None:
        """Make the pool usable: image created and mounted if configured, quotas on."""
        if self.config.image is not None:
            await self._mount_image(self.config.image)
        mount = await mounted_at(self.root)
        if mount is None or mount.fs_type != "btrfs":
            raise CommandError(f"pool path {self.root} is not a mounted btrfs filesystem")
        await run("btrfs", "quota", "enable", str(self.root))
        for directory in (self.volumes, self.snapshots):
            directory.mkdir(mode=0o700, exist_ok=True)

    async def _mount_image(self, image: Path) -> None:
        if await mounted_at(self.root) is not None:
            return
        if not image.exists():
            image.parent.mkdir(parents=True, exist_ok=True)
            size = self.config.size or 0
            await asyncio.to_thread(_create_sparse, image, size)
            await run("mkfs.btrfs", "-q", str(image))
            log.info("created the pool image", extra={"image": str(image), "bytes": size})
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mount -o loop attaches a loop device that the kernel frees on unmount.
        await run("mount", "-o", "loop", "--", str(image), str(self.root))

    # --- subvolumes and qgroups -------------------------------------------------------

    async def create_subvolume(self, path: Path) -> None:
        await run("btrfs", "subvolume", "create", str(path))

    async def snapshot(self, source: Path, target: Path, readonly: bool) -> None:
        flags = ["-r"] if readonly else []
        await run("btrfs", "subvolume", "snapshot", *flags, str(source), str(target))

    async def delete_subvolume(self, path: Path) -> None:
        if not is_subvolume(path):
            return
        await run("btrfs", "property", "set", "-ts", str(path), "ro", "false")
        await run("btrfs", "subvolume", "delete", str(path))

    async def set_limit(self, path: Path, limit: int) -> None:
        await run("btrfs", "qgroup", "limit", str(limit), str(path))

    async def referenced(self, path: Path) -> int:
        """Bytes a subvolume references (its qgroup's rfer), as the quota counts them."""
        output = await run("btrfs", "qgroup", "show", "-rf", "--raw", str(path))
        for line in output.splitlines():
            fields = line.split()
            if fields and fields[0].startswith("0/"):
                return int(fields[1])
        return 0

    # --- block files ------------------------------------------------------------------

    async def create_disk(self, volume_id: str, size: int) -> None:
        disk = self.disk_path(volume_id)
        disk.touch(mode=0o600, exist_ok=True)
        # NOCOW must be set while the file is empty; the file stays sparse.
        await run("chattr", "+C", str(disk))
        await asyncio.to_thread(os.truncate, disk, size)

    async def grow_disk(self, volume_id: str, size: int) -> None:
        disk = self.disk_path(volume_id)
        if disk.stat().st_size < size:
            await asyncio.to_thread(os.truncate, disk, size)

    # --- loop devices -----------------------------------------------------------------

    async def attach(self, file: Path) -> str:
        output = await run("losetup", "--find", "--show", "--", str(file))
        return output.strip()

    async def loop_devices(self, file: Path) -> list[str]:
        output = await run("losetup", "-j", str(file))
        return [m.group(1) for line in output.splitlines() if (m := _LOOP_LINE.match(line))]

    async def detach(self, device: str) -> None:
        with contextlib.suppress(CommandError):
            await run("losetup", "-d", device)

    async def refresh(self, device: str) -> None:
        """Make the loop device see its file's new size."""
        await run("losetup", "-c", device)

    # --- space ------------------------------------------------------------------------

    async def free_bytes(self) -> int:
        stats = await asyncio.to_thread(os.statvfs, self.root)
        return stats.f_bavail * stats.f_frsize

    async def total_bytes(self) -> int:
        stats = await asyncio.to_thread(os.statvfs, self.root)
        return stats.f_blocks * stats.f_frsize

    def subvolume_ids(self, directory: Path) -> set[str]:
        try:
            return {p.name for p in directory.iterdir() if is_subvolume(p)}
        except FileNotFoundError:
            return set()


def _create_sparse(path: Path, size: int) -> None:
    with path.open("xb") as file:
        file.truncate(size)


async def usage(path: Path) -> Usage:
    stats = await asyncio.to_thread(os.statvfs, path)
    total = stats.f_blocks * stats.f_frsize
    available = stats.f_bavail * stats.f_frsize
    return Usage(
        total=total,
        available=available,
        used=max(0, total - stats.f_bfree * stats.f_frsize),
        inodes=stats.f_files,
        inodes_free=stats.f_ffree,
        inodes_used=max(0, stats.f_files - stats.f_ffree),
    )
