"""GetPreferredAllocation: which ids the kubelet should give a container.

Rules (kubelet contract): every id in must_include is in the answer, the rest come from
available, and the answer has exactly allocation_size ids. Preferences, in order:
healthy devices, one NUMA node, then the sharing policy for replicas: "spread" takes the
physical device with the fewest replicas in use, "pack" the one with the most.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from enum import StrEnum

from deviceplugin.errors import InvalidRequestError, quoted
from deviceplugin.state import Unit


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
    units: Mapping[str, Unit],
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    policy: Policy = Policy.SPREAD,
) -> list[str]:
    offered = check_ids("available_deviceIDs", available, units)
    required = check_ids("must_include_deviceIDs", must_include, units)
    if size < 0:
        raise InvalidRequestError(f"allocation_size is {size}; it must not be negative")
    if len(required) > size:
        raise InvalidRequestError(
            f"must_include_deviceIDs has {len(required)} devices, more than allocation_size {size}"
        )
    required_ids = {unit.id for unit in required}
    pool = [unit for unit in offered if unit.id not in required_ids]
    need = size - len(required)
    if need > len(pool):
        raise InvalidRequestError(
            f"allocation_size {size} needs {need} devices besides must_include_deviceIDs, "
            f"but only {len(pool)} are available"
        )
    chosen = _choose(units, pool, required, need, policy)
    return [unit.id for unit in required] + [unit.id for unit in chosen]


def _choose(
    units: Mapping[str, Unit], pool: list[Unit], required: list[Unit], need: int, policy: Policy
) -> list[Unit]:
    if need == 0:
        return []
    numa = _target_numa(pool, required, need)
    # Replicas of a device that the kubelet did not offer are in use by other containers.
    total = Counter(unit.device.id for unit in units.values())
    free = Counter(unit.device.id for unit in pool)
    in_use = {device: total[device] - free[device] for device in free}
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
