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

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from csi.config import CsiConfig, Mode
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


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path, not {str(path)!r}")
    if "\0" in str(path):
        raise ValueError("must not contain NUL bytes")
    return path


def _resource_name(name: str) -> str:
    problem = resource_name_problem(name)
    if problem is not None:
        raise ValueError(f"{name!r} is not a valid extended resource name: {problem}")
    return name


def _driver_name(name: str) -> str:
    problem = dra_names.driver_name_problem(name)
    if problem is not None:
        raise ValueError(f"{name!r} is not a valid DRA driver name: it {problem}")
    return name


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _listen_address(value: str) -> str:
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


class HttpSpec(_Section):
    address: Annotated[StrictStr, AfterValidator(_listen_address)] | None = "0.0.0.0:9120"


class CdiSpec(_Section):
    dir: AbsolutePath = Path("/var/run/cdi")


class NodeFeaturesSpec(_Section):
    file: AbsolutePath | None = Path("/etc/kubernetes/node-feature-discovery/features.d/nodeplug")


class DevicePluginSpec(_Section):
    resource_name: Annotated[StrictStr, AfterValidator(_resource_name)] = Field(
        alias="resourceName"
    )
    backend: StrictStr = Field(min_length=1)
    config: dict[str, Any] = Field(default_factory=dict)
    replicas: StrictInt = Field(default=1, ge=1, le=1024)
    allocation_policy: Policy = Field(default=Policy.SPREAD, alias="allocationPolicy")
    hook_timeout: float = Field(default=10.0, strict=True, gt=0, le=300, alias="hookTimeout")
    device_list_strategy: list[DeviceListStrategy] | None = Field(
        default=None, min_length=1, alias="deviceListStrategy"
    )
    cdi: StrictBool = False
    api: Api = Api.DEVICE_PLUGIN
    dra_driver_name: Annotated[StrictStr, AfterValidator(_driver_name)] | None = Field(
        default=None, alias="draDriverName"
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

    @model_validator(mode="after")
    def _check_dra(self) -> DevicePluginSpec:
        if self.dra_driver_name is not None and not self.serves_dra:
            raise ValueError("draDriverName: only used with api: dra or both")
        problem = dra_names.driver_name_problem(self.driver_name)
        if self.serves_dra and problem is not None:
            raise ValueError(
                f"draDriverName: the default {self.driver_name!r} (from resourceName) is not "
                f"a valid DRA driver name: it {problem}; set draDriverName"
            )
        return self

    @field_validator("device_list_strategy", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("device_list_strategy")
    @classmethod
    def _each_once(cls, value: list[DeviceListStrategy] | None) -> object:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("names a strategy more than once")
        return value

    @property
    def strategies(self) -> frozenset[DeviceListStrategy]:
        if self.device_list_strategy is not None:
            return frozenset(self.device_list_strategy)
        if self.cdi:
            return frozenset({DeviceListStrategy.CDI_FIELD})
        return frozenset({DeviceListStrategy.DEVICE_SPECS})

    @property
    def writes_cdi_spec(self) -> bool:
        return bool(self.strategies & CDI_STRATEGIES)


class Config(_Section):
    kubelet_dir: AbsolutePath = Field(default=Path("/var/lib/kubelet"), alias="kubeletDir")
    device_plugin_dir: AbsolutePath = Field(default=DEVICE_PLUGIN_PATH, alias="devicePluginDir")
    state_dir: AbsolutePath = Field(default=Path("/var/lib/nodeplug"), alias="stateDir")
    http: HttpSpec = Field(default_factory=HttpSpec)
    cdi: CdiSpec = Field(default_factory=CdiSpec)
    node_features: NodeFeaturesSpec = Field(default_factory=NodeFeaturesSpec, alias="nodeFeatures")
    device_plugin_registration: Registration = Field(
        default=Registration.KUBELET, alias="devicePluginRegistration"
    )
    device_plugins: list[DevicePluginSpec] = Field(default_factory=list, alias="devicePlugins")
    csi: CsiConfig | None = None
    kubeconfig: AbsolutePath | None = None

    @field_validator("http", "node_features", mode="before")
    @classmethod
    def _null_turns_off(cls, value: object, info: ValidationInfo) -> object:
        """`http: null` and `nodeFeatures: null` mean what their null address/file mean."""
        if value is None:
            return {"address": None} if info.field_name == "http" else {"file": None}
        return value

    @property
    def device_plugin_socket_dir(self) -> Path:
        """Where nodeplug's device-plugin sockets live, by registration mode."""
        if self.device_plugin_registration is Registration.PLUGIN_WATCHER:
            return self.kubelet_dir / PLUGIN_REGISTRY_SUBDIR
        return self.device_plugin_dir

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        seen: dict[str, int] = {}
        for index, spec in enumerate(self.device_plugins):
            if spec.cdi and spec.device_list_strategy is not None:
                raise ValueError(
                    f"devicePlugins[{index}].cdi: give cdi or deviceListStrategy, not both "
                    "(cdi: true is the same as deviceListStrategy: [cdiField])"
                )
            if spec.resource_name in seen:
                raise ValueError(
                    f"devicePlugins[{index}].resourceName: {spec.resource_name!r} is already "
                    f"used by devicePlugins[{seen[spec.resource_name]}]"
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
            raise ValueError(
                f"{field}: {str(directory)!r} is too long for device-plugin sockets; their "
                f"paths would exceed the {MAX_SOCKET_PATH}-byte Unix socket limit"
            )
        return self

    @model_validator(mode="after")
    def _check_dra_drivers(self) -> Config:
        seen: dict[str, int] = {}
        for index, spec in enumerate(self.device_plugins):
            if not spec.serves_dra:
                continue
            name = spec.driver_name
            if name in seen:
                raise ValueError(
                    f"devicePlugins[{index}].draDriverName: {name!r} is already the DRA "
                    f"driver of devicePlugins[{seen[name]}]"
                )
            seen[name] = index
            sockets = (
                f"{dra_names.PLUGINS_SUBDIR}/{name}/{dra_names.SOCKET_NAME}",
                f"{PLUGIN_REGISTRY_SUBDIR}/{name}-reg.sock",
            )
            for socket in sockets:
                if bound_path_length(self.kubelet_dir / socket) > MAX_SOCKET_PATH:
                    raise ValueError(
                        f"devicePlugins[{index}].draDriverName: {socket!r} below kubeletDir "
                        f"would exceed the {MAX_SOCKET_PATH}-byte Unix socket limit"
                    )
        return self

    @property
    def csi_socket(self) -> Path | None:
        """Where the CSI driver serves: csi.endpoint, else below kubeletDir (node mode)."""
        if self.csi is None:
            return None
        default = self.kubelet_dir / CSI_PLUGIN_SUBDIR / self.csi.driver_name / "csi.sock"
        return self.csi.endpoint or default

    @model_validator(mode="after")
    def _check_csi(self) -> Config:
        if self.csi is None or self.csi_socket is None:
            return self
        if self.csi.mode is Mode.CONTROLLER and self.device_plugins:
            raise ValueError(
                "devicePlugins: csi.mode: controller serves only the cluster's side of volume "
                "expansion; device plugins and DRA drivers run in the nodes' daemons"
            )
        field = "csi.endpoint" if self.csi.endpoint else "csi.driverName"
        sockets = [(field, self.csi_socket)]
        if self.csi.mode is Mode.NODE:
            registration = f"{PLUGIN_REGISTRY_SUBDIR}/{self.csi.driver_name}-reg.sock"
            sockets.append(("csi.driverName", self.kubelet_dir / registration))
        for field, socket in sockets:
            if bound_path_length(socket) > MAX_SOCKET_PATH:
                raise ValueError(
                    f"{field}: {str(socket)!r} would exceed the {MAX_SOCKET_PATH}-byte Unix "
                    "socket limit"
                )
        return self


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


def _field_path(location: Sequence[int | str]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


_MESSAGES = {
    "extra_forbidden": "unknown field (check its spelling and indentation)",
    "missing": "required field is missing",
}


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for detail in error.errors():
        location = detail["loc"]
        message = _MESSAGES.get(detail["type"], detail["msg"])
        message = message.removeprefix("Value error, ")
        if detail["type"] == "value_error" and ": " in message and not location:
            problems.append(message)  # a cross-field check that already names its field
        else:
            problems.append(f"{_field_path(location)}: {message}")
    return problems


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
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, _problems(error)) from None


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
    backends = {}
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
        except ValidationError as error:
            problems += [f"{where}.config.{p}" for p in _problems(error)]
        except (ValueError, TypeError) as error:
            problems.append(f"{where}.config: {error}")
        except Exception as error:  # and so can its factory
            problems.append(f"{where}.config: backend {spec.backend!r} failed: {_described(error)}")
    if problems:
        raise ConfigError(source, problems)
    return backends


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
