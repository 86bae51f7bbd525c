"""The API a hardware vendor implements: report devices, optionally hook allocation.

A backend only describes devices. It yields whole snapshots (every device it sees, each
time anything changes); the framework diffs them, talks gRPC to the kubelet, validates
requests and answers Allocate from the snapshot. Everything optional is a separate small
Protocol the framework detects with isinstance().
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

ENTRY_POINT_GROUP = "nodeplug.device_backends"


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A device node to create in the container (a cgroup device rule plus a node)."""

    host_path: str
    # None: the same path as on the host.
    container_path: str | None = None
    # Any of r, w, m: read, write, mknod.
    permissions: str = "rw"


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path to bind into the container (libraries, firmware, control files)."""

    host_path: str
    container_path: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Version:
    """A DRA attribute value that is a semantic version (semver.org 2.0.0), e.g. "1.4.2".

    Plain strings compare as text in CEL; versions compare as versions.
    """

    text: str


AttributeValue = bool | int | str | Version


class _NoEntries(Mapping[str, Any]):
    """The one empty mapping every Device (and ContainerEdits) field left unset shares.

    A list of tens of thousands of devices would otherwise carry four empty dicts per
    device: memory, and containers the garbage collector walks again and again while
    the list is built. Read-only, as the fields' Mapping type promises, so sharing is
    safe; hashable, so it can be a plain dataclass default (no factory call per field
    per device). Equal to {}.
    """

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"


_NO_ENTRIES: Mapping[str, Any] = _NoEntries()


@dataclass(frozen=True, slots=True)
class Device:
    """One physical device as the backend sees it right now.

    `id` is what the kubelet and pods see: keep it short (at most 63 characters),
    stable across restarts, and free of whitespace and commas.
    """

    id: str
    healthy: bool = True
    # NUMA node the device is attached to; None when unknown or not NUMA.
    numa_node: int | None = None
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    envs: Mapping[str, str] = _NO_ENTRIES
    annotations: Mapping[str, str] = _NO_ENTRIES
    # Fully qualified CDI device names ("vendor.example/fpga=fpga0").
    cdi_devices: tuple[str, ...] = ()
    # DRA only (ignored by device plugins): what a scheduler can select devices by,
    # with CEL. Names are C identifiers ("model"), in the driver's own domain, or
    # qualified ("vendor.example/firmware"); values at most 64 characters.
    attributes: Mapping[str, AttributeValue] = _NO_ENTRIES
    # DRA only: capacities as Kubernetes quantities, e.g. {"memory": "16Gi"}.
    capacity: Mapping[str, str] = _NO_ENTRIES


@dataclass(frozen=True, slots=True)
class ContainerEdits:
    """Extra edits an Allocator adds for one container, on top of the devices' own."""

    envs: Mapping[str, str] = _NO_ENTRIES
    mounts: tuple[Mount, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    annotations: Mapping[str, str] = _NO_ENTRIES
    cdi_devices: tuple[str, ...] = ()


class Backend(Protocol):
    """What every backend implements."""

    def watch(self) -> AsyncIterator[Sequence[Device]]:
        """Yield the complete device list at once, then again after every change.

        Runs for the life of the plugin; never block the event loop in it (use
        asyncio.to_thread for blocking SDK calls). Raising ends the plugin.
        """
        ...


@runtime_checkable
class Allocator(Protocol):
    """Optional: run device-specific work when a container is given devices."""

    async def allocate(self, devices: Sequence[Device]) -> ContainerEdits:
        """Prepare the devices for one container; raise to fail the allocation.

        The kubelet waits for Allocate without a timeout of its own (pod admission
        waits with it), so the framework bounds the hook by the resource's
        `hookTimeout`; keep it fast.
        """
        ...


@runtime_checkable
class PreStarter(Protocol):
    """Optional: the kubelet calls PreStartContainer before each container start."""

    async def pre_start(self, devices: Sequence[Device]) -> None:
        """Reset or initialise the devices; raise to fail the container start.

        The kubelet gives PreStartContainer 30 s; the hook is cut at `hookTimeout`
        or shortly before the kubelet's deadline, whichever comes first, so that the
        kubelet hears why.
        """
        ...


@runtime_checkable
class HealthChecker(Protocol):
    """Optional: a periodic health probe, for hardware without health events.

    Prefer yielding a new snapshot from watch() when the hardware reports a change;
    use this only where health can be learnt by asking.
    """

    health_check_interval: float

    async def check_health(self, devices: Sequence[Device]) -> Mapping[str, bool]:
        """Return {device id: healthy} for the devices whose health is known."""
        ...


BackendFactory = Callable[[Mapping[str, Any]], Backend]


class BackendNotFoundError(LookupError):
    pass


def available_backends() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_backend_factory(name: str) -> BackendFactory:
    """Find a backend by name among the `nodeplug.device_backends` entry points."""
    backends = available_backends()
    if name not in backends:
        known = ", ".join(sorted(backends)) or "none installed"
        raise BackendNotFoundError(f"unknown backend {name!r} (available: {known})")
    factory: BackendFactory = backends[name].load()
    return factory
