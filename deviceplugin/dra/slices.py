"""Publish this node's devices of one driver as ResourceSlices, and keep them true.

One pool per node and driver, named after the node; its devices (healthy ones only:
the scheduler must not pick a broken device) in as many slices as the API's limit of
128 devices per slice needs. As k8s.io/dynamic-resource-allocation's resourceslice
controller does: slices are owned by the Node (garbage-collected with it), carry
`spec.nodeName`, are named `<index>-<driver>-<node>-<random>` (generateName) so that a
restarted daemon finds which slice is which, and every change of the pool is published
under a new pool generation, so that a scheduler reading a mix of old and new slices
sees an incomplete pool rather than a wrong one.

The slices on the server are followed with list+watch (field selectors spec.nodeName
and spec.driver: never another node's or driver's slices), and the difference to what
the backend reports is written as it appears: a 409 Conflict or a 410 Gone watch makes
a fresh list, an unreachable API server is retried with a growing delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httpx2
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Node
from lightkube.resources.resource_v1 import ResourceSlice

from deviceplugin.backend import AttributeValue, Device, Version
from deviceplugin.dra.kube import KubeAccess, KubeConfigError
from deviceplugin.dra.names import device_problem

log = logging.getLogger(__name__)

# k8s.io/api/resource/v1 ResourceSliceMaxDevices.
MAX_DEVICES_PER_SLICE = 128
# resourceslice controller: hex index prefix of at least 5 digits, then "-".
_INDEX_MIN_WIDTH = 5
RETRY_FIRST = 0.2
RETRY_MAX = 30.0
Json = dict[str, Any]


class _ResyncError(Exception):
    """Our view of the slices is stale (409 Conflict, 404 Not Found): list again."""


class _NotYetError(Exception):
    """Something the slices need is not there yet (this node's Node object)."""


def device_entry(device: Device, numa_attribute: bool = True) -> Json:
    """A device as resource.k8s.io/v1 Device: name, typed attributes, capacities."""
    attributes: dict[str, AttributeValue] = {}
    if numa_attribute and device.numa_node is not None:
        attributes["numaNode"] = device.numa_node
    attributes.update(device.attributes)
    entry: Json = {"name": device.id}
    if attributes:
        entry["attributes"] = {name: _attribute(v) for name, v in sorted(attributes.items())}
    if device.capacity:
        entry["capacity"] = {name: {"value": q} for name, q in sorted(device.capacity.items())}
    return entry


def _attribute(value: AttributeValue) -> Json:
    if isinstance(value, Version):
        return {"version": value.text}
    if isinstance(value, bool):  # before int: bool is an int in Python
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    return {"string": value}


def publishable(devices: Iterable[Device]) -> list[Json]:
    """Healthy devices that DRA can name, sorted by name; the others are logged and left out."""
    entries = []
    for device in sorted(devices, key=lambda d: d.id):
        problem = device_problem(device, {"numaNode": 0} if device.numa_node is not None else {})
        if problem is not None:
            log.error("device left out of the ResourceSlices: %s", problem)
        elif device.healthy:
            entries.append(device_entry(device))
    return entries


def chunks(entries: Sequence[Json]) -> list[list[Json]]:
    return [
        list(entries[i : i + MAX_DEVICES_PER_SLICE])
        for i in range(0, len(entries), MAX_DEVICES_PER_SLICE)
    ]


def index_width(slices: int) -> int:
    return max(_INDEX_MIN_WIDTH, len(f"{max(slices - 1, 0):x}"))


def slice_index(name: str, width: int) -> int | None:
    prefix, separator, _ = name.partition("-")
    if not separator or len(prefix) != width:
        return None
    try:
        return int(prefix, 16)
    except ValueError:
        return None


@dataclass(slots=True)
class PublisherStats:
    creates: int = 0
    updates: int = 0
    deletes: int = 0
    conflicts: int = 0
    relists: int = 0
    # Times the published pool matched the backend's devices after a change.
    syncs: int = 0


class SlicePublisher:
    def __init__(self, kube: KubeAccess, driver: str, node: str) -> None:
        self.kube = kube
        self.driver = driver
        self.node = node
        self.pool = node
        self.stats = PublisherStats()
        # Set while the slices on the server equal the desired ones.
        self.in_sync = asyncio.Event()
        self._desired: list[list[Json]] = []
        self._have_desired = False
        self._cache: dict[str, ResourceSlice] = {}
        self._listed = asyncio.Event()
        self._wake = asyncio.Event()
        self._node_uid: str | None = None
        self._withdrawn = False
        self._writing = asyncio.Lock()

    @property
    def published_devices(self) -> int:
        """Devices in the slices as last published (what the backend reports, when in sync)."""
        return sum(len(devices) for devices in self._desired) if self.in_sync.is_set() else 0

    @property
    def fields(self) -> dict[str, Any]:
        return {"spec.nodeName": self.node, "spec.driver": self.driver}

    def set_devices(self, devices: Iterable[Device]) -> None:
        """The backend's current devices (with health): publish them soon."""
        desired = chunks(publishable(devices))
        if desired != self._desired or not self._have_desired:
            self._desired = desired
            self._have_desired = True
            self.in_sync.clear()
            self._wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_server())
            tasks.create_task(self._reconcile_loop())

    async def remove_all(self) -> None:
        """Delete every slice of this driver on this node, and publish no more (uninstall)."""
        self._withdrawn = True  # or the watch would see the deletions and publish again
        async with self._writing:  # after a write under way
            client = await self.kube.client()
            async for item in client.list(ResourceSlice, fields=self.fields):
                if self._ours(item):
                    await self._delete(client, item)
        log.info("ResourceSlices removed", extra={"driver": self.driver, "node": self.node})

    # --- following the server -----------------------------------------------------------

    async def _follow_server(self) -> None:
        failures = 0
        while True:
            try:
                client = await self.kube.client()
                version = await self._relist(client)
                failures = 0
                async for kind, item in client.watch(
                    ResourceSlice, fields=self.fields, resource_version=version
                ):
                    self._apply_event(kind, item)
            except ApiError as error:
                if error.status.code == 410:
                    log.info("ResourceSlice watch expired (410 Gone); listing again")
                    continue
                failures += 1
                await self._pause("watching ResourceSlices failed", error, failures)
            except (httpx2.HTTPError, KubeConfigError, OSError) as error:
                failures += 1
                await self._pause("the Kubernetes API is unreachable", error, failures)

    async def _relist(self, client: AsyncClient) -> str:
        listing = client.list(ResourceSlice, fields=self.fields)
        items = [item async for item in listing]
        self._cache = {_name(item): item for item in items if self._ours(item)}
        self.stats.relists += 1
        self._listed.set()
        self._wake.set()
        return listing.resourceVersion

    def _apply_event(self, kind: str, item: ResourceSlice) -> None:
        if not self._ours(item):
            return
        name = _name(item)
        if kind == "DELETED":
            self._cache.pop(name, None)
        else:
            self._cache[name] = item
        self._wake.set()

    def _ours(self, item: ResourceSlice) -> bool:
        # Belt and braces over the field selector: never touch another node's or driver's.
        return item.spec.nodeName == self.node and item.spec.driver == self.driver

    async def _pause(self, what: str, error: Exception | str, failures: int) -> None:
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (failures - 1)) * random.uniform(0.8, 1.2)  # noqa: S311
        log.warning(
            what,
            extra={"driver": self.driver, "error": str(error), "retry_in_s": round(delay, 2)},
        )
        await asyncio.sleep(delay)

    # --- writing -------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._withdrawn or not self._have_desired or not self._listed.is_set():
                continue
            try:
                async with self._writing:
                    if not self._withdrawn:
                        await self._reconcile(await self.kube.client())
                failures = 0
            except _ResyncError as error:
                failures += 1
                self.stats.conflicts += 1
                log.info(
                    "ResourceSlices changed under us; listing again", extra={"error": str(error)}
                )
                await self._resync(failures)
            except ApiError as error:  # refused: forbidden (RBAC, admission), invalid, ...
                failures += 1
                self._wake.set()
                status = f"{error.status.code} {error.status.reason}: {error.status.message}"
                await self._pause("the API server refused a ResourceSlice", status, failures)
            except (httpx2.HTTPError, KubeConfigError, OSError, _NotYetError) as error:
                failures += 1
                self._wake.set()
                await self._pause("publishing ResourceSlices failed", error, failures)

    async def _resync(self, failures: int) -> None:
        with contextlib.suppress(httpx2.HTTPError, KubeConfigError, OSError):
            await self._relist(await self.kube.client())
        if failures > 1:
            await asyncio.sleep(min(RETRY_MAX, RETRY_FIRST * 2 ** (failures - 2)))
        self._wake.set()

    async def _reconcile(self, client: AsyncClient) -> None:
        desired = self._desired
        current = sorted(self._cache.values(), key=_name)
        generation = max((s.spec.pool.generation for s in current), default=0)
        width = index_width(len(desired))
        matched: dict[int, ResourceSlice] = {}
        obsolete = []
        for item in current:
            index = slice_index(_name(item), width)
            if (
                item.spec.pool.name != self.pool
                or item.spec.pool.generation < generation
                or index is None
                or index >= len(desired)
                or index in matched
            ):
                obsolete.append(item)
            else:
                matched[index] = item
        stale = [
            i
            for i, item in matched.items()
            if not self._same(item, desired[i], generation, len(desired))
        ]
        missing = [i for i in range(len(desired)) if i not in matched]
        if not (obsolete or stale or missing):
            self._synced()
            return
        if stale or missing:
            generation += 1
        for item in obsolete:
            await self._delete(client, item)
        for index, item in sorted(matched.items()):
            if not self._same(item, desired[index], generation, len(desired)):
                await self._update(client, item, desired[index], generation, len(desired))
        for index in missing:
            await self._create(client, index, desired[index], generation, len(desired), width)
        self._synced()

    def _synced(self) -> None:
        if not self.in_sync.is_set():
            self.stats.syncs += 1
            log.info(
                "ResourceSlices published",
                extra={
                    "driver": self.driver,
                    "slices": len(self._desired),
                    "devices": sum(len(s) for s in self._desired),
                },
            )
        self.in_sync.set()

    def _pool(self, generation: int, count: int) -> Json:
        return {"name": self.pool, "generation": generation, "resourceSliceCount": count}

    def _same(self, item: ResourceSlice, devices: list[Json], generation: int, count: int) -> bool:
        spec = item.spec.to_dict()
        return (
            spec.get("pool") == self._pool(generation, count) and spec.get("devices", []) == devices
        )

    async def _owner(self, client: AsyncClient) -> Json:
        if self._node_uid is None:
            try:
                node = await client.get(Node, self.node)
            except ApiError as error:
                if error.status.code == 404:
                    raise _NotYetError(f"Node {self.node!r} does not exist (yet)") from error
                raise
            self._node_uid = node.metadata.uid  # type: ignore[union-attr]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "name": self.node,
            "uid": self._node_uid,
            "controller": True,
        }

    async def _create(
        self,
        client: AsyncClient,
        index: int,
        devices: list[Json],
        generation: int,
        count: int,
        width: int,
    ) -> None:
        body = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "generateName": f"{index:0{width}x}-{self.driver}-{self.node}-",
                "ownerReferences": [await self._owner(client)],
            },
            "spec": {
                "driver": self.driver,
                "nodeName": self.node,
                "pool": self._pool(generation, count),
                "devices": devices,
            },
        }
        created = await client.create(_slice(body))
        self.stats.creates += 1
        self._cache[_name(created)] = created

    async def _update(
        self,
        client: AsyncClient,
        item: ResourceSlice,
        devices: list[Json],
        generation: int,
        count: int,
    ) -> None:
        body = item.to_dict()
        body["spec"]["pool"] = self._pool(generation, count)
        body["spec"]["devices"] = devices
        try:
            updated = await client.replace(_slice(body))
        except ApiError as error:
            if error.status.code in (404, 409):
                raise _ResyncError(error.status.message) from error
            raise
        self.stats.updates += 1
        self._cache[_name(updated)] = updated

    async def _delete(self, client: AsyncClient, item: ResourceSlice) -> None:
        name = _name(item)
        try:
            await client.delete(ResourceSlice, name)
        except ApiError as error:
            if error.status.code != 404:
                raise
        self.stats.deletes += 1
        self._cache.pop(name, None)


def _name(item: ResourceSlice) -> str:
    assert item.metadata is not None and item.metadata.name  # the server names every object
    return item.metadata.name


def _slice(body: Json) -> ResourceSlice:
    return cast(ResourceSlice, ResourceSlice.from_dict(body))
