"""After a start (or a crash), make the state store and reality agree.

Operations record their intent before they act, so whatever a crash interrupted
is visible as a record that is not READY: it is undone (a half-done mount
unmounted) or finished (a deletion). Creates in the pool are visible by their
pending subvolumes instead: moved into place if their READY record was written,
else deleted. READY records
whose mount or loop device is gone (a reboot) are dropped, and mounts or loop
devices of pool volumes that no record explains are removed. Subvolumes that no
record explains are only reported: without a record we cannot tell leaked data
from a lost state file, and deleting data is not a guess to make.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

from csi import mounts
from csi.errors import InvalidArgumentError
from csi.pool import VOLUMES, Pool
from csi.state import Rec, State, StateStore, Status

log = logging.getLogger(__name__)


async def reconcile(store: StateStore, pool: Pool, kubelet_dir: Path) -> None:
    state = store.state
    await _volumes(state, pool)
    await _snapshots(state, pool)
    _group_snapshots(state)
    table = await mounts.mounts()
    mounted = {m.mount_point for m in table}
    await _publications(state, mounted, kubelet_dir)
    await _stagings(state, pool, mounted, kubelet_dir)
    await _stray_mounts(state, kubelet_dir, table)
    await _stray_loops(state, pool)
    await store.save()
    _report_orphans(state, pool)


async def _volumes(state: State, pool: Pool) -> None:
    for record in list(state.volumes.values()):
        if record.status is Status.READY:
            continue
        log.warning(
            "finishing an interrupted volume operation",
            extra={"volume": record.id, "status": record.status},
        )
        await pool.delete_made(pool.volume_path(record.id))
        del state.volumes[record.id]
    await pool.finish_pending(pool.volumes, _ready(state.volumes))


async def _snapshots(state: State, pool: Pool) -> None:
    for record in list(state.snapshots.values()):
        if record.status is Status.READY:
            continue
        log.warning("finishing an interrupted snapshot operation", extra={"snapshot": record.id})
        await pool.delete_made(pool.snapshot_path(record.id))
        del state.snapshots[record.id]
    await pool.finish_pending(pool.snapshots, _ready(state.snapshots))


def _ready(table: Mapping[str, Rec]) -> set[str]:
    return {key for key, record in table.items() if record.status is Status.READY}


def _group_snapshots(state: State) -> None:
    """Drop groups an interrupted cut or deletion left.

    A group and its members change status in one write, so _snapshots has already
    removed the members of these.
    """
    for record in list(state.group_snapshots.values()):
        if record.status is Status.READY:
            continue
        log.warning("finishing an interrupted group snapshot operation", extra={"group": record.id})
        del state.group_snapshots[record.id]


async def _unmount(kubelet_dir: Path, path: Path) -> bool:
    """Unmount what is at a recorded path; log (and go on) if that cannot be done safely."""
    try:
        await mounts.unmount(kubelet_dir, path)
    except (OSError, InvalidArgumentError) as error:
        log.error("cannot unmount; leaving it", extra={"path": str(path), "error": str(error)})  # noqa: TRY400 (the message says it)
        return False
    return True


async def _publications(state: State, mounted: set[str], kubelet_dir: Path) -> None:
    for record in list(state.publications.values()):
        if record.status is Status.READY and record.path in mounted:
            continue
        log.warning("dropping an unfinished or vanished publication", extra={"target": record.path})
        target = Path(record.path)
        if await _unmount(kubelet_dir, target):
            with contextlib.suppress(OSError, InvalidArgumentError):
                await mounts.remove_mount_point(kubelet_dir, target)
        del state.publications[record.path]


async def _stagings(state: State, pool: Pool, mounted: set[str], kubelet_dir: Path) -> None:
    for record in list(state.stagings.values()):
        volume = state.volumes.get(record.volume_id)
        disk = pool.disk_path(record.volume_id)
        if record.status is Status.READY and volume is not None:
            if volume.block:
                devices = await pool.loop_devices(disk) if disk.exists() else []
                if record.loop_device in devices:
                    continue
            elif record.path in mounted:
                continue
        log.warning("dropping an unfinished or vanished staging", extra={"staging": record.path})
        await _unmount(kubelet_dir, Path(record.path))
        if disk.exists():
            for device in await pool.loop_devices(disk):
                await pool.detach(device)
        del state.stagings[record.path]
        for publication in list(state.publications.values()):
            if publication.staging_path == record.path:
                await _unmount(kubelet_dir, Path(publication.path))
                del state.publications[publication.path]


async def _stray_mounts(state: State, kubelet_dir: Path, table: list[mounts.Mount]) -> None:
    """Bind mounts of pool volumes under the kubelet's directory that no record explains."""
    known = set(state.stagings) | set(state.publications)
    prefix = f"/{VOLUMES}/"
    for mount in reversed(table):
        point = Path(mount.mount_point)
        if (
            mount.fs_type == "btrfs"
            and mount.root.startswith(prefix)
            and point.is_relative_to(kubelet_dir)
            and mount.mount_point not in known
        ):
            log.warning("unmounting a stray volume mount", extra={"path": mount.mount_point})
            await _unmount(kubelet_dir, point)


async def _stray_loops(state: State, pool: Pool) -> None:
    known = {s.loop_device for s in state.stagings.values()}
    known |= {p.loop_device for p in state.publications.values() if p.loop_device}
    for volume in state.volumes.values():
        disk = pool.disk_path(volume.id)
        if not volume.block or not disk.exists():
            continue
        for device in await pool.loop_devices(disk):
            if device not in known:
                log.warning("detaching a stray loop device", extra={"device": device})
                await pool.detach(device)


def _report_orphans(state: State, pool: Pool) -> None:
    for directory, known in ((pool.volumes, state.volumes), (pool.snapshots, state.snapshots)):
        for orphan in sorted(pool.subvolume_ids(directory) - set(known)):
            log.error(
                "subvolume without a record; leaving it alone",
                extra={"path": str(directory / orphan)},
            )
