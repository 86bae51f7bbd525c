"""`nodeplug` command line: run the daemon, or try it against a simulated kubelet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from csi.config import Mode as CsiMode
from daemon import config as configuration
from daemon import logs

if TYPE_CHECKING:
    from daemon.reload import ConfigReloader
    from daemon.supervisor import Daemon
    from deviceplugin.backend import Backend

log = logging.getLogger("nodeplug")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
DEFAULT_CONFIG = Path("/etc/nodeplug/config.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodeplug", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_logging(command: argparse.ArgumentParser, level: str) -> None:
        command.add_argument("--log-format", choices=["json", "text"], default="json")
        command.add_argument(
            "--log-level", choices=["debug", "info", "warning", "error"], default=level
        )

    run = commands.add_parser("run", help="serve the kubelet plugins of a config")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config file")
    add_logging(run, "info")

    controller = commands.add_parser(
        "controller",
        help="serve the CSI driver's cluster-wide expansion controller (`run` with csi.mode: "
        "controller), for csi-resizer",
    )
    controller.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config file")
    add_logging(controller, "info")

    sandbox = commands.add_parser(
        "sandbox",
        help="show the three contracts live against a simulated kubelet, in a temporary directory",
    )
    sandbox.add_argument("--config", type=Path, help="your config (its host paths are replaced)")
    sandbox.add_argument(
        "--once",
        action="store_true",
        help="exit after the demonstration (0 only if every step worked) instead of watching",
    )
    add_logging(sandbox, "warning")
    sandbox.set_defaults(log_format="text")

    check = commands.add_parser("check-config", help="validate a config and show what it runs")
    check.add_argument("config", type=Path)
    add_logging(check, "warning")
    check.set_defaults(log_format="text")

    devices = commands.add_parser("devices", help="show what each device backend discovers")
    devices.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config file")
    devices.add_argument("-o", "--output", choices=["table", "json"], default="table")
    devices.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each backend's list"
    )
    add_logging(devices, "warning")
    devices.set_defaults(log_format="text")

    check_node = commands.add_parser(
        "doctor", help="check whether nodeplug can work on this node (changes nothing)"
    )
    check_node.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config file")
    check_node.add_argument("-o", "--output", choices=["table", "json"], default="table")
    add_logging(check_node, "error")
    check_node.set_defaults(log_format="text")
    return parser


def _load(
    path: Path, csi_mode: CsiMode | None = None
) -> tuple[configuration.Config, dict[str, Backend]] | None:
    """The config and its backends, or None after printing why the config is refused."""
    try:
        config = configuration.load(path, csi_mode)
        return config, configuration.create_backends(config, str(path))
    except configuration.ConfigError as error:
        print(error.report(), file=sys.stderr)
        return None


async def _serve(daemon: Daemon, reloader: ConfigReloader) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    release = asyncio.create_task(_release_freed_memory_once_started(daemon))
    try:
        await daemon.run(stop, reloader)
    finally:
        release.cancel()


# Each command imports what only it needs: `nodeplug run` stays resident on every
# node, and its memory is what it imports (the sandbox and doctor are not for it).


def run(config_path: Path, csi_mode: CsiMode | None = None) -> int:
    """`nodeplug run`; csi_mode: what the config's csi.mode must be (`nodeplug controller`)."""
    from daemon.reload import ConfigReloader  # noqa: PLC0415
    from daemon.supervisor import Daemon  # noqa: PLC0415

    if (loaded := _load(config_path, csi_mode)) is None:
        return EXIT_BAD_CONFIG
    config, backends = loaded
    # Modules, classes and the config live as long as the process: full collections
    # need not walk them again and again (several run while a backend's first list of
    # tens of thousands of devices is built: 0.45 -> 0.3 s of a 60k-node start).
    gc.freeze()
    try:
        asyncio.run(_serve(Daemon(config, backends), ConfigReloader(config_path, csi_mode)))
    except Exception:
        log.exception("fatal error; exiting so that the node restarts the daemon")
        return EXIT_FAILED
    return EXIT_OK


async def _release_freed_memory_once_started(daemon: Daemon) -> None:
    """Hand the heap pages that start-up freed back to the system.

    Imports, config validation and starting the units allocate much that is freed
    soon after; glibc keeps freed memory for reuse, and a daemon that allocates little
    once it serves would carry it, resident, for its whole life (~1.5 MiB).
    """
    await daemon.started.wait()
    with contextlib.suppress(OSError, AttributeError):  # a libc without malloc_trim
        ctypes.CDLL(None).malloc_trim(0)


def check_config(config_path: Path) -> int:
    from daemon import inspection  # noqa: PLC0415

    if (loaded := _load(config_path)) is None:
        return EXIT_BAD_CONFIG
    print(f"{config_path}: valid")
    print("\n".join(inspection.describe(loaded[0])))
    return EXIT_OK


def show_devices(config_path: Path, output: str, timeout: float) -> int:
    from daemon import inspection  # noqa: PLC0415

    if (loaded := _load(config_path)) is None:
        return EXIT_BAD_CONFIG
    try:
        found = asyncio.run(inspection.discover(*loaded, timeout))
    except TimeoutError:
        print(f"a backend sent no device list within {timeout:g}s", file=sys.stderr)
        return EXIT_FAILED
    if output == "json":
        document = {r: [inspection.device_json(d) for d in ds] for r, ds in found.items()}
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print("\n".join(inspection.device_table(found)))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    serving = options.command in {"run", "controller"}
    writer = logs.configure(options.log_format, options.log_level, background=serving)
    try:
        return _command(options)
    finally:
        writer.close()  # the last lines, a fatal error's included, reach stderr


def _command(options: argparse.Namespace) -> int:
    if options.command == "run":
        return run(options.config)
    if options.command == "controller":
        return run(options.config, CsiMode.CONTROLLER)
    if options.command == "check-config":
        return check_config(options.config)
    if options.command == "devices":
        return show_devices(options.config, options.output, options.timeout)
    if options.command == "doctor":
        from daemon import doctor  # noqa: PLC0415

        return doctor.main(options.config, options.output)
    from daemon import sandbox  # noqa: PLC0415

    return sandbox.main(options.config, once=options.once)


if __name__ == "__main__":
    sys.exit(main())
