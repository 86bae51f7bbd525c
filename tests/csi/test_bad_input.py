"""Hypothesis-generated requests for every CSI RPC: a clear status, never a crash or a leak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi import mounts
from csi.v1 import csi_pb2
from tests.csi.conftest import Client, create_request

pytestmark = pytest.mark.root

FieldDescriptor = descriptor.FieldDescriptor
# Whatever the request, the driver answers with one of these; INTERNAL or UNKNOWN
# would mean an unchecked input reached the storage layer.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
RPCS = [
    ("controller", "CreateVolume"),
    ("controller", "DeleteVolume"),
    ("controller", "ValidateVolumeCapabilities"),
    ("controller", "ListVolumes"),
    ("controller", "GetCapacity"),
    ("controller", "CreateSnapshot"),
    ("controller", "DeleteSnapshot"),
    ("controller", "ListSnapshots"),
    ("controller", "ControllerExpandVolume"),
    ("controller", "ControllerPublishVolume"),
    ("controller", "GetSnapshot"),
    ("group_controller", "CreateVolumeGroupSnapshot"),
    ("group_controller", "DeleteVolumeGroupSnapshot"),
    ("group_controller", "GetVolumeGroupSnapshot"),
    ("node", "NodeStageVolume"),
    ("node", "NodeUnstageVolume"),
    ("node", "NodePublishVolume"),
    ("node", "NodeUnpublishVolume"),
    ("node", "NodeGetVolumeStats"),
    ("node", "NodeExpandVolume"),
    ("identity", "GetPluginInfo"),
    ("identity", "Probe"),
]


def hostile_strings(known: list[str]) -> st.SearchStrategy[str]:
    """Ids and paths that exist, almost exist, or try to escape, plus arbitrary text."""
    fragments = st.sampled_from(
        ["..", ".", "", "/", "//", "\x00", "link", "pool", "v" + "0" * 32, "s" + "f" * 32]
    )
    pathlike = st.lists(st.one_of(fragments, st.text(max_size=8)), max_size=5).map("/".join)
    return st.one_of(
        st.sampled_from(known),
        st.builds(lambda base, tail: base + tail, st.sampled_from(known), pathlike),
        pathlike,
        st.text(max_size=150),
    )


def messages(
    kind: type[message.Message], strings: st.SearchStrategy[str], depth: int = 0
) -> st.SearchStrategy[Any]:
    """Any request of this type: every field unset or drawn from a hostile strategy."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in kind.DESCRIPTOR.fields:
        value = _field_values(field, strings, depth)
        if value is not None:
            fields[field.name] = st.one_of(st.none(), value)

    def build(values: dict[str, Any]) -> message.Message:
        request = kind()
        for name, value in values.items():
            if value is None:
                continue
            target = getattr(request, name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            elif isinstance(value, message.Message):
                target.CopyFrom(value)
            else:
                setattr(request, name, value)
        return request

    return st.fixed_dictionaries(fields).map(build)


# `field` is a FieldDescriptor, of the upb or the pure-Python flavour: typed Any for both.
def _field_values(
    field: Any, strings: st.SearchStrategy[str], depth: int
) -> st.SearchStrategy[Any] | None:
    nested_type, enum_type = field.message_type, field.enum_type
    if nested_type is not None and nested_type.GetOptions().map_entry:
        return st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=2)
    single: st.SearchStrategy[Any]
    if nested_type is not None:
        if depth > 3:
            return None
        single = messages(message_factory.GetMessageClass(nested_type), strings, depth + 1)
    elif field.type == FieldDescriptor.TYPE_STRING:
        single = strings
    elif field.type == FieldDescriptor.TYPE_BOOL:
        single = st.booleans()
    elif enum_type is not None:
        single = st.sampled_from([v.number for v in enum_type.values])
    elif field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
        bits = 63 if field.type == FieldDescriptor.TYPE_INT64 else 31
        single = st.one_of(st.integers(-(2**bits), 2**bits - 1), st.integers(-1, 64 * 1024**2))
    else:
        return None
    if field.is_repeated:
        return st.lists(single, max_size=2)
    return single


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("service", "method"), RPCS)
async def test_any_request_gets_a_clear_status(csi: Client, service: str, method: str) -> None:
    volume = (await csi.controller.CreateVolume(create_request("pvc-fuzz"))).volume
    (csi.kubelet / "staging").mkdir()
    (csi.kubelet / "link").symlink_to("/")
    known = [
        volume.volume_id,
        str(csi.kubelet),
        str(csi.kubelet / "staging"),
        str(csi.kubelet / "link"),
    ]
    stub = getattr(getattr(csi, service), method)
    proto_service = "".join(part.capitalize() for part in service.split("_"))
    rpc = csi_pb2.DESCRIPTOR.services_by_name[proto_service].methods_by_name[method]
    request_type = message_factory.GetMessageClass(rpc.input_type)

    # Hypothesis draws the requests (it cannot drive a coroutine); the loop sends them.
    drawn: list[message.Message] = []

    @settings(
        max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(request=messages(request_type, hostile_strings(known)))
    def draw(request: message.Message) -> None:
        drawn.append(request)

    draw()
    for request in drawn:
        try:
            await stub(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            assert error.code() in EXPECTED, (request, error.details())
    assert not _pool_mounts_outside(csi.driver.pool.root), "no volume mounted outside its roots"


def _pool_mounts_outside(pool: Path) -> set[str]:
    """Mounts of the pool's filesystem outside the test's root (the machine may be shared:
    other mounts come and go)."""
    table = mounts.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    (source,) = {m.source for m in table if m.mount_point == str(pool)}
    return {
        m.mount_point
        for m in table
        if m.source == source and not Path(m.mount_point).is_relative_to(pool.parent)
    }
