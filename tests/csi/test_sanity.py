"""What the upstream conformance suite (kubernetes-csi/csi-test `csi-sanity`) checks, in Python.

Each case names the csi-sanity spec it stands for. The requests are shaped as the
suite shapes them: ids of a foreign form ("fake-vol-id-..."), relative paths, fields
left out one at a time. Every field the spec requires is checked before anything is
looked up, so a request missing one is INVALID_ARGUMENT whatever its ids name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.csi.conftest import Client, Mode, block_capability, create_request, mount_capability
from tests.csi.test_conformance import code_of
from tests.csi.test_lifecycle import publish_request, stage_request

pytestmark = pytest.mark.root

Code = grpc.StatusCode
FAKE_VOLUME = "fake-vol-id-0123456789"
# An access mode number no CSI version defines.
UNDEFINED_MODE = 109


def staging(csi: Client) -> str:
    return str(csi.kubelet / "staging" / "stage")


def target(csi: Client) -> str:
    return str(csi.kubelet / "pods" / "target")


Call = Callable[[Client], Awaitable[Any]]

MISSING_FIELDS: list[tuple[str, Call]] = [
    (
        "NodePublishVolume should fail when no target path is provided",
        lambda csi: csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(volume_id=FAKE_VOLUME)
        ),
    ),
    (
        "NodePublishVolume should fail when no volume capability is provided",
        lambda csi: csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(volume_id=FAKE_VOLUME, target_path=target(csi))
        ),
    ),
    (
        "NodeUnpublishVolume should fail when no target path is provided",
        lambda csi: csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=FAKE_VOLUME)
        ),
    ),
    (
        "NodeStageVolume should fail when no staging target path is provided",
        lambda csi: csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=FAKE_VOLUME,
                volume_capability=mount_capability(),
                publish_context={"device": "/dev/mock"},
            )
        ),
    ),
    (
        "NodeUnstageVolume should fail when no staging target path is provided",
        lambda csi: csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=FAKE_VOLUME)
        ),
    ),
    (
        "NodeGetVolumeStats should fail when no volume path is provided",
        lambda csi: csi.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=FAKE_VOLUME)
        ),
    ),
    (
        "NodeGetVolumeStats should fail when no volume id is provided",
        lambda csi: csi.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_path="some/path")
        ),
    ),
    (
        "NodeExpandVolume should fail when no volume id is provided",
        lambda csi: csi.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_path=target(csi), volume_capability=mount_capability()
            )
        ),
    ),
    (
        "ValidateVolumeCapabilities should fail when no volume capabilities are provided",
        lambda csi: csi.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=FAKE_VOLUME)
        ),
    ),
    (
        "ControllerExpandVolume should fail if no capacity range is given",
        lambda csi: csi.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(volume_id=FAKE_VOLUME)
        ),
    ),
]


@pytest.mark.parametrize(("spec", "call"), MISSING_FIELDS, ids=[c[0] for c in MISSING_FIELDS])
async def test_a_missing_required_field_is_invalid_argument_whatever_the_id(
    csi: Client, spec: str, call: Call
) -> None:
    assert await code_of(call(csi)) == Code.INVALID_ARGUMENT, spec


NOT_FOUND: list[tuple[str, Call]] = [
    (
        "NodeGetVolumeStats should fail when volume is not found",
        lambda csi: csi.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=FAKE_VOLUME, volume_path="some/path")
        ),
    ),
    (
        "NodeExpandVolume should fail when volume is not found",
        lambda csi: csi.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(volume_id=FAKE_VOLUME, volume_path="some/path")
        ),
    ),
]


@pytest.mark.parametrize(("spec", "call"), NOT_FOUND, ids=[c[0] for c in NOT_FOUND])
async def test_an_unknown_volume_is_not_found(csi: Client, spec: str, call: Call) -> None:
    assert await code_of(call(csi)) == Code.NOT_FOUND, spec


@pytest.mark.parametrize("path", ["some/path", "/elsewhere", "{kubelet}/pods/other"])
@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
async def test_stats_of_a_published_volume_at_another_path_are_not_found(
    csi: Client, path: str, block: bool
) -> None:
    """NodeGetVolumeStats should fail when volume does not exist on the specified path."""
    capability = block_capability() if block else mount_capability()
    volume = (
        await csi.controller.CreateVolume(create_request("pvc-stats", capability=capability))
    ).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    await csi.node.NodePublishVolume(publish_request(csi, volume.volume_id, capability))
    where = path.format(kubelet=csi.kubelet)
    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=where)
    assert await code_of(csi.node.NodeGetVolumeStats(stats)) == Code.NOT_FOUND
    expand = csi_pb2.NodeExpandVolumeRequest(volume_id=volume.volume_id, volume_path=where)
    assert await code_of(csi.node.NodeExpandVolume(expand)) == Code.NOT_FOUND


# --- bad input that once reached the storage layer (INTERNAL) ---------------------------------


def _too_long(csi: Client) -> str:
    return str(csi.kubelet / "pods") + ("/" + "d" * 200) * 25


def _long_component(csi: Client) -> str:
    return str(csi.kubelet / "pods" / ("x" * 300))


@pytest.mark.parametrize("make_path", [_too_long, _long_component], ids=["PATH_MAX", "NAME_MAX"])
async def test_paths_longer_than_the_kernel_takes_are_invalid_argument(
    csi: Client, make_path: Callable[[Client], str]
) -> None:
    capability = mount_capability()
    volume = (await csi.controller.CreateVolume(create_request("pvc-long"))).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    path = make_path(csi)
    calls: list[Awaitable[Any]] = [
        csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id, staging_target_path=path, volume_capability=capability
            )
        ),
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=staging(csi),
                target_path=path,
                volume_capability=capability,
            )
        ),
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=path,
                target_path=target(csi),
                volume_capability=capability,
            )
        ),
        csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=path)
        ),
        csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id, staging_target_path=path)
        ),
    ]
    for call in calls:
        assert await code_of(call) == Code.INVALID_ARGUMENT


def _undefined_mode(capability: csi_pb2.VolumeCapability) -> csi_pb2.VolumeCapability:
    capability.access_mode.mode = UNDEFINED_MODE  # type: ignore[assignment]
    return capability


@pytest.mark.parametrize("capability", [mount_capability, block_capability], ids=["mount", "block"])
async def test_an_undefined_access_mode_is_invalid_argument(
    csi: Client, capability: Callable[[], csi_pb2.VolumeCapability]
) -> None:
    good = capability()
    volume = (await csi.controller.CreateVolume(create_request("pvc-mode", capability=good))).volume
    bad = _undefined_mode(capability())
    (csi.kubelet / "staging" / "stage").mkdir(parents=True)
    calls: list[Awaitable[Any]] = [
        csi.controller.CreateVolume(create_request("pvc-other", capability=bad)),
        csi.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=volume.volume_id, volume_capabilities=[bad]
            )
        ),
        csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id, staging_target_path=staging(csi), volume_capability=bad
            )
        ),
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=staging(csi),
                target_path=target(csi),
                volume_capability=bad,
            )
        ),
    ]
    for call in calls:
        assert await code_of(call) == Code.INVALID_ARGUMENT
    listed = await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert [e.volume.volume_id for e in listed.entries] == [volume.volume_id]


async def test_an_unsupported_mode_is_an_unconfirmed_answer_not_an_error(csi: Client) -> None:
    volume = (await csi.controller.CreateVolume(create_request("pvc-multi"))).volume
    response = await csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id,
            volume_capabilities=[mount_capability(Mode.MULTI_NODE_MULTI_WRITER)],
        )
    )
    assert not response.HasField("confirmed")
    assert "MULTI_NODE_MULTI_WRITER" in response.message


# --- GetSnapshot (GET_SNAPSHOT) and the GroupController service ------------------------------


async def test_get_snapshot_specs(csi: Client) -> None:
    """GetSnapshot: without an id, by id among unrelated snapshots, and an unknown id."""
    assert await code_of(csi.controller.GetSnapshot(csi_pb2.GetSnapshotRequest())) == (
        Code.INVALID_ARGUMENT
    )
    snapshots = []
    for index in range(3):
        volume = (await csi.controller.CreateVolume(create_request(f"pvc-{index}"))).volume
        request = csi_pb2.CreateSnapshotRequest(
            source_volume_id=volume.volume_id, name=f"snap-{index}"
        )
        snapshots.append((await csi.controller.CreateSnapshot(request)).snapshot)
    found = await csi.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=snapshots[1].snapshot_id)
    )
    assert found.snapshot == snapshots[1]
    assert found.snapshot.ready_to_use
    for unknown in ("none-exist-id", "s" + "0" * 32):
        missing = csi_pb2.GetSnapshotRequest(snapshot_id=unknown)
        assert await code_of(csi.controller.GetSnapshot(missing)) == Code.NOT_FOUND


async def test_group_controller_specs(csi: Client) -> None:
    groups = csi.group_controller
    capabilities = await groups.GroupControllerGetCapabilities(
        csi_pb2.GroupControllerGetCapabilitiesRequest()
    )
    rpc = csi_pb2.GroupControllerServiceCapability.RPC
    assert [c.rpc.type for c in capabilities.capabilities] == [
        rpc.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    ]
    cases: list[tuple[Awaitable[Any], Code]] = [
        (
            groups.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest()),
            Code.INVALID_ARGUMENT,
        ),
        (
            groups.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest()),
            Code.INVALID_ARGUMENT,
        ),
        (
            groups.GetVolumeGroupSnapshot(
                csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="fake-vol-id")
            ),
            Code.NOT_FOUND,
        ),
        (
            groups.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest()),
            Code.INVALID_ARGUMENT,
        ),
        (
            groups.DeleteVolumeGroupSnapshot(
                csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="fake-vol-id")
            ),
            Code.OK,
        ),
    ]
    for call, code in cases:
        assert await code_of(call) == code
