"""`nodeplug sandbox`: the three contracts shown live, the smoke test, and its clean-up."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from daemon import hostprobe, mountinfo
from daemon.pluginwatcher import PluginInfo, PluginWatcherRegistration
from daemon.sandbox import credentials, devices, volumes
from daemon.sandbox.console import Console
from daemon.sandbox.core import Demo, Sandbox, daemon_failure, run
from daemon.sandbox.credentials import ImageCredentials
from daemon.sandbox.devices import DevicePlugins
from daemon.sandbox.host import HostResources, loop_devices_below
from daemon.sandbox.pluginwatcher import RefusedError, SimulatedPluginWatcher
from daemon.sandbox.volumes import CsiVolumes
from daemon.sockets import UnixSockets
from daemon.terminal import Status, Style
from deviceplugin.testkit import FakeKubelet

NODEPLUG = Path(sys.executable).with_name("nodeplug")
HEADER = re.compile(r"nodeplug sandbox\s+in (/tmp/nodeplug-sandbox-\S+), removed at exit")
PLAIN = Style(colour=False, symbols=True)


def plain_env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1"}


def sandbox_root(output: str) -> Path:
    match = HEADER.search(output)
    assert match is not None, output
    return Path(match.group(1))


def registry_processes_below(root: Path) -> list[int]:
    """docker-registry processes serving a config below root."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(root).encode() in arg for arg in argv) and b"serve" in argv:
            found.append(int(cmdline.parent.name))
    return found


def assert_nothing_left(root: Path) -> None:
    assert not root.exists(), f"{root} was not removed"
    assert mountinfo.below(mountinfo.read(), root) == []
    assert loop_devices_below(root) == []
    assert registry_processes_below(root) == []


def skip_if_machine_busy(output: str) -> None:
    """On a shared machine another user may hold every loop device: that is no failure
    of the sandbox, which says so and leaves CSI out."""
    if "left out" in output and "loop devices free" in output and "✗" not in output:
        pytest.skip("every loop device is in use on this machine; the sandbox left CSI out")


# --- the smoke test: what a new user runs -------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(300)
async def test_once_shows_the_three_contracts_and_leaves_nothing() -> None:
    process = await asyncio.create_subprocess_exec(
        str(NODEPLUG),
        "sandbox",
        "--once",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=plain_env(),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=240)
    output = stdout.decode()
    skip_if_machine_busy(output)
    assert process.returncode == 0, f"{output}\n--- stderr ---\n{stderr.decode()}"
    for expected in (
        "pod admitted",
        "NODEPLUG_EXAMPLE_COM_WIDGET=widget",
        # The same backend as a DRA driver: slices published, a claim prepared.
        "widget.example.com  (pool",
        "prepared through DRA",
        "cdi   example.com/widget=",
        "driver registered",
        "quota refuses",
        "EDQUOT",
        "clone holds file",
        "NodeGetVolumeStats",
        "teardown",
        "kubelet execs it",
        "password ********",
        "pull with it",
        "refused, as it should be",
        "steps worked",
    ):
        assert expected in output, f"{expected!r} missing from:\n{output}"
    assert "\033[" not in output, "NO_COLOR and a pipe: no escape sequences"
    assert "✗" not in output
    assert_nothing_left(sandbox_root(output))


async def read_until(stream: asyncio.StreamReader, marker: str, seen: list[str]) -> None:
    while True:
        line = (await stream.readline()).decode()
        assert line, "the sandbox ended before printing " + repr(marker) + ":\n" + "".join(seen)
        seen.append(line)
        if marker in line:
            return


@pytest.mark.root
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("args", "marker", "signum", "code"),
    [
        # Without --once a signal is the normal way out, after the demonstrations.
        ((), "Ctrl-C stops the sandbox", signal.SIGINT, 0),
        # With --once, in the middle of the CSI steps (mounts and a loop device held) or
        # with the registry running: an interruption, cleaned up all the same.
        (("--once",), "NodePublishVolume", signal.SIGINT, 130),
        (("--once",), "NodeStageVolume", signal.SIGTERM, 130),
        (("--once",), "image pushed", signal.SIGINT, 130),
    ],
)
async def test_a_signal_cleans_up_everything(
    args: tuple[str, ...], marker: str, signum: int, code: int
) -> None:
    process = await asyncio.create_subprocess_exec(
        str(NODEPLUG),
        "sandbox",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=plain_env(),
    )
    assert process.stdout is not None
    seen: list[str] = []
    try:
        await asyncio.wait_for(read_until(process.stdout, marker, seen), timeout=240)
        process.send_signal(signum)
        rest = await asyncio.wait_for(process.stdout.read(), timeout=60)
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = "".join(seen) + rest.decode()
    skip_if_machine_busy(output)
    assert process.returncode == code, output
    assert "and all it held are gone" in output
    assert_nothing_left(sandbox_root(output))


# --- in-process: what the sandbox says when this machine lacks something -------------


@pytest.fixture
def sandbox(short_tmp: Path) -> Iterator[tuple[Sandbox, io.StringIO]]:
    out = io.StringIO()
    root = short_tmp / "sb"
    root.mkdir()
    host = HostResources(root)
    try:
        yield Sandbox(root, Console(out, PLAIN), host), out
    finally:
        assert host.release() == []


async def test_not_root_uses_simulated_devices_and_leaves_csi_out_in_one_line(
    sandbox: tuple[Sandbox, io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    box, out = sandbox
    for module in (devices, volumes):
        monkeypatch.setattr(module.os, "geteuid", lambda: 1000)
    good = await run(box, [DevicePlugins(), CsiVolumes()], {}, once=True)
    text = out.getvalue()
    assert not good, "a part left out is not a full demonstration"
    assert "SIMULATED backend" in text
    assert "pod admitted" in text
    left_out = [line for line in text.splitlines() if "left out:" in line]
    assert left_out == [left_out[0]] and "needs root" in left_out[0]
    assert "sudo .venv/bin/nodeplug sandbox" in text
    assert "1 left out on this machine" in text


async def test_without_registry_tools_it_says_what_to_install_and_shows_the_exchange(
    sandbox: tuple[Sandbox, io.StringIO], monkeypatch: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    # A PATH with python3 (the zipapp's interpreter) and nothing else.
    bare = short_tmp / "bin"
    bare.mkdir()
    (bare / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bare))
    box, out = sandbox
    good = await run(box, [ImageCredentials()], {}, once=True)
    text = out.getvalue()
    assert not good
    assert "docker-registry, skopeo, htpasswd not installed" in text
    assert "apt-get install apache2-utils docker-registry skopeo" in text
    assert f"CredentialProviderRequest for {credentials.NO_REGISTRY}" in text
    assert f"auth {credentials.NO_REGISTRY}: username 'puller', password ********" in text
    assert "pull with it" not in text


class BrokenPool(Demo):
    """A CSI pool that is a plain directory: the daemon's driver cannot start."""

    title = "CSI volumes"

    def configure(self, sandbox: Sandbox, data: dict[str, Any]) -> dict[str, Any]:
        pool = sandbox.root / "not-btrfs"
        pool.mkdir()
        return {**data, "csi": {"driverName": volumes.DRIVER, "pool": {"path": str(pool)}}}

    async def show(self, sandbox: Sandbox) -> None:
        assert sandbox.plugin_watcher is not None
        await sandbox.plugin_watcher.wait_for(volumes.DRIVER, 60)


# The driver's failure cancels the daemon's HTTP unit, sometimes inside aiohttp's
# site.start(): asyncio's create_server then drops its listening socket unclosed (a
# ResourceWarning from daemon/http.py, not from the sandbox).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_daemon_that_stops_is_reported_and_the_other_contracts_still_run(
    sandbox: tuple[Sandbox, io.StringIO],
) -> None:
    box, out = sandbox
    good = await asyncio.wait_for(run(box, [BrokenPool(), ImageCredentials()], {}, True), 120)
    text = out.getvalue()
    assert not good
    assert re.search(r"✗ daemon\s+the daemon stopped: .*not-btrfs", text), text
    assert "zipapp built" in text, "credentials do not need the daemon"
    assert any(status is Status.FAIL for _, _, status in box.console.results)


class Surprise(Demo):
    title = "surprise"

    async def show(self, sandbox: Sandbox) -> None:
        async with sandbox.console.step("fine"):
            pass
        raise RuntimeError("outside any step")


async def test_an_error_outside_a_step_is_reported_and_the_next_demo_runs(
    sandbox: tuple[Sandbox, io.StringIO],
) -> None:
    box, out = sandbox
    good = await run(box, [Surprise(), ImageCredentials()], {}, once=True)
    text = out.getvalue()
    assert not good
    assert re.search(r"✗ surprise\s+RuntimeError: outside any step", text), text
    assert "zipapp built" in text


@pytest.mark.parametrize(
    ("error", "message", "remedy"),
    [
        (
            ExceptionGroup("x", [RuntimeError("mount: failed to setup loop device for /p.img")]),
            "the daemon stopped: mount: failed to setup loop device for /p.img",
            "losetup -a",
        ),
        (OSError("mount: unknown filesystem type 'btrfs'"), "unknown filesystem", "modprobe btrfs"),
        (FileNotFoundError("No such file: 'mkfs.btrfs'"), "mkfs.btrfs", "apt-get install btrfs"),
        (RuntimeError("something else"), "the daemon stopped: something else", None),
        (None, "the daemon stopped", None),
    ],
)
def test_daemon_failures_name_what_is_missing(
    error: BaseException | None, message: str, remedy: str | None
) -> None:
    found = daemon_failure(error)
    assert message in found.message
    if remedy is None:
        assert found.remedy is None
    else:
        assert found.remedy is not None and remedy in found.remedy


# --- the simulated plugin watcher -------------------------------------------------------


@pytest.fixture
async def served(short_tmp: Path) -> AsyncIterator[SimulatedPluginWatcher]:
    watcher = SimulatedPluginWatcher(short_tmp / "plugins_registry", {})
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("plugin_type", "versions", "refusal"),
    [
        ("FancyPlugin", ["v1"], "no handler registered for plugin type: FancyPlugin"),
        ("CSIPlugin", ["0.3.0"], "none of the versions ['0.3.0'] is 1.x"),
        ("DevicePlugin", ["v1alpha"], "no supported version in ['v1alpha']"),
    ],
)
async def test_the_plugin_watcher_refuses_as_the_kubelet_does(
    short_tmp: Path, plugin_type: str, versions: list[str], refusal: str
) -> None:
    kubelet = FakeKubelet(short_tmp / "device-plugins")
    watcher = SimulatedPluginWatcher.for_kubelet(short_tmp, kubelet)
    info = PluginInfo(plugin_type, "thing.example.com", "", tuple(versions))
    plugin = PluginWatcherRegistration(info, short_tmp, UnixSockets())
    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(plugin.run())]
    try:
        with pytest.raises(RefusedError) as refused:
            await watcher.wait_for("thing.example.com", 10)
        assert str(refused.value) == refusal
        verdict = plugin.servicer.verdict
        assert verdict is not None and not verdict.registered and verdict.error == refusal
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_dra_drivers_are_left_to_the_dra_kubelet_simulator(short_tmp: Path) -> None:
    kubelet = FakeKubelet(short_tmp / "device-plugins")
    watcher = SimulatedPluginWatcher.for_kubelet(short_tmp, kubelet)
    info = PluginInfo("DRAPlugin", "widget.example.com", "", ("v1.DRAPlugin",))
    plugin = PluginWatcherRegistration(info, short_tmp, UnixSockets())
    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(plugin.run())]
    try:
        with pytest.raises(TimeoutError):
            await watcher.wait_for("widget.example.com", 1)
        assert plugin.servicer.verdict is None, "no verdict: that is the DRA simulator's"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_plugin_watcher_skips_hidden_names_and_plain_files(
    served: SimulatedPluginWatcher,
) -> None:
    registry = served.directory
    (registry / "plain-file").write_text("")
    # No service at all: a GetInfo would fail, and be recorded as a refusal.
    server = grpc.aio.server()
    server.add_insecure_port(f"unix:{registry / '.hidden.sock'}")
    await server.start()
    try:
        with pytest.raises(TimeoutError):
            await served.wait_for(".hidden.sock", 0.5)
        assert served.plugins == {} and served.refused == {}
    finally:
        await server.stop(None)


# --- output: aligned, coloured only where it shows ------------------------------------


class Stream(io.StringIO):
    def __init__(self, tty: bool, encoding: str) -> None:
        super().__init__()
        self._tty = tty
        self._encoding = encoding

    def isatty(self) -> bool:
        return self._tty

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


@pytest.mark.parametrize(
    ("tty", "env", "encoding", "colour", "symbols"),
    [
        (True, {"TERM": "xterm-256color"}, "utf-8", True, True),
        (True, {"TERM": "xterm", "NO_COLOR": "1"}, "utf-8", False, True),
        (True, {"TERM": "xterm", "NO_COLOR": ""}, "utf-8", True, True),
        (True, {"TERM": "dumb"}, "utf-8", False, True),
        (False, {"TERM": "xterm"}, "utf-8", False, True),
        (True, {"TERM": "xterm"}, "ascii", True, False),
    ],
)
def test_style_follows_the_terminal(
    tty: bool, env: dict[str, str], encoding: str, colour: bool, symbols: bool
) -> None:
    style = Style.detect(Stream(tty, encoding), env)
    assert (style.colour, style.symbols) == (colour, symbols)
    line = style.line(Status.FAIL, "step", "what", 0.0123)
    assert ("\033[" in line) is colour
    assert ("✗" in line) is symbols and ("FAIL" in line) is not symbols
    line.encode(encoding)


def test_lines_align_whatever_the_label() -> None:
    lines = [PLAIN.line(Status.OK, label, "detail", 0.5) for label in ("a", "CreateVolume")]
    assert len({line.index("detail") for line in lines}) == 1
    assert lines[0].endswith("500 ms  detail")


# --- clean-up helpers ---------------------------------------------------------------------


def test_loop_devices_below_reads_sysfs(short_tmp: Path) -> None:
    sys_block = short_tmp / "sys" / "block"
    for name, backing in (("loop0", "/elsewhere/img"), ("loop1", None), ("loop2", "ROOT/p.img")):
        (sys_block / name).mkdir(parents=True)
        if backing is not None:
            (sys_block / name / "loop").mkdir()
            text = backing.replace("ROOT", str(short_tmp / "root")) + " (deleted)\n"
            (sys_block / name / "loop" / "backing_file").write_text(text)
    assert loop_devices_below(short_tmp / "root", sys_block) == ["/dev/loop2"]
    host = hostprobe.Host(sys=short_tmp / "sys", dev=short_tmp / "dev")
    assert hostprobe.free_loop_devices(host) == ["loop1"]


@pytest.mark.root
def test_release_unmounts_detaches_and_removes(short_tmp: Path) -> None:
    root = short_tmp / "root"
    (root / "a" / "b").mkdir(parents=True)
    image = root / "disk.img"
    with image.open("wb") as file:
        file.truncate(1024**2)
    subprocess.run(["mount", "--bind", str(root / "a"), str(root / "a")], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(root / "a" / "b")], check=True)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    stopped: list[str] = []
    host = HostResources(root)
    host.on_release(lambda: stopped.append("registry"))
    try:
        assert host.release() == []
        assert stopped == ["registry"]
        assert_nothing_left(root)
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        for mount in mountinfo.below(mountinfo.read(), root):
            subprocess.run(["umount", "-l", str(mount.mount_point)], check=False)
