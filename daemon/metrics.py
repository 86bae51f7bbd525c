"""Prometheus metrics, one registry per daemon (no module-level singletons).

RPC counts and latencies come from a gRPC server interceptor on every socket the
daemon serves; everything else is read from the live plugins at scrape time, so the
plugins never know metrics exist.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.logs import REQUEST_ID

if TYPE_CHECKING:
    from daemon.supervisor import Daemon

log = logging.getLogger(__name__)

# Allocate takes ~0.5 ms; CSI operations with mounts and fsyncs take 10 ms to seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "nodeplug_grpc_requests",
            "gRPC calls served, by full method name and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "nodeplug_grpc_request_duration_seconds",
            "Time to answer unary gRPC calls (streams are counted, not timed).",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "nodeplug_config_reloads",
            "Config reloads, by result (applied, unchanged, rejected).",
            ["result"],
            registry=self.registry,
        )

    def observe_daemon(self, daemon: Daemon) -> None:
        self.registry.register(_DaemonCollector(daemon))

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _RpcInterceptor(self)

    def record(self, method: str, code: grpc.StatusCode, seconds: float | None) -> None:
        self.rpcs.labels(method, code.name).inc()
        if seconds is not None:
            self.rpc_seconds.labels(method).observe(seconds)


def _code(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()  # set by context.abort()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class _RpcInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call, and gives it a request id for the logs."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metrics = self._metrics
        if handler.unary_unary is not None:
            # The stubs type behaviours for the sync server; grpc.aio's are coroutines.
            inner_unary: Any = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                token = REQUEST_ID.set(secrets.token_hex(4))
                started = time.perf_counter()
                error: BaseException | None = None
                try:
                    return await inner_unary(request, context)
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    metrics.record(method, _code(context, error), time.perf_counter() - started)
                    REQUEST_ID.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream: Any = handler.unary_stream

            async def stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                token = REQUEST_ID.set(secrets.token_hex(4))
                error: BaseException | None = None
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    metrics.record(method, _code(context, error), None)
                    REQUEST_ID.reset(token)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # client-streaming methods: none of our APIs have them


class _DaemonCollector(Collector):
    """Reads the live daemon at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterable[Metric]:
        daemon = self._daemon
        devices = GaugeMetricFamily(
            "nodeplug_devices",
            "Allocatable devices by resource and health.",
            labels=["resource", "health"],
        )
        registrations = CounterMetricFamily(
            "nodeplug_device_plugin_registrations",
            "Successful registrations with the kubelet, by resource.",
            labels=["resource"],
        )
        for plugin in daemon.plugins.values():
            units = plugin.state.units.values()
            healthy = sum(1 for unit in units if unit.healthy)
            devices.add_metric([plugin.resource_name, "Healthy"], healthy)
            devices.add_metric([plugin.resource_name, "Unhealthy"], len(units) - healthy)
            registrations.add_metric([plugin.resource_name], plugin.stats.registrations)
        yield devices
        yield registrations
        yield CounterMetricFamily(
            "nodeplug_kubelet_restarts_seen",
            "Times kubelet.sock was created while the daemon watched (kubelet (re)starts).",
            value=daemon.kubelet_restarts_seen,
        )
        ready = GaugeMetricFamily(
            "nodeplug_ready",
            "1 when the component is registered with the kubelet.",
            labels=["component"],
        )
        for component, is_ready in daemon.readiness().items():
            ready.add_metric([component], 1 if is_ready else 0)
        yield ready
        if daemon.csi is not None:
            yield from daemon.csi.metrics()
        if daemon.dra:
            yield from _dra_metrics(daemon)


def _dra_metrics(daemon: Daemon) -> Iterable[Metric]:
    claims = GaugeMetricFamily(
        "nodeplug_dra_prepared_claims", "Claims prepared and not yet unprepared.", labels=["driver"]
    )
    published = GaugeMetricFamily(
        "nodeplug_dra_published_devices",
        "Devices in the driver's ResourceSlices.",
        labels=["driver"],
    )
    in_sync = GaugeMetricFamily(
        "nodeplug_dra_slices_in_sync",
        "1 when the ResourceSlices on the API server match the backend's devices.",
        labels=["driver"],
    )
    writes = CounterMetricFamily(
        "nodeplug_dra_slice_writes",
        "ResourceSlice writes, by operation (create, update, delete, conflict).",
        labels=["driver", "operation"],
    )
    for plugin in daemon.dra.values():
        driver = plugin.driver
        claims.add_metric([plugin.name], len(driver.checkpoint.claims))
        published.add_metric([plugin.name], driver.publisher.published_devices)
        in_sync.add_metric([plugin.name], 1 if driver.publisher.in_sync.is_set() else 0)
        stats = driver.publisher.stats
        for operation, count in (
            ("create", stats.creates),
            ("update", stats.updates),
            ("delete", stats.deletes),
            ("conflict", stats.conflicts),
        ):
            writes.add_metric([plugin.name, operation], count)
    yield from (claims, published, in_sync, writes)
