"""Request paths cannot lead a mount or a new file outside the kubelet's directory.

The races swap a path component between a real directory (or nothing) and a
symlink to a directory outside, from another thread, while the driver publishes
and stages: no answer may ever leave a mount or a file outside.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi import mounts, safepath
from csi.v1 import csi_pb2
from tests.csi.conftest import Client, block_capability, create_request, mount_capability, sh
from tests.csi.test_conformance import code_of
from tests.csi.test_lifecycle import stage_request

pytestmark = pytest.mark.root

Code = grpc.StatusCode
RACES = 300


class Flipper:
    """Flips one path between its real state and a symlink to `outside`, in a thread.

    `hold()` stops the flipping and puts the real state back (for clean-up between tries).
    """

    def __init__(self, path: Path, outside: Path, real_directory: Path | None) -> None:
        self.path = path
        self.outside = outside
        # None: the real state is "absent"; else a directory renamed in and out.
        self.real = real_directory
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.flips = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _restore(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_symlink():
                self.path.unlink()
        if self.real is not None and not self.path.exists():
            self.real.rename(self.path)

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                with contextlib.suppress(OSError):
                    if self.real is not None:
                        self.path.rename(self.real)
                    self.path.symlink_to(self.outside)
                    self.flips += 1
                with contextlib.suppress(OSError):
                    self._restore()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self.lock:
            self._restore()
            yield

    def __enter__(self) -> Flipper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._restore()


@pytest.fixture
def outside(short_tmp: Path) -> Path:
    """A directory beside the kubelet's, holding a file an escape could reach."""
    path = short_tmp / "outside"
    path.mkdir()
    (path / "secret").write_text("not yours")
    return path


def escaped(csi: Client, outside: Path) -> list[str]:
    """Mounts of the pool outside the kubelet's directory, and files the driver made outside."""
    table = mounts.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    (source,) = {m.source for m in table if m.mount_point == str(csi.driver.pool.root)}
    problems = [
        m.mount_point
        for m in table
        if m.source == source
        and m.root.startswith("/volumes/")
        and not Path(m.mount_point).is_relative_to(csi.kubelet)
    ]
    problems += [str(p) for p in outside.iterdir() if p.name != "secret"]
    return problems


async def race(
    csi: Client,
    outside: Path,
    flipper: Flipper,
    attempt: Callable[[], Awaitable[Any]],
    clean_up: Callable[[], Awaitable[Any]],
) -> dict[Code, int]:
    codes: dict[Code, int] = {}
    with flipper:
        for _ in range(RACES):
            code = await code_of(attempt())
            codes[code] = codes.get(code, 0) + 1
            assert code in {Code.OK, Code.INVALID_ARGUMENT}, code
            with flipper.hold():
                assert not escaped(csi, outside)
                await clean_up()
    assert flipper.flips > RACES, "the flipper ran throughout"
    return codes


async def staged_volume(csi: Client, capability: csi_pb2.VolumeCapability) -> str:
    request = create_request("pvc-race", capability=capability)
    volume_id = (await csi.controller.CreateVolume(request)).volume.volume_id
    await csi.node.NodeStageVolume(stage_request(csi, volume_id, capability))
    return volume_id


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("block", "swapped"),
    [(False, "target"), (True, "target"), (False, "parent")],
    ids=["mount target", "block target", "mount parent"],
)
async def test_publish_path_swapped_for_a_symlink(
    csi: Client, outside: Path, block: bool, swapped: str
) -> None:
    """The target path flips between absent and a symlink outside, or its parent between a
    real directory and such a symlink."""
    capability = block_capability() if block else mount_capability()
    volume_id = await staged_volume(csi, capability)
    pods = csi.kubelet / "pods"
    (pods / "real").mkdir(parents=True)
    target = pods / "target" if swapped == "target" else pods / "pod" / "target"
    flipper = (
        Flipper(target, outside, None)
        if swapped == "target"
        else Flipper(target.parent, outside, pods / "real")
    )
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id,
        staging_target_path=str(csi.kubelet / "staging" / "stage"),
        target_path=str(target),
        volume_capability=capability,
    )
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    codes = await race(
        csi,
        outside,
        flipper,
        lambda: csi.node.NodePublishVolume(request),
        lambda: csi.node.NodeUnpublishVolume(unpublish),
    )
    assert codes.get(Code.OK), codes


@pytest.mark.timeout(300)
async def test_staging_path_swapped_for_a_symlink(csi: Client, outside: Path) -> None:
    capability = mount_capability()
    request = create_request("pvc-race", capability=capability)
    volume_id = (await csi.controller.CreateVolume(request)).volume.volume_id
    staging = csi.kubelet / "staging"
    staging.mkdir()
    path = staging / "stage"
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(path), volume_capability=capability
    )
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(path))

    async def unstage_and_remove() -> None:
        # As the kubelet does: the staging directory goes once unstaged.
        await csi.node.NodeUnstageVolume(unstage)
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()

    await race(
        csi,
        outside,
        Flipper(path, outside, None),
        lambda: csi.node.NodeStageVolume(stage),
        unstage_and_remove,
    )


# --- the building blocks ------------------------------------------------------------------


def test_paths_are_opened_beneath_their_root_only(short_tmp: Path, outside: Path) -> None:
    root = short_tmp / "root"
    (root / "dir").mkdir(parents=True)
    (root / "link").symlink_to(outside)
    (root / "dir" / "inner-link").symlink_to(root / "dir")
    with safepath.opened(root, root / "dir"):
        pass
    for bad in (root / "link", root / "link" / "secret", root / "dir" / "inner-link"):
        with pytest.raises(safepath.PathError), safepath.opened(root, bad):
            pass
    with pytest.raises(safepath.PathError):
        safepath.make_directory(root, root / "link" / "new", 0o700)
    with pytest.raises(safepath.PathError):
        safepath.make_file(root, root / "link", 0o600)
    with pytest.raises(safepath.PathError):
        safepath.make_directory(root, root / "missing" / "new", 0o700)
    safepath.remove(root, root / "link")  # the symlink goes, never what it names
    assert (outside / "secret").exists()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


async def test_unmount_takes_every_stacked_mount_and_nothing_else(short_tmp: Path) -> None:
    root = short_tmp / "root"
    root.mkdir()
    source = short_tmp / "source"
    source.mkdir()
    target = root / "target"
    try:
        for _ in range(3):
            with safepath.cloned(source) as tree:
                safepath.attach(tree, root, target, (0, 0), file=False)
        assert len([m for m in await mounts.mounts() if m.mount_point == str(target)]) == 3
        assert safepath.unmount(root, target) == 3
        assert await mounts.mounted_at(target) is None
        assert safepath.unmount(root, target) == 0, "nothing mounted: nothing to do"
        # A path whose directory is gone has nothing mounted: not an error.
        await mounts.unmount(root, root / "gone" / "target")
    finally:
        while await mounts.mounted_at(target) is not None:
            sh("umount", str(target))


async def test_unmount_never_follows_a_symlink_to_a_mount(short_tmp: Path, outside: Path) -> None:
    root = short_tmp / "root"
    root.mkdir()
    elsewhere = outside / "mounted"
    try:
        with safepath.cloned(short_tmp) as tree:
            safepath.attach(tree, outside, elsewhere, (0, 0), file=False)
        (root / "link").symlink_to(outside)
        await mounts.unmount(root, root / "link" / "mounted")
        assert await mounts.mounted_at(elsewhere) is not None
    finally:
        sh("umount", "-l", str(elsewhere))


def test_created_paths_get_their_modes(short_tmp: Path) -> None:
    root = short_tmp / "root"
    root.mkdir()
    safepath.make_directory(root, root / "d", 0o750)
    safepath.make_file(root, root / "f", 0o600)
    assert (root / "d").stat().st_mode & 0o7777 == 0o750 & ~_umask()
    assert (root / "f").stat().st_mode & 0o7777 == 0o600 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize(
    ("options", "readonly", "expected"),
    [
        ([], False, (0, 0)),
        ([], True, (0x1, 0)),
        (["ro"], False, (0x1, 0)),
        (["nosuid", "nodev", "noexec"], False, (0x2 | 0x4 | 0x8, 0)),
        (["nosuid", "suid"], False, (0, 0x2)),
        (["noatime"], False, (0x10, 0x70)),
        (["noatime", "strictatime"], True, (0x1 | 0x20, 0x70)),
        (["bind", "rw", "nodiratime"], False, (0x80, 0)),
    ],
)
def test_mount_options_become_mount_attributes(
    options: list[str], readonly: bool, expected: tuple[int, int]
) -> None:
    assert safepath.mount_attributes(options, readonly) == expected


async def test_an_unknown_mount_option_is_invalid_argument(csi: Client) -> None:
    request = create_request("pvc-opt", capability=mount_capability(flags=("compress=zstd",)))
    assert await code_of(csi.controller.CreateVolume(request)) == Code.INVALID_ARGUMENT


async def test_read_only_and_mount_options_hold_from_the_start(csi: Client) -> None:
    capability = mount_capability(flags=("nosuid", "nodev", "noexec", "noatime"))
    volume_id = await staged_volume(csi, capability)
    (csi.kubelet / "pods").mkdir()
    target = csi.kubelet / "pods" / "ro"
    await csi.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(csi.kubelet / "staging" / "stage"),
            target_path=str(target),
            volume_capability=capability,
            readonly=True,
        )
    )
    mount = await mounts.mounted_at(target)
    assert mount is not None
    assert {"ro", "nosuid", "nodev", "noexec", "noatime"} <= mount.options
