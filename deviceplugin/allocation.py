"""GetPreferredAllocation: which ids the kubelet should give a container.

What the kubelet's device manager does with the answer (pkg/kubelet/cm/devicemanager/
manager.go, devicesToAllocate and callGetPreferredAllocationIfAvailable): it asks with
`available` = the free healthy devices it knows (those of the NUMA-aligned set, when
the topology manager has one) plus the ones already chosen for the container, and
`must_include` = those already chosen; it keeps only the answer's ids that are in its
own available set and fills any shortfall from that set itself; and an error status
fails the pod for good (UnexpectedAdmissionError). So the answer never fails a
request the kubelet can send: ids the plugin does not know (a device removed a moment
before, which the kubelet has not heard of yet) are chosen last, only to make up the
size, and everything comes from `available`, `must_include` included.

Rules: every id of must_include that is in available comes first; the rest come from
available; exactly allocation_size ids. Preferences, in order: known before unknown,
healthy, one NUMA node, then the sharing policy for replicas: "spread" takes the
physical device with the fewest replicas in use, "pack" the one with the most.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from enum import StrEnum

from deviceplugin.errors import InvalidRequestError, quoted
from deviceplugin.state import DeviceState, Unit


class Policy(StrEnum):
    SPREAD = "spread"
    PACK = "pack"


def check_ids(field: str, ids: Sequence[str], units: Mapping[str, Unit]) -> list[Unit]:
    """Resolve ids to units; unknown and repeated ids are the caller's error."""
    seen: set[str] = set()
    resolved = []
    for device_id in ids:
        if device_id in seen:
            raise InvalidRequestError(f"{field} lists device {quoted(device_id)} more than once")
        seen.add(device_id)
        unit = units.get(device_id)
        if unit is None:
            raise InvalidRequestError(f"{field}: unknown device {quoted(device_id)}")
        resolved.append(unit)
    return resolved


def preferred_allocation(
    state: DeviceState,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    policy: Policy = Policy.SPREAD,
) -> list[str]:
    units = state.units
    offered = list(dict.fromkeys(available))  # the kubelet sends sets: repeats mean nothing
    offered_set = set(offered)
    required = [i for i in dict.fromkeys(must_include) if i in offered_set]
    if size < 0:
        raise InvalidRequestError(f"allocation_size is {size}; it must not be negative")
    if len(required) > size:
        raise InvalidRequestError(
            f"must_include_deviceIDs has {len(required)} devices, more than allocation_size {size}"
        )
    if size > len(offered):
        raise InvalidRequestError(
            f"allocation_size {size} is more than the {len(offered)} available_deviceIDs"
        )
    required_set = set(required)
    rest = [i for i in offered if i not in required_set]
    pool = [units[i] for i in rest if i in units]
    unknown = [i for i in rest if i not in units]
    need = size - len(required)
    known_required = [units[i] for i in required if i in units]
    chosen = _choose(state.replicas, pool, known_required, min(need, len(pool)), policy)
    return required + [unit.id for unit in chosen] + unknown[: need - len(chosen)]


def _choose(
    replicas: int, pool: list[Unit], required: list[Unit], need: int, policy: Policy
) -> list[Unit]:
    if need == 0:
        return []
    numa = _target_numa(pool, required, need)
    # Replicas of a device that the kubelet did not offer are in use by other containers.
    free = Counter(unit.device.id for unit in pool)
    in_use = {device: replicas - count for device, count in free.items()}
    for unit in required:
        in_use[unit.device.id] = in_use.get(unit.device.id, 0) + 1

    by_device: dict[str, list[Unit]] = defaultdict(list)
    for unit in pool:
        by_device[unit.device.id].append(unit)
    order = {device: index for index, device in enumerate(by_device)}
    sign = 1 if policy is Policy.SPREAD else -1

    def rank(device: str) -> tuple[bool, bool, int, int]:
        sample = by_device[device][-1].device
        return (not sample.healthy, sample.numa_node != numa, sign * in_use[device], order[device])

    for candidates in by_device.values():
        candidates.reverse()  # pop() from the end keeps the kubelet's order
    heap = [(rank(device), device) for device in by_device]
    heapq.heapify(heap)
    chosen: list[Unit] = []
    while len(chosen) < need:
        _, device = heapq.heappop(heap)
        chosen.append(by_device[device].pop())
        in_use[device] += 1
        if by_device[device]:
            heapq.heappush(heap, (rank(device), device))
    return chosen


def _target_numa(pool: list[Unit], required: list[Unit], need: int) -> int | None:
    """The NUMA node to draw from: the required devices' node, else the tightest fit."""
    required_nodes = {unit.device.numa_node for unit in required}
    if len(required_nodes) == 1:
        return required_nodes.pop()
    healthy_per_node = Counter(unit.device.numa_node for unit in pool if unit.healthy)
    fitting = [(count, node) for node, count in healthy_per_node.items() if count >= need]
    if fitting:
        return min(fitting, key=lambda pair: (pair[0], pair[1] is None, pair[1] or 0))[1]
    if healthy_per_node:
        return max(healthy_per_node.items(), key=lambda pair: pair[1])[0]
    return None
