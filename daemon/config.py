"""The daemon's YAML config: parsed, validated, and every error names its field.

kubeletDir: /var/lib/kubelet       # the kubelet's --root-dir: plugins_registry/, plugins/
devicePluginDir: /var/lib/kubelet/device-plugins  # kubelet.sock: fixed, whatever the root dir
stateDir: /var/lib/nodeplug
http:
  address: "0.0.0.0:9120"          # /metrics, /healthz, /readyz; null turns it off
cdi:
  dir: /var/run/cdi                # CDI specs of resources with `cdi: true`
nodeFeatures:                      # NFD local feature file; null turns it off
  file: /etc/kubernetes/node-feature-discovery/features.d/nodeplug
devicePluginRegistration: kubelet  # or pluginWatcher (plugins_registry, type DevicePlugin)
kubeconfig: null                   # DRA's API credentials; null: in-cluster, then $KUBECONFIG
devicePlugins:
  - resourceName: example.com/widget
    backend: glob
    config: {paths: ["/dev/widget*"]}
    replicas: 1                    # >1 shares each device among that many containers
    allocationPolicy: spread       # or pack: how replicas are handed out
    hookTimeout: 10                # seconds a backend's allocate/pre_start may take (pre_start:
                                   #   also ends before the kubelet's 30 s PreStart deadline)
    deviceListStrategy: [deviceSpecs]  # how devices reach containers, one or more of:
                                   #   deviceSpecs (nodes, mounts, env in Allocate's answer),
                                   #   cdiField (CDI names: kubelet 1.29+, or 1.28 with the
                                   #   DevicePluginCDIDevices gate), cdiAnnotations (CDI
                                   #   names in a cdi.k8s.io/ annotation: any kubelet)
    cdi: false                     # true: the same as deviceListStrategy: [cdiField]
    api: devicePlugin              # or dra, or both: which kubelet API serves the resource
    draDriverName: widget.example.com  # default <name>.<domain> of resourceName
csi: {...}                         # see csi/config.py
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import msgspec
import yaml

from csi.config import CsiConfig, Mode
from deviceplugin import configkit
from deviceplugin.allocation import Policy
from deviceplugin.backend import Backend, BackendNotFoundError, load_backend_factory
from deviceplugin.cdi import CDI_STRATEGIES, DeviceListStrategy
from deviceplugin.dra import names as dra_names
from deviceplugin.files import bound_path_length
from deviceplugin.names import MAX_SOCKET_PATH, resource_name_problem
from deviceplugin.socketdir import DEVICE_PLUGIN_PATH

PLUGIN_REGISTRY_SUBDIR = "plugins_registry"
CSI_PLUGIN_SUBDIR = "plugins"
# The longest socket name nodeplug puts in the device-plugins directory (hashed names).
_LONGEST_SOCKET_NAME = len("nodeplug-0123456789abcdef.sock")
# Far beyond any real config, far below what a recursive YAML composer or validator
# can take (PyYAML's composer overflows Python's stack at a few hundred levels).
MAX_NESTING = 64
# Nodes once YAML aliases are expanded: aliases of aliases grow exponentially.
MAX_NODES = 100_000


class ConfigError(Exception):
    """A config the daemon refuses; each line names a field and what is wrong with it."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))

    def report(self) -> str:
        lines = [f"invalid config {self.source}:"]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


def _valid(name: str, what: str, problem: str | None) -> str:
    if problem is not None:
        raise ValueError(f"{name!r} is not a valid {what}: {problem}")
    return name


class ResourceName(configkit.Checked):
    @classmethod
    def check(cls, value: str) -> str:
        return _valid(value, "extended resource name", resource_name_problem(value))


class DraDriverName(configkit.Checked):
    @classmethod
    def check(cls, value: str) -> str:
        problem = dra_names.driver_name_problem(value)
        return _valid(value, "DRA driver name", problem and f"it {problem}")


class ListenAddress(configkit.Checked):
    @classmethod
    def check(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} must be host:port, e.g. 0.0.0.0:9120 or [::]:9120")
        if host.startswith("[") != host.endswith("]"):
            raise ValueError(f"{value!r}: an IPv6 host goes in brackets, e.g. [::1]:9120")
        return value


class Registration(StrEnum):
    """How device plugins announce themselves to the kubelet."""

    KUBELET = "kubelet"  # Registration.Register on kubelet.sock
    PLUGIN_WATCHER = "pluginWatcher"  # a socket in plugins_registry, type DevicePlugin


class Api(StrEnum):
    """Which kubelet API serves a resource's devices."""

    DEVICE_PLUGIN = "devicePlugin"
    DRA = "dra"
    BOTH = "both"


class HttpSpec(configkit.Section, frozen=True):
    address: ListenAddress | None = ListenAddress("0.0.0.0:9120")


class CdiSpec(configkit.Section, frozen=True):
    dir: Path = Path("/var/run/cdi")


class NodeFeaturesSpec(configkit.Section, frozen=True):
    file: Path | None = Path("/etc/kubernetes/node-feature-discovery/features.d/nodeplug")


Strategies = Annotated[list[DeviceListStrategy], msgspec.Meta(min_length=1)]


class DevicePluginSpec(configkit.Section, frozen=True):
    resource_name: ResourceName
    backend: Annotated[str, msgspec.Meta(min_length=1)]
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    replicas: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    allocation_policy: Policy = Policy.SPREAD
    hook_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0
    # One strategy, or a list of them.
    device_list_strategy: Strategies | DeviceListStrategy | None = None
    cdi: bool = False
    api: Api = Api.DEVICE_PLUGIN
    dra_driver_name: DraDriverName | None = None

    def __post_init__(self) -> None:
        strategies = self.device_list_strategy
        if isinstance(strategies, list) and len(set(strategies)) != len(strategies):
            raise configkit.field_problem("deviceListStrategy", "names a strategy more than once")
        if self.dra_driver_name is not None and not self.serves_dra:
            raise ValueError("draDriverName: only used with api: dra or both")
        problem = dra_names.driver_name_problem(self.driver_name)
        if self.serves_dra and problem is not None:
            raise ValueError(
                f"draDriverName: the default {self.driver_name!r} (from resourceName) is not "
                f"a valid DRA driver name: it {problem}; set draDriverName"
            )

    @property
    def serves_device_plugin(self) -> bool:
        return self.api is not Api.DRA

    @property
    def serves_dra(self) -> bool:
        return self.api is not Api.DEVICE_PLUGIN

    @property
    def driver_name(self) -> str:
        return self.dra_driver_name or dra_names.default_driver_name(self.resource_name)

    @property
    def strategies(self) -> frozenset[DeviceListStrategy]:
        if isinstance(self.device_list_strategy, list):
            return frozenset(self.device_list_strategy)
        if self.device_list_strategy is not None:
            return frozenset({self.device_list_strategy})
        if self.cdi:
            return frozenset({DeviceListStrategy.CDI_FIELD})
        return frozenset({DeviceListStrategy.DEVICE_SPECS})

    @property
    def writes_cdi_spec(self) -> bool:
        return bool(self.strategies & CDI_STRATEGIES)


class Config(configkit.Section, frozen=True):
    kubelet_dir: Path = Path("/var/lib/kubelet")
    device_plugin_dir: Path = DEVICE_PLUGIN_PATH
    state_dir: Path = Path("/var/lib/nodeplug")
    # `http: null` and `nodeFeatures: null` are read as a null address and file (parse()).
    http: HttpSpec = msgspec.field(default_factory=HttpSpec)
    cdi: CdiSpec = msgspec.field(default_factory=CdiSpec)
    node_features: NodeFeaturesSpec = msgspec.field(default_factory=NodeFeaturesSpec)
    device_plugin_registration: Registration = Registration.KUBELET
    device_plugins: list[DevicePluginSpec] = msgspec.field(default_factory=list)
    csi: CsiConfig | None = None
    kubeconfig: Path | None = None

    def __post_init__(self) -> None:
        self._check_consistency()
        self._check_dra_drivers()
        self._check_csi()

    @property
    def device_plugin_socket_dir(self) -> Path:
        """Where nodeplug's device-plugin sockets live, by registration mode."""
        if self.device_plugin_registration is Registration.PLUGIN_WATCHER:
            return self.kubelet_dir / PLUGIN_REGISTRY_SUBDIR
        return self.device_plugin_dir

    def _check_consistency(self) -> None:
        seen: dict[str, int] = {}
        for index, spec in enumerate(self.device_plugins):
            if spec.cdi and spec.device_list_strategy is not None:
                raise configkit.field_problem(
                    f"devicePlugins[{index}].cdi",
                    "give cdi or deviceListStrategy, not both "
                    "(cdi: true is the same as deviceListStrategy: [cdiField])",
                )
            if spec.resource_name in seen:
                raise configkit.field_problem(
                    f"devicePlugins[{index}].resourceName",
                    f"{spec.resource_name!r} is already used by "
                    f"devicePlugins[{seen[spec.resource_name]}]",
                )
            seen[spec.resource_name] = index
        directory = self.device_plugin_socket_dir
        longest = bound_path_length(directory / ("x" * _LONGEST_SOCKET_NAME))
        if self.device_plugins and longest > MAX_SOCKET_PATH:
            field = (
                "kubeletDir"
                if self.device_plugin_registration is Registration.PLUGIN_WATCHER
                else "devicePluginDir"
            )
            raise configkit.field_problem(
                field,
                f"{str(directory)!r} is too long for device-plugin sockets; their "
                f"paths would exceed the {MAX_SOCKET_PATH}-byte Unix socket limit",
            )

    def _check_dra_drivers(self) -> None:
        seen: dict[str, int] = {}
        for index, spec in enumerate(self.device_plugins):
            if not spec.serves_dra:
                continue
            name = spec.driver_name
            if name in seen:
                raise configkit.field_problem(
                    f"devicePlugins[{index}].draDriverName",
                    f"{name!r} is already the DRA driver of devicePlugins[{seen[name]}]",
                )
            seen[name] = index
            sockets = (
                f"{dra_names.PLUGINS_SUBDIR}/{name}/{dra_names.SOCKET_NAME}",
                f"{PLUGIN_REGISTRY_SUBDIR}/{name}-reg.sock",
            )
            for socket in sockets:
                if bound_path_length(self.kubelet_dir / socket) > MAX_SOCKET_PATH:
                    raise configkit.field_problem(
                        f"devicePlugins[{index}].draDriverName",
                        f"{socket!r} below kubeletDir would exceed the "
                        f"{MAX_SOCKET_PATH}-byte Unix socket limit",
                    )

    @property
    def csi_socket(self) -> Path | None:
        """Where the CSI driver serves: csi.endpoint, else below kubeletDir (node mode)."""
        if self.csi is None:
            return None
        default = self.kubelet_dir / CSI_PLUGIN_SUBDIR / self.csi.driver_name / "csi.sock"
        return self.csi.endpoint or default

    def _check_csi(self) -> None:
        if self.csi is None or self.csi_socket is None:
            return
        if self.csi.mode is Mode.CONTROLLER and self.device_plugins:
            raise configkit.field_problem(
                "devicePlugins",
                "csi.mode: controller serves only the cluster's side of volume expansion; "
                "device plugins and DRA drivers run in the nodes' daemons",
            )
        field = "csi.endpoint" if self.csi.endpoint else "csi.driverName"
        sockets = [(field, self.csi_socket)]
        if self.csi.mode is Mode.NODE:
            registration = f"{PLUGIN_REGISTRY_SUBDIR}/{self.csi.driver_name}-reg.sock"
            sockets.append(("csi.driverName", self.kubelet_dir / registration))
        for field, socket in sockets:
            if bound_path_length(socket) > MAX_SOCKET_PATH:
                raise configkit.field_problem(
                    field,
                    f"{str(socket)!r} would exceed the {MAX_SOCKET_PATH}-byte Unix socket limit",
                )


def confined_to(data: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """The same config with every host path the daemon writes under `root`, HTTP on a free port.

    For the sandbox and for tests: nothing touches the real kubelet, /var/run/cdi or
    the NFD directory, and several daemons can run side by side.
    """
    return {
        **data,
        "kubeletDir": str(root / "kubelet"),
        # Beside kubeletDir, not in it: as on a node with a non-default --root-dir, so
        # nothing may find it by way of kubeletDir.
        "devicePluginDir": str(root / "device-plugins"),
        "stateDir": str(root / "state"),
        "cdi": {"dir": str(root / "cdi")},
        "nodeFeatures": {"file": str(root / "features.d" / "nodeplug")},
        "http": {"address": "127.0.0.1:0"},
    }


def _pydantic_problems(error: Exception) -> list[str] | None:
    """A vendor backend's pydantic ValidationError as problems, or None if it is not one.

    nodeplug itself does not use pydantic: it is looked for only if already imported.
    """
    pydantic_core = sys.modules.get("pydantic_core")
    if pydantic_core is None or not isinstance(error, pydantic_core.ValidationError):
        return None
    problems = []
    for detail in error.errors():
        where = ""
        for part in detail["loc"]:
            where += f"[{part}]" if isinstance(part, int) else f".{part}"
        message = _PYDANTIC_MESSAGES.get(detail["type"], detail["msg"])
        problems.append(f"{where}: {message.removeprefix('Value error, ')}")
    return problems


_PYDANTIC_MESSAGES = {
    "extra_forbidden": "unknown field (check its spelling and indentation)",
    "missing": "required field is missing",
}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML loaders silently overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(data: object, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): must be a mapping, not {type(data).__name__}"])
    # `http: null` and `nodeFeatures: null` mean what their null address and file mean.
    nulls = {"http": {"address": None}, "nodeFeatures": {"file": None}}
    data = {**data, **{key: off for key, off in nulls.items() if key in data and data[key] is None}}
    try:
        return configkit.convert(data, Config)
    except configkit.InvalidConfigError as error:
        raise ConfigError(source, error.lines()) from None


@dataclass
class _Node:
    """A YAML node as its events arrive: what it contains once aliases are expanded."""

    anchor: str | None
    levels: int  # collections on its deepest path, itself included (a scalar: 0)
    values: int = 1  # values in it, itself included


def _shape_problem(text: str) -> str | None:
    """Why the document is too deep or too large to load, judged from its event stream.

    PyYAML's parser is iterative but its composer recurses once per level, so a deep
    document must be refused before it is composed. An alias counts as a copy of its
    anchor's node, since that is what the loaded data holds.
    """
    open_nodes: list[_Node] = []
    anchors: dict[str, _Node] = {}  # of nodes already read completely
    values = 0

    def add(node: _Node) -> str | None:
        """Count a complete node (a scalar, an alias, a closed collection) in its parent."""
        if open_nodes:
            parent = open_nodes[-1]
            parent.levels = max(parent.levels, node.levels + 1)
            parent.values += node.values
        if node.anchor is not None:
            anchors[node.anchor] = node
        if len(open_nodes) + node.levels > MAX_NESTING:
            return f"nested more than {MAX_NESTING} levels deep"
        if values > MAX_NODES:
            return f"more than {MAX_NODES} values once its aliases are expanded"
        return None

    for event in yaml.parse(text, Loader=_StrictLoader):
        problem = None
        if isinstance(event, yaml.CollectionStartEvent):
            values += 1
            open_nodes.append(_Node(event.anchor, levels=1))
            if len(open_nodes) > MAX_NESTING:
                problem = f"nested more than {MAX_NESTING} levels deep"
        elif isinstance(event, yaml.CollectionEndEvent):
            problem = add(open_nodes.pop())
        elif isinstance(event, yaml.ScalarEvent):
            values += 1
            problem = add(_Node(event.anchor, levels=0))
        elif isinstance(event, yaml.AliasEvent):
            target = anchors.get(event.anchor or "")
            if any(node.anchor == event.anchor for node in open_nodes):
                problem = f"alias *{event.anchor} refers to a node that contains it"
            elif target is not None:
                values += target.values
                problem = add(_Node(None, target.levels, target.values))
        if problem is not None:
            mark = event.start_mark
            return f"{problem} (line {mark.line + 1})" if mark is not None else problem
    return None


def load(path: Path, csi_mode: Mode | None = None) -> Config:
    """The config in the file; csi_mode: the CSI mode a command serves (`nodeplug controller`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), [f"cannot read the file: {error}"]) from None
    try:
        problem = _shape_problem(text)
        if problem is not None:
            raise ConfigError(str(path), [f"(top level): {problem}"])
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(str(path), [f"not valid YAML: {error}"]) from None
    if csi_mode is not None:
        data = _with_csi_mode(data, csi_mode, str(path))
    return parse(data, str(path))


def _with_csi_mode(data: object, mode: Mode, source: str) -> object:
    if not isinstance(data, dict) or not isinstance(data.get("csi"), dict):
        raise ConfigError(source, [f"csi: required to serve csi.mode {mode}"])
    section = data["csi"]
    if section.get("mode", mode) != mode:
        raise ConfigError(
            source,
            [f"csi.mode: {section['mode']!r}, but this command serves {mode}: remove it"],
        )
    return {**data, "csi": {**section, "mode": str(mode)}}


def create_backends(
    config: Config, source: str = "<config>", only: Collection[str] | None = None
) -> dict[str, Backend]:
    """Instantiate device plugins' backends, by resource name; errors name their field.

    `only` limits it to those resources (a reload builds only what it starts). Whatever
    goes wrong, a backend that fails to import included, is a ConfigError: the config
    asks for something this node cannot run, and check-config must say so.
    """
    backends: dict[str, Backend] = {}
    problems = []
    for index, spec in enumerate(config.device_plugins):
        if only is not None and spec.resource_name not in only:
            continue
        where = f"devicePlugins[{index}]"
        try:
            factory = load_backend_factory(spec.backend)
        except BackendNotFoundError as error:
            problems.append(f"{where}.backend: {error}")
            continue
        except Exception as error:  # a vendor package's import can raise anything
            problems.append(f"{where}.backend: cannot load {spec.backend!r}: {_described(error)}")
            continue
        try:
            backends[spec.resource_name] = factory(spec.config)
        except configkit.InvalidConfigError as error:
            problems += error.lines(at=f"{where}.config")
        except msgspec.ValidationError as error:  # a vendor's own msgspec.convert()
            problems.append(configkit.problem(error, at=f"{where}.config"))
        except (ValueError, TypeError) as error:
            vendors = _pydantic_problems(error)
            if vendors is None:
                problems.append(f"{where}.config: {error}")
            else:
                problems += [f"{where}.config{problem}" for problem in vendors]
        except Exception as error:  # and so can its factory
            problems.append(f"{where}.config: backend {spec.backend!r} failed: {_described(error)}")
    if problems:
        raise ConfigError(source, problems)
    return backends


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
