"""Device-plugin benchmarks: each figure against a bare baseline measured in the same run.

    sudo .venv/bin/python bench/device_plugins.py [--rounds N] [--devices N]

nodeplug runs as on a node: `nodeplug run` in a process of its own, with its real log
configuration (JSON lines, here into a file). Every baseline server runs in a process of
its own too, and the client (the simulated kubelet, or a bare gRPC stub) is this process,
the same for both, so neither side shares an event loop with the client.

- Allocate latency: the kubelet's call into nodeplug, against a bare grpc.aio server
  returning the same response (both up at once, calls interleaved).
- ListAndWatch first send of 60,000 devices: stream opened -> first list received,
  against the bare server sending the same prebuilt list.
- hotplug -> kubelet update: mknod -> the simulated kubelet sees the device, against
  mknod -> a raw inotify event (root only).
- start-up with 60,000 glob devices (device nodes on a tmpfs, root only), twice:
  in process, Daemon.run() -> registered with the kubelet and its device list received
  (the daemon's own work, on a frozen heap as in `nodeplug run`), against a bare scan
  of the nodes (scandir + stat of each, into a device list); and `nodeplug run`
  exec'd -> the same, against a bare plugin process that scans, serves its socket
  and registers.

Kubelet restarts have their own benchmark: bench/kubelet_restart.py.

Ratios near 1 mean nodeplug adds little to what the machine itself costs. Other work on
the machine moves both sides of a row alike; compare ratios, not milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from asyncinotify import Inotify, Mask
from idle import compile_as_installed, process  # bench/, the script's directory

from daemon import config as configuration
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

RESOURCE = "bench.example/dev"
Timings = list[float]
# Character devices every Linux has (null, zero, full, random, urandom): nodes made with
# these numbers have real /sys/dev/char entries for the backend to look up.
_REAL_DEVICES = [os.makedev(1, minor) for minor in (3, 5, 7, 8, 9)]


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
async def nodeplug(
    root: Path, plugin: dict[str, Any], timeout: float = 120
) -> AsyncIterator[tuple[FakeKubelet, float]]:
    """`nodeplug run` serving one resource; yields the kubelet and the ms from exec to
    registered (the kubelet holding the resource's first device list)."""
    root.mkdir()
    data = configuration.confined_to(
        {"devicePlugins": [{"resourceName": RESOURCE, **plugin}]}, root
    )
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
    async with FakeKubelet(Path(data["devicePluginDir"])) as kubelet:
        started = time.perf_counter()
        async with process(*command, stderr=root / "daemon.log"):
            await kubelet.wait_for(
                lambda c: RESOURCE in c and c[RESOURCE].updates > 0, timeout=timeout
            )
            yield kubelet, (time.perf_counter() - started) * 1000


class BarePlugin(api_pb2_grpc.DevicePluginServicer):
    """The least a gRPC device plugin can be: fixed answers, no validation, no state."""

    def __init__(
        self, allocated: api_pb2.AllocateResponse, listed: api_pb2.ListAndWatchResponse
    ) -> None:
        self.allocated = allocated
        self.listed = listed

    async def GetDevicePluginOptions(  # noqa: N802
        self, request: Any, context: Any
    ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions()

    async def Allocate(self, request: Any, context: Any) -> api_pb2.AllocateResponse:  # noqa: N802
        return self.allocated

    async def ListAndWatch(  # noqa: N802
        self, request: Any, context: Any
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        yield self.listed
        await asyncio.Event().wait()

    async def GetPreferredAllocation(  # noqa: N802
        self, request: Any, context: Any
    ) -> api_pb2.PreferredAllocationResponse:
        return api_pb2.PreferredAllocationResponse()

    async def PreStartContainer(  # noqa: N802
        self, request: Any, context: Any
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()


@contextlib.asynccontextmanager
async def bare_server(
    path: Path, unary: api_pb2.AllocateResponse, stream: api_pb2.ListAndWatchResponse
) -> AsyncIterator[api_pb2_grpc.DevicePluginAsyncStub]:
    """A BarePlugin in this process (bench/kubelet_restart.py's baseline)."""
    server = grpc.aio.server()
    api_pb2_grpc.add_DevicePluginServicer_to_server(BarePlugin(unary, stream), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            yield api_pb2_grpc.DevicePluginStub(channel)
    finally:
        await server.stop(None)


def bare_scan(directory: Path) -> api_pb2.ListAndWatchResponse:
    """Every character device in `directory` as a healthy device: a listing, a stat each."""
    response = api_pb2.ListAndWatchResponse()
    with os.scandir(directory) as entries:
        for entry in entries:
            if stat.S_ISCHR(entry.stat(follow_symlinks=False).st_mode):
                response.devices.add(ID=entry.name, health="Healthy")
    return response


async def serve_bare(options: argparse.Namespace) -> None:
    """A BarePlugin in a process of its own (this script run with --serve-bare)."""
    allocated = api_pb2.AllocateResponse()
    listed = api_pb2.ListAndWatchResponse()
    if options.allocate is not None:
        allocated.ParseFromString(options.allocate.read_bytes())
    if options.list is not None:
        listed.ParseFromString(options.list.read_bytes())
    if options.scan is not None:
        listed = bare_scan(options.scan)
    server = grpc.aio.server()
    api_pb2_grpc.add_DevicePluginServicer_to_server(BarePlugin(allocated, listed), server)
    server.add_insecure_port(f"unix:{options.serve_bare}")
    await server.start()
    if options.register is not None:
        request = api_pb2.RegisterRequest(
            version="v1beta1", endpoint=options.serve_bare.name, resource_name=RESOURCE
        )
        async with grpc.aio.insecure_channel(f"unix:{options.register}") as channel:
            await api_pb2_grpc.RegistrationStub(channel).Register(request)
    await server.wait_for_termination()


@contextlib.asynccontextmanager
async def bare_process(
    socket: Path,
    allocated: api_pb2.AllocateResponse,
    listed: api_pb2.ListAndWatchResponse,
) -> AsyncIterator[api_pb2_grpc.DevicePluginAsyncStub]:
    """A BarePlugin in its own process answering `allocated` and `listed`; yields a stub."""
    answers = socket.with_suffix(".allocate"), socket.with_suffix(".list")
    answers[0].write_bytes(allocated.SerializeToString())
    answers[1].write_bytes(listed.SerializeToString())
    command = [
        "--serve-bare",
        str(socket),
        "--allocate",
        str(answers[0]),
        "--list",
        str(answers[1]),
    ]
    async with (
        process(sys.executable, __file__, *command),
        grpc.aio.insecure_channel(f"unix:{socket}") as channel,
    ):
        async with asyncio.timeout(60):
            await channel.channel_ready()
        yield api_pb2_grpc.DevicePluginStub(channel)


async def first_message(stub: api_pb2_grpc.DevicePluginAsyncStub) -> int:
    call = stub.ListAndWatch(api_pb2.Empty())
    response = await call.read()
    call.cancel()
    assert isinstance(response, api_pb2.ListAndWatchResponse)
    return len(response.devices)


def endpoint(kubelet: FakeKubelet) -> str:
    return f"unix:{kubelet.directory / kubelet.client(RESOURCE).endpoint}"


async def bench_allocate(root: Path, rounds: int) -> tuple[Timings, Timings]:
    """Both servers up at once, calls interleaved: drift hits both alike."""
    request = api_pb2.AllocateRequest()
    request.container_requests.add(devices_ids=["sim3"])
    plugin = {"backend": "simulated", "config": {"count": 8}}
    async with (
        nodeplug(root / "a", plugin) as (kubelet, _),
        grpc.aio.insecure_channel(endpoint(kubelet)) as channel,
    ):
        stub = api_pb2_grpc.DevicePluginStub(channel)
        response = await stub.Allocate(request)
        async with bare_process(
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
    async with (
        nodeplug(root / "l", plugin) as (kubelet, _),
        grpc.aio.insecure_channel(endpoint(kubelet)) as channel,
    ):
        stub = api_pb2_grpc.DevicePluginStub(channel)
        assert await first_message(stub) == count
        ours = await timed(rounds, lambda: first_message(stub))
        prebuilt = api_pb2.ListAndWatchResponse()
        prebuilt.CopyFrom(await stub.ListAndWatch(api_pb2.Empty()).read())  # type: ignore[arg-type]
    async with bare_process(root / "bare2.sock", api_pb2.AllocateResponse(), prebuilt) as bare:
        assert await first_message(bare) == count
        baseline = await timed(rounds, lambda: first_message(bare))
    return ours, baseline


async def bench_hotplug(root: Path, rounds: int) -> tuple[Timings, Timings]:
    dev = root / "dev"
    dev.mkdir()
    null = _REAL_DEVICES[0]
    plugin = {"backend": "glob", "config": {"paths": [f"{dev}/w*"]}}
    ours = []
    async with nodeplug(root / "h", plugin) as (kubelet, _):
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


@contextlib.contextmanager
def device_nodes(directory: Path, count: int) -> Iterator[Path]:
    """`count` character nodes w0, w1, ... on a tmpfs of our own at `directory`."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "npbench", directory], check=True)
    try:
        for index in range(count):
            rdev = _REAL_DEVICES[index % len(_REAL_DEVICES)]
            os.mknod(directory / f"w{index}", 0o600 | stat.S_IFCHR, rdev)
        yield directory
    finally:
        subprocess.run(["umount", directory], check=True)


async def startup_in_process(root: Path, plugin: dict[str, Any], count: int) -> float:
    """ms from Daemon.run() to the kubelet holding the device list (no interpreter start,
    no imports, config already parsed: the daemon's own start-up work)."""
    data = configuration.confined_to(
        {"devicePlugins": [{"resourceName": RESOURCE, **plugin}]}, root
    )
    config = configuration.parse(data)
    async with FakeKubelet(config.device_plugin_dir) as kubelet:
        stop = asyncio.Event()
        # `nodeplug run` freezes its heap before Daemon.run() (daemon/cli.py): the full
        # collections that run while a large first list is built walk only what the
        # daemon makes. Without this they would also walk this benchmark's own heap.
        gc.collect()
        gc.freeze()
        started = time.perf_counter()
        daemon = Daemon(config, configuration.create_backends(config))
        task = asyncio.create_task(daemon.run(stop))
        try:
            # The first list the plugin sends is the whole list: time until it arrives,
            # then check it (the simulator's index of it is not the daemon's work).
            await kubelet.wait_for(lambda c: RESOURCE in c and c[RESOURCE].updates > 0, 120)
            elapsed = (time.perf_counter() - started) * 1000
            assert len(kubelet.client(RESOURCE).devices) == count
            return elapsed
        finally:
            stop.set()
            await task
            gc.unfreeze()


async def bench_startup(
    root: Path, rounds: int, count: int
) -> tuple[tuple[Timings, Timings], tuple[Timings, Timings]]:
    """Start-up in process against a bare scan, and as processes against a bare plugin."""
    in_process: tuple[Timings, Timings] = ([], [])
    ours: Timings = []
    baseline: Timings = []
    with device_nodes(root / "nodes", count) as nodes:
        plugin = {"backend": "glob", "config": {"paths": [f"{nodes}/w*"]}}
        for index in range(rounds):
            in_process[0].append(await startup_in_process(root / f"i{index}", plugin, count))
            started = time.perf_counter()
            assert len(bare_scan(nodes).devices) == count
            in_process[1].append((time.perf_counter() - started) * 1000)
            async with nodeplug(root / f"s{index}", plugin) as (kubelet, elapsed):
                assert len(kubelet.client(RESOURCE).devices) == count
                ours.append(elapsed)
            directory = root / f"b{index}"
            socket = directory / "bare.sock"
            command = ["--serve-bare", str(socket), "--scan", str(nodes)]
            async with FakeKubelet(directory) as kubelet:
                started = time.perf_counter()
                register = ["--register", str(kubelet.socket)]
                async with process(sys.executable, __file__, *command, *register):
                    await kubelet.wait_for(lambda c: RESOURCE in c and c[RESOURCE].updates > 0, 120)
                    baseline.append((time.perf_counter() - started) * 1000)
                    assert len(kubelet.client(RESOURCE).devices) == count
    return in_process, (ours, baseline)


def row(name: str, ours: Timings, baseline: Timings) -> str:
    p50, p99 = percentile(ours, 0.5), percentile(ours, 0.99)
    b50, b99 = percentile(baseline, 0.5), percentile(baseline, 0.99)
    return (
        f"| {name:<38} | {p50:9.3f} | {p99:9.3f} | {b50:9.3f} | {b99:9.3f} "
        f"| {p50 / b50:8.2f}x | {p99 / b99:8.2f}x |"
    )


async def main(rounds: int, devices: int, startups: int, only: str | None) -> None:
    compile_as_installed()
    root = Path(tempfile.mkdtemp(prefix="npb-", dir="/tmp"))
    results = []
    try:
        if only in (None, "allocate"):
            results.append((f"Allocate ({rounds} calls)", *await bench_allocate(root, rounds)))
        if only in (None, "list"):
            list_rounds = max(5, rounds // 100)
            name = f"ListAndWatch first send, {devices} dev"
            results.append((name, *await bench_list(root, list_rounds, devices)))
        if os.geteuid() == 0 and only in (None, "hotplug"):
            name = "hotplug (mknod) -> kubelet update"
            results.append((name, *await bench_hotplug(root, max(20, rounds // 50))))
        if os.geteuid() == 0 and only in (None, "startup"):
            in_process, processes = await bench_startup(root, startups, devices)
            results.append((f"start-up, {devices} glob dev, in process", *in_process))
            results.append((f"start-up, {devices} glob dev, exec", *processes))
        if os.geteuid() != 0:
            print("hotplug and start-up: skipped (need root for mknod)", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = ("p50", "p99", "base p50", "base p99", "p50 ratio", "p99 ratio")
    print(f"| {'measurement (ms)':<38} | " + " | ".join(f"{h:>9}" for h in header) + " |")
    print(f"|{'-' * 40}|" + "|".join("-" * 11 for _ in header) + "|")
    for name, ours, baseline in results:
        print(row(name, ours, baseline))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=2000, help="Allocate calls (others scale down)"
    )
    parser.add_argument("--devices", type=int, default=60_000)
    parser.add_argument("--startups", type=int, default=5, help="start-ups to time, each way")
    parser.add_argument(
        "--only", choices=("allocate", "list", "hotplug", "startup"), help="run one row's bench"
    )
    bare = parser.add_argument_group("the bare baseline's own process (used by the benchmark)")
    bare.add_argument("--serve-bare", type=Path, metavar="SOCKET", help=argparse.SUPPRESS)
    bare.add_argument("--allocate", type=Path, help=argparse.SUPPRESS)
    bare.add_argument("--list", type=Path, help=argparse.SUPPRESS)
    bare.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    bare.add_argument("--register", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_bare is not None:
        asyncio.run(serve_bare(options))
    else:
        asyncio.run(main(options.rounds, options.devices, options.startups, options.only))
