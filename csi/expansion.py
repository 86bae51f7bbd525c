"""The cluster-wide half of volume expansion (`csi.mode: controller`), and its checks.

Volumes live on one node each, and external-resizer has no per-node mode: one resizer
for the whole cluster calls ControllerExpandVolume, on a driver that holds no volume.
That driver (ExpansionDriver) checks what is knowable without the volume: the request's
required fields, the size asked for (required_bytes > 0, not above limit_bytes, not more
than a volume can hold), the capability, and that the id has the shape this driver
gives its volumes. It answers the size with node_expansion_required, and touches no
storage. The kubelet of the volume's node then calls NodeExpandVolume there (online,
or after the next NodeStage/NodePublish for a volume no pod used), which grows the
qgroup limit or the block file and records the capacity (csi.node, CsiDriver.expand).

The resizer's side (external-resizer pkg/resizer/csi_resizer.go NewResizerFromClient,
pkg/controller/controller.go): it uses ControllerExpandVolume only when
GetPluginCapabilities lists CONTROLLER_SERVICE and ControllerGetCapabilities lists
EXPAND_VOLUME; it reads SINGLE_NODE_MULTI_WRITER only to choose the access mode it
sends; node_expansion_required makes it mark the PVC FileSystemResizePending, block
volumes included, which is what makes the kubelet call NodeExpandVolume.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc

from csi import capacity, validation
from csi.config import CsiConfig
from csi.errors import rpc
from csi.identity import ONLINE_EXPANSION, IdentityServicer
from csi.v1 import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[object, object]
Service = csi_pb2.PluginCapability.Service
RPC = csi_pb2.ControllerServiceCapability.RPC

PLUGIN_CAPABILITIES = (
    csi_pb2.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
    ONLINE_EXPANSION,
)


def checked(request: csi_pb2.ControllerExpandVolumeRequest) -> tuple[str, int]:
    """The volume id and the size a ControllerExpandVolume request asks for, checked.

    Required fields first, then their form, and the id's shape last: a foreign id is
    NOT_FOUND, which must not hide a bad request.
    """
    validation.required(request, "volume_id", "capacity_range")
    size = capacity.expansion_size(request.capacity_range)
    if request.HasField("volume_capability"):
        validation.capability(request.volume_capability, "volume_capability")
    volume_id = validation.object_id(request.volume_id, validation.VOLUME_PREFIX, "volume_id")
    return volume_id, size


def _not_offered(method: str) -> Callable[..., Awaitable[Any]]:
    async def refuse(self: object, request: object, context: Context) -> NoReturn:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method}: this is the expansion controller (csi.mode: controller); volumes are "
            "created, published and snapshotted by the nodes' daemons",
        )

    return refuse


class ExpansionControllerServicer(csi_pb2_grpc.ControllerServicer):
    """EXPAND_VOLUME and nothing else, as the capabilities say (and the mandatory
    ValidateVolumeCapabilities, as far as it can answer)."""

    CAPABILITIES = (csi_pb2.ControllerServiceCapability(rpc=RPC(type=RPC.EXPAND_VOLUME)),)

    CreateVolume = _not_offered("CreateVolume")
    DeleteVolume = _not_offered("DeleteVolume")
    ControllerPublishVolume = _not_offered("ControllerPublishVolume")
    ControllerUnpublishVolume = _not_offered("ControllerUnpublishVolume")
    ListVolumes = _not_offered("ListVolumes")
    GetCapacity = _not_offered("GetCapacity")
    CreateSnapshot = _not_offered("CreateSnapshot")
    DeleteSnapshot = _not_offered("DeleteSnapshot")
    ListSnapshots = _not_offered("ListSnapshots")
    GetSnapshot = _not_offered("GetSnapshot")
    ControllerGetVolume = _not_offered("ControllerGetVolume")
    ControllerModifyVolume = _not_offered("ControllerModifyVolume")

    @rpc
    async def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=self.CAPABILITIES)

    @rpc
    async def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: Context
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        """Mandatory for every Controller (the spec): what is knowable here is checked (the
        fields, the capabilities' form, the id's shape); whether the volume takes them is
        known on its node only, so a well-formed request is answered unconfirmed."""
        volume_id = validation.validation_request(request)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            message=f"volume {volume_id} lives on a node: this expansion controller cannot "
            "confirm its capabilities"
        )

    @rpc
    async def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: Context
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        volume_id, size = checked(request)
        log.info("expansion left to the volume's node", extra={"volume": volume_id, "bytes": size})
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size, node_expansion_required=True
        )


class ExpansionDriver:
    """The driver in controller mode: Identity and ExpansionControllerServicer, no state."""

    def __init__(self, config: CsiConfig) -> None:
        self.config = config
        self.ready = False
        self.identity = IdentityServicer(self, PLUGIN_CAPABILITIES)
        self.controller = ExpansionControllerServicer()

    async def start(self) -> None:
        self.ready = True
        log.info("CSI expansion controller ready", extra={"driver": self.config.driver_name})

    def add_services(self, server: grpc.aio.Server) -> None:
        csi_pb2_grpc.add_IdentityServicer_to_server(self.identity, server)
        csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, server)
