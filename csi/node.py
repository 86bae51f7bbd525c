"""CSI Node service: stage, publish and measure volumes with real mounts.

Filesystem volumes: NodeStage bind-mounts the volume's subvolume at the staging
path; NodePublish bind-mounts the staging path at the target (read-only when
asked). Block volumes: NodeStage attaches the volume's file to a loop device;
NodePublish bind-mounts that device onto a file at the target; a read-only
publication gets a read-only loop device of its own instead. Every path from a
request must be inside the kubelet's directory (see validation.request_path).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from csi import mounts, validation
from csi.controller import volume_key
from csi.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    quoted,
    rpc,
)
from csi.pool import VOLUMES, is_subvolume, usage
from csi.state import (
    PublishRecord,
    Rec,
    StageRecord,
    Status,
    VolumeRecord,
    create_recorded,
    delete_recorded,
)
from csi.v1 import csi_pb2, csi_pb2_grpc

if TYPE_CHECKING:
    from csi.driver import CsiDriver

RPC = csi_pb2.NodeServiceCapability.RPC
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
Unit = csi_pb2.VolumeUsage.Unit
Context = grpc.aio.ServicerContext[object, object]


class NodeServicer(csi_pb2_grpc.NodeServicer):
    CAPABILITIES = tuple(
        csi_pb2.NodeServiceCapability(rpc=RPC(type=kind))
        for kind in (
            RPC.STAGE_UNSTAGE_VOLUME,
            RPC.GET_VOLUME_STATS,
            RPC.EXPAND_VOLUME,
            RPC.VOLUME_CONDITION,
            RPC.SINGLE_NODE_MULTI_WRITER,
        )
    )

    def __init__(self, driver: CsiDriver) -> None:
        self.driver = driver

    def _path(self, value: str, field: str) -> Path:
        return validation.request_path(value, self.driver.kubelet_dir, field)

    @staticmethod
    def _access_type(capability: csi_pb2.VolumeCapability, volume: VolumeRecord) -> None:
        validation.access_type(capability, volume.block, volume.id, "volume_capability")

    # --- stage ----------------------------------------------------------------------------

    @rpc
    async def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: Context
    ) -> csi_pb2.NodeStageVolumeResponse:
        validation.required(request, "volume_id", "staging_target_path", "volume_capability")
        path = self._path(request.staging_target_path, "staging_target_path")
        validation.capability(request.volume_capability, "volume_capability")
        volume_id = validation.object_id(request.volume_id, validation.VOLUME_PREFIX, "volume_id")
        with self.driver.locks.hold(volume_key(volume_id)):
            volume = self.driver.volume(volume_id)
            self._access_type(request.volume_capability, volume)
            key = validation.capability_key(request.volume_capability)
            state = self.driver.store.state
            existing = state.stagings.get(str(path))
            if existing is not None and existing.status is Status.READY:
                if existing.volume_id == volume_id and existing.capability == key:
                    return csi_pb2.NodeStageVolumeResponse()
                raise AlreadyExistsError(
                    f"staging_target_path {quoted(str(path))} holds another staging"
                )
            other = next(
                (
                    s
                    for s in state.stagings.values()
                    if s.volume_id == volume_id and s.path != str(path)
                ),
                None,
            )
            if other is not None:
                raise FailedPreconditionError(
                    f"volume {volume_id} is already staged at {other.path}"
                )
            record = StageRecord(volume_id=volume_id, path=str(path), capability=key)

            async def work() -> None:
                await self._stage(volume, record, request.volume_capability)

            async def undo() -> None:
                await self._unstage(record)

            await create_recorded(
                self.driver.store, [(state.stagings, record.path, record)], work, undo
            )
        return csi_pb2.NodeStageVolumeResponse()

    async def _stage(
        self, volume: VolumeRecord, record: StageRecord, capability: csi_pb2.VolumeCapability
    ) -> None:
        path = Path(record.path)
        if volume.block:
            await mounts.make_directory(self.driver.kubelet_dir, path)
            record.loop_device = await self.driver.pool.attach(
                self.driver.pool.disk_path(volume.id)
            )
            return
        source = self.driver.pool.volume_path(volume.id)
        if not is_subvolume(source):
            raise NotFoundError(f"volume {volume.id} has no data on this node")
        options = list(capability.mount.mount_flags)
        await mounts.bind(source, self.driver.kubelet_dir, path, readonly=False, options=options)

    async def _unstage(self, record: StageRecord) -> None:
        await mounts.unmount(self.driver.kubelet_dir, Path(record.path))
        disk = self.driver.pool.disk_path(record.volume_id)
        if disk.exists():
            for device in await self.driver.pool.loop_devices(disk):
                await self.driver.pool.detach(device)

    @rpc
    async def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        validation.required(request, "volume_id", "staging_target_path")
        path = self._path(request.staging_target_path, "staging_target_path")
        await self._tear_down(
            self.driver.store.state.stagings, path, request.volume_id, self._unstage
        )
        return csi_pb2.NodeUnstageVolumeResponse()

    async def _tear_down(
        self,
        table: dict[str, Rec],
        path: Path,
        volume_id: str,
        undo: Callable[[Rec], Awaitable[None]],
    ) -> None:
        """Undo the staging or publication of volume_id at path; OK if there is none.

        Also OK when the volume itself is gone: the kubelet treats every error of
        NodeUnpublish/NodeUnstage as a failed teardown and retries it forever
        (csi_mounter.go TearDownAt, csi_attacher.go UnmountDevice), so NOT_FOUND
        would leave the pod terminating for good. Nothing of ours is at the path.
        """
        with self.driver.locks.hold(volume_key(volume_id)):
            record = table.get(str(path))
            if record is None or getattr(record, "volume_id", None) != volume_id:
                return
            await delete_recorded(
                self.driver.store, [(table, str(path), record)], partial(undo, record)
            )

    # --- publish --------------------------------------------------------------------------

    @rpc
    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Context
    ) -> csi_pb2.NodePublishVolumeResponse:
        # staging_target_path: the CO MUST set it for a driver with STAGE_UNSTAGE_VOLUME.
        validation.required(
            request, "volume_id", "target_path", "volume_capability", "staging_target_path"
        )
        target = self._path(request.target_path, "target_path")
        staging = self._path(request.staging_target_path, "staging_target_path")
        validation.capability(request.volume_capability, "volume_capability")
        volume_id = validation.object_id(request.volume_id, validation.VOLUME_PREFIX, "volume_id")
        with self.driver.locks.hold(volume_key(volume_id)):
            volume = self.driver.volume(volume_id)
            self._access_type(request.volume_capability, volume)
            state = self.driver.store.state
            stage = state.stagings.get(str(staging))
            if stage is None or stage.volume_id != volume_id or stage.status is not Status.READY:
                raise FailedPreconditionError(f"volume {volume_id} is not staged at {staging}")
            mode = request.volume_capability.access_mode.mode
            readonly = request.readonly or mode in validation.READ_ONLY_MODES
            record = PublishRecord(
                volume_id=volume_id,
                path=str(target),
                staging_path=str(staging),
                capability=validation.capability_key(request.volume_capability),
                readonly=readonly,
            )
            existing = state.publications.get(record.path)
            if existing is not None and existing.status is Status.READY:
                if (
                    existing.volume_id,
                    existing.capability,
                    existing.readonly,
                    existing.staging_path,
                ) == (
                    volume_id,
                    record.capability,
                    readonly,
                    record.staging_path,
                ):
                    return csi_pb2.NodePublishVolumeResponse()
                raise AlreadyExistsError(
                    f"target_path {quoted(record.path)} is published differently"
                )
            self._check_single_writer(volume_id, record.path, mode)
            flags = list(request.volume_capability.mount.mount_flags)

            async def work() -> None:
                await self._publish(volume, stage, record, flags)

            await create_recorded(
                self.driver.store,
                [(state.publications, record.path, record)],
                work,
                partial(self._unpublish, record),
            )
        return csi_pb2.NodePublishVolumeResponse()

    def _check_single_writer(self, volume_id: str, target: str, mode: int) -> None:
        """SINGLE_NODE_SINGLE_WRITER: one target at a time, whichever side asked for it."""
        single = Mode.SINGLE_NODE_SINGLE_WRITER
        for other in self.driver.store.state.publications.values():
            if other.volume_id != volume_id or other.path == target:
                continue
            other_mode = csi_pb2.VolumeCapability.FromString(
                bytes.fromhex(other.capability)
            ).access_mode.mode
            if single in (mode, other_mode):
                raise FailedPreconditionError(
                    f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already "
                    f"published at {other.path}"
                )

    async def _publish(
        self, volume: VolumeRecord, stage: StageRecord, record: PublishRecord, flags: list[str]
    ) -> None:
        target = Path(record.path)
        root = self.driver.kubelet_dir
        if volume.block:
            device = stage.loop_device
            if record.readonly:
                # A read-only mount stops writes to files, not to a device node, and the
                # staged device also serves read-write publications: this one gets its
                # own read-only loop device over the same file.
                disk = self.driver.pool.disk_path(volume.id)
                record.loop_device = await self.driver.pool.attach(disk, readonly=True)
                device = record.loop_device
            await mounts.bind(Path(device), root, target, record.readonly, [], file=True)
        else:
            await mounts.rebind(root, Path(stage.path), target, record.readonly, flags)

    async def _unpublish(self, record: PublishRecord) -> None:
        target = Path(record.path)
        await mounts.unmount(self.driver.kubelet_dir, target)
        await mounts.remove_mount_point(self.driver.kubelet_dir, target)
        disk = self.driver.pool.disk_path(record.volume_id)
        # Only while it still serves this volume: a device detached behind our back may
        # since have been given to another file.
        if record.loop_device and record.loop_device in await self.driver.pool.loop_devices(disk):
            await self.driver.pool.detach(record.loop_device)

    @rpc
    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        validation.required(request, "volume_id", "target_path")
        target = self._path(request.target_path, "target_path")
        await self._tear_down(
            self.driver.store.state.publications, target, request.volume_id, self._unpublish
        )
        return csi_pb2.NodeUnpublishVolumeResponse()

    # --- stats and expansion -----------------------------------------------------------------

    def _volume_at(
        self, request: csi_pb2.NodeGetVolumeStatsRequest | csi_pb2.NodeExpandVolumeRequest
    ) -> tuple[VolumeRecord, StageRecord | PublishRecord]:
        """The volume and where it is staged or published at volume_path, or NOT_FOUND.

        volume_path is only a key into our records, never a path we touch, so any
        string that names no staging or publication of the volume (a relative path
        included) is NOT_FOUND, as the spec has it.
        """
        validation.required(request, "volume_id", "volume_path")
        volume_id = validation.object_id(request.volume_id, validation.VOLUME_PREFIX, "volume_id")
        volume = self.driver.volume(volume_id)
        state = self.driver.store.state
        path = request.volume_path
        where = state.publications.get(path) or state.stagings.get(path)
        if where is None or where.volume_id != volume_id:
            raise NotFoundError(f"volume {volume_id} is not staged or published at {quoted(path)}")
        return volume, where

    async def _condition(
        self, volume: VolumeRecord, where: StageRecord | PublishRecord
    ) -> str | None:
        """What is wrong with the volume at this path, or None if it is healthy."""
        source = self.driver.pool.volume_path(volume.id)
        if not is_subvolume(source):
            return "the volume's subvolume is missing from the pool"
        if volume.block:
            problem = await self._loop_condition(volume, where)
            # A block staging is a loop device only: nothing is mounted there.
            if problem is not None or isinstance(where, StageRecord):
                return problem
        mount = await mounts.mounted_at(Path(where.path))
        if mount is None:
            return f"nothing is mounted at {where.path}"
        if not volume.block and mount.root != f"/{VOLUMES}/{volume.id}":
            return f"{where.path} shows {mount.root}, not the volume"
        return None

    async def _loop_condition(
        self, volume: VolumeRecord, where: StageRecord | PublishRecord
    ) -> str | None:
        disk = self.driver.pool.disk_path(volume.id)
        if not disk.exists():
            return "the volume's block file is missing"
        if where.loop_device and where.loop_device not in await self.driver.pool.loop_devices(disk):
            return "the loop device is detached"
        return None

    @rpc
    async def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: Context
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume, where = self._volume_at(request)
        problem = await self._condition(volume, where)
        condition = csi_pb2.VolumeCondition(
            abnormal=problem is not None, message=problem or "healthy"
        )
        # Usage goes out even with an abnormal condition: the kubelet drops an answer
        # without usage before it reads the condition (csi_client.go NodeGetVolumeStats).
        response = csi_pb2.NodeGetVolumeStatsResponse(volume_condition=condition)
        subvolume = self.driver.pool.volume_path(volume.id)
        if volume.block or not is_subvolume(subvolume):
            response.usage.add(total=volume.capacity, unit=Unit.BYTES)
            return response
        used = await self.driver.pool.referenced(subvolume)
        response.usage.add(
            total=volume.capacity,
            used=used,
            available=max(0, volume.capacity - used),
            unit=Unit.BYTES,
        )
        # Inode counts come from the mounted volume: only known while it is mounted.
        if problem is not None:
            return response
        stats = usage(Path(where.path))
        if stats.inodes:
            response.usage.add(
                total=stats.inodes,
                used=stats.inodes_used,
                available=stats.inodes_free,
                unit=Unit.INODES,
            )
        return response

    @rpc
    async def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: Context
    ) -> csi_pb2.NodeExpandVolumeResponse:
        """Grow the volume to capacity_range, whether or not a ControllerExpandVolume did.

        On a cluster the controller side runs elsewhere and touches nothing (csi.expansion),
        so the size the kubelet sends here (the PV's new capacity) is the truth. The kubelet
        calls this with volume_path = the publish target (filesystem, after NodePublish or
        online), the staging path (kubelets that expand right after NodeStage), or the
        block publish path; each names a staging or publication of ours.
        """
        validation.required(request, "volume_id", "volume_path")
        if request.HasField("volume_capability"):
            validation.capability(request.volume_capability, "volume_capability")
        with self.driver.locks.hold(volume_key(request.volume_id)):
            volume, _ = self._volume_at(request)
            if request.HasField("volume_capability"):
                self._access_type(request.volume_capability, volume)
            if request.HasField("capacity_range"):
                await self.driver.expand(volume, request.capacity_range)
            if volume.block:
                # A loop device keeps the size its file had when it was attached until told;
                # done on every call, so a retry after a crash in between still does it.
                for device in await self.driver.pool.loop_devices(
                    self.driver.pool.disk_path(volume.id)
                ):
                    await self.driver.pool.refresh(device)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=volume.capacity)

    # --- node information ----------------------------------------------------------------

    @rpc
    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=self.CAPABILITIES)

    @rpc
    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: Context
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.driver.config.node_id, accessible_topology=self.driver.topology
        )
