"""ResourceSlices through the real client against the HTTP API stand-in: pools, limits,
health, conflicts, watch restarts, 410 Gone, an API server that is away, uninstall."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from daemon.supervisor import Daemon
from deviceplugin.backend import Device
from deviceplugin.dra.health.v1alpha1 import api_pb2 as health_pb2
from deviceplugin.dra.slices import SlicePublisher
from deviceplugin.dra.standin import ApiServer, Object
from deviceplugin.dra.testkit import FakeDraKubelet
from deviceplugin.testkit import FakeKubelet
from tests.deviceplugin.backends import ScriptedBackend, device
from tests.deviceplugin.conftest import running
from tests.deviceplugin.dra.conftest import DRIVER, NODE, RESOURCE, claim_results, dra_config

DRA = {"resourceName": RESOURCE, "backend": "simulated", "api": "dra"}


def pool(api: ApiServer, node: str = NODE, driver: str = DRIVER) -> list[Object]:
    return sorted(api.slices_of(node, driver), key=lambda s: s["metadata"]["name"])


def names(api: ApiServer) -> list[str]:
    return sorted(d["name"] for s in pool(api) for d in s["spec"]["devices"])


def publisher(daemon: Daemon) -> SlicePublisher:
    return daemon.dra[RESOURCE].driver.publisher


def fpgas(count: int) -> list[Device]:
    return [device(f"fpga{i}") for i in range(count)]


async def synced(daemon: Daemon, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while RESOURCE not in daemon.dra:  # noqa: ASYNC110 - the units start in the daemon's task
            await asyncio.sleep(0.01)
        await publisher(daemon).in_sync.wait()


async def test_a_thousand_devices_fill_eight_slices_of_one_pool(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    backend = ScriptedBackend(fpgas(1000))
    async with running(dra_config(short_tmp, api, DRA), [backend]) as daemon:
        await api.wait_for(lambda: len(names(api)) == 1000)
        slices = pool(api)
        assert [len(s["spec"]["devices"]) for s in slices] == [128] * 7 + [104]
        assert {
            (s["spec"]["pool"]["generation"], s["spec"]["pool"]["resourceSliceCount"])
            for s in slices
        } == {(1, 8)}
        assert [s["metadata"]["name"][:6] for s in slices] == [f"{i:05x}-" for i in range(8)]
        await synced(daemon)

        backend.publish(fpgas(1001))  # a hotplug: a new pool generation, every slice
        await api.wait_for(lambda: len(names(api)) == 1001 and _generations(api) == {2})
        assert len(pool(api)) == 8
        backend.publish(fpgas(3))  # most gone: the surplus slices are deleted
        await api.wait_for(lambda: names(api) == ["fpga0", "fpga1", "fpga2"])
        assert len(pool(api)) == 1
        assert pool(api)[0]["spec"]["pool"]["resourceSliceCount"] == 1


def _generations(api: ApiServer) -> set[int]:
    return {s["spec"]["pool"]["generation"] for s in pool(api)}


async def test_unhealthy_devices_are_withdrawn_and_reported_to_the_health_api(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    backend = ScriptedBackend([device("fpga0"), device("fpga1")])
    async with (
        FakeDraKubelet(short_tmp / "kubelet", health_gate=True) as kubelet,
        running(dra_config(short_tmp, api, DRA), [backend]),
    ):
        client = await kubelet.wait_for_driver(DRIVER)
        await api.wait_for(lambda: names(api) == ["fpga0", "fpga1"])
        backend.publish([device("fpga0"), device("fpga1", healthy=False)])
        await api.wait_for(lambda: names(api) == ["fpga0"])
        assert _generations(api) == {2}

        def health() -> dict[str, int]:
            latest = client.health[-1].devices if client.health else []
            return {d.device.device_name: d.health for d in latest}

        await kubelet.wait_for(lambda _: health().get("fpga1") == health_pb2.UNHEALTHY)
        assert health() == {"fpga0": health_pb2.HEALTHY, "fpga1": health_pb2.UNHEALTHY}
        assert {d.device.pool_name for d in client.health[-1].devices} == {NODE}
        backend.publish([device("fpga0"), device("fpga1")])
        await api.wait_for(lambda: names(api) == ["fpga0", "fpga1"])


async def test_conflicts_are_retried_with_a_fresh_list(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    backend = ScriptedBackend([device("fpga0")])
    async with running(dra_config(short_tmp, api, DRA), [backend]) as daemon:
        await api.wait_for(lambda: names(api) == ["fpga0"])
        api.conflicts_to_inject = 2
        relists = publisher(daemon).stats.relists
        backend.publish([device("fpga0"), device("fpga1")])
        await api.wait_for(lambda: names(api) == ["fpga0", "fpga1"])
        assert publisher(daemon).stats.conflicts == 2
        assert publisher(daemon).stats.relists >= relists + 2
        assert api.conflicts_to_inject == 0


async def test_watch_restarts_410_gone_and_foreign_slices(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    other_node = await api.add_slice("other-node", "node-b", DRIVER, ["fpga0"])
    other_driver = await api.add_slice("other-driver", NODE, "gpu.other.example", ["gpu0"])
    backend = ScriptedBackend([device("fpga0")])
    async with running(dra_config(short_tmp, api, DRA), [backend]) as daemon:
        await api.wait_for(lambda: names(api) == ["fpga0"])
        await synced(daemon)
        relists = publisher(daemon).stats.relists
        # Our watch breaks and its last resourceVersion is compacted away (other objects
        # changed since, unseen through our selector): resuming gets 410 Gone, a new list.
        await api.add_slice("later", "node-c", DRIVER, ["fpga0"])
        api.compact()
        await api.drop_watches()
        (ours,) = pool(api)
        await api.remove_slice(ours["metadata"]["name"])  # e.g. the kubelet wiped it
        await api.wait_for(lambda: names(api) == ["fpga0"] and len(pool(api)) == 1)
        assert publisher(daemon).stats.relists > relists
        watches = [r for r in api.requests if r.query.get("watch") == "true"]
        assert {r.query["fieldSelector"] for r in watches} == {
            f"spec.nodeName={NODE},spec.driver={DRIVER}"
        }
    assert api.slices["other-node"] == other_node, "another node's slice is never touched"
    assert api.slices["other-driver"] == other_driver, "another driver's slice is never touched"


async def test_a_restarted_daemon_adopts_its_slices(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    config = dra_config(short_tmp, api, DRA)
    async with running(config, [ScriptedBackend(fpgas(200))]) as daemon:
        await api.wait_for(lambda: len(names(api)) == 200)
        await synced(daemon)
    before = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in pool(api)}
    async with running(config, [ScriptedBackend(fpgas(200))]) as daemon:
        await synced(daemon)
        stats = publisher(daemon).stats
        assert (stats.creates, stats.updates, stats.deletes) == (0, 0, 0)
    after = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in pool(api)}
    assert after == before, "the daemon stopping leaves the slices (the kubelet wipes late)"


async def test_uninstall_by_reload_removes_only_our_slices(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    other = await api.add_slice("other-driver", NODE, "gpu.other.example", ["gpu0"])
    config = dra_config(short_tmp, api, DRA)
    async with running(config, [ScriptedBackend([device("fpga0")])]) as daemon:
        await api.wait_for(lambda: names(api) == ["fpga0"])
        without = dra_config(short_tmp, api)
        restarted = await daemon.apply(without, [])
        assert restarted == [f"device plugin {RESOURCE}"]
        assert pool(api) == []
        assert RESOURCE not in daemon.dra
    assert api.slices == {"other-driver": other}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def absent_api() -> AsyncIterator[ApiServer]:
    """An API server that is not running yet: its port refuses connections."""
    server = ApiServer(port=_free_port())
    server.add_node(NODE)
    try:
        yield server
    finally:
        await server.stop()


async def test_an_api_server_away_at_start_delays_nothing_else(
    short_tmp: Path,
    absent_api: ApiServer,
    kubelet: FakeKubelet,
    dra_kubelet: FakeDraKubelet,
    node_name: str,
) -> None:
    both = {**DRA, "api": "both"}
    plain = {"resourceName": "acme.example/plain", "backend": "simulated"}
    config = dra_config(short_tmp, absent_api, both, plain)
    claim = absent_api.add_claim("ns", "c", claim_results("fpga0"))
    uid = claim["metadata"]["uid"]
    backends = [ScriptedBackend([device("fpga0")]), ScriptedBackend([device("w0")])]
    async with running(config, backends) as daemon:
        # Device plugins register, and the DRA driver is served, with no API server.
        await kubelet.wait_for_devices(RESOURCE, lambda d: list(d) == ["fpga0"], timeout=5)
        await kubelet.wait_for_devices("acme.example/plain", bool, timeout=5)
        await dra_kubelet.wait_for_driver(DRIVER, timeout=5)
        refused = await dra_kubelet.prepare(DRIVER, [("ns", uid, "c")])
        assert "cannot read the ResourceClaim" in refused.claims[uid].error
        assert daemon.ready, daemon.readiness()

        await absent_api.start()  # the API server comes (back)
        await absent_api.wait_for(lambda: names(absent_api) == ["fpga0"], timeout=40)
        prepared = await dra_kubelet.prepare(DRIVER, [("ns", uid, "c")])
        assert prepared.claims[uid].error == ""


class CountingBackend(ScriptedBackend):
    def __init__(self, devices: list[Device]) -> None:
        super().__init__(devices)
        self.watches = 0

    async def watch(self) -> AsyncIterator[list[Device]]:
        self.watches += 1
        async for snapshot in super().watch():
            yield snapshot


async def test_both_apis_share_one_backend_watch(
    short_tmp: Path, api: ApiServer, kubelet: FakeKubelet, node_name: str
) -> None:
    backend = CountingBackend([device("fpga0")])
    config = dra_config(short_tmp, api, {**DRA, "api": "both"})
    async with running(config, [backend]):
        await kubelet.wait_for_devices(RESOURCE, lambda d: list(d) == ["fpga0"])
        await api.wait_for(lambda: names(api) == ["fpga0"])
        backend.publish([device("fpga0"), device("fpga1")])
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
        await api.wait_for(lambda: names(api) == ["fpga0", "fpga1"])
        assert backend.watches == 1


async def test_new_api_credentials_restart_only_the_dra_units(
    short_tmp: Path, api: ApiServer, kubelet: FakeKubelet, node_name: str
) -> None:
    plain = {"resourceName": "acme.example/plain", "backend": "simulated"}
    config = dra_config(short_tmp, api, DRA, plain)
    backends = [ScriptedBackend([device("fpga0")]), ScriptedBackend([device("w0")])]
    async with running(config, backends) as daemon:
        await api.wait_for(lambda: names(api) == ["fpga0"])
        await kubelet.wait_for_devices("acme.example/plain", bool)
        moved = api.write_kubeconfig(short_tmp / "kubeconfig-2")
        new = msgspec.structs.replace(config, kubeconfig=moved)
        restarted = await daemon.apply(new, [ScriptedBackend([device("fpga0")]), backends[1]])
        assert restarted == [f"device plugin {RESOURCE}"]
        await synced(daemon)


async def test_refused_writes_are_reported_and_retried(
    short_tmp: Path, api: ApiServer, node_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    api.forbid_writes = True
    async with running(dra_config(short_tmp, api, DRA), [ScriptedBackend([device("fpga0")])]):
        await api.wait_for(lambda: any(r.method == "POST" for r in api.requests))
        assert pool(api) == []
        api.forbid_writes = False
        await api.wait_for(lambda: names(api) == ["fpga0"], timeout=20)
    refused = [
        r for r in caplog.records if r.getMessage() == "the API server refused a ResourceSlice"
    ]
    assert refused and "403 Forbidden" in refused[0].error  # type: ignore[attr-defined]
