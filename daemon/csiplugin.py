"""The CSI driver as a root task: start it, serve its socket, register it with the kubelet.

Node mode (CsiPlugin): <kubeletDir>/plugins/<driverName>/csi.sock (or csi.endpoint)
serves Identity, Controller and Node; the plugin watcher learns about it through
<kubeletDir>/plugins_registry/. Controller mode (CsiControllerPlugin): csi.endpoint
serves Identity and ControllerExpandVolume for csi-resizer, and nothing registers.
The socket is served only after the driver has reconciled its state, so the
kubelet never talks to a driver that is still recovering from a crash. A driver
that cannot start until an admin acts (an unreadable state file, an unsafe
path: csi.errors.SetupError) serves nothing and says why in the log and
/readyz, while the rest of the daemon goes on: exiting would restart the whole
daemon in a loop, device plugins included, and fix nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from csi.config import CsiConfig
from csi.driver import CsiDriver
from csi.errors import SetupError
from csi.expansion import ExpansionDriver
from csi.state import Status
from daemon.config import CSI_PLUGIN_SUBDIR
from daemon.metrics import Family, GaugeFamily
from daemon.pluginwatcher import CSI_PLUGIN, CSI_VERSIONS, PluginInfo, PluginWatcherRegistration
from deviceplugin.plugin import SocketServing

log = logging.getLogger(__name__)

__all__ = ["CSI_PLUGIN_SUBDIR", "SHUTDOWN_GRACE", "CsiControllerPlugin", "CsiPlugin"]

SHUTDOWN_GRACE = 2.0


class CsiPlugin:
    def __init__(
        self,
        config: CsiConfig,
        socket_path: Path,
        kubelet_dir: Path,
        state_dir: Path,
        sockets: SocketServing,
    ) -> None:
        self.driver = CsiDriver(config, kubelet_dir, state_dir)
        self.socket_path = socket_path
        info = PluginInfo(CSI_PLUGIN, config.driver_name, str(self.socket_path), CSI_VERSIONS)
        self.registration = PluginWatcherRegistration(info, kubelet_dir, sockets)
        self._sockets = sockets

        # Why the driver is not serving, when an admin has to act (see the module's doc).
        self.problem: str | None = None

    @property
    def ready(self) -> bool:
        return self.driver.ready and self.registration.registered

    def sockets(self) -> list[Path]:
        """The sockets it serves now (for the liveness check)."""
        return [self.socket_path, self.registration.socket_path] if self.driver.ready else []

    def metrics(self) -> Iterable[Family]:
        """Volumes, snapshots and pool space, read at scrape time."""
        state = self.driver.store.state
        volumes = GaugeFamily(
            "nodeplug_csi_volumes", "CSI volumes that exist, by mode.", labels=["mode"]
        )
        ready = [v for v in state.volumes.values() if v.status is Status.READY]
        volumes.add_metric(["block"], sum(1 for v in ready if v.block))
        volumes.add_metric(["filesystem"], sum(1 for v in ready if not v.block))
        yield volumes
        yield GaugeFamily(
            "nodeplug_csi_snapshots",
            "CSI snapshots that exist.",
            value=sum(1 for s in state.snapshots.values() if s.status is Status.READY),
        )
        if self.driver.ready:
            # statvfs of a local filesystem: microseconds, fine on the event loop.
            stats = os.statvfs(self.driver.pool.root)
            pool = GaugeFamily(
                "nodeplug_csi_pool_bytes", "Size and free space of the CSI pool.", labels=["kind"]
            )
            pool.add_metric(["size"], stats.f_blocks * stats.f_frsize)
            pool.add_metric(["free"], stats.f_bavail * stats.f_frsize)
            yield pool

    async def run(self) -> None:
        try:
            await self.driver.start()
        except SetupError as error:
            self.problem = str(error)
            log.error("the CSI driver cannot start", extra={"problem": self.problem})  # noqa: TRY400 (the message says it all)
            await asyncio.Event().wait()  # until the unit is stopped (config change, exit)
        server = await self._sockets.serve(self.socket_path, self.driver.add_services)
        try:
            await self.registration.run()
        finally:
            await self._sockets.stop(server, self.socket_path, SHUTDOWN_GRACE)
            await self.driver.stop()


class CsiControllerPlugin:
    """csi.mode: controller: the driver's expansion controller on csi.endpoint, for the
    csi-resizer beside it; no pool, no state, no kubelet."""

    def __init__(self, config: CsiConfig, socket_path: Path, sockets: SocketServing) -> None:
        self.driver = ExpansionDriver(config)
        self.socket_path = socket_path
        self._sockets = sockets
        self.problem: str | None = None

    @property
    def ready(self) -> bool:
        return self.driver.ready

    def sockets(self) -> list[Path]:
        return [self.socket_path] if self.driver.ready else []

    def metrics(self) -> Iterable[Family]:
        return ()

    async def run(self) -> None:
        server = await self._sockets.serve(self.socket_path, self.driver.add_services)
        try:
            await self.driver.start()
            await asyncio.Event().wait()  # until the unit is stopped
        finally:
            await self._sockets.stop(server, self.socket_path, SHUTDOWN_GRACE)
