"""Group snapshots on real btrfs: consistent cuts, idempotency, restores, restarts."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi import groupcontroller
from csi.pool import Pool
from csi.v1 import csi_pb2
from tests.csi.conftest import Client, block_capability, create_request, serving
from tests.csi.test_conformance import code_of

pytestmark = pytest.mark.root

Code = grpc.StatusCode
MiB = 1024**2


async def volumes(csi: Client, count: int, block_too: bool = False) -> list[str]:
    ids = []
    for index in range(count):
        capability = block_capability() if block_too and index == count - 1 else None
        request = create_request(f"pvc-{index}", capability=capability)
        ids.append((await csi.controller.CreateVolume(request)).volume.volume_id)
    return ids


def group_request(name: str, sources: list[str]) -> csi_pb2.CreateVolumeGroupSnapshotRequest:
    return csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=sources)


def write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


async def test_a_group_snapshot_holds_every_volume_and_restores(csi: Client) -> None:
    sources = await volumes(csi, 3, block_too=True)
    pool = csi.driver.pool
    for index, volume_id in enumerate(sources[:2]):
        write_synced(pool.volume_path(volume_id) / "data", f"volume {index}".encode())
    created = (
        await csi.group_controller.CreateVolumeGroupSnapshot(group_request("group", sources))
    ).group_snapshot
    assert created.ready_to_use
    assert [s.source_volume_id for s in created.snapshots] == sources
    assert all(s.group_snapshot_id == created.group_snapshot_id for s in created.snapshots)
    assert all(s.ready_to_use for s in created.snapshots)
    # Members are ordinary snapshots: listed, fetched, restored.
    listed = await csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())
    assert {e.snapshot.snapshot_id for e in listed.entries} == {
        s.snapshot_id for s in created.snapshots
    }
    member = created.snapshots[1]
    fetched = await csi.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=member.snapshot_id)
    )
    assert fetched.snapshot == member
    restore = create_request("pvc-restored")
    restore.volume_content_source.snapshot.snapshot_id = member.snapshot_id
    restored = (await csi.controller.CreateVolume(restore)).volume
    assert (pool.volume_path(restored.volume_id) / "data").read_bytes() == b"volume 1"
    assert (pool.snapshot_path(created.snapshots[2].snapshot_id) / "disk").exists()


async def test_group_snapshots_are_idempotent_by_name(csi: Client) -> None:
    sources = await volumes(csi, 3)
    first = (
        await csi.group_controller.CreateVolumeGroupSnapshot(group_request("g", sources[:2]))
    ).group_snapshot
    again = (
        await csi.group_controller.CreateVolumeGroupSnapshot(
            group_request("g", list(reversed(sources[:2])))
        )
    ).group_snapshot
    assert again == first
    other = group_request("g", sources[1:])
    assert await code_of(csi.group_controller.CreateVolumeGroupSnapshot(other)) == (
        Code.ALREADY_EXISTS
    )
    assert len(csi.driver.store.state.snapshots) == 2


async def test_group_snapshot_errors(csi: Client) -> None:
    sources = await volumes(csi, 2)
    groups = csi.group_controller
    for request, code in (
        (group_request("g", [sources[0], sources[0]]), Code.INVALID_ARGUMENT),
        (group_request("g", [sources[0], ""]), Code.INVALID_ARGUMENT),
        (group_request("g", [sources[0], "v" + "0" * 32]), Code.NOT_FOUND),
        (group_request("g", [sources[0], "../etc"]), Code.NOT_FOUND),
        (group_request("x" * 129, sources), Code.INVALID_ARGUMENT),
    ):
        assert await code_of(groups.CreateVolumeGroupSnapshot(request)) == code
    with_parameters = group_request("g", sources)
    with_parameters.parameters["a"] = "b"
    assert await code_of(groups.CreateVolumeGroupSnapshot(with_parameters)) == (
        Code.INVALID_ARGUMENT
    )
    assert not csi.driver.store.state.snapshots, "a refused request leaves nothing"
    assert not list(csi.driver.pool.snapshots.iterdir())

    group = (await groups.CreateVolumeGroupSnapshot(group_request("g", sources))).group_snapshot
    member = group.snapshots[0].snapshot_id
    delete_member = csi_pb2.DeleteSnapshotRequest(snapshot_id=member)
    assert await code_of(csi.controller.DeleteSnapshot(delete_member)) == (Code.FAILED_PRECONDITION)
    wrong = csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=[member]
    )
    assert await code_of(groups.GetVolumeGroupSnapshot(wrong)) == Code.INVALID_ARGUMENT
    wrong_delete = csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=[member]
    )
    assert await code_of(groups.DeleteVolumeGroupSnapshot(wrong_delete)) == (Code.INVALID_ARGUMENT)
    assert len(list(csi.driver.pool.snapshots.iterdir())) == 2


async def test_deleting_a_group_deletes_its_snapshots(csi: Client) -> None:
    sources = await volumes(csi, 2)
    groups = csi.group_controller
    group = (await groups.CreateVolumeGroupSnapshot(group_request("g", sources))).group_snapshot
    request = csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id,
        snapshot_ids=[s.snapshot_id for s in group.snapshots],
    )
    for _ in range(3):
        await groups.DeleteVolumeGroupSnapshot(request)
    assert not list(csi.driver.pool.snapshots.iterdir())
    state = csi.driver.store.state
    assert not state.snapshots
    assert not state.group_snapshots
    get = csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
    assert await code_of(groups.GetVolumeGroupSnapshot(get)) == Code.NOT_FOUND
    # The name is free again.
    await groups.CreateVolumeGroupSnapshot(group_request("g", sources))


async def test_a_group_snapshot_survives_a_restart(
    short_tmp: Path, btrfs_pool: Path, csi: Client
) -> None:
    sources = await volumes(csi, 2)
    group = (
        await csi.group_controller.CreateVolumeGroupSnapshot(group_request("g", sources))
    ).group_snapshot
    async with serving(short_tmp / "again", btrfs_pool, state=short_tmp / "state") as restarted:
        found = await restarted.group_controller.GetVolumeGroupSnapshot(
            csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=group.group_snapshot_id)
        )
        assert found.group_snapshot == group
        again = await restarted.group_controller.CreateVolumeGroupSnapshot(
            group_request("g", sources)
        )
        assert again.group_snapshot == group


# --- consistency of the cut -----------------------------------------------------------------


@pytest.fixture
def write_between_snapshots(csi: Client, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """After each snapshot of a group cut, a durable write to the volume just snapshotted:
    the worst moment for a writer. Yields the sources written to."""
    written: list[Path] = []
    real_snapshot = Pool.snapshot

    async def snapshot_then_write(pool: Pool, source: Path, target: Path, readonly: bool) -> None:
        await real_snapshot(pool, source, target, readonly)
        write_synced(source / "after", os.urandom(4096))
        written.append(source)

    monkeypatch.setattr(Pool, "snapshot", snapshot_then_write)
    monkeypatch.setattr(groupcontroller, "CUT_RETRY_DELAY", 0.0)
    yield written


async def test_a_member_written_during_the_cut_is_never_reported_consistent(
    csi: Client, write_between_snapshots: list[Path]
) -> None:
    sources = await volumes(csi, 2)
    request = group_request("g", sources)
    assert await code_of(csi.group_controller.CreateVolumeGroupSnapshot(request)) == (Code.ABORTED)
    assert len(write_between_snapshots) == 2 * groupcontroller.CUT_ATTEMPTS
    assert not list(csi.driver.pool.snapshots.iterdir()), "every failed cut is removed"
    assert not csi.driver.store.state.snapshots
    assert not csi.driver.store.state.group_snapshots


async def cut_with_a_write(
    csi: Client, monkeypatch: pytest.MonkeyPatch, after_snapshot: int
) -> tuple[grpc.StatusCode, Path]:
    """Cut a group of two while a write, fsync'd but not committed, goes to the first
    member right after the snapshot of member `after_snapshot`; the code, the member."""
    sources = await volumes(csi, 2)
    first = csi.driver.pool.volume_path(sources[0])
    taken: list[Path] = []
    real_snapshot = Pool.snapshot

    async def snapshot_then_write(pool: Pool, source: Path, target: Path, readonly: bool) -> None:
        await real_snapshot(pool, source, target, readonly)
        if len(taken) % len(sources) == after_snapshot:
            write_synced(first / "after", os.urandom(4096))
        taken.append(source)

    monkeypatch.setattr(Pool, "snapshot", snapshot_then_write)
    monkeypatch.setattr(groupcontroller, "CUT_RETRY_DELAY", 0.0)
    request = group_request("g", sources)
    return await code_of(csi.group_controller.CreateVolumeGroupSnapshot(request)), first


async def test_a_write_fsynced_between_two_snapshots_fails_the_cut(
    csi: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It sits in btrfs' log tree, which a crash would replay, but the next member's
    snapshot commits it and so moves the first member's generation."""
    code, _ = await cut_with_a_write(csi, monkeypatch, after_snapshot=0)
    assert code == Code.ABORTED
    assert not list(csi.driver.pool.snapshots.iterdir()), "every failed cut is removed"


async def test_a_write_fsynced_after_the_last_snapshot_is_after_the_cut(
    csi: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cut is the state at the last snapshot's commit; the write came after it and
    is in no member's snapshot, as a crash at that instant would not have it."""
    code, first = await cut_with_a_write(csi, monkeypatch, after_snapshot=1)
    assert code == Code.OK
    (group,) = csi.driver.store.state.group_snapshots.values()
    snapshot = csi.driver.pool.snapshot_path(group.snapshot_ids[0])
    assert (first / "after").exists()
    assert not (snapshot / "after").exists()


async def test_every_group_cut_under_a_writer_is_write_order_consistent(csi: Client) -> None:
    """A writer updates A then B, each durably, over and over: in any crash-consistent
    cut B's counter is never ahead of A's, and A's at most one ahead of B's."""
    first, second = await volumes(csi, 2)
    pool = csi.driver.pool
    stop = threading.Event()

    def replace_synced(directory: Path, value: int) -> None:
        """Replace the counter durably: a cut sees the old value or the new one."""
        write_synced(directory / "counter.new", str(value).encode())
        (directory / "counter.new").replace(directory / "counter")
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def writer() -> None:
        counter = 0
        while not stop.is_set():
            counter += 1
            for volume_id in (first, second):
                replace_synced(pool.volume_path(volume_id), counter)

    for volume_id in (first, second):
        replace_synced(pool.volume_path(volume_id), 0)

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes: list[tuple[int, int] | None] = []
    try:
        for index in range(20):
            request = group_request(f"g{index}", [first, second])
            try:
                response = await csi.group_controller.CreateVolumeGroupSnapshot(request)
            except grpc.aio.AioRpcError as error:
                assert error.code() == Code.ABORTED
                outcomes.append(None)
                continue
            a, b = (
                int((pool.snapshot_path(s.snapshot_id) / "counter").read_text())
                for s in response.group_snapshot.snapshots
            )
            outcomes.append((a, b))
    finally:
        stop.set()
        thread.join()
    for outcome in outcomes:
        if outcome is not None:
            a, b = outcome
            assert b <= a <= b + 1, outcomes
    # Not every cut may win against the writer (ABORTED: the CO retries), but some do.
    assert any(outcome is not None for outcome in outcomes), outcomes
