"""Prometheus metrics, one set per daemon (no module-level singletons).

RPC counts and latencies come from the daemon's gRPC servers (MeteredServer): each
method handler is wrapped once, when its service is added, which costs a call nothing
beyond the wrapper itself; a grpc.aio interceptor, even one that does nothing, costs
~30 µs on every call. Everything else is read from the live plugins at scrape time, so
the plugins never know metrics exist.

The text exposition format (0.0.4) is rendered here: three metric types do not need
prometheus-client, whose import alone cost the resident daemon 4.3 MiB of RSS. Its
names and samples are the ones prometheus-client wrote (`_total`, `_bucket`,
`_created`), so dashboards and alerts see no difference.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import grpc

from daemon.logs import REQUEST_ID

if TYPE_CHECKING:
    from daemon.supervisor import Daemon

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Allocate takes ~0.5 ms; CSI operations with mounts and fsyncs take 10 ms to seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

Labels = tuple[tuple[str, str], ...]
S = TypeVar("S")


class Family:
    """One metric family as a scrape shows it: a name, help, a type and samples."""

    kind: ClassVar[str] = "untyped"
    suffix: ClassVar[str] = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        value: float | None = None,
    ) -> None:
        self.name = name + self.suffix
        self.documentation = documentation
        self.labels = tuple(labels)
        self.samples: list[tuple[str, Labels, float]] = []
        if value is not None:
            self.add_metric((), value)

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.add_sample(self.name, tuple(zip(self.labels, values, strict=True)), value)

    def add_sample(self, name: str, labels: Labels, value: float) -> None:
        self.samples.append((name, labels, value))


class GaugeFamily(Family):
    kind = "gauge"


class CounterFamily(Family):
    kind = "counter"
    suffix = "_total"


class HistogramFamily(Family):
    kind = "histogram"


class _Child:
    """One labelled series of a Counter."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Series(Generic[S]):
    """A metric's labelled series, each made when its label values are first used."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], new: Callable[[], S]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = tuple(labels)
        self._new = new
        self._children: dict[tuple[str, ...], S] = {}

    def labels(self, *values: str) -> S:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
            child = self._children[values] = self._new()
        return child


class Counter(_Series[_Child]):
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(name, documentation, labels, _Child)

    def collect(self) -> Iterable[Family]:
        counts = CounterFamily(self.name, self.documentation, self.label_names)
        created = GaugeFamily(f"{self.name}_created", self.documentation, self.label_names)
        for values, child in self._children.items():
            counts.add_metric(values, child.value)
            created.add_metric(values, child.created)
        return counts, created


class _Buckets:
    """One labelled series of a Histogram: counts per bucket (not cumulative), sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.sum += value
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                return
        self.counts[-1] += 1


class Histogram(_Series[_Buckets]):
    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets)
        super().__init__(name, documentation, labels, lambda: _Buckets(bounds))
        self.bounds = bounds

    def collect(self) -> Iterable[Family]:
        family = HistogramFamily(self.name, self.documentation)
        created = GaugeFamily(f"{self.name}_created", self.documentation, self.label_names)
        for values, child in self._children.items():
            labels = tuple(zip(self.label_names, values, strict=True))
            total = 0
            for bound, count in zip((*self.bounds, math.inf), child.counts, strict=True):
                total += count
                family.add_sample(f"{self.name}_bucket", (*labels, ("le", _number(bound))), total)
            family.add_sample(f"{self.name}_count", labels, total)
            family.add_sample(f"{self.name}_sum", labels, child.sum)
            created.add_metric(values, child.created)
        return family, created


def render(families: Iterable[Family]) -> bytes:
    """Families in the Prometheus text format 0.0.4 (labels sorted, as prometheus-client did)."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.documentation)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for name, labels, value in family.samples:
            if labels:
                pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels))
                lines.append(f"{name}{{{pairs}}} {_number(value)}")
            else:
                lines.append(f"{name} {_number(value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class Metrics:
    def __init__(self) -> None:
        self.rpcs = Counter(
            "nodeplug_grpc_requests",
            "gRPC calls served, by full method name and status code.",
            ["method", "code"],
        )
        self.rpc_seconds = Histogram(
            "nodeplug_grpc_request_duration_seconds",
            "Time to answer unary gRPC calls (streams are counted, not timed).",
            ["method"],
            _LATENCY_BUCKETS,
        )
        self.reloads = Counter(
            "nodeplug_config_reloads",
            "Config reloads, by result (applied, unchanged, rejected).",
            ["result"],
        )
        self._daemon: Daemon | None = None

    def observe_daemon(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def server(self) -> grpc.aio.Server:
        """A grpc.aio server whose every call is counted, timed and given a request id."""
        return MeteredServer(self)

    def record(self, method: str, code: grpc.StatusCode, seconds: float | None) -> None:
        self.rpcs.labels(method, code.name).inc()
        if seconds is not None:
            self.rpc_seconds.labels(method).observe(seconds)

    def collect(self) -> Iterable[Family]:
        yield from self.rpcs.collect()
        yield from self.rpc_seconds.collect()
        yield from self.reloads.collect()
        if self._daemon is not None:
            yield from _daemon_metrics(self._daemon)

    def render(self) -> bytes:
        """What /metrics answers."""
        return render(self.collect())


def _request_id() -> str:
    # Correlates log lines, nothing more: no secret, so no system call per request.
    return f"{random.getrandbits(32):08x}"


def _code(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()  # set by context.abort()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _metered(
    method: str, handler: grpc.RpcMethodHandler[Any, Any], metrics: Metrics
) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler, counting and timing each call and giving it a request id for the logs."""
    if handler.unary_unary is not None:
        # The stubs type behaviours for the sync server; grpc.aio's are coroutines.
        inner_unary: Any = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = REQUEST_ID.set(_request_id())
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
            token = REQUEST_ID.set(_request_id())
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


class _MeteredGenericHandler(grpc.GenericRpcHandler):
    """A generic handler's answers, metered (each method wrapped once, when first called)."""

    def __init__(self, inner: grpc.GenericRpcHandler, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None  # not cached: method names come from clients
        wrapped = self._wrapped[method] = _metered(method, handler, self._metrics)
        return wrapped


class MeteredServer(grpc.aio.Server):
    """A grpc.aio server that meters the services added to it (see the module's doc)."""

    def __init__(self, metrics: Metrics) -> None:
        self._server = grpc.aio.server()
        self._metrics = metrics

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            [_MeteredGenericHandler(h, self._metrics) for h in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name,
            {
                name: _metered(f"/{service_name}/{name}", handler, self._metrics)
                for name, handler in method_handlers.items()
            },
        )

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)


def _daemon_metrics(daemon: Daemon) -> Iterable[Family]:
    """What the live daemon holds, read at scrape time."""
    devices = GaugeFamily(
        "nodeplug_devices",
        "Allocatable devices by resource and health.",
        labels=["resource", "health"],
    )
    registrations = CounterFamily(
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
    yield CounterFamily(
        "nodeplug_kubelet_restarts_seen",
        "Times kubelet.sock was created while the daemon watched (kubelet (re)starts).",
        value=daemon.kubelet_restarts_seen,
    )
    ready = GaugeFamily(
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


def _dra_metrics(daemon: Daemon) -> Iterable[Family]:
    claims = GaugeFamily(
        "nodeplug_dra_prepared_claims", "Claims prepared and not yet unprepared.", labels=["driver"]
    )
    published = GaugeFamily(
        "nodeplug_dra_published_devices",
        "Devices in the driver's ResourceSlices.",
        labels=["driver"],
    )
    in_sync = GaugeFamily(
        "nodeplug_dra_slices_in_sync",
        "1 when the ResourceSlices on the API server match the backend's devices.",
        labels=["driver"],
    )
    writes = CounterFamily(
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
