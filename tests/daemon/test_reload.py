"""Live reload over real sockets: what did not change keeps its stream and registration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon import config as configuration
from daemon.reload import ConfigReloader
from daemon.supervisor import Daemon
from deviceplugin.testkit import FakeKubelet

A, B, C = "example.com/a", "example.com/b", "example.com/c"


def plugin(name: str, **extra: Any) -> dict[str, Any]:
    return {"resourceName": name, "backend": "simulated", "config": {"count": 2}, **extra}


def write(path: Path, root: Path, *plugins: dict[str, Any]) -> None:
    """Replace the file the way a ConfigMap volume does: write aside, rename over."""
    text = yaml.safe_dump(configuration.confined_to({"devicePlugins": list(plugins)}, root))
    aside = path.with_name(".config.yaml.new")
    aside.write_text(text)
    aside.replace(path)


def registrations(kubelet: FakeKubelet, name: str) -> int:
    return sum(1 for r in kubelet.register_requests if r.resource_name == name)


@contextlib.asynccontextmanager
async def reloading(path: Path) -> AsyncIterator[tuple[Daemon, ConfigReloader]]:
    """A daemon running from a config file, with its reloader, for the block."""
    config = configuration.load(path)
    daemon = Daemon(config, configuration.create_backends(config))
    reloader = ConfigReloader(path)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop, reloader))
    try:
        yield daemon, reloader
    finally:
        stop.set()
        await task


async def test_reloads_at_once_apply_one_after_the_other(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    """A SIGHUP, a file event and a caller may ask at once: each reload sees the last."""
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A), plugin(B))
    async with reloading(path) as (daemon, reloader):
        await kubelet.wait_for(lambda c: {A, B} <= c.keys())
        write(path, short_tmp, plugin(A), plugin(C))
        results = await asyncio.gather(reloader.reload(daemon), reloader.reload(daemon))
        assert sorted(results) == ["applied", "unchanged"]
        assert set(daemon.plugins) == {A, C}


async def test_reload_restarts_only_what_changed(short_tmp: Path, kubelet: FakeKubelet) -> None:
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A), plugin(B))
    async with reloading(path) as (daemon, reloader):
        await kubelet.wait_for(lambda c: {A, B} <= c.keys() and c[A].updates * c[B].updates > 0)
        stream_of_a = kubelet.client(A)
        socket_of_b = daemon.plugins[B].socket_path

        write(path, short_tmp, plugin(A), plugin(B, replicas=2), plugin(C))
        assert await reloader.reload(daemon) == "applied"
        await kubelet.wait_for(lambda c: C in c and len(c[B].devices) == 4)
        assert kubelet.client(A) is stream_of_a, "A's ListAndWatch stream was never dropped"
        assert registrations(kubelet, A) == 1
        assert registrations(kubelet, B) == 2
        assert registrations(kubelet, C) == 1

        write(path, short_tmp, plugin(A), plugin(C))
        assert await reloader.reload(daemon) == "applied"
        await kubelet.wait_for(lambda c: B not in c)
        assert not socket_of_b.exists()
        assert set(daemon.plugins) == {A, C}
        assert kubelet.client(A) is stream_of_a


async def test_bad_or_same_config_changes_nothing(short_tmp: Path, kubelet: FakeKubelet) -> None:
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A))
    async with reloading(path) as (daemon, reloader):
        await kubelet.wait_for(lambda c: A in c and c[A].updates > 0)
        running_config = daemon.config
        for broken in (
            "devicePlugins: [{resourceName: nope, backend: simulated}]",
            "devicePlugins: [{resourceName: a.io/x, backend: no-such-backend}]",
            "devicePlugins: [",
        ):
            path.write_text(broken)
            assert await reloader.reload(daemon) == "rejected"
            assert daemon.config is running_config
        write(path, short_tmp, plugin(A))
        assert await reloader.reload(daemon) == "unchanged"
        assert registrations(kubelet, A) == 1
        assert daemon.ready
        rejected = daemon.metrics.reloads.labels("rejected").value
        assert rejected >= 3


async def test_a_changed_file_is_picked_up_by_itself(short_tmp: Path, kubelet: FakeKubelet) -> None:
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A))
    async with reloading(path):
        await kubelet.wait_for(lambda c: A in c)
        write(path, short_tmp, plugin(A), plugin(C))
        await kubelet.wait_for(lambda c: C in c, timeout=5)
        assert registrations(kubelet, A) == 1


@contextlib.asynccontextmanager
async def nodeplug_run(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`nodeplug run --log-level debug` as a process, killed if the test leaves it running."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "daemon.cli", "run", "--log-level", "debug"),
        *("--config", str(config)),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()


async def next_reload_result(process: asyncio.subprocess.Process) -> str:
    """The result of the next reload the process logs."""
    assert process.stderr is not None
    async with asyncio.timeout(10):
        async for line in process.stderr:
            entry = json.loads(line)
            if entry["msg"] == "config reload":
                return str(entry["result"])
    raise AssertionError("the process ended without logging a reload")


async def test_sighup_reloads_the_running_process(short_tmp: Path, kubelet: FakeKubelet) -> None:
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A))
    async with nodeplug_run(path) as process:
        await kubelet.wait_for(lambda c: A in c, timeout=20)
        process.send_signal(signal.SIGHUP)
        assert await next_reload_result(process) == "unchanged"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0


def running_extras(daemon: Daemon) -> tuple[bool, bool]:
    """Whether the HTTP server and the NFD file writer exist."""
    return daemon.status_server is not None, daemon.node_features is not None


async def test_http_settings_reload_without_touching_plugins(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A))
    async with reloading(path) as (daemon, reloader):
        await kubelet.wait_for(lambda c: A in c and c[A].updates > 0)
        stream_of_a = kubelet.client(A)
        data = configuration.confined_to({"devicePlugins": [plugin(A)]}, short_tmp)
        path.write_text(
            yaml.safe_dump({**data, "http": {"address": None}, "nodeFeatures": {"file": None}})
        )
        assert await reloader.reload(daemon) == "applied"
        assert running_extras(daemon) == (False, False)
        path.write_text(yaml.safe_dump(data))
        assert await reloader.reload(daemon) == "applied"
        assert running_extras(daemon) == (True, True)
        assert kubelet.client(A) is stream_of_a
        assert registrations(kubelet, A) == 1


@pytest.mark.parametrize(
    ("backend", "problem"),
    [
        (
            "broken-import",
            "devicePlugins[1].backend: cannot load 'broken-import': "
            "ModuleNotFoundError: No module named 'nodeplug_no_such_sdk'",
        ),
        (
            "exploding",
            "devicePlugins[1].config: backend 'exploding' failed: "
            "RuntimeError: SDK not initialised",
        ),
    ],
)
async def test_a_config_that_cannot_be_built_keeps_the_running_one(
    short_tmp: Path, kubelet: FakeKubelet, vendor_site: Path, backend: str, problem: str
) -> None:
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A))
    async with reloading(path) as (daemon, reloader):
        await kubelet.wait_for(lambda c: A in c and c[A].updates > 0)
        stream_of_a = kubelet.client(A)
        running_config = daemon.config
        write(path, short_tmp, plugin(A), {"resourceName": C, "backend": backend})
        with pytest.raises(configuration.ConfigError) as caught:
            configuration.create_backends(configuration.load(path))
        assert caught.value.problems == [problem]
        assert await reloader.reload(daemon) == "rejected"
        assert daemon.config is running_config
        assert kubelet.client(A) is stream_of_a and daemon.ready
        # Still alive and still reloading.
        write(path, short_tmp, plugin(A), plugin(C))
        assert await reloader.reload(daemon) == "applied"
        await kubelet.wait_for(lambda c: C in c)
        assert registrations(kubelet, A) == 1


def counted(tag: str, log: Path, **extra: Any) -> dict[str, Any]:
    config = {"tag": tag, "log": str(log)}
    return {"resourceName": tag, "backend": "counting", "config": config, **extra}


async def test_reload_builds_only_the_backends_it_starts(
    short_tmp: Path, kubelet: FakeKubelet, vendor_site: Path
) -> None:
    log = short_tmp / "built"
    path = short_tmp / "config.yaml"
    write(path, short_tmp, counted(A, log), counted(B, log))
    async with reloading(path) as (daemon, reloader):
        await kubelet.wait_for(lambda c: {A, B} <= c.keys())
        assert log.read_text().split() == [A, B]
        write(path, short_tmp, counted(A, log), counted(B, log, replicas=2), counted(C, log))
        assert await reloader.reload(daemon) == "applied"
        await kubelet.wait_for(lambda c: C in c and len(c[B].devices) == 4)
        assert log.read_text().split() == [A, B, B, C]
        assert await reloader.reload(daemon) == "unchanged"
        write(path, short_tmp, counted(A, log), counted(C, log))
        assert await reloader.reload(daemon) == "applied"
        assert log.read_text().split() == [A, B, B, C]
        assert registrations(kubelet, A) == 1


async def test_a_broken_backend_in_a_reload_never_stops_the_process(
    short_tmp: Path, kubelet: FakeKubelet, vendor_site: Path
) -> None:
    path = short_tmp / "config.yaml"
    write(path, short_tmp, plugin(A))
    async with nodeplug_run(path) as process:
        await kubelet.wait_for(lambda c: A in c, timeout=20)
        write(path, short_tmp, plugin(A), {"resourceName": C, "backend": "broken-import"})
        assert await next_reload_result(process) == "rejected"
        assert process.returncode is None
        assert A in kubelet.clients
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
