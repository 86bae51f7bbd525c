"""Plugin-watcher registration against a fake kubelet speaking pluginregistration v1."""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from asyncinotify import Inotify, Mask

from daemon.pluginregistration.v1 import api_pb2, api_pb2_grpc
from daemon.pluginwatcher import (
    CSI_PLUGIN,
    CSI_VERSIONS,
    PluginInfo,
    PluginWatcherRegistration,
    Verdict,
)
from daemon.sandbox.pluginwatcher import kubelet_accepts_csi_versions
from daemon.sockets import UnixSockets

NAME = "local.csi.nodeplug.io"


class FakePluginWatcher:
    """What the kubelet does when a socket appears in plugins_registry/."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    async def register(self, accept: bool = True) -> api_pb2.PluginInfo:
        async with grpc.aio.insecure_channel(f"unix:{self.socket}") as channel:
            stub = api_pb2_grpc.RegistrationStub(channel)
            info = await stub.GetInfo(api_pb2.InfoRequest(), timeout=5)
            # The kubelet picks its handler by type, then validates the versions.
            valid = info.type == CSI_PLUGIN and kubelet_accepts_csi_versions(
                info.supported_versions
            )
            await stub.NotifyRegistrationStatus(
                api_pb2.RegistrationStatus(
                    plugin_registered=accept and valid,
                    error="" if accept and valid else "refused by the test",
                ),
                timeout=5,
            )
            return info


async def appears(path: Path) -> None:
    async with asyncio.timeout(5):
        while not path.exists():  # noqa: ASYNC110 - a file system fact, no event to wait on
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def registration(kubelet_dir: Path) -> AsyncIterator[PluginWatcherRegistration]:
    info = PluginInfo(
        CSI_PLUGIN, NAME, str(kubelet_dir / "plugins" / NAME / "csi.sock"), CSI_VERSIONS
    )
    plugin = PluginWatcherRegistration(info, kubelet_dir, UnixSockets())
    task = asyncio.create_task(plugin.run())
    try:
        await appears(plugin.socket_path)
        yield plugin
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_get_info_and_the_kubelets_verdict(short_tmp: Path) -> None:
    async with registration(short_tmp) as plugin:
        socket = short_tmp / "plugins_registry" / f"{NAME}-reg.sock"
        assert plugin.socket_path == socket
        assert stat.S_IMODE(socket.lstat().st_mode) == 0o600
        info = await FakePluginWatcher(socket).register()
        assert info.type == "CSIPlugin"
        assert info.name == NAME
        assert info.endpoint == str(short_tmp / "plugins" / NAME / "csi.sock")
        assert list(info.supported_versions) == ["1.0.0"]
        assert plugin.registered
        await FakePluginWatcher(socket).register(accept=False)
        assert plugin.servicer.verdict == Verdict(registered=False, error="refused by the test")
    assert not socket.exists(), "the socket is removed on shutdown"


async def test_a_restarted_kubelet_registers_again(short_tmp: Path) -> None:
    async with registration(short_tmp) as plugin:
        kubelet = FakePluginWatcher(plugin.socket_path)
        await kubelet.register()
        # A new kubelet walks the directory and dials every socket it finds.
        await FakePluginWatcher(plugin.socket_path).register()
        assert plugin.registered


async def test_a_removed_socket_is_served_again(short_tmp: Path) -> None:
    async with registration(short_tmp) as plugin:
        plugin.socket_path.unlink()
        await appears(plugin.socket_path)
        await FakePluginWatcher(plugin.socket_path).register()
        assert plugin.registered


@pytest.mark.parametrize(
    ("versions", "accepted"),
    [
        (["1.0.0"], True),
        (["v1.2"], True),
        (["1.12.0-rc.1"], True),
        (["0.3.0", "1.0.0", "2.0.0"], True),
        ([], False),
        (["1"], False),
        (["01.0.0"], False),
        (["0.3.0"], False),
        (["2.0.0"], False),
        (["one"], False),
    ],
)
def test_the_kubelets_version_rule(versions: list[str], accepted: bool) -> None:
    assert kubelet_accepts_csi_versions(versions) is accepted


def test_our_csi_versions_pass_the_kubelets_rule() -> None:
    assert kubelet_accepts_csi_versions(CSI_VERSIONS)


async def test_the_kubelets_watcher_discovers_the_socket(short_tmp: Path) -> None:
    """pkg/kubelet/pluginmanager/pluginwatcher/plugin_watcher.go, handleCreateEvent:
    the kubelet acts on fsnotify Create events (and a walk at its start), only for
    Unix sockets whose name does not start with '.'."""
    registry = short_tmp / "plugins_registry"
    registry.mkdir()
    with Inotify() as inotify:
        inotify.add_watch(registry, Mask.CREATE | Mask.MOVED_TO)
        async with registration(short_tmp) as plugin:
            async with asyncio.timeout(5):
                async for event in inotify:
                    assert event.name is not None
                    if not event.name.name.startswith("."):  # what the kubelet skips
                        assert event.name.name == plugin.socket_path.name
                        break
            assert stat.S_ISSOCK(plugin.socket_path.lstat().st_mode)
            found = [e.name for e in registry.iterdir() if stat.S_ISSOCK(e.lstat().st_mode)]
            assert found == [plugin.socket_path.name]
