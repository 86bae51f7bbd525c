"""One extended resource end to end: backend -> state -> socket -> kubelet registration.

The plugin keeps three facts true, re-checking them on every inotify event:
  1. its gRPC server listens on its own socket (recreated if the socket vanished);
  2. it is registered with the kubelet (again after a kubelet restart, a new socket,
     or a ListAndWatch stream that broke, since the kubelet never dials back by itself);
  3. the kubelet's streams carry the backend's latest snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from deviceplugin.backend import Backend, Device, HealthChecker
from deviceplugin.cdi import CdiSpecWriter
from deviceplugin.feed import check_health, follow_backend
from deviceplugin.servicer import DevicePluginServicer, ServiceSettings
from deviceplugin.socketdir import KUBELET_SOCKET, SocketDirWatcher, SocketEvent
from deviceplugin.state import DeviceState
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
# The kubelet dials the plugin back (up to 10 s) before it answers Register.
REGISTER_TIMEOUT = 15.0
RETRY_FIRST = 0.05
RETRY_MAX = 5.0
SHUTDOWN_GRACE = 1.0
# A new kubelet.sock is a new kubelet: dial it fresh. grpc keeps subchannels (and their
# reconnect back-off, 1 s growing to 120 s) in a process-wide pool keyed by target, so
# a new channel to the same path would inherit the back-off of the dials that failed
# while the old kubelet was gone, and fail at once without dialing.
_REGISTER_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


class SocketServing(Protocol):
    """How the plugin gets a gRPC server on a Unix socket (the daemon provides it)."""

    async def serve(
        self, path: Path, add_services: Callable[[grpc.aio.Server], None]
    ) -> grpc.aio.Server: ...

    async def stop(self, server: grpc.aio.Server, path: Path, grace: float | None) -> None: ...

    def is_socket(self, path: Path) -> bool: ...


@dataclass(frozen=True, slots=True)
class PluginWatcherMode:
    """Register through the kubelet's plugin watcher instead of Registration.Register.

    The plugin's socket then lives in plugins_registry/ and also serves the
    pluginregistration service (added by `add_services`): creating the socket is
    registering, and the kubelet's verdict arrives through NotifyRegistrationStatus.
    """

    add_services: Callable[[grpc.aio.Server], None]


@dataclass(slots=True)
class PluginStats:
    registrations: int = 0
    register_failures: int = 0
    kubelet_restarts_seen: int = 0
    socket_recreations: int = 0


class ResourcePlugin:
    def __init__(
        self,
        settings: ServiceSettings,
        backend: Backend,
        watcher: SocketDirWatcher,
        sockets: SocketServing,
        socket_name: str,
        replicas: int = 1,
        cdi: CdiSpecWriter | None = None,
        on_change: Callable[[], None] | None = None,
        plugin_watcher: PluginWatcherMode | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.state = DeviceState(replicas)
        self.servicer = DevicePluginServicer(settings, self.state, backend, self._stream_ended)
        self.socket_path = watcher.directory / socket_name
        self.kubelet_socket = watcher.directory / KUBELET_SOCKET
        self.registered = asyncio.Event()
        self.stats = PluginStats()
        self._watcher = watcher
        self._sockets = sockets
        self._cdi = cdi
        self._on_change = on_change
        self._plugin_watcher = plugin_watcher
        self._fresh_socket = False
        self._server: grpc.aio.Server | None = None
        # Replaced servers still shutting down, awaited when the plugin stops.
        self._retiring: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._need_register = True
        self._first_snapshot = asyncio.Event()
        self._last_register_started = 0.0
        self._not_before = 0.0
        self._quick_stream_losses = 0
        self._register_failures = 0
        # Streams of a server we stopped end because of us, not because the kubelet left.
        self._ignore_streams_before = 0.0

    @property
    def resource_name(self) -> str:
        return self.settings.resource_name

    @property
    def serving(self) -> bool:
        """A server is up (the socket is made only once the backend's first list arrived)."""
        return self._server is not None

    async def run(self) -> None:
        events = self._watcher.subscribe()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._follow_backend())
                if isinstance(self.backend, HealthChecker):
                    tasks.create_task(self._check_health(self.backend))
                tasks.create_task(self._follow_socket_dir(events))
                tasks.create_task(self._keep_registered())
        finally:
            self._watcher.unsubscribe(events)
            self.registered.clear()
            self._ignore_streams_before = float("inf")
            self.state.close()
            await self._stop_server(SHUTDOWN_GRACE)
            await asyncio.gather(*self._retiring)

    async def _follow_backend(self) -> None:
        await follow_backend(
            self.backend,
            self.state,
            self.resource_name,
            self._first_snapshot,
            self._write_cdi if self._cdi is not None else None,
            self._on_change,
        )

    async def _write_cdi(self, snapshot: Sequence[Device]) -> None:
        # Before the kubelet hears of a device, the runtime must be able to find it.
        assert self._cdi is not None
        await asyncio.to_thread(self._cdi.write, snapshot)

    async def _check_health(self, checker: HealthChecker) -> None:
        await check_health(
            checker, self.state, self.resource_name, self._first_snapshot, self._on_change
        )

    async def _follow_socket_dir(self, events: asyncio.Queue[SocketEvent]) -> None:
        while True:
            event = await events.get()
            if event.name is None or (event.name == KUBELET_SOCKET and event.created):
                if event.name == KUBELET_SOCKET:
                    self.stats.kubelet_restarts_seen += 1
                    log.info("kubelet (re)started", extra={"resource": self.resource_name})
                # A new kubelet deserves an answer now, whatever the last one did to
                # streams or to our dials: no back-off carried over.
                self._not_before = 0.0
                self._quick_stream_losses = 0
                self._register_failures = 0
                self._need_register = True
                self._wake.set()
            elif event.name == self.socket_path.name and not event.created:
                self._wake.set()

    def _stream_ended(self, started: float) -> None:
        """A ListAndWatch stream ended: if it was the kubelet's current one, register again.

        The kubelet never re-opens a broken stream by itself. Streams of an earlier
        registration end as expected, and a kubelet that drops every stream at once
        is answered with growing delays rather than a tight loop.
        """
        if started < max(self._last_register_started, self._ignore_streams_before):
            return
        if self.servicer.active_streams > 0:
            return
        if time.monotonic() - started < 1.0:
            self._quick_stream_losses += 1
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (self._quick_stream_losses - 1))
            self._not_before = time.monotonic() + delay
        else:
            self._quick_stream_losses = 0
        log.warning(
            "the kubelet's ListAndWatch stream ended", extra={"resource": self.resource_name}
        )
        self.registered.clear()
        self._need_register = True
        self._wake.set()

    async def _keep_registered(self) -> None:
        await self._watcher.ready.wait()
        await self._first_snapshot.wait()
        while True:
            self._wake.clear()
            if self._server is None or not self._sockets.is_socket(self.socket_path):
                await self._restart_server()
            if self._need_register and self._plugin_watcher is not None:
                await self._register_by_socket()
            elif self._need_register and self._sockets.is_socket(self.kubelet_socket):
                wait = self._not_before - time.monotonic()
                if wait > 0:
                    await self._sleep_unless_woken(wait)
                    continue
                try:
                    await self._register()
                except grpc.aio.AioRpcError as error:
                    self._register_failures += 1
                    self.stats.register_failures += 1
                    delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (self._register_failures - 1))
                    log.warning(
                        "registration with the kubelet failed; retrying",
                        extra={
                            "resource": self.resource_name,
                            "code": error.code().name,
                            "error": error.details(),
                            "retry_in_s": delay,
                        },
                    )
                    await self._sleep_unless_woken(delay)
                    continue
                self._register_failures = 0
            await self._wake.wait()

    async def _sleep_unless_woken(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _restart_server(self) -> None:
        old = None
        if self._server is not None:
            self.stats.socket_recreations += 1
            self.registered.clear()
            if self._sockets.is_socket(self.socket_path):
                await self._stop_server(grace=0)  # removes the socket: its path is reused
            else:
                log.info(
                    "own socket vanished; recreating it", extra={"socket": str(self.socket_path)}
                )
                self._ignore_streams_before = max(self._ignore_streams_before, time.monotonic())
                old, self._server = self._server, None
        self._server = await self._sockets.serve(self.socket_path, self._add_services)
        self._need_register = True
        self._fresh_socket = True
        if old is not None:
            # Its socket is gone (a kubelet restart removes them all): registering with
            # the new kubelet need not wait for grpc to wind the old server down.
            retiring = asyncio.create_task(old.stop(grace=0))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    async def _stop_server(self, grace: float) -> None:
        if self._server is None:
            return
        self._ignore_streams_before = max(self._ignore_streams_before, time.monotonic())
        server, self._server = self._server, None
        await self._sockets.stop(server, self.socket_path, grace)

    def _add_services(self, server: grpc.aio.Server) -> None:
        api_pb2_grpc.add_DevicePluginServicer_to_server(self.servicer, server)
        if self._plugin_watcher is not None:
            self._plugin_watcher.add_services(server)

    async def _register_by_socket(self) -> None:
        """Plugin-watcher mode: a socket the kubelet has not seen yet is a registration."""
        if not self._fresh_socket:
            await self._restart_server()
        self._fresh_socket = False
        self._need_register = False
        self._last_register_started = time.monotonic()

    def verdict(self, registered: bool) -> None:
        """The kubelet's answer in plugin-watcher mode (NotifyRegistrationStatus)."""
        if registered:
            self.stats.registrations += 1
            self.registered.set()
        else:
            self.registered.clear()

    async def _register(self) -> None:
        self._need_register = False
        self._last_register_started = time.monotonic()
        request = api_pb2.RegisterRequest(
            version=API_VERSION,
            endpoint=self.socket_path.name,
            resource_name=self.resource_name,
            options=self.servicer.options,
        )
        try:
            async with grpc.aio.insecure_channel(
                f"unix:{self.kubelet_socket}", options=_REGISTER_CHANNEL_OPTIONS
            ) as channel:
                await api_pb2_grpc.RegistrationStub(channel).Register(
                    request, timeout=REGISTER_TIMEOUT
                )
        except BaseException:
            self._need_register = True
            raise
        self.stats.registrations += 1
        self.registered.set()
        log.info(
            "registered with the kubelet",
            extra={"resource": self.resource_name, "endpoint": self.socket_path.name},
        )
