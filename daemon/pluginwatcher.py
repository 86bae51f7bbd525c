"""Registration with the kubelet's plugin watcher (pluginregistration v1).

The kubelet watches <kubeletDir>/plugins_registry/ and, for every socket that
appears there (and for every socket already there when it starts, so a kubelet
restart re-registers by itself), calls GetInfo, validates the answer and calls
NotifyRegistrationStatus with its verdict. A plugin only has to keep serving its
registration socket: this module serves it, recreates it if it vanishes, and keeps
the kubelet's last verdict for readiness checks. Nothing here is CSI-specific;
device plugins register the same way with type "DevicePlugin", DRA drivers with "DRAPlugin".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from daemon.pluginregistration.v1 import api_pb2, api_pb2_grpc
from deviceplugin.plugin import SocketServing
from deviceplugin.socketdir import SocketDirWatcher

log = logging.getLogger(__name__)

REGISTRY_SUBDIR = "plugins_registry"
CSI_PLUGIN = "CSIPlugin"
# The kubelet's CSI plugin handler takes the highest version it understands and
# refuses anything but 1.x (0.x is no longer served): "1.0.0" is what it accepts.
CSI_VERSIONS = ("1.0.0",)
DEVICE_PLUGIN = "DevicePlugin"
# The kubelet's device manager accepts what it speaks itself: v1beta1.
DEVICE_PLUGIN_VERSIONS = ("v1beta1",)
# A DRA driver's versions are the gRPC services it serves (deviceplugin.dra.names).
DRA_PLUGIN = "DRAPlugin"
SHUTDOWN_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class PluginInfo:
    type: str
    name: str
    # Absolute path of the socket serving the plugin's own API.
    endpoint: str
    versions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Verdict:
    registered: bool
    error: str


class RegistrationServicer(api_pb2_grpc.RegistrationServicer):
    def __init__(self, info: PluginInfo) -> None:
        self.info = info
        self.verdict: Verdict | None = None
        self.changed = asyncio.Event()
        # Told of every verdict (a device plugin's readiness follows it).
        self.on_verdict: Callable[[bool], None] | None = None

    async def GetInfo(  # noqa: N802 (the wire's name)
        self, request: api_pb2.InfoRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.PluginInfo:
        return api_pb2.PluginInfo(
            type=self.info.type,
            name=self.info.name,
            endpoint=self.info.endpoint,
            supported_versions=list(self.info.versions),
        )

    async def NotifyRegistrationStatus(  # noqa: N802 (the wire's name)
        self,
        request: api_pb2.RegistrationStatus,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.RegistrationStatusResponse:
        self.verdict = Verdict(request.plugin_registered, request.error)
        if request.plugin_registered:
            log.info(
                "the kubelet registered the plugin",
                extra={"plugin": self.info.name, "type": self.info.type},
            )
        else:
            log.error(
                "the kubelet refused the plugin",
                extra={"plugin": self.info.name, "type": self.info.type, "error": request.error},
            )
        self.changed.set()
        self.changed = asyncio.Event()
        if self.on_verdict is not None:
            self.on_verdict(request.plugin_registered)
        return api_pb2.RegistrationStatusResponse()


class PluginWatcherRegistration:
    """Keeps <kubeletDir>/plugins_registry/<name>-reg.sock served for one plugin."""

    def __init__(self, info: PluginInfo, kubelet_dir: Path, sockets: SocketServing) -> None:
        self.servicer = RegistrationServicer(info)
        self.watcher = SocketDirWatcher(kubelet_dir / REGISTRY_SUBDIR)
        self.socket_path = self.watcher.directory / f"{info.name}-reg.sock"
        self._sockets = sockets

    @property
    def registered(self) -> bool:
        """The kubelet's last verdict was "registered"."""
        verdict = self.servicer.verdict
        return verdict is not None and verdict.registered

    async def run(self) -> None:
        events = self.watcher.subscribe()
        server: grpc.aio.Server | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.watcher.run())
                await self.watcher.ready.wait()
                while True:
                    if server is None or not self._sockets.is_socket(self.socket_path):
                        if server is not None:
                            log.info("registration socket vanished; serving it again")
                            await self._sockets.stop(server, self.socket_path, grace=0)
                        server = await self._sockets.serve(self.socket_path, self._add_services)
                    event = await events.get()
                    while not events.empty():
                        events.get_nowait()
                    # "name" would clash with LogRecord.name: logging refuses such extras.
                    log.debug("plugins_registry changed", extra={"entry": event.name})
        finally:
            self.watcher.unsubscribe(events)
            if server is not None:
                await self._sockets.stop(server, self.socket_path, SHUTDOWN_GRACE)

    def _add_services(self, server: grpc.aio.Server) -> None:
        api_pb2_grpc.add_RegistrationServicer_to_server(self.servicer, server)
