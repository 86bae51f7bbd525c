"""Devices: what each backend finds (as `nodeplug devices`), the CDI spec directory, and
whether the node's container runtime applies CDI specs from it.

containerd (config.toml, version 2: `plugins."io.containerd.grpc.v1.cri"`, where
enable_cdi defaults to false in 1.7; version 3: `plugins."io.containerd.cri.v1.runtime"`,
default true in 2.x) and CRI-O (crio.conf then crio.conf.d/*.conf in order; CDI always
on since 1.23) both read spec directories, by default /etc/cdi and /var/run/cdi.
"""

from __future__ import annotations

import asyncio
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import config as configuration
from daemon import inspection
from daemon.doctor.report import Report, Section
from daemon.hostprobe import Host

DISCOVERY_TIMEOUT = 10.0
DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
CONTAINERD_V2 = "io.containerd.grpc.v1.cri"
CONTAINERD_V3 = "io.containerd.cri.v1.runtime"


def check(report: Report, config: configuration.Config, source: str, host: Host) -> None:
    section = report.section("devices")
    _check_backends(section, config, source)
    # DRA drivers always answer with CDI ids; device plugins when a strategy says so.
    uses_cdi = any(spec.writes_cdi_spec or spec.serves_dra for spec in config.device_plugins)
    _check_spec_dir(section, config.cdi.dir, uses_cdi)
    _check_runtime(section, config.cdi.dir, uses_cdi, host)


def _check_backends(section: Section, config: configuration.Config, source: str) -> None:
    if not config.device_plugins:
        section.skip("backends", "no devicePlugins in the config")
        return
    try:
        backends = configuration.create_backends(config, source)
        found = asyncio.run(inspection.discover(config, backends, DISCOVERY_TIMEOUT))
    except configuration.ConfigError as error:
        section.fail("backends", "; ".join(error.problems), "fix the config: nodeplug check-config")
        return
    except TimeoutError:
        section.fail(
            "backends",
            f"a backend sent no device list within {DISCOVERY_TIMEOUT:g} s",
            "nodeplug devices --config FILE shows which one",
        )
        return
    for spec in config.device_plugins:
        devices = found[spec.resource_name]
        healthy = sum(1 for device in devices if device.healthy)
        detail = f"{spec.backend}: {len(devices)} devices, {healthy} healthy"
        if devices:
            section.ok(spec.resource_name, detail)
        else:
            section.warn(
                spec.resource_name,
                detail,
                "nothing found: check the backend's config (nodeplug devices -o json)",
            )


def _check_spec_dir(section: Section, directory: Path, uses_cdi: bool) -> None:
    if not uses_cdi:
        section.skip("CDI spec dir", f"no resource has cdi: true ({directory})")
        return
    try:
        info = directory.stat()
    except FileNotFoundError:
        section.ok("CDI spec dir", f"{directory} does not exist yet: the daemon makes it")
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 or info.st_uid != 0:
        section.fail(
            "CDI spec dir",
            f"{directory} is {mode:04o}, owner uid {info.st_uid}: others could inject devices",
            f"chown root {directory} && chmod 755 {directory}",
        )
    else:
        section.ok("CDI spec dir", f"{directory} ({mode:04o}, root)")


@dataclass(frozen=True, slots=True)
class RuntimeCdi:
    runtime: str
    # None: the file does not say, and the default depends on the runtime's version.
    enabled: bool | None
    spec_dirs: tuple[str, ...]
    source: str


def _toml(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        return None


def containerd(etc: Path) -> RuntimeCdi | None:
    path = etc / "containerd" / "config.toml"
    data = _toml(path)
    if data is None:
        return None
    files = [path]
    # Imports are merged over the main file, in order (globs allowed).
    for pattern in data.get("imports", []):
        pattern_path = Path(pattern) if Path(pattern).is_absolute() else path.parent / pattern
        for imported in sorted(pattern_path.parent.glob(pattern_path.name)):
            extra = _toml(imported) or {}
            for name, plugin in extra.get("plugins", {}).items():
                data.setdefault("plugins", {}).setdefault(name, {}).update(plugin)
            files.append(imported)
    version = int(data.get("version", 1))
    plugin_name = CONTAINERD_V3 if version >= 3 else CONTAINERD_V2
    plugin = data.get("plugins", {}).get(plugin_name, {})
    default = True if version >= 3 else None
    enabled = plugin.get("enable_cdi", default)
    dirs = tuple(plugin.get("cdi_spec_dirs", DEFAULT_SPEC_DIRS))
    return RuntimeCdi("containerd", enabled, dirs, ", ".join(map(str, files)))


def crio(etc: Path) -> RuntimeCdi | None:
    main = etc / "crio" / "crio.conf"
    files = [main] if main.exists() else []
    files += sorted((etc / "crio" / "crio.conf.d").glob("*.conf"))
    if not files:
        return None
    dirs: tuple[str, ...] = DEFAULT_SPEC_DIRS
    for path in files:
        runtime = ((_toml(path) or {}).get("crio") or {}).get("runtime") or {}
        if "cdi_spec_dirs" in runtime:
            dirs = tuple(runtime["cdi_spec_dirs"])
    return RuntimeCdi("CRI-O", True, dirs, ", ".join(map(str, files)))


def _check_runtime(section: Section, directory: Path, uses_cdi: bool, host: Host) -> None:
    try:
        runtimes = [r for r in (containerd(host.etc), crio(host.etc)) if r is not None]
    except (tomllib.TOMLDecodeError, OSError, ValueError, TypeError) as error:
        section.fail("runtime CDI", f"cannot read the runtime's config: {error}")
        return
    if not runtimes:
        detail = f"no containerd or CRI-O config under {host.etc}"
        if uses_cdi:
            section.warn(
                "runtime CDI", detail, f"make sure the runtime has CDI on and reads {directory}"
            )
        else:
            section.skip("runtime CDI", detail)
        return
    for runtime in runtimes:
        _judge_runtime(section, runtime, directory, uses_cdi)


def _judge_runtime(section: Section, runtime: RuntimeCdi, directory: Path, uses_cdi: bool) -> None:
    name = f"{runtime.runtime} CDI"
    reads = str(directory) in runtime.spec_dirs
    state = {True: "on", False: "off", None: "not set"}[runtime.enabled]
    detail = f"enable_cdi {state}, spec dirs {', '.join(runtime.spec_dirs)} ({runtime.source})"
    if not uses_cdi:
        section.skip(name, detail)
        return
    if runtime.enabled is False or not reads:
        section.fail(
            name,
            detail + ("" if reads else f": {directory} is not among them"),
            f"enable_cdi = true and {directory} in cdi_spec_dirs, then restart {runtime.runtime}",
        )
    elif runtime.enabled is None:
        section.warn(
            name,
            detail + ": off by default in containerd 1.7, on in 2.x",
            "set enable_cdi = true and restart containerd",
        )
    else:
        section.ok(name, detail)
