"""Device-plugin benchmarks: each figure against a bare baseline measured in the same run.

    .venv/bin/python bench/device_plugins.py [--rounds N] [--devices N]

- Allocate latency: the kubelet's call into nodeplug, against a bare grpc.aio unary
  handler returning the same response (both up at once, calls interleaved).
- ListAndWatch first send of 60,000 devices: stream opened -> first list received,
  against a bare grpc.aio stream sending the same prebuilt list.
- hotplug -> kubelet update: mknod -> the simulated kubelet sees the device, against
  mknod -> a raw inotify event (root only).

Kubelet restarts have their own benchmark: bench/kubelet_restart.py.

Ratios near 1 mean nodeplug adds little to what the machine itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from asyncinotify import Inotify, Mask

from daemon import config as configuration
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

RESOURCE = "bench.example/dev"
Timings = list[float]


def percentile(values: Timings, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def timed(rounds: int, call: Callable[[], Awaitable[object]]) -> Timings:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


@contextlib.asynccontextmanager
async def nodeplug(root: Path, plugin: dict[str, Any]) -> AsyncIterator[FakeKubelet]:
    config = configuration.parse(
        configuration.confined_to({"devicePlugins": [{"resourceName": RESOURCE, **plugin}]}, root)
    )
    async with FakeKubelet(config.device_plugin_dir) as kubelet:
        stop = asyncio.Event()
        task = asyncio.create_task(Daemon(config, configuration.create_backends(config)).run(stop))
        try:
            await kubelet.wait_for(lambda c: RESOURCE in c and c[RESOURCE].updates > 0, timeout=60)
            yield kubelet
        finally:
            stop.set()
            await task


@contextlib.asynccontextmanager
async def bare_server(
    path: Path, unary: api_pb2.AllocateResponse, stream: api_pb2.ListAndWatchResponse
) -> AsyncIterator[api_pb2_grpc.DevicePluginAsyncStub]:
    """The least a gRPC device plugin can be: fixed answers, no validation, no state."""

    class Bare(api_pb2_grpc.DevicePluginServicer):
        async def GetDevicePluginOptions(  # noqa: N802
            self, request: Any, context: Any
        ) -> api_pb2.DevicePluginOptions:
            return api_pb2.DevicePluginOptions()

        async def Allocate(self, request: Any, context: Any) -> api_pb2.AllocateResponse:  # noqa: N802
            return unary

        async def ListAndWatch(  # noqa: N802
            self, request: Any, context: Any
        ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
            yield stream
            await asyncio.Event().wait()

        async def GetPreferredAllocation(  # noqa: N802
            self, request: Any, context: Any
        ) -> api_pb2.PreferredAllocationResponse:
            return api_pb2.PreferredAllocationResponse()

        async def PreStartContainer(  # noqa: N802
            self, request: Any, context: Any
        ) -> api_pb2.PreStartContainerResponse:
            return api_pb2.PreStartContainerResponse()

    server = grpc.aio.server()
    api_pb2_grpc.add_DevicePluginServicer_to_server(Bare(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            yield api_pb2_grpc.DevicePluginStub(channel)
    finally:
        await server.stop(None)


async def first_message(stub: api_pb2_grpc.DevicePluginAsyncStub) -> int:
    call = stub.ListAndWatch(api_pb2.Empty())
    response = await call.read()
    call.cancel()
    assert isinstance(response, api_pb2.ListAndWatchResponse)
    return len(response.devices)


async def bench_allocate(root: Path, rounds: int) -> tuple[Timings, Timings]:
    """Both servers up at once, calls interleaved, fresh channels: drift hits both alike."""
    request = api_pb2.AllocateRequest()
    request.container_requests.add(devices_ids=["sim3"])
    async with nodeplug(root / "a", {"backend": "simulated", "config": {"count": 8}}) as kubelet:
        socket = kubelet.directory / kubelet.client(RESOURCE).endpoint
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            response = await stub.Allocate(request)
            async with bare_server(
                root / "bare.sock", response, api_pb2.ListAndWatchResponse()
            ) as bare:
                await bare.Allocate(request)
                ours: Timings = []
                baseline: Timings = []
                for _ in range(rounds):
                    ours += await timed(1, lambda: stub.Allocate(request))
                    baseline += await timed(1, lambda: bare.Allocate(request))
    return ours, baseline


async def bench_list(root: Path, rounds: int, count: int) -> tuple[Timings, Timings]:
    plugin = {"backend": "simulated", "config": {"count": count, "numaNodes": 2}}
    async with nodeplug(root / "l", plugin) as kubelet:
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == count, timeout=60)
        socket = kubelet.directory / kubelet.client(RESOURCE).endpoint
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            assert await first_message(stub) == count
            ours = await timed(rounds, lambda: first_message(stub))
            prebuilt = api_pb2.ListAndWatchResponse()
            prebuilt.CopyFrom(await stub.ListAndWatch(api_pb2.Empty()).read())  # type: ignore[arg-type]
    async with bare_server(root / "bare2.sock", api_pb2.AllocateResponse(), prebuilt) as bare:
        assert await first_message(bare) == count
        baseline = await timed(rounds, lambda: first_message(bare))
    return ours, baseline


async def bench_hotplug(root: Path, rounds: int) -> tuple[Timings, Timings]:
    dev = root / "dev"
    dev.mkdir()
    null = os.makedev(1, 3)
    plugin = {"backend": "glob", "config": {"paths": [f"{dev}/w*"]}}
    ours = []
    async with nodeplug(root / "h", plugin) as kubelet:
        for index in range(rounds):
            name = f"w{index}"
            started = time.perf_counter()
            os.mknod(dev / name, 0o600 | stat.S_IFCHR, null)
            await kubelet.wait_for_devices(RESOURCE, lambda d: name in d)  # noqa: B023
            ours.append((time.perf_counter() - started) * 1000)
            (dev / name).unlink()
            await kubelet.wait_for_devices(RESOURCE, lambda d: name not in d)  # noqa: B023
    baseline = []
    with Inotify() as inotify:
        inotify.add_watch(dev, Mask.CREATE)
        for index in range(rounds):
            node = dev / f"b{index}"
            started = time.perf_counter()
            os.mknod(node, 0o600 | stat.S_IFCHR, null)
            await inotify.get()
            baseline.append((time.perf_counter() - started) * 1000)
            node.unlink()
    return ours, baseline


def row(name: str, ours: Timings, baseline: Timings) -> str:
    p50, p99 = percentile(ours, 0.5), percentile(ours, 0.99)
    b50, b99 = percentile(baseline, 0.5), percentile(baseline, 0.99)
    return (
        f"| {name:<34} | {p50:9.3f} | {p99:9.3f} | {b50:9.3f} | {b99:9.3f} "
        f"| {p50 / b50:6.2f}x | {p99 / b99:6.2f}x |"
    )


async def main(rounds: int, devices: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="npb-", dir="/tmp"))
    try:
        results = [
            (f"Allocate ({rounds} calls)", *await bench_allocate(root, rounds)),
            (
                f"ListAndWatch first send, {devices} dev",
                *await bench_list(root, max(5, rounds // 100), devices),
            ),
        ]
        if os.geteuid() == 0:
            results.insert(
                2,
                (
                    "hotplug (mknod) -> kubelet update",
                    *await bench_hotplug(root, max(20, rounds // 50)),
                ),
            )
        else:
            print("hotplug: skipped (needs root for mknod)", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = ("p50", "p99", "base p50", "base p99")
    print(
        f"| {'measurement (ms)':<34} | "
        + " | ".join(f"{h:>9}" for h in header)
        + " | p50 ratio | p99 ratio |"
    )
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for name, ours, baseline in results:
        print(row(name, ours, baseline))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=2000, help="Allocate calls (others scale down)"
    )
    parser.add_argument("--devices", type=int, default=60_000)
    options = parser.parse_args()
    asyncio.run(main(options.rounds, options.devices))
