"""Kubelet restarts: how soon nodeplug is registered again, p50/p99 over many restarts.

    .venv/bin/python bench/kubelet_restart.py [--restarts 100] [--resources 4]

Each round restarts the simulated kubelet as systemd restarts the real one: the process
killed (kubelet.sock left behind, nobody listening), 200 ms of start-up, then the device
manager's Start (every socket in the device-plugin directory removed, kubelet.sock
served anew). It times from that start to every resource registered again with its
device list received. The baseline, measured
in the same run: the same restart, then a bare plugin that serves its socket and calls
Register once (the kubelet dials back before it answers), which is the least any
plugin can do. Failed Register attempts are counted too: a plugin that waits out a
back-off after a failed dial is what makes the tail long.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from device_plugins import Timings, bare_server, percentile  # bench/, the script's directory

from daemon import config as configuration
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

# How long a restarted kubelet takes to serve kubelet.sock again. The plugin sees its
# stream break and the old kubelet.sock (left behind by the killed process) refuse
# connections meanwhile, as on a node.
DOWN_FOR = 0.2


async def restarts_timed(
    kubelet: FakeKubelet, rounds: int, registered: Callable[[], Awaitable[object]]
) -> Timings:
    """Kill the kubelet, wait DOWN_FOR, start it; time from its start to `registered`."""
    samples = []
    for _ in range(rounds):
        await kubelet.stop(killed=True)
        await asyncio.sleep(DOWN_FOR)
        started = time.perf_counter()
        await kubelet.start(clean=True)
        await registered()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def baseline(root: Path, restarts: int) -> Timings:
    kubelet = FakeKubelet(root / "device-plugins")
    resource = "bench.example/bare"
    request = api_pb2.RegisterRequest(
        version="v1beta1", endpoint="bare.sock", resource_name=resource
    )

    async def register() -> None:
        async with (
            bare_server(
                kubelet.directory / "bare.sock",
                api_pb2.AllocateResponse(),
                api_pb2.ListAndWatchResponse(),
            ),
            grpc.aio.insecure_channel(f"unix:{kubelet.socket}") as channel,
        ):
            await api_pb2_grpc.RegistrationStub(channel).Register(request)
            await kubelet.wait_for(lambda c: resource in c and c[resource].updates > 0)

    async with kubelet:
        return await restarts_timed(kubelet, restarts, register)


async def nodeplug(root: Path, restarts: int, resources: list[str]) -> tuple[Timings, int]:
    plugins = [
        {"resourceName": name, "backend": "simulated", "config": {"count": 8}} for name in resources
    ]
    config = configuration.parse(configuration.confined_to({"devicePlugins": plugins}, root))
    daemon = Daemon(config, configuration.create_backends(config))

    def all_registered(clients: dict[str, Any]) -> bool:
        return all(name in clients and clients[name].updates > 0 for name in resources)

    async def registered() -> None:
        await kubelet.wait_for(all_registered, timeout=30)

    async with FakeKubelet(config.device_plugin_dir) as kubelet:
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            await registered()
            samples = await restarts_timed(kubelet, restarts, registered)
            failures = sum(p.stats.register_failures for p in daemon.plugins.values())
        finally:
            stop.set()
            await task
    return samples, failures


async def main(restarts: int, resource_count: int) -> None:
    resources = [f"bench.example/r{index}" for index in range(resource_count)]
    root = Path(tempfile.mkdtemp(prefix="npr-", dir="/tmp"))
    try:
        ours, failures = await nodeplug(root / "n", restarts, resources)
        bare = await baseline(root / "b", restarts)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{restarts} kubelet restarts, {resource_count} resources")
    print(f"failed Register calls (nodeplug): {failures}")
    print(f"| {'measurement (ms)':<40} | {'p50':>8} | {'p99':>8} | {'max':>8} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, samples in (
        ("nodeplug: restart -> all registered", ours),
        ("baseline: restart -> bare Register", bare),
    ):
        print(
            f"| {name:<40} | {percentile(samples, 0.5):8.2f} | {percentile(samples, 0.99):8.2f} "
            f"| {max(samples):8.2f} |"
        )
    ratio50 = percentile(ours, 0.5) / percentile(bare, 0.5)
    ratio99 = percentile(ours, 0.99) / percentile(bare, 0.99)
    print(f"| {'ratio nodeplug / baseline':<40} | {ratio50:7.2f}x | {ratio99:7.2f}x | {'':>8} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=100)
    parser.add_argument("--resources", type=int, default=4)
    options = parser.parse_args()
    # The daemon warns about every failed dial while the kubelet is down: expected here.
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main(options.restarts, options.resources))
