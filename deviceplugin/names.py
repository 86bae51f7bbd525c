"""The kubelet's rules for extended resource names and device ids."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

# k8s.io/apimachinery IsQualifiedName: an optional DNS-1123 subdomain prefix and a name.
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUOTA_PREFIX = "requests."
# Ids are joined with commas in NODEPLUG_<RESOURCE>; whitespace breaks the kubelet's logs.
_ID_FORBIDDEN = re.compile(r"[\s,]")
MAX_DEVICE_ID_LENGTH = 63
# Ids any check below passes: printable ASCII but space and comma, 1-63 of them. Matched
# once against a whole snapshot's ids, newline-separated, instead of id by id.
_PLAIN_ID = r"[!-+\--~]{1,63}"
_PLAIN_IDS = re.compile(rf"{_PLAIN_ID}(?:\n{_PLAIN_ID})*")
# Longest path a sockaddr_un holds, less the terminating NUL.
MAX_SOCKET_PATH = 107


def resource_name_problem(name: str) -> str | None:  # noqa: PLR0911 - one rule a return
    """Why the kubelet would refuse `name` as an extended resource, or None if it is fine.

    Mirrors v1helper.IsExtendedResourceName: "domain/name", not in the kubernetes.io
    namespace, no "requests." prefix, and "requests.<name>" must be a qualified name.
    """
    if "/" not in name:
        return "must be 'domain/name' (a name without a domain is a native resource)"
    if "kubernetes.io/" in name:
        return "the kubernetes.io domain is reserved for native resources"
    if name.startswith(_QUOTA_PREFIX):
        return "must not start with 'requests.' (reserved for quota)"
    prefix, _, short = (_QUOTA_PREFIX + name).partition("/")
    if "/" in short:
        return "must contain exactly one '/'"
    if not short:
        return "the name after '/' is empty"
    if len(short) > 63:
        return f"the name after '/' is {len(short)} characters; at most 63 are allowed"
    if not _NAME_PART.match(short):
        return (
            "the name after '/' must consist of alphanumerics, '-', '_' or '.', "
            "and start and end with an alphanumeric"
        )
    if len(prefix) > 253:
        return "the domain is too long (at most 244 characters)"
    if not all(_DNS_LABEL.match(label) for label in prefix.split(".")):
        return "the domain must be a lowercase DNS subdomain (a-z, 0-9, '-', '.')"
    return None


def device_id_problem(device_id: str) -> str | None:
    """Why a backend's device id is unusable, or None."""
    if not device_id:
        return "empty device id"
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        return f"device id {device_id!r} is longer than {MAX_DEVICE_ID_LENGTH} characters"
    if not device_id.isprintable() or _ID_FORBIDDEN.search(device_id):
        return f"device id {device_id!r} has whitespace, a comma or an unprintable character"
    return None


def all_plainly_usable(device_ids: Sequence[str]) -> bool:
    """True when every id is surely usable; False: ask device_id_problem id by id.

    Tens of thousands of ids are checked in one regex match, at C speed. The count of
    separators rules out an id with a newline of its own passing as two plain ids.
    """
    joined = "\n".join(device_ids)
    return joined.count("\n") == len(device_ids) - 1 and _PLAIN_IDS.fullmatch(joined) is not None


def socket_file_name(resource_name: str, directory_length: int) -> str:
    """The plugin's socket file name: readable when it fits a Unix socket path, hashed if not."""
    readable = "nodeplug-" + resource_name.replace("/", "_") + ".sock"
    if directory_length + 1 + len(readable) <= MAX_SOCKET_PATH:
        return readable
    digest = hashlib.sha256(resource_name.encode()).hexdigest()[:16]
    return f"nodeplug-{digest}.sock"


def env_name(resource_name: str) -> str:
    """Name of the env var that lists a container's device ids for a resource."""
    return "NODEPLUG_" + re.sub(r"[^A-Za-z0-9]", "_", resource_name).upper()
