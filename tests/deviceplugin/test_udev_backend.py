"""udev backend: enumeration from real /sys, hotplug from real kernel uevents (veth pairs)."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deviceplugin.backends.udev import create
from deviceplugin.testkit import FakeKubelet
from tests.deviceplugin.conftest import make_config, running

pytestmark = pytest.mark.root
RESOURCE = "example.com/nic"


def test_enumerates_a_subsystem_and_matches_properties() -> None:
    everything = {d.id: d for d in create({"subsystem": "mem"}).scan()}
    assert {"null", "zero", "urandom"} <= everything.keys()
    assert everything["null"].device_nodes[0].host_path == "/dev/null"
    world_writable = {
        d.id for d in create({"subsystem": "mem", "properties": {"DEVMODE": "0666"}}).scan()
    }
    assert "null" in world_writable and "kmsg" not in world_writable
    only_z = {d.id for d in create({"subsystem": "mem", "sysname": "z*"}).scan()}
    assert only_z == {"zero"}
    assert create({"subsystem": "no-such-subsystem"}).scan() == []


@contextlib.contextmanager
def veth_pair(prefix: str) -> Iterator[tuple[str, str]]:
    """A real network device pair: the kernel sends add and remove uevents for both."""
    left, right = f"{prefix}a", f"{prefix}b"
    subprocess.run(["ip", "link", "add", left, "type", "veth", "peer", "name", right], check=True)
    try:
        yield left, right
    finally:
        subprocess.run(["ip", "link", "del", left], check=False, capture_output=True)


async def test_hotplug_and_removal_from_kernel_uevents(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    prefix = "np" + secrets.token_hex(3)
    plugin = {
        "resourceName": RESOURCE,
        "backend": "udev",
        "config": {"subsystem": "net", "sysname": f"{prefix}*"},
    }
    async with running(make_config(short_tmp, plugin)):
        await kubelet.wait_for_devices(RESOURCE, lambda d: d == {})
        started = time.monotonic()
        with veth_pair(prefix) as (left, right):
            devices = await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {left, right})
            assert time.monotonic() - started < 1.0
            assert all(d.health == "Healthy" for d in devices.values())
            response = await kubelet.allocate(RESOURCE, [[left]])
            container = response.container_responses[0]
            assert list(container.devices) == [], "network devices have no device node"
            assert container.envs["NODEPLUG_EXAMPLE_COM_NIC"] == left
        await kubelet.wait_for_devices(RESOURCE, lambda d: d == {})
        with veth_pair(prefix) as (left, right):
            await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {left, right})
