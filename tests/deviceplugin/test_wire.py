"""The daemon against a simulated kubelet, over real Unix sockets and the real v1beta1 protos."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
from pathlib import Path

import grpc
import pytest

from deviceplugin.backend import Device
from deviceplugin.testkit import AdmissionError, FakeKubelet
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc
from tests.deviceplugin.backends import AllocatingBackend, CheckedBackend, ScriptedBackend, device
from tests.deviceplugin.conftest import make_config, running

RESOURCE = "acme.example/fpga"
SPEC = {"resourceName": RESOURCE, "backend": "simulated"}


async def registered(
    kubelet: FakeKubelet, resource: str = RESOURCE, count: int | None = None
) -> dict[str, api_pb2.Device]:
    return await kubelet.wait_for_devices(
        resource, lambda devices: count is None or len(devices) == count
    )


async def test_registration_follows_the_kubelet_contract(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    config = make_config(short_tmp, SPEC)
    async with running(config, [ScriptedBackend([device("fpga0")])]) as daemon:
        await registered(kubelet, count=1)
        (request,) = kubelet.register_requests
        assert request.version == "v1beta1"
        assert request.resource_name == RESOURCE
        socket = config.device_plugin_dir / request.endpoint
        assert "/" not in request.endpoint
        assert stat.S_ISSOCK(socket.lstat().st_mode)
        assert stat.S_IMODE(socket.lstat().st_mode) == 0o600
        # The kubelet reads options from GetDevicePluginOptions; both must agree.
        assert kubelet.client(RESOURCE).options == request.options
        assert request.options.get_preferred_allocation_available
        assert not request.options.pre_start_required
        assert daemon.ready
    assert not socket.exists(), "the daemon must remove its socket when it stops"


async def test_list_and_watch_sends_full_list_with_health_and_numa(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    backend = ScriptedBackend(
        [device("a", numa=0), device("b", numa=1, healthy=False), device("c")]
    )
    async with running(make_config(short_tmp, SPEC), [backend]):
        devices = await registered(kubelet, count=3)
        assert {i: d.health for i, d in devices.items()} == {
            "a": "Healthy",
            "b": "Unhealthy",
            "c": "Healthy",
        }
        assert [n.ID for n in devices["b"].topology.nodes] == [1]
        assert not devices["c"].HasField("topology")


async def test_health_recovers_and_removed_devices_vanish(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    backend = ScriptedBackend([device("a"), device("b")])
    async with running(make_config(short_tmp, SPEC), [backend]):
        await registered(kubelet, count=2)
        backend.publish([device("a", healthy=False), device("b")])
        await kubelet.wait_for_devices(RESOURCE, lambda d: d["a"].health == "Unhealthy")
        backend.publish([device("b")])
        await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {"b"})
        backend.publish([device("a"), device("b")])
        devices = await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {"a", "b"})
        assert devices["a"].health == "Healthy"


async def test_every_stream_gets_every_update(short_tmp: Path, kubelet: FakeKubelet) -> None:
    config = make_config(short_tmp, SPEC)
    backend = ScriptedBackend([device("a")])
    async with running(config, [backend]):
        await registered(kubelet, count=1)
        socket = config.device_plugin_dir / kubelet.client(RESOURCE).endpoint
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            stub = api_pb2_grpc.DevicePluginStub(channel)
            streams = [stub.ListAndWatch(api_pb2.Empty()) for _ in range(3)]
            for stream in streams:
                first = await stream.read()
                assert isinstance(first, api_pb2.ListAndWatchResponse)
                assert [d.ID for d in first.devices] == ["a"]
            backend.publish([device("a"), device("b")])
            for stream in streams:
                update = await asyncio.wait_for(stream.read(), timeout=5)
                assert isinstance(update, api_pb2.ListAndWatchResponse)
                assert sorted(d.ID for d in update.devices) == ["a", "b"]
            for stream in streams:
                stream.cancel()
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)


async def test_allocate_answers_each_container_in_order(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    backend = ScriptedBackend([device(f"fpga{i}") for i in range(4)])
    async with running(make_config(short_tmp, SPEC), [backend]):
        await registered(kubelet, count=4)
        response = await kubelet.allocate(RESOURCE, [["fpga2"], ["fpga0", "fpga3"]])
        first, second = response.container_responses
        assert [d.host_path for d in first.devices] == ["/dev/fpga2"]
        assert [(d.host_path, d.container_path, d.permissions) for d in second.devices] == [
            ("/dev/fpga0", "/dev/fpga0", "rw"),
            ("/dev/fpga3", "/dev/fpga3", "rw"),
        ]
        assert first.envs["NODEPLUG_ACME_EXAMPLE_FPGA"] == "fpga2"
        assert second.envs["NODEPLUG_ACME_EXAMPLE_FPGA"] == "fpga0,fpga3"
        assert [c.name for c in second.cdi_devices] == [
            "acme.example/fpga=fpga0",
            "acme.example/fpga=fpga3",
        ]
        # Both devices mount their library at the same container path: the last one wins once.
        assert [(m.host_path, m.read_only) for m in second.mounts] == [("/opt/fpga3/lib", True)]


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["fpga0", "nope"], "unknown device 'nope'"),
        (["fpga0", "fpga0"], "lists device 'fpga0' more than once"),
        ([], "is empty"),
        (["sick"], "device 'sick' is unhealthy"),
        (["x" * 5000], "unknown device 'xxxx"),
    ],
)
async def test_allocate_rejects_bad_ids(
    short_tmp: Path, kubelet: FakeKubelet, ids: list[str], message: str
) -> None:
    backend = AllocatingBackend([device("fpga0"), device("sick", healthy=False)])
    async with running(make_config(short_tmp, SPEC), [backend]):
        await registered(kubelet, count=2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.allocate(RESOURCE, [["fpga0"], ids])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or "")
        assert len(caught.value.details() or "") < 300
        assert backend.allocated == [], "no container may be half-allocated"


async def test_allocator_hook_adds_edits_and_prestart_is_required(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    backend = AllocatingBackend([device("fpga0"), device("fpga1")])
    async with running(make_config(short_tmp, SPEC), [backend]):
        await registered(kubelet, count=2)
        assert kubelet.client(RESOURCE).options.pre_start_required
        container = await kubelet.admit(RESOURCE, 2)
        assert container.envs["ACME_SESSION"] == "fpga0+fpga1"
        assert container.annotations["acme.example/session"] == "1"
        assert "/var/run/acme" in [m.container_path for m in container.mounts]
        assert backend.allocated == [["fpga0", "fpga1"]]
        assert backend.pre_started == [["fpga0", "fpga1"]]


@pytest.mark.parametrize(
    ("failure", "code", "message"),
    [
        (None, grpc.StatusCode.DEADLINE_EXCEEDED, "did not finish within 0.2s"),
        (RuntimeError("bitstream missing"), grpc.StatusCode.INTERNAL, "bitstream missing"),
    ],
)
async def test_allocator_hook_failures_are_bounded_errors(
    short_tmp: Path,
    kubelet: FakeKubelet,
    failure: Exception | None,
    code: grpc.StatusCode,
    message: str,
) -> None:
    backend = AllocatingBackend([device("fpga0")], delay=5.0 if failure is None else 0.0)
    backend.fail_with = failure
    config = make_config(short_tmp, {**SPEC, "hookTimeout": 0.2})
    async with running(config, [backend]):
        await registered(kubelet, count=1)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.allocate(RESOURCE, [["fpga0"]])
        assert time.monotonic() - started < 2
        assert caught.value.code() == code
        assert message in (caught.value.details() or "")


async def test_pre_start_is_cut_before_the_kubelets_deadline(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kubelet gives PreStartContainer 30 s whatever hookTimeout says (here 300 s):
    the hook must be cut in time for the kubelet to hear why, not run on unheard."""
    backend = AllocatingBackend([device("fpga0")], delay=60.0)
    config = make_config(short_tmp, {**SPEC, "hookTimeout": 300})
    async with (
        FakeKubelet(config.device_plugin_dir, pre_start_timeout=0.5) as kubelet,
        running(config, [backend]),
    ):
        await registered(kubelet, count=1)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.pre_start(RESOURCE, ["fpga0"])
        assert time.monotonic() - started < 0.5
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "backend pre_start did not finish within 0.4" in (caught.value.details() or "")
        assert "before the caller's deadline" in (caught.value.details() or "")
        await asyncio.wait_for(backend.pre_start_cancelled.wait(), 5)
    assert "longer than the kubelet's PreStartContainer timeout" in caplog.text


async def test_the_kubelet_gives_pre_start_thirty_seconds(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    backend = AllocatingBackend([device("fpga0")], delay=0.3)
    async with running(make_config(short_tmp, {**SPEC, "hookTimeout": 300}), [backend]):
        await registered(kubelet, count=1)
        assert kubelet.pre_start_timeout == 30.0
        await kubelet.pre_start(RESOURCE, ["fpga0"])
        assert backend.pre_started == [["fpga0"]]


async def test_preferred_allocation_over_the_wire(short_tmp: Path, kubelet: FakeKubelet) -> None:
    backend = ScriptedBackend([device(f"d{i}", numa=i % 2) for i in range(6)])
    async with running(make_config(short_tmp, SPEC), [backend]):
        devices = await registered(kubelet, count=6)
        chosen = await kubelet.preferred_allocation(RESOURCE, sorted(devices), ["d1"], 3)
        assert chosen[0] == "d1"
        assert len(chosen) == 3
        assert {int(c[1:]) % 2 for c in chosen} == {1}, "one NUMA node, the must_include's"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await kubelet.preferred_allocation(RESOURCE, ["d0"], [], 2)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("left", "count", "expected"),
    [
        # The kubelet still offers "a"; a pod that fits on what is left gets it.
        (["b", "c"], 2, {"/dev/b", "/dev/c"}),
        (["b", "c"], 1, {"/dev/b"}),
        # A pod that does not fit any more fails, as it would have a moment later.
        (["c"], 2, None),
    ],
)
async def test_a_device_removed_just_before_admission_fails_no_pod_that_fits(
    short_tmp: Path, kubelet: FakeKubelet, left: list[str], count: int, expected: set[str] | None
) -> None:
    backend = ScriptedBackend([device("a"), device("b"), device("c")])
    async with running(make_config(short_tmp, SPEC), [backend]) as daemon:
        await registered(kubelet, count=3)
        state = daemon.plugins[RESOURCE].state
        async with kubelet.updates_held():
            version = state.version
            backend.publish([device(i) for i in left])
            await state.wait_newer(version)
            assert sorted(kubelet.client(RESOURCE).devices) == ["a", "b", "c"]
            if expected is None:
                with pytest.raises(AdmissionError, match=r"Allocate rpc failed .*unknown device"):
                    await kubelet.admit(RESOURCE, count)
                return
            container = await kubelet.admit(RESOURCE, count)
        assert {d.host_path for d in container.devices} == expected


async def test_replicas_share_a_device(short_tmp: Path, kubelet: FakeKubelet) -> None:
    config = make_config(short_tmp, {**SPEC, "replicas": 3})
    async with running(config, [ScriptedBackend([device("a"), device("b")])]):
        devices = await registered(kubelet, count=6)
        assert sorted(devices) == ["a::0", "a::1", "a::2", "b::0", "b::1", "b::2"]
        first = await kubelet.admit(RESOURCE, 1)
        second = await kubelet.admit(RESOURCE, 1)
        hosts = {d.host_path for d in (*first.devices, *second.devices)}
        assert hosts == {"/dev/a", "/dev/b"}, "spread puts consecutive pods on different devices"
        both = await kubelet.allocate(RESOURCE, [["a::1", "a::2"]])
        assert [d.host_path for d in both.container_responses[0].devices] == ["/dev/a"]


async def test_health_checker_marks_and_recovers(short_tmp: Path, kubelet: FakeKubelet) -> None:
    backend = CheckedBackend([device("a"), device("b")])
    async with running(make_config(short_tmp, SPEC), [backend]):
        await registered(kubelet, count=2)
        backend.health["a"] = False
        await kubelet.wait_for_devices(RESOURCE, lambda d: d["a"].health == "Unhealthy")
        backend.health["a"] = True
        await kubelet.wait_for_devices(RESOURCE, lambda d: d["a"].health == "Healthy")


async def test_kubelet_restart_means_register_again_within_a_second(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    config = make_config(short_tmp, SPEC)
    async with running(config, [ScriptedBackend([device("a")])]) as daemon:
        await registered(kubelet, count=1)
        for restart in range(3):
            started = time.monotonic()
            await kubelet.restart()  # removes every socket, ours included
            await registered(kubelet, count=1)
            assert time.monotonic() - started < 1.0
            assert len(kubelet.register_requests) == restart + 2
        assert daemon.plugins[RESOURCE].stats.socket_recreations == 3


async def test_a_new_kubelet_is_dialled_fresh_without_the_old_ones_back_off(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    """systemd restarts a kubelet by killing it: its kubelet.sock stays behind and
    refuses every dial until the new kubelet serves a new one. The dials that failed
    meanwhile must not delay the registration with the new kubelet. grpc keeps one
    subchannel per target for the whole process, with a reconnect back-off (1 s, then
    growing); while any channel to kubelet.sock holds it (here one opened by the test,
    on a node another resource's dial in flight) a new channel inherits the back-off
    and fails without dialing."""
    config = make_config(short_tmp, SPEC)
    async with running(config, [ScriptedBackend([device("a")])]) as daemon:
        await registered(kubelet, count=1)
        async with grpc.aio.insecure_channel(f"unix:{kubelet.socket}") as other:
            for restart in range(3):
                await kubelet.stop(killed=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(other.channel_ready(), 0.05)  # refused
                await asyncio.sleep(0.2)  # the kubelet starting; every dial fails
                started = time.monotonic()
                await kubelet.start(clean=True)
                await registered(kubelet, count=1)
                assert time.monotonic() - started < 0.5, f"restart {restart}"
        assert daemon.plugins[RESOURCE].stats.register_failures >= 3


async def test_own_socket_removed_is_recreated(short_tmp: Path, kubelet: FakeKubelet) -> None:
    config = make_config(short_tmp, SPEC)
    async with running(config, [ScriptedBackend([device("a")])]):
        await registered(kubelet, count=1)
        first = kubelet.client(RESOURCE)
        socket = config.device_plugin_dir / first.endpoint
        socket.unlink()
        await kubelet.wait_for(
            lambda c: c.get(RESOURCE) not in (None, first) and c[RESOURCE].updates > 0
        )
        assert socket.exists() and len(kubelet.register_requests) == 2
        response = await kubelet.allocate(RESOURCE, [["a"]])
        assert response.container_responses[0].devices[0].host_path == "/dev/a"


async def test_broken_stream_means_register_again(short_tmp: Path, kubelet: FakeKubelet) -> None:
    async with running(make_config(short_tmp, SPEC), [ScriptedBackend([device("a")])]):
        await registered(kubelet, count=1)
        await kubelet.drop_stream(RESOURCE)
        await registered(kubelet, count=1)
        assert len(kubelet.register_requests) == 2


async def test_waits_for_a_kubelet_that_is_not_there_yet(short_tmp: Path) -> None:
    config = make_config(short_tmp, SPEC)
    async with running(config, [ScriptedBackend([device("a")])]) as daemon:
        await asyncio.sleep(0.2)
        assert not daemon.ready
        async with FakeKubelet(config.device_plugin_dir) as kubelet:
            await registered(kubelet, count=1)
            assert daemon.ready


async def test_kubelet_refusal_is_retried(short_tmp: Path, kubelet: FakeKubelet) -> None:
    config = make_config(short_tmp, SPEC)
    backend: ScriptedBackend = ScriptedBackend([Device(id="a")])
    async with running(config, [backend]) as daemon:
        await registered(kubelet, count=1)
        await kubelet.stop()  # the kubelet dies, leaving its socket file behind
        await asyncio.sleep(0.3)  # the plugin's retries hit a dead socket meanwhile
        await kubelet.start(clean=True)
        await registered(kubelet, count=1)
        assert daemon.ready
