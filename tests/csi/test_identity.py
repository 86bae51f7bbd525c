"""Identity service over the real socket."""

from __future__ import annotations

import pytest

from csi.v1 import csi_pb2
from tests.csi.conftest import DRIVER, Client

pytestmark = pytest.mark.root

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion


async def test_plugin_info_names_the_driver_and_version(csi: Client) -> None:
    info = await csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == DRIVER
    assert info.vendor_version


async def test_capabilities_are_exactly_what_is_implemented(csi: Client) -> None:
    response = await csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in response.capabilities if c.HasField("service")}
    expansion = {
        c.volume_expansion.type for c in response.capabilities if c.HasField("volume_expansion")
    }
    assert services == {
        Service.CONTROLLER_SERVICE,
        Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
        Service.GROUP_CONTROLLER_SERVICE,
    }
    assert expansion == {Expansion.ONLINE}


async def test_probe_reports_ready_after_start(csi: Client) -> None:
    response = await csi.identity.Probe(csi_pb2.ProbeRequest())
    assert response.HasField("ready")
    assert response.ready.value
