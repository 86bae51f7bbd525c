"""The CSI driver as the daemon sees it: services to add to a server, and start-up.

The daemon binds the socket and registers with the kubelet; the driver opens its
pool, loads its state and reconciles it with what is on disk and mounted before
the daemon starts serving, so no RPC ever sees half-recovered state.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from csi import capacity
from csi.config import CsiConfig
from csi.controller import ControllerServicer
from csi.errors import NotFoundError, OutOfRangeError, ResourceExhaustedError
from csi.groupcontroller import GroupControllerServicer
from csi.identity import IdentityServicer
from csi.locks import OperationLocks
from csi.node import NodeServicer
from csi.operations import Operations
from csi.pool import Pool
from csi.reconcile import reconcile
from csi.state import StateStore, Status, VolumeRecord
from csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)


class CsiDriver:
    def __init__(self, config: CsiConfig, kubelet_dir: Path, state_dir: Path) -> None:
        self.config = config
        # Staging and target paths from requests must be inside this directory.
        self.kubelet_dir = kubelet_dir
        if config.pool is None:
            raise ValueError("a node's CSI driver needs csi.pool")
        self.pool = Pool(config.pool)
        self.store = StateStore(state_dir)
        self.locks = OperationLocks()
        self.operations = Operations()
        self.ready = False
        self.identity = IdentityServicer(self)
        self.controller = ControllerServicer(self)
        self.group_controller = GroupControllerServicer(self)
        self.node = NodeServicer(self)

    @property
    def topology(self) -> csi_pb2.Topology:
        return csi_pb2.Topology(segments={self.config.topology_key: self.config.node_id})

    def volume(self, volume_id: str) -> VolumeRecord:
        """A volume that exists (READY), or NotFoundError."""
        record = self.store.state.volumes.get(volume_id)
        if record is None or record.status is not Status.READY:
            raise NotFoundError(f"volume {volume_id} does not exist")
        return record

    def check_space(self, size: int, needed: int) -> None:
        """OUT_OF_RANGE if the pool could never hold `size` bytes; RESOURCE_EXHAUSTED if
        `needed` more bytes are not free now."""
        space = self.pool.space()
        if size > space.total:
            raise OutOfRangeError(f"capacity_range: {size} bytes is more than the whole pool")
        if needed > space.available:
            raise ResourceExhaustedError(
                f"the pool has {space.available} bytes free, {needed} were asked for"
            )

    async def expand(self, volume: VolumeRecord, capacity_range: csi_pb2.CapacityRange) -> None:
        """Grow the volume to what capacity_range asks for and record it durably.

        The caller holds the volume's lock. A volume already as large as required_bytes
        is left as it is (the spec: reply OK); a limit_bytes below its size would mean
        shrinking it, which would cut off the data at its end: OUT_OF_RANGE. Storage
        grows before the record does, so a crash in between leaves a volume larger than
        recorded, which the CO's retry records.
        """
        size = capacity.expansion_size(capacity_range)
        limit = capacity_range.limit_bytes
        if limit and limit < volume.capacity:
            raise OutOfRangeError(
                f"capacity_range: limit_bytes {limit} is below the volume's {volume.capacity} "
                "bytes, and volumes do not shrink"
            )
        if capacity_range.required_bytes <= volume.capacity:
            return
        self.check_space(size, size - volume.capacity)
        if volume.block:
            await self.pool.grow_disk(volume.id, size)
        else:
            await self.pool.set_limit(self.pool.volume_path(volume.id), size)
        volume.capacity = size
        await self.store.save()

    async def start(self) -> None:
        """Open the pool, load the state and make it match reality (after any crash)."""
        await self.pool.open()
        self.store.load()
        await reconcile(self.store, self.pool, self.kubelet_dir)
        self.ready = True
        log.info(
            "CSI driver ready",
            extra={
                "driver": self.config.driver_name,
                "node": self.config.node_id,
                "volumes": len(self.store.state.volumes),
            },
        )

    async def stop(self) -> None:
        """Cancel the creates still running once the server has stopped serving."""
        await self.operations.stop()
        await self.pool.close()

    def add_services(self, server: grpc.aio.Server) -> None:
        csi_pb2_grpc.add_IdentityServicer_to_server(self.identity, server)
        csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, server)
        csi_pb2_grpc.add_GroupControllerServicer_to_server(self.group_controller, server)
        csi_pb2_grpc.add_NodeServicer_to_server(self.node, server)
