"""Compose and supervise: one asyncio TaskGroup of root tasks, crash-only.

Each device plugin (and, later, CSI) is a root task. Stopping (SIGTERM/SIGINT) sets an
event; every task is cancelled, cleans up in its `finally` (servers stopped, sockets
removed) and run() returns. If any root task fails, the others are stopped the same way
and the error propagates, so the process exits non-zero and Kubernetes restarts it:
no half-alive daemon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from daemon.config import Config
from daemon.csiplugin import CsiPlugin
from daemon.sockets import UnixSockets
from deviceplugin.backend import Backend
from deviceplugin.names import socket_file_name
from deviceplugin.plugin import ResourcePlugin, SocketServing
from deviceplugin.servicer import ServiceSettings
from deviceplugin.socketdir import SocketDirWatcher

log = logging.getLogger(__name__)


class _StopRequestedError(Exception):
    pass


class Daemon:
    """Everything `nodeplug run` serves for one config."""

    def __init__(
        self, config: Config, backends: Sequence[Backend], sockets: SocketServing | None = None
    ) -> None:
        self.config = config
        self.watcher = SocketDirWatcher(config.device_plugin_dir)
        sockets = sockets or UnixSockets()
        directory_length = len(str(config.device_plugin_dir))
        self.plugins = [
            ResourcePlugin(
                ServiceSettings(spec.resource_name, spec.allocation_policy, spec.hook_timeout),
                backend,
                self.watcher,
                sockets,
                socket_file_name(spec.resource_name, directory_length),
                spec.replicas,
            )
            for spec, backend in zip(config.device_plugins, backends, strict=True)
        ]
        self.csi = (
            CsiPlugin(config.csi, config.kubelet_dir, config.state_dir, sockets)
            if config.csi is not None
            else None
        )

    @property
    def ready(self) -> bool:
        """Registered with the kubelet for every resource."""
        csi_ready = self.csi is None or self.csi.ready
        return csi_ready and all(plugin.registered.is_set() for plugin in self.plugins)

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "starting",
            extra={
                "kubeletDir": str(self.config.kubelet_dir),
                "resources": [p.resource_name for p in self.plugins],
            },
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                if self.plugins:
                    tasks.create_task(self.watcher.run(), name="device-plugin socket watcher")
                for plugin in self.plugins:
                    tasks.create_task(plugin.run(), name=f"device plugin {plugin.resource_name}")
                if self.csi is not None:
                    tasks.create_task(self.csi.run(), name="CSI driver")
                tasks.create_task(_raise_when_set(stop), name="stop signal")
        except* _StopRequestedError:
            log.info("stopped")


async def _raise_when_set(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _StopRequestedError
