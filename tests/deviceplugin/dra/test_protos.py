"""The generated DRA modules against upstream's wire facts (k8s.io/kubelet pkg/apis/dra*).

Package, service and method names form the gRPC paths the kubelet calls; field numbers
and types form the encoding. Each row below was read from upstream's api.proto.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor

from deviceplugin.dra.health.v1alpha1 import api_pb2 as health_v1alpha1
from deviceplugin.dra.v1 import api_pb2 as dra_v1
from deviceplugin.dra.v1beta1 import api_pb2 as dra_v1beta1

STRING = FieldDescriptor.TYPE_STRING
MESSAGE = FieldDescriptor.TYPE_MESSAGE
ENUM = FieldDescriptor.TYPE_ENUM
INT64 = FieldDescriptor.TYPE_INT64

DRA_FIELDS = [
    ("NodePrepareResourcesRequest", "claims", 1, MESSAGE, True),
    ("NodePrepareResourcesResponse", "claims", 1, MESSAGE, True),
    ("NodePrepareResourceResponse", "devices", 1, MESSAGE, True),
    ("NodePrepareResourceResponse", "error", 2, STRING, False),
    ("Device", "request_names", 1, STRING, True),
    ("Device", "pool_name", 2, STRING, False),
    ("Device", "device_name", 3, STRING, False),
    ("Device", "cdi_device_ids", 4, STRING, True),
    ("NodeUnprepareResourcesRequest", "claims", 1, MESSAGE, True),
    ("NodeUnprepareResourcesResponse", "claims", 1, MESSAGE, True),
    ("NodeUnprepareResourceResponse", "error", 1, STRING, False),
    ("Claim", "namespace", 1, STRING, False),
    ("Claim", "uid", 2, STRING, False),
    ("Claim", "name", 3, STRING, False),
]
HEALTH_FIELDS = [
    ("DeviceIdentifier", "pool_name", 1, STRING, False),
    ("DeviceIdentifier", "device_name", 2, STRING, False),
    ("DeviceHealth", "device", 1, MESSAGE, False),
    ("DeviceHealth", "health", 2, ENUM, False),
    ("DeviceHealth", "last_updated_time", 3, INT64, False),
    ("DeviceHealth", "health_check_timeout_seconds", 4, INT64, False),
    ("DeviceHealth", "message", 5, STRING, False),
    ("NodeWatchResourcesResponse", "devices", 1, MESSAGE, True),
]
CASES = [
    *((dra_v1.DESCRIPTOR, *row) for row in DRA_FIELDS),
    *((dra_v1beta1.DESCRIPTOR, *row) for row in DRA_FIELDS),
    (dra_v1.DESCRIPTOR, "Device", "share_id", 5, STRING, False),
    *((health_v1alpha1.DESCRIPTOR, *row) for row in HEALTH_FIELDS),
]


@pytest.mark.parametrize(("file", "message", "field", "number", "kind", "repeated"), CASES)
def test_field_numbers_and_types(
    file: FileDescriptor, message: str, field: str, number: int, kind: int, repeated: bool
) -> None:
    descriptor = file.message_types_by_name[message].fields_by_name[field]
    assert descriptor.number == number
    assert descriptor.type == kind
    assert descriptor.is_repeated is repeated


def test_share_id_is_optional_and_v1_only() -> None:
    assert dra_v1.Device.DESCRIPTOR.fields_by_name["share_id"].has_presence
    assert "share_id" not in dra_v1beta1.Device.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize(
    ("file", "service", "methods"),
    [
        (
            dra_v1.DESCRIPTOR,
            "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",
            {"NodePrepareResources", "NodeUnprepareResources"},
        ),
        (
            dra_v1beta1.DESCRIPTOR,
            "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
            {"NodePrepareResources", "NodeUnprepareResources"},
        ),
        (health_v1alpha1.DESCRIPTOR, "v1alpha1.DRAResourceHealth", {"NodeWatchResources"}),
    ],
)
def test_service_paths(file: FileDescriptor, service: str, methods: set[str]) -> None:
    (descriptor,) = file.services_by_name.values()
    assert descriptor.full_name == service
    assert {m.name for m in descriptor.methods} == methods


def test_health_enum_values() -> None:
    values = health_v1alpha1.HealthStatus
    assert (values.UNKNOWN, values.HEALTHY, values.UNHEALTHY) == (0, 1, 2)
    stream = health_v1alpha1.DESCRIPTOR.services_by_name["DRAResourceHealth"].methods[0]
    assert stream.server_streaming
