"""Crash safety: a daemon stopped in the middle of Prepare, restarts, removed devices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc
import pytest

from daemon.supervisor import Daemon
from deviceplugin.backend import ContainerEdits, Device
from deviceplugin.dra.checkpoint import CheckpointError
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import DriverClient, FakeDraKubelet
from tests.deviceplugin.backends import AllocatingBackend, ScriptedBackend, device
from tests.deviceplugin.conftest import running
from tests.deviceplugin.dra.conftest import DRIVER, NODE, RESOURCE, claim_results, dra_config

DRA = {"resourceName": RESOURCE, "backend": "simulated", "api": "dra"}


class GatedBackend(ScriptedBackend):
    """An allocate hook that waits for the test: a Prepare caught in the middle."""

    def __init__(self, devices: Iterable[Device]) -> None:
        super().__init__(devices)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def allocate(self, devices: Sequence[Device]) -> ContainerEdits:
        self.entered.set()
        await self.release.wait()
        return ContainerEdits()


async def reregistered(kubelet: FakeDraKubelet, old: DriverClient | None) -> DriverClient:
    await kubelet.wait_for(lambda drivers: DRIVER in drivers and drivers[DRIVER] is not old)
    return kubelet.drivers[DRIVER]


def checkpoint(root: Path) -> dict[str, dict[str, object]]:
    path = root / "state" / f"dra-{DRIVER}.json"
    return dict(json.loads(path.read_text())["claims"]) if path.exists() else {}


async def test_a_restart_in_the_middle_of_prepare(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    claim = api.add_claim("ns", "c", claim_results("fpga0"))
    uid = claim["metadata"]["uid"]
    ref = [("ns", uid, "c")]
    config = dra_config(short_tmp, api, DRA)
    gated = GatedBackend([device("fpga0")])
    async with running(config, [gated]):
        first = await dra_kubelet.wait_for_driver(DRIVER)
        call = asyncio.create_task(dra_kubelet.prepare(DRIVER, ref))
        await gated.entered.wait()
        assert uid not in checkpoint(short_tmp)
    # The daemon went away before answering; the kubelet, seeing its registration
    # socket go, closed the connection (DeRegisterPlugin), which cancels the call.
    with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
        await call
    assert not (config.cdi.dir / f"nodeplug_dra-{DRIVER}_{uid}.json").exists()

    backend = AllocatingBackend([device("fpga0")])
    async with running(config, [backend]):
        second = await reregistered(dra_kubelet, first)
        response = await dra_kubelet.prepare(DRIVER, ref)  # the kubelet retries
        assert response.claims[uid].error == ""
        assert backend.allocated == [["fpga0"]], "an unfinished Prepare is done again"
        assert checkpoint(short_tmp)[uid]["name"] == "c"
        answer = response.claims[uid]

    # Restarted again: the claim was prepared, so it is answered from the checkpoint,
    # never prepared twice, even with the API server unable to say anything about it.
    del api.claims["ns", "c"]
    backend = AllocatingBackend([device("fpga0")])
    async with running(config, [backend]):
        await reregistered(dra_kubelet, second)
        assert (await dra_kubelet.prepare(DRIVER, ref)).claims[uid] == answer
        assert backend.allocated == []
        assert (await dra_kubelet.unprepare(DRIVER, ref)).claims[uid].error == ""
        assert checkpoint(short_tmp) == {}


async def test_stale_claim_specs_are_removed_at_start(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    config = dra_config(short_tmp, api, DRA)
    config.cdi.dir.mkdir(parents=True)
    stale = config.cdi.dir / f"nodeplug_dra-{DRIVER}_0000-dead.json"
    other_driver = config.cdi.dir / "nodeplug_dra-gpu.other.example_0000-dead.json"
    vendor = config.cdi.dir / "vendor.json"
    for path in (stale, other_driver, vendor):
        path.write_text("{}")
    async with running(config, [ScriptedBackend([device("fpga0")])]):
        await dra_kubelet.wait_for_driver(DRIVER)
        assert not stale.exists()
        assert other_driver.exists() and vendor.exists(), "never another driver's files"


async def test_a_device_removed_while_prepared(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    claim = api.add_claim("ns", "c", claim_results("fpga1"))
    uid = claim["metadata"]["uid"]
    backend = ScriptedBackend([device("fpga0"), device("fpga1")])
    async with running(dra_config(short_tmp, api, DRA), [backend]) as daemon:
        await dra_kubelet.wait_for_driver(DRIVER)
        prepared = await dra_kubelet.prepare(DRIVER, [("ns", uid, "c")])
        assert prepared.claims[uid].error == ""
        publisher = daemon.dra[RESOURCE].driver.publisher
        backend.publish([device("fpga0")])  # fpga1 unplugged while a pod holds it
        await api.wait_for(lambda: _names(api) == ["fpga0"])
        await asyncio.wait_for(publisher.in_sync.wait(), 5)
        # The kubelet may ask again (it lost our answer): it gets the same one.
        again = await dra_kubelet.prepare(DRIVER, [("ns", uid, "c")])
        assert again.claims[uid] == prepared.claims[uid]
        assert (await dra_kubelet.unprepare(DRIVER, [("ns", uid, "c")])).claims[uid].error == ""
        # A new claim for the vanished device is refused.
        new = api.add_claim("ns", "new", claim_results("fpga1"))
        new_uid = new["metadata"]["uid"]
        refused = await dra_kubelet.prepare(DRIVER, [("ns", new_uid, "new")])
        assert "not on this node" in refused.claims[new_uid].error


def _names(api: ApiServer) -> list[str]:
    return sorted(d["name"] for s in api.slices_of(NODE, DRIVER) for d in s["spec"]["devices"])


@pytest.mark.parametrize(
    "content", ["{not json", '{"version": 99, "claims": {}}', '{"version": 1, "claims": {"u": {}}}']
)
async def test_a_checkpoint_it_cannot_trust_stops_the_daemon(
    short_tmp: Path, api: ApiServer, node_name: str, content: str
) -> None:
    """Answering the kubelet from a checkpoint it cannot read could prepare claims twice."""
    config = dra_config(short_tmp, api, DRA)
    config.state_dir.mkdir(parents=True)
    (config.state_dir / f"dra-{DRIVER}.json").write_text(content)
    daemon = Daemon(config, [ScriptedBackend([device("fpga0")])])
    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(daemon.run(asyncio.Event()), timeout=10)
    assert raised.group_contains(CheckpointError)
