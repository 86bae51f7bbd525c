"""The kubelet as this node runs it: its process, flags, config file, version and /healthz.

Read-only: /proc/<pid>/cmdline and the files it names; the version comes from the
kubelet's own binary (`<exe> --version`, which prints and exits) and /healthz from a
GET on its healthz address (default 127.0.0.1:10248; port 0 turns it off).
"""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.config import PLUGIN_REGISTRY_SUBDIR, Config, Registration
from daemon.doctor.report import Report, Section
from daemon.hostprobe import Host
from deviceplugin.cdi import DeviceListStrategy
from deviceplugin.socketdir import DEVICE_PLUGIN_PATH

DEFAULT_ROOT_DIR = Path("/var/lib/kubelet")
DEFAULT_HEALTHZ = ("127.0.0.1", 10248)
VERSION_TIMEOUT = 10
HEALTHZ_TIMEOUT = 2
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")
Version = tuple[int, int]


@dataclass
class Kubelet:
    pid: int
    argv: list[str]
    flags: dict[str, str]
    # The --config file, parsed (empty when there is none or it cannot be read).
    config: dict[str, Any] = field(default_factory=dict)
    config_problem: str | None = None
    version: Version | None = None
    version_text: str = ""

    @property
    def root_dir(self) -> Path:
        return Path(self.flags.get("root-dir") or DEFAULT_ROOT_DIR)

    def feature_gate(self, name: str) -> bool | None:
        """The gate's value from --feature-gates or the config's featureGates; None: unset."""
        for item in self.flags.get("feature-gates", "").split(","):
            key, _, text = item.partition("=")
            if key.strip() == name:
                return text.strip().lower() == "true"
        gates = self.config.get("featureGates")
        setting = gates.get(name) if isinstance(gates, dict) else None
        return setting if isinstance(setting, bool) else None

    @property
    def healthz(self) -> tuple[str, int]:
        host = self.flags.get("healthz-bind-address") or self.config.get("healthzBindAddress")
        port = self.flags.get("healthz-port") or self.config.get("healthzPort")
        return (
            str(host or DEFAULT_HEALTHZ[0]),
            int(port if port is not None else DEFAULT_HEALTHZ[1]),
        )


def parse_flags(argv: list[str]) -> dict[str, str]:
    """pflag's forms: --name=value, --name value, and a bare --name (a boolean)."""
    flags: dict[str, str] = {}
    i = 1
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-"):
            continue
        name, equals, value = arg.lstrip("-").partition("=")
        if not equals and i < len(argv) and not argv[i].startswith("-"):
            value = argv[i]
            i += 1
        elif not equals:
            value = "true"
        flags[name] = value
    return flags


def parse_version(text: str) -> Version | None:
    match = _VERSION.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def find(host: Host) -> Kubelet | None:
    """The kubelet process visible in host.proc, if any."""
    for entry in sorted(host.proc.glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        argv = [arg for arg in argv if arg]
        if argv and "kubelet" in (comm, Path(argv[0]).name):
            kubelet = Kubelet(int(entry.name), argv, parse_flags(argv))
            _read_config(kubelet)
            _read_version(kubelet, entry / "exe")
            return kubelet
    return None


def _read_config(kubelet: Kubelet) -> None:
    path = kubelet.flags.get("config")
    if not path:
        return
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        kubelet.config_problem = f"{path}: {error}"
        return
    if isinstance(data, dict):
        kubelet.config = data
    else:
        kubelet.config_problem = f"{path}: not a KubeletConfiguration mapping"


def _read_version(kubelet: Kubelet, exe: Path) -> None:
    try:
        result = subprocess.run(
            [str(exe), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return
    kubelet.version_text = result.stdout.strip()
    kubelet.version = parse_version(kubelet.version_text) if result.returncode == 0 else None


def _healthz(address: tuple[str, int]) -> str | None:
    """None when /healthz says ok, else what went wrong."""
    host, port = address
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=HEALTHZ_TIMEOUT) as response:
            body = response.read(64).decode(errors="replace").strip()
            return None if body == "ok" else f"{url} answered {body!r}"
    except urllib.error.HTTPError as error:
        error.close()
        return f"{url}: HTTP {error.code}"
    except OSError as error:
        return f"{url}: {getattr(error, 'reason', error)}"


@dataclass(frozen=True, slots=True)
class Feature:
    """What the config uses that the kubelet must support, and from which version."""

    why: str
    # The first version that has it; from then until `default`, only with `gate` on.
    minimum: Version
    gate: str | None = None
    default: Version | None = None


CDI_FIELD = Feature("cdi: true (CDI names in Allocate)", (1, 28), "DevicePluginCDIDevices", (1, 29))
# Checked in the kubelet of release-1.19 (the DevicePlugin plugin-watcher handler).
PLUGIN_WATCHER_DEVICES = Feature("devicePluginRegistration: pluginWatcher", (1, 19))
CSI_PLUGIN_WATCHER = Feature("the CSI driver (plugin-watcher registration)", (1, 13))
# dra v1beta1 from 1.32 (beta, gate off by default), on by default with v1 from 1.34.
DRA_DRIVERS = Feature(
    "api: dra or both (DRA drivers)", (1, 32), "DynamicResourceAllocation", (1, 34)
)


def needed_features(config: Config) -> list[Feature]:
    needs = []
    if any(DeviceListStrategy.CDI_FIELD in spec.strategies for spec in config.device_plugins):
        needs.append(CDI_FIELD)
    if config.device_plugin_registration is Registration.PLUGIN_WATCHER:
        needs.append(PLUGIN_WATCHER_DEVICES)
    if any(spec.serves_dra for spec in config.device_plugins):
        needs.append(DRA_DRIVERS)
    if config.csi is not None:
        needs.append(CSI_PLUGIN_WATCHER)
    return needs


def check(report: Report, config: Config, host: Host) -> Kubelet | None:
    section = report.section("kubelet")
    kubelet = find(host)
    if kubelet is None:
        section.fail(
            "process",
            f"no kubelet process in {host.proc}",
            "run doctor on the node itself, or in a pod with hostPID: true",
        )
    else:
        section.ok("process", f"pid {kubelet.pid}: {kubelet.argv[0]}")
        if kubelet.config_problem:
            section.warn("config file", kubelet.config_problem, "the kubelet would not start so")
        if kubelet.version is None:
            section.warn("version", "unknown (`kubelet --version` gave nothing)")
        else:
            section.ok("version", kubelet.version_text)
        address = kubelet.healthz
        if address[1] == 0:
            section.skip("healthz", "off (healthzPort 0)")
        elif (problem := _healthz(address)) is None:
            section.ok("healthz", f"http://{address[0]}:{address[1]}/healthz: ok")
        else:
            section.fail("healthz", problem, "`journalctl -u kubelet` says why it is unhealthy")
        if kubelet.root_dir != config.kubelet_dir:
            section.fail(
                "root dir",
                f"the kubelet's --root-dir is {kubelet.root_dir}, kubeletDir is "
                f"{config.kubelet_dir}",
                f"set kubeletDir: {kubelet.root_dir} (and mount that path into the pod)",
            )
        else:
            section.ok("root dir", f"{kubelet.root_dir} = kubeletDir")
    _check_directories(section, config)
    _check_features(section, config, kubelet)
    return kubelet


def _check_directories(section: Section, config: Config) -> None:
    socket = config.device_plugin_dir / "kubelet.sock"
    if socket.is_socket():
        section.ok("device plugins", f"{socket} is the kubelet's socket")
    else:
        section.fail(
            "device plugins",
            f"{socket} is not a socket: the kubelet is not running, or this path is not the host's",
            f"the kubelet serves it in {DEVICE_PLUGIN_PATH} whatever its --root-dir: mount "
            f"that host directory at devicePluginDir ({config.device_plugin_dir})",
        )
    registry = config.kubelet_dir / PLUGIN_REGISTRY_SUBDIR
    if registry.is_dir():
        section.ok("plugin registry", f"{registry} exists")
    else:
        section.fail(
            "plugin registry",
            f"{registry} is missing (the kubelet makes it when it starts)",
            "check kubeletDir against the kubelet's --root-dir",
        )


def _dotted(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def _check_features(section: Section, config: Config, kubelet: Kubelet | None) -> None:
    needs = needed_features(config)
    if not needs:
        section.ok("features", "the config uses nothing that needs a recent kubelet")
        return
    version = kubelet.version if kubelet else None
    for feature in needs:
        wanted = f"{feature.why}: needs kubelet {_dotted(feature.minimum)}+"
        if kubelet is None or version is None:
            section.warn("features", f"{wanted}, version unknown")
        elif version < feature.minimum:
            section.fail(
                "features",
                f"{wanted}, this is {_dotted(version)}",
                "upgrade the kubelet, or turn the feature off in the config",
            )
        elif feature.gate and feature.default and version < feature.default:
            if kubelet.feature_gate(feature.gate) is not True:
                section.fail(
                    "features",
                    f"{feature.why}: kubelet {_dotted(version)} needs the {feature.gate} gate",
                    f"add --feature-gates={feature.gate}=true (on by default from "
                    f"{_dotted(feature.default)})",
                )
            else:
                section.ok("features", f"{feature.why}: {feature.gate} gate on")
        else:
            section.ok("features", f"{feature.why}: kubelet {_dotted(version)} has it")
