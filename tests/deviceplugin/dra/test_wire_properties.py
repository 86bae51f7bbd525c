"""Hypothesis drives NodePrepareResources and NodeUnprepareResources over a real socket.

A DRA daemon and the API stand-in run on their own event loop in a thread for the whole
module; the tests are plain synchronous gRPC clients, so hypothesis can shrink.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.supervisor import Daemon
from deviceplugin.dra.standin import ApiServer
from deviceplugin.dra.testkit import FakeDraKubelet
from deviceplugin.dra.v1 import api_pb2, api_pb2_grpc
from tests.deviceplugin.backends import ScriptedBackend, device
from tests.deviceplugin.dra.conftest import DRIVER, NODE, RESOURCE, claim_results, dra_config

CLAIM = ("ns", "good")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[tuple[Path, str, Path]]:
    root = Path(tempfile.mkdtemp(prefix="np-", dir="/tmp"))
    old_node = os.environ.get("NODE_NAME")
    os.environ["NODE_NAME"] = NODE
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    found: list[tuple[Path, str, Path]] = []

    async def serve() -> None:
        async with ApiServer() as api, FakeDraKubelet(root / "kubelet") as kubelet:
            api.add_node(NODE)
            claim = api.add_claim(*CLAIM, claim_results("fpga0"))
            config = dra_config(root, api, {"resourceName": RESOURCE, "backend": "x", "api": "dra"})
            task = asyncio.create_task(
                Daemon(config, [ScriptedBackend([device("fpga0")])]).run(stop)
            )
            client = await kubelet.wait_for_driver(DRIVER)
            found.append((Path(client.endpoint), claim["metadata"]["uid"], config.cdi.dir))
            ready.set()
            await task

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(timeout=30), "the DRA driver did not register"
        yield found[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=15)
        loop.close()
        shutil.rmtree(root, ignore_errors=True)
        if old_node is None:
            os.environ.pop("NODE_NAME", None)
        else:
            os.environ["NODE_NAME"] = old_node


texts = st.text(max_size=300)
claims = st.lists(st.tuples(texts, texts, texts), max_size=4)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(claims=claims)
def test_any_claims_get_an_answer_per_uid_and_touch_no_file_outside(
    endpoint: tuple[Path, str, Path], claims: list[tuple[str, str, str]]
) -> None:
    socket, good_uid, cdi_dir = endpoint
    request = api_pb2.NodePrepareResourcesRequest()
    for namespace, uid, name in claims:
        request.claims.add(namespace=namespace, uid=uid, name=name)
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = api_pb2_grpc.DRAPluginStub(channel)
        try:
            response = stub.NodePrepareResources(request, timeout=30)
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert any(not uid for _, uid, _ in claims)
            return
        assert set(response.claims) == {uid for _, uid, _ in claims}
        for namespace, uid, name in claims:
            entry = response.claims[uid]
            if (namespace, uid, name) != (*CLAIM[:1], good_uid, CLAIM[1]):
                assert entry.error or not entry.devices
        undo = api_pb2.NodeUnprepareResourcesRequest(claims=request.claims)
        if all(uid for _, uid, _ in claims):
            undone = stub.NodeUnprepareResources(undo, timeout=30)
            assert set(undone.claims) == {uid for _, uid, _ in claims}
    spec_files = {p.name for p in cdi_dir.glob("*")} if cdi_dir.exists() else set()
    assert spec_files <= {f"nodeplug_dra-{DRIVER}_{good_uid}.json"}
