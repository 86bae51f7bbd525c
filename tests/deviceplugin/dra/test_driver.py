"""The daemon as a DRA driver: a simulated kubelet drives registration and Prepare/Unprepare
over real Unix sockets; ResourceClaims and ResourceSlices live in the HTTP API stand-in."""

from __future__ import annotations

import stat
from pathlib import Path

from deviceplugin.dra.testkit import FakeDraKubelet
from tests.deviceplugin.backends import ScriptedBackend, device
from tests.deviceplugin.conftest import running
from tests.deviceplugin.dra.apiserver import ApiServer
from tests.deviceplugin.dra.conftest import DRIVER, NODE, RESOURCE, dra_config

DRA = {"resourceName": RESOURCE, "backend": "simulated", "api": "dra"}


def published(api: ApiServer) -> dict[str, dict[str, object]]:
    return {d["name"]: d for s in api.slices_of(NODE, DRIVER) for d in s["spec"].get("devices", [])}


async def test_registers_as_a_dra_plugin_and_publishes_slices(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    fpga0 = device("fpga0", numa=1)
    backend = ScriptedBackend([fpga0, device("fpga1", healthy=False)])
    config = dra_config(short_tmp, api, DRA)
    async with running(config, [backend]) as daemon:
        client = await dra_kubelet.wait_for_driver(DRIVER)
        assert client.chosen == "v1.DRAPlugin"
        assert client.services == (
            "v1.DRAPlugin",
            "v1beta1.DRAPlugin",
            "v1alpha1.DRAResourceHealth",
        )
        socket = Path(client.endpoint)
        assert socket == config.kubelet_dir / "plugins" / DRIVER / "dra.sock"
        assert stat.S_IMODE(socket.lstat().st_mode) == 0o600
        assert client.socket == f"{DRIVER}-reg.sock"
        await api.wait_for(lambda: "fpga0" in published(api))
        (resource_slice,) = api.slices_of(NODE, DRIVER)
        spec = resource_slice["spec"]
        assert spec["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 1}
        assert published(api) == {
            "fpga0": {"name": "fpga0", "attributes": {"numaNode": {"int": 1}}}
        }
        owner = resource_slice["metadata"]["ownerReferences"][0]
        assert owner == {
            "apiVersion": "v1",
            "kind": "Node",
            "name": NODE,
            "uid": api.nodes[NODE]["metadata"]["uid"],
            "controller": True,
        }
        assert resource_slice["metadata"]["name"].startswith(f"00000-{DRIVER}-{NODE}-")
        assert "device plugin acme.example/fpga" not in daemon.readiness()
        assert daemon.ready, daemon.readiness()
    assert not socket.exists()
