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
import errno
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from csi.config import PoolConfig
from csi.errors import CommandError, SetupError
from csi.files import private_directory, private_file
from csi.mounts import mounted_at
from csi.system import run

log = logging.getLogger(__name__)

VOLUMES = "volumes"
SNAPSHOTS = "snapshots"
DISK = "disk"
# The inode number of every btrfs subvolume's root directory.
_SUBVOLUME_INODE = 256
_LOOP_LINE = re.compile(r"^(/dev/loop\d+): ")
_GENERATION_LINE = re.compile(r"^\s*(Generation|Gen at creation):\s+(\d+)\s*$", re.MULTILINE)
# How long DeleteVolume waits for the kernel to drop a deleted subvolume before its
# qgroup can go; a qgroup still there after that is cleared at the next start.
QGROUP_CLEANUP_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Generations:
    # The last transaction that changed the subvolume, and the one that created it.
    changed: int
    created: int


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
        await self._clear_stale_qgroups()
        # Only the daemon goes through the pool: pods reach their volumes by bind mounts.
        for directory in (self.root, self.volumes, self.snapshots):
            await asyncio.to_thread(private_directory, directory)

    async def _clear_stale_qgroups(self) -> None:
        """Remove qgroups left by deletions that a crash or a slow drop interrupted."""
        try:
            await run("btrfs", "qgroup", "clear-stale", str(self.root))
        except CommandError as error:
            # Subvolumes deleted but not yet dropped keep their qgroups busy: harmless,
            # the next start clears them.
            log.warning("some stale qgroups remain", extra={"error": str(error)})

    async def _mount_image(self, image: Path) -> None:
        if _is_empty_file(image):
            # What a creation interrupted before this version made: it holds nothing.
            log.warning("replacing an empty pool image", extra={"image": str(image)})
            image.unlink()
        if not image.exists():
            await self._create_image(image, self.config.size or 0)
        await asyncio.to_thread(private_file, image)
        if await mounted_at(self.root) is not None:
            return
        await asyncio.to_thread(private_directory, self.root)
        # mount -o loop attaches a loop device that the kernel frees on unmount.
        await run("mount", "-o", "loop", "--", str(image), str(self.root))

    async def _create_image(self, image: Path, size: int) -> None:
        """Create and format the image under a temporary name, then rename it into place.

        A creation that fails (or a crash) leaves nothing at the image's path, so the
        next start tries again from scratch instead of mounting half an image.
        """
        if not image.parent.exists():
            await asyncio.to_thread(private_directory, image.parent)
        temporary = image.with_name(f".{image.name}.new")
        temporary.unlink(missing_ok=True)
        try:
            await asyncio.to_thread(_create_sparse, temporary, size)
            await run("mkfs.btrfs", "-q", str(temporary))
            await asyncio.to_thread(_rename_durably, temporary, image)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        log.info("created the pool image", extra={"image": str(image), "bytes": size})

    # --- subvolumes and qgroups -------------------------------------------------------

    async def create_subvolume(self, path: Path) -> None:
        await run("btrfs", "subvolume", "create", str(path))

    async def snapshot(self, source: Path, target: Path, readonly: bool) -> None:
        flags = ["-r"] if readonly else []
        await run("btrfs", "subvolume", "snapshot", *flags, str(source), str(target))

    async def generations(self, path: Path) -> Generations:
        """The subvolume's last-changed and created-at transaction ids."""
        output = await run("btrfs", "subvolume", "show", str(path))
        found = dict(_GENERATION_LINE.findall(output))
        try:
            return Generations(int(found["Generation"]), int(found["Gen at creation"]))
        except KeyError:
            raise CommandError(
                f"btrfs subvolume show {path}: no generations in its output"
            ) from None

    async def snapshot_group(self, members: Sequence[tuple[Path, Path]]) -> bool:
        """Snapshot each (source, target) read-only; True if they form one crash-consistent cut.

        btrfs cannot snapshot several subvolumes atomically, and freezing the pool
        (FIFREEZE) does not help: a snapshot is a write and waits for the thaw. So the
        members are snapshotted one after the other, each in its own transaction, and
        then checked: a source whose generation is still its snapshot's creation
        generation has had no change committed since, so every snapshot equals its
        source as of the last snapshot's commit, the state a crash at that instant
        would have left. Writes not yet flushed then are not in the cut, as a crash
        would lose them. If a source changed in between, the snapshots are deleted
        and False returned: the caller may try again.
        """
        made: list[Path] = []
        try:
            for source, target in members:
                await self.snapshot(source, target, readonly=True)
                made.append(target)
            consistent = await self._unchanged_since_snapshot(members)
        except BaseException:
            for target in made:
                with contextlib.suppress(CommandError):
                    await self.delete_subvolume(target)
            raise
        if not consistent:
            for target in made:
                await self.delete_subvolume(target)
        return consistent

    async def _unchanged_since_snapshot(self, members: Sequence[tuple[Path, Path]]) -> bool:
        for source, target in members:
            changed = (await self.generations(source)).changed
            if changed != (await self.generations(target)).created:
                log.info(
                    "a group member changed while the group was cut", extra={"source": str(source)}
                )
                return False
        return True

    async def delete_subvolume(self, path: Path) -> None:
        """Delete a subvolume and its level-0 qgroup, which btrfs leaves behind (stale)."""
        if not is_subvolume(path):
            return
        subvolume_id = (await run("btrfs", "inspect-internal", "rootid", str(path))).strip()
        await run("btrfs", "property", "set", "-ts", str(path), "ro", "false")
        # Committing wakes the cleaner now; without it the subvolume is dropped (and its
        # qgroup freed) only at the next periodic commit, up to 30 s later.
        await run("btrfs", "subvolume", "delete", "--commit-after", str(path))
        await self._destroy_qgroup(f"0/{subvolume_id}")

    async def _destroy_qgroup(self, qgroup: str) -> None:
        delay = 0.01
        try:
            async with asyncio.timeout(QGROUP_CLEANUP_TIMEOUT):
                while not await self._qgroup_gone(qgroup):
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.1)
        except TimeoutError:
            log.warning("a deleted subvolume's qgroup is still busy", extra={"qgroup": qgroup})

    async def _qgroup_gone(self, qgroup: str) -> bool:
        """Destroy the qgroup of a deleted subvolume; False while the kernel still uses it."""
        try:
            await run("btrfs", "qgroup", "destroy", qgroup, str(self.root))
        except CommandError as error:
            # Busy until the cleaner has dropped the subvolume.
            if "Device or resource busy" in str(error):
                return False
            # Linux 6.7+ removes the qgroup itself once the subvolume is dropped.
            if "No such file or directory" not in str(error):
                raise
        return True

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

    async def attach(self, file: Path, readonly: bool = False) -> str:
        flags = ["--read-only"] if readonly else []
        output = await run("losetup", *flags, "--find", "--show", "--", str(file))
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
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(descriptor, size)
    except OSError as error:
        if error.errno in {errno.EFBIG, errno.EINVAL}:
            raise SetupError(
                f"the filesystem holding {path.parent} cannot hold a file of {size} bytes: "
                "make csi.pool.size smaller or put csi.pool.image on another filesystem"
            ) from None
        raise
    finally:
        os.close(descriptor)


def _rename_durably(source: Path, target: Path) -> None:
    source.replace(target)
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _is_empty_file(path: Path) -> bool:
    try:
        found = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(found.st_mode) and found.st_size == 0


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
