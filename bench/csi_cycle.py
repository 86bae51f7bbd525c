"""CSI volume cycle latency and throughput, against the bare storage commands as baseline.

    sudo .venv/bin/python bench/csi_cycle.py [--cycles 40] [--clients 8]

A second table gives the latency of each controller call the CSI sidecars make
(CreateVolume, CreateSnapshot, DeleteSnapshot, DeleteVolume) with `--clients` of
them at once on volumes holding freshly written data, against the bare btrfs
commands: its p99 and max are what the sidecars' --timeout must leave room for
(manifests/daemonset.yaml).

One cycle is what a pod's volume costs the driver: CreateVolume, NodeStageVolume,
NodePublishVolume, NodeUnpublishVolume, NodeUnstageVolume, DeleteVolume, each a
gRPC call over the Unix socket with its state saved at every step. The baseline
does what the driver must do for the same cycle with the storage commands a
script would run (btrfs, mount, losetup), with no gRPC, no validation and no
state, in the same run on the same pool: create the subvolume and set its qgroup
limit (or make the NOCOW block file), bind-mount it at the staging path and from
there at the target (or attach a loop device and bind-mount it at the target),
unmount both (detach), then find the subvolume's id, delete it with a commit and
destroy its qgroup once the kernel has dropped it. The driver does the same with
ioctls and system calls, the qgroup step in the background. Needs root:
a 2 GiB btrfs image is loop-mounted in a temp dir. Block cycles use at most 2
concurrent clients: each holds a loop device and only /dev/loop0-7 exist here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import grpc

from csi.config import CsiConfig
from csi.driver import CsiDriver
from csi.errors import CommandError
from csi.system import run
from csi.v1 import csi_pb2, csi_pb2_grpc
from deviceplugin import configkit

MiB = 1024**2
Mode = csi_pb2.VolumeCapability.AccessMode.Mode


def capability(block: bool) -> csi_pb2.VolumeCapability:
    access = csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    if block:
        return csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=access
        )
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=access
    )


async def csi_cycle(
    channel: grpc.aio.Channel, kubelet: Path, index: str, *, block: bool, prefix: str
) -> None:
    name = f"{prefix}-{index}"
    controller = csi_pb2_grpc.ControllerStub(channel)
    node = csi_pb2_grpc.NodeStub(channel)
    cap = capability(block)
    volume = (
        await controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
                volume_capabilities=[cap],
            )
        )
    ).volume
    staging = kubelet / "staging" / name
    staging.mkdir(parents=True)
    target = kubelet / "pods" / name
    await node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging), volume_capability=cap
        )
    )
    await node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=cap,
        )
    )
    await node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    )
    await node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging)
        )
    )
    staging.rmdir()
    await controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


async def bare_delete(pool: Path, subvolume: Path) -> None:
    """Delete a subvolume and its qgroup with the btrfs commands, as the driver must."""
    subvolume_id = (await run("btrfs", "inspect-internal", "rootid", str(subvolume))).strip()
    # The commit lets the cleaner drop it now, so that its qgroup can go.
    await run("btrfs", "subvolume", "delete", "--commit-after", str(subvolume))
    while True:
        try:
            await run("btrfs", "qgroup", "destroy", f"0/{subvolume_id}", str(pool))
        except CommandError as error:
            if "busy" in str(error):
                await asyncio.sleep(0.01)
                continue
            # Linux 6.7+ removes the qgroup itself once the subvolume is dropped.
        return


async def bare_cycle(pool: Path, kubelet: Path, index: str, *, block: bool, prefix: str) -> None:
    """The storage commands of a cycle, run directly."""
    name = f"{prefix}-{index}"
    subvolume = pool / "bare" / name
    await run("btrfs", "subvolume", "create", str(subvolume))
    target = kubelet / "pods" / name
    if block:
        disk = subvolume / "disk"
        disk.touch()
        await run("chattr", "+C", str(disk))
        await run("truncate", "-s", str(16 * MiB), str(disk))
        device = (await run("losetup", "--find", "--show", str(disk))).strip()
        target.touch()
        await run("mount", "--bind", device, str(target))
        await run("umount", str(target))
        target.unlink()
        await run("losetup", "-d", device)
    else:
        await run("btrfs", "qgroup", "limit", str(16 * MiB), str(subvolume))
        staging = kubelet / "staging" / name
        staging.mkdir()
        target.mkdir()
        await run("mount", "--bind", str(subvolume), str(staging))
        await run("mount", "--bind", str(staging), str(target))
        await run("umount", str(target))
        await run("umount", str(staging))
        target.rmdir()
        staging.rmdir()
    await bare_delete(pool, subvolume)


def write_unsynced(directory: Path, size: int) -> None:
    """Data a snapshot has to flush first, as a busy volume has."""
    with (directory / "data").open("wb") as file:
        file.write(os.urandom(size))


async def controller_calls(
    channel: grpc.aio.Channel, pool: Path, count: int, clients: int
) -> dict[str, list[float]]:
    """Latency of each sidecar-facing call, `clients` at a time, on volumes with new data."""
    controller = csi_pb2_grpc.ControllerStub(channel)
    volumes: dict[str, str] = {}
    snapshots: dict[str, str] = {}

    async def create_volume(index: str) -> None:
        volume = (
            await controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name=f"latency-{index}",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                    volume_capabilities=[capability(False)],
                )
            )
        ).volume
        volumes[index] = volume.volume_id

    async def create_snapshot(index: str) -> None:
        request = csi_pb2.CreateSnapshotRequest(
            source_volume_id=volumes[index], name=f"latency-{index}"
        )
        snapshots[index] = (await controller.CreateSnapshot(request)).snapshot.snapshot_id

    async def delete_snapshot(index: str) -> None:
        await controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshots[index]))

    async def delete_volume(index: str) -> None:
        await controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volumes[index]))

    latencies = {"CreateVolume": (await measure(create_volume, count, clients))[0]}
    for volume_id in volumes.values():
        await asyncio.to_thread(write_unsynced, pool / "volumes" / volume_id, 8 * MiB)
    latencies["CreateSnapshot"] = (await measure(create_snapshot, count, clients))[0]
    latencies["DeleteSnapshot"] = (await measure(delete_snapshot, count, clients))[0]
    latencies["DeleteVolume"] = (await measure(delete_volume, count, clients))[0]
    return latencies


async def bare_calls(pool: Path, count: int, clients: int) -> dict[str, list[float]]:
    """The btrfs commands behind the same calls, run directly."""
    bare = pool / "bare-calls"
    bare.mkdir()

    async def create_volume(index: str) -> None:
        await run("btrfs", "subvolume", "create", str(bare / index))
        await run("btrfs", "qgroup", "limit", str(64 * MiB), str(bare / index))

    async def create_snapshot(index: str) -> None:
        await run(
            "btrfs", "subvolume", "snapshot", "-r", str(bare / index), str(bare / f"s{index}")
        )

    async def delete(name: str) -> None:
        # Root deletes a read-only snapshot as it is: no property change first.
        await bare_delete(pool, bare / name)

    latencies = {"CreateVolume": (await measure(create_volume, count, clients))[0]}
    for index in range(count):
        await asyncio.to_thread(write_unsynced, bare / f"c{index}", 8 * MiB)
    latencies["CreateSnapshot"] = (await measure(create_snapshot, count, clients))[0]
    latencies["DeleteSnapshot"] = (
        await measure(lambda index: delete(f"s{index}"), count, clients)
    )[0]
    latencies["DeleteVolume"] = (await measure(delete, count, clients))[0]
    return latencies


async def measure(
    cycle: Callable[[str], Awaitable[None]], cycles: int, clients: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(range(cycles))

    async def client() -> None:
        while queue:
            index = queue.pop()
            started = time.perf_counter()
            await cycle(f"c{index}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def bench(root: Path, cycles: int, clients: int) -> None:
    pool = root / "pool"
    kubelet = root / "kubelet"
    for directory in (pool, kubelet / "pods", kubelet / "staging"):
        directory.mkdir(parents=True)
    image = root / "pool.img"
    with image.open("wb") as file:
        file.truncate(2 * 1024**3)
    await run("mkfs.btrfs", "-q", str(image))
    await run("mount", "-o", "loop", str(image), str(pool))
    try:
        config = configkit.convert(
            {"driverName": "bench.nodeplug.io", "pool": {"path": str(pool)}},
            CsiConfig,
        )
        driver = CsiDriver(config, kubelet, root / "state")
        await driver.start()
        (pool / "bare").mkdir()
        server = grpc.aio.server()
        driver.add_services(server)
        server.add_insecure_port(f"unix:{root / 'csi.sock'}")
        await server.start()
        print(
            f"{'cycle':<22}{'clients':>8}{'p50 ms':>9}{'p99 ms':>9}{'cycles/s':>10}{'vs bare':>9}"
        )
        async with grpc.aio.insecure_channel(f"unix:{root / 'csi.sock'}") as channel:
            for block in (False, True):
                width = min(clients, 2) if block else clients
                kind = "block" if block else "filesystem"
                bare, bare_time = await measure(
                    partial(bare_cycle, pool, kubelet, block=block, prefix="bare"), cycles, width
                )
                ours, our_time = await measure(
                    partial(csi_cycle, channel, kubelet, block=block, prefix=kind), cycles, width
                )
                for label, lat, total in (
                    ("bare commands", bare, bare_time),
                    ("CSI over gRPC", ours, our_time),
                ):
                    ratio = (cycles / total) / (cycles / bare_time)
                    print(
                        f"{kind + ' ' + label:<22}{width:>8}{percentile(lat, 0.5) * 1e3:>9.1f}"
                        f"{percentile(lat, 0.99) * 1e3:>9.1f}{cycles / total:>10.1f}{ratio:>9.2f}"
                    )
            header = f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p99 vs bare':>13}"
            print(f"\n{'call':<16}{'clients':>8}{header}")
            bare_latencies = await bare_calls(pool, cycles, clients)
            our_latencies = await controller_calls(channel, pool, cycles, clients)
            for call, ours in our_latencies.items():
                bare_p99 = percentile(bare_latencies[call], 0.99)
                print(
                    f"{call:<16}{clients:>8}{percentile(ours, 0.5) * 1e3:>9.1f}"
                    f"{percentile(ours, 0.99) * 1e3:>9.1f}{max(ours) * 1e3:>9.1f}"
                    f"{percentile(ours, 0.99) / bare_p99:>13.2f}"
                )
        await server.stop(None)
    finally:
        await run("umount", "-l", str(pool), check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="np-bench-", dir="/tmp") as root:
        asyncio.run(bench(Path(root), options.cycles, options.clients))


if __name__ == "__main__":
    main()
