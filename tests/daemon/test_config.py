"""Config: defaults, and every bad input refused with the field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import config as configuration
from daemon.inspection import describe
from deviceplugin import configkit
from deviceplugin.allocation import Policy

GOOD_PLUGIN = {
    "resourceName": "example.com/widget",
    "backend": "glob",
    "config": {"paths": ["/dev/w*"]},
}


def test_defaults() -> None:
    config = configuration.parse({})
    assert config.kubelet_dir == Path("/var/lib/kubelet")
    assert config.state_dir == Path("/var/lib/nodeplug")
    assert config.device_plugin_dir == Path("/var/lib/kubelet/device-plugins")
    # The kubelet's device-plugin directory does not follow its root dir.
    moved = configuration.parse({"kubeletDir": "/var/lib/k0s/kubelet"})
    assert moved.device_plugin_dir == Path("/var/lib/kubelet/device-plugins")
    assert config.device_plugins == []
    assert configuration.parse(None) == config


@pytest.mark.parametrize(
    ("entry", "strategies"),
    [
        ({}, {"deviceSpecs"}),
        ({"cdi": True}, {"cdiField"}),
        ({"deviceListStrategy": "cdiAnnotations"}, {"cdiAnnotations"}),
        ({"deviceListStrategy": ["cdiField", "deviceSpecs"]}, {"cdiField", "deviceSpecs"}),
    ],
)
def test_device_list_strategies(entry: dict[str, Any], strategies: set[str]) -> None:
    (spec,) = configuration.parse({"devicePlugins": [{**GOOD_PLUGIN, **entry}]}).device_plugins
    assert spec.strategies == strategies
    assert spec.writes_cdi_spec is (strategies != {"deviceSpecs"})


def test_full_device_plugin_entry() -> None:
    config = configuration.parse(
        {
            "devicePlugins": [
                {**GOOD_PLUGIN, "replicas": 4, "allocationPolicy": "pack", "hookTimeout": 2.5}
            ]
        }
    )
    (spec,) = config.device_plugins
    assert (spec.replicas, spec.allocation_policy, spec.hook_timeout) == (4, Policy.PACK, 2.5)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], "(top level): must be a mapping"),
        ({"kubeletDir": "relative/dir"}, "kubeletDir: must be an absolute path"),
        (
            {"devicePluginDir": "/" + "d" * 90, "devicePlugins": [GOOD_PLUGIN]},
            "devicePluginDir: '/ddd",
        ),
        (
            {
                "kubeletDir": "/" + "k" * 70,
                "devicePluginRegistration": "pluginWatcher",
                "devicePlugins": [GOOD_PLUGIN],
            },
            "kubeletDir: '/kkk",
        ),
        ({"devicePluginDir": "device-plugins"}, "devicePluginDir: must be an absolute path"),
        ({"stateDir": 7}, "stateDir:"),
        ({"devicePlugin": []}, "devicePlugin: unknown field"),
        ({"devicePlugins": {"resourceName": "a/b"}}, "devicePlugins: Input should be a valid list"),
        ({"devicePlugins": [{"backend": "glob"}]}, "devicePlugins[0].resourceName: required field"),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "resourceName": "widget"}]},
            "devicePlugins[0].resourceName: 'widget' is not a valid",
        ),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "resourceName": "kubernetes.io/x"}]},
            "reserved for native",
        ),
        ({"devicePlugins": [{**GOOD_PLUGIN, "replicas": 0}]}, "devicePlugins[0].replicas:"),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "replicas": "2"}]},
            "devicePlugins[0].replicas: Input should be a valid integer",
        ),
        ({"devicePlugins": [{**GOOD_PLUGIN, "replicas": True}]}, "devicePlugins[0].replicas:"),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "allocationPolicy": "random"}]},
            "devicePlugins[0].allocationPolicy:",
        ),
        ({"devicePlugins": [{**GOOD_PLUGIN, "hookTimeout": -1}]}, "devicePlugins[0].hookTimeout:"),
        ({"devicePlugins": [{**GOOD_PLUGIN, "extra": 1}]}, "devicePlugins[0].extra: unknown field"),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "deviceListStrategy": ["envvar"]}]},
            "devicePlugins[0].deviceListStrategy[0]: Input should be 'deviceSpecs', 'cdiField'",
        ),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "deviceListStrategy": []}]},
            "devicePlugins[0].deviceListStrategy: List should have at least 1 item",
        ),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "deviceListStrategy": ["cdiField", "cdiField"]}]},
            "devicePlugins[0].deviceListStrategy: names a strategy more than once",
        ),
        (
            {"devicePlugins": [{**GOOD_PLUGIN, "cdi": True, "deviceListStrategy": "cdiField"}]},
            "devicePlugins[0].cdi: give cdi or deviceListStrategy, not both",
        ),
        (
            {"devicePlugins": [GOOD_PLUGIN, GOOD_PLUGIN]},
            "devicePlugins[1].resourceName: 'example.com/widget' is already used",
        ),
    ],
)
def test_bad_configs_name_the_field(data: Any, expected: str) -> None:
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.parse(data, "test.yaml")
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    assert caught.value.report().startswith("invalid config test.yaml:")


def test_every_problem_is_reported_at_once() -> None:
    data = {
        "stateDir": 7,
        "devicePlugins": [{"resourceName": "widget", "replicas": 0}, {**GOOD_PLUGIN, "api": "x"}],
    }
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.parse(data, "test.yaml")
    assert caught.value.problems == [
        "stateDir: Input should be a valid path, not an integer",
        "devicePlugins[0].resourceName: 'widget' is not a valid extended resource name: "
        "must be 'domain/name' (a name without a domain is a native resource)",
        "devicePlugins[0].replicas: Input should be greater than or equal to 1",
        "devicePlugins[0].backend: required field is missing",
        "devicePlugins[1].api: Input should be 'devicePlugin', 'dra' or 'both', not 'x'",
    ]


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        (
            {**GOOD_PLUGIN, "backend": "nope"},
            "devicePlugins[0].backend: unknown backend 'nope' (available: ",
        ),
        ({**GOOD_PLUGIN, "config": {}}, "devicePlugins[0].config.paths: required field is missing"),
        ({**GOOD_PLUGIN, "config": {"paths": ["dev/w*"]}}, "devicePlugins[0].config.paths[0]: "),
        ({**GOOD_PLUGIN, "config": {"paths": ["/dev/../etc/*"]}}, "no '..'"),
        (
            {**GOOD_PLUGIN, "config": {"paths": ["/dev/w*"], "permissions": "rwx"}},
            "config.permissions",
        ),
        (
            {**GOOD_PLUGIN, "config": {"paths": ["/dev/w*"], "permissions": "rr"}},
            "config.permissions",
        ),
        ({**GOOD_PLUGIN, "backend": "udev", "config": {"subsystem": "a b"}}, "config.subsystem"),
        ({**GOOD_PLUGIN, "backend": "simulated", "config": {"count": -1}}, "config.count"),
    ],
)
def test_backend_config_errors_name_the_field(plugin: dict[str, Any], expected: str) -> None:
    config = configuration.parse({"devicePlugins": [plugin]})
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.create_backends(config)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems


NOT_AN_INTEGER = "Input should be a valid integer, unable to parse string as an integer"


@pytest.mark.parametrize(
    ("backend", "config", "expected"),
    [
        (
            "pydantic-vendor",
            {"size": "big"},
            [f"devicePlugins[0].config.size: {NOT_AN_INTEGER}"],
        ),
        (
            "pydantic-vendor",
            {"ports": [1, "x"], "other": 1},
            [
                "devicePlugins[0].config.size: required field is missing",
                f"devicePlugins[0].config.ports[1]: {NOT_AN_INTEGER}",
                "devicePlugins[0].config.other: unknown field (check its spelling and indentation)",
            ],
        ),
        (
            "msgspec-vendor",
            {"size": "big"},
            ["devicePlugins[0].config.size: Input should be a valid integer, not a string"],
        ),
        ("msgspec-vendor", {}, ["devicePlugins[0].config.size: required field is missing"]),
    ],
)
def test_vendor_validation_errors_name_the_field(
    vendor_site: Path, backend: str, config: dict[str, Any], expected: list[str]
) -> None:
    """A vendor's factory may validate with pydantic or msgspec; each problem names its field."""
    plugin = {"resourceName": "vendor.example/x", "backend": backend, "config": config}
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.create_backends(configuration.parse({"devicePlugins": [plugin]}))
    assert caught.value.problems == expected


def test_the_daemon_never_imports_pydantic() -> None:
    """pydantic cost ~9 MiB of idle RSS: a vendor may use it, nodeplug does not."""
    code = (
        "import sys, daemon.cli, daemon.supervisor, daemon.csiplugin, daemon.inspection; "
        "from deviceplugin.backends import glob, simulated, udev; "
        "assert not [m for m in sys.modules if m.startswith(('pydantic', 'annotated_types'))]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("devicePlugins: [", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("kubeletDir: /x\nkubeletDir: /y\n", "duplicate key 'kubeletDir'"),
        ("devicePlugins:\n- resourceName: a/b\n  resourceName: a/c\n", "duplicate key"),
        ("kubeletDir: /y\n", None),
    ],
)
def test_load_from_file(tmp_path: Path, text: str, expected: str | None) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    if expected is None:
        assert configuration.load(path).kubelet_dir == Path("/y")
        return
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.load(path)
    assert expected in str(caught.value)


def nested(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


def doubling(times: int) -> str:
    """Each anchor holds two copies of the previous one: 2**times values in a few lines."""
    lines = ["x0: &x0 [1, 2]"]
    lines += [f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}]" for i in range(1, times + 1)]
    return "devicePlugins: []\nunused:\n" + "\n".join(f"  {line}" for line in lines) + "\n"


PLUGIN_CONFIG = "devicePlugins:\n- resourceName: a.io/b\n  backend: simulated\n  config: "


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PLUGIN_CONFIG + nested(5000) + "\n", "nested more than 64 levels deep (line 4)"),
        (PLUGIN_CONFIG + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested more than 64"),
        # The document's own mapping, the list, the plugin and its config: 4 levels.
        (PLUGIN_CONFIG + "{x: " + nested(60) + "}\n", None),
        (PLUGIN_CONFIG + "{x: " + nested(61) + "}\n", "nested more than 64"),
        (
            "a: &deep " + nested(40) + "\nb: " + nested(30, "*deep") + "\n",
            "nested more than 64 levels deep (line 2)",
        ),
        ("a: &loop [1, *loop]\n", "alias *loop refers to a node that contains it"),
        (doubling(40), "more than 100000 values once its aliases are expanded"),
        ("a: *nowhere\n", "not valid YAML"),
    ],
)
def test_deep_or_huge_documents_are_refused(
    tmp_path: Path, text: str, expected: str | None
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    if expected is None:
        configuration.load(path)
        return
    with pytest.raises(configuration.ConfigError) as caught:
        configuration.load(path)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("data", "http", "features"),
    [
        ({"nodeFeatures": None}, "0.0.0.0:9120", None),
        ({"nodeFeatures": {"file": None}}, "0.0.0.0:9120", None),
        ({"http": None}, None, Path("/etc/kubernetes/node-feature-discovery/features.d/nodeplug")),
        ({"http": {"address": None}, "nodeFeatures": None}, None, None),
    ],
)
def test_null_turns_http_and_node_features_off(
    data: dict[str, Any], http: str | None, features: Path | None
) -> None:
    config = configuration.parse(data)
    assert (config.http.address, config.node_features.file) == (http, features)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(configuration.ConfigError, match="cannot read the file"):
        configuration.load(tmp_path / "missing.yaml")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(configuration.ConfigError, match="cannot read the file"):
        configuration.load(binary)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["kubeletDir", "stateDir", "devicePlugins", "other"]),
        json_values,
        max_size=4,
    )
)
def test_property_any_input_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    try:
        config = configuration.parse(data)
    except configuration.ConfigError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)
        return
    try:
        configuration.create_backends(config)
    except configuration.ConfigError as error:
        assert error.problems


def host_paths(value: Any, where: str = "") -> dict[str, str]:
    """Every path-valued setting of a dumped config, by its dotted name."""
    if isinstance(value, dict):
        found: dict[str, str] = {}
        for key, item in value.items():
            found |= host_paths(item, f"{where}.{key}" if where else key)
        return found
    if isinstance(value, str) and value.startswith("/"):
        return {where: value}
    return {}


@pytest.mark.parametrize(
    ("csi", "expected"),
    [
        (
            {"nodeId": "n1", "pool": {"path": "/p", "image": "/p.img", "size": "1Gi"}},
            [
                "CSI driver          x.example.com on node n1",
                "    mode              node",
                "    socket            /k/plugins/x.example.com/csi.sock",
                "    pool              {'path': '/p', 'image': '/p.img', 'size': 1073741824}",
            ],
        ),
        (
            {"mode": "controller", "endpoint": "/csi/csi.sock"},
            [
                "CSI driver          x.example.com, expansion controller only",
                "    mode              controller",
                "    socket            /csi/csi.sock",
            ],
        ),
    ],
)
def test_check_config_describes_the_csi_driver(csi: dict[str, Any], expected: list[str]) -> None:
    data = {"kubeletDir": "/k", "csi": {"driverName": "x.example.com", **csi}}
    lines = describe(configuration.parse(data))
    assert lines[-len(expected) :] == expected


def test_confined_to_puts_every_host_path_under_one_root(tmp_path: Path) -> None:
    """Sandbox and tests must never touch the real kubelet: any path setting added
    later that confined_to() forgets fails here."""
    config = configuration.parse(configuration.confined_to({}, tmp_path))
    paths = host_paths(configkit.dumped(config))
    assert {"kubeletDir", "devicePluginDir", "stateDir", "cdi.dir", "nodeFeatures.file"} <= set(
        paths
    )
    outside = {k: v for k, v in paths.items() if not Path(v).is_relative_to(tmp_path)}
    assert outside == {}
    # The device-plugin directory is not found by way of kubeletDir.
    assert not config.device_plugin_dir.is_relative_to(config.kubelet_dir)
