"""The sandbox's frame: a simulated kubelet, the daemon, and one demonstration per contract.

A `Demo` is one self-contained section: it adds what it needs to the daemon's config
(or says why this machine cannot show it), then shows its contract step by step
through the console, and may keep watching while the sandbox runs. Adding a contract
to the sandbox is adding a Demo to the list `daemon.sandbox.main` passes to `run`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from daemon import config as configuration
from daemon.sandbox.console import Console, SectionFailedError, StepError, describe
from daemon.sandbox.host import HostResources
from daemon.sandbox.pluginwatcher import SimulatedPluginWatcher
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet

DAEMON_STOP_TIMEOUT = 15.0

# Words in a daemon's failure -> what this machine lacks and how to get it.
_DIAGNOSES = (
    ("loop device", "no free loop device: `losetup -a` lists who holds them; free one or retry"),
    ("unknown filesystem type 'btrfs'", "the kernel lacks btrfs: `modprobe btrfs` as root"),
    ("mkfs.btrfs", "install btrfs-progs (apt-get install btrfs-progs)"),
    ("Permission denied", "run the sandbox as root"),
)


class Demo:
    """One contract's demonstration (subclasses override what they use)."""

    title = ""
    # Whether show() talks to the daemon: if the daemon stops, such demos cannot go on.
    needs_daemon = True

    def configure(self, sandbox: Sandbox, data: dict[str, Any]) -> dict[str, Any]:
        """The daemon's config with this demo's part added; StepError: left out, and why."""
        return data

    def applies(self, sandbox: Sandbox) -> bool:
        """Whether the parsed config has anything for this demo (a user's may not)."""
        return True

    @contextlib.asynccontextmanager
    async def environment(self, sandbox: Sandbox) -> AsyncIterator[None]:
        """What must run before the daemon starts and stop after it (kubelet-side parts)."""
        yield

    async def show(self, sandbox: Sandbox) -> None:
        """The demonstration, as console steps."""

    def hints(self, sandbox: Sandbox) -> list[str]:
        """What a person can try while the sandbox keeps running."""
        return []

    async def watch(self, sandbox: Sandbox) -> None:
        """Report live changes until cancelled (only without --once)."""


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def daemon_failure(error: BaseException | None) -> StepError:
    """The daemon's fatal error in a line, with what to do when the cause is known."""
    if error is None:
        return StepError("the daemon stopped")
    leaf = _leaves(error)[0]
    remedy = next((fix for words, fix in _DIAGNOSES if words in str(leaf)), None)
    return StepError(f"the daemon stopped: {leaf}", remedy)


class Sandbox:
    """What every demo shares: the directory, the console, the kubelet side, the daemon."""

    def __init__(
        self, root: Path, console: Console, host: HostResources, user_config: Path | None = None
    ) -> None:
        self.root = root
        self.console = console
        self.host = host
        self.user_config = user_config
        self.config = configuration.Config()
        self.kubelet: FakeKubelet | None = None
        self.plugin_watcher: SimulatedPluginWatcher | None = None
        self.daemon: Daemon | None = None
        self._daemon_task: asyncio.Task[None] | None = None
        self._daemon_error: BaseException | None = None

    @property
    def source(self) -> str:
        return str(self.user_config or "<sandbox>")

    def plan(self, demos: Sequence[Demo], data: dict[str, Any]) -> dict[Demo, StepError]:
        """Build the daemon's config from every demo's part; the demos left out, and why.

        Raises ConfigError when the result is invalid (a user's config, say).
        """
        left_out = {}
        for demo in demos:
            try:
                data = demo.configure(self, data)
            except StepError as error:
                left_out[demo] = error
        self.config = configuration.parse(configuration.confined_to(data, self.root), self.source)
        return left_out

    @contextlib.asynccontextmanager
    async def running(self, demos: Sequence[Demo]) -> AsyncIterator[None]:
        """The simulated kubelet and the daemon; both stopped on exit whatever happened."""
        backends = configuration.create_backends(self.config, self.source)
        kubelet = FakeKubelet(self.config.device_plugin_dir)
        watcher = SimulatedPluginWatcher.for_kubelet(self.config.kubelet_dir, kubelet)
        self.kubelet, self.plugin_watcher = kubelet, watcher
        self.daemon = Daemon(self.config, backends)
        stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as environments, kubelet:
            for demo in demos:
                await environments.enter_async_context(demo.environment(self))
            watching = asyncio.create_task(watcher.run())
            self._daemon_task = asyncio.create_task(self._run_daemon(self.daemon, stop))
            try:
                yield
            finally:
                stop.set()
                # Cancelled (Ctrl-C) or not, the daemon gets its grace to stop its servers.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._daemon_task), DAEMON_STOP_TIMEOUT)
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watching

    async def _run_daemon(self, daemon: Daemon, stop: asyncio.Event) -> None:
        try:
            await daemon.run(stop)
        except Exception as error:
            self._daemon_error = error

    async def daemon_finished(self) -> None:
        """Return when the daemon has stopped (it fails, or the sandbox stops it)."""
        if self._daemon_task is not None:
            await asyncio.shield(self._daemon_task)

    def daemon_stopped(self) -> StepError | None:
        """Why the daemon is no longer running, or None while it runs."""
        if self._daemon_task is None or not self._daemon_task.done():
            return None
        return daemon_failure(self._daemon_error)

    async def guarded(self, demo: Demo) -> None:
        """Show a demo; if the daemon it needs stops first, stop the demo and say why.

        A failed step was reported by the console already; any other error is reported
        here, so that a surprise in one demo never ends the others.
        """
        task = asyncio.create_task(demo.show(self))
        waiting: set[asyncio.Future[None]] = {task}
        if demo.needs_daemon and self._daemon_task is not None:
            waiting.add(self._daemon_task)
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            await asyncio.wait({task})
        if task.cancelled():
            stopped = self.daemon_stopped() or daemon_failure(None)
            self.console.failed("daemon", stopped.message, stopped.remedy)
        elif (error := task.exception()) is not None and not isinstance(error, SectionFailedError):
            message, remedy = describe(error)
            self.console.failed(demo.title, message, remedy)


async def run(sandbox: Sandbox, demos: Sequence[Demo], data: dict[str, Any], once: bool) -> bool:
    """Every demo in turn, then (without once) their watches until cancelled; all worked?"""
    left_out = sandbox.plan(demos, data)
    demos = [demo for demo in demos if demo in left_out or demo.applies(sandbox)]
    shown = [demo for demo in demos if demo not in left_out]
    async with sandbox.running(shown):
        for demo in demos:
            sandbox.console.section(demo.title)
            reason = left_out.get(demo)
            if reason is not None:
                sandbox.console.left_out(demo.title, reason.message, reason.remedy)
                continue
            stopped = sandbox.daemon_stopped()
            if demo.needs_daemon and stopped is not None:
                sandbox.console.failed("daemon", stopped.message, stopped.remedy)
                continue
            await sandbox.guarded(demo)
        good = sandbox.console.summary()
        if not once:
            good = await _keep_watching(sandbox, shown) and good
    return good


async def _keep_watching(sandbox: Sandbox, demos: Sequence[Demo]) -> bool:
    """Every demo's watch, until cancelled (Ctrl-C) or the daemon stops (False)."""
    sandbox.console.section("running", "Ctrl-C stops the sandbox and removes everything")
    for demo in demos:
        for hint in demo.hints(sandbox):
            sandbox.console.detail(hint)

    async def watching(demo: Demo) -> None:
        try:
            await demo.watch(sandbox)
        except Exception as error:
            message, remedy = describe(error)
            sandbox.console.failed(demo.title, message, remedy)

    tasks = [asyncio.create_task(watching(demo)) for demo in demos]
    try:
        await sandbox.daemon_finished()
        stopped = sandbox.daemon_stopped() or daemon_failure(None)
        sandbox.console.failed("daemon", stopped.message, stopped.remedy)
        return False
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
