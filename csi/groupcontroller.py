"""CSI GroupController service: crash-consistent snapshots of several volumes at once.

A group snapshot is one read-only btrfs snapshot per source volume, cut so that
together they hold what a crash at one instant would have left on every volume
(see Pool.snapshot_group). It is recorded like everything else: the members are
cut under pending names, the group and its member snapshots written READY in one
durable write, then the members moved into place, so a crash before the write is
undone at the next start and one after it finished. Members are ordinary snapshots (listed,
fetched and restored as any other) that carry their group's id; they are deleted
with their group, not one by one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc

from csi import validation
from csi.controller import snapshot_key, snapshot_message, timestamp, volume_key
from csi.errors import (
    AbortedError,
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    quoted,
    rpc,
)
from csi.pool import pending
from csi.state import (
    Entry,
    GroupSnapshotRecord,
    SnapshotRecord,
    Status,
    VolumeRecord,
    create_recorded,
    delete_recorded,
    live,
)
from csi.v1 import csi_pb2, csi_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Sequence

    from csi.driver import CsiDriver

RPC = csi_pb2.GroupControllerServiceCapability.RPC
Context = grpc.aio.ServicerContext[object, object]
# Cuts tried before giving up while a member keeps being written (ABORTED: the CO
# retries later, with backoff).
CUT_ATTEMPTS = 5
CUT_RETRY_DELAY = 0.05


def group_key(group_snapshot_id: str) -> str:
    return f"group-snapshot:{group_snapshot_id}"


def group_name_key(name: str) -> str:
    return f"group-snapshot-name:{name}"


class GroupControllerServicer(csi_pb2_grpc.GroupControllerServicer):
    CAPABILITIES = (
        csi_pb2.GroupControllerServiceCapability(
            rpc=RPC(type=RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT)
        ),
    )

    def __init__(self, driver: CsiDriver) -> None:
        self.driver = driver

    @rpc
    async def GroupControllerGetCapabilities(
        self, request: csi_pb2.GroupControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.GroupControllerGetCapabilitiesResponse:
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=self.CAPABILITIES)

    def _message(self, group: GroupSnapshotRecord) -> csi_pb2.VolumeGroupSnapshot:
        snapshots = self.driver.store.state.snapshots
        members = [snapshots[s] for s in group.snapshot_ids if s in snapshots]
        return csi_pb2.VolumeGroupSnapshot(
            group_snapshot_id=group.id,
            snapshots=[snapshot_message(m) for m in members],
            creation_time=timestamp(group.created),
            ready_to_use=group.status is Status.READY,
        )

    @rpc
    async def CreateVolumeGroupSnapshot(
        self, request: csi_pb2.CreateVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.CreateVolumeGroupSnapshotResponse:
        validation.required(request, "name", "source_volume_ids")
        name = validation.name(request.name)
        if request.parameters:
            raise InvalidArgumentError("parameters: none are supported")
        sources = list(request.source_volume_ids)
        if any(not source for source in sources):
            raise InvalidArgumentError("source_volume_ids: an id is empty")
        if len(set(sources)) != len(sources):
            raise InvalidArgumentError("source_volume_ids: a volume is named twice")
        key = group_name_key(name)
        with self.driver.locks.hold(key):
            group = self.driver.store.state.group_snapshot_by_name(
                name
            ) or self.driver.operations.running(key, GroupSnapshotRecord)
            if group is None:
                volume_ids = [
                    validation.object_id(
                        source, validation.VOLUME_PREFIX, f"source_volume_ids[{i}]"
                    )
                    for i, source in enumerate(sources)
                ]
                volumes = [self.driver.volume(v) for v in volume_ids]
                group, members = self._records(name, volumes)
                self.driver.operations.start(key, group, self._cut(group, members))
            elif sorted(group.source_volume_ids) != sorted(sources):
                raise AlreadyExistsError(
                    f"a group snapshot named {quoted(name)} exists for other volumes"
                )
        await self.driver.operations.settled(key, group, f"group snapshot {quoted(name)}")
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self._message(group))

    @staticmethod
    def _records(
        name: str, volumes: Sequence[VolumeRecord]
    ) -> tuple[GroupSnapshotRecord, list[SnapshotRecord]]:
        now = time.time()
        group = GroupSnapshotRecord(
            id=validation.new_id(validation.GROUP_SNAPSHOT_PREFIX),
            name=name,
            source_volume_ids=[v.id for v in volumes],
            snapshot_ids=[validation.new_id(validation.SNAPSHOT_PREFIX) for _ in volumes],
            created=now,
        )
        members = [
            SnapshotRecord(
                id=snapshot_id,
                name="",
                source_volume_id=volume.id,
                size=volume.capacity,
                created=now,
                group_snapshot_id=group.id,
            )
            for snapshot_id, volume in zip(group.snapshot_ids, volumes, strict=True)
        ]
        return group, members

    async def _cut(self, group: GroupSnapshotRecord, members: Sequence[SnapshotRecord]) -> None:
        pool = self.driver.pool
        paths = [pool.snapshot_path(m.id) for m in members]
        pairs = [
            (pool.volume_path(m.source_volume_id), pending(path))
            for m, path in zip(members, paths, strict=True)
        ]

        async def work() -> None:
            for attempt in range(CUT_ATTEMPTS):
                if await pool.snapshot_group(pairs):
                    group.created = time.time()
                    for member in members:
                        member.created = group.created
                    return
                await asyncio.sleep(CUT_RETRY_DELAY * 2**attempt)
            raise AbortedError(
                f"the volumes of group snapshot {quoted(group.name)} were written to during "
                f"each of {CUT_ATTEMPTS} cuts; try again"
            )

        async def undo() -> None:
            for path in paths:
                await pool.delete_made(path)

        async def place() -> None:
            for path in paths:
                await pool.place(path)

        state = self.driver.store.state
        entries: list[Entry] = [(state.group_snapshots, group.id, group)]
        entries += [(state.snapshots, m.id, m) for m in members]
        with self.driver.locks.hold(
            *(volume_key(v) for v in group.source_volume_ids),
            *(snapshot_key(m.id) for m in members),
        ):
            await create_recorded(self.driver.store, entries, work, undo, place)

    @staticmethod
    def _check_members(requested: Sequence[str], group: GroupSnapshotRecord) -> None:
        """The caller's list of the group's snapshots, when it sends one, must be the group's."""
        if requested and sorted(requested) != sorted(group.snapshot_ids):
            raise InvalidArgumentError(
                f"snapshot_ids do not match the snapshots of group snapshot {group.id}"
            )

    @rpc
    async def DeleteVolumeGroupSnapshot(
        self, request: csi_pb2.DeleteVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteVolumeGroupSnapshotResponse:
        validation.required(request, "group_snapshot_id")
        try:
            group_id = validation.object_id(
                request.group_snapshot_id, validation.GROUP_SNAPSHOT_PREFIX, "group_snapshot_id"
            )
        except NotFoundError:
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()  # never existed: deleted already
        state = self.driver.store.state
        with self.driver.locks.hold(group_key(group_id)):
            group = state.group_snapshots.get(group_id)
            if group is None:
                return csi_pb2.DeleteVolumeGroupSnapshotResponse()
            self._check_members(request.snapshot_ids, group)
            with self.driver.locks.hold(
                group_name_key(group.name), *(snapshot_key(s) for s in group.snapshot_ids)
            ):
                entries: list[Entry] = [(state.group_snapshots, group_id, group)]
                entries += [
                    (state.snapshots, s, state.snapshots[s])
                    for s in group.snapshot_ids
                    if s in state.snapshots
                ]

                async def work() -> None:
                    for snapshot_id in group.snapshot_ids:
                        await self.driver.pool.delete_subvolume(
                            self.driver.pool.snapshot_path(snapshot_id)
                        )

                await delete_recorded(self.driver.store, entries, work)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    @rpc
    async def GetVolumeGroupSnapshot(
        self, request: csi_pb2.GetVolumeGroupSnapshotRequest, context: Context
    ) -> csi_pb2.GetVolumeGroupSnapshotResponse:
        validation.required(request, "group_snapshot_id")
        group_id = validation.object_id(
            request.group_snapshot_id, validation.GROUP_SNAPSHOT_PREFIX, "group_snapshot_id"
        )
        group = live(self.driver.store.state.group_snapshots, group_id, "group snapshot")
        self._check_members(request.snapshot_ids, group)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self._message(group))
