"""A container runtime's side of device delivery, simulated for tests and the sandbox.

What the kubelet hands a runtime for a container (the CRI ContainerConfig: device specs,
mounts, env, annotations, CDI names) and what a runtime makes of it: it applies the
plain device specs, and resolves CDI names from the CRI field and from "cdi.k8s.io/"
annotations as far as its CDI support goes, reading the spec files in a CDI directory
with the rules of the CDI library it was built with. An unresolvable name fails the
container, as containerd and CRI-O do. With FakeKubelet this shows whether a container
really gets its device on a given kubelet and runtime.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import ascii_letters as ASCII_LETTERS  # noqa: N812 - a constant
from typing import Any

from deviceplugin.cdi import ANNOTATION_PREFIX
from deviceplugin.v1beta1 import api_pb2

Version = tuple[int, int, int]

# Fields each CDI spec version added (specs-go/config.go and version.go): a library
# that predates a field refuses a spec using it (strict decoding), and refuses a spec
# whose cdiVersion it does not know.
_ADDED_IN: dict[str, Version] = {
    "mounts.type": (0, 4, 0),
    "deviceNodes.hostPath": (0, 5, 0),
    "annotations": (0, 6, 0),
    "containerEdits.additionalGids": (0, 7, 0),
    "containerEdits.intelRdt": (0, 7, 0),
}


def parse_version(text: str) -> Version:
    major, minor, patch = (int(part) for part in text.removeprefix("v").split("."))
    return major, minor, patch


def spec_problem(document: Mapping[str, Any], library: Version) -> str | None:
    """Why a CDI library of version `library` refuses the spec, or None if it loads it."""
    declared = parse_version(str(document.get("cdiVersion", "0.0.0")))
    if not (0, 1, 0) <= declared <= library:
        return f"cdiVersion {document.get('cdiVersion')} is not one this runtime knows"
    used = set()
    if document.get("annotations"):
        used.add("annotations")
    needed = (0, 3, 0)
    for device in document.get("devices", []):
        if device.get("annotations"):
            used.add("annotations")
        if device["name"][:1] not in ASCII_LETTERS:
            needed = max(needed, (0, 5, 0))  # a name starting with a digit
        edits = device.get("containerEdits", {})
        used |= {f"containerEdits.{key}" for key in edits}
        used |= {"deviceNodes." + key for node in edits.get("deviceNodes", []) for key in node}
        used |= {"mounts." + key for mount in edits.get("mounts", []) for key in mount}
    if "." in str(document.get("kind", "")).partition("/")[2]:
        needed = max(needed, (0, 6, 0))  # a dot in the class
    for name in used & _ADDED_IN.keys():
        if _ADDED_IN[name] > library:
            return f"unknown field {name!r}"
        needed = max(needed, _ADDED_IN[name])
    if needed > declared:
        return f"the spec version must be at least {'.'.join(map(str, needed))}"
    return None


@dataclass(frozen=True)
class Runtime:
    """A runtime's CDI support, as its releases have it (kubernetes issue 125210;
    containerd PRs 6654, 7374, 8252, 9685)."""

    name: str
    cdi_annotations: bool = False  # reads cdi.k8s.io/ annotations
    cdi_field: bool = False  # reads the CRI CDIDevices field
    cdi_library: Version = (0, 0, 0)  # the newest spec version its CDI library knows


CONTAINERD_1_6 = Runtime("containerd 1.6")  # no CDI at all
CONTAINERD_1_7_0 = Runtime("containerd 1.7.0", cdi_annotations=True, cdi_library=(0, 5, 0))
CONTAINERD_1_7_2 = Runtime(
    "containerd 1.7.2", cdi_annotations=True, cdi_field=True, cdi_library=(0, 5, 0)
)


@dataclass
class ContainerConfig:
    """What the kubelet sends the runtime for a container's devices (CRI)."""

    devices: dict[str, str] = field(default_factory=dict)  # container path -> host path
    mounts: dict[str, str] = field(default_factory=dict)  # container path -> host path
    envs: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cdi_devices: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, response: api_pb2.ContainerAllocateResponse, *, cdi_field: bool) -> ContainerConfig:
        """The kubelet's translation; cdi_field False: a kubelet that drops cdi_devices
        (before 1.28, or 1.28 without the DevicePluginCDIDevices gate)."""
        return cls(
            {d.container_path: d.host_path for d in response.devices},
            {m.container_path: m.host_path for m in response.mounts},
            dict(response.envs),
            dict(response.annotations),
            [c.name for c in response.cdi_devices] if cdi_field else [],
        )


class UnresolvableDeviceError(Exception):
    """The runtime cannot find a CDI device the container asks for: no container."""


def create_container(
    config: ContainerConfig, runtime: Runtime, cdi_dirs: Iterable[Path]
) -> ContainerConfig:
    """The container as the runtime creates it: plain specs plus resolved CDI edits."""
    names: dict[str, None] = {}
    if runtime.cdi_field:
        names.update(dict.fromkeys(config.cdi_devices))
    if runtime.cdi_annotations:
        for key, value in config.annotations.items():
            if key.startswith(ANNOTATION_PREFIX):
                names.update(dict.fromkeys(value.split(",")))
    container = ContainerConfig(dict(config.devices), dict(config.mounts), dict(config.envs))
    if not names:
        return container
    specs = _load_specs(cdi_dirs, runtime.cdi_library)
    for name in names:
        kind, _, device = name.partition("=")
        edits = specs.get(kind, {}).get(device)
        if edits is None:
            raise UnresolvableDeviceError(f"{runtime.name}: unresolvable CDI devices {name}")
        for node in edits.get("deviceNodes", []):
            container.devices[node["path"]] = node.get("hostPath", node["path"])
        for mount in edits.get("mounts", []):
            container.mounts[mount["containerPath"]] = mount["hostPath"]
        container.envs.update(entry.split("=", 1) for entry in edits.get("env", []))
    return container


def _load_specs(directories: Iterable[Path], library: Version) -> dict[str, dict[str, Any]]:
    specs: dict[str, dict[str, Any]] = {}
    for directory in directories:
        for path in sorted(directory.glob("*.json")):
            document = json.loads(path.read_text())
            if spec_problem(document, library) is None:
                devices = {d["name"]: d.get("containerEdits", {}) for d in document["devices"]}
                specs.setdefault(document["kind"], {}).update(devices)
    return specs
