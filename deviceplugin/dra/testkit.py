"""A kubelet simulator for DRA drivers, speaking the real protocols over Unix sockets.

What the kubelet does with a DRA driver, no more: its plugin watcher notices a socket in
<kubeletDir>/plugins_registry/ (inotify, and a walk of the directory at start, as
pkg/kubelet/pluginmanager does; names starting with "." are skipped), calls GetInfo,
takes type "DRAPlugin" with a DRAPlugin service it speaks, answers
NotifyRegistrationStatus, then calls NodePrepareResources / NodeUnprepareResources on
the endpoint with the service it chose (pkg/kubelet/cm/dra/plugin: since 1.34 the first
service in the driver's list that the kubelet speaks, 1.32-1.33 only v1beta1), 45 s
per call. With the ResourceHealthStatus gate on it follows NodeWatchResources too.
restart() is a kubelet restart. Used by the tests, the sandbox and the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from asyncinotify import Inotify, Mask
from google.protobuf.message import Message

# The plugin-watcher API is the kubelet's, generated under daemon/ for the CSI driver;
# this simulator is its one user outside daemon/ (an import-linter exception).
from daemon.pluginregistration.v1 import api_pb2 as registration_pb2
from daemon.pluginregistration.v1 import api_pb2_grpc as registration_grpc
from deviceplugin.dra.health.v1alpha1 import api_pb2 as health_pb2
from deviceplugin.dra.health.v1alpha1 import api_pb2_grpc as health_grpc
from deviceplugin.dra.names import DRA_SERVICES, HEALTH_SERVICE
from deviceplugin.dra.v1 import api_pb2 as v1
from deviceplugin.dra.v1 import api_pb2_grpc as v1_grpc
from deviceplugin.dra.v1beta1 import api_pb2 as v1beta1
from deviceplugin.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc

DRA_PLUGIN = "DRAPlugin"
REGISTRY_SUBDIR = "plugins_registry"
CALL_TIMEOUT = 45.0  # defaultClientCallTimeout
# Kubelet 1.34+: v1 and v1beta1, in the driver's order. 1.32-1.33: v1beta1 only.
KUBELET_SERVICES = DRA_SERVICES
ClaimTuple = tuple[str, str, str]  # namespace, uid, name


@dataclass
class DriverClient:
    """The simulator's view of one registered DRA driver."""

    name: str
    # The registration socket's name: the kubelet deregisters the driver when it goes.
    socket: str
    endpoint: str
    services: tuple[str, ...]
    chosen: str
    channel: grpc.aio.Channel
    health: list[health_pb2.NodeWatchResourcesResponse] = field(default_factory=list)
    health_task: asyncio.Task[None] | None = None


class FakeDraKubelet:
    def __init__(
        self,
        kubelet_dir: Path,
        *,
        services: Sequence[str] = KUBELET_SERVICES,
        health_gate: bool = False,
    ) -> None:
        self.registry = kubelet_dir / REGISTRY_SUBDIR
        self.services = tuple(services)
        self.health_gate = health_gate
        self.drivers: dict[str, DriverClient] = {}
        # (socket name, error) of every refused registration.
        self.refused: list[tuple[str, str]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self.registry.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._ready.clear()
        self._task = asyncio.create_task(self._watch())
        await self._ready.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for client in list(self.drivers.values()):
            await self._disconnect(client)
        self.drivers.clear()

    async def restart(self) -> None:
        """A new kubelet process: it forgets every driver and walks plugins_registry again."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> FakeDraKubelet:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- the plugin watcher -------------------------------------------------------------

    async def _watch(self) -> None:
        with Inotify() as inotify:
            inotify.add_watch(self.registry, Mask.CREATE | Mask.MOVED_TO | Mask.DELETE)
            for path in sorted(self.registry.iterdir()):
                await self._socket_appeared(path)
            self._ready.set()
            async for event in inotify:
                if event.name is None:
                    continue
                path = self.registry / event.name
                if event.mask & Mask.DELETE:
                    await self._socket_vanished(path)
                else:
                    await self._socket_appeared(path)

    async def _socket_appeared(self, path: Path) -> None:
        try:
            is_socket = stat.S_ISSOCK(path.lstat().st_mode)
        except FileNotFoundError:
            return
        if not is_socket or path.name.startswith("."):
            return
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = registration_grpc.RegistrationStub(channel)
            try:
                info = await stub.GetInfo(registration_pb2.InfoRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                return  # a stale socket nobody serves: the kubelet skips it too
            if info.type != DRA_PLUGIN:
                return  # another kubelet handler's business (CSI, device plugins)
            client, error = self._accept(info, path.name)
            await stub.NotifyRegistrationStatus(
                registration_pb2.RegistrationStatus(plugin_registered=not error, error=error),
                timeout=5,
            )
        if client is None:
            self.refused.append((path.name, error))
        else:
            old = self.drivers.pop(client.name, None)
            if old is not None:
                await self._disconnect(old)
            self.drivers[client.name] = client
            if self.health_gate:
                client.health_task = asyncio.create_task(self._follow_health(client))
        async with self._changed:
            self._changed.notify_all()

    def _accept(
        self, info: registration_pb2.PluginInfo, socket: str
    ) -> tuple[DriverClient | None, str]:
        """ValidatePlugin and RegisterPlugin: the client, or None and the kubelet's error."""
        offered = list(info.supported_versions)
        if not offered:
            return None, "empty list of supported gRPC services (aka supported versions)"
        if self.services == KUBELET_SERVICES:
            chosen = next((s for s in offered if s in self.services), "")
        else:  # older kubelets go by their own preference
            chosen = next((s for s in self.services if s in offered), "")
        if not chosen:
            return None, f"none of the plugin's services {offered} is supported by the kubelet"
        if not info.name or not info.endpoint.startswith("/"):
            return None, "the plugin's name or endpoint is missing or not absolute"
        channel = grpc.aio.insecure_channel(f"unix:{info.endpoint}")
        return DriverClient(info.name, socket, info.endpoint, tuple(offered), chosen, channel), ""

    async def _socket_vanished(self, path: Path) -> None:
        for client in [c for c in self.drivers.values() if c.socket == path.name]:
            del self.drivers[client.name]
            await self._disconnect(client)
        async with self._changed:
            self._changed.notify_all()

    async def _follow_health(self, client: DriverClient) -> None:
        stub = health_grpc.DRAResourceHealthStub(client.channel)
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for response in stub.NodeWatchResources(health_pb2.NodeWatchResourcesRequest()):
                async with self._changed:
                    client.health.append(response)
                    self._changed.notify_all()

    async def _disconnect(self, client: DriverClient) -> None:
        if client.health_task is not None:
            client.health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client.health_task
        await client.channel.close()

    async def wait_for(
        self, predicate: Callable[[dict[str, DriverClient]], bool], timeout: float = 10.0
    ) -> None:
        """Wait until predicate(drivers) holds (checked on every registration and health update)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.drivers))

    async def wait_for_driver(self, name: str, timeout: float = 10.0) -> DriverClient:
        await self.wait_for(lambda drivers: name in drivers, timeout)
        return self.drivers[name]

    def driver(self, name: str) -> DriverClient:
        try:
            return self.drivers[name]
        except KeyError:
            raise LookupError(f"DRA driver {name} is not registered") from None

    # --- the DRA manager -------------------------------------------------------------------

    async def prepare(
        self, driver: str, claims: Sequence[ClaimTuple]
    ) -> v1.NodePrepareResourcesResponse:
        """NodePrepareResources with the chosen service; answers in v1 form either way."""
        answer = await self._call(driver, "NodePrepareResources", claims)
        # v1 only adds an optional field to v1beta1: the encodings are compatible.
        return v1.NodePrepareResourcesResponse.FromString(answer.SerializeToString())

    async def unprepare(
        self, driver: str, claims: Sequence[ClaimTuple]
    ) -> v1.NodeUnprepareResourcesResponse:
        answer = await self._call(driver, "NodeUnprepareResources", claims)
        return v1.NodeUnprepareResourcesResponse.FromString(answer.SerializeToString())

    async def _call(self, driver: str, method: str, claims: Sequence[ClaimTuple]) -> Message:
        client = self.driver(driver)
        api, stubs = (
            (v1beta1, v1beta1_grpc) if client.chosen == "v1beta1.DRAPlugin" else (v1, v1_grpc)
        )
        request = getattr(api, f"{method}Request")()
        for namespace, uid, name in claims:
            request.claims.add(namespace=namespace, uid=uid, name=name)
        call = getattr(stubs.DRAPluginStub(client.channel), method)
        answer: Message = await call(request, timeout=CALL_TIMEOUT)
        return answer

    def supports_health(self, driver: str) -> bool:
        return HEALTH_SERVICE in self.driver(driver).services
