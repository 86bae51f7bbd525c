"""NodePrepareResources and NodeUnprepareResources, whatever the API version.

For each claim: read the ResourceClaim from the API server, check that it is the claim
the kubelet means (same UID) and allocated, take the allocation results of this driver
(only ours: a claim may hold devices of other drivers too), let the backend prepare the
devices (its optional `allocate` hook, once per claim), write the claim's CDI spec and
answer CDI device ids per device. Prepared claims are checkpointed (checkpoint.py), so
both calls are idempotent across daemon restarts, and a claim is never prepared twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

from deviceplugin import cdi
from deviceplugin.backend import Allocator, Backend, ContainerEdits, Device
from deviceplugin.dra.checkpoint import Checkpoint, ClaimRecord, PreparedDevice
from deviceplugin.dra.names import claim_problem, uid_problem
from deviceplugin.errors import DevicePluginError, bounded_hook
from deviceplugin.files import write_atomically
from deviceplugin.names import env_name
from deviceplugin.state import DeviceState

log = logging.getLogger(__name__)
T = TypeVar("T")

# Per-claim CDI spec files: "nodeplug_dra-<driver>_<claim uid>.json". Not "nodeplug-*",
# the device plugins' prefix, whose stale files the daemon removes at each start.
CLAIM_SPEC_PREFIX = "nodeplug_dra-"


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """A claim as the kubelet names it in Prepare and Unprepare."""

    namespace: str
    uid: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class AllocatedDevice:
    """One allocation result of a ResourceClaim (status.allocation.devices.results[])."""

    request: str
    driver: str
    pool: str
    device: str


@dataclass(frozen=True, slots=True)
class ClaimInfo:
    uid: str
    allocated: bool
    results: tuple[AllocatedDevice, ...]


class ClaimReader(Protocol):
    """Reads ResourceClaims from the API server (kube.py; a dict in unit tests)."""

    async def read_claim(self, namespace: str, name: str) -> ClaimInfo | None:
        """The claim, or None if it does not exist; raise when the API cannot be asked."""
        ...


@dataclass(frozen=True, slots=True)
class DraSettings:
    resource_name: str
    driver_name: str
    # This node's pool: its name is the node's.
    pool: str
    # CDI kind of the claims' devices (vendor/class): the resource name.
    cdi_kind: str
    hook_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Outcome:
    devices: tuple[PreparedDevice, ...] = ()
    error: str = ""


class ClaimError(Exception):
    """This claim cannot be prepared now; the message goes to the kubelet (and the pod's events)."""


class ClaimPreparer:
    def __init__(
        self,
        settings: DraSettings,
        state: DeviceState,
        backend: Backend,
        claims: ClaimReader,
        checkpoint: Checkpoint,
        cdi_dir: Path,
    ) -> None:
        self.settings = settings
        self.state = state
        self.claims = claims
        self.checkpoint = checkpoint
        self.cdi_dir = cdi_dir
        self._allocator = backend if isinstance(backend, Allocator) else None
        self._ids_env = env_name(settings.resource_name)
        self._locks: dict[str, _ClaimLock] = {}
        self._save_lock = asyncio.Lock()

    def spec_path(self, uid: str) -> Path:
        return self.cdi_dir / f"{CLAIM_SPEC_PREFIX}{self.settings.driver_name}_{uid}.json"

    async def recover(self) -> None:
        """At start: load the checkpoint; delete claim specs of ours it does not know."""
        await asyncio.to_thread(self.checkpoint.load)
        pattern = f"{CLAIM_SPEC_PREFIX}{self.settings.driver_name}_*.json"
        known = {self.spec_path(uid) for uid in self.checkpoint.claims}
        for path in await asyncio.to_thread(lambda: list(self.cdi_dir.glob(pattern))):
            if path not in known:
                log.info("removing a CDI spec of a claim not prepared", extra={"path": str(path)})
                await asyncio.to_thread(_unlink, path)
        if self.checkpoint.claims:
            log.info(
                "DRA checkpoint loaded",
                extra={
                    "driver": self.settings.driver_name,
                    "prepared": list(self.checkpoint.claims),
                },
            )

    # --- the two calls ------------------------------------------------------------------

    async def prepare(self, claims: Sequence[ClaimRef]) -> dict[str, Outcome]:
        outcomes = await asyncio.gather(*(self._prepare_one(claim) for claim in claims))
        return {claim.uid: outcome for claim, outcome in zip(claims, outcomes, strict=True)}

    async def unprepare(self, claims: Sequence[ClaimRef]) -> dict[str, str]:
        errors = await asyncio.gather(*(self._unprepare_one(claim) for claim in claims))
        return {claim.uid: error for claim, error in zip(claims, errors, strict=True)}

    async def _prepare_one(self, claim: ClaimRef) -> Outcome:
        problem = claim_problem(claim.namespace, claim.name, claim.uid)
        if problem is not None:
            return Outcome(error=problem)
        async with self._lock(claim.uid):
            try:
                return Outcome(await self._prepare(claim))
            except ClaimError as error:
                log.warning(
                    "claim not prepared",
                    extra={**self._fields(claim), "error": str(error)},
                )
                return Outcome(error=f"claim {claim} ({claim.uid}): {error}")

    async def _unprepare_one(self, claim: ClaimRef) -> str:
        problem = uid_problem(claim.uid)
        if problem is not None:
            return problem
        async with self._lock(claim.uid):
            try:
                await self._unprepare(claim)
            except OSError as error:
                log.exception("claim not unprepared", extra=self._fields(claim))
                return f"claim {claim} ({claim.uid}): {error}"
            return ""

    async def _prepare(self, claim: ClaimRef) -> tuple[PreparedDevice, ...]:
        record = self.checkpoint.claims.get(claim.uid)
        if record is not None:
            return tuple(record.devices)  # the kubelet asks again: same answer, no new work
        results = await self._our_results(claim)
        devices = self._devices(results)
        edits = ContainerEdits()
        if self._allocator is not None and devices:
            edits = await self._hook(self._allocator.allocate(list(devices.values())))
        answer = self._answer(claim.uid, results, devices, edits)
        document = self._claim_spec(claim.uid, devices, edits)
        try:
            await asyncio.to_thread(write_atomically, self.spec_path(claim.uid), document)
        except OSError as error:
            raise ClaimError(f"cannot write the CDI spec: {error}") from error
        await self._record(claim, answer)
        log.info(
            "claim prepared",
            extra={**self._fields(claim), "devices": [d.device for d in answer]},
        )
        return tuple(answer)

    async def _unprepare(self, claim: ClaimRef) -> None:
        record = self.checkpoint.claims.get(claim.uid)
        await asyncio.to_thread(_unlink, self.spec_path(claim.uid))
        if record is None:
            log.info("claim was not prepared here; nothing to undo", extra=self._fields(claim))
            return
        del self.checkpoint.claims[claim.uid]
        await self._save()
        log.info("claim unprepared", extra=self._fields(claim))

    # --- steps ------------------------------------------------------------------------

    async def _our_results(self, claim: ClaimRef) -> list[AllocatedDevice]:
        try:
            info = await self.claims.read_claim(claim.namespace, claim.name)
        except Exception as error:
            raise ClaimError(f"cannot read the ResourceClaim: {error}") from error
        if info is None:
            raise ClaimError("the ResourceClaim does not exist")
        if info.uid != claim.uid:
            raise ClaimError(f"the ResourceClaim was replaced: its UID is now {info.uid}")
        if not info.allocated:
            raise ClaimError("the ResourceClaim is not allocated")
        ours = [r for r in info.results if r.driver == self.settings.driver_name]
        for result in ours:
            if result.pool != self.settings.pool:
                raise ClaimError(
                    f"device {result.device!r} was allocated from pool {result.pool!r}, "
                    f"not from this node's pool {self.settings.pool!r}"
                )
        return ours

    def _devices(self, results: Sequence[AllocatedDevice]) -> dict[str, Device]:
        devices: dict[str, Device] = {}
        for result in results:
            device = self.state.devices.get(result.device)
            if device is None:
                raise ClaimError(f"device {result.device!r} is not on this node (any more)")
            if not device.healthy:
                raise ClaimError(f"device {result.device!r} is unhealthy")
            devices[device.id] = device
        return devices

    async def _hook(self, call: Awaitable[T]) -> T:
        try:
            return await bounded_hook("allocate", call, self.settings.hook_timeout)
        except DevicePluginError as error:
            raise ClaimError(str(error)) from error

    def _answer(
        self,
        uid: str,
        results: Sequence[AllocatedDevice],
        devices: dict[str, Device],
        edits: ContainerEdits,
    ) -> list[PreparedDevice]:
        kind = self.settings.cdi_kind
        claim_wide = (cdi.qualified_name(kind, uid), *edits.cdi_devices)
        answered_requests: set[str] = set()
        answer = []
        for result in results:
            device = devices[result.device]
            ids = [cdi.qualified_name(kind, _device_name(uid, device.id)), *device.cdi_devices]
            # The claim-wide edits (env, hook edits) once per request: a container may use
            # only some of the claim's requests.
            if result.request not in answered_requests:
                ids += claim_wide
                answered_requests.add(result.request)
            answer.append(PreparedDevice((result.request,), result.pool, result.device, tuple(ids)))
        return answer

    def _claim_spec(self, uid: str, devices: dict[str, Device], edits: ContainerEdits) -> bytes:
        """The claim's CDI spec: one entry per device, one for the claim-wide edits."""
        entries = [replace(d, id=_device_name(uid, d.id)) for d in devices.values()]
        envs = {**edits.envs, self._ids_env: ",".join(devices)}
        entries.append(Device(uid, envs=envs, mounts=edits.mounts, device_nodes=edits.device_nodes))
        document = cdi.spec(self.settings.cdi_kind, entries)
        return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"

    async def _record(self, claim: ClaimRef, devices: list[PreparedDevice]) -> None:
        self.checkpoint.claims[claim.uid] = ClaimRecord(claim.namespace, claim.name, devices)
        await self._save()

    async def _save(self) -> None:
        async with self._save_lock:
            await asyncio.to_thread(self.checkpoint.write, self.checkpoint.document())

    @contextlib.asynccontextmanager
    async def _lock(self, uid: str) -> AsyncIterator[None]:
        """One call at a time per claim; the lock goes away with its last user."""
        lock = self._locks.setdefault(uid, _ClaimLock())
        lock.users += 1
        try:
            async with lock.lock:
                yield
        finally:
            lock.users -= 1
            if lock.users == 0:
                del self._locks[uid]

    def _fields(self, claim: ClaimRef) -> dict[str, str]:
        return {
            "driver": self.settings.driver_name,
            "claim": claim.name,
            "namespace": claim.namespace,
            "uid": claim.uid,
        }


@dataclass(slots=True)
class _ClaimLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def _device_name(uid: str, device_id: str) -> str:
    return f"{uid}-{device_id}"


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
