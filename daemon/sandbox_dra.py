"""The DRA half of `nodeplug sandbox`: an API-server stand-in and a simulated kubelet.

When the sandbox's config serves a resource through DRA, the daemon gets a kubeconfig
for a local API stand-in (HTTP on loopback, with this node's Node object) and a DRA
kubelet simulator watches plugins_registry. The demonstration then does what a cluster
does with a claim: the scheduler picks a device from the published ResourceSlices and
allocates the claim, the kubelet calls NodePrepareResources, the runtime would apply
the CDI devices in the answer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

from daemon.config import Config
from deviceplugin.dra.names import default_node_name
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import FakeDraKubelet

KUBECONFIG = "kubeconfig"


def with_kubeconfig(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """The config, pointed at the stand-in's kubeconfig if any resource uses DRA."""
    uses_dra = any(
        spec.get("api", "devicePlugin") != "devicePlugin" for spec in data.get("devicePlugins", [])
    )
    return {**data, "kubeconfig": str(root / KUBECONFIG)} if uses_dra else data


class DraDemo:
    def __init__(self, config: Config, api: ApiServer, kubelet: FakeDraKubelet) -> None:
        self.drivers = {
            s.resource_name: s.driver_name for s in config.device_plugins if s.serves_dra
        }
        self.api = api
        self.kubelet = kubelet
        self.node = default_node_name()
        self.cdi_dir = config.cdi.dir

    async def wait_registered(self, timeout: float) -> None:
        await self.kubelet.wait_for(
            lambda drivers: set(self.drivers.values()) <= set(drivers), timeout
        )
        await self.api.wait_for(
            lambda: all(self._devices(d) for d in self.drivers.values()), timeout
        )

    def _devices(self, driver: str) -> list[str]:
        slices = self.api.slices_of(self.node, driver)
        return [d["name"] for s in slices for d in s["spec"].get("devices", [])]

    def slice_table(self) -> list[str]:
        lines = []
        for driver in sorted(self.drivers.values()):
            slices = self.api.slices_of(self.node, driver)
            generation = max((s["spec"]["pool"]["generation"] for s in slices), default=0)
            lines.append(
                f"  {driver}  (pool {self.node}, generation {generation}, {len(slices)} slice(s))"
            )
            for slice_ in slices:
                for device in slice_["spec"].get("devices", []):
                    attributes = {
                        k: next(iter(v.values())) for k, v in device.get("attributes", {}).items()
                    }
                    lines.append(f"    {device['name']:<24} {json.dumps(attributes)}")
        return lines

    async def prepare_claim(self, resource: str, taken: Collection[str]) -> list[str]:
        """A pod's claim: allocated from the slices (as the scheduler would), then prepared."""
        driver = self.drivers[resource]
        free = [d for d in self._devices(driver) if d not in taken]
        if not free:
            return [f"  no device of {driver} left to allocate"]
        claim = self.api.add_claim(
            "default",
            "sandbox-claim",
            [{"request": "widget", "driver": driver, "pool": self.node, "device": free[0]}],
        )
        uid = claim["metadata"]["uid"]
        response = await self.kubelet.prepare(driver, [("default", uid, "sandbox-claim")])
        entry = response.claims[uid]
        if entry.error:
            return [f"  prepare failed: {entry.error}"]
        lines = [f"  ResourceClaim default/sandbox-claim ({uid})"]
        for device in entry.devices:
            requests = ", ".join(device.request_names)
            lines.append(f"    device {device.pool_name}/{device.device_name} (request {requests})")
            lines += [f"    cdi   {name}" for name in device.cdi_device_ids]
        spec = self.cdi_dir / f"nodeplug_dra-{driver}_{uid}.json"
        lines.append(f"  which the runtime finds in {spec}:")
        for entry in json.loads(spec.read_text())["devices"]:
            edits = entry["containerEdits"]
            lines += [f"    {entry['name']}: env {e}" for e in edits.get("env", [])]
            lines += [
                f"    {entry['name']}: dev {n.get('hostPath', n['path'])}"
                for n in edits.get("deviceNodes", [])
            ]
        return lines


@contextlib.asynccontextmanager
async def cluster(config: Config) -> AsyncIterator[DraDemo | None]:
    """The stand-in and the DRA kubelet, if the config serves DRA; else None."""
    if config.kubeconfig is None or not any(s.serves_dra for s in config.device_plugins):
        yield None
        return
    async with ApiServer() as api, FakeDraKubelet(config.kubelet_dir) as kubelet:
        api.add_node(default_node_name())
        api.write_kubeconfig(config.kubeconfig)
        yield DraDemo(config, api, kubelet)
