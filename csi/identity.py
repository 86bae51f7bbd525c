"""CSI Identity service: who the driver is, what it can do, whether it is ready."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf import wrappers_pb2

from csi.config import CsiConfig
from csi.errors import rpc
from csi.v1 import csi_pb2, csi_pb2_grpc

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion
Context = grpc.aio.ServicerContext[object, object]


async def probed(socket: Path, timeout: float = 30) -> None:
    """Wait until a driver serves Probe at socket (a killed one leaves its socket file).

    For clients that start a driver process: tests, benchmarks.
    """
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                    await csi_pb2_grpc.IdentityStub(channel).Probe(
                        csi_pb2.ProbeRequest(), timeout=1
                    )
                    return
            await asyncio.sleep(0.05)


def vendor_version() -> str:
    try:
        return metadata.version("nodeplug")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# ONLINE: volumes grow while published (a qgroup limit, a loop device's capacity).
ONLINE_EXPANSION = csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE))
NODE_CAPABILITIES = (
    csi_pb2.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
    csi_pb2.PluginCapability(service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
    csi_pb2.PluginCapability(service=Service(type=Service.GROUP_CONTROLLER_SERVICE)),
    ONLINE_EXPANSION,
)


class Served(Protocol):
    """What Identity tells about a driver: its name, and whether it is ready."""

    @property
    def config(self) -> CsiConfig: ...

    @property
    def ready(self) -> bool: ...


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(
        self,
        driver: Served,
        capabilities: Sequence[csi_pb2.PluginCapability] = NODE_CAPABILITIES,
    ) -> None:
        self.driver = driver
        self.capabilities = capabilities
        # Read once: the package metadata lookup scans sys.path (~2 ms).
        self._info = csi_pb2.GetPluginInfoResponse(
            name=driver.config.driver_name, vendor_version=vendor_version()
        )

    @rpc
    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: Context
    ) -> csi_pb2.GetPluginInfoResponse:
        return self._info

    @rpc
    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: Context
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=self.capabilities)

    @rpc
    async def Probe(self, request: csi_pb2.ProbeRequest, context: Context) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self.driver.ready))
