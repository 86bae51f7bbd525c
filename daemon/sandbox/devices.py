"""Device plugins: example devices, the kubelet's view of them, a pod admitted, hotplug.

Without --config it makes example devices: real character device nodes (made with
mknod, the same device numbers as /dev/null) when run as root, or a clearly labelled
simulated backend otherwise. Vendors point --config at their own backend's config.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import config as configuration
from daemon.config import Registration
from daemon.sandbox.core import Demo, Sandbox
from deviceplugin import configkit
from deviceplugin.testkit import FakeKubelet
from deviceplugin.v1beta1 import api_pb2

EXAMPLE_DEVICES = 4
REGISTER_TIMEOUT = 15.0
# Ids listed per resource before the rest is counted: a section fits on a screen.
SHOWN_IDS = 8


def _kubelet(sandbox: Sandbox) -> FakeKubelet:
    assert sandbox.kubelet is not None, "the sandbox starts the kubelet before any demo"
    return sandbox.kubelet


class DevicePlugins(Demo):
    title = "device plugins"

    def __init__(self) -> None:
        self.devices_dir: Path | None = None
        self.origin = ""

    def configure(self, sandbox: Sandbox, data: dict[str, Any]) -> dict[str, Any]:
        if sandbox.user_config is not None:
            mine = configkit.dumped(configuration.load(sandbox.user_config))
            self.origin = f"your config {sandbox.user_config}"
            # Its pool is a real path on this machine: the CSI demo uses a pool of its own.
            if mine.pop("csi", None) is not None:
                self.origin += " (its csi: section is replaced by the sandbox's pool)"
            return {**data, **mine}
        if os.geteuid() == 0:
            self.devices_dir = sandbox.root / "dev"
            self.devices_dir.mkdir()
            null = Path("/dev/null").stat().st_rdev
            for index in range(EXAMPLE_DEVICES):
                os.mknod(self.devices_dir / f"widget{index}", 0o666 | stat.S_IFCHR, null)
            widget: dict[str, Any] = {
                "backend": "glob",
                "config": {"paths": [f"{self.devices_dir}/widget*"]},
            }
            self.origin = (
                f"{EXAMPLE_DEVICES} character nodes {self.devices_dir}/widget0.."
                f"{EXAMPLE_DEVICES - 1} (mknod, as /dev/null)"
            )
        else:
            widget = {"backend": "simulated", "config": {"count": EXAMPLE_DEVICES}}
            self.origin = "SIMULATED backend, no device nodes (run as root for real ones)"
        shared = {**widget, "replicas": 2, "allocationPolicy": "spread"}
        plugins = [
            {"resourceName": "example.com/widget", **widget},
            {"resourceName": "example.com/shared-widget", **shared},
        ]
        return {**data, "devicePlugins": plugins}

    async def show(self, sandbox: Sandbox) -> None:
        console = sandbox.console
        kubelet = _kubelet(sandbox)
        resources = sorted(spec.resource_name for spec in sandbox.config.device_plugins)
        console.info("devices", self.origin)
        async with console.step("registered", timeout=REGISTER_TIMEOUT) as step:
            await kubelet.wait_for(
                lambda clients: all(r in clients and clients[r].updates for r in resources),
                timeout=REGISTER_TIMEOUT,
            )
            if sandbox.config.device_plugin_registration is Registration.PLUGIN_WATCHER:
                how = "through the plugin watcher (plugins_registry)"
            else:
                how = f"with Register on {kubelet.socket.relative_to(sandbox.root)}"
            count = f"{len(resources)} resource" + ("s" if len(resources) != 1 else "")
            step.detail = f"{count} {how}"
            step.lines = device_table(kubelet)
        daemon = sandbox.daemon
        if daemon is not None and daemon.status_server and daemon.status_server.bound_port:
            url = f"http://127.0.0.1:{daemon.status_server.bound_port}"
            console.info("HTTP", f"{url}/metrics  /healthz  /readyz")
        for resource in resources:
            async with console.step("pod admitted") as step:
                if not kubelet.client(resource).healthy_ids():
                    step.detail = f"{resource}: no healthy device to allocate"
                    continue
                response = await kubelet.admit(resource, 1)
                step.detail = f"1 {resource} (GetPreferredAllocation, Allocate)"
                step.lines = describe_allocation(response)

    def hints(self, sandbox: Sandbox) -> list[str]:
        if self.devices_dir is None:
            return ["device changes are printed as they happen"]
        new = self.devices_dir / f"widget{EXAMPLE_DEVICES}"
        return [f"hotplug: mknod {new} c 1 3   (unplug: rm it)"]

    async def watch(self, sandbox: Sandbox) -> None:
        kubelet = _kubelet(sandbox)

        def updates() -> dict[str, int]:
            return {resource: client.updates for resource, client in kubelet.clients.items()}

        def changed_since(before: dict[str, int]) -> Callable[[object], bool]:
            return lambda _: updates() != before

        seen = updates()
        while True:
            # No timeout: the sandbox cancels the watch when it stops.
            await kubelet.wait_for(changed_since(seen), timeout=float("inf"))
            # Let a burst of changes (several nodes made at once) settle into one report.
            await asyncio.sleep(0.1)
            seen = updates()
            sandbox.console.info("devices changed", "")
            for line in device_table(kubelet):
                sandbox.console.detail(line)


def device_table(kubelet: FakeKubelet) -> list[str]:
    """One line per resource, as the kubelet sees it: its devices and their health."""
    lines = []
    for resource, client in sorted(kubelet.clients.items()):
        shown = []
        for device_id, device in sorted(client.devices.items())[:SHOWN_IDS]:
            numa = ",".join(str(n.ID) for n in device.topology.nodes)
            mark = "" if device.health == "Healthy" else f"({device.health})"
            shown.append(device_id + (f"@numa{numa}" if numa else "") + mark)
        more = len(client.devices) - len(shown)
        listing = " ".join(shown) + (f" … +{more}" if more > 0 else "")
        lines.append(f"{resource:<28} {len(client.devices)} devices: {listing}")
    return lines


def describe_allocation(response: api_pb2.ContainerAllocateResponse) -> list[str]:
    """What the container gets, in the words of the AllocateResponse."""
    lines = [f"env   {k}={v}" for k, v in sorted(response.envs.items())]
    lines += [
        f"dev   {d.host_path} -> {d.container_path} ({d.permissions})" for d in response.devices
    ]
    lines += [
        f"mount {m.host_path} -> {m.container_path}{' (ro)' if m.read_only else ''}"
        for m in response.mounts
    ]
    lines += [f"cdi   {c.name}" for c in response.cdi_devices]
    lines += [f"annot {k}={v}" for k, v in sorted(response.annotations.items())]
    return lines
