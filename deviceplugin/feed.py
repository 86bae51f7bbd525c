"""A backend's snapshots (and optional health probes) into a DeviceState.

Shared by everything that serves a backend: the device plugin and the DRA driver of a
resource read the same DeviceState, so one backend watch and one health probe feed both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from deviceplugin.backend import Backend, Device, HealthChecker
from deviceplugin.state import DeviceState

log = logging.getLogger(__name__)

# Ids named per list in the "devices changed" line.
LOGGED_IDS = 20


async def follow_backend(
    backend: Backend,
    state: DeviceState,
    resource: str,
    first_snapshot: asyncio.Event,
    before_update: Callable[[Sequence[Device]], Awaitable[None]] | None = None,
    on_change: Callable[[], None] | None = None,
) -> None:
    """Apply every snapshot of `backend.watch()`; `before_update` runs before anyone sees it."""
    async for snapshot in backend.watch():
        if before_update is not None:
            await before_update(snapshot)
        diff = state.update(snapshot)
        if diff and on_change is not None:
            on_change()
        if diff:
            log.info(
                "devices changed",
                extra={
                    "resource": resource,
                    "added": _some(diff.added),
                    "removed": _some(diff.removed),
                    "changed": _some(diff.changed),
                    "devices": len(state.devices),
                },
            )
        first_snapshot.set()
    log.info("backend reports no further changes", extra={"resource": resource})


def _some(ids: tuple[str, ...]) -> list[str]:
    """The first ids of a list, and how many more: a list of 60,000 ids would make a
    1 MB log line, which container runtimes split (CRI: 16 KiB) and pipelines drop."""
    if len(ids) <= LOGGED_IDS:
        return list(ids)
    return [*ids[:LOGGED_IDS], f"... and {len(ids) - LOGGED_IDS} more"]


async def check_health(
    checker: HealthChecker,
    state: DeviceState,
    resource: str,
    first_snapshot: asyncio.Event,
    on_change: Callable[[], None] | None = None,
) -> None:
    """Poll the backend's health probe and apply its results on top of its snapshots."""
    await first_snapshot.wait()
    while True:
        await asyncio.sleep(checker.health_check_interval)
        try:
            async with asyncio.timeout(max(checker.health_check_interval, 1.0)):
                health = await checker.check_health(state.reported)
        except Exception:
            log.exception("health check failed", extra={"resource": resource})
            continue
        if state.set_health(dict(health)) and on_change is not None:
            on_change()
