"""The DevicePlugin gRPC service of one resource (what the kubelet calls on our socket)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc

from deviceplugin import cdi
from deviceplugin.allocation import Policy, check_ids, preferred_allocation
from deviceplugin.backend import Allocator, Backend, ContainerEdits, Device, PreStarter
from deviceplugin.cdi import DeviceListStrategy
from deviceplugin.errors import InvalidRequestError, bounded_hook, grpc_errors, quoted
from deviceplugin.names import env_name
from deviceplugin.state import DeviceState, Unit
from deviceplugin.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
Context = grpc.aio.ServicerContext[object, object]

# k8s.io/kubelet pkg/apis/deviceplugin/v1beta1/constants.go: the device manager calls
# PreStartContainer with this deadline (endpoint.go, preStartContainer), and Allocate
# and GetPreferredAllocation with none (context.Background()).
KUBELET_PRE_START_TIMEOUT = 30.0
# How long before a caller's deadline a hook is cut, so that our error (which names
# the hook) reaches the caller before its own DEADLINE_EXCEEDED: a tenth of the time
# left, at most a second.
_DEADLINE_MARGIN = 0.1
_DEADLINE_MARGIN_MAX = 1.0


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    resource_name: str
    policy: Policy = Policy.SPREAD
    # Bounds the vendor's allocate/pre_start hooks (hookTimeout). Allocate has no
    # deadline on the kubelet's side, so a hung hook would hang pod admission; a
    # pre_start hook is cut sooner if the caller's deadline (the kubelet's 30 s) is.
    hook_timeout: float = 10.0
    # Set when the resource's devices are described in a CDI spec file of this kind.
    cdi_kind: str | None = None
    strategies: frozenset[DeviceListStrategy] = frozenset({DeviceListStrategy.DEVICE_SPECS})


class DevicePluginServicer(api_pb2_grpc.DevicePluginServicer):
    def __init__(
        self,
        settings: ServiceSettings,
        state: DeviceState,
        backend: Backend,
        on_stream_end: Callable[[float], None],
    ) -> None:
        self.settings = settings
        self.state = state
        self.backend = backend
        self.active_streams = 0
        self._on_stream_end = on_stream_end
        # Protocol isinstance() checks are slow; Allocate is latency-critical.
        self._allocator = backend if isinstance(backend, Allocator) else None
        self._pre_starter = backend if isinstance(backend, PreStarter) else None
        self._ids_env = env_name(settings.resource_name)
        self._annotation_key = cdi.annotation_key(settings.resource_name)
        if self._pre_starter is not None and settings.hook_timeout > KUBELET_PRE_START_TIMEOUT:
            log.warning(
                "hookTimeout is longer than the kubelet's PreStartContainer timeout: "
                "pre_start is cut before the kubelet's deadline instead",
                extra={
                    "resource": settings.resource_name,
                    "hook_timeout_s": settings.hook_timeout,
                    "kubelet_timeout_s": KUBELET_PRE_START_TIMEOUT,
                },
            )

    @property
    def options(self) -> api_pb2.DevicePluginOptions:
        # The same options go into RegisterRequest: the kubelet reads them from here.
        return api_pb2.DevicePluginOptions(
            pre_start_required=self._pre_starter is not None,
            get_preferred_allocation_available=True,
        )

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: Context
    ) -> api_pb2.DevicePluginOptions:
        return self.options

    async def ListAndWatch(
        self, request: api_pb2.Empty, context: Context
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        self.active_streams += 1
        started = time.monotonic()
        try:
            version = 0
            while (newer := await self.state.wait_newer(version)) is not None:
                version, response = newer
                yield response
        finally:
            self.active_streams -= 1
            self._on_stream_end(started)

    @grpc_errors
    async def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: Context
    ) -> api_pb2.PreferredAllocationResponse:
        response = api_pb2.PreferredAllocationResponse()
        for container in request.container_requests:
            chosen = preferred_allocation(
                self.state,
                container.available_deviceIDs,
                container.must_include_deviceIDs,
                container.allocation_size,
                self.settings.policy,
            )
            response.container_responses.add(deviceIDs=chosen)
        return response

    @grpc_errors
    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: Context
    ) -> api_pb2.AllocateResponse:
        # Validate every container before running any hook: no partial allocations.
        containers = [
            self._usable_units(f"container_requests[{index}].devices_ids", container.devices_ids)
            for index, container in enumerate(request.container_requests)
        ]
        response = api_pb2.AllocateResponse()
        for units in containers:
            devices = _physical(units)
            edits = ContainerEdits()
            if self._allocator is not None:
                edits = await self._hook("allocate", self._allocator.allocate(devices), context)
            container = response.container_responses.add()
            ids = [unit.id for unit in units]
            container.envs[self._ids_env] = ",".join(ids)
            log.info("allocated", extra={"resource": self.settings.resource_name, "devices": ids})
            self._deliver(container, devices, edits)
        return response

    @grpc_errors
    async def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: Context
    ) -> api_pb2.PreStartContainerResponse:
        units = check_ids("devices_ids", request.devices_ids, self.state.units)
        if self._pre_starter is not None:
            call = self._pre_starter.pre_start(_physical(units))
            await self._hook("pre_start", call, context, KUBELET_PRE_START_TIMEOUT)
        return api_pb2.PreStartContainerResponse()

    def _deliver(
        self,
        container: api_pb2.ContainerAllocateResponse,
        devices: Sequence[Device],
        edits: ContainerEdits,
    ) -> None:
        """Put the devices into the response the ways the resource's strategies say.

        A device our CDI spec describes travels as its CDI name (and as plain edits too
        with deviceSpecs); one it cannot describe (an id CDI refuses) always as plain
        edits. A backend's own CDI names go wherever CDI names go, and in the CDI
        field when no CDI strategy is chosen. The Allocator's per-container edits are
        in no spec: they always travel plain.
        """
        strategies = self.settings.strategies
        kind = self.settings.cdi_kind
        names: dict[str, None] = {}
        parts = []
        for device in devices:
            described = kind is not None and cdi.usable_name(device.id)
            if kind is not None and described:
                names[cdi.qualified_name(kind, device.id)] = None
            if not described or DeviceListStrategy.DEVICE_SPECS in strategies:
                parts.append(
                    ContainerEdits(
                        device.envs, device.mounts, device.device_nodes, device.annotations
                    )
                )
            else:
                parts.append(ContainerEdits(annotations=device.annotations))
            names.update(dict.fromkeys(device.cdi_devices))
        names.update(dict.fromkeys(edits.cdi_devices))
        _apply(container, [*parts, edits])
        if not names:
            return
        if DeviceListStrategy.CDI_FIELD in strategies or not strategies & cdi.CDI_STRATEGIES:
            for name in names:
                container.cdi_devices.add(name=name)
        if DeviceListStrategy.CDI_ANNOTATIONS in strategies:
            container.annotations[self._annotation_key] = ",".join(names)

    def _usable_units(self, field: str, ids: Sequence[str]) -> list[Unit]:
        if not ids:
            raise InvalidRequestError(f"{field} is empty")
        units = check_ids(field, ids, self.state.units)
        for unit in units:
            if not unit.healthy:
                raise InvalidRequestError(f"{field}: device {quoted(unit.id)} is unhealthy")
        return units

    async def _hook(
        self,
        name: str,
        call: Awaitable[T],
        context: Context,
        caller_timeout: float | None = None,
    ) -> T:
        """Run a vendor hook within hookTimeout and before the caller gives up.

        caller_timeout: the deadline the kubelet sets for this call, used when the
        request carries none (another client); a deadline it carries wins.
        """
        limit, reason = self.settings.hook_timeout, "hookTimeout"
        # grpc returns None when the call carries no deadline; its stubs say float.
        remaining = cast("float | None", context.time_remaining())
        if remaining is None:
            remaining = caller_timeout
        if remaining is not None:
            cut = remaining - min(_DEADLINE_MARGIN_MAX, remaining * _DEADLINE_MARGIN)
            if cut < limit:
                limit, reason = max(cut, 0.0), "before the caller's deadline"
        return await bounded_hook(name, call, limit, reason)


def _physical(units: Sequence[Unit]) -> list[Device]:
    """The distinct physical devices behind some units, in order (replicas share one)."""
    return list({unit.device.id: unit.device for unit in units}.values())


def _apply(container: api_pb2.ContainerAllocateResponse, parts: Sequence[ContainerEdits]) -> None:
    """Merge plain edits into a response: a later part wins a container path or env name."""
    nodes = {}
    mounts = {}
    for part in parts:
        for node in part.device_nodes:
            nodes[node.container_path or node.host_path] = node
        for mount in part.mounts:
            mounts[mount.container_path] = mount
        # A protobuf map's update() is MutableMapping's, key by key in Python: skip empties.
        if part.envs:
            container.envs.update(part.envs)
        if part.annotations:
            container.annotations.update(part.annotations)
    for path, node in nodes.items():
        container.devices.add(
            container_path=path, host_path=node.host_path, permissions=node.permissions
        )
    for mount in mounts.values():
        container.mounts.add(
            container_path=mount.container_path,
            host_path=mount.host_path,
            read_only=mount.read_only,
        )
