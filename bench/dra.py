"""DRA benchmarks: each figure against baselines measured in the same run.

    .venv/bin/python bench/dra.py [--rounds N]

- NodePrepareResources, one claim of one device (a new claim each round, so that it is
  really prepared: API read, checkpoint intent and result, CDI spec, all fsync'd),
  against (a) a bare grpc.aio DRAPlugin handler returning a fixed answer and (b) the
  same bare handler that first reads the claim from the API stand-in (the least any
  driver must do), both up at once, calls interleaved.
- hotplug -> slices published: a backend snapshot with one more device -> the stand-in
  holds it in a ResourceSlice (every slice of the pool rewritten under a new
  generation), for 4 and 1,000 devices (1 and 8 slices), against the stand-in's own
  round trip for one slice update (a PUT through the same client library).

Everything runs in one process on loopback (the stand-in included), so the API's
costs are a local HTTP server's, not a real API server's: compare ratios, not ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from lightkube.resources.resource_v1 import ResourceSlice

from daemon import config as configuration
from daemon.supervisor import Daemon
from deviceplugin.backend import Device
from deviceplugin.dra.kube import KubeAccess
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import FakeDraKubelet
from deviceplugin.dra.v1 import api_pb2, api_pb2_grpc

RESOURCE = "bench.example/dev"
DRIVER = "dev.bench.example"
NODE = "bench-node"
Timings = list[float]


class Backend:
    """Publishes what the benchmark says (as tests/deviceplugin/backends.ScriptedBackend)."""

    def __init__(self, count: int) -> None:
        self.queue: asyncio.Queue[list[Device]] = asyncio.Queue()
        self.publish(count)

    def publish(self, count: int) -> None:
        self.queue.put_nowait([Device(f"dev{i}", numa_node=i % 2) for i in range(count)])

    async def watch(self) -> AsyncIterator[list[Device]]:
        while True:
            yield await self.queue.get()


def percentile(values: Timings, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


@contextlib.asynccontextmanager
async def nodeplug(
    root: Path, api: ApiServer, count: int
) -> AsyncIterator[tuple[Daemon, Backend, FakeDraKubelet]]:
    root.mkdir(parents=True)
    data = {
        "devicePlugins": [{"resourceName": RESOURCE, "backend": "bench", "api": "dra"}],
        "kubeconfig": str(api.write_kubeconfig(root / "kubeconfig")),
        "http": {"address": None},
    }
    config = configuration.parse(
        {**configuration.confined_to(data, root), "http": {"address": None}}
    )
    backend = Backend(count)
    async with FakeDraKubelet(config.kubelet_dir) as kubelet:
        stop = asyncio.Event()
        daemon = Daemon(config, [backend])
        task = asyncio.create_task(daemon.run(stop))
        try:
            await kubelet.wait_for_driver(DRIVER, timeout=60)
            await api.wait_for(lambda: len(devices(api)) == count, timeout=60)
            yield daemon, backend, kubelet
        finally:
            stop.set()
            await task


def devices(api: ApiServer) -> list[str]:
    return [d["name"] for s in api.slices_of(NODE, DRIVER) for d in s["spec"].get("devices", [])]


@contextlib.asynccontextmanager
async def bare(
    path: Path, kube: KubeAccess | None
) -> AsyncIterator[api_pb2_grpc.DRAPluginAsyncStub]:
    """The least a DRA driver can be: a fixed answer, optionally after reading the claim."""

    class Bare(api_pb2_grpc.DRAPluginServicer):
        async def NodePrepareResources(  # noqa: N802 (the wire's name)
            self, request: Any, context: Any
        ) -> api_pb2.NodePrepareResourcesResponse:
            response = api_pb2.NodePrepareResourcesResponse()
            for claim in request.claims:
                if kube is not None:
                    await kube.read_claim(claim.namespace, claim.name)
                response.claims[claim.uid].devices.add(
                    request_names=["r"], pool_name=NODE, device_name="dev0", cdi_device_ids=["x=y"]
                )
            return response

        async def NodeUnprepareResources(  # noqa: N802 (the wire's name)
            self, request: Any, context: Any
        ) -> api_pb2.NodeUnprepareResourcesResponse:
            return api_pb2.NodeUnprepareResourcesResponse()

    server = grpc.aio.server()
    api_pb2_grpc.add_DRAPluginServicer_to_server(Bare(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            yield api_pb2_grpc.DRAPluginStub(channel)
    finally:
        await server.stop(None)


def request_for(claim: dict[str, Any]) -> api_pb2.NodePrepareResourcesRequest:
    request = api_pb2.NodePrepareResourcesRequest()
    metadata = claim["metadata"]
    request.claims.add(namespace=metadata["namespace"], uid=metadata["uid"], name=metadata["name"])
    return request


async def bench_prepare(root: Path, rounds: int) -> tuple[Timings, Timings, Timings]:
    ours: Timings = []
    plain: Timings = []
    reading: Timings = []
    async with ApiServer() as api:
        api.add_node(NODE)
        kube = KubeAccess(api.write_kubeconfig(root / "bare-kubeconfig"))
        async with (
            nodeplug(root / "p", api, 8) as (_, _, kubelet),
            bare(root / "bare.sock", None) as bare_plain,
            bare(root / "bare-read.sock", kube) as bare_reading,
        ):
            result = [{"request": "r", "driver": DRIVER, "pool": NODE, "device": "dev0"}]
            for index in range(rounds + 5):
                claim = api.add_claim("bench", f"claim-{index}", result)
                uid = claim["metadata"]["uid"]
                ref = [("bench", uid, claim["metadata"]["name"])]
                took = await timed(lambda: kubelet.prepare(DRIVER, ref))  # noqa: B023
                await kubelet.unprepare(DRIVER, ref)
                base = await timed(lambda: bare_plain.NodePrepareResources(request_for(claim)))  # noqa: B023
                read = await timed(lambda: bare_reading.NodePrepareResources(request_for(claim)))  # noqa: B023
                if index >= 5:  # warm-up: connections, imports, first fsyncs
                    ours.append(took)
                    plain.append(base)
                    reading.append(read)
        await kube.close()
    return ours, plain, reading


async def bench_hotplug(root: Path, rounds: int, count: int) -> tuple[Timings, Timings]:
    ours: Timings = []
    baseline: Timings = []
    async with ApiServer() as api:
        api.add_node(NODE)
        async with nodeplug(root / f"h{count}", api, count) as (_, backend, _):
            for index in range(rounds):
                size = count + 1 if index % 2 == 0 else count
                started = time.perf_counter()
                backend.publish(size)
                await api.wait_for(lambda: len(devices(api)) == size, timeout=60)  # noqa: B023
                ours.append((time.perf_counter() - started) * 1000)
        kube = KubeAccess(api.write_kubeconfig(root / f"k{count}"))
        client = await kube.client()
        name = next(iter(api.slices))
        for _ in range(rounds):
            item = await client.get(ResourceSlice, name)
            started = time.perf_counter()
            await client.replace(item)
            baseline.append((time.perf_counter() - started) * 1000)
        await kube.close()
    return ours, baseline


def row(name: str, ours: Timings, baseline: Timings) -> str:
    p50, p99 = percentile(ours, 0.5), percentile(ours, 0.99)
    b50, b99 = percentile(baseline, 0.5), percentile(baseline, 0.99)
    return (
        f"| {name:<44} | {p50:8.3f} | {p99:8.3f} | {b50:8.3f} | {b99:8.3f} "
        f"| {p50 / b50:6.2f}x | {p99 / b99:6.2f}x |"
    )


async def main(rounds: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="npd-", dir="/tmp"))
    os.environ["NODE_NAME"] = NODE
    try:
        ours, plain, reading = await bench_prepare(root, rounds)
        hotplug_rounds = max(10, rounds // 10)
        small = await bench_hotplug(root, hotplug_rounds, 4)
        large = await bench_hotplug(root, max(5, hotplug_rounds // 4), 1000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = ("p50", "p99", "base p50", "base p99")
    print(
        f"| {'measurement (ms)':<44} | "
        + " | ".join(f"{h:>8}" for h in header)
        + " | p50 ratio | p99 ratio |"
    )
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    print(row(f"Prepare 1 claim/1 dev vs bare gRPC ({rounds})", ours, plain))
    print(row("Prepare 1 claim/1 dev vs bare gRPC + claim GET", ours, reading))
    print(row("hotplug -> published, 4 dev (1 slice)", *small))
    print(row("hotplug -> published, 1000 dev (8 slices)", *large))
    print(
        "baselines of the hotplug rows: one ResourceSlice PUT round trip to the stand-in",
        file=sys.stderr,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="Prepare calls (others scale down)")
    asyncio.run(main(parser.parse_args().rounds))
