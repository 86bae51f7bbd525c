"""How devices reach the container, per strategy, kubelet and runtime; CDI spec versions."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from deviceplugin import cdi
from deviceplugin.backend import Device, DeviceNode, Mount
from deviceplugin.testkit import FakeKubelet
from deviceplugin.testruntime import (
    CONTAINERD_1_6,
    CONTAINERD_1_7_0,
    CONTAINERD_1_7_2,
    Runtime,
    UnresolvableDeviceError,
    create_container,
    parse_version,
    spec_problem,
)
from tests.deviceplugin.backends import ScriptedBackend
from tests.deviceplugin.conftest import make_config, running

RESOURCE = "acme.example/fpga"
FPGA = Device(
    "fpga0",
    device_nodes=(DeviceNode("/dev/acme0", "/dev/fpga0", "rw"),),
    mounts=(Mount("/opt/acme/lib", "/usr/lib/acme", read_only=True),),
    envs={"ACME_DEVICE": "fpga0"},
)
SPECS, FIELD, ANNOTATIONS = "deviceSpecs", "cdiField", "cdiAnnotations"
KUBELET_1_27 = False  # drops cdi_devices (as 1.28 does without the gate)
KUBELET_1_31 = True


@pytest.mark.parametrize(
    ("strategies", "kubelet_passes_field", "runtime", "gets_device"),
    [
        ([SPECS], KUBELET_1_27, CONTAINERD_1_6, True),
        ([FIELD], KUBELET_1_31, CONTAINERD_1_7_2, True),
        # cdi: true before this change: an older kubelet drops the field, silently.
        ([FIELD], KUBELET_1_27, CONTAINERD_1_7_2, False),
        ([FIELD, ANNOTATIONS], KUBELET_1_27, CONTAINERD_1_7_0, True),
        ([FIELD, ANNOTATIONS], KUBELET_1_31, CONTAINERD_1_7_2, True),
        ([ANNOTATIONS], KUBELET_1_27, CONTAINERD_1_7_0, True),
        # containerd 1.6 has no CDI: only plain device specs reach it.
        ([ANNOTATIONS], KUBELET_1_31, CONTAINERD_1_6, False),
        ([FIELD, SPECS], KUBELET_1_27, CONTAINERD_1_6, True),
    ],
)
async def test_the_container_gets_its_device_where_the_strategy_can_reach_it(
    short_tmp: Path,
    strategies: list[str],
    kubelet_passes_field: bool,
    runtime: Runtime,
    gets_device: bool,
) -> None:
    config = make_config(
        short_tmp,
        {"resourceName": RESOURCE, "backend": "simulated", "deviceListStrategy": strategies},
    )
    async with (
        FakeKubelet(config.device_plugin_dir, cdi_field=kubelet_passes_field) as kubelet,
        running(config, [ScriptedBackend([FPGA])]),
    ):
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 1)
        response = await kubelet.admit(RESOURCE, 1)
        container = create_container(kubelet.container_config(response), runtime, [config.cdi.dir])
    assert container.envs["NODEPLUG_ACME_EXAMPLE_FPGA"] == "fpga0"
    if gets_device:
        assert container.devices == {"/dev/fpga0": "/dev/acme0"}
        assert container.mounts == {"/usr/lib/acme": "/opt/acme/lib"}
        assert container.envs["ACME_DEVICE"] == "fpga0"
    else:
        assert container.devices == {} and container.mounts == {}


async def test_cdi_true_is_the_cdi_field_and_annotations_name_the_resource(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    config = make_config(
        short_tmp,
        {"resourceName": RESOURCE, "backend": "simulated", "cdi": True},
        {
            "resourceName": "acme.example/dsp",
            "backend": "simulated",
            "deviceListStrategy": ANNOTATIONS,
        },
    )
    backends = [ScriptedBackend([FPGA]), ScriptedBackend([Device("dsp0"), Device("dsp1")])]
    async with running(config, backends):
        await kubelet.wait_for(lambda c: {RESOURCE, "acme.example/dsp"} <= c.keys())
        await kubelet.wait_for_devices("acme.example/dsp", lambda d: len(d) == 2)
        fpga = (await kubelet.allocate(RESOURCE, [["fpga0"]])).container_responses[0]
        dsp = (await kubelet.allocate("acme.example/dsp", [["dsp1", "dsp0"]])).container_responses[
            0
        ]
    assert [c.name for c in fpga.cdi_devices] == ["acme.example/fpga=fpga0"]
    assert (list(fpga.devices), dict(fpga.annotations)) == ([], {})
    assert list(dsp.cdi_devices) == []
    assert dict(dsp.annotations) == {
        "cdi.k8s.io/nodeplug_acme.example_dsp": "acme.example/dsp=dsp1,acme.example/dsp=dsp0"
    }


# pkg/cdi/producer/annotations Key(): at most 63 characters after the prefix,
# alphanumeric at both ends, '-', '_', '.' between.
_KEY_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"


@pytest.mark.parametrize(
    "resource",
    ["acme.example/fpga", "a.io/x", "example.com/Name_with.dots-1", "d" * 200 + ".io/" + "n" * 63],
)
def test_annotation_keys_are_what_the_cdi_library_accepts(resource: str) -> None:
    key = cdi.annotation_key(resource)
    prefix, name = key[: len(cdi.ANNOTATION_PREFIX)], key[len(cdi.ANNOTATION_PREFIX) :]
    assert prefix == "cdi.k8s.io/"
    assert re.fullmatch(_KEY_NAME, name), name
    assert cdi.annotation_key(resource + "x") != key


def spec_of(kind: str, *devices: Device) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(json.dumps(cdi.spec(kind, devices)))
    return document


SAME_PATH = Device("fpga0", device_nodes=(DeviceNode("/dev/fpga0"),), envs={"A": "1"})


@pytest.mark.parametrize(
    ("kind", "devices", "version"),
    [
        ("acme.example/fpga", [SAME_PATH], "0.3.0"),
        # The device node's host path differs from its container path: hostPath, 0.5.0.
        ("acme.example/fpga", [SAME_PATH, FPGA], "0.5.0"),
        ("acme.example/fpga", [Device("0fpga")], "0.5.0"),
        ("acme.example/fpga.v2", [SAME_PATH], "0.6.0"),
        ("acme.example/fpga_v2", [SAME_PATH], "0.3.0"),
    ],
)
def test_specs_carry_the_lowest_version_that_expresses_them(
    kind: str, devices: list[Device], version: str
) -> None:
    document = spec_of(kind, *devices)
    assert document["cdiVersion"] == version
    assert spec_problem(document, parse_version(version)) is None
    lower = (0, parse_version(version)[1] - 1, 0)
    if lower >= (0, 3, 0):
        assert spec_problem(document, lower) is not None, "a runtime that old refuses it"
    if version == "0.3.0":
        assert "hostPath" not in json.dumps(document)


async def test_a_runtime_refuses_a_spec_newer_than_its_cdi_library(short_tmp: Path) -> None:
    """containerd 1.7.0's CDI library knows specs up to 0.5.0; a dot in the class needs
    0.6.0, and then the device cannot be resolved: use deviceSpecs as well there."""
    resource = "acme.example/fpga.v2"
    config = make_config(short_tmp, {"resourceName": resource, "backend": "simulated", "cdi": True})
    async with (
        FakeKubelet(config.device_plugin_dir) as kubelet,
        running(config, [ScriptedBackend([SAME_PATH])]),
    ):
        await kubelet.wait_for_devices(resource, lambda d: len(d) == 1)
        response = await kubelet.admit(resource, 1)
    container_config = kubelet.container_config(response)
    with pytest.raises(UnresolvableDeviceError, match=re.escape("acme.example/fpga.v2=fpga0")):
        create_container(container_config, CONTAINERD_1_7_2, [config.cdi.dir])
    newer = Runtime("a runtime with CDI 0.6", cdi_field=True, cdi_library=(0, 6, 0))
    assert create_container(container_config, newer, [config.cdi.dir]).devices == {
        "/dev/fpga0": "/dev/fpga0"
    }
