"""A backend's snapshots into the device state, and what the log says about them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import pytest

from deviceplugin.backend import Device
from deviceplugin.feed import LOGGED_IDS, follow_backend
from deviceplugin.state import DeviceState


class Snapshots:
    def __init__(self, *snapshots: Sequence[Device]) -> None:
        self.snapshots = snapshots

    async def watch(self) -> AsyncIterator[Sequence[Device]]:
        for snapshot in self.snapshots:
            yield snapshot


@pytest.mark.parametrize("count", [LOGGED_IDS, LOGGED_IDS + 1, 60_000])
async def test_a_change_is_logged_with_some_ids_and_how_many_more(
    count: int, caplog: pytest.LogCaptureFixture
) -> None:
    devices = [Device(f"d{index:05}") for index in range(count)]
    state = DeviceState()
    caplog.set_level(logging.INFO, "deviceplugin.feed")
    await follow_backend(Snapshots(devices, []), state, "a.example/b", asyncio.Event())
    added, removed = [r for r in caplog.records if r.getMessage() == "devices changed"]
    shown = [d.id for d in devices[:LOGGED_IDS]]
    more = [f"... and {count - LOGGED_IDS} more"] if count > LOGGED_IDS else []
    assert (added.added, added.removed, added.devices) == (shown + more, [], count)  # type: ignore[attr-defined]
    assert (removed.removed, removed.devices) == (shown + more, 0)  # type: ignore[attr-defined]
    assert len(state.devices) == 0
