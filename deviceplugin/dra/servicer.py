"""The kubelet-facing gRPC services of a DRA driver, all on its dra.sock.

DRAPlugin is served in both versions the kubelet may pick, v1 (kubelets since 1.34)
and v1beta1 (1.32-1.33); they differ only in v1's optional share_id, which nodeplug
never sets (it publishes no shareable devices). Both delegate to one ClaimPreparer.
A claim that cannot be prepared is an `error` in its own entry, so the other claims
of the call still go through; the kubelet retries what failed. Only a request without
claim UIDs (the response's keys) fails as a whole.

DRAResourceHealth (v1alpha1, KEP-4680) streams every device's health; the kubelet
calls it only with its ResourceHealthStatus feature gate on (alpha, off by default
up to 1.36) and shows the health in the status of pods that hold the device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import grpc

from deviceplugin.dra.claims import ClaimPreparer, ClaimRef, Outcome
from deviceplugin.dra.health.v1alpha1 import api_pb2 as health_pb2
from deviceplugin.dra.health.v1alpha1 import api_pb2_grpc as health_grpc
from deviceplugin.dra.names import device_name_problem
from deviceplugin.dra.v1 import api_pb2 as v1
from deviceplugin.dra.v1 import api_pb2_grpc as v1_grpc
from deviceplugin.dra.v1beta1 import api_pb2 as v1beta1
from deviceplugin.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from deviceplugin.state import DeviceState

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[object, object]


async def _claims(claims: Sequence[Any], context: Context) -> list[ClaimRef]:
    refs = [ClaimRef(c.namespace, c.uid, c.name) for c in claims]
    missing = [index for index, ref in enumerate(refs) if not ref.uid]
    if missing:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"claims{missing}: the claim uid is required"
        )
    return refs


def _fill_prepare(response: Any, outcomes: Mapping[str, Outcome]) -> None:
    """Outcomes into a NodePrepareResourcesResponse of either version (same field names)."""
    for uid, outcome in outcomes.items():
        entry = response.claims[uid]
        if outcome.error:
            entry.error = outcome.error
            continue
        for device in outcome.devices:
            entry.devices.add(
                request_names=list(device.requests),
                pool_name=device.pool,
                device_name=device.device,
                cdi_device_ids=list(device.cdi_ids),
            )


def _fill_unprepare(response: Any, errors: Mapping[str, str]) -> None:
    for uid, error in errors.items():
        response.claims[uid].error = error


class _DraPlugin:
    """DRAPlugin over a ClaimPreparer, for the version whose messages `api` holds."""

    def __init__(self, preparer: ClaimPreparer, api: ModuleType) -> None:
        self.preparer = preparer
        self._api = api

    async def NodePrepareResources(self, request: Any, context: Context) -> Any:
        response = self._api.NodePrepareResourcesResponse()
        claims = await _claims(request.claims, context)
        _fill_prepare(response, await self.preparer.prepare(claims))
        return response

    async def NodeUnprepareResources(self, request: Any, context: Context) -> Any:
        response = self._api.NodeUnprepareResourcesResponse()
        claims = await _claims(request.claims, context)
        _fill_unprepare(response, await self.preparer.unprepare(claims))
        return response


class DraPluginV1(_DraPlugin, v1_grpc.DRAPluginServicer):
    def __init__(self, preparer: ClaimPreparer) -> None:
        super().__init__(preparer, v1)


class DraPluginV1beta1(_DraPlugin, v1beta1_grpc.DRAPluginServicer):
    def __init__(self, preparer: ClaimPreparer) -> None:
        super().__init__(preparer, v1beta1)


class ResourceHealth(health_grpc.DRAResourceHealthServicer):
    """NodeWatchResources: the full health list at once, then again on every change."""

    def __init__(self, state: DeviceState, pool: str, clock: Callable[[], float] = time.time):
        self.state = state
        self.pool = pool
        self._clock = clock

    def snapshot(self) -> health_pb2.NodeWatchResourcesResponse:
        response = health_pb2.NodeWatchResourcesResponse()
        now = int(self._clock())
        for device in self.state.devices.values():
            if device_name_problem(device.id) is not None:
                continue  # not published in the slices either
            response.devices.add(
                device=health_pb2.DeviceIdentifier(pool_name=self.pool, device_name=device.id),
                health=health_pb2.HEALTHY if device.healthy else health_pb2.UNHEALTHY,
                last_updated_time=now,
            )
        return response

    async def NodeWatchResources(
        self, request: health_pb2.NodeWatchResourcesRequest, context: Context
    ) -> AsyncIterator[health_pb2.NodeWatchResourcesResponse]:
        log.info("the kubelet watches device health", extra={"pool": self.pool})
        version = 0
        while (newer := await self.state.wait_newer(version)) is not None:
            version = newer[0]
            yield self.snapshot()


def add_services(server: grpc.aio.Server, preparer: ClaimPreparer, health: ResourceHealth) -> None:
    v1_grpc.add_DRAPluginServicer_to_server(DraPluginV1(preparer), server)
    v1beta1_grpc.add_DRAPluginServicer_to_server(DraPluginV1beta1(preparer), server)
    health_grpc.add_DRAResourceHealthServicer_to_server(health, server)
