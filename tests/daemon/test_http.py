"""The status server speaks HTTP/1.1 to real clients, and refuses what it cannot answer."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.http import SHUTDOWN_GRACE, StatusServer
from daemon.supervisor import Daemon
from tests.deviceplugin.backends import ScriptedBackend, device
from tests.deviceplugin.conftest import make_config, running

SPEC = {"resourceName": "acme.example/fpga", "backend": "simulated"}


@pytest.fixture
async def server(short_tmp: Path) -> AsyncIterator[StatusServer]:
    async with running(make_config(short_tmp, SPEC), [ScriptedBackend([device("a")])]) as daemon:
        yield await bound(daemon)


async def bound(daemon: Daemon) -> StatusServer:
    async with asyncio.timeout(5):
        while daemon.status_server is None or daemon.status_server.bound_port is None:  # noqa: ASYNC110 - set when the unit starts
            await asyncio.sleep(0.01)
    return daemon.status_server


def exchange(
    port: int, requests: list[tuple[str, str]], timeout: float = 5.0
) -> list[tuple[int, dict[str, str], bytes]]:
    """The requests on ONE connection (keep-alive), with the standard library's client."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    answers = []
    try:
        for method, path in requests:
            connection.request(method, path)
            response = connection.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            answers.append((response.status, headers, response.read()))
    finally:
        connection.close()
    return answers


async def raw(port: int, data: bytes, *, then_close: bool = False) -> bytes:
    """Send bytes (then end our side if then_close), read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if then_close:
            writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_one_connection_serves_many_requests(server: StatusServer) -> None:
    assert server.bound_port is not None
    answers = await asyncio.to_thread(
        exchange,
        server.bound_port,
        [("GET", "/readyz"), ("GET", "/metrics?x=1"), ("HEAD", "/healthz"), ("GET", "/healthz")],
    )
    (ready, ready_headers, ready_body), metrics, head, health = answers
    assert ready == 503
    assert ready_headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(ready_body)["ready"] is False
    assert metrics[0] == 200
    assert metrics[1]["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE nodeplug_devices gauge" in metrics[2]
    assert (head[0], head[2]) == (200, b""), "HEAD: the headers alone"
    assert int(head[1]["content-length"]) == len(health[2]) > 0
    assert json.loads(health[2]) == {"ok": True, "problems": {}}


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/", 404, None),
        ("GET", "/metrics/", 404, None),
        ("GET", "/../healthz", 404, None),
        ("POST", "/metrics", 405, "GET, HEAD"),
        ("DELETE", "/healthz", 405, "GET, HEAD"),
    ],
)
async def test_unknown_paths_and_methods_are_refused(
    server: StatusServer, method: str, path: str, status: int, allow: str | None
) -> None:
    assert server.bound_port is not None
    ((code, headers, _),) = await asyncio.to_thread(exchange, server.bound_port, [(method, path)])
    assert (code, headers.get("allow")) == (status, allow)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    ],
)
async def test_malformed_requests_get_an_error_and_a_closed_connection(
    server: StatusServer, data: bytes, status: bytes
) -> None:
    assert server.bound_port is not None
    answer = await raw(server.bound_port, data)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"connection: close" in answer.lower()


async def test_a_client_that_closes_early_harms_nothing(server: StatusServer) -> None:
    assert server.bound_port is not None
    answer = await raw(server.bound_port, b"GET /metr", then_close=True)
    assert answer.startswith(b"HTTP/1.1 400")
    ((status, _, _),) = await asyncio.to_thread(exchange, server.bound_port, [("GET", "/healthz")])
    assert status == 200


async def test_a_stuck_event_loop_fails_liveness(server: StatusServer) -> None:
    """The probe gets no answer while the loop is blocked: the kubelet restarts the pod."""
    port = server.bound_port
    assert port is not None
    stuck = threading.Event()

    def probe() -> object:
        stuck.wait()
        return exchange(port, [("GET", "/healthz")], timeout=0.5)

    answer = asyncio.create_task(asyncio.to_thread(probe))
    await asyncio.sleep(0)  # the task hands the probe to a thread
    stuck.set()
    time.sleep(1.0)  # noqa: ASYNC251 - the point: the event loop is stuck
    with pytest.raises(TimeoutError):
        await answer


async def test_stopping_closes_idle_connections_at_once(short_tmp: Path) -> None:
    """A kept-alive connection does not hold the daemon's stop for its idle timeout."""
    async with running(make_config(short_tmp, SPEC), [ScriptedBackend([device("a")])]) as daemon:
        server = await bound(daemon)
        assert server.bound_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        started = time.monotonic()
    assert time.monotonic() - started < SHUTDOWN_GRACE
    async with asyncio.timeout(1):
        await reader.read()  # the rest of the answer, then the server's close
    assert reader.at_eof()
    writer.close()
