"""DeviceState: snapshots in, diffs and ListAndWatch responses out."""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deviceplugin.backend import Device
from deviceplugin.names import device_id_problem
from deviceplugin.state import DeviceState
from deviceplugin.v1beta1 import api_pb2


async def test_diff_reports_what_the_kubelet_sees_changing() -> None:
    state = DeviceState()
    first = state.update([Device("a"), Device("b", numa_node=0)])
    assert first.added == ("a", "b") and state.version == 1
    same = state.update([Device("a"), Device("b", numa_node=0)])
    assert not same and state.version == 1, "no change, no push"
    changed = state.update([Device("a", healthy=False), Device("b", numa_node=1), Device("c")])
    assert changed.changed == ("a", "b") and changed.added == ("c",)
    gone = state.update([Device("c")])
    assert gone.removed == ("a", "b")
    assert [d.ID for d in state.response.devices] == ["c"]


async def test_first_snapshot_is_published_even_when_empty() -> None:
    state = DeviceState()
    state.update([])
    assert state.version == 1
    assert await state.wait_newer(0) == (1, state.response)


async def test_waiters_wake_on_change_and_on_close() -> None:
    state = DeviceState()
    state.update([Device("a")])
    waiter = asyncio.create_task(state.wait_newer(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    state.update([Device("a"), Device("b")])
    version, response = await asyncio.wait_for(waiter, 1) or (0, None)
    assert version == 2 and response is not None and len(response.devices) == 2
    closing = asyncio.create_task(state.wait_newer(2))
    state.close()
    assert await asyncio.wait_for(closing, 1) is None


@pytest.mark.parametrize(
    ("device_id", "replicas"),
    [("", 1), ("x" * 64, 1), ("a b", 1), ("a::0", 2), ("dup", 1)],
)
async def test_unusable_devices_are_dropped_and_logged(
    device_id: str, replicas: int, caplog: pytest.LogCaptureFixture
) -> None:
    state = DeviceState(replicas)
    with caplog.at_level(logging.ERROR):
        state.update([Device("ok"), Device(device_id), Device("dup")])
    assert set(state.devices) == {"ok", "dup"}
    assert "unusable device" in caplog.text


@given(
    ids=st.lists(
        st.sampled_from(["a", "b", "a::0", "x" * 63, "x" * 64, "a b", "a,b", "", "é"])
        | st.text(max_size=4),
        max_size=8,
    ),
    replicas=st.integers(1, 2),
)
def test_a_snapshot_keeps_each_usable_id_once_in_order(ids: list[str], replicas: int) -> None:
    state = DeviceState(replicas)
    state.update([Device(i) for i in ids])
    usable = [i for i in ids if device_id_problem(i) is None and not (replicas > 1 and "::" in i)]
    assert list(state.devices) == list(dict.fromkeys(usable))
    assert [d.id for d in state.reported] == list(state.devices)


def test_units_are_the_devices_or_their_replicas() -> None:
    whole = DeviceState()
    whole.update([Device("a"), Device("b", healthy=False)])
    assert dict(whole.units) == {"a": ("a", Device("a")), "b": ("b", Device("b", healthy=False))}
    assert len(whole.units) == 2 and "a" in whole.units and "a::0" not in whole.units
    assert whole.units.get("c") is None and not whole.units["b"].healthy
    shared = DeviceState(replicas=2)
    shared.update([Device("a")])
    assert dict(shared.units) == {"a::0": ("a::0", Device("a")), "a::1": ("a::1", Device("a"))}
    assert "a" not in shared.units


async def test_replicas_expand_with_topology() -> None:
    state = DeviceState(replicas=2)
    state.update([Device("gpu0", numa_node=1)])
    assert [(d.ID, d.topology.nodes[0].ID) for d in state.response.devices] == [
        ("gpu0::0", 1),
        ("gpu0::1", 1),
    ]


async def test_health_overrides_apply_on_top_of_snapshots() -> None:
    state = DeviceState()
    state.update([Device("a"), Device("b")])
    assert state.set_health({"a": False}).changed == ("a",)
    assert not state.devices["a"].healthy
    state.update([Device("a"), Device("b")])
    assert not state.devices["a"].healthy, "a probe result holds until the next probe"
    assert state.set_health({"a": True}).changed == ("a",)
    assert state.devices["a"].healthy


@pytest.mark.parametrize(("id_length", "too_large"), [(8, False), (63, True)])
async def test_lists_over_the_kubelets_4_mib_limit_are_reported(
    id_length: int, too_large: bool, caplog: pytest.LogCaptureFixture
) -> None:
    state = DeviceState()
    devices = [Device(f"{i:0{id_length}d}", numa_node=i % 2) for i in range(70_000)]
    with caplog.at_level(logging.ERROR):
        state.update(devices)
    assert ("too large for the kubelet" in caplog.text) is too_large
    assert (state.response.ByteSize() > 4 * 1024 * 1024) is too_large


def built_field_by_field(state: DeviceState) -> api_pb2.ListAndWatchResponse:
    """The list as the protobuf API builds it, one field at a time."""
    response = api_pb2.ListAndWatchResponse()
    for unit in state.units.values():
        entry = response.devices.add(ID=unit.id, health="Healthy" if unit.healthy else "Unhealthy")
        if unit.device.numa_node is not None:
            entry.topology.nodes.add(ID=unit.device.numa_node)
    return response


# Valid ids (printable, no whitespace or comma, at most 63 characters), multi-byte
# UTF-8 included: an id of 63 such characters is longer than one varint byte can say.
IDS = st.text(
    st.characters(
        codec="utf-8",
        exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp", "Cf", "Co", "Cn"],
        exclude_characters=",",
    ),
    min_size=1,
    max_size=63,
)


@given(
    devices=st.dictionaries(
        IDS,
        st.tuples(st.booleans(), st.none() | st.integers(0, 2**40)),
        max_size=30,
    ),
    replicas=st.integers(1, 3),
)
def test_the_list_is_what_protobuf_itself_builds(
    devices: dict[str, tuple[bool, int | None]], replicas: int
) -> None:
    state = DeviceState(replicas)
    snapshot = [Device(i, healthy=h, numa_node=n) for i, (h, n) in devices.items() if "::" not in i]
    state.update(snapshot)
    assert len(state.response.devices) == len(state.units)
    assert state.response == built_field_by_field(state)
    assert state.response.SerializeToString() == built_field_by_field(state).SerializeToString()
