"""DRA's config keys (api, draDriverName, kubeconfig) and the naming rules behind them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon import config as configuration
from daemon.inspection import describe
from deviceplugin.backend import Device, Version
from deviceplugin.dra import names
from deviceplugin.dra.slices import chunks, device_entry, index_width, publishable, slice_index

WIDGET = {"resourceName": "example.com/widget", "backend": "glob", "config": {"paths": ["/x"]}}


def test_defaults() -> None:
    config = configuration.parse({"devicePlugins": [WIDGET]})
    (spec,) = config.device_plugins
    assert spec.api is configuration.Api.DEVICE_PLUGIN
    assert (spec.serves_device_plugin, spec.serves_dra) == (True, False)
    assert spec.driver_name == "widget.example.com"
    assert config.kubeconfig is None


@pytest.mark.parametrize(
    ("api", "plugin", "dra"),
    [("devicePlugin", True, False), ("dra", False, True), ("both", True, True)],
)
def test_api_choices(api: str, plugin: bool, dra: bool) -> None:
    (spec,) = configuration.parse({"devicePlugins": [{**WIDGET, "api": api}]}).device_plugins
    assert (spec.serves_device_plugin, spec.serves_dra) == (plugin, dra)


def test_driver_name_and_kubeconfig() -> None:
    config = configuration.parse(
        {
            "kubeconfig": "/etc/nodeplug/kubeconfig",
            "devicePlugins": [{**WIDGET, "api": "dra", "draDriverName": "w.vendor.example"}],
        }
    )
    assert config.kubeconfig == Path("/etc/nodeplug/kubeconfig")
    assert config.device_plugins[0].driver_name == "w.vendor.example"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"devicePlugins": [{**WIDGET, "api": "DRA"}]}, "devicePlugins[0].api: Input should be"),
        (
            {"devicePlugins": [{**WIDGET, "draDriverName": "w.example.com"}]},
            "devicePlugins[0]: draDriverName: only used with api: dra or both",
        ),
        (
            {"devicePlugins": [{**WIDGET, "api": "dra", "draDriverName": "Widget.Example"}]},
            "devicePlugins[0].draDriverName: 'Widget.Example' is not a valid DRA driver name",
        ),
        (
            {"devicePlugins": [{**WIDGET, "api": "dra", "draDriverName": "a" * 64}]},
            "at most 63 are allowed",
        ),
        (
            {"devicePlugins": [{**WIDGET, "resourceName": "example.com/wid_get", "api": "both"}]},
            "devicePlugins[0]: draDriverName: the default 'wid_get.example.com'",
        ),
        (
            {
                "devicePlugins": [
                    {**WIDGET, "api": "dra", "draDriverName": "d.example.com"},
                    {
                        **WIDGET,
                        "resourceName": "example.com/b",
                        "api": "both",
                        "draDriverName": "d.example.com",
                    },
                ]
            },
            "devicePlugins[1].draDriverName: 'd.example.com' is already the DRA driver of",
        ),
        (
            {
                "kubeletDir": "/" + "k" * 40,
                "devicePlugins": [{**WIDGET, "api": "dra", "draDriverName": "d" * 60 + ".io"}],
            },
            "below kubeletDir would exceed the 107-byte Unix socket limit",
        ),
        ({"kubeconfig": "relative/kubeconfig"}, "kubeconfig: must be an absolute path"),
    ],
)
def test_bad_dra_configs_name_the_field(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.parse(data)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


def test_a_daemon_without_dra_never_imports_the_kubernetes_client() -> None:
    """Idle RSS without DRA must not grow: the client is imported only by DRA units."""
    code = (
        "import sys, daemon.cli, daemon.supervisor, daemon.config; "
        "assert not [m for m in sys.modules if m.startswith(('lightkube', 'httpx2'))]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("model", True),
        ("acme.example/firmware", True),
        ("_x9", True),
        ("9lives", False),
        ("has-dash", False),
        ("a" * 32, True),
        ("a" * 33, False),
        ("Bad.Domain/x", False),
        ("/x", False),
    ],
)
def test_attribute_names(name: str, ok: bool) -> None:
    assert (names.qualified_name_problem(name) is None) is ok


@pytest.mark.parametrize(
    ("device", "problem"),
    [
        (Device("fpga0", attributes={"model": "x"}, capacity={"memory": "16Gi"}), None),
        (Device("FPGA0"), "not a DNS label"),
        (Device("fpga::0"), "not a DNS label"),
        (Device("f", attributes={"v": Version("1.2")}), "not a semantic version"),
        (Device("f", attributes={"v": Version("1.2.3-rc.1+b5")}), None),
        (Device("f", attributes={"s": "x" * 65}), "longer than 64"),
        (Device("f", capacity={"memory": "lots"}), "not a Kubernetes quantity"),
        (Device("f", capacity={"m": "1.5Gi"}), None),
        (Device("f", attributes={f"a{i}": i for i in range(33)}), "more than 32"),
    ],
)
def test_device_problems(device: Device, problem: str | None) -> None:
    found = names.device_problem(device, {})
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_default_node_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "worker-7")
    assert names.default_node_name() == "worker-7"
    monkeypatch.delenv("NODE_NAME")
    assert names.default_node_name()


@given(st.integers(min_value=1, max_value=5000))
def test_chunks_respect_the_api_limit_and_keep_every_device(count: int) -> None:
    entries = [{"name": f"d{i}"} for i in range(count)]
    slices = chunks(entries)
    assert all(1 <= len(s) <= 128 for s in slices)
    assert [e for s in slices for e in s] == entries
    width = index_width(len(slices))
    for index in range(len(slices)):
        assert slice_index(f"{index:0{width}x}-driver-node-abc12", width) == index


def test_publishable_leaves_out_unhealthy_and_unnamable_devices() -> None:
    devices = [Device("b", numa_node=0), Device("a"), Device("c", healthy=False), Device("D")]
    assert [e["name"] for e in publishable(devices)] == ["a", "b"]
    assert device_entry(Device("b", numa_node=0)) == {
        "name": "b",
        "attributes": {"numaNode": {"int": 0}},
    }


def test_check_config_describes_the_dra_drivers() -> None:

    config = configuration.parse({"devicePlugins": [{**WIDGET, "api": "dra"}], "kubeletDir": "/k"})
    text = "\n".join(describe(config))
    assert (
        "DRA driver        widget.example.com, socket /k/plugins/widget.example.com/dra.sock"
        in text
    )
    assert "device-plugins/" not in text, "a DRA-only resource has no device-plugin socket"
    assert "Kubernetes API      in-cluster, else $KUBECONFIG" in text
