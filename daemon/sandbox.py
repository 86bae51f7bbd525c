"""`nodeplug sandbox`: the daemon against a simulated kubelet, in a temporary directory.

Without --config it makes example devices: real character device nodes (made with
mknod, the same device numbers as /dev/null) when run as root, or a clearly labelled
simulated backend otherwise. It shows what the kubelet sees, admits a pod as the kubelet
would (GetPreferredAllocation, Allocate), then prints every device change until Ctrl-C.
Vendors point --config at their own backend's config to try it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemon import config as configuration
from daemon import sandbox_dra
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet
from deviceplugin.v1beta1 import api_pb2

EXAMPLE_DEVICES = 4


def _example_config(root: Path) -> dict[str, Any]:
    if os.geteuid() == 0:
        dev = root / "dev"
        dev.mkdir()
        null = Path("/dev/null").stat().st_rdev
        for index in range(EXAMPLE_DEVICES):
            os.mknod(dev / f"widget{index}", 0o666 | stat.S_IFCHR, null)
        widget: dict[str, Any] = {"backend": "glob", "config": {"paths": [f"{dev}/widget*"]}}
        print(f"example devices: character nodes {dev}/widget0..{EXAMPLE_DEVICES - 1}")
        print(f"  hotplug one:  mknod {dev}/widget{EXAMPLE_DEVICES} c 1 3   (remove it: rm)")
    else:
        widget = {"backend": "simulated", "config": {"count": EXAMPLE_DEVICES}}
        print("not root: using the SIMULATED backend (no device nodes; run as root for real ones)")
    return {
        "devicePlugins": [
            # Served both ways: as a device plugin and as the DRA driver widget.example.com.
            {"resourceName": "example.com/widget", **widget, "api": "both"},
            {
                "resourceName": "example.com/shared-widget",
                **widget,
                "replicas": 2,
                "allocationPolicy": "spread",
            },
        ]
    }


def _load(config_path: Path | None, root: Path) -> configuration.Config:
    if config_path is None:
        data: dict[str, Any] = _example_config(root)
        source = "<example>"
    else:
        data = configuration.load(config_path).model_dump(by_alias=True, mode="json")
        source = str(config_path)
    data = sandbox_dra.with_kubeconfig(configuration.confined_to(data, root), root)
    return configuration.parse(data, source)


def _describe(response: api_pb2.ContainerAllocateResponse) -> list[str]:
    lines = [f"    env   {k}={v}" for k, v in sorted(response.envs.items())]
    lines += [
        f"    dev   {d.host_path} -> {d.container_path} ({d.permissions})" for d in response.devices
    ]
    lines += [
        f"    mount {m.host_path} -> {m.container_path}{' (ro)' if m.read_only else ''}"
        for m in response.mounts
    ]
    lines += [f"    cdi   {c.name}" for c in response.cdi_devices]
    lines += [f"    annot {k}={v}" for k, v in sorted(response.annotations.items())]
    return lines


def _device_table(kubelet: FakeKubelet) -> list[str]:
    lines = []
    for resource, client in sorted(kubelet.clients.items()):
        lines.append(f"  {resource}  ({len(client.devices)} devices, socket {client.endpoint})")
        for device_id, device in sorted(client.devices.items()):
            numa = ",".join(str(n.ID) for n in device.topology.nodes) or "-"
            lines.append(f"    {device_id:<24} {device.health:<10} numa={numa}")
    return lines


async def _demo(config: configuration.Config, source: str, once: bool) -> None:
    backends = configuration.create_backends(config, source)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    resources = {spec.resource_name for spec in config.device_plugins if spec.serves_device_plugin}
    async with (
        FakeKubelet(config.device_plugin_dir) as kubelet,
        sandbox_dra.cluster(config) as dra,
    ):
        daemon = Daemon(config, backends)
        daemon_task = asyncio.create_task(daemon.run(stop))
        try:
            registered = asyncio.create_task(
                kubelet.wait_for(
                    lambda clients: all(r in clients and clients[r].updates for r in resources),
                    timeout=15,
                )
            )
            # A daemon that dies (a backend failing at start) must not look like a slow one.
            await asyncio.wait({registered, daemon_task}, return_when=asyncio.FIRST_COMPLETED)
            if daemon_task.done():
                registered.cancel()
                daemon_task.result()
                raise DaemonStoppedError
            await registered
            if dra is not None:
                await dra.wait_registered(timeout=15)
            print(f"\nsimulated kubelet at {kubelet.socket}; registered resources:")
            if daemon.status_server is not None and daemon.status_server.bound_port:
                url = f"http://127.0.0.1:{daemon.status_server.bound_port}"
                print(f"  (the daemon's {url}/metrics, /healthz and /readyz are up)")
            print("\n".join(_device_table(kubelet)))
            for resource in sorted(resources):
                if not kubelet.client(resource).healthy_ids():
                    print(f"\n{resource}: no healthy device to allocate")
                    continue
                print(f"\na pod asks for 1 {resource}; the kubelet admits it with:")
                print("\n".join(_describe(await kubelet.admit(resource, 1))))
            if dra is not None:
                print("\nDRA drivers' ResourceSlices (API server stand-in at", dra.api.url + "):")
                print("\n".join(dra.slice_table()))
                for resource in sorted(dra.drivers):
                    # With api: both, keep clear of what the device plugin just gave out.
                    taken = kubelet.clients[resource].allocated if resource in resources else ()
                    print(f"\na pod's claim for 1 {resource} device, prepared through DRA:")
                    print("\n".join(await dra.prepare_claim(resource, taken)))
            if not once:
                print("\nwatching for device changes; Ctrl-C to stop")
                await _watch(kubelet, stop)
        finally:
            stop.set()
            await daemon_task


class DaemonStoppedError(Exception):
    pass


async def _watch(kubelet: FakeKubelet, stop: asyncio.Event) -> None:
    def snapshot() -> dict[str, int]:
        return {resource: client.updates for resource, client in kubelet.clients.items()}

    seen = snapshot()

    def changed(_: object) -> bool:
        return snapshot() != seen

    while not stop.is_set():
        waiter = asyncio.create_task(kubelet.wait_for(changed, timeout=3600))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await task
        if snapshot() != seen:
            seen = snapshot()
            print("\ndevices changed:")
            print("\n".join(_device_table(kubelet)))


def main(config_path: Path | None, *, once: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="nodeplug-sandbox-") as tmp:
        root = Path(tmp)
        try:
            config = _load(config_path, root)
            asyncio.run(_demo(config, str(config_path or "<example>"), once))
        except configuration.ConfigError as error:
            print(error.report(), file=sys.stderr)
            return 2
        except TimeoutError:
            print("the daemon did not register every resource within 15 s", file=sys.stderr)
            return 1
        except (DaemonStoppedError, ExceptionGroup) as error:
            print(f"the daemon stopped: {error!r}", file=sys.stderr)
            return 1
    print("\nsandbox stopped; its temporary directory is removed")
    return 0
