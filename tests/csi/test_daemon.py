"""`nodeplug run` with a csi: section: served, registered, stopped cleanly, crash-safe."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest
import yaml

from csi import mounts
from csi.identity import probed
from csi.state import StateStore
from csi.v1 import csi_pb2, csi_pb2_grpc
from daemon import config as configuration
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet
from tests.csi.conftest import DRIVER, NODE, block_capability, create_request, mount_capability, sh
from tests.daemon.test_pluginwatcher import FakePluginWatcher, appears

pytestmark = pytest.mark.root


def daemon_config(root: Path, pool: Path) -> dict[str, object]:
    csi = {"driverName": DRIVER, "nodeId": NODE, "pool": {"path": str(pool)}}
    return configuration.confined_to({"csi": csi}, root)


def csi_socket(root: Path) -> Path:
    return root / "kubelet" / "plugins" / DRIVER / "csi.sock"


def registration_socket(root: Path) -> Path:
    return root / "kubelet" / "plugins_registry" / f"{DRIVER}-reg.sock"


async def test_daemon_serves_csi_and_registers_with_the_plugin_watcher(
    short_tmp: Path, btrfs_pool: Path
) -> None:
    config = configuration.parse(daemon_config(short_tmp, btrfs_pool))
    daemon = Daemon(config, [])
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await appears(registration_socket(short_tmp))
        info = await FakePluginWatcher(registration_socket(short_tmp)).register()
        assert info.endpoint == str(csi_socket(short_tmp))
        assert daemon.ready
        async with grpc.aio.insecure_channel(f"unix:{info.endpoint}") as channel:
            node = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert node.node_id == NODE
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert not csi_socket(short_tmp).exists()
    assert not registration_socket(short_tmp).exists()


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("driverName", "-bad-", "csi.driverName"),
        ("nodeId", "a b", "csi.nodeId"),
        ("pool", {"path": "relative"}, "csi.pool.path"),
        ("pool", {"path": "/p", "image": "/p.img"}, "size: required with image"),
        ("pool", {"path": "/p", "size": "1Gi"}, "size: only used with image"),
        ("pool", {"path": "/p", "image": "/p.img", "size": "99999999Ti"}, "more than a file"),
        ("extra", 1, "csi.extra"),
    ],
)
def test_bad_csi_config_names_the_field(field: str, value: object, problem: str) -> None:
    data = daemon_config(Path("/tmp/x"), Path("/pool"))
    section = data["csi"]
    assert isinstance(section, dict)
    section[field] = value
    with pytest.raises(configuration.ConfigError) as error:
        configuration.parse(data)
    assert problem in str(error.value)


# --- crash safety: kill -9 the real daemon mid-operation --------------------------------


@contextlib.asynccontextmanager
async def daemon_process(root: Path, pool: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(daemon_config(root, pool)))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.cli",
        "run",
        "--config",
        str(config_file),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await probed(csi_socket(root))
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def workload(channel: grpc.aio.Channel, kubelet: Path) -> None:
    """Create, stage and publish a filesystem and a block volume, snapshot each, then both."""
    controller = csi_pb2_grpc.ControllerStub(channel)
    node = csi_pb2_grpc.NodeStub(channel)
    volume_ids = []
    for name, capability in (("fs", mount_capability()), ("blk", block_capability())):
        volume = (
            await controller.CreateVolume(create_request(f"pvc-{name}", capability=capability))
        ).volume
        staging = kubelet / "staging" / name
        staging.mkdir(parents=True, exist_ok=True)
        await node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(staging),
                volume_capability=capability,
            )
        )
        await node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=str(staging),
                target_path=str(kubelet / "pods" / name),
                volume_capability=capability,
            )
        )
        await controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id=volume.volume_id, name=f"snap-{name}")
        )
        volume_ids.append(volume.volume_id)
    await csi_pb2_grpc.GroupControllerStub(channel).CreateVolumeGroupSnapshot(
        csi_pb2.CreateVolumeGroupSnapshotRequest(name="group", source_volume_ids=volume_ids)
    )


async def teardown(channel: grpc.aio.Channel, kubelet: Path) -> None:
    """Undo what workload made: the group, the snapshots, publications, stagings, volumes."""
    controller = csi_pb2_grpc.ControllerStub(channel)
    node = csi_pb2_grpc.NodeStub(channel)
    snapshots = [
        e.snapshot for e in (await controller.ListSnapshots(csi_pb2.ListSnapshotsRequest())).entries
    ]
    for group_id in {s.group_snapshot_id for s in snapshots if s.group_snapshot_id}:
        await csi_pb2_grpc.GroupControllerStub(channel).DeleteVolumeGroupSnapshot(
            csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=group_id)
        )
    for snapshot in snapshots:
        if not snapshot.group_snapshot_id:
            await controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
            )
    volumes = [
        e.volume for e in (await controller.ListVolumes(csi_pb2.ListVolumesRequest())).entries
    ]
    for volume in volumes:
        for name in ("fs", "blk"):  # not knowing which is which, as after a crash
            await node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=volume.volume_id, target_path=str(kubelet / "pods" / name)
                )
            )
            await node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=volume.volume_id, staging_target_path=str(kubelet / "staging" / name)
                )
            )
        await controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


async def check_consistent(root: Path, pool: Path) -> None:
    """State, subvolumes, mounts and loop devices agree, with nothing pending."""
    state = asdict(StateStore(root / "state").load())
    volumes, stagings, publications = state["volumes"], state["stagings"], state["publications"]
    for kind in ("volumes", "snapshots", "stagings", "publications", "group_snapshots"):
        assert all(r["status"] == "ready" for r in state.get(kind, {}).values()), kind
    for group in state.get("group_snapshots", {}).values():
        assert set(group["snapshot_ids"]) <= set(state["snapshots"]), "a group has its members"
    on_disk = {p.name for p in (pool / "volumes").iterdir()}
    assert on_disk == set(volumes), "no leaked subvolumes and no phantom volume records"
    assert {p.name for p in (pool / "snapshots").iterdir()} == set(state["snapshots"])
    table = await mounts.mounts()
    # This test's own mounts only: other tests on the machine have pools too.
    volume_mounts = {
        m.mount_point
        for m in table
        if m.root.startswith("/volumes/") and Path(m.mount_point).is_relative_to(root)
    }
    fs_paths = {
        path
        for path, record in {**stagings, **publications}.items()
        if not volumes[record["volume_id"]]["block"]
    }
    assert volume_mounts == fs_paths, "every volume mount has a record and vice versa"
    mounted = {m.mount_point for m in table}
    assert all(path in mounted for path in publications), "every publication is mounted"
    for record in stagings.values():
        if volumes[record["volume_id"]]["block"]:
            disk = pool / "volumes" / record["volume_id"] / "disk"
            assert sh("losetup", "-j", str(disk)).split(":")[0] == record["loop_device"]
    for volume_id, record in volumes.items():
        disk = pool / "volumes" / volume_id / "disk"
        if record["block"] and not any(s["volume_id"] == volume_id for s in stagings.values()):
            assert not sh("losetup", "-j", str(disk)).strip(), "no leaked loop devices"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("delay", [0.02, 0.08, 0.2, 0.4, 0.7, 1.0, 1.3])
async def test_kill_9_mid_operation_then_restart_is_consistent(
    short_tmp: Path, btrfs_pool: Path, delay: float
) -> None:
    kubelet = short_tmp / "kubelet"
    (kubelet / "pods").mkdir(parents=True)

    async def made_and_undone(channel: grpc.aio.Channel) -> None:
        await workload(channel, kubelet)
        await teardown(channel, kubelet)

    async with (
        daemon_process(short_tmp, btrfs_pool) as process,
        grpc.aio.insecure_channel(f"unix:{csi_socket(short_tmp)}") as channel,
    ):
        work = asyncio.create_task(made_and_undone(channel))
        await asyncio.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        with contextlib.suppress(grpc.aio.AioRpcError):
            await work
    async with (
        daemon_process(short_tmp, btrfs_pool),
        grpc.aio.insecure_channel(f"unix:{csi_socket(short_tmp)}") as channel,
    ):
        await check_consistent(short_tmp, btrfs_pool)
        await workload(channel, kubelet)  # the CO retries: everything completes
        await check_consistent(short_tmp, btrfs_pool)


async def test_reloading_csi_settings_restarts_only_the_driver(
    short_tmp: Path, btrfs_pool: Path, kubelet: FakeKubelet
) -> None:
    resource = "example.com/widget"
    plugins = [{"resourceName": resource, "backend": "simulated", "config": {"count": 1}}]
    data = {**daemon_config(short_tmp, btrfs_pool), "devicePlugins": plugins}
    config = configuration.parse(data)
    daemon = Daemon(config, configuration.create_backends(config))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await appears(registration_socket(short_tmp))
        await FakePluginWatcher(registration_socket(short_tmp)).register()
        await kubelet.wait_for(lambda c: resource in c and c[resource].updates > 0)
        stream = kubelet.client(resource)
        csi = data["csi"]
        assert isinstance(csi, dict)
        changed = configuration.parse({**data, "csi": {**csi, "nodeId": "node-2"}})
        restarted = await daemon.apply(changed, configuration.create_backends(changed))
        assert restarted == ["CSI driver"]
        await appears(registration_socket(short_tmp))
        info = await FakePluginWatcher(registration_socket(short_tmp)).register()
        async with grpc.aio.insecure_channel(f"unix:{info.endpoint}") as channel:
            node = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert node.node_id == "node-2"
        assert kubelet.client(resource) is stream, "the device plugin was not touched"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
