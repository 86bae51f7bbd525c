"""Pool image mode, the state store, sizes and path checks, without a CSI server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi import capacity, validation
from csi import state as state_module
from csi.config import CsiConfig, parse_quantity
from csi.driver import CsiDriver
from csi.errors import InvalidArgumentError, NotFoundError, OutOfRangeError
from csi.mounts import mounted_at, parse_mountinfo
from csi.state import State, StateFileError, StateStore, Status, VolumeRecord
from csi.v1 import csi_pb2
from deviceplugin import configkit
from tests.csi.conftest import DRIVER, cleanup_below

MiB = 1024**2


@pytest.mark.root
async def test_pool_image_is_created_and_loop_mounted(short_tmp: Path) -> None:
    config = configkit.convert(
        {
            "driverName": DRIVER,
            "pool": {
                "path": str(short_tmp / "pool"),
                "image": str(short_tmp / "pool.img"),
                "size": "256Mi",
            },
        },
        CsiConfig,
    )
    try:
        driver = CsiDriver(config, short_tmp / "kubelet", short_tmp / "state")
        await driver.start()
        mount = await mounted_at(short_tmp / "pool")
        assert mount is not None
        assert mount.fs_type == "btrfs"
        assert (short_tmp / "pool.img").stat().st_size == 256 * MiB
        again = CsiDriver(config, short_tmp / "kubelet", short_tmp / "state")
        await again.start()  # already mounted: used as it is
        assert again.ready
    finally:
        cleanup_below(short_tmp)


async def test_state_survives_a_round_trip_and_writes_atomically(short_tmp: Path) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    record = VolumeRecord("v" + "1" * 32, "pvc é", MiB, False, {}, "", 1.5, Status.READY)
    store.state.volumes[record.id] = record
    await store.save()
    assert sorted(p.name for p in (short_tmp / "state").iterdir()) == sorted(
        ["csi-state.json", store.node_path.name]
    )
    assert StateStore(short_tmp / "state").load() == store.state
    data = json.loads(store.paths[0].read_text())
    data["version"] = 99
    store.paths[0].write_text(json.dumps(data))
    with pytest.raises(StateFileError, match="version"):
        StateStore(short_tmp / "state").load()
    assert StateStore(short_tmp / "missing").load() == State()


async def test_concurrent_saves_share_writes_and_each_returns_durable(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(short_tmp / "state")
    store.load()
    writes: list[bytes] = []
    real_write = state_module._write_in_place

    def counting_write(path: Path, data: bytes) -> None:
        writes.append(data)
        real_write(path, data)

    monkeypatch.setattr(state_module, "_write_in_place", counting_write)

    async def change_and_save(index: int) -> None:
        record = VolumeRecord(f"v{index:032x}", f"pvc-{index}", MiB, False, {}, "", 1.0)
        store.state.volumes[record.id] = record
        await store.save()
        # When save() returns, this caller's change is on disk.
        assert record.id in StateStore(short_tmp / "state").load().volumes

    await asyncio.gather(*(change_and_save(i) for i in range(20)))
    assert len(writes) < 20, "callers queued behind a write share the next one"
    assert StateStore(short_tmp / "state").load() == store.state


@given(required=st.integers(0, 2**40), limit=st.integers(0, 2**40))
def test_size_for_honours_the_range_or_refuses(required: int, limit: int) -> None:
    request = csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)
    try:
        size = capacity.size_for(request)
    except OutOfRangeError:
        # Refused only if no whole-MiB size lies in [max(required, minimum), limit].
        smallest = -(-max(required, capacity.MINIMUM) // capacity.ALIGNMENT) * capacity.ALIGNMENT
        assert limit
        assert smallest > limit
        return
    assert size >= required
    assert size >= capacity.MINIMUM
    assert size % capacity.ALIGNMENT == 0
    assert not limit or size <= limit
    assert capacity.fits(size, request)


@pytest.mark.parametrize(
    ("value", "expected"), [("20Gi", 20 * 1024**3), ("512Mi", 512 * MiB), ("1000", 1000), (7, 7)]
)
def test_quantities(value: object, expected: int) -> None:
    assert parse_quantity(value) == expected


@pytest.mark.parametrize("value", ["1.5Gi", "-1", "lots", True])
def test_bad_quantities(value: object) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(value)


@given(st.text(max_size=200))
def test_request_paths_never_escape_their_root(value: str) -> None:
    root = Path("/var/lib/kubelet")
    try:
        path = validation.request_path(value, root, "target_path")
    except InvalidArgumentError:
        return
    assert path.is_relative_to(root)
    assert ".." not in path.parts
    assert "\0" not in str(path)


@given(st.text(max_size=60))
def test_ids_from_requests_are_generated_ids_or_not_found(value: str) -> None:
    try:
        volume_id = validation.object_id(value, validation.VOLUME_PREFIX, "volume_id")
    except (InvalidArgumentError, NotFoundError):
        return
    assert volume_id.isalnum()
    assert len(volume_id) == 33


def test_mountinfo_unescapes_paths() -> None:
    line = (
        r"36 35 0:40 /volumes/v1 /var/lib/kubelet/a\040b rw,relatime shared:1 - btrfs /dev/loop0 rw"
    )
    (mount,) = parse_mountinfo(line)
    assert mount.mount_point == "/var/lib/kubelet/a b"
    assert mount.root == "/volumes/v1"
    assert mount.fs_type == "btrfs"
