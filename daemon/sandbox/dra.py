"""DRA: the example widget also served as a DRA driver; a claim prepared beside a
device-plugin allocation.

When a resource is served through DRA (`api: dra` or `both`), the daemon gets a
kubeconfig for a local API stand-in (HTTP on loopback, with this node's Node object)
and a DRA kubelet simulator watches plugins_registry. The demonstration does what a
cluster does with a claim: the scheduler picks a device from the published
ResourceSlices and allocates the claim, the kubelet calls NodePrepareResources, the
runtime would apply the CDI devices in the answer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

from daemon.sandbox.console import StepError
from daemon.sandbox.core import Demo, Sandbox
from deviceplugin.dra.names import default_node_name
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import FakeDraKubelet

KUBECONFIG = "kubeconfig"
EXAMPLE = "example.com/widget"
REGISTER_TIMEOUT = 15.0


def _serves_dra(spec: dict[str, Any]) -> bool:
    return bool(spec.get("api", "devicePlugin") != "devicePlugin")


class DraClaims(Demo):
    title = "DRA"

    def __init__(self) -> None:
        self.api: ApiServer | None = None
        self.kubelet: FakeDraKubelet | None = None
        self.node = default_node_name()
        # Resource name -> DRA driver name, for the resources served through DRA.
        self.drivers: dict[str, str] = {}
        self.cdi_dir = Path()

    def configure(self, sandbox: Sandbox, data: dict[str, Any]) -> dict[str, Any]:
        plugins = list(data.get("devicePlugins", []))
        if sandbox.user_config is None:
            # The built-in example: the widget served both ways, by one backend.
            plugins = [{**s, "api": "both"} if s["resourceName"] == EXAMPLE else s for s in plugins]
        if not any(_serves_dra(spec) for spec in plugins):
            return data
        return {**data, "devicePlugins": plugins, "kubeconfig": str(sandbox.root / KUBECONFIG)}

    def applies(self, sandbox: Sandbox) -> bool:
        return any(spec.serves_dra for spec in sandbox.config.device_plugins)

    @contextlib.asynccontextmanager
    async def environment(self, sandbox: Sandbox) -> AsyncIterator[None]:
        config = sandbox.config
        assert config.kubeconfig is not None
        self.drivers = {
            s.resource_name: s.driver_name for s in config.device_plugins if s.serves_dra
        }
        self.cdi_dir = config.cdi.dir
        async with ApiServer() as api, FakeDraKubelet(config.kubelet_dir) as kubelet:
            api.add_node(self.node)
            api.write_kubeconfig(config.kubeconfig)
            self.api, self.kubelet = api, kubelet
            yield

    async def show(self, sandbox: Sandbox) -> None:
        console = sandbox.console
        api, kubelet = self.api, self.kubelet
        assert api is not None and kubelet is not None
        async with console.step("drivers registered", timeout=REGISTER_TIMEOUT) as step:
            await kubelet.wait_for(
                lambda drivers: set(self.drivers.values()) <= set(drivers), REGISTER_TIMEOUT
            )
            await api.wait_for(
                lambda: all(self._devices(d) for d in self.drivers.values()), REGISTER_TIMEOUT
            )
            step.detail = (
                f"{', '.join(sorted(self.drivers.values()))}: slices published to the API "
                f"stand-in at {api.url}"
            )
            step.lines = self.slice_table()
        for resource in sorted(self.drivers):
            # With api: both, keep clear of what the device plugin just gave out.
            client = sandbox.kubelet.clients.get(resource) if sandbox.kubelet else None
            taken = client.allocated if client is not None else set()
            async with console.step("claim prepared") as step:
                step.detail = f"a pod's claim for 1 {resource} device, prepared through DRA"
                step.lines = await self.prepare_claim(resource, taken)

    def _devices(self, driver: str) -> list[str]:
        assert self.api is not None
        slices = self.api.slices_of(self.node, driver)
        return [d["name"] for s in slices for d in s["spec"].get("devices", [])]

    def slice_table(self) -> list[str]:
        assert self.api is not None
        lines = []
        for driver in sorted(self.drivers.values()):
            slices = self.api.slices_of(self.node, driver)
            generation = max((s["spec"]["pool"]["generation"] for s in slices), default=0)
            lines.append(
                f"{driver}  (pool {self.node}, generation {generation}, {len(slices)} slice(s))"
            )
            for slice_ in slices:
                for device in slice_["spec"].get("devices", []):
                    attributes = {
                        k: next(iter(v.values())) for k, v in device.get("attributes", {}).items()
                    }
                    lines.append(f"  {device['name']:<24} {json.dumps(attributes)}")
        return lines

    async def prepare_claim(self, resource: str, taken: Collection[str]) -> list[str]:
        """A pod's claim: allocated from the slices (as the scheduler would), then prepared."""
        assert self.api is not None and self.kubelet is not None
        driver = self.drivers[resource]
        free = [d for d in self._devices(driver) if d not in taken]
        if not free:
            raise StepError(f"no device of {driver} left to allocate")
        claim = self.api.add_claim(
            "default",
            "sandbox-claim",
            [{"request": "widget", "driver": driver, "pool": self.node, "device": free[0]}],
        )
        uid = claim["metadata"]["uid"]
        response = await self.kubelet.prepare(driver, [("default", uid, "sandbox-claim")])
        entry = response.claims[uid]
        if entry.error:
            raise StepError(f"NodePrepareResources: {entry.error}")
        lines = [f"ResourceClaim default/sandbox-claim ({uid})"]
        for device in entry.devices:
            requests = ", ".join(device.request_names)
            lines.append(f"  device {device.pool_name}/{device.device_name} (request {requests})")
            lines += [f"  cdi   {name}" for name in device.cdi_device_ids]
        spec = self.cdi_dir / f"nodeplug_dra-{driver}_{uid}.json"
        lines.append(f"which the runtime finds in {spec}:")
        for cdi_device in json.loads(spec.read_text())["devices"]:
            edits = cdi_device["containerEdits"]
            lines += [f"  {cdi_device['name']}: env {e}" for e in edits.get("env", [])]
            lines += [
                f"  {cdi_device['name']}: dev {n.get('hostPath', n['path'])}"
                for n in edits.get("deviceNodes", [])
            ]
        return lines
