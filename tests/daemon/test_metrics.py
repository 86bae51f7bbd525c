"""/metrics text as the reference parser (prometheus-client's) reads it."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import (
    Counter,
    CounterFamily,
    GaugeFamily,
    Histogram,
    Metrics,
    render,
)


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# Help is one line of text to the parser: line breaks and backslashes escaped, no other
# control characters, no whitespace at the ends (it strips them). Label values are quoted.
HELP = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]) | st.sampled_from("\n\\")
).map(str.strip)


@given(
    label=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"])),
    documentation=HELP,
    value=st.floats(allow_nan=False),
)
def test_any_label_value_and_help_survive_the_round_trip(
    label: str, documentation: str, value: float
) -> None:
    gauge = GaugeFamily("nodeplug_x", documentation, labels=["resource"])
    gauge.add_metric([label], value)
    families = list(text_string_to_metric_families(render([gauge]).decode()))
    assert [(f.name, f.type, f.documentation) for f in families] == [
        ("nodeplug_x", "gauge", documentation)
    ]
    (sample,) = families[0].samples
    assert sample.labels == {"resource": label}
    assert sample.value == value


def test_counters_and_histograms_are_written_as_prometheus_client_wrote_them() -> None:
    rpcs = Counter("nodeplug_calls", "Calls.", ["method", "code"])
    rpcs.labels("/a.B/C", "OK").inc()
    rpcs.labels("/a.B/C", "OK").inc(2)
    seconds = Histogram("nodeplug_seconds", "Time.", ["method"], [0.001, 1])
    for value in (0.0005, 0.001, 0.5, 7):
        seconds.labels("/a.B/C").observe(value)
    text = render([*rpcs.collect(), *seconds.collect(), CounterFamily("nodeplug_n", "N.", value=3)])
    samples = parsed(text)
    method = ("method", "/a.B/C")
    assert samples[("nodeplug_calls_total", (("code", "OK"), method))] == 3
    assert samples[("nodeplug_calls_created", (("code", "OK"), method))] > 1.7e9
    assert [
        samples[("nodeplug_seconds_bucket", (("le", le), method))]
        for le in ("0.001", "1.0", "+Inf")
    ] == [2, 3, 4]
    assert samples[("nodeplug_seconds_count", (method,))] == 4
    assert math.isclose(samples[("nodeplug_seconds_sum", (method,))], 7.5015)
    assert samples[("nodeplug_n_total", ())] == 3
    assert b"# TYPE nodeplug_calls_total counter\n" in text
    assert b"# TYPE nodeplug_seconds histogram\n" in text


def test_a_label_count_mismatch_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="takes labels"):
        Counter("nodeplug_c", "C.", ["a", "b"]).labels("only one")


def test_rpcs_are_recorded_by_method_and_code() -> None:
    metrics = Metrics()
    metrics.record("/v1beta1.DevicePlugin/Allocate", grpc.StatusCode.OK, 0.0004)
    metrics.record("/v1beta1.DevicePlugin/Allocate", grpc.StatusCode.INVALID_ARGUMENT, 0.0002)
    metrics.record("/v1beta1.DevicePlugin/ListAndWatch", grpc.StatusCode.CANCELLED, None)
    samples = parsed(metrics.render())
    allocate = ("method", "/v1beta1.DevicePlugin/Allocate")
    assert samples[("nodeplug_grpc_requests_total", (("code", "INVALID_ARGUMENT"), allocate))] == 1
    assert samples[("nodeplug_grpc_request_duration_seconds_count", (allocate,))] == 2
    assert (
        samples[("nodeplug_grpc_request_duration_seconds_bucket", (("le", "0.0005"), allocate))]
        == 2
    )
    listing = ("method", "/v1beta1.DevicePlugin/ListAndWatch")
    assert samples[("nodeplug_grpc_requests_total", (("code", "CANCELLED"), listing))] == 1
    assert ("nodeplug_grpc_request_duration_seconds_count", (listing,)) not in samples
