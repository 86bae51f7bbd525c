"""`udev` backend: devices of a subsystem whose udev properties match.

    backend: udev
    config:
      subsystem: drm
      sysname: "card*"                  # optional glob on the kernel name
      properties: {ID_VENDOR_ID: "8086"} # optional globs on udev properties
      permissions: rw

Devices present at start are enumerated from /sys; hotplug and removal arrive on the
udev netlink monitor (the kernel's own uevents when no udev daemon runs, as in many
containers). The NUMA node comes from sysfs `numa_node` of the device or its parents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pyudev

from deviceplugin import configkit
from deviceplugin.backend import Device, DeviceNode
from deviceplugin.backends.common import Permissions, device_id, numa_node_of

log = logging.getLogger(__name__)

UDEV_CONTROL = Path("/run/udev/control")
_SETTLE_SECONDS = 0.002


class UdevConfig(configkit.Section, frozen=True):
    subsystem: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]+$")]
    sysname: str = "*"
    # Its keys are udev's own (ID_VENDOR_ID): they are not renamed.
    properties: dict[str, str] = msgspec.field(default_factory=dict)
    permissions: Permissions = Permissions("rw")


class UdevBackend:
    def __init__(self, config: UdevConfig) -> None:
        self.config = config
        self._context = pyudev.Context()

    def _matches(self, device: pyudev.Device) -> bool:
        if not fnmatchcase(device.sys_name, self.config.sysname):
            return False
        properties = device.properties
        return all(
            key in properties and fnmatchcase(properties[key], pattern)
            for key, pattern in self.config.properties.items()
        )

    def _device(self, device: pyudev.Device) -> Device:
        nodes: tuple[DeviceNode, ...] = ()
        if device.device_node:
            nodes = (DeviceNode(device.device_node, None, self.config.permissions),)
        return Device(
            id=device_id(device.sys_name),
            numa_node=numa_node_of(Path(device.sys_path)),
            device_nodes=nodes,
        )

    def scan(self) -> list[Device]:
        found = self._context.list_devices(subsystem=self.config.subsystem)
        return [self._device(d) for d in found if self._matches(d)]

    async def watch(self) -> AsyncIterator[list[Device]]:
        # Without a udev daemon nothing is re-broadcast on the "udev" source: listen to the kernel.
        source = "udev" if UDEV_CONTROL.exists() else "kernel"
        monitor = pyudev.Monitor.from_netlink(self._context, source=source)
        monitor.filter_by(self.config.subsystem)
        monitor.start()
        events = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(monitor.fileno(), events.set)
        log.info(
            "udev monitor listening", extra={"source": source, "subsystem": self.config.subsystem}
        )
        try:
            while True:
                # Listening before enumerating: a device added in between is seen either way.
                yield await asyncio.to_thread(self.scan)
                await events.wait()
                await asyncio.sleep(_SETTLE_SECONDS)
                events.clear()
                while monitor.poll(timeout=0) is not None:
                    pass  # the next scan sees the result of every queued event
        finally:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(monitor.fileno())


def create(config: Mapping[str, Any]) -> UdevBackend:
    return UdevBackend(configkit.convert(config, UdevConfig))
