"""`simulated` backend: devices that exist only in memory, for demos without hardware.

    backend: simulated
    config: {count: 4, numaNodes: 2, prefix: sim}

Nothing is mounted or created in containers except an env var naming the simulated
device; every log line and env var says "simulated", so it is never mistaken for hardware.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import msgspec

from deviceplugin import configkit
from deviceplugin.backend import Device

log = logging.getLogger(__name__)


class SimulatedConfig(configkit.Section, frozen=True):
    count: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 4
    numa_nodes: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")] = "sim"


class SimulatedBackend:
    def __init__(self, config: SimulatedConfig) -> None:
        self.config = config

    def devices(self) -> list[Device]:
        return [
            Device(
                id=f"{self.config.prefix}{index}",
                numa_node=index % self.config.numa_nodes if self.config.numa_nodes > 1 else None,
                envs={"NODEPLUG_SIMULATED_DEVICE": f"{self.config.prefix}{index}"},
            )
            for index in range(self.config.count)
        ]

    async def watch(self) -> AsyncIterator[list[Device]]:
        log.warning(
            "simulated devices: no hardware behind them", extra={"count": self.config.count}
        )
        yield self.devices()
        await asyncio.Event().wait()  # simulated devices never change


def create(config: Mapping[str, Any]) -> SimulatedBackend:
    return SimulatedBackend(configkit.convert(config, SimulatedConfig))
