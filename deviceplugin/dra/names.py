"""resource.k8s.io/v1 naming rules DRA needs before anything talks to the API server.

Kept free of the Kubernetes client so that config validation (`check-config`) and
daemons without DRA never import it. Limits are upstream's (k8s.io/api/resource/v1).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

from deviceplugin.backend import AttributeValue, Device, Version

# Where the kubelet looks for a DRA driver's socket: <kubeletDir>/plugins/<driver>/dra.sock
# (k8s.io/dynamic-resource-allocation kubeletplugin: KubeletPluginsDir, "dra.sock").
PLUGINS_SUBDIR = "plugins"
SOCKET_NAME = "dra.sock"
# Services named in the plugin-watcher registration, "<proto package tail>.<service>",
# newest first: kubelets since 1.34 take the first one they speak, 1.32-1.33 v1beta1.
DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
HEALTH_SERVICE = "v1alpha1.DRAResourceHealth"

DRIVER_NAME_MAX = 63
DEVICE_NAME_MAX = 63
ATTRIBUTE_ID_MAX = 32
ATTRIBUTE_DOMAIN_MAX = 63
ATTRIBUTE_VALUE_MAX = 64
ATTRIBUTES_AND_CAPACITIES_MAX = 32

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# semver.org 2.0.0, the grammar's regular expression.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
# resource.Quantity: a decimal number with an optional binary/decimal suffix or exponent.
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")


def dns_subdomain_problem(name: str, limit: int) -> str | None:
    if not name:
        return "must not be empty"
    if len(name) > limit:
        return f"is {len(name)} characters; at most {limit} are allowed"
    if not all(_DNS_LABEL.match(label) for label in name.split(".")):
        return "must be a lowercase DNS subdomain (a-z, 0-9, '-', '.')"
    return None


# A Kubernetes UID is a UUID; the claim's UID names files, so nothing else gets through.
_UID = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]{0,126}[A-Za-z0-9])?$")


def uid_problem(uid: str) -> str | None:
    if not _UID.match(uid):
        return f"claim uid {uid[:80]!r} is not a Kubernetes UID"
    return None


def claim_problem(namespace: str, name: str, uid: str) -> str | None:
    """Why the kubelet's claim reference is not one (checked before any use of it)."""
    problem = uid_problem(uid)
    if problem is not None:
        return problem
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        return f"claim namespace {namespace[:80]!r} is not a namespace name (a DNS label)"
    problem = dns_subdomain_problem(name, 253)
    if problem is not None:
        return f"claim name {name[:80]!r} {problem}"
    return None


def default_driver_name(resource_name: str) -> str:
    """`example.com/widget` -> `widget.example.com`: the vendor's own domain, as upstream asks."""
    domain, _, name = resource_name.partition("/")
    return f"{name.lower()}.{domain}"


def driver_name_problem(name: str) -> str | None:
    return dns_subdomain_problem(name, DRIVER_NAME_MAX)


def device_name_problem(device_id: str) -> str | None:
    """Why a backend's device id cannot be a ResourceSlice device name (a DNS label)."""
    if len(device_id) > DEVICE_NAME_MAX or not _DNS_LABEL.match(device_id):
        return (
            f"device id {device_id!r} is not a DNS label (at most 63 characters of "
            "a-z, 0-9 and '-'), which DRA requires of device names"
        )
    return None


def qualified_name_problem(name: str) -> str | None:
    domain, slash, identifier = name.rpartition("/")
    if slash:
        problem = dns_subdomain_problem(domain, ATTRIBUTE_DOMAIN_MAX)
        if problem is not None:
            return f"domain {domain!r} {problem}"
    if len(identifier) > ATTRIBUTE_ID_MAX or not _C_IDENTIFIER.match(identifier):
        return f"{identifier!r} must be a C identifier of at most {ATTRIBUTE_ID_MAX} characters"
    return None


def attribute_problem(name: str, value: AttributeValue) -> str | None:
    problem = qualified_name_problem(name)
    if problem is not None:
        return f"attribute {name!r}: {problem}"
    text = value.text if isinstance(value, Version) else value
    if isinstance(text, str) and len(text) > ATTRIBUTE_VALUE_MAX:
        return f"attribute {name!r}: value longer than {ATTRIBUTE_VALUE_MAX} characters"
    if isinstance(value, Version) and not _SEMVER.match(value.text):
        return f"attribute {name!r}: {value.text!r} is not a semantic version"
    return None


def capacity_problem(name: str, quantity: str) -> str | None:
    problem = qualified_name_problem(name)
    if problem is not None:
        return f"capacity {name!r}: {problem}"
    if not _QUANTITY.match(quantity):
        return f"capacity {name!r}: {quantity!r} is not a Kubernetes quantity (e.g. 16Gi, 4)"
    return None


def device_problem(device: Device, extra_attributes: Mapping[str, AttributeValue]) -> str | None:
    """Why `device` cannot be published in a ResourceSlice, or None."""
    problem = device_name_problem(device.id)
    if problem is not None:
        return problem
    attributes = {**extra_attributes, **device.attributes}
    if len(attributes) + len(device.capacity) > ATTRIBUTES_AND_CAPACITIES_MAX:
        return (
            f"device {device.id!r} has more than {ATTRIBUTES_AND_CAPACITIES_MAX} "
            "attributes and capacities"
        )
    for name, value in attributes.items():
        problem = attribute_problem(name, value)
        if problem is not None:
            return f"device {device.id!r}: {problem}"
    for name, quantity in device.capacity.items():
        problem = capacity_problem(name, quantity)
        if problem is not None:
            return f"device {device.id!r}: {problem}"
    return None


def default_node_name() -> str:
    """The Node this daemon runs on: $NODE_NAME (the DaemonSet sets it), else the host name.

    It names the ResourceSlices' pool and owner, so it must be the Node object's name.
    """
    return os.environ.get("NODE_NAME") or socket.gethostname().split(".")[0].lower()
