"""Resource names as the kubelet's IsExtendedResourceName judges them; ids; socket names."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from deviceplugin.backends.common import device_id, device_ids
from deviceplugin.names import (
    MAX_SOCKET_PATH,
    all_plainly_usable,
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


# Ids near every rule's edge: ASCII around space, comma and DEL, long ids, non-ASCII.
EDGY_IDS = st.text(st.characters(max_codepoint=0x2030), max_size=70) | st.text(
    st.sampled_from(" ,-\x7f\t\nab"), min_size=0, max_size=65
)


@given(st.lists(EDGY_IDS, max_size=8))
@example(["a\nb"])  # the batch's separator inside an id: not two plain ids
def test_the_batch_check_passes_only_usable_ids(ids: list[str]) -> None:
    plainly = all_plainly_usable(ids)
    if plainly:
        assert all(device_id_problem(i) is None for i in ids)
    if ids and all(i.isascii() and device_id_problem(i) is None for i in ids):
        assert plainly, "usable ASCII ids need no check one by one"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("w0", "w0"),
        ("card0.render", "card0.render"),
        ("x" * 63, "x" * 63),
        ("-w0", "w0-16be75849ec0"),
        ("w 0", "w-0-061e36e633ff"),
        ("", "device-e3b0c44298fc"),
    ],
)
def test_device_ids_from_names(name: str, expected: str) -> None:
    assert device_id(name) == expected


@given(EDGY_IDS)
def test_every_name_gets_a_usable_id_and_only_safe_names_keep_theirs(name: str) -> None:
    made = device_id(name)
    assert device_id_problem(made) is None
    assert all_plainly_usable([made])
    safe = name.strip("-") == name and 0 < len(name) <= 63
    safe = safe and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    assert (made == name) is safe


@given(st.lists(EDGY_IDS, max_size=8))
@example(["w0", "w 1"])
@example(["a\nb"])  # a name with the batch's separator: not two safe names
def test_a_batch_of_names_gets_the_ids_each_name_gets(names: list[str]) -> None:
    assert device_ids(names) == [device_id(name) for name in names]


def test_socket_names_fit_the_unix_limit() -> None:
    assert socket_file_name("example.com/widget", 32) == "nodeplug-example.com_widget.sock"
    long_name = "a" * 200 + ".io/widget"
    hashed = socket_file_name(long_name, 32)
    assert hashed.startswith("nodeplug-") and hashed.endswith(".sock")
    assert 32 + 1 + len(hashed) <= MAX_SOCKET_PATH
    assert hashed != socket_file_name("b" * 200 + ".io/widget", 32)


def test_env_names() -> None:
    assert env_name("example.com/shared-widget") == "NODEPLUG_EXAMPLE_COM_SHARED_WIDGET"
