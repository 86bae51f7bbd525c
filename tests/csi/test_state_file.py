"""A state file the driver cannot read stops the CSI driver alone, says why, and is recoverable."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from csi import btrfs
from csi import state as state_module
from csi.pool import Pool, is_subvolume, pending
from csi.state import (
    SnapshotRecord,
    StageRecord,
    StateFileError,
    StateStore,
    Status,
    VolumeRecord,
    create_recorded,
    delete_recorded,
)
from csi.v1 import csi_pb2
from daemon import config as configuration
from deviceplugin.testkit import FakeKubelet
from tests.csi.conftest import create_request, serving
from tests.csi.test_daemon import csi_socket, daemon_config, registration_socket
from tests.daemon.test_operations import eventually, get
from tests.deviceplugin.conftest import running

MiB = 1024**2
RESOURCE = "example.com/widget"


def record(index: int) -> VolumeRecord:
    return VolumeRecord(f"v{index:032x}", f"pvc-{index}", MiB, False, {}, "", 1.0, Status.READY)


def staging(index: int) -> StageRecord:
    return StageRecord(f"v{index:032x}", f"/kubelet/staging/{index}", "cap", status=Status.READY)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every fsync the state store makes (file descriptors), counted."""
    made: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(descriptor: int) -> None:
        made.append(descriptor)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    return made


async def nothing() -> None:
    return None


def newest(store: StateStore) -> dict[str, Any]:
    """The volumes' state file written last, as JSON."""
    files = [json.loads(path.read_text()) for path in store.paths if path.exists()]
    return max(files, key=lambda data: int(data.get("generation", 0)))


async def saved_twice(store: StateStore) -> None:
    """Both volumes' files made (a new file costs its directory an fsync too)."""
    for index in (101, 102):
        store.state.volumes[f"w{index}"] = record(index)
        await store.save()


async def test_node_records_cost_no_fsync_and_volume_records_are_durable(
    short_tmp: Path, fsyncs: list[int]
) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    store.state.volumes["a"] = record(1)
    await store.save()
    assert len(fsyncs) == 2, "a new file: the file, then its directory"
    await saved_twice(store)
    fsyncs.clear()
    store.state.volumes["b"] = record(2)
    await store.save()
    assert len(fsyncs) == 1, "the older file overwritten in place: one fsync"
    volumes_files = [path.read_bytes() for path in store.paths]

    fsyncs.clear()
    stage = staging(1)
    await create_recorded(store, [(store.state.stagings, stage.path, stage)], nothing, nothing)
    await delete_recorded(store, [(store.state.stagings, stage.path, stage)], nothing)
    assert fsyncs == [], "stage and unstage: no fsync"
    assert [path.read_bytes() for path in store.paths] == volumes_files, "not rewritten"
    assert json.loads(store.node_path.read_text())["stagings"] == {}


async def test_a_deletion_is_durable_before_its_work_and_finished_after_a_crash(
    short_tmp: Path, fsyncs: list[int]
) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    volume = record(1)
    store.state.volumes[volume.id] = volume
    await saved_twice(store)
    fsyncs.clear()
    on_disk_during_work: list[str] = []

    async def work() -> None:
        on_disk_during_work.append(newest(store)["volumes"][volume.id]["status"])

    await delete_recorded(store, [(store.state.volumes, volume.id, volume)], work)
    assert on_disk_during_work == ["deleting"]
    assert len(fsyncs) == 1, "one durable write: the DELETING record"
    # A crash now finds the record DELETING, which the reconciler finishes.
    found = StateStore(short_tmp / "state").load()
    assert found.volumes[volume.id].status is Status.DELETING
    # The next durable save carries the removal.
    store.state.volumes["b"] = record(2)
    await store.save()
    assert set(StateStore(short_tmp / "state").load().volumes) == {"b", "w101", "w102"}


async def test_node_records_of_another_boot_are_dropped(short_tmp: Path) -> None:
    before = StateStore(short_tmp / "state", boot="before-the-reboot")
    before.load()
    before.state.volumes["a"] = record(1)
    before.state.stagings["/kubelet/staging/1"] = staging(1)
    await before.save()
    after = StateStore(short_tmp / "state", boot="after-the-reboot")
    state = after.load()
    assert set(state.volumes) == {"a"}
    assert state.stagings == {}, "their mounts went with that boot"
    assert not before.node_path.exists()


async def test_a_version_1_file_hands_its_stagings_over_to_the_node_file(short_tmp: Path) -> None:
    directory = short_tmp / "state"
    directory.mkdir(mode=0o700)
    stage = staging(1)
    old = {
        "version": 1,
        "volumes": {"a": asdict(record(1))},
        "stagings": {stage.path: asdict(stage)},
    }
    (directory / "csi-state.json").write_text(json.dumps(old))
    store = StateStore(directory)
    state = store.load()
    assert state.stagings == {stage.path: stage}
    await store.save()
    written = newest(store)
    assert written["version"] == state_module.FORMAT_VERSION
    assert "stagings" not in written
    assert stage.path in json.loads(store.node_path.read_text())["stagings"]
    assert StateStore(directory).load() == state


def test_a_damaged_node_file_is_named_with_its_own_way_out(short_tmp: Path) -> None:
    store = StateStore(short_tmp / "state")
    store.node_path.parent.mkdir(mode=0o700)
    store.node_path.write_bytes(b'{"version": 2, "stagings": {"')
    with pytest.raises(StateFileError) as error:
        store.load()
    message = str(error.value)
    assert str(store.node_path) in message
    assert "not valid JSON" in message
    assert "remove it and restart the daemon" in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b'{"version": 1, "volumes": {"v', "is not valid JSON (truncated?)"),
        (b"[]", "does not hold a JSON object"),
        (b'{"version": 4}', "written by a newer nodeplug (format version 4"),
        (b'{"version": 3, "generation": 0}', "has no valid generation (0)"),
        (b'{"version": 3, "generation": 1, "checksum": "0"}', "does not match its checksum"),
        (b'{"version": "1"}', "unknown format version '1'"),
        (b"{}", "unknown format version None"),
        (b'{"version": 1, "volumes": {"v1": {"id": "v1"}}}', "holds a record"),
        (b'{"version": 1, "volumes": {"v1": 7}}', "holds a record"),
        (b'{"version": 1, "volumes": []}', "holds a record"),
        (b"\xff\xfe{", "is not UTF-8"),
    ],
)
def test_an_unreadable_state_file_is_named_with_its_problem_and_the_way_out(
    short_tmp: Path, content: bytes, problem: str
) -> None:
    store = StateStore(short_tmp / "state")
    store.node_path.parent.mkdir(mode=0o700)
    damaged = store.paths[0]
    damaged.write_bytes(content)
    with pytest.raises(StateFileError) as error:
        store.load()
    message = str(error.value)
    assert str(damaged) in message
    assert problem in message
    assert "repair the one that holds the latest state" in message
    assert damaged.read_bytes() == content, "the damaged file is left as it was"


async def test_the_file_not_written_last_holds_the_state_before_the_last_change(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    store.state.volumes["a"] = record(1)
    await store.save()
    store.state.volumes["b"] = record(2)
    await store.save()
    assert sorted(p.name for p in store.node_path.parent.iterdir()) == sorted(
        [*state_module.STATE_FILES, store.node_path.name]
    )
    for path in store.paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before, last = (json.loads(path.read_text()) for path in store.paths)
    assert (set(before["volumes"]), set(last["volumes"])) == ({"a"}, {"a", "b"})
    store.state.volumes["c"] = record(3)
    await store.save()
    assert set(json.loads(store.paths[0].read_text())["volumes"]) == {"a", "b", "c"}, (
        "the older file is the one overwritten"
    )

    # A crash during the last write: that file is torn; the one before it is used.
    text = store.paths[0].read_text()
    store.paths[0].write_text(text[: len(text) // 2])
    assert set(StateStore(short_tmp / "state").load().volumes) == {"a", "b"}
    assert any("passing over" in r.getMessage() for r in caplog.records)
    # Torn past its end (a longer file before it), or changed: the checksum tells.
    changed = json.loads(text)
    del changed["volumes"]["a"]
    store.paths[0].write_text(json.dumps(changed))
    assert set(StateStore(short_tmp / "state").load().volumes) == {"a", "b"}
    # Repaired by hand, its checksum removed: taken as it is.
    del changed["checksum"]
    store.paths[0].write_text(json.dumps(changed))
    assert set(StateStore(short_tmp / "state").load().volumes) == {"b", "c"}


async def test_the_next_write_goes_over_the_torn_file(short_tmp: Path) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    for index in range(3):
        store.state.volumes[f"v{index}"] = record(index)
        await store.save()
    store.paths[0].write_bytes(b'{"version": 3, "gen')
    again = StateStore(short_tmp / "state")
    again.load()
    again.state.volumes["v9"] = record(9)
    await again.save()
    assert json.loads(store.paths[0].read_text())["generation"] == 3
    assert set(StateStore(short_tmp / "state").load().volumes) == {"v0", "v1", "v9"}


async def test_a_file_of_a_newer_version_stops_the_driver_even_beside_a_good_one(
    short_tmp: Path,
) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    for index in range(2):
        store.state.volumes[f"v{index}"] = record(index)
        await store.save()
    store.paths[0].write_text('{"version": 4, "generation": 9}')
    with pytest.raises(StateFileError, match="newer nodeplug"):
        StateStore(short_tmp / "state").load()


async def test_a_version_2_file_is_taken_over_and_refused_by_older_daemons_after(
    short_tmp: Path,
) -> None:
    directory = short_tmp / "state"
    directory.mkdir(mode=0o700)
    legacy = {"version": 2, "volumes": {"a": asdict(record(1))}}
    (directory / "csi-state.json").write_text(json.dumps(legacy))
    (directory / "csi-state.json.prev").write_text(json.dumps({"version": 2}))
    store = StateStore(directory)
    assert set(store.load().volumes) == {"a"}
    assert not (directory / "csi-state.json.prev").exists()
    assert json.loads(store.paths[0].read_text()) == legacy, "an older daemon still reads it"
    assert set(StateStore(directory).load().volumes) == {"a"}
    store.state.volumes["b"] = record(2)
    await store.save()
    assert json.loads(store.paths[0].read_text())["version"] == 3, "older daemons refuse it"
    assert set(StateStore(directory).load().volumes) == {"a", "b"}


@pytest.mark.root
async def test_a_damaged_state_file_stops_only_the_csi_driver(
    short_tmp: Path, btrfs_pool: Path, kubelet: FakeKubelet, caplog: pytest.LogCaptureFixture
) -> None:
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    (state / "csi-state.json").write_text('{"version": 1, "volumes": {"v')
    plugins = [{"resourceName": RESOURCE, "backend": "simulated", "config": {"count": 1}}]
    data = {**daemon_config(short_tmp, btrfs_pool), "devicePlugins": plugins}
    async with running(configuration.parse(data)) as daemon:
        await kubelet.wait_for_devices(RESOURCE, lambda devices: len(devices) == 1)
        await eventually(lambda: bool(daemon.problems()))
        status, body = await get(daemon, "/readyz")
        answer = json.loads(body)
        assert status == 503
        assert answer["waiting_for"] == ["CSI driver"]
        problem = answer["problems"]["CSI driver"]
        assert str(state / "csi-state.json") in problem
        assert "not valid JSON" in problem
        assert "repair the one that holds the latest state" in problem
        assert not csi_socket(short_tmp).exists()
        assert not registration_socket(short_tmp).exists()
        health, _ = await get(daemon, "/healthz")
        assert health == 200, "liveness holds: a restart would not fix the file"
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert any(getattr(r, "problem", "") == problem for r in logged)


@pytest.mark.root
async def test_a_create_writes_no_intent_and_one_durable_record(
    short_tmp: Path, btrfs_pool: Path, fsyncs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen_during_work: list[tuple[bool, list[str]]] = []
    real_provision = Pool.provision

    async def provision(pool: Pool, path: Path, *args: Any) -> None:
        await real_provision(pool, path, *args)
        store = StateStore(short_tmp / "state")
        seen_during_work.append((is_subvolume(path), list(store.load().volumes)))

    monkeypatch.setattr(Pool, "provision", provision)
    async with serving(short_tmp, btrfs_pool) as csi:
        # The start wrote one of the two files; this makes the other.
        first = (await csi.controller.CreateVolume(create_request("pvc-0"))).volume.volume_id
        fsyncs.clear()
        seen_during_work.clear()
        volume = (await csi.controller.CreateVolume(create_request("pvc"))).volume
        assert seen_during_work == [(True, [first])], "made under its pending name, not recorded"
        assert len(fsyncs) == 1, "one durable write: the READY record"
        placed = csi.driver.pool.volume_path(volume.volume_id)
        assert is_subvolume(placed)
        assert not pending(placed).exists()
        saved = StateStore(short_tmp / "state").load()
        assert saved.volumes[volume.volume_id].status is Status.READY


@pytest.mark.root
async def test_a_crash_around_the_ready_write_is_finished_at_the_next_start(
    short_tmp: Path, btrfs_pool: Path
) -> None:
    """Pending subvolumes: placed if their READY record was written, deleted if not."""
    async with serving(short_tmp, btrfs_pool) as csi:
        pool = csi.driver.pool
    written = VolumeRecord("v" + "1" * 32, "pvc-written", MiB, False, {}, "", 1.0, Status.READY)
    snapshot = SnapshotRecord("s" + "1" * 31, "snap-written", written.id, MiB, 1.0, Status.READY)
    unwritten = pool.volume_path("v" + "2" * 32)
    made = pending(pool.volume_path(written.id))
    btrfs.create_subvolume(made)
    btrfs.snapshot(made, pending(pool.snapshot_path(snapshot.id)), readonly=True)
    btrfs.create_subvolume(pending(unwritten))
    store = StateStore(short_tmp / "state")
    store.load()
    store.state.volumes[written.id] = written
    store.state.snapshots[snapshot.id] = snapshot
    await store.save()

    async with serving(short_tmp, btrfs_pool) as csi:
        assert pool.subvolume_ids(pool.volumes) == {written.id}
        assert pool.subvolume_ids(pool.snapshots) == {snapshot.id}
        assert [p.name for p in pool.volumes.iterdir()] == [written.id], "no pending one is left"
        assert [p.name for p in pool.snapshots.iterdir()] == [snapshot.id]
        listed = await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
        assert [e.volume.volume_id for e in listed.entries] == [written.id]


async def test_a_cancelled_save_holds_the_next_one_until_its_write_ends(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    writing = threading.Event()
    overlapped: list[bool] = []
    real_write = state_module._write_in_place

    def slow_write(path: Path, data: bytes) -> None:
        overlapped.append(writing.is_set())
        writing.set()
        time.sleep(0.2)
        real_write(path, data)
        writing.clear()

    monkeypatch.setattr(state_module, "_write_in_place", slow_write)
    store.state.volumes["a"] = record(1)
    first = asyncio.create_task(store.save())
    await asyncio.to_thread(writing.wait, 5)
    first.cancel()
    store.state.volumes["b"] = record(2)
    await store.save()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert overlapped == [False, False], "the second write began after the first ended"
    assert set(StateStore(short_tmp / "state").load().volumes) == {"a", "b"}
