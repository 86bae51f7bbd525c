"""`nodeplug` command line: run the daemon, or try it against a simulated kubelet."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from daemon import config as configuration
from daemon import logs, sandbox
from daemon.supervisor import Daemon

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

    sandbox = commands.add_parser(
        "sandbox", help="run against a simulated kubelet in a temporary directory"
    )
    sandbox.add_argument(
        "--config", type=Path, help="your config (kubeletDir and stateDir are replaced)"
    )
    sandbox.add_argument(
        "--once", action="store_true", help="exit after the demonstration instead of watching"
    )
    add_logging(sandbox, "warning")
    sandbox.set_defaults(log_format="text")
    return parser


async def _serve(daemon: Daemon) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await daemon.run(stop)


def run(config_path: Path) -> int:
    try:
        config = configuration.load(config_path)
        backends = configuration.create_backends(config, str(config_path))
    except configuration.ConfigError as error:
        print(error.report(), file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        asyncio.run(_serve(Daemon(config, backends)))
    except Exception:
        log.exception("fatal error; exiting so that the node restarts the daemon")
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    logs.configure(options.log_format, options.log_level)
    if options.command == "run":
        return run(options.config)
    return sandbox.main(options.config, once=options.once)


if __name__ == "__main__":
    sys.exit(main())
