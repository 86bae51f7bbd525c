"""A resource served as a DRA driver, as the daemon runs it: driver plus registration.

The driver (deviceplugin/dra) serves <kubeletDir>/plugins/<driver>/dra.sock; the
kubelet learns of it from <kubeletDir>/plugins_registry/<driver>-reg.sock (type
DRAPlugin, the DRAPlugin services it serves newest first, and DRAResourceHealth).
This module imports the Kubernetes client (through the driver): the supervisor imports
it only when some resource uses DRA.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.pluginwatcher import DRA_PLUGIN, PluginInfo, PluginWatcherRegistration
from deviceplugin.backend import Backend
from deviceplugin.dra.claims import DraSettings
from deviceplugin.dra.driver import DraDriver
from deviceplugin.dra.kube import KubeAccess
from deviceplugin.dra.names import DRA_SERVICES, HEALTH_SERVICE
from deviceplugin.plugin import SocketServing
from deviceplugin.state import DeviceState


class DraPlugin:
    def __init__(
        self,
        settings: DraSettings,
        backend: Backend,
        state: DeviceState,
        sockets: SocketServing,
        *,
        kubelet_dir: Path,
        state_dir: Path,
        cdi_dir: Path,
        kubeconfig: Path | None,
        feeds_state: bool,
    ) -> None:
        self.name = settings.driver_name
        self.driver = DraDriver(
            settings,
            backend,
            state,
            sockets,
            KubeAccess(kubeconfig),
            kubelet_dir=kubelet_dir,
            state_dir=state_dir,
            cdi_dir=cdi_dir,
            feeds_state=feeds_state,
        )
        info = PluginInfo(
            DRA_PLUGIN,
            settings.driver_name,
            str(self.driver.socket_path),
            (*DRA_SERVICES, HEALTH_SERVICE),
        )
        self.registration = PluginWatcherRegistration(info, kubelet_dir, sockets)

    @property
    def ready(self) -> bool:
        return self.driver.serving.is_set() and self.registration.registered

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.driver.run())
            # The kubelet dials the endpoint as soon as it sees the registration socket.
            await self.driver.serving.wait()
            tasks.create_task(self.registration.run())

    async def uninstall(self) -> None:
        await self.driver.uninstall()
