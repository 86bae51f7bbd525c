"""Compose and supervise: one asyncio TaskGroup of units, crash-only, live-reloadable.

A unit is one root task built from one piece of config: a device plugin per resource,
the device-plugin socket watcher, the CSI driver, the HTTP status server, the NFD file.
Stopping (SIGTERM/SIGINT) cancels every unit; each cleans up in its `finally` (servers
stopped, sockets removed). If a unit fails, the TaskGroup stops the others the same way
and the error propagates, so the process exits non-zero and Kubernetes restarts it: no
half-alive daemon. A reload (apply()) restarts only the units whose config changed;
the others keep their sockets, registrations and streams.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc_health.v1 import health_pb2

from csi.config import Mode as CsiMode
from daemon.config import Config, DevicePluginSpec, Registration
from daemon.http import StatusServer
from daemon.metrics import Metrics
from daemon.nodefeatures import NodeFeatureFile
from daemon.pluginregistration.v1.api_pb2_grpc import add_RegistrationServicer_to_server
from daemon.pluginwatcher import (
    DEVICE_PLUGIN,
    DEVICE_PLUGIN_VERSIONS,
    PluginInfo,
    RegistrationServicer,
)
from daemon.sockets import UnixSockets
from deviceplugin.backend import Backend
from deviceplugin.cdi import CdiSpecWriter, remove_stale_specs
from deviceplugin.names import socket_file_name
from deviceplugin.plugin import PluginWatcherMode, ResourcePlugin, SocketServing
from deviceplugin.servicer import ServiceSettings
from deviceplugin.socketdir import SocketDirWatcher
from deviceplugin.state import DeviceState

if TYPE_CHECKING:
    from daemon.csiplugin import CsiControllerPlugin, CsiPlugin
    from daemon.draplugin import DraPlugin

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 2.0
_WATCHER = "device-plugin socket watcher"
_CSI = "CSI driver"
_HTTP = "HTTP status server"
_NFD = "node feature file"


class _StopRequestedError(Exception):
    pass


class Reloader(Protocol):
    async def run(self, daemon: Daemon) -> None: ...


# Backends by resource name, or one per configured device plugin in the config's order.
Backends = Mapping[str, Backend] | Sequence[Backend]


@dataclass
class _Unit:
    spec: object  # the config it was built from: equal config on reload, unit kept
    task: asyncio.Task[None]


class Daemon:
    """Everything `nodeplug run` serves for one config, and how it changes on reload."""

    def __init__(
        self,
        config: Config,
        backends: Backends,
        sockets: SocketServing | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.sockets = sockets or UnixSockets(self.metrics.server)
        self.plugins: dict[str, ResourcePlugin] = {}
        self.dra: dict[str, DraPlugin] = {}
        self.csi: CsiPlugin | CsiControllerPlugin | None = None
        self.watcher: SocketDirWatcher | None = None
        self.node_features: NodeFeatureFile | None = None
        self.status_server: StatusServer | None = None
        self._initial_backends = _by_resource(config, backends)
        self._units: dict[str, _Unit] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._restarts_seen_before = 0
        # Set once the first config's units are all started (each goes on in its task).
        self.started = asyncio.Event()
        self.metrics.observe_daemon(self)

    # --- what the HTTP endpoints and metrics read -----------------------------------

    @property
    def kubelet_restarts_seen(self) -> int:
        current = self.watcher.kubelet_starts if self.watcher is not None else 0
        return self._restarts_seen_before + current

    def readiness(self) -> dict[str, bool]:
        """Each component and whether the kubelet has it registered."""
        ready = {}
        if self.watcher is not None and self.watcher.expect_kubelet and self.plugins:
            ready[f"kubelet ({self.watcher.kubelet_socket})"] = self.watcher.kubelet_present()
        ready |= {f"device plugin {n}": p.registered.is_set() for n, p in self.plugins.items()}
        ready.update(
            {f"DRA driver {p.driver.settings.driver_name}": p.ready for p in self.dra.values()}
        )
        if self.csi is not None:
            ready[_CSI] = self.csi.ready
        return ready

    @property
    def ready(self) -> bool:
        return all(self.readiness().values())

    def problems(self) -> dict[str, str]:
        """Components that wait for an admin, and what to do (/readyz shows them)."""
        if self.csi is not None and self.csi.problem is not None:
            return {_CSI: self.csi.problem}
        return {}

    def own_sockets(self) -> list[Path]:
        # A plugin waiting for its backend's first device list has no socket yet: that is
        # readiness's business (not registered), not a liveness failure.
        sockets = [p.socket_path for p in self.plugins.values() if p.serving]
        sockets += [p.driver.socket_path for p in self.dra.values() if p.driver.serving.is_set()]
        if self.csi is not None:
            sockets += self.csi.sockets()
        return sockets

    async def health(self) -> dict[str, str | None]:
        """A gRPC health round trip to each of our sockets: socket -> None or the problem."""
        sockets = self.own_sockets()
        results = await asyncio.gather(*(_check_socket(s) for s in sockets))
        return {str(socket): problem for socket, problem in zip(sockets, results, strict=True)}

    # --- running --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, reloader: Reloader | None = None) -> None:
        log.info(
            "starting",
            extra={
                "kubeletDir": str(self.config.kubelet_dir),
                "resources": [spec.resource_name for spec in self.config.device_plugins],
                "csi": self.config.csi.driver_name if self.config.csi else None,
            },
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                backends, self._initial_backends = self._initial_backends, {}
                await self._start_units(self.config, backends)
                self.started.set()
                if reloader is not None:
                    tasks.create_task(reloader.run(self), name="config reloader")
                tasks.create_task(_raise_when_set(stop), name="stop signal")
        except* _StopRequestedError:
            log.info("stopped")
        finally:
            self._tasks = None
            self._units.clear()
            self.plugins.clear()
            self.dra.clear()

    def plugins_to_start(self, config: Config) -> list[str]:
        """The resources whose unit apply(config) starts: new or changed ones.

        Only these need a backend: the others keep theirs, sockets and streams included.
        """
        base_changed = _base(self.config) != _base(config)
        starting: list[str] = []
        for spec in config.device_plugins:
            unit = self._units.get(_plugin_key(spec.resource_name))
            if base_changed or unit is None or unit.spec != _unit_spec(config, spec):
                starting.append(spec.resource_name)
        return starting

    async def apply(self, config: Config, backends: Backends) -> list[str]:
        """Switch to a new config, restarting only what changed; return what was restarted.

        `backends` must hold one for each of plugins_to_start(config); others are unused.
        """
        old = self.config
        starting = self.plugins_to_start(config)
        by_name = _by_resource(config, backends)
        missing = [name for name in starting if name not in by_name]
        if missing:
            raise ValueError(f"no backend given for {', '.join(missing)}")
        new_backends = {name: by_name[name] for name in starting}
        new_specs: dict[str, DevicePluginSpec] = {s.resource_name: s for s in config.device_plugins}
        base_changed = _base(old) != _base(config)
        stopped = []
        for name in sorted(set(self.plugins) | set(self.dra)):
            key = _plugin_key(name)
            new = new_specs.get(name)
            if name in new_backends or new is None:
                dra = self.dra.pop(name, None)
                if dra is not None and (new is None or not new.serves_dra):
                    await dra.uninstall()  # no longer a DRA driver: withdraw its slices
                await self._stop(key)
                self.plugins.pop(name, None)
                stopped.append(key)
        if _WATCHER in self._units and (base_changed or not new_specs):
            await self._stop(_WATCHER)
        for key, changed in (
            (_CSI, base_changed or old.csi != config.csi),
            (_HTTP, old.http != config.http),
            (
                _NFD,
                old.node_features != config.node_features
                or _serves_a_node(old) != _serves_a_node(config),
            ),
        ):
            if changed and key in self._units:
                await self._stop(key)
                stopped.append(key)
        # What a stopped unit leaves behind must not be read as live (metrics, readiness).
        if _CSI not in self._units:
            self.csi = None
        if _HTTP not in self._units:
            self.status_server = None
        if _NFD not in self._units:
            self.node_features = None
        self.config = config
        started = await self._start_units(config, new_backends)
        log.info("config reloaded", extra={"stopped": stopped, "started": started})
        return sorted(set(stopped) | set(started))

    async def _start_units(self, config: Config, backends: Mapping[str, Backend]) -> list[str]:
        """Start every unit of `config` that is not running (on start, and after a reload)."""
        started = []
        cdi_resources = [s for s in config.device_plugins if s.writes_cdi_spec]
        writers: dict[str, CdiSpecWriter] = {
            s.resource_name: CdiSpecWriter(config.cdi.dir, s.resource_name) for s in cdi_resources
        }
        if config.device_plugins or self.plugins:
            await asyncio.to_thread(
                remove_stale_specs, config.cdi.dir, [w.path for w in writers.values()]
            )
        # The node feature file labels the node it is on: a controller-mode daemon runs in
        # a Deployment and says nothing about its node.
        node_features = config.node_features.file if _serves_a_node(config) else None
        if node_features is not None and _NFD not in self._units:
            self.node_features = NodeFeatureFile(node_features, self._features)
            started.append(self._start(_NFD, config.node_features, self.node_features.run()))
        elif node_features is None:
            self.node_features = None
        if config.device_plugins and _WATCHER not in self._units:
            if self.watcher is not None:
                self._restarts_seen_before += self.watcher.kubelet_starts
            self.watcher = SocketDirWatcher(
                config.device_plugin_socket_dir,
                expect_kubelet=config.device_plugin_registration is Registration.KUBELET,
            )
            self._start(_WATCHER, None, self.watcher.run())
        for spec in config.device_plugins:
            if _plugin_key(spec.resource_name) in self._units:
                continue
            backend = backends[spec.resource_name]
            plugin = dra = None
            if spec.serves_device_plugin:
                plugin = self._device_plugin(config, spec, backend, writers)
                self.plugins[spec.resource_name] = plugin
            if spec.serves_dra:
                dra = self._dra_plugin(config, spec, backend, plugin)
                self.dra[spec.resource_name] = dra
            work = _serve_resource(plugin, dra)
            key = _plugin_key(spec.resource_name)
            started.append(self._start(key, _unit_spec(config, spec), work))
        if config.csi is not None and _CSI not in self._units:
            self.csi = self._csi_plugin(config)
            started.append(self._start(_CSI, config.csi, self.csi.run()))
        if config.http.address is not None and _HTTP not in self._units:
            self.status_server = StatusServer(self, config.http.address)
            started.append(self._start(_HTTP, config.http, self.status_server.run()))
        self._features_changed()
        return started

    def _csi_plugin(self, config: Config) -> CsiPlugin | CsiControllerPlugin:
        # The CSI services and their protos: only daemons serving CSI pay for them.
        from daemon.csiplugin import CsiControllerPlugin, CsiPlugin  # noqa: PLC0415

        assert config.csi is not None and config.csi_socket is not None
        if config.csi.mode is CsiMode.CONTROLLER:
            return CsiControllerPlugin(config.csi, config.csi_socket, self.sockets)
        return CsiPlugin(
            config.csi, config.csi_socket, config.kubelet_dir, config.state_dir, self.sockets
        )

    def _device_plugin(
        self,
        config: Config,
        spec: DevicePluginSpec,
        backend: Backend,
        writers: Mapping[str, CdiSpecWriter],
    ) -> ResourcePlugin:
        assert self.watcher is not None
        writer = writers.get(spec.resource_name)
        settings = ServiceSettings(
            spec.resource_name,
            spec.allocation_policy,
            spec.hook_timeout,
            cdi_kind=writer.kind if writer is not None else None,
            strategies=spec.strategies,
        )
        registration = None
        mode = None
        if config.device_plugin_registration is Registration.PLUGIN_WATCHER:
            info = PluginInfo(DEVICE_PLUGIN, spec.resource_name, "", DEVICE_PLUGIN_VERSIONS)
            registration = RegistrationServicer(info)  # endpoint "": this very socket
            mode = PluginWatcherMode(
                lambda server: add_RegistrationServicer_to_server(registration, server)
            )
        directory_length = len(str(config.device_plugin_socket_dir))
        plugin = ResourcePlugin(
            settings,
            backend,
            self.watcher,
            self.sockets,
            socket_file_name(spec.resource_name, directory_length),
            spec.replicas,
            cdi=writer,
            on_change=self._features_changed,
            plugin_watcher=mode,
        )
        if registration is not None:
            registration.on_verdict = plugin.verdict
        return plugin

    def _dra_plugin(
        self,
        config: Config,
        spec: DevicePluginSpec,
        backend: Backend,
        plugin: ResourcePlugin | None,
    ) -> DraPlugin:
        # Imports the Kubernetes client: only daemons serving DRA pay for it.
        from daemon.draplugin import DraPlugin  # noqa: PLC0415
        from deviceplugin.dra.claims import DraSettings  # noqa: PLC0415
        from deviceplugin.dra.names import default_node_name  # noqa: PLC0415

        settings = DraSettings(
            spec.resource_name,
            spec.driver_name,
            default_node_name(),
            spec.resource_name,
            spec.hook_timeout,
        )
        return DraPlugin(
            settings,
            backend,
            # api: both: the device plugin's state, so one backend watch feeds both APIs.
            plugin.state if plugin is not None else DeviceState(),
            self.sockets,
            kubelet_dir=config.kubelet_dir,
            state_dir=config.state_dir,
            cdi_dir=config.cdi.dir,
            kubeconfig=config.kubeconfig,
            feeds_state=plugin is None,
        )

    def _start(self, key: str, spec: object, work: Coroutine[Any, Any, None]) -> str:
        assert self._tasks is not None, "units start only while the daemon runs"
        self._units[key] = _Unit(spec, self._tasks.create_task(work, name=key))
        return key

    async def _stop(self, key: str) -> None:
        unit = self._units.pop(key)
        unit.task.cancel()
        await asyncio.wait({unit.task})

    def _features(self) -> tuple[dict[str, int], str | None]:
        counts = {
            name: sum(1 for device in plugin.state.devices.values() if device.healthy)
            for name, plugin in self.plugins.items()
        }
        return counts, self.config.csi.driver_name if self.config.csi is not None else None

    def _features_changed(self) -> None:
        if self.node_features is not None:
            self.node_features.changed()


def _serves_a_node(config: Config) -> bool:
    return config.csi is None or config.csi.mode is CsiMode.NODE


def _by_resource(config: Config, backends: Backends) -> dict[str, Backend]:
    if isinstance(backends, Mapping):
        return dict(backends)
    names = (spec.resource_name for spec in config.device_plugins)
    return dict(zip(names, backends, strict=True))


def _base(config: Config) -> tuple[object, ...]:
    """Settings every plugin depends on: a change restarts them all."""
    return (
        config.kubelet_dir,
        config.device_plugin_dir,
        config.state_dir,
        config.device_plugin_registration,
        config.cdi,
    )


def _unit_spec(config: Config, spec: DevicePluginSpec | None) -> object:
    """What a resource's unit depends on: its entry, and the API credentials if it uses DRA."""
    if spec is None or not spec.serves_dra:
        return spec
    return (spec, config.kubeconfig)


async def _serve_resource(plugin: ResourcePlugin | None, dra: DraPlugin | None) -> None:
    """One resource's unit: its device plugin, its DRA driver, or both on one backend."""
    async with asyncio.TaskGroup() as tasks:
        if plugin is not None:
            tasks.create_task(plugin.run())
        if dra is not None:
            tasks.create_task(dra.run())


def _plugin_key(resource_name: str) -> str:
    return f"device plugin {resource_name}"


async def _check_socket(path: Path) -> str | None:
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            # The health stubs' types lack the stub's methods; the multicallable is typed.
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            response = await check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name}: {error.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}"
    return None


async def _raise_when_set(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _StopRequestedError
