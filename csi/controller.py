"""CSI Controller service: volumes and snapshots in the node's btrfs pool.

Every mutating call records its intent in the state store before touching the
disk and its outcome after, holding a lock per volume id and per name (a second
concurrent call on either gets ABORTED). Repeated calls with the same arguments
return the same result (idempotency); a name reused with other arguments is
ALREADY_EXISTS.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf import timestamp_pb2, wrappers_pb2

from csi import capacity, expansion, validation
from csi.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    ResourceExhaustedError,
    UnimplementedError,
    quoted,
    rpc,
)
from csi.pool import pending
from csi.state import (
    SnapshotRecord,
    Status,
    VolumeRecord,
    create_recorded,
    delete_recorded,
    live,
)
from csi.v1 import csi_pb2, csi_pb2_grpc

if TYPE_CHECKING:
    from csi.driver import CsiDriver

RPC = csi_pb2.ControllerServiceCapability.RPC
Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")


def volume_key(volume_id: str) -> str:
    return f"volume:{volume_id}"


def volume_name_key(name: str) -> str:
    return f"volume-name:{name}"


def snapshot_key(snapshot_id: str) -> str:
    return f"snapshot:{snapshot_id}"


def page(
    items: Sequence[T], key: Callable[[T], str], max_entries: int, token: str
) -> tuple[list[T], str]:
    """One page of items sorted by key, starting after nothing or at `token`.

    The token is the key of the first entry of the next page, so a page stays
    correct when entries before it are deleted in between calls.
    """
    if max_entries < 0:
        raise InvalidArgumentError("max_entries must not be negative")
    if token and validation.object_id_problem(token) is not None:
        raise AbortedError(f"starting_token {quoted(token)} is not a token this driver issued")
    ordered = sorted(items, key=key)
    remaining = [item for item in ordered if key(item) >= token] if token else ordered
    if max_entries and len(remaining) > max_entries:
        return remaining[:max_entries], key(remaining[max_entries])
    return remaining, ""


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def snapshot_message(record: SnapshotRecord) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        size_bytes=record.size,
        snapshot_id=record.id,
        source_volume_id=record.source_volume_id,
        creation_time=timestamp(record.created),
        ready_to_use=record.status is Status.READY,
        group_snapshot_id=record.group_snapshot_id,
    )


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    CAPABILITIES = tuple(
        csi_pb2.ControllerServiceCapability(rpc=RPC(type=kind))
        for kind in (
            RPC.CREATE_DELETE_VOLUME,
            RPC.LIST_VOLUMES,
            RPC.GET_CAPACITY,
            RPC.CREATE_DELETE_SNAPSHOT,
            RPC.LIST_SNAPSHOTS,
            RPC.CLONE_VOLUME,
            RPC.EXPAND_VOLUME,
            RPC.SINGLE_NODE_MULTI_WRITER,
            RPC.GET_SNAPSHOT,
        )
    )

    def __init__(self, driver: CsiDriver) -> None:
        self.driver = driver

    # --- volumes ------------------------------------------------------------------------

    def _response_volume(self, record: VolumeRecord) -> csi_pb2.Volume:
        volume = csi_pb2.Volume(
            capacity_bytes=record.capacity,
            volume_id=record.id,
            accessible_topology=[self.driver.topology],
        )
        kind, _, source_id = record.source.partition(":")
        if kind == "snapshot":
            volume.content_source.snapshot.snapshot_id = source_id
        elif kind == "volume":
            volume.content_source.volume.volume_id = source_id
        return volume

    def _check_topology(self, requirement: csi_pb2.TopologyRequirement) -> None:
        """Volumes live on this node: a requisite list must include it."""
        requisite = list(requirement.requisite)
        if requisite and not any(self._is_here(topology) for topology in requisite):
            raise ResourceExhaustedError(
                f"accessibility_requirements: this driver only provisions on node "
                f"{self.driver.config.node_id}"
            )

    def _is_here(self, topology: csi_pb2.Topology) -> bool:
        key = self.driver.config.topology_key
        return topology.segments.get(key, self.driver.config.node_id) == self.driver.config.node_id

    def _source(self, request: csi_pb2.CreateVolumeRequest, block: bool) -> tuple[str, int]:
        """The content source as "kind:id" and its size; ("", 0) for an empty volume."""
        if not request.HasField("volume_content_source"):
            return "", 0
        source = request.volume_content_source
        kind = source.WhichOneof("type")
        if kind == "snapshot":
            snapshot_id = validation.object_id(
                source.snapshot.snapshot_id,
                validation.SNAPSHOT_PREFIX,
                "volume_content_source.snapshot.snapshot_id",
            )
            snapshot = self.driver.store.state.snapshots.get(snapshot_id)
            if snapshot is None or snapshot.status is not Status.READY:
                raise NotFoundError(f"snapshot {snapshot_id} does not exist")
            origin = self.driver.store.state.volumes.get(snapshot.source_volume_id)
            if origin is not None and origin.block != block:
                raise InvalidArgumentError("volume_content_source: block and filesystem differ")
            return f"snapshot:{snapshot_id}", snapshot.size
        if kind == "volume":
            volume_id = validation.object_id(
                source.volume.volume_id,
                validation.VOLUME_PREFIX,
                "volume_content_source.volume.volume_id",
            )
            origin = self.driver.volume(volume_id)
            if origin.block != block:
                raise InvalidArgumentError("volume_content_source: block and filesystem differ")
            return f"volume:{volume_id}", origin.capacity
        raise InvalidArgumentError("volume_content_source: snapshot or volume is required")

    @rpc
    async def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: Context
    ) -> csi_pb2.CreateVolumeResponse:
        validation.required(request, "name", "volume_capabilities")
        name = validation.name(request.name)
        block = validation.capabilities(list(request.volume_capabilities))
        if request.parameters:
            key = sorted(request.parameters)[0]
            raise InvalidArgumentError(f"parameters: unknown parameter {quoted(key)}")
        if request.mutable_parameters:
            raise InvalidArgumentError("mutable_parameters: not supported (no MODIFY_VOLUME)")
        range_ = request.capacity_range if request.HasField("capacity_range") else None
        size = capacity.size_for(range_)
        self._check_topology(request.accessibility_requirements)
        key = volume_name_key(name)
        with self.driver.locks.hold(key):
            source, source_size = self._source(request, block)
            record = self.driver.store.state.volume_by_name(name) or self.driver.operations.running(
                key, VolumeRecord
            )
            if record is None:
                if source_size > size:
                    if (
                        range_ is not None
                        and range_.limit_bytes
                        and source_size > range_.limit_bytes
                    ):
                        raise OutOfRangeError(
                            f"capacity_range: the source is {source_size} bytes, "
                            "more than limit_bytes"
                        )
                    size = source_size
                self.driver.check_space(size, size)
                record = VolumeRecord(
                    id=validation.new_id(validation.VOLUME_PREFIX),
                    name=name,
                    capacity=size,
                    block=block,
                    parameters={},
                    source=source,
                    created=time.time(),
                )
                self.driver.operations.start(key, record, self._provision(record))
            elif (
                record.block != block
                or record.source != source
                or not capacity.fits(record.capacity, range_)
            ):
                raise AlreadyExistsError(
                    f"a volume named {quoted(name)} exists with a different size, "
                    "access type or source"
                )
        await self.driver.operations.settled(key, record, f"volume {quoted(name)}")
        return csi_pb2.CreateVolumeResponse(volume=self._response_volume(record))

    async def _provision(self, record: VolumeRecord) -> None:
        """Create the volume's subvolume (empty, or a snapshot of its source), recorded."""
        pool = self.driver.pool
        path = pool.volume_path(record.id)
        kind, _, source_id = record.source.partition(":")
        source = {"snapshot": pool.snapshot_path, "volume": pool.volume_path}.get(kind)

        async def work() -> None:
            origin = source(source_id) if source is not None else None
            await pool.provision(pending(path), origin, record.block, record.capacity)

        # record.source ("snapshot:<id>", "volume:<id>") is also its source's lock key.
        source_lock = [record.source] if kind else []
        with self.driver.locks.hold(volume_key(record.id), *source_lock):
            await create_recorded(
                self.driver.store,
                [(self.driver.store.state.volumes, record.id, record)],
                work,
                partial(pool.delete_made, path),
                partial(pool.place, path),
            )

    def _deleter(self, path: Path) -> Callable[[], Awaitable[None]]:
        async def delete() -> None:
            await self.driver.pool.delete_subvolume(path)

        return delete

    @rpc
    async def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: Context
    ) -> csi_pb2.DeleteVolumeResponse:
        validation.required(request, "volume_id")
        try:
            volume_id = validation.object_id(
                request.volume_id, validation.VOLUME_PREFIX, "volume_id"
            )
        except NotFoundError:
            return csi_pb2.DeleteVolumeResponse()  # never existed: deleted already
        with self.driver.locks.hold(volume_key(volume_id)):
            record = self.driver.store.state.volumes.get(volume_id)
            if record is None:
                return csi_pb2.DeleteVolumeResponse()
            state = self.driver.store.state
            in_use = [p.path for p in state.stagings.values() if p.volume_id == volume_id]
            in_use += [p.path for p in state.publications.values() if p.volume_id == volume_id]
            if in_use:
                raise FailedPreconditionError(f"volume {volume_id} is still in use at {in_use[0]}")
            with self.driver.locks.hold(f"volume-name:{record.name}"):
                path = self.driver.pool.volume_path(volume_id)
                await delete_recorded(
                    self.driver.store, [(state.volumes, volume_id, record)], self._deleter(path)
                )
        return csi_pb2.DeleteVolumeResponse()

    @rpc
    async def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: Context
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        volume_id = validation.validation_request(request)
        record = self.driver.volume(volume_id)
        try:
            block = validation.capabilities(list(request.volume_capabilities))
        except InvalidArgumentError as error:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=str(error))
        if block != record.block:
            kind = "block" if record.block else "filesystem"
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=f"this is a {kind} volume")
        if request.parameters or request.mutable_parameters:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="no parameters are supported")
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @rpc
    async def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: Context
    ) -> csi_pb2.ListVolumesResponse:
        ready = [v for v in self.driver.store.state.volumes.values() if v.status is Status.READY]
        records, next_token = page(
            ready, lambda v: v.id, request.max_entries, request.starting_token
        )
        return csi_pb2.ListVolumesResponse(
            entries=[
                csi_pb2.ListVolumesResponse.Entry(volume=self._response_volume(v)) for v in records
            ],
            next_token=next_token,
        )

    @rpc
    async def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: Context
    ) -> csi_pb2.GetCapacityResponse:
        available = self.driver.pool.space().available
        if request.parameters or not self._servable(request.volume_capabilities):
            available = 0  # nothing can be provisioned with these
        if request.HasField("accessible_topology") and not self._is_here(
            request.accessible_topology
        ):
            available = 0
        available = available // capacity.ALIGNMENT * capacity.ALIGNMENT
        return csi_pb2.GetCapacityResponse(
            available_capacity=available,
            maximum_volume_size=wrappers_pb2.Int64Value(value=available),
            minimum_volume_size=wrappers_pb2.Int64Value(value=capacity.MINIMUM),
        )

    @staticmethod
    def _servable(items: Sequence[csi_pb2.VolumeCapability]) -> bool:
        try:
            for index, item in enumerate(items):
                validation.capability(item, f"volume_capabilities[{index}]")
        except InvalidArgumentError:
            return False
        return True

    @rpc
    async def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=self.CAPABILITIES)

    @rpc
    async def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: Context
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        volume_id, _ = expansion.checked(request)
        with self.driver.locks.hold(volume_key(volume_id)):
            record = self.driver.volume(volume_id)
            if request.HasField("volume_capability"):
                validation.access_type(
                    request.volume_capability, record.block, volume_id, "volume_capability"
                )
            # This node holds the volume (a one-node cluster's resizer talks to it): grow it
            # now. NodeExpandVolume, asked for the same size, then finds it done.
            await self.driver.expand(record, request.capacity_range)
        # A block volume's loop device must see the new size: that is node work.
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=record.capacity, node_expansion_required=record.block
        )

    # --- not offered (see CAPABILITIES): explicit, so the set of RPCs is visible here ---

    @rpc
    async def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: Context
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        raise UnimplementedError("volumes are local: no PUBLISH_UNPUBLISH_VOLUME")

    @rpc
    async def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        raise UnimplementedError("volumes are local: no PUBLISH_UNPUBLISH_VOLUME")

    @rpc
    async def ControllerGetVolume(
        self, request: csi_pb2.ControllerGetVolumeRequest, context: Context
    ) -> csi_pb2.ControllerGetVolumeResponse:
        raise UnimplementedError("no GET_VOLUME capability")

    @rpc
    async def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: Context
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        raise UnimplementedError("no MODIFY_VOLUME capability")

    # --- snapshots ----------------------------------------------------------------------

    @rpc
    async def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: Context
    ) -> csi_pb2.CreateSnapshotResponse:
        validation.required(request, "name", "source_volume_id")
        name = validation.name(request.name)
        if request.parameters:
            raise InvalidArgumentError("parameters: none are supported")
        key = f"snapshot-name:{name}"
        with self.driver.locks.hold(key):
            record = self.driver.store.state.snapshot_by_name(
                name
            ) or self.driver.operations.running(key, SnapshotRecord)
            if record is None:
                volume_id = validation.object_id(
                    request.source_volume_id, validation.VOLUME_PREFIX, "source_volume_id"
                )
                volume = self.driver.volume(volume_id)
                record = SnapshotRecord(
                    id=validation.new_id(validation.SNAPSHOT_PREFIX),
                    name=name,
                    source_volume_id=volume_id,
                    size=volume.capacity,
                    created=time.time(),
                )
                self.driver.operations.start(key, record, self._snapshot(record))
            elif record.source_volume_id != request.source_volume_id:
                raise AlreadyExistsError(
                    f"a snapshot named {quoted(name)} exists for another volume"
                )
        await self.driver.operations.settled(key, record, f"snapshot {quoted(name)}")
        return csi_pb2.CreateSnapshotResponse(snapshot=snapshot_message(record))

    async def _snapshot(self, record: SnapshotRecord) -> None:
        pool = self.driver.pool
        path = pool.snapshot_path(record.id)
        source = pool.volume_path(record.source_volume_id)

        async def work() -> None:
            await pool.snapshot(source, pending(path), readonly=True)

        # Its own key too: a restore from it waits (ABORTED) until it is in place.
        with self.driver.locks.hold(volume_key(record.source_volume_id), snapshot_key(record.id)):
            await create_recorded(
                self.driver.store,
                [(self.driver.store.state.snapshots, record.id, record)],
                work,
                partial(pool.delete_made, path),
                partial(pool.place, path),
            )

    @rpc
    async def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: Context
    ) -> csi_pb2.DeleteSnapshotResponse:
        validation.required(request, "snapshot_id")
        try:
            snapshot_id = validation.object_id(
                request.snapshot_id, validation.SNAPSHOT_PREFIX, "snapshot_id"
            )
        except NotFoundError:
            return csi_pb2.DeleteSnapshotResponse()
        with self.driver.locks.hold(snapshot_key(snapshot_id)):
            state = self.driver.store.state
            record = state.snapshots.get(snapshot_id)
            if record is None:
                return csi_pb2.DeleteSnapshotResponse()
            if record.group_snapshot_id:
                # The spec lets us refuse: a group's snapshots go with the group.
                raise FailedPreconditionError(
                    f"snapshot {snapshot_id} belongs to group snapshot "
                    f"{record.group_snapshot_id}: delete the group"
                )
            with self.driver.locks.hold(f"snapshot-name:{record.name}"):
                path = self.driver.pool.snapshot_path(snapshot_id)
                await delete_recorded(
                    self.driver.store, [(state.snapshots, snapshot_id, record)], self._deleter(path)
                )
        return csi_pb2.DeleteSnapshotResponse()

    @rpc
    async def GetSnapshot(
        self, request: csi_pb2.GetSnapshotRequest, context: Context
    ) -> csi_pb2.GetSnapshotResponse:
        validation.required(request, "snapshot_id")
        snapshot_id = validation.object_id(
            request.snapshot_id, validation.SNAPSHOT_PREFIX, "snapshot_id"
        )
        # One being taken is there, not ready yet; one being deleted is gone.
        record = live(self.driver.store.state.snapshots, snapshot_id, "snapshot")
        return csi_pb2.GetSnapshotResponse(snapshot=snapshot_message(record))

    @rpc
    async def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: Context
    ) -> csi_pb2.ListSnapshotsResponse:
        records = [
            s for s in self.driver.store.state.snapshots.values() if s.status is Status.READY
        ]
        if request.snapshot_id:
            records = [s for s in records if s.id == request.snapshot_id]
        if request.source_volume_id:
            records = [s for s in records if s.source_volume_id == request.source_volume_id]
        chosen, next_token = page(
            records, lambda s: s.id, request.max_entries, request.starting_token
        )
        return csi_pb2.ListSnapshotsResponse(
            entries=[
                csi_pb2.ListSnapshotsResponse.Entry(snapshot=snapshot_message(s)) for s in chosen
            ],
            next_token=next_token,
        )
