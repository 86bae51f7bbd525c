"""Running it in a cluster: metrics, health, readiness, request ids, CDI specs, NFD file."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from daemon import logs
from daemon.supervisor import Daemon
from deviceplugin.backend import Device, DeviceNode, Mount
from deviceplugin.testkit import FakeKubelet
from deviceplugin.testruntime import parse_version, spec_problem
from tests.deviceplugin.backends import ScriptedBackend, device
from tests.deviceplugin.conftest import make_config, running

RESOURCE = "acme.example/fpga"
SPEC = {"resourceName": RESOURCE, "backend": "simulated"}


async def get(daemon: Daemon, path: str) -> tuple[int, str]:
    await eventually(
        lambda: daemon.status_server is not None and daemon.status_server.bound_port is not None
    )
    assert daemon.status_server is not None
    url = f"http://127.0.0.1:{daemon.status_server.bound_port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition on files (nothing else tells us when they change)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - files have no event to await
            await asyncio.sleep(0.01)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


async def test_metrics_count_devices_rpcs_and_restarts(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    backend = ScriptedBackend([device("a"), device("b", healthy=False)])
    async with running(make_config(short_tmp, SPEC), [backend]) as daemon:
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
        await kubelet.allocate(RESOURCE, [["a"]])
        with pytest.raises(grpc.aio.AioRpcError):
            await kubelet.allocate(RESOURCE, [["nope"]])
        await kubelet.restart()
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
        status, text = await get(daemon, "/metrics")
    assert status == 200
    values = samples(text)
    allocate = "/v1beta1.DevicePlugin/Allocate"
    assert values[("nodeplug_grpc_requests_total", (("code", "OK"), ("method", allocate)))] == 1
    assert (
        values[
            ("nodeplug_grpc_requests_total", (("code", "INVALID_ARGUMENT"), ("method", allocate)))
        ]
        == 1
    )
    assert values[("nodeplug_grpc_request_duration_seconds_count", (("method", allocate),))] == 2
    assert values[("nodeplug_devices", (("health", "Healthy"), ("resource", RESOURCE)))] == 1
    assert values[("nodeplug_devices", (("health", "Unhealthy"), ("resource", RESOURCE)))] == 1
    assert values[("nodeplug_device_plugin_registrations_total", (("resource", RESOURCE),))] == 2
    assert values[("nodeplug_kubelet_restarts_seen_total", ())] == 1
    assert values[("nodeplug_ready", (("component", f"device plugin {RESOURCE}"),))] == 1


async def test_readyz_follows_registration_and_healthz_does_round_trips(short_tmp: Path) -> None:
    config = make_config(short_tmp, SPEC)
    async with running(config, [ScriptedBackend([device("a")])]) as daemon:
        status, body = await get(daemon, "/readyz")
        assert status == 503
        assert json.loads(body)["waiting_for"] == [
            f"device plugin {RESOURCE}",
            f"kubelet ({config.device_plugin_dir / 'kubelet.sock'})",
        ]
        async with FakeKubelet(config.device_plugin_dir) as kubelet:
            await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 1)
            status, body = await get(daemon, "/readyz")
            assert (status, json.loads(body)) == (200, {"ready": True, "waiting_for": []})
            status, body = await get(daemon, "/healthz")
            assert (status, json.loads(body)["ok"]) == (200, True)
            # A socket that answers nothing makes liveness fail, naming it.
            gone = short_tmp / "gone.sock"
            real = daemon.own_sockets
            daemon.own_sockets = lambda: [*real(), gone]  # type: ignore[method-assign]
            status, body = await get(daemon, "/healthz")
            assert status == 503
            assert list(json.loads(body)["problems"]) == [str(gone)]


async def test_waiting_for_the_kubelet_is_said_once_and_where(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(short_tmp, SPEC, {**SPEC, "resourceName": "acme.example/dsp"})
    socket = config.device_plugin_dir / "kubelet.sock"

    def waiting() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.getMessage().startswith("waiting for the kubelet")
            and getattr(r, "socket", None) == str(socket)
            and r.levelno == logging.INFO
        ]

    async with running(config, [ScriptedBackend([device("a")]), ScriptedBackend()]) as daemon:
        async with asyncio.timeout(5):
            while daemon.watcher is None:  # noqa: ASYNC110 - made once the daemon task runs
                await asyncio.sleep(0)
            await daemon.watcher.ready.wait()
        assert waiting() == ["waiting for the kubelet: no kubelet.sock yet"]
        async with FakeKubelet(config.device_plugin_dir) as kubelet:
            await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 1)
            assert len(waiting()) == 1
            events = daemon.watcher.subscribe()
            await kubelet.stop()  # the kubelet's listener removes kubelet.sock
            while (await events.get()).name != "kubelet.sock":
                pass
            daemon.watcher.unsubscribe(events)
        assert waiting() == [
            "waiting for the kubelet: no kubelet.sock yet",
            "waiting for the kubelet: kubelet.sock removed",
        ]


async def test_a_backend_still_discovering_is_unready_but_alive(short_tmp: Path) -> None:
    class Silent(ScriptedBackend):
        def __init__(self) -> None:
            super().__init__()
            self._snapshots.get_nowait()  # no first list: discovery still running

    async with running(make_config(short_tmp, SPEC), [Silent()]) as daemon:
        status, _ = await get(daemon, "/readyz")
        assert status == 503
        status, body = await get(daemon, "/healthz")
        assert (status, json.loads(body)) == (200, {"ok": True, "problems": {}})


async def test_every_socket_serves_grpc_health(short_tmp: Path, kubelet: FakeKubelet) -> None:
    async with running(make_config(short_tmp, SPEC), [ScriptedBackend([device("a")])]) as daemon:
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 1)
        (socket,) = daemon.own_sockets()
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            response = await check(health_pb2.HealthCheckRequest())
        assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The daemon's real log configuration, writing JSON lines into a buffer."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("json", "debug")
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    try:
        yield buffer
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


async def test_log_lines_of_a_call_carry_its_request_id(
    short_tmp: Path, kubelet: FakeKubelet, json_log: io.StringIO
) -> None:
    async with running(make_config(short_tmp, SPEC), [ScriptedBackend([device("a")])]):
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 1)
        await kubelet.allocate(RESOURCE, [["a"]])
    entries = [json.loads(line) for line in json_log.getvalue().splitlines()]
    (allocated,) = [e for e in entries if e["msg"] == "allocated"]
    assert re.fullmatch(r"[0-9a-f]{8}", allocated["request_id"])
    assert allocated["devices"] == ["a"]
    assert all("request_id" not in e for e in entries if e["msg"] == "registered with the kubelet")


def check_cdi_spec(document: dict[str, object]) -> None:
    """A CDI spec the runtimes' parsers take: the fields they know, at the lowest version."""
    assert set(document) <= {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
    version = parse_version(str(document["cdiVersion"]))
    assert spec_problem(document, version) is None
    assert spec_problem(document, (0, version[1] - 1, 0)) is not None or version == (0, 3, 0)
    vendor, _, klass = str(document["kind"]).partition("/")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", vendor)
    assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", klass)
    devices = document["devices"]
    assert isinstance(devices, list)
    for entry in devices:
        assert set(entry) <= {"name", "annotations", "containerEdits"}
        assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?", entry["name"])
        edits = entry["containerEdits"]
        assert set(edits) <= {"env", "deviceNodes", "mounts", "hooks", "additionalGids", "intelRdt"}
        assert all(re.fullmatch(r"[^=]+=.*", e) for e in edits.get("env", []))
        for node in edits.get("deviceNodes", []):
            assert node["path"].startswith("/") and node.get("hostPath", "/").startswith("/")
            assert set(node["permissions"]) <= set("rwm")
        for mount in edits.get("mounts", []):
            assert mount["hostPath"].startswith("/") and mount["containerPath"].startswith("/")
            assert "rbind" in mount["options"] or "bind" in mount["options"]


async def test_cdi_specs_are_written_named_and_cleaned(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    config = make_config(short_tmp, {**SPEC, "cdi": True})
    stale = config.cdi.dir / "nodeplug-old.example-gone.json"
    foreign = config.cdi.dir / "vendor.example-gpu.json"
    config.cdi.dir.mkdir(parents=True)
    stale.write_text("{}")
    foreign.write_text("{}")
    nodes = (DeviceNode("/dev/acme0", "/dev/fpga0", "rw"),)
    fpga = Device(
        "fpga0",
        device_nodes=nodes,
        mounts=(Mount("/opt/acme", "/opt/acme", True),),
        envs={"A": "1"},
    )
    backend = ScriptedBackend([fpga, Device("fpga1")])
    async with running(config, [backend]):
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
        spec_path = config.cdi.dir / "nodeplug-acme.example-fpga.json"
        document = json.loads(spec_path.read_text())
        check_cdi_spec(document)
        assert document["kind"] == RESOURCE
        assert [d["name"] for d in document["devices"]] == ["fpga0", "fpga1"]
        edits = document["devices"][0]["containerEdits"]
        assert edits["deviceNodes"] == [
            {"path": "/dev/fpga0", "hostPath": "/dev/acme0", "permissions": "rw"}
        ]
        assert edits["env"] == ["A=1"]
        assert not stale.exists(), "specs of resources no longer configured are removed"
        assert foreign.exists(), "other vendors' specs are never touched"

        container = (await kubelet.allocate(RESOURCE, [["fpga0"]])).container_responses[0]
        assert [c.name for c in container.cdi_devices] == ["acme.example/fpga=fpga0"]
        assert list(container.devices) == [] and list(container.mounts) == []

        backend.publish([Device("fpga1")])
        await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {"fpga1"})
        assert [d["name"] for d in json.loads(spec_path.read_text())["devices"]] == ["fpga1"]


async def test_node_feature_file_follows_devices(short_tmp: Path, kubelet: FakeKubelet) -> None:
    config = make_config(short_tmp, SPEC)
    assert config.node_features.file is not None
    features = config.node_features.file
    backend = ScriptedBackend([device("a"), device("b"), device("c", healthy=False)])
    async with running(config, [backend]):
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 3)
        await eventually(lambda: features.exists() and "=2" in features.read_text())
        lines = [line for line in features.read_text().splitlines() if not line.startswith("#")]
        assert lines == ["nodeplug-resource-acme.example.fpga=2"]
        for line in lines:
            name, value = line.split("=")
            assert re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,61}[A-Za-z0-9]", name)
            assert re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,61}[A-Za-z0-9]|[A-Za-z0-9]", value)
        backend.publish([device("a")])
        await eventually(lambda: "fpga=1\n" in features.read_text())
