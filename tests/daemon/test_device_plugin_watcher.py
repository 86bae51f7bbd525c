"""devicePluginRegistration: pluginWatcher, against the kubelet's plugin-watcher protocol."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from asyncinotify import Inotify, Mask

from daemon import config as configuration
from daemon.pluginregistration.v1 import api_pb2, api_pb2_grpc
from deviceplugin.names import resource_name_problem
from deviceplugin.testkit import FakeKubelet
from tests.daemon.test_pluginwatcher import appears
from tests.deviceplugin.backends import ScriptedBackend, device
from tests.deviceplugin.conftest import running

RESOURCE = "acme.example/fpga"


async def plugin_watcher_registers(
    kubelet: FakeKubelet, socket: Path, accept: bool = True
) -> api_pb2.PluginInfo:
    """The kubelet's plugin watcher finding `socket`, then its device-manager handler.

    pluginwatcher: GetInfo, pick the handler by type; the device manager validates the
    versions and the resource name, dials the endpoint (the socket itself when GetInfo
    leaves it empty); then NotifyRegistrationStatus with the verdict.
    """
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = api_pb2_grpc.RegistrationStub(channel)
        info = await stub.GetInfo(api_pb2.InfoRequest(), timeout=5)
        valid = (
            info.type == "DevicePlugin"
            and "v1beta1" in info.supported_versions
            and resource_name_problem(info.name) is None
        )
        if valid and accept:
            await kubelet.connect(info.name, Path(info.endpoint or socket))
        await stub.NotifyRegistrationStatus(
            api_pb2.RegistrationStatus(
                plugin_registered=valid and accept, error="" if valid and accept else "refused"
            ),
            timeout=5,
        )
    return info


def watcher_config(root: Path) -> configuration.Config:
    plugins = [{"resourceName": RESOURCE, "backend": "simulated"}]
    data = {"devicePlugins": plugins, "devicePluginRegistration": "pluginWatcher"}
    return configuration.parse(configuration.confined_to(data, root))


async def test_registers_through_plugins_registry(short_tmp: Path, kubelet: FakeKubelet) -> None:
    config = watcher_config(short_tmp)
    async with running(config, [ScriptedBackend([device("a"), device("b")])]) as daemon:
        socket = short_tmp / "kubelet" / "plugins_registry" / "nodeplug-acme.example_fpga.sock"
        await appears(socket)
        assert not daemon.ready
        info = await plugin_watcher_registers(kubelet, socket)
        assert (info.type, info.name, info.endpoint, list(info.supported_versions)) == (
            "DevicePlugin",
            RESOURCE,
            "",
            ["v1beta1"],
        )
        devices = await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
        assert sorted(devices) == ["a", "b"]
        assert daemon.readiness() == {f"device plugin {RESOURCE}": True}
        assert kubelet.register_requests == [], "no Registration.Register in this mode"
        response = await kubelet.allocate(RESOURCE, [["b"]])
        assert response.container_responses[0].devices[0].host_path == "/dev/b"

        # A lost stream: the plugin serves a fresh socket, which the watcher sees as new.
        with Inotify() as inotify:
            inotify.add_watch(socket.parent, Mask.CREATE)
            await kubelet.drop_stream(RESOURCE)
            async with asyncio.timeout(5):
                while (await inotify.get()).name != Path(socket.name):
                    pass
        await plugin_watcher_registers(kubelet, socket)
        await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 2)
    assert not socket.exists()


async def test_a_refusal_keeps_it_unready(short_tmp: Path, kubelet: FakeKubelet) -> None:
    config = watcher_config(short_tmp)
    async with running(config, [ScriptedBackend([device("a")])]) as daemon:
        socket = short_tmp / "kubelet" / "plugins_registry" / "nodeplug-acme.example_fpga.sock"
        await appears(socket)
        await plugin_watcher_registers(kubelet, socket, accept=False)
        await asyncio.sleep(0.1)
        assert not daemon.ready
        assert daemon.readiness() == {f"device plugin {RESOURCE}": False}
