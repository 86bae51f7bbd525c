"""Whatever arrives on stdin or sits in the config, the provider answers or refuses with
its one clear error: never an unexpected exception (a traceback could show a secret)."""

from __future__ import annotations

import contextlib
import json
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credprovider.api import API_VERSIONS, parse_request
from credprovider.config import MAX_DURATION_NANOSECONDS, parse_duration, validate
from credprovider.errors import ProviderError
from credprovider.wire import dumps, loads

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
request_fields = st.fixed_dictionaries(
    {},
    optional={
        "apiVersion": st.sampled_from(API_VERSIONS) | json_values,
        "kind": st.just("CredentialProviderRequest") | json_values,
        "image": st.text(max_size=30) | json_values,
        "serviceAccountToken": st.text(max_size=30) | json_values,
        "serviceAccountAnnotations": st.dictionaries(st.text(max_size=5), st.text(max_size=5))
        | json_values,
    },
)


@given(st.binary(max_size=200))
def test_any_bytes_are_a_request_or_a_clear_refusal(data: bytes) -> None:
    with contextlib.suppress(ProviderError):
        parse_request(data)


@given(request_fields)
def test_any_json_object_is_a_request_or_a_clear_refusal(fields: dict[str, Any]) -> None:
    try:
        request = parse_request(json.dumps(fields).encode())
    except ProviderError:
        return
    assert request.api_version in API_VERSIONS and request.image


@given(
    st.dictionaries(st.sampled_from(["cacheDuration", "static", "dockerConfig", "x"]), json_values)
)
def test_any_config_document_is_valid_or_a_clear_refusal(document: dict[str, Any]) -> None:
    with contextlib.suppress(ProviderError):
        validate(document)


string_trees = st.recursive(
    st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_wire_reads_json_as_json_does(value: Any) -> None:
    text = json.dumps(value)
    assert loads(text) == json.loads(text)


@given(string_trees)
def test_wire_writes_json_that_json_reads_back(value: Any) -> None:
    assert json.loads(dumps(value)) == value


NANOSECONDS = {"h": 3600 * 10**9, "m": 60 * 10**9, "s": 10**9, "ms": 10**6}
# Every part has digits: without, "1m" then "s" would read as "1ms".
digits = st.text("0123456789", min_size=1, max_size=22)


@given(
    st.lists(
        st.tuples(
            digits,
            st.none() | st.text("0123456789", max_size=18),
            st.sampled_from(list(NANOSECONDS)),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_durations_are_exact_nanoseconds_within_gos_range(
    parts: list[tuple[str, str | None, str]],
) -> None:
    text = "".join(
        f"{whole}{'' if fraction is None else '.' + fraction}{unit}"
        for whole, fraction, unit in parts
    )
    # Go's time.ParseDuration: each part's whole units, plus its fraction cut to the ns.
    exact = sum(
        int(whole or "0") * NANOSECONDS[unit]
        + int(Fraction(int(fraction or "0"), 10 ** len(fraction or "")) * NANOSECONDS[unit])
        for whole, fraction, unit in parts
    )
    if exact > MAX_DURATION_NANOSECONDS:
        with pytest.raises(ValueError, match="longer than Go's longest"):
            parse_duration(text)
    else:
        assert parse_duration(text) == exact


@given(
    st.integers(min_value=1, max_value=50_000), st.sampled_from(["[", '{"a":', '{"apiVersion":['])
)
def test_any_nesting_is_a_request_or_a_clear_refusal(depth: int, opening: str) -> None:
    closing = {"[": "]", '{"a":': "}", '{"apiVersion":[': "]}"}[opening]
    data = (opening * depth + "1" + closing * depth).encode()
    with contextlib.suppress(ProviderError):
        parse_request(data)
