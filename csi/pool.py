"""The storage pool: one btrfs filesystem holding every volume and snapshot.

  <pool>/volumes/<id>     a subvolume per volume; filesystem volumes are used as they
                          are (capacity = qgroup limit, enforced by the kernel), block
                          volumes hold one sparse NOCOW file, `disk`, of the capacity
  <pool>/snapshots/<id>   a read-only snapshot of a volume's subvolume

A subvolume is made under a pending name beside its place, `.new-<id>`, and moved
into place (a rename: a read-only snapshot can move within its directory only)
once its record is durable: after a crash, a pending subvolume whose record is
READY is moved into place and any other is deleted, so a create needs no durable
intent record of its own (see state.create_recorded).

Snapshots, clones and restores are btrfs snapshots, so the data of block files is
shared copy-on-write (a reflink copy, in effect) as much as that of filesystems.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from csi import btrfs, loop
from csi.config import PoolConfig
from csi.errors import CommandError, SetupError
from csi.files import private_directory, private_file
from csi.mounts import mounted_at
from csi.system import SyscallError, run

log = logging.getLogger(__name__)

VOLUMES = "volumes"
SNAPSHOTS = "snapshots"
DISK = "disk"
PENDING_PREFIX = ".new-"
# The inode number of every btrfs subvolume's root directory.
_SUBVOLUME_INODE = 256
# How long a deleted subvolume's qgroup is waited for (in the background) until the
# kernel has dropped the subvolume; one still there after that is cleared at the next start.
QGROUP_CLEANUP_TIMEOUT = 30.0
# The first and the longest pause before an attempt at destroying those qgroups. Each
# attempt commits the pool, which on an image is an fsync on the host's filesystem
# that the driver's own state writes then queue behind: a burst of deletions is
# cleaned up after in a few commits, not one every few milliseconds.
_QGROUP_RETRY_FIRST = 0.2
_QGROUP_RETRY_MAX = 1.0


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


def pending(path: Path) -> Path:
    """Where the subvolume that belongs at path is made, until its record is durable."""
    return path.with_name(PENDING_PREFIX + path.name)


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
        self._qgroups = _DroppedQgroups(config.path)

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
        await asyncio.to_thread(btrfs.enable_quota, self.root)
        await self._clear_stale_qgroups()
        # Only the daemon goes through the pool: pods reach their volumes by bind mounts.
        for directory in (self.root, self.volumes, self.snapshots):
            await asyncio.to_thread(private_directory, directory)

    async def close(self) -> None:
        """Stop destroying the qgroups of deleted subvolumes (the next open clears them)."""
        await self._qgroups.close()

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

    async def provision(self, path: Path, source: Path | None, block: bool, size: int) -> None:
        """A volume's subvolume at path: empty or a writable snapshot of source, of size bytes.

        A filesystem volume gets its qgroup limit; a block volume its disk file, made
        (NOCOW, sparse) or grown from the source's. One thread hop for every step.
        """
        await asyncio.to_thread(_provision, path, source, block, size)

    async def place(self, path: Path) -> None:
        """Move the subvolume made at pending(path) to path."""
        await asyncio.to_thread(pending(path).rename, path)

    async def delete_made(self, path: Path) -> None:
        """Delete the subvolume that belongs at path, pending or placed."""
        for made in (pending(path), path):
            await self.delete_subvolume(made)

    async def finish_pending(self, directory: Path, ready: Collection[str]) -> None:
        """After a crash: move the pending subvolumes under directory whose id is in ready
        into place (their record was written), and delete the others (it was not)."""
        for name in await asyncio.to_thread(_pending_names, directory):
            path = directory / name
            if name in ready and not path.exists():
                log.info("placing a subvolume created before a crash", extra={"path": str(path)})
                await self.place(path)
            else:
                log.warning("deleting a half-created subvolume", extra={"path": str(path)})
                await self.delete_subvolume(pending(path))

    async def snapshot(self, source: Path, target: Path, readonly: bool) -> None:
        await asyncio.to_thread(btrfs.snapshot, source, target, readonly)

    async def generations(self, path: Path) -> Generations:
        """The subvolume's last-changed and created-at transaction ids."""
        found = await asyncio.to_thread(btrfs.info, path)
        return Generations(found.generation, found.created)

    async def snapshot_group(self, members: Sequence[tuple[Path, Path]]) -> bool:
        """Snapshot each (source, target) read-only; True if they form one crash-consistent cut.

        btrfs cannot snapshot several subvolumes atomically, and freezing the pool
        (FIFREEZE) does not help: a snapshot is a write and waits for the thaw. So the
        members are snapshotted one after the other, each in its own transaction, and
        then checked: a source whose generation is still its snapshot's creation
        generation has had no change committed since, so every snapshot equals its
        source as of the last snapshot's commit, the state a crash at that instant
        would have left. Creating a snapshot commits the whole pool, so a write made
        to a member after its snapshot, fsync'd (in btrfs' log tree) or not, moves
        that member's generation by the next member's snapshot at the latest. A write
        made after the last snapshot's commit comes after the cut's instant: it is
        not in the cut, as it would not be in a crash at that instant. Writes not yet
        flushed by then are not in the cut either, as a crash would lose them. If a
        source changed in between, the snapshots are deleted and False returned: the
        caller may try again.
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
        """Delete a subvolume; its level-0 qgroup, which btrfs leaves behind, goes soon after.

        The qgroup stays busy until the kernel has dropped the subvolume's data, which
        takes a commit and the cleaner thread: that is waited for in the background
        (see _DroppedQgroups), not by the caller.
        """
        if not is_subvolume(path):
            return
        subvolume_id = await asyncio.to_thread(_delete, path)
        self._qgroups.add(subvolume_id)

    async def qgroups_dropped(self) -> None:
        """Wait until the qgroups of the subvolumes deleted so far are gone (or given up)."""
        await self._qgroups.settled()

    async def set_limit(self, path: Path, limit: int) -> None:
        await asyncio.to_thread(btrfs.set_limit, path, limit)

    async def referenced(self, path: Path) -> int:
        """Bytes a subvolume references (its qgroup's rfer), as the quota counts them."""
        return await asyncio.to_thread(_referenced, self.root, path)

    # --- block files ------------------------------------------------------------------

    async def grow_disk(self, volume_id: str, size: int) -> None:
        disk = self.disk_path(volume_id)
        if disk.stat().st_size < size:
            await asyncio.to_thread(os.truncate, disk, size)

    # --- loop devices -----------------------------------------------------------------

    async def attach(self, file: Path, readonly: bool = False) -> str:
        return await asyncio.to_thread(loop.attach, file, readonly)

    async def loop_devices(self, file: Path) -> list[str]:
        return await asyncio.to_thread(loop.devices_of, file)

    async def detach(self, device: str) -> None:
        with contextlib.suppress(SyscallError, FileNotFoundError):
            await asyncio.to_thread(loop.detach, device)

    async def refresh(self, device: str) -> None:
        """Make the loop device see its file's new size."""
        await asyncio.to_thread(loop.refresh, device)

    # --- space ------------------------------------------------------------------------

    def space(self) -> Usage:
        return usage(self.root)

    def subvolume_ids(self, directory: Path) -> set[str]:
        """The placed subvolumes in directory (not the pending ones)."""
        try:
            return {
                p.name
                for p in directory.iterdir()
                if not p.name.startswith(PENDING_PREFIX) and is_subvolume(p)
            }
        except FileNotFoundError:
            return set()


class _DroppedQgroups:
    """The qgroups of deleted subvolumes, destroyed in the background once they can be.

    A deleted subvolume's data is dropped by the kernel's cleaner after a commit; until
    then its qgroup is busy (EBUSY). Linux 6.7+ removes the qgroup itself once the
    subvolume is dropped (ENOENT here); older kernels leave it for us. Each round
    starts a commit (so the cleaner does not wait for the periodic one, up to 30 s
    away) and tries every pending qgroup; rounds back off from _QGROUP_RETRY_FIRST to
    _QGROUP_RETRY_MAX.
    """

    def __init__(self, filesystem: Path) -> None:
        self._filesystem = filesystem
        # qgroup id -> when to give up on it (event loop time).
        self._pending: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, qgroup_id: int) -> None:
        self._pending[qgroup_id] = asyncio.get_running_loop().time() + QGROUP_CLEANUP_TIMEOUT
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="destroy dropped qgroups")

    async def settled(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = _QGROUP_RETRY_FIRST
        while self._pending:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _QGROUP_RETRY_MAX)
            try:
                gone = await asyncio.to_thread(
                    _destroy_dropped, self._filesystem, set(self._pending)
                )
            except SyscallError as error:
                log.warning(
                    "cannot destroy the qgroups of deleted subvolumes", extra={"error": str(error)}
                )
                return
            now = asyncio.get_running_loop().time()
            for qgroup_id, deadline in list(self._pending.items()):
                if qgroup_id in gone:
                    del self._pending[qgroup_id]
                elif now > deadline:
                    log.warning(
                        "a deleted subvolume's qgroup is still busy",
                        extra={"qgroup": f"0/{qgroup_id}"},
                    )
                    del self._pending[qgroup_id]


def _delete(path: Path) -> int:
    """Delete the subvolume at path; its id."""
    subvolume_id = btrfs.info(path).id
    btrfs.delete_subvolume(path)
    return subvolume_id


def _destroy_dropped(filesystem: Path, qgroup_ids: set[int]) -> set[int]:
    """Start a commit, then destroy what it can of qgroup_ids; those now gone."""
    btrfs.start_commit(filesystem)
    gone = set()
    for qgroup_id in qgroup_ids:
        try:
            btrfs.destroy_qgroup(filesystem, qgroup_id)
        except SyscallError as error:
            if error.errno == errno.EBUSY:
                continue  # not dropped yet
            if error.errno != errno.ENOENT:
                raise
        gone.add(qgroup_id)
    return gone


def _referenced(filesystem: Path, path: Path) -> int:
    return btrfs.referenced(filesystem, btrfs.info(path).id) or 0


def _provision(path: Path, source: Path | None, block: bool, size: int) -> None:
    if source is None:
        btrfs.create_subvolume(path)
    else:
        btrfs.snapshot(source, path, readonly=False)
    disk = path / DISK
    if block and source is None:
        _create_disk(disk, size)
    elif block:
        if disk.stat().st_size < size:
            os.truncate(disk, size)
    else:
        btrfs.set_limit(path, size)


def _pending_names(directory: Path) -> list[str]:
    """The ids of the pending subvolumes in directory."""
    return [p.name.removeprefix(PENDING_PREFIX) for p in directory.glob(f"{PENDING_PREFIX}*")]


def _create_disk(disk: Path, size: int) -> None:
    descriptor = os.open(disk, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # NOCOW must be set while the file is empty; the file stays sparse.
        btrfs.set_nocow(descriptor)
        os.ftruncate(descriptor, size)
    finally:
        os.close(descriptor)


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


def usage(path: Path) -> Usage:
    """The space and inodes of the filesystem at path.

    On the event loop, as a thread hop would cost more than the call: btrfs answers
    statfs from counters in memory (no I/O, no lock that sleeps).
    """
    stats = os.statvfs(path)
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
