"""`nodeplug sandbox`: the three contracts, live, on this machine, in a temporary directory.

The daemon runs against a simulated kubelet (device manager and plugin watcher, over
the real protocols). Device plugins: example devices, the kubelet's view, an admitted
pod, hotplug. CSI (as root): a volume's whole life on a btrfs pool image. Credentials:
the provider zipapp exec'd as the kubelet does, its answer pulling from a local
registry. `--once` exits after showing them, 0 only if every step worked. Everything it
made (mounts, loop devices, the registry process, files) goes at exit, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from pathlib import Path

from daemon import config as configuration
from daemon.sandbox.console import Console
from daemon.sandbox.core import Demo, Sandbox, run
from daemon.sandbox.credentials import ImageCredentials
from daemon.sandbox.devices import DevicePlugins
from daemon.sandbox.dra import DraClaims
from daemon.sandbox.host import HostResources
from daemon.sandbox.volumes import CsiVolumes
from daemon.terminal import Style

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130


def demos() -> list[Demo]:
    return [DevicePlugins(), DraClaims(), CsiVolumes(), ImageCredentials()]


async def _main(sandbox: Sandbox, once: bool) -> int:
    """Run until done (--once) or until SIGINT/SIGTERM; the exit code."""
    main_task = asyncio.current_task()
    assert main_task is not None
    signals: list[int] = []

    def stop(signum: int) -> None:
        signals.append(signum)
        main_task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        good = await run(sandbox, demos(), {}, once)
    except asyncio.CancelledError:
        if not signals:
            raise
        sandbox.console.print("\ninterrupted: stopping and cleaning up")
        # Without --once a signal is the normal way out; with it, an interruption.
        return EXIT_INTERRUPTED if once else EXIT_OK
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return EXIT_OK if good else EXIT_FAILED


def main(config_path: Path | None, *, once: bool) -> int:
    console = Console(sys.stdout, Style.detect(sys.stdout))
    # Under /tmp, short: socket paths below it must stay within 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="nodeplug-sandbox-", dir="/tmp"))
    host = HostResources(root)
    console.print(console.style.heading("nodeplug sandbox", f"in {root}, removed at exit"))
    code = EXIT_FAILED
    try:
        code = asyncio.run(_main(Sandbox(root, console, host, config_path), once))
    except configuration.ConfigError as error:
        print(error.report(), file=sys.stderr)
        code = EXIT_BAD_CONFIG
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            problems = host.release()
        finally:
            signal.signal(signal.SIGINT, previous)
        for problem in problems:
            console.print(console.style.remedy(f"clean-up: {problem}"))
        if not problems:
            console.print(f"\nsandbox stopped; {root} and all it held are gone")
    return code
