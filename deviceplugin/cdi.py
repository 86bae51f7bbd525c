"""CDI (Container Device Interface) spec files for a resource's devices.

With CDI, the kubelet passes fully qualified names ("example.com/widget=widget0") to the
runtime, which finds the container edits in a spec file under /var/run/cdi. nodeplug
writes one file per resource, `nodeplug-<vendor>-<class>.json`, before the kubelet
learns of a new device, and rewrites it on every change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deviceplugin.backend import Device
from deviceplugin.files import write_atomically

log = logging.getLogger(__name__)

CDI_VERSION = "0.6.0"
FILE_PREFIX = "nodeplug-"
# CDI device names: alphanumerics with '-', '_', '.', ':' between.
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?$")


def qualified_name(kind: str, device_id: str) -> str:
    return f"{kind}={device_id}"


def usable_name(device_id: str) -> bool:
    return _DEVICE_NAME.match(device_id) is not None


def spec_file_name(kind: str) -> str:
    return FILE_PREFIX + kind.replace("/", "-") + ".json"


def container_edits(device: Device) -> dict[str, Any]:
    edits: dict[str, Any] = {}
    if device.envs:
        edits["env"] = [f"{key}={value}" for key, value in sorted(device.envs.items())]
    if device.device_nodes:
        edits["deviceNodes"] = [
            {
                "path": node.container_path or node.host_path,
                "hostPath": node.host_path,
                "permissions": node.permissions,
            }
            for node in device.device_nodes
        ]
    if device.mounts:
        edits["mounts"] = [
            {
                "hostPath": mount.host_path,
                "containerPath": mount.container_path,
                "options": ["ro" if mount.read_only else "rw", "nosuid", "nodev", "rbind"],
            }
            for mount in device.mounts
        ]
    return edits


def spec(kind: str, devices: Iterable[Device]) -> dict[str, Any]:
    entries = []
    for device in devices:
        if not usable_name(device.id):
            log.error(
                "device id is not a valid CDI device name; left out of the CDI spec",
                extra={"kind": kind, "device": device.id},
            )
            continue
        entries.append({"name": device.id, "containerEdits": container_edits(device)})
    return {"cdiVersion": CDI_VERSION, "kind": kind, "devices": entries}


class CdiSpecWriter:
    """Keeps one resource's CDI spec file equal to its devices."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.kind = kind
        self.path = directory / spec_file_name(kind)
        self._written: str | None = None

    def write(self, devices: Iterable[Device]) -> None:
        """Replace the spec atomically (runtimes may read it at any moment), if it changed."""
        document = json.dumps(spec(self.kind, devices), indent=2, sort_keys=True) + "\n"
        if document == self._written and self.path.exists():
            return  # a snapshot with nothing new for the runtime: no fsync churn
        write_atomically(self.path, document.encode())
        self._written = document


def remove_stale_specs(directory: Path, keep: Iterable[Path]) -> list[Path]:
    """Delete our spec files (nodeplug-*.json) that no configured resource writes any more."""
    wanted = set(keep)
    removed = []
    for path in directory.glob(f"{FILE_PREFIX}*.json"):
        if path not in wanted:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed
