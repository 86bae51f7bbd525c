"""/metrics, /healthz and /readyz over HTTP/1.1, for Prometheus and the kubelet's probes.

Served on the daemon's own event loop, so a stuck loop fails liveness, by h11 (an
HTTP/1.1 state machine: parsing and framing, no I/O of its own) on asyncio streams.
Three GET endpoints do not need a web framework: aiohttp cost the resident daemon
11 MiB of RSS, two default TLS contexts included, for HTTPS it never serves.

/healthz (liveness) answers only after a real gRPC health round trip to each of the
daemon's own sockets: it fails if the event loop is stuck or a socket is gone. /readyz
(readiness) is the kubelet's view: every device plugin registered, the CSI driver
registered with the plugin watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11

from daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from daemon.supervisor import Daemon

log = logging.getLogger(__name__)

# In-flight requests get this long when the daemon stops; the pod has 15 s to stop.
SHUTDOWN_GRACE = 1.0
# A connection with no request for this long is closed (as aiohttp's keep-alive did).
IDLE_TIMEOUT = 75.0
_READ_SIZE = 65536
_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_METHODS = (b"GET", b"HEAD")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - the default of a node agent


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, document: object) -> Answer:
        return cls(status, _JSON, json.dumps(document).encode())

    @classmethod
    def text(cls, status: int, text: str, *headers: tuple[str, str]) -> Answer:
        return cls(status, _TEXT, text.encode(), headers)


class StatusServer:
    def __init__(self, daemon: Daemon, address: str) -> None:
        self.daemon = daemon
        self.host, self.port = split_address(address)
        # The port actually bound (differs from self.port when that is 0).
        self.bound_port: int | None = None
        self._routes: dict[str, Callable[[], Awaitable[Answer]]] = {
            "/metrics": self.metrics,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        # Open connections, and whether each is answering a request right now.
        self._connections: dict[asyncio.Task[None], bool] = {}

    async def run(self) -> None:
        server = await asyncio.start_server(self._serve, self.host, self.port)
        try:
            self.bound_port = server.sockets[0].getsockname()[1]
            log.info(
                "serving /metrics, /healthz, /readyz", extra={"address": f"{self.host}:{self.port}"}
            )
            await server.serve_forever()
        finally:
            server.close()
            await self._close_connections()

    async def _close_connections(self) -> None:
        """Idle connections close now; requests being answered get SHUTDOWN_GRACE."""
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=SHUTDOWN_GRACE)
        left = list(self._connections)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests answered in turn (keep-alive), until either side closes."""
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = False
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next_event(connection, reader)
                if isinstance(event, h11.Request):
                    self._connections[task] = True
                    await self._respond(connection, writer, event)
                    self._connections[task] = False
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    break
                # A request body (Data, EndOfMessage) is read and ignored.
                if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
                    connection.start_next_cycle()
                elif connection.our_state in (h11.MUST_CLOSE, h11.CLOSED):
                    break
        except h11.RemoteProtocolError as error:
            await _refuse(connection, writer, error)
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or stayed silent too long
        finally:
            del self._connections[task]
            writer.close()

    async def _respond(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request
    ) -> None:
        answer = await self._answer(request)
        headers = [
            ("content-type", answer.content_type),
            ("content-length", str(len(answer.body))),
            *answer.headers,
        ]
        writer.write(connection.send(h11.Response(status_code=answer.status, headers=headers)))
        if request.method != b"HEAD":
            writer.write(connection.send(h11.Data(data=answer.body)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()

    async def _answer(self, request: h11.Request) -> Answer:
        path = request.target.partition(b"?")[0].decode("ascii", "replace")
        route = self._routes.get(path)
        if route is None:
            return Answer.text(404, "404: Not Found")
        if request.method not in _METHODS:
            return Answer.text(405, "405: Method Not Allowed", ("allow", "GET, HEAD"))
        try:
            return await route()
        except Exception:
            log.exception("answering an HTTP request failed", extra={"path": path})
            return Answer.text(500, "500: Internal Server Error")

    async def metrics(self) -> Answer:
        return Answer(200, METRICS_CONTENT_TYPE, self.daemon.metrics.render())

    async def healthz(self) -> Answer:
        problems = {k: v for k, v in (await self.daemon.health()).items() if v is not None}
        return Answer.json(503 if problems else 200, {"ok": not problems, "problems": problems})

    async def readyz(self) -> Answer:
        readiness = self.daemon.readiness()
        waiting = sorted(name for name, ready in readiness.items() if not ready)
        body: dict[str, object] = {"ready": not waiting, "waiting_for": waiting}
        if problems := self.daemon.problems():
            body["problems"] = problems
        return Answer.json(503 if waiting else 200, body)


async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event, reading from the client as needed (at most IDLE_TIMEOUT each)."""
    while (event := connection.next_event()) is h11.NEED_DATA:
        async with asyncio.timeout(IDLE_TIMEOUT):
            data = await reader.read(_READ_SIZE)
        connection.receive_data(data)  # b"": the client closed its side
    return event


async def _refuse(
    connection: h11.Connection, writer: asyncio.StreamWriter, error: h11.RemoteProtocolError
) -> None:
    """Answer a request h11 cannot parse (400, 414, 431 as it hints) if still possible."""
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    answer = Answer.text(error.error_status_hint, f"{error.error_status_hint}: {error}")
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("connection", "close"),
    ]
    with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
        writer.write(connection.send(h11.Response(status_code=answer.status, headers=headers)))
        writer.write(connection.send(h11.Data(data=answer.body)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()
