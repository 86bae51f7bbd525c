"""glob backend with real device nodes (mknod) and real inotify hotplug."""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deviceplugin.backend import Device, DeviceNode
from deviceplugin.backends import common
from deviceplugin.backends.common import device_id, new_device, numa_node_of
from deviceplugin.backends.glob import GlobBackend, GlobConfig, create
from deviceplugin.configkit import convert
from deviceplugin.testkit import FakeKubelet
from tests.deviceplugin.conftest import make_config, running

pytestmark = pytest.mark.root
RESOURCE = "example.com/widget"
NULL = os.makedev(1, 3)


def mknod(path: Path, kind: int = stat.S_IFCHR, rdev: int = NULL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, 0o600 | kind, rdev)


def glob_plugin(*patterns: str, **config: object) -> dict[str, object]:
    return {
        "resourceName": RESOURCE,
        "backend": "glob",
        "config": {"paths": list(patterns), **config},
    }


async def test_nodes_are_devices_and_allocate_gives_their_specs(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    dev = short_tmp / "dev"
    for name in ("widget0", "widget1"):
        mknod(dev / name)
    mknod(dev / "widgetblk", stat.S_IFBLK, os.makedev(7, 7))
    (dev / "widget-not-a-node").write_text("regular files are not devices")
    config = make_config(
        short_tmp, glob_plugin(f"{dev}/widget*", containerDir="/dev/widgets", permissions="r")
    )
    async with running(config):
        devices = await kubelet.wait_for_devices(RESOURCE, lambda d: len(d) == 3)
        assert sorted(devices) == ["widget0", "widget1", "widgetblk"]
        response = await kubelet.allocate(RESOURCE, [["widget1", "widgetblk"]])
        specs = [
            (d.host_path, d.container_path, d.permissions)
            for d in response.container_responses[0].devices
        ]
        assert specs == [
            (f"{dev}/widget1", "/dev/widgets/widget1", "r"),
            (f"{dev}/widgetblk", "/dev/widgets/widgetblk", "r"),
        ]


async def test_hotplug_and_removal_seen_within_100ms(short_tmp: Path, kubelet: FakeKubelet) -> None:
    dev = short_tmp / "dev"
    mknod(dev / "widget0")
    async with running(make_config(short_tmp, glob_plugin(f"{dev}/widget*"))):
        await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {"widget0"})
        for round_ in range(3):
            started = time.monotonic()
            mknod(dev / "widget7")
            await kubelet.wait_for_devices(RESOURCE, lambda d: "widget7" in d)
            added = time.monotonic() - started
            started = time.monotonic()
            (dev / "widget7").unlink()
            await kubelet.wait_for_devices(RESOURCE, lambda d: "widget7" not in d)
            removed = time.monotonic() - started
            assert added < 0.1 and removed < 0.1, (round_, added, removed)
        # A device that comes back is Healthy again: nothing sticks.
        mknod(dev / "widget7")
        devices = await kubelet.wait_for_devices(RESOURCE, lambda d: "widget7" in d)
        assert devices["widget7"].health == "Healthy"


async def test_directories_that_appear_later_are_watched(
    short_tmp: Path, kubelet: FakeKubelet
) -> None:
    root = short_tmp / "sys-less"
    root.mkdir()
    async with running(make_config(short_tmp, glob_plugin(f"{root}/dri*/card*"))):
        await kubelet.wait_for_devices(RESOURCE, lambda d: d == {})
        mknod(root / "dri" / "card0")  # creates the directory, then the node
        await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {"dri-card0"})
        mknod(root / "dri2" / "card1")
        await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {"dri-card0", "dri2-card1"})
        for path in (root / "dri").iterdir():
            path.unlink()
        (root / "dri").rmdir()
        await kubelet.wait_for_devices(RESOURCE, lambda d: set(d) == {"dri2-card1"})
        mknod(root / "dri" / "card3")  # the directory is back: watched again
        await kubelet.wait_for_devices(RESOURCE, lambda d: "dri-card3" in d)


def test_ids_stay_unique_across_patterns(short_tmp: Path) -> None:
    for sub in ("a", "b"):
        mknod(short_tmp / sub / "w0")
    backend = create({"paths": [f"{short_tmp}/a/w*", f"{short_tmp}/b/w*"]})
    first, second = (d.id for d in backend.scan())
    assert first == "w0"
    assert second.endswith("-b-w0")


def test_a_scan_makes_the_devices_the_constructor_makes(short_tmp: Path) -> None:
    """Devices from the scan's fast path equal, hash and print as Device(...) does."""
    for name in ("w0", "w 1", "-w2"):  # safe names, and names that need an id made
        mknod(short_tmp / name)
    mknod(short_tmp / "w3", stat.S_IFBLK, os.makedev(7, 7))
    backend = create({"paths": [f"{short_tmp}/w*", f"{short_tmp}/-w*"], "containerDir": "/c"})
    scanned = backend.scan()
    expected = [
        Device(
            id=device_id(path.name),
            numa_node=numa_node_of(f"/sys/dev/{kind}/{major}:{minor}"),
            device_nodes=(DeviceNode(str(path), f"/c/{path.name}", "rw"),),
        )
        for path, kind, (major, minor) in [
            (short_tmp / "w 1", "char", (1, 3)),
            (short_tmp / "w0", "char", (1, 3)),
            (short_tmp / "w3", "block", (7, 7)),
            (short_tmp / "-w2", "char", (1, 3)),
        ]
    ]
    assert scanned == expected
    assert [hash(d) for d in scanned] == [hash(d) for d in expected]
    assert [repr(d) for d in scanned] == [repr(d) for d in expected]
    node = (DeviceNode("/dev/x", None, "r"),)
    assert new_device("x", 1, node) == Device(id="x", numa_node=1, device_nodes=node)


def test_a_scan_pauses_garbage_collection_and_leaves_it_as_it_was(short_tmp: Path) -> None:
    mknod(short_tmp / "w0")
    seen = []

    class Recording(GlobBackend):
        def _scan(self) -> list[Device]:
            seen.append(gc.isenabled())
            return super()._scan()

    backend = Recording(convert({"paths": [f"{short_tmp}/w*"]}, GlobConfig))
    assert gc.isenabled()
    assert len(backend.scan()) == 1
    assert gc.isenabled()
    gc.disable()
    try:
        assert len(backend.scan()) == 1
        assert not gc.isenabled(), "whoever turned collection off decides when it comes back"
    finally:
        gc.enable()
    assert seen == [False, False]


def test_a_scan_lists_what_glob_finds_in_path_order(short_tmp: Path) -> None:
    """Directory by directory, name by name, is path order: "a-c/" sorts before "a/"."""
    for sub in ("a", "a-c", "a.b", "ab", "b"):
        for name in ("w1", "w0", "w10", "x0"):
            mknod(short_tmp / sub / name)
    (short_tmp / "a" / "w2").write_text("not a device node")
    (short_tmp / "a" / ".w3").symlink_to(short_tmp / "a" / "w0")
    (short_tmp / "a" / "w4").symlink_to(short_tmp / "b" / "w0")
    pattern = f"{short_tmp}/a*/w*"
    found = [d.device_nodes[0].host_path for d in create({"paths": [pattern]}).scan()]
    assert found == sorted(set(glob.glob(pattern)) - {f"{short_tmp}/a/w2"})
    assert found[:2] == [f"{short_tmp}/a-c/w0", f"{short_tmp}/a-c/w1"]


@contextlib.contextmanager
def numa_node_overridden(sys_device: Path, node: int, tmp: Path) -> Iterator[None]:
    """Bind-mount a file over a real sysfs numa_node: the kernel's value reads as `node`."""
    value = tmp / "numa_node"
    value.write_text(f"{node}\n")
    target = sys_device / "numa_node"
    subprocess.run(["mount", "--bind", str(value), str(target)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


def _block_device_with_numa_file() -> tuple[Path, int] | None:
    for link in sorted(Path("/sys/dev/block").iterdir()):
        resolved = link.resolve()
        for parent in resolved.parents:
            if (parent / "numa_node").is_file():
                major, minor = link.name.split(":")
                return parent, os.makedev(int(major), int(minor))
    return None


def test_numa_node_comes_from_sysfs(short_tmp: Path) -> None:
    found = _block_device_with_numa_file()
    if found is None:
        pytest.skip("no block device with a sysfs numa_node on this machine")
    sys_device, rdev = found
    mknod(short_tmp / "disk0", stat.S_IFBLK, rdev)
    backend = create({"paths": [f"{short_tmp}/disk*"]})
    with numa_node_overridden(sys_device, 1, short_tmp):
        (device,) = backend.scan()
        assert device.numa_node == 1
    assert numa_node_of(Path("/sys/devices/virtual/mem/null")) is None


def test_a_scan_reads_each_sysfs_directory_once(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes share device numbers and their devices share parents: sysfs is read once."""
    reads: list[str] = []
    real = common._read_numa_node

    def counted(directory: str) -> int | None:
        reads.append(directory)
        return real(directory)

    monkeypatch.setattr(common, "_read_numa_node", counted)
    numbers = [NULL, os.makedev(1, 5)]  # null and zero: siblings in /sys/devices/virtual/mem
    for index in range(50):
        mknod(short_tmp / f"w{index}", rdev=numbers[index % 2])
    devices = create({"paths": [f"{short_tmp}/w*"]}).scan()
    assert len(devices) == 50
    assert len(reads) == len(set(reads)), "no directory read twice"
    assert {d.numa_node for d in devices} == {None}
    # null, zero, and their shared parents up to /sys/devices
    assert sorted(reads) == [
        "/sys/devices",
        "/sys/devices/virtual",
        "/sys/devices/virtual/mem",
        "/sys/devices/virtual/mem/null",
        "/sys/devices/virtual/mem/zero",
    ]
