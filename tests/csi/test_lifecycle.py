"""The full CSI lifecycle on real btrfs, real mounts and real loop devices."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import grpc
import pytest

from csi.reconcile import reconcile
from csi.v1 import csi_pb2
from tests.csi.conftest import (
    Client,
    Mode,
    block_capability,
    create_request,
    mount_capability,
    sh,
)

pytestmark = pytest.mark.root

MiB = 1024**2


def stage_request(
    client: Client, volume_id: str, capability: csi_pb2.VolumeCapability, name: str = "stage"
) -> csi_pb2.NodeStageVolumeRequest:
    path = client.kubelet / "staging" / name
    path.mkdir(parents=True, exist_ok=True)
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(path), volume_capability=capability
    )


def publish_request(
    client: Client,
    volume_id: str,
    capability: csi_pb2.VolumeCapability,
    target: str = "target",
    readonly: bool = False,
    stage: str = "stage",
) -> csi_pb2.NodePublishVolumeRequest:
    pods = client.kubelet / "pods"
    pods.mkdir(exist_ok=True)
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        staging_target_path=str(client.kubelet / "staging" / stage),
        target_path=str(pods / target),
        volume_capability=capability,
        readonly=readonly,
    )


def write(path: Path, size: int) -> None:
    """Write size bytes of data that cannot be compressed or deduplicated, and sync."""
    with path.open("wb") as file:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, MiB))
            file.write(chunk)
            remaining -= len(chunk)
        file.flush()
        os.fsync(file.fileno())


def device_size(path: Path) -> int:
    return int(sh("blockdev", "--getsize64", str(path)))


def mounted(path: Path) -> bool:
    return any(
        line.split()[4] == str(path)
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


async def test_filesystem_volume_full_lifecycle(csi: Client) -> None:
    capability = mount_capability()
    volume = (await csi.controller.CreateVolume(create_request("pvc-fs"))).volume
    assert volume.capacity_bytes == 16 * MiB
    assert dict(volume.accessible_topology[0].segments) == {
        "topology.local.csi.nodeplug.io/node": "node-1"
    }
    stage = stage_request(csi, volume.volume_id, capability)
    await csi.node.NodeStageVolume(stage)
    publish = publish_request(csi, volume.volume_id, capability)
    await csi.node.NodePublishVolume(publish)
    target = Path(publish.target_path)
    assert mounted(target)
    write(target / "data", 4 * MiB)
    assert (Path(stage.staging_target_path) / "data").exists()

    stats = await csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(target))
    )
    assert not stats.volume_condition.abnormal
    usage = {u.unit: u for u in stats.usage}
    assert usage[csi_pb2.VolumeUsage.BYTES].total == 16 * MiB
    assert usage[csi_pb2.VolumeUsage.BYTES].used >= 4 * MiB

    await csi.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    )
    assert not target.exists(), "NodeUnpublish removes the target path it created"
    await csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=stage.staging_target_path
        )
    )
    assert not mounted(Path(stage.staging_target_path))
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    listed = await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert not listed.entries


async def test_block_volume_full_lifecycle(csi: Client) -> None:
    capability = block_capability()
    request = create_request("pvc-block", 8 * MiB, capability)
    volume = (await csi.controller.CreateVolume(request)).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    publish = publish_request(csi, volume.volume_id, capability)
    await csi.node.NodePublishVolume(publish)
    target = Path(publish.target_path)
    assert stat.S_ISBLK(target.stat().st_mode)
    assert device_size(target) == 8 * MiB
    await csi.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    )
    assert not target.exists()
    await csi.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id,
            staging_target_path=str(csi.kubelet / "staging" / "stage"),
        )
    )
    assert not await csi.driver.pool.loop_devices(csi.driver.pool.disk_path(volume.volume_id))
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


async def test_quota_enforced_and_expansion_lifts_it(csi: Client) -> None:
    capability = mount_capability()
    volume = (await csi.controller.CreateVolume(create_request("pvc-quota", 16 * MiB))).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    publish = publish_request(csi, volume.volume_id, capability)
    await csi.node.NodePublishVolume(publish)
    target = Path(publish.target_path)
    with pytest.raises(OSError) as error:
        write(target / "big", 24 * MiB)
    assert error.value.errno in {errno.EDQUOT, errno.ENOSPC}
    (target / "big").unlink()

    expanded = await csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        )
    )
    assert expanded.capacity_bytes == 64 * MiB
    assert not expanded.node_expansion_required
    write(target / "big", 24 * MiB)  # online: the published volume takes it now


async def test_block_expansion_is_seen_by_the_loop_device(csi: Client) -> None:
    capability = block_capability()
    volume = (
        await csi.controller.CreateVolume(create_request("pvc-grow", 8 * MiB, capability))
    ).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    publish = publish_request(csi, volume.volume_id, capability)
    await csi.node.NodePublishVolume(publish)
    expanded = await csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
        )
    )
    assert expanded.node_expansion_required
    response = await csi.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=volume.volume_id, volume_path=publish.target_path)
    )
    assert response.capacity_bytes == 32 * MiB
    assert device_size(Path(publish.target_path)) == 32 * MiB


async def test_snapshot_restore_and_clone_carry_the_data(csi: Client) -> None:
    capability = mount_capability()
    volume = (await csi.controller.CreateVolume(create_request("pvc-origin"))).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    publish = publish_request(csi, volume.volume_id, capability)
    await csi.node.NodePublishVolume(publish)
    (Path(publish.target_path) / "file").write_text("before")
    snapshot = (
        await csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap-1")
        )
    ).snapshot
    assert snapshot.ready_to_use
    assert snapshot.size_bytes == volume.capacity_bytes
    (Path(publish.target_path) / "file").write_text("after")

    restore = create_request("pvc-restored", 32 * MiB)
    restore.volume_content_source.snapshot.snapshot_id = snapshot.snapshot_id
    restored = (await csi.controller.CreateVolume(restore)).volume
    assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
    assert restored.capacity_bytes == 32 * MiB
    clone = create_request("pvc-clone")
    clone.volume_content_source.volume.volume_id = volume.volume_id
    cloned = (await csi.controller.CreateVolume(clone)).volume
    pool = csi.driver.pool
    assert (pool.volume_path(restored.volume_id) / "file").read_text() == "before"
    assert (pool.volume_path(cloned.volume_id) / "file").read_text() == "after"

    too_small = create_request("pvc-small", 8 * MiB)
    too_small.capacity_range.limit_bytes = 8 * MiB
    too_small.volume_content_source.snapshot.snapshot_id = snapshot.snapshot_id
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await csi.controller.CreateVolume(too_small)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE

    listed = await csi.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(source_volume_id=volume.volume_id)
    )
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snapshot.snapshot_id]
    await csi.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
    )
    assert not (await csi.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())).entries


def level0_qgroups(pool: Path) -> set[str]:
    """The pool's subvolume qgroups, stale ones (whose subvolume is gone) included."""
    output = sh("btrfs", "qgroup", "show", "--raw", str(pool))
    return {line.split()[0] for line in output.splitlines() if line.startswith("0/")}


async def test_deleted_volumes_and_snapshots_leave_no_qgroup(csi: Client) -> None:
    pool = csi.driver.pool
    before = level0_qgroups(pool.root)
    volume = (await csi.controller.CreateVolume(create_request("pvc-qgroup"))).volume
    # Data makes the qgroup busy until the kernel has dropped the deleted subvolume.
    write(pool.volume_path(volume.volume_id) / "data", 4 * MiB)
    snapshot = (
        await csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name="snap-qgroup")
        )
    ).snapshot
    created = {
        "0/" + sh("btrfs", "inspect-internal", "rootid", str(path)).strip()
        for path in (pool.volume_path(volume.volume_id), pool.snapshot_path(snapshot.snapshot_id))
    }
    assert created <= level0_qgroups(pool.root)
    await csi.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
    )
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    # The kernel frees them once it has dropped the subvolumes: the driver waits for that
    # in the background, not in DeleteVolume.
    await pool.qgroups_dropped()
    assert level0_qgroups(pool.root) == before


async def test_readonly_publication_refuses_writes(csi: Client) -> None:
    capability = mount_capability()
    volume = (await csi.controller.CreateVolume(create_request("pvc-ro"))).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    publish = publish_request(csi, volume.volume_id, capability, readonly=True)
    await csi.node.NodePublishVolume(publish)
    with pytest.raises(OSError) as error:
        (Path(publish.target_path) / "x").write_text("no")
    assert error.value.errno == errno.EROFS


def write_to_device(path: Path, data: bytes) -> None:
    with path.open("r+b", buffering=0) as device:
        device.write(data)
        os.fsync(device.fileno())


def read_from_device(path: Path, size: int) -> bytes:
    with path.open("rb") as device:
        return device.read(size)


async def test_readonly_block_publication_refuses_writes_beside_a_writer(csi: Client) -> None:
    """Read-only at the device itself, while the volume is also published read-write."""
    capability = block_capability(Mode.SINGLE_NODE_MULTI_WRITER)
    request = create_request("pvc-block-ro", 8 * MiB, capability)
    volume = (await csi.controller.CreateVolume(request)).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    writer = publish_request(csi, volume.volume_id, capability, target="writer")
    reader = publish_request(csi, volume.volume_id, capability, target="reader", readonly=True)
    await csi.node.NodePublishVolume(writer)
    await csi.node.NodePublishVolume(reader)

    data = os.urandom(4096)
    write_to_device(Path(writer.target_path), data)
    assert read_from_device(Path(reader.target_path), len(data)) == data
    assert sh("blockdev", "--getro", reader.target_path).strip() == "1"
    assert sh("blockdev", "--getro", writer.target_path).strip() == "0"
    with pytest.raises(OSError) as error:
        write_to_device(Path(reader.target_path), bytes(4096))
    assert error.value.errno in {errno.EPERM, errno.EROFS}

    pool = csi.driver.pool
    disk = pool.disk_path(volume.volume_id)
    devices = sorted(await pool.loop_devices(disk))
    assert len(devices) == 2
    # After a restart the reader's device is explained by its record, not a stray.
    await reconcile(csi.driver.store, pool, csi.kubelet)
    assert sorted(await pool.loop_devices(disk)) == devices
    await csi.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume.volume_id, target_path=reader.target_path
        )
    )
    assert len(await pool.loop_devices(disk)) == 1
    write_to_device(Path(writer.target_path), data)


async def test_single_node_single_writer_refuses_a_second_target(csi: Client) -> None:
    capability = mount_capability(Mode.SINGLE_NODE_SINGLE_WRITER)
    volume = (
        await csi.controller.CreateVolume(create_request("pvc-snsw", capability=capability))
    ).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    await csi.node.NodePublishVolume(publish_request(csi, volume.volume_id, capability, "one"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await csi.node.NodePublishVolume(publish_request(csi, volume.volume_id, capability, "two"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    multi = mount_capability(Mode.SINGLE_NODE_MULTI_WRITER)
    other = (await csi.controller.CreateVolume(create_request("pvc-snmw", capability=multi))).volume
    await csi.node.NodeStageVolume(stage_request(csi, other.volume_id, multi, "stage2"))
    for target in ("a", "b"):
        await csi.node.NodePublishVolume(
            publish_request(csi, other.volume_id, multi, target, stage="stage2")
        )


async def test_volume_condition_turns_abnormal_when_the_mount_breaks(csi: Client) -> None:
    capability = mount_capability()
    volume = (await csi.controller.CreateVolume(create_request("pvc-cond"))).volume
    await csi.node.NodeStageVolume(stage_request(csi, volume.volume_id, capability))
    publish = publish_request(csi, volume.volume_id, capability)
    await csi.node.NodePublishVolume(publish)
    sh("umount", publish.target_path)  # someone unmounts it behind the driver's back
    stats = await csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.volume_id, volume_path=publish.target_path
        )
    )
    assert stats.volume_condition.abnormal
    assert "mounted" in stats.volume_condition.message
    # The kubelet rejects an answer without usage before it reads the condition.
    (usage,) = stats.usage
    assert usage.unit == csi_pb2.VolumeUsage.BYTES
    assert usage.total == volume.capacity_bytes


async def test_block_volume_condition_with_a_detached_loop_device_still_has_usage(
    csi: Client,
) -> None:
    capability = block_capability()
    request = create_request("pvc-cond-block", 8 * MiB, capability)
    volume = (await csi.controller.CreateVolume(request)).volume
    stage = stage_request(csi, volume.volume_id, capability)
    await csi.node.NodeStageVolume(stage)
    record = csi.driver.store.state.stagings[stage.staging_target_path]
    sh("losetup", "-d", record.loop_device)  # detached behind the driver's back
    stats = await csi.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.volume_id, volume_path=stage.staging_target_path
        )
    )
    assert stats.volume_condition.abnormal
    assert [(u.unit, u.total) for u in stats.usage] == [(csi_pb2.VolumeUsage.BYTES, 8 * MiB)]


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
async def test_teardown_of_a_deleted_volume_completes(csi: Client, block: bool) -> None:
    """The kubelet retries NodeUnpublish/NodeUnstage until they answer OK: never NOT_FOUND."""
    capability = block_capability() if block else mount_capability()
    volume = (
        await csi.controller.CreateVolume(create_request("pvc-gone", capability=capability))
    ).volume
    stage = stage_request(csi, volume.volume_id, capability)
    await csi.node.NodeStageVolume(stage)
    publish = publish_request(csi, volume.volume_id, capability)
    await csi.node.NodePublishVolume(publish)
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=publish.target_path
    )
    unstage = csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=stage.staging_target_path
    )
    await csi.node.NodeUnpublishVolume(unpublish)
    await csi.node.NodeUnstageVolume(unstage)
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    # The kubelet lost the first answers and asks again, after the volume is gone.
    await csi.node.NodeUnpublishVolume(unpublish)
    await csi.node.NodeUnstageVolume(unstage)
