"""Volume expansion on a cluster: two daemons, one per role, each on its own socket.

A controller-mode daemon (what `nodeplug controller` runs beside csi-resizer) gets
ControllerExpandVolume, as external-resizer sends it; a node's driver, on real btrfs and
real loop devices, then gets NodeExpandVolume as the kubelet sends it: online (volume
published), offline (the kubelet calls it after the next NodeStage and NodePublish),
filesystem and block. The node never talks to the controller: the size in
NodeExpandVolume is all it goes by.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from csi.config import Mode as CsiMode
from csi.identity import probed
from csi.state import StateStore
from csi.v1 import csi_pb2, csi_pb2_grpc
from daemon import config as configuration
from daemon.reload import ConfigReloader
from daemon.supervisor import Daemon
from tests.csi.conftest import (
    DRIVER,
    NODE,
    Client,
    Mode,
    block_capability,
    create_request,
    mount_capability,
    serving,
)
from tests.csi.test_conformance import code_of
from tests.csi.test_lifecycle import publish_request, stage_request, write
from tests.daemon.test_pluginwatcher import FakePluginWatcher, appears

pytestmark = pytest.mark.root

Code = grpc.StatusCode
MiB = 1024**2
# An id of the shape the driver gives its volumes, naming none.
SOME_VOLUME = "v" + "0" * 32
BLKGETSIZE64 = 0x80081272  # <linux/fs.h> _IOR(0x12, 114, size_t)


def block_size(device: Path) -> int:
    """The size the kernel gives a block device (what a pod's process sees)."""
    descriptor = os.open(device, os.O_RDONLY)
    try:
        answer = fcntl.ioctl(descriptor, BLKGETSIZE64, b"\0" * 8)
    finally:
        os.close(descriptor)
    size: int = struct.unpack("Q", answer)[0]
    return size


def controller_config(root: Path) -> dict[str, Any]:
    csi = {"driverName": DRIVER, "mode": "controller", "endpoint": str(root / "ctl.sock")}
    return configuration.confined_to({"csi": csi}, root)


@dataclass
class Resizer:
    """The expansion controller, as csi-resizer dials it."""

    identity: csi_pb2_grpc.IdentityAsyncStub
    controller: csi_pb2_grpc.ControllerAsyncStub
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def controller_daemon(root: Path) -> AsyncIterator[Resizer]:
    """A controller-mode daemon (the real supervisor) serving <root>/ctl.sock."""
    config = configuration.parse(controller_config(root))
    assert config.csi_socket is not None
    daemon = Daemon(config, [])
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await probed(config.csi_socket)
        assert daemon.ready
        async with grpc.aio.insecure_channel(f"unix:{config.csi_socket}") as channel:
            yield Resizer(
                csi_pb2_grpc.IdentityStub(channel), csi_pb2_grpc.ControllerStub(channel), channel
            )
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert not config.csi_socket.exists()


@pytest.fixture
async def resizer(short_tmp: Path) -> AsyncIterator[Resizer]:
    async with controller_daemon(short_tmp / "controller") as found:
        yield found


@pytest.fixture
async def node(short_tmp: Path, btrfs_pool: Path) -> AsyncIterator[Client]:
    async with serving(short_tmp / "node", btrfs_pool) as client:
        yield client


@dataclass
class Placed:
    volume_id: str
    capability: csi_pb2.VolumeCapability
    stage: csi_pb2.NodeStageVolumeRequest
    publish: csi_pb2.NodePublishVolumeRequest

    @property
    def staging(self) -> Path:
        return Path(self.stage.staging_target_path)

    @property
    def target(self) -> Path:
        return Path(self.publish.target_path)


async def created(node: Client, name: str, size: int, block: bool) -> Placed:
    """A new volume, and where the kubelet would stage and publish it (named after it)."""
    capability = block_capability() if block else mount_capability()
    volume = (await node.controller.CreateVolume(create_request(name, size, capability))).volume
    return Placed(
        volume.volume_id,
        capability,
        stage_request(node, volume.volume_id, capability, name=name),
        publish_request(node, volume.volume_id, capability, target=name, stage=name),
    )


async def stage_and_publish(node: Client, volume: Placed) -> None:
    await node.node.NodeStageVolume(volume.stage)
    await node.node.NodePublishVolume(volume.publish)


async def controller_step(resizer: Resizer, volume: Placed, size: int) -> int:
    """What external-resizer does for a PVC resized to `size`; the PV's new capacity."""
    answer = await resizer.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capability=volume.capability,
        )
    )
    assert answer.node_expansion_required
    return answer.capacity_bytes


def node_request(
    volume: Placed, size: int, path: Path | None = None
) -> csi_pb2.NodeExpandVolumeRequest:
    """NodeExpandVolume as the kubelet sends it (pkg/volume/csi/csi_client.go)."""
    return csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id,
        volume_path=str(path or volume.target),
        staging_target_path=str(volume.staging),
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capability=volume.capability,
    )


async def node_step(node: Client, volume: Placed, size: int, path: Path | None = None) -> int:
    answer = await node.node.NodeExpandVolume(node_request(volume, size, path))
    return answer.capacity_bytes


async def stats_total(node: Client, volume: Placed) -> int:
    stats = await node.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.volume_id, volume_path=str(volume.target)
        )
    )
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    (found,) = [u.total for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES]
    return found


def refused_write(target: Path, size: int) -> int | None:
    """The errno of writing `size` bytes to a new file in target, or None if it fit."""
    try:
        write(target / "fill", size)
    except OSError as error:
        return error.errno
    finally:
        (target / "fill").unlink(missing_ok=True)
    return None


# --- what csi-resizer sees ---------------------------------------------------------------


async def test_the_controller_offers_expansion_and_nothing_else(resizer: Resizer) -> None:
    info = await resizer.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == DRIVER
    assert (await resizer.identity.Probe(csi_pb2.ProbeRequest())).ready.value
    plugin = await resizer.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    service = csi_pb2.PluginCapability.Service
    expansion = csi_pb2.PluginCapability.VolumeExpansion
    assert {c.service.type for c in plugin.capabilities if c.HasField("service")} == {
        service.CONTROLLER_SERVICE
    }
    assert [c.volume_expansion.type for c in plugin.capabilities if c.HasField("volume_expansion")]
    assert {
        c.volume_expansion.type for c in plugin.capabilities if c.HasField("volume_expansion")
    } == {expansion.ONLINE}
    rpc = csi_pb2.ControllerServiceCapability.RPC
    controller = await resizer.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()
    )
    assert [c.rpc.type for c in controller.capabilities] == [rpc.EXPAND_VOLUME]
    offered = {"ControllerGetCapabilities", "ControllerExpandVolume", "ValidateVolumeCapabilities"}
    methods = csi_pb2.DESCRIPTOR.services_by_name["Controller"].methods
    others = [m for m in methods if m.name not in offered]
    assert len(others) == 12
    for method in others:
        call = getattr(resizer.controller, method.name)
        request = getattr(csi_pb2, method.input_type.name)()
        assert await code_of(call(request)) == Code.UNIMPLEMENTED, method.name
    # No Node or GroupController service: this daemon holds no volume.
    node = csi_pb2_grpc.NodeStub(resizer.channel)
    assert await code_of(node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())) == (
        Code.UNIMPLEMENTED
    )


async def test_the_controller_validates_what_it_can_and_confirms_nothing(
    resizer: Resizer,
) -> None:
    """ValidateVolumeCapabilities is mandatory for a Controller (the spec; csi-sanity
    calls it whatever the capabilities say)."""
    validate = resizer.controller.ValidateVolumeCapabilities
    good = [mount_capability()]
    cases = [
        (
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=good),
            Code.INVALID_ARGUMENT,
        ),
        (csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=SOME_VOLUME), Code.INVALID_ARGUMENT),
        (
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=SOME_VOLUME, volume_capabilities=[csi_pb2.VolumeCapability()]
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id="fake-vol-id", volume_capabilities=good
            ),
            Code.NOT_FOUND,
        ),
    ]
    for request, code in cases:
        assert await code_of(validate(request)) == code
    answer = await validate(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=SOME_VOLUME, volume_capabilities=good)
    )
    assert not answer.HasField("confirmed")
    assert "cannot confirm" in answer.message


def expand(
    volume_id: str = SOME_VOLUME,
    required: int = 64 * MiB,
    limit: int = 0,
    capability: csi_pb2.VolumeCapability | None = None,
    ranged: bool = True,
) -> csi_pb2.ControllerExpandVolumeRequest:
    request = csi_pb2.ControllerExpandVolumeRequest(volume_id=volume_id)
    if ranged:
        request.capacity_range.CopyFrom(
            csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)
        )
    if capability is not None:
        request.volume_capability.CopyFrom(capability)
    return request


ext4 = mount_capability()
ext4.mount.fs_type = "ext4"

BAD_REQUESTS = [
    ("no volume id", expand(volume_id=""), Code.INVALID_ARGUMENT),
    ("no capacity range", expand(ranged=False), Code.INVALID_ARGUMENT),
    ("no volume id nor range", expand(volume_id="", ranged=False), Code.INVALID_ARGUMENT),
    ("only a limit", expand(required=0, limit=64 * MiB), Code.INVALID_ARGUMENT),
    ("negative", expand(required=-1), Code.INVALID_ARGUMENT),
    ("required above limit", expand(limit=32 * MiB), Code.OUT_OF_RANGE),
    ("no MiB fits", expand(required=MiB + 1, limit=MiB + 2), Code.OUT_OF_RANGE),
    ("beyond int64 when rounded", expand(required=2**63 - 1), Code.OUT_OF_RANGE),
    (
        "a mode local volumes lack",
        expand(capability=mount_capability(Mode.MULTI_NODE_MULTI_WRITER)),
        Code.INVALID_ARGUMENT,
    ),
    ("another filesystem", expand(capability=ext4), Code.INVALID_ARGUMENT),
    ("a foreign id", expand(volume_id="pvc-0123"), Code.NOT_FOUND),
    ("a snapshot's id", expand(volume_id="s" + "0" * 32), Code.NOT_FOUND),
]


@pytest.mark.parametrize(
    ("case", "request_", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
async def test_the_controller_checks_what_it_can_know(
    resizer: Resizer, case: str, request_: csi_pb2.ControllerExpandVolumeRequest, code: Code
) -> None:
    assert await code_of(resizer.controller.ControllerExpandVolume(request_)) == code, case


@pytest.mark.parametrize("capability", [mount_capability(), block_capability(), None])
async def test_the_controller_answers_the_size_and_leaves_the_work_to_the_node(
    resizer: Resizer, capability: csi_pb2.VolumeCapability | None
) -> None:
    request = expand(required=10 * MiB + 1, limit=64 * MiB, capability=capability)
    for _ in range(2):  # idempotent: the resizer retries
        answer = await resizer.controller.ControllerExpandVolume(request)
        assert answer.capacity_bytes == 11 * MiB  # whole MiB, as the node will grow it
        assert answer.node_expansion_required


# --- the resizer's sequence, then the kubelet's --------------------------------------------


async def test_online_filesystem_expansion(resizer: Resizer, node: Client) -> None:
    volume = await created(node, "pvc-online", 16 * MiB, block=False)
    await stage_and_publish(node, volume)
    assert refused_write(volume.target, 24 * MiB) in {errno.EDQUOT, errno.ENOSPC}
    size = await controller_step(resizer, volume, 64 * MiB)
    # The controller touched nothing: the quota still holds until the node's step.
    assert refused_write(volume.target, 24 * MiB) in {errno.EDQUOT, errno.ENOSPC}
    assert await stats_total(node, volume) == 16 * MiB
    assert await node_step(node, volume, size) == 64 * MiB
    assert refused_write(volume.target, 24 * MiB) is None
    assert await stats_total(node, volume) == 64 * MiB
    # The kubelet may call again (a retry, another pod): nothing changes.
    assert await node_step(node, volume, size) == 64 * MiB


@pytest.mark.parametrize("where", ["target", "staging"])
async def test_offline_filesystem_expansion_happens_at_the_next_mount(
    resizer: Resizer, node: Client, where: str
) -> None:
    """No pod uses the PVC when it is resized: the kubelet expands after it mounts it
    for the next pod (after NodePublish; kubelets before 1.2x: right after NodeStage,
    with volume_path the staging path)."""
    volume = await created(node, "pvc-offline", 16 * MiB, block=False)
    size = await controller_step(resizer, volume, 64 * MiB)
    await stage_and_publish(node, volume)
    assert refused_write(volume.target, 24 * MiB) in {errno.EDQUOT, errno.ENOSPC}
    path = volume.target if where == "target" else volume.staging
    assert await node_step(node, volume, size, path) == 64 * MiB
    assert refused_write(volume.target, 24 * MiB) is None


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
async def test_block_expansion_grows_the_loop_device(
    resizer: Resizer, node: Client, online: bool
) -> None:
    volume = await created(node, "pvc-block", 8 * MiB, block=True)
    if online:
        await stage_and_publish(node, volume)
    size = await controller_step(resizer, volume, 32 * MiB)
    if not online:
        await stage_and_publish(node, volume)
    assert block_size(volume.target) == 8 * MiB  # nothing grew yet
    # The block publish path, as the kubelet sends it (DevicePath, expander.go).
    assert await node_step(node, volume, size) == 32 * MiB
    assert block_size(volume.target) == 32 * MiB
    stage = node.driver.store.state.stagings[str(volume.staging)]
    assert block_size(Path(stage.loop_device)) == 32 * MiB
    # What a process writes at the new end is there.
    with volume.target.open("r+b") as device:
        device.seek(31 * MiB)
        device.write(b"end")
        device.flush()
        os.fsync(device.fileno())
        device.seek(31 * MiB)
        assert device.read(3) == b"end"


async def test_a_read_only_block_publication_grows_too(resizer: Resizer, node: Client) -> None:
    volume = await created(node, "pvc-ro", 8 * MiB, block=True)
    await stage_and_publish(node, volume)
    readonly = publish_request(
        node, volume.volume_id, volume.capability, target="readonly", readonly=True, stage="pvc-ro"
    )
    await node.node.NodePublishVolume(readonly)
    size = await controller_step(resizer, volume, 16 * MiB)
    assert await node_step(node, volume, size, Path(readonly.target_path)) == 16 * MiB
    assert block_size(Path(readonly.target_path)) == 16 * MiB
    assert block_size(volume.target) == 16 * MiB


async def test_the_node_takes_an_expansion_no_controller_asked_for(node: Client) -> None:
    volume = await created(node, "pvc-direct", 16 * MiB, block=False)
    await stage_and_publish(node, volume)
    assert await node_step(node, volume, 48 * MiB + 1) == 49 * MiB
    assert await stats_total(node, volume) == 49 * MiB
    assert refused_write(volume.target, 40 * MiB) is None


async def test_a_shrink_is_refused_and_a_smaller_request_changes_nothing(
    node: Client,
) -> None:
    volume = await created(node, "pvc-shrink", 16 * MiB, block=False)
    await stage_and_publish(node, volume)
    assert await node_step(node, volume, 64 * MiB) == 64 * MiB
    shrink = node_request(volume, 32 * MiB)
    shrink.capacity_range.limit_bytes = 32 * MiB
    assert await code_of(node.node.NodeExpandVolume(shrink)) == Code.OUT_OF_RANGE
    controller_shrink = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=shrink.capacity_range
    )
    assert await code_of(node.controller.ControllerExpandVolume(controller_shrink)) == (
        Code.OUT_OF_RANGE
    )
    # Without a limit, a volume at least that large is what was asked for: OK (the spec).
    assert await node_step(node, volume, 32 * MiB) == 64 * MiB
    assert await stats_total(node, volume) == 64 * MiB
    assert refused_write(volume.target, 40 * MiB) is None


async def test_the_node_checks_space_as_create_does(node: Client) -> None:
    volume = await created(node, "pvc-space", 16 * MiB, block=False)
    await stage_and_publish(node, volume)
    space = node.driver.pool.space()
    total, free = space.total, space.available
    assert await code_of(node.node.NodeExpandVolume(node_request(volume, total + MiB))) == (
        Code.OUT_OF_RANGE
    )
    most = total // MiB * MiB
    assert most - 16 * MiB > free, "the pool image leaves less free than its size"
    assert await code_of(node.node.NodeExpandVolume(node_request(volume, most))) == (
        Code.RESOURCE_EXHAUSTED
    )
    assert await stats_total(node, volume) == 16 * MiB


async def test_the_node_refuses_the_wrong_access_type(node: Client) -> None:
    volume = await created(node, "pvc-kind", 16 * MiB, block=False)
    await stage_and_publish(node, volume)
    request = node_request(volume, 32 * MiB)
    request.volume_capability.CopyFrom(block_capability())
    assert await code_of(node.node.NodeExpandVolume(request)) == Code.INVALID_ARGUMENT
    assert await stats_total(node, volume) == 16 * MiB


async def test_a_node_restart_between_the_two_steps_loses_nothing(
    short_tmp: Path, btrfs_pool: Path, resizer: Resizer
) -> None:
    root = short_tmp / "node"
    async with serving(root, btrfs_pool) as node:
        fs = await created(node, "pvc-fs", 16 * MiB, block=False)
        blk = await created(node, "pvc-blk", 8 * MiB, block=True)
        await stage_and_publish(node, fs)
    fs_size = await controller_step(resizer, fs, 64 * MiB)
    blk_size = await controller_step(resizer, blk, 32 * MiB)
    async with serving(root, btrfs_pool) as node:
        assert await node_step(node, fs, fs_size) == 64 * MiB
        await stage_and_publish(node, blk)  # offline: staged after the restart
        assert await node_step(node, blk, blk_size) == 32 * MiB
    # And the new sizes outlive the next restart: they are in the state file.
    state = StateStore(root / "state").load()
    assert state.volumes[fs.volume_id].capacity == 64 * MiB
    assert state.volumes[blk.volume_id].capacity == 32 * MiB
    async with serving(root, btrfs_pool) as node:
        assert await stats_total(node, fs) == 64 * MiB
        assert refused_write(fs.target, 40 * MiB) is None
        assert block_size(blk.target) == 32 * MiB


# --- config and the two commands -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"endpoint": None}, "endpoint: required with mode: controller"),
        ({"endpoint": "relative.sock"}, "csi.endpoint: must be an absolute path"),
        ({"pool": {"path": "/pool"}}, "pool: not used with mode: controller"),
        ({"mode": "both"}, "csi.mode"),
        ({"endpoint": "/" + "x" * 120}, "csi.endpoint"),
    ],
)
def test_controller_config_errors_name_the_field(change: dict[str, Any], problem: str) -> None:
    data = controller_config(Path("/tmp/x"))
    data["csi"] = {k: v for k, v in {**data["csi"], **change}.items() if v is not None}
    with pytest.raises(configuration.ConfigError) as error:
        configuration.parse(data)
    assert problem in str(error.value)


def test_a_controller_serves_no_devices() -> None:
    data = controller_config(Path("/tmp/x"))
    data["devicePlugins"] = [
        {"resourceName": "example.com/widget", "backend": "simulated", "api": "dra"}
    ]
    with pytest.raises(configuration.ConfigError) as error:
        configuration.parse(data)
    assert "devicePlugins: csi.mode: controller" in str(error.value)


def test_node_mode_still_needs_a_pool() -> None:
    data = controller_config(Path("/tmp/x"))
    data["csi"]["mode"] = "node"
    with pytest.raises(configuration.ConfigError) as error:
        configuration.parse(data)
    assert "csi: pool: required" in str(error.value)


async def test_node_mode_serves_at_its_endpoint_and_registers_it(
    short_tmp: Path, btrfs_pool: Path
) -> None:
    endpoint = short_tmp / "elsewhere" / "csi.sock"
    csi = {"driverName": DRIVER, "nodeId": NODE, "pool": {"path": str(btrfs_pool)}}
    csi["endpoint"] = str(endpoint)
    config = configuration.parse(configuration.confined_to({"csi": csi}, short_tmp))
    stop = asyncio.Event()
    task = asyncio.create_task(Daemon(config, []).run(stop))
    registration = short_tmp / "kubelet" / "plugins_registry" / f"{DRIVER}-reg.sock"
    try:
        await appears(registration)
        info = await FakePluginWatcher(registration).register()
        assert info.endpoint == str(endpoint)
        await probed(endpoint)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert not endpoint.exists()


async def test_a_reload_keeps_the_mode_nodeplug_controller_forces(short_tmp: Path) -> None:
    path = short_tmp / "config.yaml"

    def write_config(endpoint: Path, **extra: str) -> None:
        data = controller_config(short_tmp)
        data["csi"] = {"driverName": DRIVER, "endpoint": str(endpoint), **extra}  # no mode
        aside = path.with_name(".config.yaml.new")
        aside.write_text(yaml.safe_dump(data))
        aside.replace(path)

    first, second = short_tmp / "first.sock", short_tmp / "second.sock"
    write_config(first)
    config = configuration.load(path, CsiMode.CONTROLLER)
    daemon = Daemon(config, [])
    reloader = ConfigReloader(path, CsiMode.CONTROLLER)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await probed(first)
        write_config(second)
        assert await reloader.reload(daemon) == "applied"
        await probed(second)
        assert not first.exists()
        write_config(first, mode="node")
        assert await reloader.reload(daemon) == "rejected"
        assert daemon.config.csi is not None and daemon.config.csi.mode is CsiMode.CONTROLLER
        await probed(second)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def command(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon.cli",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("argv", [["controller"], ["run"]])
async def test_both_commands_serve_the_controller_and_stop_cleanly(
    short_tmp: Path, argv: list[str]
) -> None:
    config_file = short_tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(controller_config(short_tmp)))
    socket = short_tmp / "ctl.sock"
    process = await command(*argv, "--config", str(config_file))
    try:
        await probed(socket)
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            answer = await csi_pb2_grpc.ControllerStub(channel).ControllerExpandVolume(
                expand(required=64 * MiB)
            )
        assert answer.capacity_bytes == 64 * MiB and answer.node_expansion_required
        # No kubelet directory, registration or node feature file: nothing of a node.
        assert not (short_tmp / "kubelet").exists()
        assert not (short_tmp / "features.d").exists()
        assert not (short_tmp / "state").exists()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not socket.exists()


@pytest.mark.parametrize(
    ("csi", "problem"),
    [
        (None, "csi: required to serve csi.mode controller"),
        ({"driverName": DRIVER, "mode": "node", "endpoint": "/x.sock"}, "csi.mode: 'node'"),
        ({"driverName": DRIVER, "pool": {"path": "/pool"}}, "pool: not used"),
        ({"driverName": DRIVER}, "endpoint: required"),
    ],
)
async def test_nodeplug_controller_refuses_a_node_config(
    tmp_path: Path, csi: dict[str, Any] | None, problem: str
) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"csi": csi} if csi else {"stateDir": "/tmp/x"}))
    process = await command("controller", "--config", str(config_file))
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert problem in stderr.decode()
