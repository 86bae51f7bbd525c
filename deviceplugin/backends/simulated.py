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
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deviceplugin.backend import Device

log = logging.getLogger(__name__)


class SimulatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    count: int = Field(default=4, ge=0, le=100_000, strict=True)
    numa_nodes: int = Field(default=1, ge=1, le=64, strict=True, alias="numaNodes")
    prefix: str = Field(default="sim", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")


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
    return SimulatedBackend(SimulatedConfig.model_validate(config))
