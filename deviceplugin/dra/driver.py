"""One resource served as a DRA driver: claims on its socket, devices as ResourceSlices.

It reads devices from a DeviceState: the resource's device plugin's (`api: both`, so
one backend watch feeds both APIs), or one it feeds itself (`api: dra`). Its socket,
<kubeletDir>/plugins/<driver>/dra.sock, is served once the backend's first device
list is in and the checkpoint is loaded; registering it with the kubelet is the
daemon's part (plugin watcher). The API server is only needed for slices and Prepare:
while it cannot be reached, both retry, and nothing else waits.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from deviceplugin.backend import Backend, HealthChecker
from deviceplugin.dra.checkpoint import Checkpoint
from deviceplugin.dra.claims import ClaimPreparer, DraSettings
from deviceplugin.dra.kube import KubeAccess
from deviceplugin.dra.names import PLUGINS_SUBDIR, SOCKET_NAME
from deviceplugin.dra.servicer import ResourceHealth, add_services
from deviceplugin.dra.slices import SlicePublisher
from deviceplugin.feed import check_health, follow_backend
from deviceplugin.plugin import SocketServing
from deviceplugin.state import DeviceState

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 1.0
UNINSTALL_TIMEOUT = 10.0


class DraDriver:
    def __init__(
        self,
        settings: DraSettings,
        backend: Backend,
        state: DeviceState,
        sockets: SocketServing,
        kube: KubeAccess,
        *,
        kubelet_dir: Path,
        state_dir: Path,
        cdi_dir: Path,
        feeds_state: bool,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.state = state
        self.kube = kube
        self.socket_path = kubelet_dir / PLUGINS_SUBDIR / settings.driver_name / SOCKET_NAME
        self.checkpoint = Checkpoint(state_dir / f"dra-{settings.driver_name}.json")
        self.preparer = ClaimPreparer(settings, state, backend, kube, self.checkpoint, cdi_dir)
        self.health = ResourceHealth(state, settings.pool)
        self.publisher = SlicePublisher(kube, settings.driver_name, settings.pool)
        # Set while dra.sock is served (the daemon registers it with the kubelet then).
        self.serving = asyncio.Event()
        self._sockets = sockets
        self._feeds_state = feeds_state

    async def run(self) -> None:
        first_snapshot = asyncio.Event()
        server: grpc.aio.Server | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                if self._feeds_state:
                    self._feed(tasks, first_snapshot)
                await self.state.wait_newer(0)
                await self.preparer.recover()
                server = await self._sockets.serve(self.socket_path, self._add_services)
                self.serving.set()
                log.info(
                    "DRA driver serving",
                    extra={"driver": self.settings.driver_name, "socket": str(self.socket_path)},
                )
                tasks.create_task(self.publisher.run())
                tasks.create_task(self._publish_changes())
        finally:
            self.serving.clear()
            if server is not None:
                await self._sockets.stop(server, self.socket_path, SHUTDOWN_GRACE)
            await self.kube.close()

    async def uninstall(self) -> None:
        """The driver is going away for good: withdraw its slices (bounded, best effort)."""
        try:
            async with asyncio.timeout(UNINSTALL_TIMEOUT):
                await self.publisher.remove_all()
        except Exception:
            log.exception(
                "could not remove the ResourceSlices; the kubelet wipes them once it "
                "notices the driver is gone",
                extra={"driver": self.settings.driver_name},
            )

    def _feed(self, tasks: asyncio.TaskGroup, first_snapshot: asyncio.Event) -> None:
        name = self.settings.resource_name
        tasks.create_task(follow_backend(self.backend, self.state, name, first_snapshot))
        if isinstance(self.backend, HealthChecker):
            tasks.create_task(check_health(self.backend, self.state, name, first_snapshot))

    async def _publish_changes(self) -> None:
        version = 0
        while (newer := await self.state.wait_newer(version)) is not None:
            version = newer[0]
            self.publisher.set_devices(self.state.devices.values())

    def _add_services(self, server: grpc.aio.Server) -> None:
        add_services(server, self.preparer, self.health)
