"""Backends the tests drive by hand: push a snapshot, see what the kubelet sees."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence

from deviceplugin.backend import ContainerEdits, Device, DeviceNode, Mount


def device(device_id: str, *, healthy: bool = True, numa: int | None = None) -> Device:
    return Device(
        id=device_id,
        healthy=healthy,
        numa_node=numa,
        device_nodes=(DeviceNode(f"/dev/{device_id}", None, "rw"),),
        mounts=(Mount(f"/opt/{device_id}/lib", "/usr/local/lib/acme", read_only=True),),
        envs={"ACME_VISIBLE": device_id},
        cdi_devices=(f"acme.example/fpga={device_id}",),
    )


class ScriptedBackend:
    """Yields whatever the test publishes."""

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self._snapshots: asyncio.Queue[list[Device]] = asyncio.Queue()
        self.publish(devices)

    def publish(self, devices: Iterable[Device]) -> None:
        self._snapshots.put_nowait(list(devices))

    async def watch(self) -> AsyncIterator[list[Device]]:
        while True:
            yield await self._snapshots.get()


class AllocatingBackend(ScriptedBackend):
    """Implements the optional Allocator and PreStarter hooks, recording their calls."""

    def __init__(self, devices: Iterable[Device] = (), *, delay: float = 0.0) -> None:
        super().__init__(devices)
        self.delay = delay
        self.fail_with: Exception | None = None
        self.allocated: list[list[str]] = []
        self.pre_started: list[list[str]] = []
        # Set when a pre_start call was cancelled (cut by a timeout) while it waited.
        self.pre_start_cancelled = asyncio.Event()

    async def allocate(self, devices: Sequence[Device]) -> ContainerEdits:
        await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        self.allocated.append([d.id for d in devices])
        return ContainerEdits(
            envs={"ACME_SESSION": "+".join(d.id for d in devices)},
            mounts=(Mount("/var/run/acme", "/var/run/acme"),),
            annotations={"acme.example/session": "1"},
        )

    async def pre_start(self, devices: Sequence[Device]) -> None:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.pre_start_cancelled.set()
            raise
        self.pre_started.append([d.id for d in devices])


class CheckedBackend(ScriptedBackend):
    """Implements HealthChecker: health comes from a dict the test edits."""

    health_check_interval = 0.02

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        super().__init__(devices)
        self.health: dict[str, bool] = {}

    async def check_health(self, devices: Sequence[Device]) -> Mapping[str, bool]:
        return {d.id: self.health[d.id] for d in devices if d.id in self.health}
