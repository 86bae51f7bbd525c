"""A kubelet device manager simulator, speaking the real v1beta1 protocol over Unix sockets.

It does what the kubelet does with device plugins, no more: serves Registration on
kubelet.sock; on Register checks the version and the resource name, dials the plugin
back, asks GetDevicePluginOptions, then follows ListAndWatch; it can call Allocate,
GetPreferredAllocation and PreStartContainer as pod admission would; and restart() is a
kubelet restart (the process killed, its kubelet.sock left behind; then every socket in
the directory removed, kubelet.sock created anew).
Used by the tests and by `nodeplug sandbox`; vendors can drive their backends with it.

Facts of the real kubelet it keeps:
- its device-plugin directory is DEVICE_PLUGIN_PATH (/var/lib/kubelet/device-plugins)
  whatever its --root-dir, which only moves plugins_registry/ and plugins/: give the
  simulator a directory that is not below the root dir you give the daemon, as the
  tests do, and a daemon that derives one from the other cannot pass;
- it calls PreStartContainer with a 30 s deadline (KubeletPreStartContainerRPCTimeout-
  InSecs) and Allocate and GetPreferredAllocation with none: a plugin must answer
  PreStartContainer in time and never hang the others (pre_start_timeout shortens the
  deadline for tests);
- it passes the Allocate response's cdi_devices on to the runtime only from 1.28 with
  the DevicePluginCDIDevices gate (on by default from 1.29, GA in 1.31): cdi_field=False
  is an older kubelet, which drops the field, so the container gets no device from it
  (container_config(), and deviceplugin.testruntime for what a runtime makes of it);
- admission (admit()) follows the device manager's devicesToAllocate: an error from
  GetPreferredAllocation fails the pod, the answer's ids it does not offer are
  dropped and a shortfall is filled from its own available set, and its view of the
  devices may lag the plugin's (updates_held() makes it lag on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from deviceplugin.files import add_unix_port
from deviceplugin.names import resource_name_problem
from deviceplugin.servicer import KUBELET_PRE_START_TIMEOUT
from deviceplugin.socketdir import KUBELET_SOCKET
from deviceplugin.testruntime import ContainerConfig
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

T = TypeVar("T")
SUPPORTED_VERSIONS = ("v1beta1",)
DIAL_TIMEOUT = 10.0


class AdmissionError(Exception):
    """The kubelet failed the pod (the real one reports UnexpectedAdmissionError)."""


@dataclass
class PluginClient:
    """The simulator's view of one registered resource."""

    resource_name: str
    endpoint: str
    options: api_pb2.DevicePluginOptions
    channel: grpc.aio.Channel
    stub: api_pb2_grpc.DevicePluginAsyncStub
    # The latest device list, as received.
    listed: api_pb2.ListAndWatchResponse = field(default_factory=api_pb2.ListAndWatchResponse)
    updates: int = 0
    # Ids handed to containers by admit(), as the kubelet's checkpoint would record them.
    allocated: set[str] = field(default_factory=set)
    stream_task: asyncio.Task[None] | None = None
    # `devices` of update number n, made when first asked for.
    _indexed: tuple[int, dict[str, api_pb2.Device]] = field(
        default_factory=lambda: (0, {}), init=False, repr=False
    )

    @property
    def devices(self) -> dict[str, api_pb2.Device]:
        """The latest list by id, as the kubelet keeps it (a repeated id: the last wins).

        Indexed when first asked for after an update, not as each list arrives: the
        index of a list of tens of thousands takes longer than the Go kubelet's, and
        start-up benchmarks wait for lists, not for this simulator's bookkeeping.
        """
        if self._indexed[0] != self.updates:
            self._indexed = (self.updates, {device.ID: device for device in self.listed.devices})
        return self._indexed[1]

    def healthy_ids(self) -> list[str]:
        return sorted(i for i, d in self.devices.items() if d.health == "Healthy")


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    def __init__(
        self,
        device_plugin_dir: Path,
        *,
        pre_start_timeout: float = KUBELET_PRE_START_TIMEOUT,
        cdi_field: bool = True,
    ) -> None:
        self.directory = device_plugin_dir
        self.pre_start_timeout = pre_start_timeout
        self.cdi_field = cdi_field
        self.socket = device_plugin_dir / KUBELET_SOCKET
        self.clients: dict[str, PluginClient] = {}
        self.register_requests: list[api_pb2.RegisterRequest] = []
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Condition()
        self._updates_open = asyncio.Event()
        self._updates_open.set()

    async def start(self, *, clean: bool = True) -> None:
        """Serve kubelet.sock; clean=True first removes every socket, as the kubelet does."""
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        if clean:
            for path in self.directory.iterdir():
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
        # The device manager's listen() removes a stale kubelet.sock in any case.
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        server = grpc.aio.server()
        api_pb2_grpc.add_RegistrationServicer_to_server(self, server)
        # Not bound at kubelet.sock itself: grpc would remove that when the server
        # stops, and a killed kubelet leaves its socket behind.
        add_unix_port(server, self.socket, 0o600)
        await server.start()
        self._server = server

    async def stop(self, *, killed: bool = False) -> None:
        """The kubelet process ends: its server and its plugin connections go away.

        killed: as when systemd restarts it, nothing closes its listener, so
        kubelet.sock stays behind with nobody listening (a dial gets ECONNREFUSED).
        """
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
        if not killed:  # its listener's Close removes the socket
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
        for client in list(self.clients.values()):
            await self._disconnect(client)
        self.clients.clear()

    async def restart(self, *, down_for: float = 0.0) -> None:
        """A kubelet restart: the process killed (its kubelet.sock left behind), `down_for`
        seconds of start-up, then the device manager's Start: every socket in the
        directory removed, kubelet.sock served anew."""
        await self.stop(killed=True)
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.start(clean=True)

    async def __aenter__(self) -> FakeKubelet:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.Empty:
        self.register_requests.append(request)
        if request.version not in SUPPORTED_VERSIONS:
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                f"requested device plugin version {request.version} is not supported",
            )
        if resource_name_problem(request.resource_name) is not None:
            await context.abort(
                grpc.StatusCode.UNKNOWN, f"the ResourceName {request.resource_name!r} is invalid"
            )
        try:
            await self.connect(request.resource_name, self.directory / request.endpoint)
        except ConnectionError as error:
            await context.abort(grpc.StatusCode.UNKNOWN, str(error))
        return api_pb2.Empty()

    async def connect(self, resource_name: str, endpoint: Path) -> None:
        """What the device manager does with a registered plugin: dial, options, stream.

        Shared by Register and by the plugin-watcher path (where `endpoint` comes
        from GetInfo); raises ConnectionError when the plugin cannot be reached.
        """
        channel = grpc.aio.insecure_channel(f"unix:{endpoint}")
        try:
            async with asyncio.timeout(DIAL_TIMEOUT):
                await channel.channel_ready()
            stub = api_pb2_grpc.DevicePluginStub(channel)
            options = await stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=DIAL_TIMEOUT)
        except (TimeoutError, grpc.aio.AioRpcError) as error:
            await channel.close()
            raise ConnectionError(f"cannot connect to {endpoint}: {error}") from error
        client = PluginClient(resource_name, endpoint.name, options, channel, stub)
        old = self.clients.get(resource_name)
        self.clients[resource_name] = client
        client.stream_task = asyncio.create_task(self._list_and_watch(client))
        if old is not None:
            await self._disconnect(old)

    async def _list_and_watch(self, client: PluginClient) -> None:
        try:
            async for response in client.stub.ListAndWatch(api_pb2.Empty()):
                await self._updates_open.wait()
                async with self._changed:
                    client.listed = response
                    client.updates += 1
                    self._changed.notify_all()
        except grpc.aio.AioRpcError:
            pass  # the plugin went away; like the kubelet, never dial back
        finally:
            async with self._changed:
                if self.clients.get(client.resource_name) is client:
                    del self.clients[client.resource_name]
                self._changed.notify_all()

    async def _disconnect(self, client: PluginClient) -> None:
        if client.stream_task is not None:
            client.stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client.stream_task
        await client.channel.close()

    async def wait_for(
        self, predicate: Callable[[dict[str, PluginClient]], bool], timeout: float = 10.0
    ) -> None:
        """Wait until predicate(clients) holds (checked on every registration and update)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.clients))

    async def wait_for_devices(
        self,
        resource: str,
        predicate: Callable[[dict[str, api_pb2.Device]], bool],
        timeout: float = 10.0,
    ) -> dict[str, api_pb2.Device]:
        await self.wait_for(
            lambda clients: resource in clients and predicate(clients[resource].devices), timeout
        )
        return self.clients[resource].devices

    @contextlib.asynccontextmanager
    async def updates_held(self) -> AsyncIterator[None]:
        """A kubelet busy elsewhere: device lists it receives wait until the block ends,
        so its view lags the plugin's (a device removed but still offered)."""
        self._updates_open.clear()
        try:
            yield
        finally:
            self._updates_open.set()

    async def drop_stream(self, resource: str) -> None:
        """Break the ListAndWatch stream of a resource, as a lost connection would."""
        await self._disconnect(self.client(resource))

    def client(self, resource: str) -> PluginClient:
        try:
            return self.clients[resource]
        except KeyError:
            raise LookupError(f"{resource} is not registered") from None

    async def allocate(
        self, resource: str, containers: Sequence[Sequence[str]]
    ) -> api_pb2.AllocateResponse:
        request = api_pb2.AllocateRequest()
        for ids in containers:
            request.container_requests.add(devices_ids=ids)
        return await self.client(resource).stub.Allocate(request)

    async def preferred_allocation(
        self, resource: str, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        request = api_pb2.PreferredAllocationRequest()
        request.container_requests.add(
            available_deviceIDs=available, must_include_deviceIDs=must_include, allocation_size=size
        )
        response = await self.client(resource).stub.GetPreferredAllocation(request)
        return list(response.container_responses[0].deviceIDs)

    async def pre_start(self, resource: str, ids: Sequence[str]) -> None:
        await self.client(resource).stub.PreStartContainer(
            api_pb2.PreStartContainerRequest(devices_ids=ids), timeout=self.pre_start_timeout
        )

    async def admit(self, resource: str, count: int) -> api_pb2.ContainerAllocateResponse:
        """Admit one container asking for `count` devices, then start it.

        As pkg/kubelet/cm/devicemanager/manager.go does (devicesToAllocate, then
        Allocate; PreStartContainer when the container starts). Raises AdmissionError
        where the kubelet would fail the pod.
        """
        client = self.clients.get(resource)
        if client is None:
            raise AdmissionError(f"cannot allocate unregistered device {resource}")
        healthy = client.healthy_ids()
        if not healthy:
            raise AdmissionError(
                f"no healthy devices present; cannot allocate unhealthy devices {resource}"
            )
        available = [i for i in healthy if i not in client.allocated]
        if len(available) < count:
            raise AdmissionError(
                f"requested number of devices unavailable for {resource}. "
                f"Requested: {count}, Available: {len(available)}"
            )
        chosen: list[str] = []
        if client.options.get_preferred_allocation_available:
            preferred = await self._pod_step(
                "GetPreferredAllocation", self.preferred_allocation(resource, available, [], count)
            )
            offered = set(available)
            chosen = [i for i in dict.fromkeys(preferred) if i in offered][:count]
        chosen += [i for i in available if i not in chosen][: count - len(chosen)]
        response = await self._pod_step("Allocate", self.allocate(resource, [chosen]))
        client.allocated.update(chosen)
        if client.options.pre_start_required:
            await self._pod_step("PreStartContainer", self.pre_start(resource, chosen))
        return response.container_responses[0]

    def container_config(self, response: api_pb2.ContainerAllocateResponse) -> ContainerConfig:
        """What this kubelet sends the runtime for a container given `response`."""
        return ContainerConfig.of(response, cdi_field=self.cdi_field)

    @staticmethod
    async def _pod_step(name: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise AdmissionError(
                f"device plugin {name} rpc failed with err: {error.details()}"
            ) from error
