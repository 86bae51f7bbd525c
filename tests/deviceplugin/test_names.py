"""Resource names as the kubelet's IsExtendedResourceName judges them; ids; socket names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deviceplugin.names import (
    MAX_SOCKET_PATH,
    device_id_problem,
    env_name,
    resource_name_problem,
    socket_file_name,
)


@pytest.mark.parametrize(
    "name",
    [
        "example.com/widget",
        "vendor.example/fpga",
        "a/b",
        "nvidia.com/gpu",
        "example.com/A_b.c-9",
        "sub.domain.example.com/" + "x" * 63,
        "a" * 200 + ".io/x",
    ],
)
def test_names_the_kubelet_accepts(name: str) -> None:
    assert resource_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("widget", "domain/name"),
        ("kubernetes.io/widget", "kubernetes.io"),
        ("foo.kubernetes.io/widget", "kubernetes.io"),
        ("requests.example.com/widget", "requests."),
        ("example.com/", "empty"),
        ("/widget", "lowercase DNS"),
        ("Example.com/widget", "lowercase DNS"),
        ("example..com/widget", "lowercase DNS"),
        ("example.com/wid/get", "exactly one"),
        ("example.com/-widget", "alphanumeric"),
        ("example.com/widget-", "alphanumeric"),
        ("example.com/wid get", "alphanumeric"),
        ("example.com/" + "x" * 64, "at most 63"),
        ("a" * 250 + ".io/x", "too long"),
        ("exa_mple.com/widget", "lowercase DNS"),
        ("example.com/wídget", "alphanumeric"),
    ],
)
def test_names_the_kubelet_refuses(name: str, reason: str) -> None:
    problem = resource_name_problem(name)
    assert problem is not None
    assert reason in problem


@given(st.text(max_size=300))
def test_any_string_gets_an_answer(name: str) -> None:
    problem = resource_name_problem(name)
    assert problem is None or isinstance(problem, str)
    if problem is None:
        domain, short = name.split("/")
        assert domain and short and len(short) <= 63 and "kubernetes.io" not in name


@pytest.mark.parametrize(
    ("device_id", "ok"),
    [
        ("gpu0", True),
        ("GPU-fef8089b-4820-abfc-e83e-94318197576e", True),
        ("x" * 63, True),
        ("x" * 64, False),
        ("", False),
        ("a b", False),
        ("a,b", False),
        ("a\nb", False),
        ("a\x00b", False),
    ],
)
def test_device_ids(device_id: str, ok: bool) -> None:
    assert (device_id_problem(device_id) is None) is ok


def test_socket_names_fit_the_unix_limit() -> None:
    assert socket_file_name("example.com/widget", 32) == "nodeplug-example.com_widget.sock"
    long_name = "a" * 200 + ".io/widget"
    hashed = socket_file_name(long_name, 32)
    assert hashed.startswith("nodeplug-") and hashed.endswith(".sock")
    assert 32 + 1 + len(hashed) <= MAX_SOCKET_PATH
    assert hashed != socket_file_name("b" * 200 + ".io/widget", 32)


def test_env_names() -> None:
    assert env_name("example.com/shared-widget") == "NODEPLUG_EXAMPLE_COM_SHARED_WIDGET"
