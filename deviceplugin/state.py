"""A resource's devices as the kubelet sees them: the one place device state lives.

The backend's snapshots of physical devices come in; out go the allocatable units
(one per device, or `replicas` per device when shared), a prebuilt ListAndWatch
response, and a wake-up for every stream when something the kubelet sees changed.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from deviceplugin.backend import Device
from deviceplugin.names import all_plainly_usable, device_id_problem
from deviceplugin.v1beta1 import api_pb2

log = logging.getLogger(__name__)

_ID = operator.attrgetter("id")
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
REPLICA_SEPARATOR = "::"
# The kubelet's gRPC client keeps grpc-go's default receive limit.
KUBELET_MAX_MESSAGE = 4 * 1024 * 1024
# Below this many ids a list cannot reach the limit (an entry is at most ~90 bytes).
_SIZE_CHECK_FROM = 40_000


class Unit(NamedTuple):
    """One allocatable id: a whole device, or one replica of a shared device.

    A named tuple: a resource can have tens of thousands, made on every change, and
    a tuple is made in a fraction of a frozen dataclass's time.
    """

    id: str
    device: Device

    @property
    def healthy(self) -> bool:
        return self.device.healthy


class _WholeDevices(Mapping[str, Unit]):
    """The units of a resource without replicas: one per device, each made when asked for.

    Made on every change, tens of thousands of units would be work for nothing (an
    Allocate looks up a few) and objects for the garbage collector to walk, again and
    again, while a large first list is being built.
    """

    __slots__ = ("_devices",)

    def __init__(self, devices: Mapping[str, Device]) -> None:
        self._devices = devices

    def __getitem__(self, unit_id: str) -> Unit:
        return Unit(unit_id, self._devices[unit_id])

    def __contains__(self, unit_id: object) -> bool:
        return unit_id in self._devices

    def __iter__(self) -> Iterator[str]:
        return iter(self._devices)

    def __len__(self) -> int:
        return len(self._devices)


@dataclass(frozen=True, slots=True)
class Diff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    # Anything about the device changed (health, NUMA node, nodes, mounts, ...).
    changed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class DeviceState:
    """Current devices of one resource, with change notification for ListAndWatch."""

    def __init__(self, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.replicas = replicas
        self.devices: dict[str, Device] = {}
        self.units: Mapping[str, Unit] = {}
        self.version = 0
        self.response = api_pb2.ListAndWatchResponse()
        self._changed = asyncio.Event()
        self.closed = False
        self._health_overrides: dict[str, bool] = {}
        # The backend's last snapshot by id (its usable devices), before health overrides.
        self._reported: dict[str, Device] = {}

    @property
    def reported(self) -> list[Device]:
        """The backend's last snapshot (its usable devices), before health-check overrides."""
        return list(self._reported.values())

    def update(self, snapshot: Sequence[Device]) -> Diff:
        """Replace the device list with a backend snapshot; return what changed."""
        self._reported = self._valid(snapshot)
        return self._rebuild()

    def set_health(self, health: dict[str, bool]) -> Diff:
        """Apply health-check results on top of the backend's snapshot."""
        self._health_overrides = dict(health)
        return self._rebuild()

    async def wait_newer(self, version: int) -> tuple[int, api_pb2.ListAndWatchResponse] | None:
        """Wait until the state is newer than `version`; return the new version and list.

        None means the state was closed (the plugin is stopping): streams end cleanly
        instead of holding the server's shutdown grace period.
        """
        while self.version <= version and not self.closed:
            await self._changed.wait()
        if self.closed:
            return None
        return self.version, self.response

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    def _rebuild(self) -> Diff:
        devices = self._reported  # never changed in place: shared until the next update
        if self._health_overrides:
            devices = {}
            for reported in self._reported.values():
                override = self._health_overrides.get(reported.id)
                if override is None or override == reported.healthy:
                    devices[reported.id] = reported
                else:
                    devices[reported.id] = replace(reported, healthy=override)
        diff = _diff(self.devices, devices)
        self.devices = devices
        self.units = self._expand(devices)
        if diff or self.version == 0:
            pairs = devices.items() if self.replicas == 1 else self.units.values()
            self.response = _list_response(pairs)
            _warn_if_too_large(self.response, len(self.units))
            self.version += 1
            self._changed.set()
            self._changed = asyncio.Event()
        return diff

    def _expand(self, devices: dict[str, Device]) -> Mapping[str, Unit]:
        if self.replicas == 1:
            return _WholeDevices(devices)
        return {
            unit_id: Unit(unit_id, device)
            for device in devices.values()
            for unit_id in (f"{device.id}{REPLICA_SEPARATOR}{i}" for i in range(self.replicas))
        }

    def _valid(self, snapshot: Sequence[Device]) -> dict[str, Device]:
        """The snapshot by id, less (and logging) devices the kubelet could not take,
        instead of failing the resource. Whole snapshots checked at C speed first."""
        ids = list(map(_ID, snapshot))
        by_id = dict(zip(ids, snapshot, strict=True))
        if (
            len(by_id) == len(ids)
            and all_plainly_usable(ids)
            and (self.replicas == 1 or not any(REPLICA_SEPARATOR in i for i in ids))
        ):
            return by_id
        valid: dict[str, Device] = {}
        for device in snapshot:
            problem = device_id_problem(device.id)
            if problem is None and self.replicas > 1 and REPLICA_SEPARATOR in device.id:
                problem = f"device id {device.id!r} contains {REPLICA_SEPARATOR!r}"
            if problem is None and device.id in valid:
                problem = f"device id {device.id!r} reported twice"
            if problem is not None:
                log.error("backend reported an unusable device, ignoring it: %s", problem)
                continue
            valid[device.id] = device
        return valid


def _diff(old: dict[str, Device], new: dict[str, Device]) -> Diff:
    if not old:  # the first snapshot: nothing to compare
        return Diff(added=tuple(sorted(new)), removed=(), changed=())
    return Diff(
        added=tuple(sorted(new.keys() - old.keys())),
        removed=tuple(sorted(old.keys() - new.keys())),
        changed=tuple(sorted(i for i in new.keys() & old.keys() if new[i] != old[i])),
    )


def _warn_if_too_large(response: api_pb2.ListAndWatchResponse, units: int) -> None:
    """The kubelet refuses (and drops the stream of) a device list over its 4 MiB limit."""
    if units < _SIZE_CHECK_FROM:
        return  # even 63-character ids with topology stay far below the limit
    size = response.ByteSize()
    if size > KUBELET_MAX_MESSAGE:
        log.error(
            "device list too large for the kubelet: use shorter ids or fewer replicas",
            extra={"bytes": size, "limit": KUBELET_MAX_MESSAGE, "devices": units},
        )


def _list_response(units: Iterable[tuple[str, Device]]) -> api_pb2.ListAndWatchResponse:
    """The device list the kubelet gets, from (unit id, device) pairs.

    Written in the protobuf wire format and parsed once: building tens of thousands
    of Device messages field by field through the protobuf API took ~7 us each. Only
    the framing and the ID field are written here; everything else about a device
    (health, topology) is the protobuf library's own encoding of a Device without ID,
    one per distinct (health, NUMA node). Fields concatenated in field order are the
    canonical encoding (tests/deviceplugin/test_state.py compares the two). The bytes
    before an id depend only on its length and its tail's: made once per pair.
    """
    tails: dict[tuple[bool, int | None], bytes] = {}
    heads: dict[tuple[int, int], bytes] = {}
    parts: list[bytes] = []
    for unit_id, device in units:
        key = (device.healthy, device.numa_node)
        tail = tails.get(key)
        if tail is None:
            tail = tails[key] = _device_without_id(*key).SerializeToString()
        identifier = unit_id.encode()
        lengths = (len(identifier), len(tail))
        head = heads.get(lengths)
        if head is None:
            framed_id = _ID_TAG + _varint(lengths[0])
            entry_length = len(framed_id) + lengths[0] + lengths[1]
            head = heads[lengths] = _DEVICES_TAG + _varint(entry_length) + framed_id
        parts += (head, identifier, tail)
    return api_pb2.ListAndWatchResponse.FromString(b"".join(parts))


# Field 1, wire type 2 (length-delimited): Device.ID, ListAndWatchResponse.devices.
_ID_TAG = _DEVICES_TAG = bytes([1 << 3 | 2])


def _device_without_id(healthy: bool, numa_node: int | None) -> api_pb2.Device:
    device = api_pb2.Device(health=HEALTHY if healthy else UNHEALTHY)
    if numa_node is not None:
        device.topology.nodes.add(ID=numa_node)
    return device


def _varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint: 7 bits a byte, low first."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
