"""`nodeplug doctor`: can nodeplug work on this node, and if not, what to do.

It checks the kubelet (process, version, /healthz, socket directories, the features the
config needs), CSI (btrfs, loop devices, the pool, file modes, mount propagation), the
devices each backend finds and whether the runtime applies CDI specs, and the image
credential provider the kubelet is told to run. It changes nothing: it reads /proc,
/sys and config files, runs `kubelet --version` and the provider's `check`, and GETs
the kubelet's /healthz. Exit 0 when no check fails, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from csi.config import Mode
from daemon import config as configuration
from daemon.doctor import credentials, devices, kubelet, storage
from daemon.doctor.report import Report
from daemon.hostprobe import Host
from daemon.terminal import Style

EXIT_OK = 0
EXIT_FAILED = 1


def examine(config_path: Path, host: Host | None = None) -> Report:
    """Every check against this node (or the node layout `host` points at)."""
    host = host or Host()
    report = Report()
    section = report.section("config")
    try:
        config = configuration.load(config_path)
        csi = "on" if config.csi else "off"
        section.ok("config", f"{config_path}: {len(config.device_plugins)} resources, CSI {csi}")
    except configuration.ConfigError as error:
        section.fail(
            "config",
            "; ".join(error.problems),
            f"nodeplug check-config {config_path}; the checks below use the defaults",
        )
        config = configuration.Config()
    if config.csi is not None and config.csi.mode is Mode.CONTROLLER:
        # `nodeplug controller` runs in a Deployment: no kubelet, storage, devices or
        # credential provider of its node are its business.
        storage.check(report, config, host)
        return report
    found = kubelet.check(report, config, host)
    storage.check(report, config, host)
    devices.check(report, config, str(config_path), host)
    credentials.check(report, found)
    return report


def main(config_path: Path, output: str) -> int:
    report = examine(config_path)
    if output == "json":
        print(json.dumps(report.document(), indent=2))
    else:
        print("\n".join(report.lines(Style.detect(sys.stdout))))
    return EXIT_OK if report.ok else EXIT_FAILED
