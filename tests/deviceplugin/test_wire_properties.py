"""Hypothesis drives Allocate and GetPreferredAllocation over a real socket.

The daemon runs on its own event loop in a thread for the whole module; the tests are
plain synchronous gRPC clients, so hypothesis can shrink failing requests.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import config as configuration
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

RESOURCE = "example.com/prop"
DEVICES = [f"sim{i}::{r}" for i in range(6) for r in range(2)]
ACCEPTED_CODES = {grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
def plugin_socket() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="np-", dir="/tmp"))
    config = configuration.parse(
        configuration.confined_to(
            {
                "devicePlugins": [
                    {
                        "resourceName": RESOURCE,
                        "backend": "simulated",
                        "config": {"count": 6, "numaNodes": 2},
                        "replicas": 2,
                    }
                ],
            },
            root,
        )
    )
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    endpoint: list[Path] = []

    async def serve() -> None:
        async with FakeKubelet(config.device_plugin_dir) as kubelet:
            task = asyncio.create_task(
                Daemon(config, configuration.create_backends(config)).run(stop)
            )
            await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == len(DEVICES))
            endpoint.append(config.device_plugin_dir / kubelet.client(RESOURCE).endpoint)
            ready.set()
            await task

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout=30), "the daemon did not register"
        yield endpoint[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stub(plugin_socket: Path) -> Iterator[api_pb2_grpc.DevicePluginStub]:
    with grpc.insecure_channel(f"unix:{plugin_socket}") as channel:
        yield api_pb2_grpc.DevicePluginStub(channel)


ids = st.one_of(
    st.sampled_from(DEVICES),
    st.text(max_size=20),
    st.text(min_size=200, max_size=3000),
    st.sampled_from(["", "sim0", "sim0::2", "sim0::-1", "\x00", "sim1::1\n"]),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(ids, max_size=8), max_size=5))
def test_allocate_answers_or_refuses_cleanly(
    stub: api_pb2_grpc.DevicePluginStub, containers: list[list[str]]
) -> None:
    request = api_pb2.AllocateRequest()
    for container in containers:
        request.container_requests.add(devices_ids=container)
    valid = all(c and len(set(c)) == len(c) and set(c) <= set(DEVICES) for c in containers)
    try:
        response = stub.Allocate(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in ACCEPTED_CODES, (error.code(), error.details())
        assert not valid
        assert len(error.details() or "") < 400
        return
    assert valid
    assert len(response.container_responses) == len(containers)
    for container, answer in zip(containers, response.container_responses, strict=True):
        assert answer.envs["NODEPLUG_EXAMPLE_COM_PROP"] == ",".join(container)
        physical = {device_id.split("::")[0] for device_id in container}
        assert answer.envs["NODEPLUG_SIMULATED_DEVICE"] in physical


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(ids, max_size=14),
    st.lists(ids, max_size=4),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
def test_preferred_allocation_answers_or_refuses_cleanly(
    stub: api_pb2_grpc.DevicePluginStub, available: list[str], must: list[str], size: int
) -> None:
    request = api_pb2.PreferredAllocationRequest()
    request.container_requests.add(
        available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
    )
    try:
        response = stub.GetPreferredAllocation(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in ACCEPTED_CODES, (error.code(), error.details())
        return
    (answer,) = response.container_responses
    chosen = list(answer.deviceIDs)
    required = [i for i in dict.fromkeys(must) if i in available]
    assert len(chosen) == size
    assert chosen[: len(required)] == required
    assert set(chosen) <= set(available)
    assert len(set(chosen)) == len(chosen)
