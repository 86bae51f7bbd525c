"""Pieces the built-in backends share: ids from names, permissions, sysfs NUMA lookup."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from deviceplugin import configkit
from deviceplugin.backend import Device, DeviceNode
from deviceplugin.names import MAX_DEVICE_ID_LENGTH

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# What device_id returns unchanged: safe characters, no "-" at either end, 1-63 of them.
_SAFE = re.compile(r"[A-Za-z0-9._](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9._])?")
# Names device_id returns unchanged, newline-separated: a scan's names in one match.
_SAFE_NAMES = re.compile(rf"{_SAFE.pattern}(?:\n{_SAFE.pattern})*")
_HASH_LENGTH = 12


def device_id(name: str) -> str:
    """A kubelet-safe id for a device name: readable, at most 63 characters, stable."""
    if _SAFE.fullmatch(name):  # most names; a scan may make tens of thousands
        return name
    safe = _UNSAFE.sub("-", name).strip("-") or "device"
    if len(safe) <= MAX_DEVICE_ID_LENGTH and safe == name:
        return safe
    # Sanitised or shortened names could collide; a hash of the original keeps them apart.
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    keep = MAX_DEVICE_ID_LENGTH - _HASH_LENGTH - 1
    return f"{safe[-keep:].lstrip('-')}-{digest}"


def device_ids(names: list[str]) -> list[str]:
    """device_id of each name. A scan's names are usually all safe: checked in one
    regex match at C speed (the separator count rules out a name with a newline)."""
    joined = "\n".join(names)
    if joined.count("\n") == len(names) - 1 and _SAFE_NAMES.fullmatch(joined):
        return names
    return [device_id(name) for name in names]


_GIVEN = ("id", "numa_node", "device_nodes")
_set_id, _set_numa_node, _set_device_nodes = (getattr(Device, name).__set__ for name in _GIVEN)
# Every other field at its default. A field with a default factory would need a call
# per device: fail here, at import, rather than make devices unlike Device(...).
_SET_DEFAULTS = tuple(
    (getattr(Device, field.name).__set__, field.default)
    for field in dataclasses.fields(Device)
    if field.name not in _GIVEN
)
if any(default is dataclasses.MISSING for _, default in _SET_DEFAULTS):
    raise TypeError("new_device sets Device's other fields to plain defaults; one has none")


def new_device(
    identifier: str, numa_node: int | None, device_nodes: tuple[DeviceNode, ...]
) -> Device:
    """Device(id=identifier, numa_node=numa_node, device_nodes=device_nodes), the same
    object made in half the time: a frozen dataclass's __init__ sets each of its ten
    fields through object.__setattr__, and a scan may make tens of thousands."""
    device = object.__new__(Device)
    _set_id(device, identifier)
    _set_numa_node(device, numa_node)
    _set_device_nodes(device, device_nodes)
    for set_field, default in _SET_DEFAULTS:
        set_field(device, default)
    return device


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while a scan makes its devices.

    Every 700 new objects start a collection, and the devices all survive: a scan of
    tens of thousands of nodes spent as long collecting as making them, walking the
    same new devices again and again. Afterwards a collection or two walk them once. Left
    alone if collection was off already (someone else decided), so a scan in another
    thread at the same time cannot turn it back on under the one that turned it off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Permissions(configkit.Checked):
    """cgroup device permissions in the container: r, w, m."""

    @classmethod
    def check(cls, value: str) -> str:
        if not value or set(value) - set("rwm") or len(set(value)) != len(value):
            raise ValueError(f"{value!r} must be one or more of r, w, m, each at most once")
        return value


def numa_node_of(sys_path: Path | str) -> int | None:
    """NUMA node from sysfs: the nearest `numa_node` file of the device or its parents."""
    return NumaNodes().of_directory(str(sys_path))


class NumaNodes:
    """NUMA nodes from sysfs for one scan, each sysfs directory read at most once.

    Thousands of device nodes share a few device numbers and their devices share
    parents, so both lookups are cached. Make a new one for every scan: after a
    hotplug, a device number or a sysfs path may belong to other hardware.
    """

    def __init__(self) -> None:
        self._by_number: dict[tuple[str, int], int | None] = {}
        # Directory -> the answer for it (the nearest numa_node file at or above it).
        self._by_directory: dict[str, int | None] = {}

    def of_number(self, kind: str, rdev: int) -> int | None:
        """The NUMA node of device number `rdev`; kind is "char" or "block"."""
        key = (kind, rdev)
        if key not in self._by_number:
            path = f"/sys/dev/{kind}/{os.major(rdev)}:{os.minor(rdev)}"
            with contextlib.suppress(OSError):
                path = os.path.realpath(path, strict=True)
            self._by_number[key] = self.of_directory(path)
        return self._by_number[key]

    def of_numbers(self, numbers: Iterable[tuple[str, int]]) -> list[int | None]:
        """of_number for each (kind, rdev): each distinct number looked up once, the
        rest mapped at C speed (a scan has tens of thousands of nodes, a few numbers)."""
        numbers = list(numbers)
        known = {number: self.of_number(*number) for number in set(numbers)}
        return list(map(known.__getitem__, numbers))

    def of_directory(self, sys_path: str) -> int | None:
        """The device's numa_node (or its parents'; negative: none), None if unknown."""
        walked = []
        node = None
        directory = sys_path
        while directory.startswith("/sys/"):
            if directory in self._by_directory:
                node = self._by_directory[directory]
                break
            walked.append(directory)
            found = _read_numa_node(directory)
            if found is not None:
                node = found if found >= 0 else None  # -1: not NUMA
                break
            directory = directory.rpartition("/")[0]
        # The answer is the same for every directory walked (only the last can hold a file).
        self._by_directory.update(dict.fromkeys(walked, node))
        return node


def _read_numa_node(directory: str) -> int | None:
    """The value of the directory's own numa_node file, or None if it has none."""
    for candidate in (f"{directory}/numa_node", f"{directory}/device/numa_node"):
        try:
            descriptor = os.open(candidate, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            node = int(os.read(descriptor, 64))
        except (OSError, ValueError):
            continue
        finally:
            os.close(descriptor)
        return node
    return None
