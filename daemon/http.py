"""/metrics, /healthz and /readyz over HTTP (aiohttp), for Prometheus and the kubelet's probes.

/healthz (liveness) answers only after a real gRPC health round trip to each of the
daemon's own sockets: it fails if the event loop is stuck or a socket is gone. /readyz
(readiness) is the kubelet's view: every device plugin registered, the CSI driver
registered with the plugin watcher.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from daemon.supervisor import Daemon

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 1.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - the default of a node agent


class StatusServer:
    def __init__(self, daemon: Daemon, address: str) -> None:
        self.daemon = daemon
        self.host, self.port = split_address(address)
        # The port actually bound (differs from self.port when that is 0).
        self.bound_port: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def run(self) -> None:
        # aiohttp waits 60 s for open connections by default; the pod has 15 s to stop.
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.bound_port = runner.addresses[0][1]
            log.info(
                "serving /metrics, /healthz, /readyz", extra={"address": f"{self.host}:{self.port}"}
            )
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.daemon.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        problems = {k: v for k, v in (await self.daemon.health()).items() if v is not None}
        status = 503 if problems else 200
        return web.json_response({"ok": not problems, "problems": problems}, status=status)

    async def readyz(self, request: web.Request) -> web.Response:
        readiness = self.daemon.readiness()
        waiting = sorted(name for name, ready in readiness.items() if not ready)
        status = 503 if waiting else 200
        body: dict[str, object] = {"ready": not waiting, "waiting_for": waiting}
        if problems := self.daemon.problems():
            body["problems"] = problems
        return web.json_response(body, status=status)
