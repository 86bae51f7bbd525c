"""The kubelet's plugin watcher, simulated over the real pluginregistration v1 protocol.

What pkg/kubelet/pluginmanager does, no more: it watches <kubeletDir>/plugins_registry/
(inotify, after a walk of what is already there), skips names starting with "." and
anything not a Unix socket, and for each socket that appears: GetInfo (1 s), the
handler for the answer's type validates and registers the plugin (an empty endpoint
means the socket itself), then NotifyRegistrationStatus with the verdict. A socket
that goes away deregisters its plugin. Handlers here: CSIPlugin (the kubelet's CSI
handler: the version rule, then NodeGetInfo on the driver) and DevicePlugin (the
device manager: dial the plugin and follow ListAndWatch, through FakeKubelet).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from csi.v1 import csi_pb2, csi_pb2_grpc
from daemon.pluginregistration.v1 import api_pb2, api_pb2_grpc
from daemon.pluginwatcher import CSI_PLUGIN, DEVICE_PLUGIN, DEVICE_PLUGIN_VERSIONS, DRA_PLUGIN
from deviceplugin.names import resource_name_problem
from deviceplugin.socketdir import SocketDirWatcher
from deviceplugin.testkit import FakeKubelet

GET_INFO_TIMEOUT = 1.0  # operation_generator.go: the GetInfo context
NOTIFY_TIMEOUT = 10.0
CSI_TIMEOUT = 30.0

# k8s.io/apimachinery/pkg/util/version: ParseGeneric's pattern. It needs two or more
# dotted numbers (the first without a leading zero), an optional "v" before them and
# ignores whatever follows them.
_GENERIC_VERSION = re.compile(r"^\s*v?([0-9]+(?:\.[0-9]+)*)(.*)$")


def kubelet_accepts_csi_versions(versions: Sequence[str]) -> bool:
    """The kubelet's verdict on GetInfo's supported_versions for a CSIPlugin.

    After pkg/volume/csi/csi_plugin.go, highestSupportedVersion: unparsable versions
    and majors above 1 are skipped, and the highest one left must be 1.x (0.x drivers
    are refused since Kubernetes 1.17).
    """
    majors = []
    for text in versions:
        match = _GENERIC_VERSION.match(text)
        if match is None:
            continue
        parts = match.group(1).split(".")
        if len(parts) < 2 or (parts[0] != "0" and parts[0].startswith("0")):
            continue
        if int(parts[0]) <= 1:
            majors.append(int(parts[0]))
    return bool(majors) and max(majors) == 1


class RefusedError(Exception):
    """The handler refuses the plugin; the message goes back in NotifyRegistrationStatus."""


class Handler(Protocol):
    async def register(self, info: api_pb2.PluginInfo, endpoint: Path) -> str:
        """Validate and register; a line saying what the kubelet learned, or RefusedError."""
        ...


class CsiHandler:
    """pkg/volume/csi RegistrationHandler: versions, then NodeGetInfo on the endpoint."""

    async def register(self, info: api_pb2.PluginInfo, endpoint: Path) -> str:
        if not kubelet_accepts_csi_versions(info.supported_versions):
            raise RefusedError(f"none of the versions {list(info.supported_versions)} is 1.x")
        try:
            async with grpc.aio.insecure_channel(f"unix:{endpoint}") as channel:
                node = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(
                    csi_pb2.NodeGetInfoRequest(), timeout=CSI_TIMEOUT
                )
        except grpc.aio.AioRpcError as error:
            raise RefusedError(f"NodeGetInfo failed: {error.code().name}") from error
        return f"NodeGetInfo: node {node.node_id}"


class DevicePluginHandler:
    """The device manager's watcher handler: version, resource name, then dial and follow."""

    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    async def register(self, info: api_pb2.PluginInfo, endpoint: Path) -> str:
        if not set(info.supported_versions) & set(DEVICE_PLUGIN_VERSIONS):
            raise RefusedError(f"no supported version in {list(info.supported_versions)}")
        if (problem := resource_name_problem(info.name)) is not None:
            raise RefusedError(f"invalid resource name {info.name!r}: {problem}")
        try:
            await self.kubelet.connect(info.name, endpoint)
        except ConnectionError as error:
            raise RefusedError(str(error)) from error
        return f"resource {info.name}"


class _NoHandler:
    async def register(self, info: api_pb2.PluginInfo, endpoint: Path) -> str:
        raise RefusedError(f"no handler registered for plugin type: {info.type}")


@dataclass(frozen=True, slots=True)
class Registered:
    info: api_pb2.PluginInfo
    socket: Path
    # What the kubelet learned (the CSI driver's node id, the resource name).
    summary: str


class SimulatedPluginWatcher:
    def __init__(
        self,
        directory: Path,
        handlers: Mapping[str, Handler],
        ignored: Collection[str] = (),
    ) -> None:
        self.directory = directory
        self.handlers = dict(handlers)
        # Plugin types another simulator registers: neither accepted nor refused here.
        self.ignored = frozenset(ignored)
        self.plugins: dict[str, Registered] = {}
        # Plugin name (socket name when GetInfo failed) -> why its last registration failed.
        self.refused: dict[str, str] = {}
        self._changed = asyncio.Condition()

    @classmethod
    def for_kubelet(cls, kubelet_dir: Path, kubelet: FakeKubelet) -> SimulatedPluginWatcher:
        handlers: dict[str, Handler] = {
            CSI_PLUGIN: CsiHandler(),
            DEVICE_PLUGIN: DevicePluginHandler(kubelet),
        }
        # DRA drivers are the DRA kubelet simulator's (deviceplugin.dra.testkit), which
        # watches the same directory: this watcher leaves them alone.
        return cls(kubelet_dir / "plugins_registry", handlers, ignored={DRA_PLUGIN})

    async def run(self) -> None:
        watcher = SocketDirWatcher(self.directory)
        events = watcher.subscribe()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(watcher.run())
            await watcher.ready.wait()
            for path in sorted(self.directory.iterdir()):
                await self._appeared(path)
            while True:
                event = await events.get()
                if event.name is None:
                    continue
                path = self.directory / event.name
                if event.created:
                    await self._appeared(path)
                else:
                    await self._vanished(path)

    async def _appeared(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            if path.name.startswith(".") or not stat.S_ISSOCK(path.lstat().st_mode):
                return
            await self._register(path)

    async def _register(self, socket: Path) -> None:
        name = socket.name  # until GetInfo says the plugin's own name
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                stub = api_pb2_grpc.RegistrationStub(channel)
                info = await stub.GetInfo(api_pb2.InfoRequest(), timeout=GET_INFO_TIMEOUT)
                name = info.name
                if info.type in self.ignored:
                    return
                handler = self.handlers.get(info.type, _NoHandler())
                try:
                    summary = await handler.register(info, Path(info.endpoint or socket))
                except RefusedError as refused:
                    await stub.NotifyRegistrationStatus(
                        api_pb2.RegistrationStatus(plugin_registered=False, error=str(refused)),
                        timeout=NOTIFY_TIMEOUT,
                    )
                    await self._update(name, None, str(refused))
                    return
                await stub.NotifyRegistrationStatus(
                    api_pb2.RegistrationStatus(plugin_registered=True), timeout=NOTIFY_TIMEOUT
                )
                await self._update(name, Registered(info, socket, summary), None)
        except grpc.aio.AioRpcError as error:
            # The kubelet logs it and tries again only when the socket appears again.
            await self._update(name, None, f"{error.code().name}: {error.details()}")

    async def _vanished(self, socket: Path) -> None:
        async with self._changed:
            for name, plugin in list(self.plugins.items()):
                if plugin.socket == socket:
                    del self.plugins[name]
            self._changed.notify_all()

    async def _update(self, name: str, plugin: Registered | None, refusal: str | None) -> None:
        async with self._changed:
            if plugin is not None:
                self.plugins[name] = plugin
                self.refused.pop(name, None)
            if refusal is not None:
                self.refused[name] = refusal
            self._changed.notify_all()

    async def wait_for(self, name: str, timeout: float) -> Registered:
        """The plugin called `name` once registered; RefusedError if it was refused."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: name in self.plugins or name in self.refused)
            if name not in self.plugins:
                raise RefusedError(self.refused[name])
            return self.plugins[name]
