"""Spec conformance: status codes per RPC, idempotency, pagination and concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from csi.controller import volume_key
from csi.operations import Operations
from csi.state import State, VolumeRecord
from csi.v1 import csi_pb2
from tests.csi.conftest import (
    NODE,
    Client,
    Mode,
    block_capability,
    create_request,
    mount_capability,
)
from tests.csi.test_lifecycle import publish_request, stage_request

T = TypeVar("T")

pytestmark = pytest.mark.root

MiB = 1024**2
UNKNOWN_VOLUME = "v" + "0" * 32
UNKNOWN_SNAPSHOT = "s" + "0" * 32
Code = grpc.StatusCode


async def code_of(call: Awaitable[Any]) -> Code:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return Code.OK


async def created(csi: Client, name: str = "pvc", **kwargs: Any) -> csi_pb2.Volume:
    return (await csi.controller.CreateVolume(create_request(name, **kwargs))).volume


async def staged(csi: Client, capability: csi_pb2.VolumeCapability | None = None) -> csi_pb2.Volume:
    capability = capability or mount_capability()
    volume = await created(csi, capability=capability)
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    return volume


# --- CreateVolume ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda r: r.ClearField("name"), Code.INVALID_ARGUMENT),
        (lambda r: r.ClearField("volume_capabilities"), Code.INVALID_ARGUMENT),
        (lambda r: setattr(r, "name", "x" * 129), Code.INVALID_ARGUMENT),
        (lambda r: setattr(r, "name", "bad\x01name"), Code.INVALID_ARGUMENT),
        (lambda r: r.parameters.update({"unknown": "1"}), Code.INVALID_ARGUMENT),
        (
            lambda r: r.volume_capabilities[0].access_mode.__setattr__(
                "mode", Mode.MULTI_NODE_MULTI_WRITER
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            lambda r: r.volume_capabilities[0].mount.__setattr__("fs_type", "xfs"),
            Code.INVALID_ARGUMENT,
        ),
        (lambda r: r.volume_capabilities.append(block_capability()), Code.INVALID_ARGUMENT),
        (lambda r: r.capacity_range.__setattr__("required_bytes", -1), Code.INVALID_ARGUMENT),
        (lambda r: r.capacity_range.__setattr__("limit_bytes", MiB), Code.OUT_OF_RANGE),
        (lambda r: r.capacity_range.__setattr__("required_bytes", 1024**4), Code.OUT_OF_RANGE),
        (
            lambda r: r.volume_content_source.snapshot.__setattr__("snapshot_id", UNKNOWN_SNAPSHOT),
            Code.NOT_FOUND,
        ),
        (
            lambda r: r.volume_content_source.volume.__setattr__("volume_id", "../../etc"),
            Code.NOT_FOUND,
        ),
        (
            lambda r: r.accessibility_requirements.requisite.add(
                segments={"topology.local.csi.nodeplug.io/node": "other-node"}
            ),
            Code.RESOURCE_EXHAUSTED,
        ),
    ],
)
async def test_create_volume_errors(
    csi: Client, mutate: Callable[[csi_pb2.CreateVolumeRequest], object], code: Code
) -> None:
    request = create_request("pvc-bad")
    mutate(request)
    assert await code_of(csi.controller.CreateVolume(request)) == code
    assert not (await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())).entries


async def test_create_volume_takes_128_byte_names_and_is_idempotent(csi: Client) -> None:
    name = "n" * 120 + "é" * 4  # 128 bytes of UTF-8
    first = await created(csi, name)
    for _ in range(10):
        assert await created(csi, name) == first
    assert len((await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())).entries) == 1
    assert await code_of(csi.controller.CreateVolume(create_request(name, 32 * MiB))) == (
        Code.ALREADY_EXISTS
    )
    block = create_request(name, capability=block_capability())
    assert await code_of(csi.controller.CreateVolume(block)) == Code.ALREADY_EXISTS


async def test_resource_exhausted_when_the_pool_is_full(csi: Client) -> None:
    request = create_request("pvc-huge", 1000 * MiB)
    assert await code_of(csi.controller.CreateVolume(request)) == Code.RESOURCE_EXHAUSTED


async def test_get_capacity_reports_free_space_for_this_node_only(csi: Client) -> None:
    here = await csi.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    assert 500 * MiB < here.available_capacity < 1024 * MiB
    elsewhere = await csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(
            accessible_topology=csi_pb2.Topology(
                segments={"topology.local.csi.nodeplug.io/node": "other"}
            )
        )
    )
    assert elsewhere.available_capacity == 0
    info = await csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE
    mine = await csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(accessible_topology=info.accessible_topology)
    )
    assert mine.available_capacity > 0


# --- delete, validate, list -------------------------------------------------------------


async def test_delete_is_idempotent_and_refuses_volumes_in_use(csi: Client) -> None:
    volume = await staged(csi)
    request = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
    assert await code_of(csi.controller.DeleteVolume(request)) == Code.FAILED_PRECONDITION
    await csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(csi.kubelet / "staging" / "stage")
        )
    )
    for _ in range(10):
        await csi.controller.DeleteVolume(request)
    assert await code_of(csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest())) == (
        Code.INVALID_ARGUMENT
    )
    for hostile in (UNKNOWN_VOLUME, "../pool", "/etc/passwd"):
        await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=hostile))


async def test_validate_volume_capabilities(csi: Client) -> None:
    volume = await created(csi)
    ok = await csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[mount_capability()]
        )
    )
    assert ok.confirmed.volume_capabilities == [mount_capability()]
    wrong = await csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[block_capability()]
        )
    )
    assert not wrong.HasField("confirmed")
    assert wrong.message
    for request, code in (
        (
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_capability()]),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=UNKNOWN_VOLUME, volume_capabilities=[mount_capability()]
            ),
            Code.NOT_FOUND,
        ),
    ):
        assert await code_of(csi.controller.ValidateVolumeCapabilities(request)) == code


async def test_list_volumes_and_snapshots_paginate(csi: Client) -> None:
    volumes = [await created(csi, f"pvc-{i}", size=MiB) for i in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await csi.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(v.volume_id for v in volumes)
    for bad in ("garbage", "v" * 33):
        request = csi_pb2.ListVolumesRequest(starting_token=bad)
        assert await code_of(csi.controller.ListVolumes(request)) == Code.ABORTED
        snapshots = csi_pb2.ListSnapshotsRequest(starting_token=bad)
        assert await code_of(csi.controller.ListSnapshots(snapshots)) == Code.ABORTED
    negative = csi_pb2.ListVolumesRequest(max_entries=-1)
    assert await code_of(csi.controller.ListVolumes(negative)) == Code.INVALID_ARGUMENT
    for volume in volumes[:3]:
        await csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name=volume.volume_id)
        )
    first = await csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=2))
    rest = await csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(starting_token=first.next_token)
    )
    assert len(first.entries) + len(rest.entries) == 3
    assert not rest.next_token
    missing = await csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(snapshot_id=UNKNOWN_SNAPSHOT)
    )
    assert not missing.entries


# --- snapshots ---------------------------------------------------------------------------


async def test_snapshot_errors_and_idempotency(csi: Client) -> None:
    volume = await created(csi)
    other = await created(csi, "pvc-other")
    request = csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap")
    first = (await csi.controller.CreateSnapshot(request)).snapshot
    for _ in range(10):
        assert (await csi.controller.CreateSnapshot(request)).snapshot == first
    conflict = csi_pb2.CreateSnapshotRequest(source_volume_id=other.volume_id, name="snap")
    assert await code_of(csi.controller.CreateSnapshot(conflict)) == Code.ALREADY_EXISTS
    for bad, code in (
        (csi_pb2.CreateSnapshotRequest(name="x"), Code.INVALID_ARGUMENT),
        (csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id), Code.INVALID_ARGUMENT),
        (csi_pb2.CreateSnapshotRequest(source_volume_id=UNKNOWN_VOLUME, name="y"), Code.NOT_FOUND),
    ):
        assert await code_of(csi.controller.CreateSnapshot(bad)) == code
    delete = csi_pb2.DeleteSnapshotRequest(snapshot_id=first.snapshot_id)
    for _ in range(10):
        await csi.controller.DeleteSnapshot(delete)
    empty = csi_pb2.DeleteSnapshotRequest()
    assert await code_of(csi.controller.DeleteSnapshot(empty)) == Code.INVALID_ARGUMENT


# --- expansion ------------------------------------------------------------------------------


async def test_controller_expand_errors(csi: Client) -> None:
    volume = await created(csi)
    grow = csi_pb2.CapacityRange(required_bytes=32 * MiB)
    for request, code in (
        (csi_pb2.ControllerExpandVolumeRequest(capacity_range=grow), Code.INVALID_ARGUMENT),
        (csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id), Code.INVALID_ARGUMENT),
        (
            csi_pb2.ControllerExpandVolumeRequest(volume_id=UNKNOWN_VOLUME, capacity_range=grow),
            Code.NOT_FOUND,
        ),
        (
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=1024**4),
            ),
            Code.OUT_OF_RANGE,
        ),
    ):
        assert await code_of(csi.controller.ControllerExpandVolume(request)) == code
    request = csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id, capacity_range=grow)
    for _ in range(10):
        assert (await csi.controller.ControllerExpandVolume(request)).capacity_bytes == 32 * MiB


# --- node ------------------------------------------------------------------------------------


async def test_stage_and_publish_are_idempotent_and_conflicts_are_already_exists(
    csi: Client,
) -> None:
    capability = mount_capability()
    volume = await staged(csi, capability)
    stage = stage_request(csi, volume.volume_id, capability)
    publish = publish_request(csi, volume.volume_id, capability)
    for _ in range(10):
        await csi.node.NodeStageVolume(stage)
        await csi.node.NodePublishVolume(publish)
    readonly = publish_request(csi, volume.volume_id, capability, readonly=True)
    assert await code_of(csi.node.NodePublishVolume(readonly)) == Code.ALREADY_EXISTS
    other = mount_capability(flags=("noatime",))
    different = stage_request(csi, volume.volume_id, other)
    assert await code_of(csi.node.NodeStageVolume(different)) == Code.ALREADY_EXISTS
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=publish.target_path
    )
    unstage = csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=stage.staging_target_path
    )
    for _ in range(10):
        await csi.node.NodeUnpublishVolume(unpublish)
    for _ in range(10):
        await csi.node.NodeUnstageVolume(unstage)


async def test_publish_before_stage_is_failed_precondition(csi: Client) -> None:
    capability = mount_capability()
    volume = await created(csi)
    (csi.kubelet / "staging" / "stage").mkdir(parents=True)
    request = publish_request(csi, volume.volume_id, capability)
    assert await code_of(csi.node.NodePublishVolume(request)) == Code.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("path", "teardown"),
    [
        ("relative/path", Code.INVALID_ARGUMENT),
        ("/etc", Code.INVALID_ARGUMENT),
        ("{kubelet}/../escape", Code.INVALID_ARGUMENT),
        ("{kubelet}/./x", Code.INVALID_ARGUMENT),
        ("{kubelet}//x", Code.INVALID_ARGUMENT),
        ("{kubelet}/a\x00b", Code.INVALID_ARGUMENT),
        ("{kubelet}", Code.INVALID_ARGUMENT),
        # Well-formed: nothing is staged or published there, so there is nothing to undo.
        ("{kubelet}/link/x", Code.OK),
        ("{kubelet}/link", Code.OK),
    ],
)
async def test_paths_outside_the_kubelet_dir_are_invalid_argument(
    csi: Client, path: str, teardown: Code
) -> None:
    (csi.kubelet / "link").symlink_to("/tmp")
    path = path.format(kubelet=csi.kubelet)
    capability = mount_capability()
    volume = await staged(csi, capability)
    unstaged = await created(csi, "pvc-unstaged")
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=unstaged.volume_id, staging_target_path=path, volume_capability=capability
            )
        ),
        lambda: csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(csi.kubelet / "staging" / "stage"),
                target_path=path,
                volume_capability=capability,
            )
        ),
    ]
    for call in calls:
        assert await code_of(call()) == Code.INVALID_ARGUMENT
    teardowns: list[Callable[[], Awaitable[Any]]] = [
        lambda: csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=path)
        ),
        lambda: csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=path)
        ),
    ]
    for call in teardowns:
        assert await code_of(call()) == teardown
    # A volume_path is only looked up among the volume's stagings and publications.
    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=path)
    assert await code_of(csi.node.NodeGetVolumeStats(stats)) == Code.NOT_FOUND
    assert not Path("/tmp/x").is_mount()


async def test_node_rpcs_with_missing_fields_or_unknown_volumes(csi: Client) -> None:
    capability = mount_capability()
    staging = str(csi.kubelet / "staging" / "s")
    target = str(csi.kubelet / "pods" / "t")
    cases: list[tuple[Awaitable[Any], Code]] = [
        (
            csi.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    staging_target_path=staging, volume_capability=capability
                )
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=UNKNOWN_VOLUME, volume_capability=capability
                )
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=UNKNOWN_VOLUME, staging_target_path=staging
                )
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=UNKNOWN_VOLUME,
                    staging_target_path=staging,
                    volume_capability=capability,
                )
            ),
            Code.NOT_FOUND,
        ),
        (
            csi.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=UNKNOWN_VOLUME, staging_target_path=staging, target_path=target
                )
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=UNKNOWN_VOLUME,
                    staging_target_path=staging,
                    target_path=target,
                    volume_capability=capability,
                )
            ),
            Code.NOT_FOUND,
        ),
        (
            csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(target_path=target)),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=UNKNOWN_VOLUME)
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=UNKNOWN_VOLUME, target_path=target)
            ),
            Code.OK,
        ),
        (
            csi.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=UNKNOWN_VOLUME, staging_target_path=staging
                )
            ),
            Code.OK,
        ),
        (
            csi.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(staging_target_path=staging)
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=UNKNOWN_VOLUME, volume_path=target)
            ),
            Code.NOT_FOUND,
        ),
        (
            csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_path=target)),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(volume_id=UNKNOWN_VOLUME, volume_path=target)
            ),
            Code.NOT_FOUND,
        ),
        (
            csi.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id=UNKNOWN_VOLUME)),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest()),
            Code.UNIMPLEMENTED,
        ),
    ]
    for call, code in cases:
        assert await code_of(call) == code


async def test_capabilities_advertise_what_is_implemented(csi: Client) -> None:
    rpc = csi_pb2.ControllerServiceCapability.RPC
    controller = await csi.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()
    )
    assert {c.rpc.type for c in controller.capabilities} == {
        rpc.CREATE_DELETE_VOLUME,
        rpc.LIST_VOLUMES,
        rpc.GET_CAPACITY,
        rpc.CREATE_DELETE_SNAPSHOT,
        rpc.LIST_SNAPSHOTS,
        rpc.CLONE_VOLUME,
        rpc.EXPAND_VOLUME,
        rpc.SINGLE_NODE_MULTI_WRITER,
        rpc.GET_SNAPSHOT,
    }
    node_rpc = csi_pb2.NodeServiceCapability.RPC
    node = await csi.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    assert {c.rpc.type for c in node.capabilities} == {
        node_rpc.STAGE_UNSTAGE_VOLUME,
        node_rpc.GET_VOLUME_STATS,
        node_rpc.EXPAND_VOLUME,
        node_rpc.VOLUME_CONDITION,
        node_rpc.SINGLE_NODE_MULTI_WRITER,
    }


# --- concurrency ----------------------------------------------------------------------------


async def test_aborted_while_the_same_volume_or_name_is_busy(csi: Client) -> None:
    volume = await created(csi)
    other = await created(csi, "pvc-free")
    grow = csi_pb2.CapacityRange(required_bytes=32 * MiB)
    with csi.driver.locks.hold(volume_key(volume.volume_id), "volume-name:pvc-busy"):
        busy = csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id, capacity_range=grow
        )
        assert await code_of(csi.controller.ControllerExpandVolume(busy)) == Code.ABORTED
        delete = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
        assert await code_of(csi.controller.DeleteVolume(delete)) == Code.ABORTED
        assert (
            await code_of(csi.controller.CreateVolume(create_request("pvc-busy"))) == Code.ABORTED
        )
        # Other volumes and names are not held up: locks are per key.
        free = csi_pb2.ControllerExpandVolumeRequest(volume_id=other.volume_id, capacity_range=grow)
        await csi.controller.ControllerExpandVolume(free)
        await created(csi, "pvc-another")


async def test_a_create_that_has_not_run_yet_is_found_by_the_next_call(
    csi: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create's task records its volume only once it runs: a second call with the same
    name that comes in between must wait for it, not start a second volume."""
    release = asyncio.Event()
    lookups = 0
    second_looked = asyncio.Event()
    started = asyncio.Event()
    real_start = Operations.start
    real_lookup = State.volume_by_name

    def start_held(
        operations: Operations, key: str, subject: object, work: Coroutine[Any, Any, T]
    ) -> asyncio.Task[T]:
        async def held() -> T:
            await release.wait()
            return await work

        started.set()
        return real_start(operations, key, subject, held())

    def counted_lookup(state: State, name: str) -> VolumeRecord | None:
        nonlocal lookups
        lookups += 1
        if lookups == 2:
            second_looked.set()
        return real_lookup(state, name)

    monkeypatch.setattr(Operations, "start", start_held)
    monkeypatch.setattr(State, "volume_by_name", counted_lookup)

    async def create() -> csi_pb2.CreateVolumeResponse:
        return await csi.controller.CreateVolume(create_request("pvc-held"))

    # The second call comes once the first has started its operation and let go of
    # the name's lock: before that, the lock answers it ABORTED (another test's case).
    calls = [asyncio.create_task(create())]
    await started.wait()
    calls.append(asyncio.create_task(create()))
    await second_looked.wait()
    release.set()
    first, second = await asyncio.gather(*calls)
    assert first.volume.volume_id == second.volume.volume_id
    listed = await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert len(listed.entries) == 1


async def test_concurrent_creates_of_one_name_make_one_volume(csi: Client) -> None:
    codes = await asyncio.gather(
        *(code_of(csi.controller.CreateVolume(create_request("pvc-race"))) for _ in range(8))
    )
    assert set(codes) <= {Code.OK, Code.ABORTED}
    assert Code.OK in codes
    listed = await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert len(listed.entries) == 1
