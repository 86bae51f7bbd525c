"""Idle cost of `nodeplug run`: RSS and CPU over an idle window, against a bare baseline.

    sudo .venv/bin/python bench/idle.py [--seconds 30]

The daemon serves 3 device-plugin resources (registered with a simulated kubelet, their
ListAndWatch streams open), the CSI driver on a btrfs pool image it makes itself (root
only; without root the run has no CSI), and its HTTP endpoints. The baseline is a bare
Python process holding a grpc.aio server on a Unix socket, measured alongside. Nothing
should poll: idle CPU should be near zero for both.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import yaml

from daemon import config as configuration
from deviceplugin.testkit import FakeKubelet

RESOURCES = ["bench.example/a", "bench.example/b", "bench.example/c"]
BASELINE = """
import asyncio, grpc, sys
async def main():
    server = grpc.aio.server()
    server.add_insecure_port("unix:" + sys.argv[1])
    await server.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def process(*argv: str, stderr: Path | None = None) -> AsyncIterator[psutil.Process]:
    """Run argv; its stderr (the daemon's log) goes to the file `stderr`, or nowhere."""
    with contextlib.ExitStack() as files:  # the child has its own copy of the descriptor
        log = files.enter_context(stderr.open("wb")) if stderr else asyncio.subprocess.DEVNULL
        child = await asyncio.create_subprocess_exec(*argv, stderr=log)
    try:
        yield psutil.Process(child.pid)
    finally:
        child.terminate()
        try:
            await asyncio.wait_for(child.wait(), 10)
        except TimeoutError:
            child.kill()
            await child.wait()


def compile_as_installed() -> None:
    """Byte-compile nodeplug's packages, as `pip install` does in the image.

    Processes then load them rather than compile them from source at every start,
    which PYTHONDONTWRITEBYTECODE (set in some shells and CI) would otherwise make
    them do: that is time and memory no node spends.
    """
    root = Path(__file__).resolve().parents[1]
    for package in ("daemon", "deviceplugin", "csi"):
        compileall.compile_dir(root / package, quiet=1)


def write_config(root: Path) -> Path:
    plugins = [
        {"resourceName": name, "backend": "simulated", "config": {"count": 16}}
        for name in RESOURCES
    ]
    data = configuration.confined_to({"devicePlugins": plugins}, root)
    if os.geteuid() == 0:
        pool = {"path": str(root / "pool"), "image": str(root / "pool.img"), "size": "256Mi"}
        data["csi"] = {"driverName": "bench.csi.nodeplug.io", "nodeId": "bench", "pool": pool}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def usage(proc: psutil.Process) -> tuple[float, int]:
    times = proc.cpu_times()
    return times.user + times.system, proc.memory_info().rss


async def measure(proc: psutil.Process, seconds: float) -> tuple[float, int]:
    """CPU seconds used over the window, and RSS at its end."""
    cpu_before, _ = usage(proc)
    await asyncio.sleep(seconds)
    cpu_after, rss = usage(proc)
    return cpu_after - cpu_before, rss


async def main(seconds: float) -> None:
    compile_as_installed()
    root = Path(tempfile.mkdtemp(prefix="npi-", dir="/tmp"))
    try:
        config_path = write_config(root)
        config = configuration.load(config_path)
        async with (
            FakeKubelet(config.device_plugin_dir) as kubelet,
            process(
                sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)
            ) as daemon,
            process(sys.executable, "-c", BASELINE, str(root / "baseline.sock")) as baseline,
        ):
            await kubelet.wait_for(
                lambda c: all(r in c and c[r].updates for r in RESOURCES), timeout=120
            )
            await asyncio.sleep(2)  # let start-up settle before the window opens
            (daemon_cpu, daemon_rss), (base_cpu, base_rss) = await asyncio.gather(
                measure(daemon, seconds), measure(baseline, seconds)
            )
            csi = "with CSI" if config.csi is not None else "no CSI (not root)"
    finally:
        if (root / "pool").is_mount():  # the daemon leaves its pool mounted, as on a node
            umount = await asyncio.create_subprocess_exec("umount", str(root / "pool"))
            await umount.wait()
        shutil.rmtree(root, ignore_errors=True)
    print(f"idle window {seconds:g} s; daemon: 3 resources x 16 devices, streams open, {csi}")
    print("| process            | CPU ms / idle s | CPU % of a core | RSS MiB |")
    print("|--------------------|-----------------|-----------------|---------|")
    rows = (("nodeplug run", daemon_cpu, daemon_rss), ("bare grpc.aio", base_cpu, base_rss))
    for name, cpu, rss in rows:
        per_second = cpu * 1000 / seconds
        print(f"| {name:<18} | {per_second:15.2f} | {per_second / 10:15.3f} | {rss / 2**20:7.1f} |")
    extra = (daemon_cpu - base_cpu) * 1000 / seconds
    print(f"RSS ratio nodeplug / bare: {daemon_rss / base_rss:.2f}x; extra CPU: {extra:.2f} ms/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    asyncio.run(main(parser.parse_args().seconds))
