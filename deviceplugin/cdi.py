"""CDI (Container Device Interface): spec files for a resource's devices, and the ways
their names reach the container runtime.

With CDI the runtime gets fully qualified names ("example.com/widget=widget0") and finds
the container edits in a spec file under /var/run/cdi. nodeplug writes one file per
resource, `nodeplug-<vendor>-<class>.json`, before the kubelet learns of a new device,
and rewrites it on every change.

How names reach the runtime is a per-resource choice (deviceListStrategy), since each
way works only with some kubelets and runtimes:
- the Allocate response's cdi_devices field, which the kubelet passes on as the CRI
  CDIDevices field: kubelet 1.28 behind the DevicePluginCDIDevices gate, on by default
  from 1.29, GA in 1.31 (an older kubelet drops it: the container gets no device);
  containerd 1.7.2+, CRI-O 1.28+ read it (kubernetes issue 125210);
- a "cdi.k8s.io/..." annotation, which every kubelet passes on as a container
  annotation: containerd 1.7.0+ (with enable_cdi), CRI-O 1.23+ read it;
- plain device specs (nodes, mounts, env in the response), which every kubelet and
  runtime applies, containerd 1.6 (no CDI at all) included.
Runtimes apply a device named both ways once (containerd's WithCDI skips names seen).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import string
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from deviceplugin.backend import Device
from deviceplugin.files import write_atomically

log = logging.getLogger(__name__)

FILE_PREFIX = "nodeplug-"
# CDI device names: alphanumerics with '-', '_', '.', ':' between.
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?$")
# pkg/cdi/producer/annotations (Key): "cdi.k8s.io/" + "<plugin>_<deviceID>", at most 63
# characters, alphanumeric at both ends, '-', '_', '.' between.
ANNOTATION_PREFIX = "cdi.k8s.io/"
_ANNOTATION_NAME_MAX = 63


class DeviceListStrategy(StrEnum):
    """How a resource's devices reach the container (NVIDIA's deviceListStrategy)."""

    DEVICE_SPECS = "deviceSpecs"  # device nodes, mounts and env in the Allocate response
    CDI_FIELD = "cdiField"  # CDI names in the response's cdi_devices field
    CDI_ANNOTATIONS = "cdiAnnotations"  # CDI names in a cdi.k8s.io/ annotation


CDI_STRATEGIES = frozenset({DeviceListStrategy.CDI_FIELD, DeviceListStrategy.CDI_ANNOTATIONS})


def annotation_key(resource_name: str) -> str:
    """The resource's CDI annotation key, as pkg/cdi's AnnotationKey("nodeplug", resource)
    would make it; one per resource, since the kubelet keeps only the first of two
    equal keys in a container."""
    name = "nodeplug_" + resource_name.replace("/", "_")
    if len(name) > _ANNOTATION_NAME_MAX:
        digest = hashlib.sha256(resource_name.encode()).hexdigest()[:10]
        name = f"{name[: _ANNOTATION_NAME_MAX - 11]}-{digest}"
    return ANNOTATION_PREFIX + name


def qualified_name(kind: str, device_id: str) -> str:
    return f"{kind}={device_id}"


def usable_name(device_id: str) -> bool:
    return _DEVICE_NAME.match(device_id) is not None


def spec_file_name(kind: str) -> str:
    return FILE_PREFIX + kind.replace("/", "-") + ".json"


def _device_node(host_path: str, container_path: str | None, permissions: str) -> dict[str, str]:
    node = {"path": container_path or host_path, "permissions": permissions}
    if node["path"] != host_path:
        node["hostPath"] = host_path  # CDI 0.5.0: older runtimes refuse the field
    return node


def container_edits(device: Device) -> dict[str, Any]:
    edits: dict[str, Any] = {}
    if device.envs:
        edits["env"] = [f"{key}={value}" for key, value in sorted(device.envs.items())]
    if device.device_nodes:
        edits["deviceNodes"] = [
            _device_node(node.host_path, node.container_path, node.permissions)
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
    return {"cdiVersion": minimum_version(kind, entries), "kind": kind, "devices": entries}


def minimum_version(kind: str, devices: Iterable[dict[str, Any]]) -> str:
    """The lowest cdiVersion that can express a spec of ours.

    A runtime refuses a spec whose version its CDI library does not know (and older
    libraries refuse fields they do not know), so the lowest version reaches the most
    runtimes: containerd 1.7.0 vendored CDI 0.5 (spec <= 0.5.0), later 1.7 releases 0.6
    (containerd PR 9685). The rules are specs-go/version.go's, for the fields we write:
    0.3.0 is the floor; a device name starting with a digit and a device node's
    hostPath need 0.5.0; a dot in the kind's class needs 0.6.0.
    """
    version = (0, 3, 0)
    for device in devices:
        nodes = device["containerEdits"].get("deviceNodes", [])
        if device["name"][0] not in string.ascii_letters or any("hostPath" in n for n in nodes):
            version = (0, 5, 0)
    if "." in kind.partition("/")[2]:
        version = (0, 6, 0)
    return ".".join(map(str, version))


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
