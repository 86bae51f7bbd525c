"""Creates slower than the caller's deadline finish, and the sidecar's retry gets the result.

csi-provisioner and csi-snapshotter retry a create that hit their --timeout with the
same name and parameters (DEADLINE_EXCEEDED is not final for them). The storage
steps here are made slower than the deadline the way a loaded disk would: the real
step runs after a delay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from csi.pool import Pool
from csi.v1 import csi_pb2
from tests.csi.conftest import Client, create_request

pytestmark = pytest.mark.root

DEADLINE = 0.3
# Longer than a deadline, shorter than all the retries together.
SLOWNESS = 1.0
T = TypeVar("T")


@pytest.fixture
def slow_pool(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Make a Pool method take SLOWNESS seconds longer."""

    def slow_down(name: str) -> None:
        real = getattr(Pool, name)

        async def slower(pool: Pool, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(SLOWNESS)
            return await real(pool, *args, **kwargs)

        monkeypatch.setattr(Pool, name, slower)

    return slow_down


async def retried(call: Callable[[], Awaitable[T]], tries: int = 12) -> tuple[T, int]:
    """Call as a sidecar does: again after each DEADLINE_EXCEEDED. Returns (answer, timeouts)."""
    for attempt in range(tries):
        try:
            return await call(), attempt
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    pytest.fail(f"no answer within {tries} calls of {DEADLINE} s")


async def test_a_slow_create_volume_finishes_for_the_retry(
    csi: Client, slow_pool: Callable[[str], None]
) -> None:
    slow_pool("provision")
    request = create_request("pvc-slow")
    response, timeouts = await retried(
        lambda: csi.controller.CreateVolume(request, timeout=DEADLINE)
    )
    assert timeouts >= 1, "the first call ran out of time"
    listed = await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert [e.volume for e in listed.entries] == [response.volume]
    assert {p.name for p in csi.driver.pool.volumes.iterdir()} == {response.volume.volume_id}
    again = await csi.controller.CreateVolume(request)
    assert again.volume == response.volume


async def test_a_slow_create_snapshot_finishes_for_the_retry(
    csi: Client, slow_pool: Callable[[str], None]
) -> None:
    volume = (await csi.controller.CreateVolume(create_request("pvc"))).volume
    slow_pool("snapshot")
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap")
    response, timeouts = await retried(
        lambda: csi.controller.CreateSnapshot(request, timeout=DEADLINE)
    )
    assert timeouts >= 1
    assert response.snapshot.ready_to_use
    listed = await csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())
    assert [e.snapshot for e in listed.entries] == [response.snapshot]


async def test_a_slow_group_snapshot_finishes_for_the_retry(
    csi: Client, slow_pool: Callable[[str], None]
) -> None:
    sources = [
        (await csi.controller.CreateVolume(create_request(f"pvc-{i}"))).volume.volume_id
        for i in range(2)
    ]
    slow_pool("snapshot_group")
    request = csi_pb2.CreateVolumeGroupSnapshotRequest(name="group", source_volume_ids=sources)
    response, timeouts = await retried(
        lambda: csi.group_controller.CreateVolumeGroupSnapshot(request, timeout=DEADLINE)
    )
    assert timeouts >= 1
    assert response.group_snapshot.ready_to_use
    assert len(list(csi.driver.pool.snapshots.iterdir())) == 2


async def test_a_create_in_flight_when_the_driver_stops_leaves_nothing(
    csi: Client, slow_pool: Callable[[str], None]
) -> None:
    slow_pool("provision")
    with pytest.raises(grpc.aio.AioRpcError):
        await csi.controller.CreateVolume(create_request("pvc-stopped"), timeout=DEADLINE)
    assert csi.driver.store.state.volumes, "the create goes on after the deadline"
    await csi.driver.stop()
    assert not csi.driver.store.state.volumes
    assert not list(Path(csi.driver.pool.volumes).iterdir())
