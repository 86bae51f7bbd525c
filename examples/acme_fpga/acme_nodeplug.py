"""A complete nodeplug device backend for a (fictional) ACME FPGA card.

The driver creates /dev/acme-fpga<N> and a status directory per card,
<statusDir>/acme-fpga<N>/, holding `health` ("ok" or an error) and `reset` (write "1"
to reset the card). Discovery and hotplug reuse nodeplug's glob backend; this module
adds what is ACME-specific: the runtime mount, env vars and CDI names, a health probe,
per-container setup (Allocator) and a reset before each container starts (PreStarter),
and attributes that DRA claims can select on. The same backend serves the device
plugin and the DRA driver (`api: both` in the config).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from deviceplugin.backend import ContainerEdits, Device, Mount
from deviceplugin.backends.glob import GlobBackend, GlobConfig


class AcmeFpgaBackend:
    health_check_interval = 5.0

    def __init__(self, config: Mapping[str, Any]) -> None:
        unknown = set(config) - {"devices", "statusDir", "runtimeDir", "healthInterval", "model"}
        if unknown:
            raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
        self.status_dir = Path(config.get("statusDir", "/sys/class/acme"))
        self.runtime_dir = config.get("runtimeDir", "/opt/acme/runtime")
        self.health_check_interval = float(config.get("healthInterval", 5.0))
        self.model = str(config.get("model", "acme-x1"))
        self.nodes = GlobBackend(GlobConfig(paths=[config.get("devices", "/dev/acme-fpga*")]))

    def _card(self, device: Device) -> Device:
        return replace(
            device,
            mounts=(Mount(self.runtime_dir, "/opt/acme", read_only=True),),
            envs={"ACME_FPGA_DEVICES": device.id},
            cdi_devices=(f"acme.example/fpga={device.id}",),
            # Only DRA reads these: claims can select cards by them (CEL).
            attributes={"model": self.model, "acme.example/runtime": self.runtime_dir},
        )

    async def watch(self) -> AsyncIterator[list[Device]]:
        async for snapshot in self.nodes.watch():
            yield [self._card(device) for device in snapshot]

    async def check_health(self, devices: Sequence[Device]) -> dict[str, bool]:
        def read() -> dict[str, bool]:
            health = {}
            for device in devices:
                status = self.status_dir / device.id / "health"
                try:
                    health[device.id] = status.read_text().strip() == "ok"
                except OSError:
                    health[device.id] = False  # no status: the driver lost the card
            return health

        return await asyncio.to_thread(read)

    async def allocate(self, devices: Sequence[Device]) -> ContainerEdits:
        # All cards of one container share one ACME session; the runtime reads this env.
        return ContainerEdits(envs={"ACME_FPGA_DEVICES": ",".join(d.id for d in devices)})

    async def pre_start(self, devices: Sequence[Device]) -> None:
        def reset() -> None:
            for device in devices:
                (self.status_dir / device.id / "reset").write_text("1\n")

        await asyncio.to_thread(reset)


def create(config: Mapping[str, Any]) -> AcmeFpgaBackend:
    return AcmeFpgaBackend(config)
