"""GetPreferredAllocation: the kubelet's rules always hold; preferences where they can."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deviceplugin.allocation import Policy, preferred_allocation
from deviceplugin.backend import Device
from deviceplugin.errors import InvalidRequestError
from deviceplugin.state import DeviceState


def resource(devices: list[Device], replicas: int = 1) -> DeviceState:
    state = DeviceState(replicas)
    state.update(devices)
    return state


NUMA_POOL = resource([Device(f"d{i}", numa_node=i // 4) for i in range(8)])  # d0-3 on 0, d4-7 on 1


def test_prefers_one_numa_node_and_the_tightest_fit() -> None:
    # Node 0 has 2 free, node 1 has 4 free: two devices fit best on node 0.
    available = ["d2", "d3", "d4", "d5", "d6", "d7"]
    assert sorted(preferred_allocation(NUMA_POOL, available, [], 2)) == ["d2", "d3"]
    # Three do not fit on node 0: take them all from node 1.
    assert {int(i[1:]) // 4 for i in preferred_allocation(NUMA_POOL, available, [], 3)} == {1}


def test_must_include_comes_first_and_pulls_its_numa_node() -> None:
    chosen = preferred_allocation(NUMA_POOL, [f"d{i}" for i in range(8)], ["d5"], 3)
    assert chosen[0] == "d5"
    assert {int(i[1:]) // 4 for i in chosen} == {1}


def test_healthy_devices_before_unhealthy_ones() -> None:
    pool = resource([Device("a", healthy=False), Device("b"), Device("c")])
    assert sorted(preferred_allocation(pool, ["a", "b", "c"], [], 2)) == ["b", "c"]


def test_spread_and_pack_policies_for_replicas() -> None:
    pool = resource([Device("a"), Device("b")], replicas=4)
    # a::0 is in use elsewhere (not offered): spread avoids a, pack fills a.
    offered = [u for u in pool.units if u != "a::0"]
    spread = preferred_allocation(pool, offered, [], 2, Policy.SPREAD)
    assert Counter(i.split("::")[0] for i in spread) == {"b": 1, "a": 1}
    assert spread[0].startswith("b")
    pack = preferred_allocation(pool, offered, [], 3, Policy.PACK)
    assert Counter(i.split("::")[0] for i in pack) == {"a": 3}


@pytest.mark.parametrize(
    ("available", "must", "size", "message"),
    [
        (["d0", "d1"], ["d0", "d1"], 1, "more than allocation_size"),
        (["d0"], [], 2, "more than the 1 available_deviceIDs"),
        (["d0", "d0"], [], 2, "more than the 1 available_deviceIDs"),
        (["d0"], [], -1, "must not be negative"),
    ],
)
def test_impossible_requests_are_invalid_argument(
    available: list[str], must: list[str], size: int, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        preferred_allocation(NUMA_POOL, available, must, size)


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        # A device removed a moment ago that the kubelet still offers: never chosen
        # while a known one is there, and no error (an error fails the pod for good).
        (["gone", "d1"], [], 1, ["d1"]),
        (["gone", "d1"], [], 2, ["d1", "gone"]),
        (["gone"], [], 1, ["gone"]),
        # Already given to the container (the kubelet's must_include): kept, known or not.
        (["gone", "d1", "d2"], ["gone"], 2, ["gone", "d1"]),
        # Everything comes from available, must_include included.
        (["d1", "d2"], ["d0"], 1, ["d1"]),
        (["d1", "d2"], ["d0", "d2"], 2, ["d2", "d1"]),
        # The kubelet sends sets; a repeat changes nothing.
        (["d1", "d1", "d2"], ["d2", "d2"], 2, ["d2", "d1"]),
    ],
)
def test_what_the_kubelet_may_send_is_always_answered_from_available(
    available: list[str], must: list[str], size: int, expected: list[str]
) -> None:
    assert preferred_allocation(NUMA_POOL, available, must, size) == expected


@st.composite
def requests(draw: st.DrawFn) -> tuple[DeviceState, list[str], list[str], int]:
    count = draw(st.integers(1, 40))
    replicas = draw(st.integers(1, 4))
    devices = [
        Device(
            f"x{i}", healthy=draw(st.booleans()), numa_node=draw(st.sampled_from([None, 0, 1, 2]))
        )
        for i in range(count)
    ]
    pool = resource(devices, replicas)
    # What the kubelet may offer: ids of ours, and ids of devices we removed meanwhile.
    ids = [*sorted(pool.units), "gone0", "gone1::0", "gone1::1"]
    available = draw(st.lists(st.sampled_from(ids), unique=True, min_size=1))
    must = draw(st.lists(st.sampled_from(available), unique=True, max_size=len(available)))
    size = draw(st.integers(len(must), len(available)))
    return pool, available, must, size


@settings(max_examples=300, deadline=None)
@given(requests(), st.sampled_from(list(Policy)))
def test_property_answer_obeys_the_kubelet_contract(
    request: tuple[DeviceState, list[str], list[str], int], policy: Policy
) -> None:
    pool, available, must, size = request
    chosen = preferred_allocation(pool, available, must, size, policy)
    assert len(chosen) == size
    assert len(set(chosen)) == size
    assert chosen[: len(must)] == must
    assert set(chosen) <= set(available)
    # Ids we do not know only make up a shortfall of ids we know.
    known_left = [i for i in available if i in pool.units and i not in must]
    unknown_chosen = [i for i in chosen[len(must) :] if i not in pool.units]
    assert not unknown_chosen or len(chosen) - len(must) - len(unknown_chosen) == len(known_left)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(max_size=8), max_size=30),
    st.lists(st.text(max_size=8), max_size=5),
    st.integers(-5, 40),
)
def test_property_arbitrary_input_never_crashes(
    available: list[str], must: list[str], size: int
) -> None:
    try:
        chosen = preferred_allocation(NUMA_POOL, available, must, size)
    except InvalidRequestError:
        return
    assume(chosen)
    assert len(chosen) == size and set(chosen) <= set(available)


def test_large_requests_stay_fast() -> None:
    pool = resource([Device(f"d{i}", numa_node=i % 4) for i in range(20_000)], replicas=3)
    ids = sorted(pool.units)
    chosen = preferred_allocation(pool, ids, ids[:10], 30_000)
    assert len(chosen) == 30_000
