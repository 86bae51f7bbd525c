"""The `csi:` section of the daemon's config.

csi:
  driverName: local.csi.nodeplug.io
  nodeId: node-1                 # defaults to $NODE_NAME, else the host name
  mode: node                     # or controller: only ControllerExpandVolume, for csi-resizer
  endpoint: /csi/csi.sock        # the CSI socket; required in controller mode (node mode:
                                 #   <kubeletDir>/plugins/<driverName>/csi.sock by default)
  pool:                          # node mode only (required there)
    path: /var/lib/nodeplug/pool        # a mounted btrfs filesystem, or
    image: /var/lib/nodeplug/pool.img   # a btrfs image the daemon creates and loop-mounts at path
    size: 20Gi                          # with image: its size
"""

from __future__ import annotations

import os
import re
import socket
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Self

import msgspec

# GetPluginInfo: domain-name notation, at most 63 characters (the spec's rule).
_DRIVER_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,61}[a-zA-Z0-9])?$")
# NodeGetInfo: node_id at most 256 bytes; it is also a topology segment value (63 chars).
_NODE_ID = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?$")
_UNITS = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}
_QUANTITY = re.compile(r"^([0-9]+)(|k|M|G|T|Ki|Mi|Gi|Ti)$")
# mkfs.btrfs refuses smaller filesystems.
MIN_POOL_IMAGE_SIZE = 128 * 1024**2
# The largest file Linux can make (off_t); the filesystem holding the image may allow less,
# which creating the image finds out (and then leaves nothing behind).
MAX_POOL_IMAGE_SIZE = 2**63 - 1


def parse_quantity(value: object) -> int:
    """A Kubernetes-style byte quantity ("20Gi", "512Mi", "1000000") as bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a byte quantity such as 20Gi or 512Mi")
    return int(match.group(1)) * _UNITS[match.group(2)]


class _Matching(str):
    pattern: ClassVar[re.Pattern[str]]
    what: ClassVar[str]

    @classmethod
    def from_config(cls, value: str) -> Self:
        if cls.pattern.match(value) is None:
            raise ValueError(f"{value!r} is not a valid {cls.what}")
        return cls(value)


class DriverName(_Matching):
    pattern = _DRIVER_NAME
    what = "CSI driver name"


class NodeId(_Matching):
    pattern = _NODE_ID
    what = "node id"


def _default_node_id() -> str:
    # A DaemonSet passes the Node's name (fieldRef spec.nodeName): pods' host names
    # are their own unless they use the host network.
    return os.environ.get("NODE_NAME") or socket.gethostname().split(".")[0]


class Bytes(int):
    """A size in bytes, given as a number or a quantity ("20Gi")."""

    @classmethod
    def from_config(cls, value: object) -> Bytes:
        size = parse_quantity(value)
        if size <= 0:
            raise ValueError("Input should be greater than 0")
        return cls(size)


class _Section(
    msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True, rename="camel"
):
    """A mapping of the section: unknown keys refused, camelCase keys, read-only.

    The daemon converts its config with deviceplugin/configkit.py, whose hook makes the
    field types above through their `from_config` and refuses relative `Path`s.
    """


class PoolConfig(_Section, frozen=True):
    path: Path
    image: Path | None = None
    size: Bytes | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.size is not None:
            raise ValueError("size: only used with image (a mounted pool has its own size)")
        if self.image is not None:
            if self.size is None:
                raise ValueError("size: required with image")
            if self.size < MIN_POOL_IMAGE_SIZE:
                raise ValueError(f"size: at least {MIN_POOL_IMAGE_SIZE} bytes for btrfs")
            if self.size > MAX_POOL_IMAGE_SIZE:
                raise ValueError(
                    f"size: {self.size} bytes is more than a file can hold "
                    f"({MAX_POOL_IMAGE_SIZE} bytes)"
                )


class Mode(StrEnum):
    """What the driver serves: a node's volumes, or the cluster-wide half of expansion."""

    NODE = "node"
    # Identity and ControllerExpandVolume only, for a csi-resizer Deployment: volumes are
    # local, so the controller side of an expansion checks the request and leaves the
    # work to NodeExpandVolume on the volume's node.
    CONTROLLER = "controller"


class CsiConfig(_Section, frozen=True):
    driver_name: DriverName
    node_id: NodeId = msgspec.field(default_factory=lambda: NodeId(_default_node_id()))
    mode: Mode = Mode.NODE
    endpoint: Path | None = None
    pool: PoolConfig | None = None

    def __post_init__(self) -> None:
        if self.mode is Mode.NODE and self.pool is None:
            raise ValueError("pool: required field is missing (mode: node serves volumes)")
        problems = []
        if self.mode is Mode.CONTROLLER and self.pool is not None:
            problems.append(
                "pool: not used with mode: controller, which touches no storage (the nodes' "
                "daemons grow volumes); remove it"
            )
        if self.mode is Mode.CONTROLLER and self.endpoint is None:
            problems.append(
                "endpoint: required with mode: controller (the socket csi-resizer dials)"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def topology_key(self) -> str:
        return f"topology.{self.driver_name}/node"
