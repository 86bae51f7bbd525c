"""`nodeplug` as a process: exit codes, signals, sockets left behind (none)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from daemon import config as configuration
from daemon.supervisor import Daemon
from deviceplugin.backend import Device
from deviceplugin.testkit import FakeKubelet
from tests.deviceplugin.backends import ScriptedBackend
from tests.deviceplugin.conftest import make_config

NODEPLUG = [sys.executable, "-m", "daemon.cli"]
# Every log call is made at debug level: one that cannot be logged kills the daemon there.
RUN = [*NODEPLUG, "run", "--log-level", "debug"]
RESOURCES = ["example.com/one", "example.com/two"]


def write_config(root: Path, **extra: object) -> Path:
    plugins = [
        {"resourceName": name, "backend": "simulated", "config": {"count": 2}} for name in RESOURCES
    ]
    config = {**configuration.confined_to({"devicePlugins": plugins}, root), **extra}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def daemon_process(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`nodeplug run` at debug level; its log goes to daemon.log beside the config
    (a pipe nobody reads would fill up and stall it)."""
    with (config.parent / "daemon.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(*RUN, "--config", str(config), stderr=log)
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def sockets_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_socket())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_cleanly_and_removes_sockets(short_tmp: Path, signum: int) -> None:
    config = write_config(short_tmp)
    directory = short_tmp / "device-plugins"
    async with FakeKubelet(directory) as kubelet, daemon_process(config) as process:
        await kubelet.wait_for(lambda c: set(RESOURCES) <= c.keys(), timeout=20)
        assert len(sockets_in(directory)) == 3
        process.send_signal(signum)
        assert await asyncio.wait_for(process.wait(), timeout=5) == 0
        assert sockets_in(directory) == ["kubelet.sock"]


async def test_starts_before_the_kubelet_and_registers_when_it_appears(short_tmp: Path) -> None:
    config = write_config(short_tmp)
    directory = short_tmp / "device-plugins"
    async with daemon_process(config) as process:
        await asyncio.sleep(1.0)
        assert process.returncode is None
        async with FakeKubelet(directory) as kubelet:
            await kubelet.wait_for(lambda c: set(RESOURCES) <= c.keys(), timeout=10)
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=5) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"devicePlugins": [{"resourceName": "widget", "backend": "glob"}]},
            "devicePlugins[0].resourceName",
        ),
        (
            {"devicePlugins": [{"resourceName": "a.io/b", "backend": "nope"}]},
            "devicePlugins[0].backend: unknown backend",
        ),
        ({"kubeletDir": "var/lib/kubelet"}, "kubeletDir: must be an absolute path"),
    ],
)
async def test_bad_config_exits_2_naming_the_field(
    short_tmp: Path, extra: dict[str, object], message: str
) -> None:
    config = write_config(short_tmp, **extra)
    process = await asyncio.create_subprocess_exec(
        *RUN, "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2
    assert message in stderr.decode()


async def test_missing_config_file_exits_2(short_tmp: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *NODEPLUG, "run", "--config", str(short_tmp / "nope.yaml"), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2
    assert "cannot read the file" in stderr.decode()


class CrashingBackend(ScriptedBackend):
    async def watch(self) -> AsyncIterator[list[Device]]:
        yield []
        raise RuntimeError("driver unloaded")


async def test_a_dying_plugin_stops_the_daemon_with_its_error(short_tmp: Path) -> None:
    config = make_config(
        short_tmp,
        {"resourceName": "a.io/b", "backend": "simulated"},
        {"resourceName": "a.io/c", "backend": "simulated"},
    )
    daemon = Daemon(config, [CrashingBackend(), ScriptedBackend()])
    with pytest.raises(ExceptionGroup) as caught:
        await asyncio.wait_for(daemon.run(asyncio.Event()), timeout=10)
    assert caught.group_contains(RuntimeError, match="driver unloaded")
    assert sockets_in(config.device_plugin_dir) == []


async def test_a_fatal_error_exits_1_and_its_last_lines_reach_stderr(short_tmp: Path) -> None:
    """The log writer thread is drained before exit: the reason is the last line."""
    (short_tmp / "device-plugins").write_text("a file where the kubelet's directory belongs")
    config = write_config(short_tmp)
    process = await asyncio.create_subprocess_exec(
        *RUN, "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 1
    last = json.loads(stderr.decode().splitlines()[-1])
    assert last["msg"] == "fatal error; exiting so that the node restarts the daemon"
    assert "FileExistsError" in last["exception"]


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *NODEPLUG, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_check_config_shows_the_plan(short_tmp: Path) -> None:
    config = write_config(short_tmp)
    code, stdout, _ = await run_cli("check-config", str(config))
    assert code == 0
    assert f"{config}: valid" in stdout
    for name in RESOURCES:
        assert name in stdout
    assert str(short_tmp / "device-plugins" / "nodeplug-example.com_one.sock") in stdout
    bad = write_config(short_tmp, devicePlugins=[{"resourceName": "x", "backend": "glob"}])
    code, stdout, stderr = await run_cli("check-config", str(bad))
    assert code == 2 and stdout == ""
    assert "devicePlugins[0].resourceName" in stderr


async def test_check_config_names_a_backend_that_cannot_load(
    short_tmp: Path, vendor_site: Path
) -> None:
    config = write_config(
        short_tmp, devicePlugins=[{"resourceName": "a.io/b", "backend": "broken-import"}]
    )
    code, stdout, stderr = await run_cli("check-config", str(config))
    assert (code, stdout) == (2, "")
    assert stderr.splitlines() == [
        f"invalid config {config}:",
        "  devicePlugins[0].backend: cannot load 'broken-import': "
        "ModuleNotFoundError: No module named 'nodeplug_no_such_sdk'",
    ]


async def test_check_config_refuses_a_deep_document_with_a_message(short_tmp: Path) -> None:
    deep = short_tmp / "deep.yaml"
    deep.write_text("devicePlugins: " + "[" * 5000 + "]" * 5000 + "\n")
    code, stdout, stderr = await run_cli("check-config", str(deep))
    assert (code, stdout) == (2, "")
    assert (
        stderr
        == f"invalid config {deep}:\n  (top level): nested more than 64 levels deep (line 1)\n"
    )


async def test_devices_lists_what_backends_discover(short_tmp: Path) -> None:
    config = write_config(short_tmp)
    code, stdout, _ = await run_cli("devices", "--config", str(config), "-o", "json")
    assert code == 0
    found = json.loads(stdout)
    assert sorted(found) == RESOURCES
    assert [d["id"] for d in found["example.com/one"]] == ["sim0", "sim1"]
    assert found["example.com/one"][0]["healthy"] is True
    code, stdout, _ = await run_cli("devices", "--config", str(config))
    assert code == 0
    assert stdout.splitlines()[0].split() == ["RESOURCE", "DEVICE", "HEALTH", "NUMA", "NODES"]
    assert len(stdout.splitlines()) == 5
