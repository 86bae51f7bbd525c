"""The daemon as a DRA driver: a simulated kubelet drives registration and Prepare/Unprepare
over real Unix sockets; ResourceClaims and ResourceSlices live in the HTTP API stand-in."""

from __future__ import annotations

import asyncio
import json
import stat
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from daemon.config import Config
from deviceplugin.backend import Version
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import FakeDraKubelet
from tests.deviceplugin.backends import AllocatingBackend, ScriptedBackend, device
from tests.deviceplugin.conftest import running
from tests.deviceplugin.dra.conftest import DRIVER, NODE, RESOURCE, claim_results, dra_config

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


def cdi_spec(config: Config, uid: str) -> dict[str, object]:
    path = config.cdi.dir / f"nodeplug_dra-{DRIVER}_{uid}.json"
    return dict(json.loads(path.read_text()))


async def test_prepare_answers_cdi_ids_and_unprepare_undoes_it(
    short_tmp: Path,
    api: ApiServer,
    dra_kubelet: FakeDraKubelet,
    node_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO")
    backend = AllocatingBackend([device("fpga0"), device("fpga1")])
    claim = api.add_claim("team-a", "gpu-claim", claim_results("fpga1"))
    uid = claim["metadata"]["uid"]
    config = dra_config(short_tmp, api, DRA)
    async with running(config, [backend]):
        await dra_kubelet.wait_for_driver(DRIVER)
        response = await dra_kubelet.prepare(DRIVER, [("team-a", uid, "gpu-claim")])
        entry = response.claims[uid]
        assert entry.error == ""
        (answered,) = entry.devices
        assert list(answered.request_names) == ["fpga"]
        assert (answered.pool_name, answered.device_name) == (NODE, "fpga1")
        assert list(answered.cdi_device_ids) == [
            f"{RESOURCE}={uid}-fpga1",
            "acme.example/fpga=fpga1",  # the backend's own CDI name for the device
            f"{RESOURCE}={uid}",  # claim-wide: the allocate hook's edits and the id list
        ]
        assert not answered.HasField("share_id")
        assert backend.allocated == [["fpga1"]]
        spec = cdi_spec(config, uid)
        assert spec["kind"] == RESOURCE
        entries = {e["name"]: e["containerEdits"] for e in spec["devices"]}  # type: ignore[attr-defined]
        (node,) = entries[f"{uid}-fpga1"]["deviceNodes"]
        # No hostPath when it is the path itself: older CDI parsers refuse the field.
        assert (node["path"], node.get("hostPath", node["path"])) == ("/dev/fpga1", "/dev/fpga1")
        assert "NODEPLUG_ACME_EXAMPLE_FPGA=fpga1" in entries[uid]["env"]
        assert "ACME_SESSION=fpga1" in entries[uid]["env"]
        checkpoint = config.state_dir / f"dra-{DRIVER}.json"
        assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o600
        assert json.loads(checkpoint.read_text())["claims"][uid]["namespace"] == "team-a"
        logged = [r for r in caplog.records if r.getMessage() == "claim prepared"]
        assert [(r.claim, r.uid) for r in logged] == [("gpu-claim", uid)]  # type: ignore[attr-defined]

        # The kubelet retries after a lost answer: the same answer, no new work.
        again = await dra_kubelet.prepare(DRIVER, [("team-a", uid, "gpu-claim")])
        assert again.claims[uid] == entry
        assert backend.allocated == [["fpga1"]]

        undone = await dra_kubelet.unprepare(DRIVER, [("team-a", uid, "gpu-claim")])
        assert undone.claims[uid].error == ""
        assert not (config.cdi.dir / f"nodeplug_dra-{DRIVER}_{uid}.json").exists()
        assert json.loads(checkpoint.read_text())["claims"] == {}
        logged = [r for r in caplog.records if r.getMessage() == "claim unprepared"]
        assert [(r.claim, r.uid) for r in logged] == [("gpu-claim", uid)]  # type: ignore[attr-defined]
        # Unprepare is idempotent: a repeat, and a claim never prepared here, are fine.
        undone = await dra_kubelet.unprepare(
            DRIVER, [("team-a", uid, "gpu-claim"), ("team-a", "no-such-uid", "other")]
        )
        assert {u: e.error for u, e in undone.claims.items()} == {uid: "", "no-such-uid": ""}


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ("missing", "the ResourceClaim does not exist"),
        ("replaced", "the ResourceClaim was replaced: its UID is now"),
        ("unallocated", "the ResourceClaim is not allocated"),
        ("other-pool", "was allocated from pool 'node-b', not from this node's pool 'node-a'"),
        ("unknown-device", "device 'fpga9' is not on this node"),
        ("unhealthy", "device 'fpga1' is unhealthy"),
    ],
)
async def test_a_claim_that_cannot_be_prepared_fails_alone(
    short_tmp: Path,
    api: ApiServer,
    dra_kubelet: FakeDraKubelet,
    node_name: str,
    setup: str,
    error: str,
) -> None:
    backend = AllocatingBackend([device("fpga0"), device("fpga1", healthy=False)])
    good = api.add_claim("ns", "good", claim_results("fpga0"))
    results = {
        "other-pool": claim_results("fpga0", pool="node-b"),
        "unknown-device": claim_results("fpga9"),
        "unhealthy": claim_results("fpga1"),
    }.get(setup, claim_results("fpga0"))
    bad = api.add_claim("ns", "bad", results, allocated=setup != "unallocated")
    bad_uid = bad["metadata"]["uid"]
    if setup == "missing":
        del api.claims["ns", "bad"]
    if setup == "replaced":
        api.replace_claim("ns", "bad")
    async with running(dra_config(short_tmp, api, DRA), [backend]):
        await dra_kubelet.wait_for_driver(DRIVER)
        response = await dra_kubelet.prepare(
            DRIVER, [("ns", good["metadata"]["uid"], "good"), ("ns", bad_uid, "bad")]
        )
        assert response.claims[good["metadata"]["uid"]].error == ""
        failed = response.claims[bad_uid]
        assert error in failed.error
        assert f"ns/bad ({bad_uid})" in failed.error
        assert not failed.devices
        assert backend.allocated == [["fpga0"]], "a refused claim runs no backend hook"


async def test_only_our_drivers_devices_are_prepared(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    backend = AllocatingBackend([device("fpga0")])
    mixed = api.add_claim(
        "ns",
        "mixed",
        [*claim_results("fpga0"), *claim_results("gpu0", driver="gpu.other.example")],
    )
    foreign = api.add_claim("ns", "foreign", claim_results("gpu1", driver="gpu.other.example"))
    async with running(dra_config(short_tmp, api, DRA), [backend]):
        await dra_kubelet.wait_for_driver(DRIVER)
        claims = [("ns", c["metadata"]["uid"], c["metadata"]["name"]) for c in (mixed, foreign)]
        response = await dra_kubelet.prepare(DRIVER, claims)
        mixed_entry = response.claims[mixed["metadata"]["uid"]]
        assert [d.device_name for d in mixed_entry.devices] == ["fpga0"]
        foreign_entry = response.claims[foreign["metadata"]["uid"]]
        assert (foreign_entry.error, list(foreign_entry.devices)) == ("", [])
        assert backend.allocated == [["fpga0"]]


async def test_a_kubelet_that_speaks_only_v1beta1(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    claim = api.add_claim("ns", "c", claim_results("fpga0"))
    uid = claim["metadata"]["uid"]
    backend = ScriptedBackend([device("fpga0")])
    async with (
        FakeDraKubelet(short_tmp / "kubelet", services=["v1beta1.DRAPlugin"]) as kubelet,
        running(dra_config(short_tmp, api, DRA), [backend]),
    ):
        client = await kubelet.wait_for_driver(DRIVER)
        assert client.chosen == "v1beta1.DRAPlugin"
        response = await kubelet.prepare(DRIVER, [("ns", uid, "c")])
        assert [d.device_name for d in response.claims[uid].devices] == ["fpga0"]
        assert (await kubelet.unprepare(DRIVER, [("ns", uid, "c")])).claims[uid].error == ""


async def test_a_claim_without_uid_is_an_invalid_request(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    async with running(dra_config(short_tmp, api, DRA), [ScriptedBackend([device("fpga0")])]):
        await dra_kubelet.wait_for_driver(DRIVER)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await dra_kubelet.prepare(DRIVER, [("ns", "uid-1", "a"), ("ns", "", "b")])
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "claims[1]" in (raised.value.details() or "")


async def test_attributes_and_capacity_are_published(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    rich = replace(
        device("fpga0", numa=0),
        attributes={
            "model": "acme-x1",
            "acme.example/firmware": Version("1.4.2"),
            "ecc": True,
            "cores": 64,
        },
        capacity={"memory": "16Gi"},
    )
    bad = replace(device("fpga1"), attributes={"not valid!": 1})
    async with running(dra_config(short_tmp, api, DRA), [ScriptedBackend([rich, bad])]):
        await api.wait_for(lambda: "fpga0" in published(api))
        assert published(api) == {
            "fpga0": {
                "name": "fpga0",
                "attributes": {
                    "acme.example/firmware": {"version": "1.4.2"},
                    "cores": {"int": 64},
                    "ecc": {"bool": True},
                    "model": {"string": "acme-x1"},
                    "numaNode": {"int": 0},
                },
                "capacity": {"memory": {"value": "16Gi"}},
            }
        }


@pytest.mark.parametrize(
    ("namespace", "uid", "name", "error"),
    [
        ("ns", "../../etc/x", "c", "is not a Kubernetes UID"),
        ("ns", "a/b", "c", "is not a Kubernetes UID"),
        ("NS", "uid-1", "c", "is not a namespace name"),
        ("ns", "uid-1", "c/../../nodes/x", "must be a lowercase DNS subdomain"),
        ("", "uid-1", "c", "is not a namespace name"),
    ],
)
async def test_claim_references_are_checked_before_use(
    short_tmp: Path,
    api: ApiServer,
    dra_kubelet: FakeDraKubelet,
    node_name: str,
    namespace: str,
    uid: str,
    name: str,
    error: str,
) -> None:
    config = dra_config(short_tmp, api, DRA)
    async with running(config, [ScriptedBackend([device("fpga0")])]):
        await dra_kubelet.wait_for_driver(DRIVER)
        before = len(api.requests)
        response = await dra_kubelet.prepare(DRIVER, [(namespace, uid, name)])
        assert error in response.claims[uid].error
        assert not [r for r in api.requests[before:] if "resourceclaims" in r.path]
        undone = await dra_kubelet.unprepare(DRIVER, [(namespace, uid, name)])
        assert ("not a Kubernetes UID" in undone.claims[uid].error) is ("UID" in error)
    assert not (short_tmp / "etc").exists()


async def test_metrics_count_claims_slices_and_dra_calls(
    short_tmp: Path, api: ApiServer, dra_kubelet: FakeDraKubelet, node_name: str
) -> None:
    claim = api.add_claim("ns", "c", claim_results("fpga0"))
    uid = claim["metadata"]["uid"]
    backend = ScriptedBackend([device("fpga0"), device("fpga1")])
    async with running(dra_config(short_tmp, api, DRA), [backend]) as daemon:
        await dra_kubelet.wait_for_driver(DRIVER)
        await api.wait_for(lambda: len(published(api)) == 2)
        await dra_kubelet.prepare(DRIVER, [("ns", uid, "c")])
        await asyncio.wait_for(daemon.dra[RESOURCE].driver.publisher.in_sync.wait(), 5)
        text = daemon.metrics.render().decode()
    assert f'nodeplug_dra_prepared_claims{{driver="{DRIVER}"}} 1.0' in text
    assert f'nodeplug_dra_published_devices{{driver="{DRIVER}"}} 2.0' in text
    assert f'nodeplug_dra_slices_in_sync{{driver="{DRIVER}"}} 1.0' in text
    assert f'nodeplug_dra_slice_writes_total{{driver="{DRIVER}",operation="create"}} 1.0' in text
    method = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources"
    assert f'nodeplug_grpc_requests_total{{code="OK",method="{method}"}} 1.0' in text
    assert f'nodeplug_ready{{component="DRA driver {DRIVER}"}} 1.0' in text


async def test_a_kubelet_that_refuses_the_driver_keeps_the_daemon_unready(
    short_tmp: Path, api: ApiServer, node_name: str
) -> None:
    """A 1.31 kubelet speaks only v1alpha4: it refuses the driver, and readiness says so."""
    async with (
        FakeDraKubelet(short_tmp / "kubelet", services=["v1alpha4.Node"]) as kubelet,
        running(dra_config(short_tmp, api, DRA), [ScriptedBackend([device("fpga0")])]) as daemon,
    ):
        await kubelet.wait_for(lambda _: bool(kubelet.refused))
        ((socket, error),) = kubelet.refused
        assert socket == f"{DRIVER}-reg.sock"
        assert "none of the plugin's services" in error
        assert daemon.readiness()[f"DRA driver {DRIVER}"] is False


@pytest.mark.parametrize(
    ("delay", "failure", "error"),
    [
        (0.0, RuntimeError("card busy"), "backend allocate failed: card busy"),
        (5.0, None, "backend allocate did not finish within 0.2s"),
    ],
)
async def test_a_failing_allocate_hook_fails_its_claim_and_records_nothing(
    short_tmp: Path,
    api: ApiServer,
    dra_kubelet: FakeDraKubelet,
    node_name: str,
    delay: float,
    failure: Exception | None,
    error: str,
) -> None:
    backend = AllocatingBackend([device("fpga0")], delay=delay)
    backend.fail_with = failure
    claim = api.add_claim("ns", "c", claim_results("fpga0"))
    uid = claim["metadata"]["uid"]
    config = dra_config(short_tmp, api, {**DRA, "hookTimeout": 0.2})
    async with running(config, [backend]):
        await dra_kubelet.wait_for_driver(DRIVER)
        response = await dra_kubelet.prepare(DRIVER, [("ns", uid, "c")])
        assert error in response.claims[uid].error
        assert not (config.cdi.dir / f"nodeplug_dra-{DRIVER}_{uid}.json").exists()
        assert not (config.state_dir / f"dra-{DRIVER}.json").exists()
