"""Pieces the built-in backends share: ids from names, permissions, sysfs NUMA lookup."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from deviceplugin.names import MAX_DEVICE_ID_LENGTH

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASH_LENGTH = 12


def device_id(name: str) -> str:
    """A kubelet-safe id for a device name: readable, at most 63 characters, stable."""
    safe = _UNSAFE.sub("-", name).strip("-") or "device"
    if len(safe) <= MAX_DEVICE_ID_LENGTH and safe == name:
        return safe
    # Sanitised or shortened names could collide; a hash of the original keeps them apart.
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    keep = MAX_DEVICE_ID_LENGTH - _HASH_LENGTH - 1
    return f"{safe[-keep:].lstrip('-')}-{digest}"


def check_permissions(value: str) -> str:
    if not value or set(value) - set("rwm") or len(set(value)) != len(value):
        raise ValueError(f"{value!r} must be one or more of r, w, m, each at most once")
    return value


def numa_node_of(sys_path: Path) -> int | None:
    """NUMA node from sysfs: the nearest `numa_node` file of the device or its parents."""
    for directory in (sys_path, *sys_path.parents):
        if directory == Path("/sys") or not str(directory).startswith("/sys/"):
            break
        for candidate in (directory / "numa_node", directory / "device" / "numa_node"):
            try:
                node = int(candidate.read_text().strip())
            except (OSError, ValueError):
                continue
            return node if node >= 0 else None
    return None
