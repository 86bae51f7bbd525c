"""The image credential provider as the kubelet will run it: flags, config, binary, modes.

The kubelet reads --image-credential-provider-config (a file, or a directory whose
.json/.yaml/.yml files it merges in name order) and execs each provider from
--image-credential-provider-bin-dir; a missing binary or a bad config keeps the
kubelet from starting. nodeplug's own provider is asked to `check` its config, as the
admin would on the node: it is run, never imported.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

import yaml

from daemon.doctor.kubelet import Kubelet
from daemon.doctor.report import Report, Section

CONFIG_FLAG = "image-credential-provider-config"
BIN_DIR_FLAG = "image-credential-provider-bin-dir"
NODEPLUG_PROVIDER = "nodeplug-credential-provider"
CHECK_TIMEOUT = 30
_API_VERSIONS = {"kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1"}
_PROVIDER_API_VERSIONS = {
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
}


class ConfigProblemError(Exception):
    pass


def load_providers(path: Path) -> list[dict[str, Any]]:
    """Every provider entry of the kubelet's CredentialProviderConfig file or directory."""
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
        if path.is_dir()
        else [path]
    )
    providers: list[dict[str, Any]] = []
    for file in files:
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise ConfigProblemError(f"{file}: {error}") from None
        if not isinstance(data, dict) or data.get("kind") != "CredentialProviderConfig":
            raise ConfigProblemError(f"{file}: not a CredentialProviderConfig")
        if data.get("apiVersion") not in _API_VERSIONS:
            raise ConfigProblemError(f"{file}: apiVersion {data.get('apiVersion')!r}")
        entries = data.get("providers")
        if not isinstance(entries, list) or not entries:
            raise ConfigProblemError(f"{file}: providers must be a non-empty list")
        for index, entry in enumerate(entries):
            problem = _entry_problem(entry)
            if problem:
                raise ConfigProblemError(f"{file}: providers[{index}]: {problem}")
            providers.append(entry)
    return providers


def _entry_problem(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return "must be a mapping"
    if not entry.get("name") or "/" in str(entry["name"]):
        return "name must be a file name"
    if not entry.get("matchImages"):
        return "matchImages is required"
    if entry.get("apiVersion") not in _PROVIDER_API_VERSIONS:
        return f"apiVersion {entry.get('apiVersion')!r} is not a credential provider API"
    if "defaultCacheDuration" not in entry:
        return "defaultCacheDuration is required"
    return None


def _loose(path: Path, mask: int) -> str | None:
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & mask or info.st_uid != 0:
        return f"{path} is {mode:04o} owned by uid {info.st_uid}"
    return None


def check(report: Report, kubelet: Kubelet | None) -> None:
    section = report.section("credential provider")
    if kubelet is None:
        section.skip("kubelet flags", "no kubelet process to read them from")
        return
    config_path = kubelet.flags.get(CONFIG_FLAG)
    bin_dir = kubelet.flags.get(BIN_DIR_FLAG)
    if not config_path and not bin_dir:
        section.warn(
            "kubelet flags",
            f"--{CONFIG_FLAG} and --{BIN_DIR_FLAG} are not set: no provider runs",
            "add both (README: The kubelet's image credential provider), restart the kubelet",
        )
        return
    if not config_path or not bin_dir:
        missing = CONFIG_FLAG if not config_path else BIN_DIR_FLAG
        section.fail("kubelet flags", f"--{missing} is not set", "set both flags")
        return
    section.ok("kubelet flags", f"--{CONFIG_FLAG}={config_path} --{BIN_DIR_FLAG}={bin_dir}")
    try:
        providers = load_providers(Path(config_path))
    except (ConfigProblemError, OSError) as error:
        section.fail("provider config", str(error), "fix it: the kubelet will not start with it")
        return
    names = ", ".join(str(p["name"]) for p in providers)
    problem = _loose(Path(config_path), 0o022)
    if problem:
        section.fail("provider config", f"{problem}: others could change it", "chmod 644, root")
    else:
        section.ok("provider config", f"{len(providers)} providers: {names}")
    for provider in providers:
        _check_binary(section, Path(bin_dir) / str(provider["name"]), provider)


def _check_binary(section: Section, binary: Path, provider: dict[str, Any]) -> None:
    name = str(provider["name"])
    if not binary.is_file():
        section.fail(
            name,
            f"{binary} is missing: the kubelet refuses to start",
            "install it (the nodeplug DaemonSet's init container does) or remove the entry",
        )
        return
    problem = _loose(binary, 0o022)
    if problem or not binary.stat().st_mode & stat.S_IXUSR:
        section.fail(
            name,
            problem or f"{binary} is not executable",
            f"chown root {binary} && chmod 755 {binary}",
        )
        return
    if name != NODEPLUG_PROVIDER:
        section.ok(name, f"{binary}, executable, root-owned")
        return
    args = [str(a) for a in provider.get("args", [])]
    try:
        result = subprocess.run(
            [str(binary), "check", *args],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        section.fail(name, f"{binary} check: {error}", "is python3 (3.9+) on the kubelet's PATH?")
        return
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        section.fail(
            name,
            message[-1] if message else f"check exit {result.returncode}",
            f"fix what it says; to see it again: {binary} check {' '.join(args)}",
        )
        return
    first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else "valid"
    section.ok(name, f"{binary} check: {first}")
