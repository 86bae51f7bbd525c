"""csi.btrfs against real btrfs on a loop device, checked with what the `btrfs` command reports."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

import pytest

from csi import btrfs
from csi.system import SyscallError
from tests.csi.conftest import sh

pytestmark = pytest.mark.root

MiB = 1024**2


def show(path: Path) -> dict[str, str]:
    """`btrfs subvolume show` as a mapping of its "Name: value" lines."""
    lines = sh("btrfs", "subvolume", "show", str(path)).splitlines()
    return dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in lines[1:])
        if value.strip()
    )


def qgroup_row(pool: Path, qgroup_id: int) -> list[str] | None:
    """0/<id>'s row of `btrfs qgroup show -re --raw`: id, rfer, excl, max_rfer, max_excl."""
    for line in sh("btrfs", "qgroup", "show", "-re", "--raw", str(pool)).splitlines():
        fields = line.split()
        if fields and fields[0] == f"0/{qgroup_id}":
            return fields
    return None


def commit(pool: Path) -> None:
    sh("btrfs", "filesystem", "sync", str(pool))


@pytest.fixture
def quota_pool(btrfs_pool: Path) -> Path:
    btrfs.enable_quota(btrfs_pool)
    return btrfs_pool


def write_synced(path: Path, size: int) -> None:
    with path.open("wb") as file:
        file.write(os.urandom(size))
        file.flush()
        os.fsync(file.fileno())


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (btrfs._VolArgs, 4096),
        (btrfs._VolArgsV2, 4096),
        (btrfs._SubvolInfo, 504),
        (btrfs._QgroupLimitArgs, 48),
        (btrfs._QgroupCreateArgs, 16),
        (btrfs._QuotaCtlArgs, 16),
        (btrfs._SearchArgs, 4096),
        (btrfs._SearchHeader, 32),
        (btrfs._QgroupInfoItem, 40),
    ],
)
def test_structures_have_the_sizes_of_the_kernels(
    struct: type[ctypes.Structure], size: int
) -> None:
    # Sizes from sizeof() in a C program built against linux/btrfs.h: each is also in
    # the ioctl number, which the kernel checks.
    assert ctypes.sizeof(struct) == size


def test_subvolumes_and_snapshots_are_what_the_btrfs_command_shows(quota_pool: Path) -> None:
    volume = quota_pool / "volume"
    btrfs.create_subvolume(volume)
    write_synced(volume / "data", MiB)
    snapshot = quota_pool / "snapshot"
    btrfs.snapshot(volume, snapshot, readonly=True)
    clone = quota_pool / "clone"
    btrfs.snapshot(snapshot, clone, readonly=False)

    for path, readonly in ((volume, False), (snapshot, True), (clone, False)):
        found = btrfs.info(path)
        shown = show(path)
        assert found.id == int(sh("btrfs", "inspect-internal", "rootid", str(path)))
        assert found.id == int(shown["Subvolume ID"])
        assert found.generation == int(shown["Generation"])
        assert found.created == int(shown["Gen at creation"])
        assert found.readonly == readonly
        assert ("readonly" in shown["Flags"]) == readonly
    assert (clone / "data").stat().st_size == MiB
    with pytest.raises(OSError, match="Read-only"):
        (snapshot / "new").write_text("x")


def test_a_read_only_snapshot_is_deleted_and_its_qgroup_goes_once_dropped(
    quota_pool: Path,
) -> None:
    volume = quota_pool / "volume"
    btrfs.create_subvolume(volume)
    write_synced(volume / "data", MiB)
    snapshot = quota_pool / "snapshot"
    btrfs.snapshot(volume, snapshot, readonly=True)
    snapshot_id = btrfs.info(snapshot).id
    btrfs.delete_subvolume(snapshot)
    assert not snapshot.exists()
    listed = sh("btrfs", "subvolume", "list", str(quota_pool))
    assert not re.search(r"\bpath snapshot$", listed, re.MULTILINE)
    # Its qgroup outlives it until the kernel has dropped its data.
    commit(quota_pool)
    sh("btrfs", "subvolume", "sync", str(quota_pool), str(snapshot_id))
    try:
        btrfs.destroy_qgroup(quota_pool, snapshot_id)
    except SyscallError as error:
        assert error.errno == errno.ENOENT, "Linux 6.7+ removed it itself"
    assert qgroup_row(quota_pool, snapshot_id) is None


def test_destroying_a_qgroup_in_use_is_busy_and_an_unknown_one_is_not_found(
    quota_pool: Path,
) -> None:
    volume = quota_pool / "volume"
    btrfs.create_subvolume(volume)
    with pytest.raises(SyscallError) as busy:
        btrfs.destroy_qgroup(quota_pool, btrfs.info(volume).id)
    assert busy.value.errno == errno.EBUSY
    with pytest.raises(SyscallError) as missing:
        btrfs.destroy_qgroup(quota_pool, 99999)
    assert missing.value.errno == errno.ENOENT
    assert "btrfs qgroup destroy 0/99999" in str(missing.value)


def test_the_limit_is_the_qgroups_and_the_kernel_enforces_it(quota_pool: Path) -> None:
    volume = quota_pool / "volume"
    btrfs.create_subvolume(volume)
    btrfs.set_limit(volume, 4 * MiB)
    row = qgroup_row(quota_pool, btrfs.info(volume).id)
    assert row is not None
    assert int(row[3]) == 4 * MiB, "max_rfer"
    assert row[4] == "none", "max_excl"
    with pytest.raises(OSError) as error:
        write_synced(volume / "big", 8 * MiB)
    assert error.value.errno == errno.EDQUOT


def test_referenced_bytes_match_the_qgroup_show_after_a_commit(quota_pool: Path) -> None:
    volume = quota_pool / "volume"
    btrfs.create_subvolume(volume)
    write_synced(volume / "data", 3 * MiB)
    commit(quota_pool)
    volume_id = btrfs.info(volume).id
    row = qgroup_row(quota_pool, volume_id)
    assert row is not None
    assert btrfs.referenced(quota_pool, volume_id) == int(row[1])
    assert int(row[1]) >= 3 * MiB
    assert btrfs.referenced(quota_pool, 99999) is None


def test_an_fsynced_write_changes_the_generation_at_the_next_commit_a_snapshot_is_one(
    quota_pool: Path,
) -> None:
    """What Pool.snapshot_group relies on: fsync puts data in the log tree and leaves the
    generation alone; the next commit moves it, and creating any snapshot is a commit."""
    volume = quota_pool / "volume"
    other = quota_pool / "other"
    btrfs.create_subvolume(volume)
    btrfs.create_subvolume(other)
    btrfs.snapshot(volume, quota_pool / "cut", readonly=True)
    cut = btrfs.info(quota_pool / "cut").created
    assert btrfs.info(volume).generation == cut
    write_synced(volume / "data", 4096)
    assert btrfs.info(volume).generation == cut
    btrfs.snapshot(other, quota_pool / "next", readonly=True)
    assert btrfs.info(volume).generation == btrfs.info(quota_pool / "next").created > cut
    assert btrfs.start_commit(quota_pool) >= btrfs.info(volume).generation


def test_enabling_quotas_again_changes_nothing(quota_pool: Path) -> None:
    volume = quota_pool / "volume"
    btrfs.create_subvolume(volume)
    btrfs.set_limit(volume, 4 * MiB)
    btrfs.enable_quota(quota_pool)
    row = qgroup_row(quota_pool, btrfs.info(volume).id)
    assert row is not None
    assert int(row[3]) == 4 * MiB


def test_a_nocow_file_is_what_lsattr_shows(quota_pool: Path) -> None:
    disk = quota_pool / "disk"
    descriptor = os.open(disk, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        btrfs.set_nocow(descriptor)
    finally:
        os.close(descriptor)
    assert "C" in sh("lsattr", str(disk)).split()[0]


@pytest.mark.parametrize(
    ("operation", "code"),
    [
        (lambda pool: btrfs.create_subvolume(pool / "volume"), errno.EEXIST),
        (lambda pool: btrfs.snapshot(pool / "volume", pool / "volume", True), errno.EEXIST),
        (lambda pool: btrfs.snapshot(pool / "missing", pool / "s", True), errno.ENOENT),
        (lambda pool: btrfs.create_subvolume(pool / "missing" / "v"), errno.ENOENT),
        (lambda pool: btrfs.delete_subvolume(pool / "missing"), errno.ENOENT),
        (lambda pool: btrfs.snapshot(pool / "plain", pool / "s", True), errno.EINVAL),
        (lambda pool: btrfs.create_subvolume(pool / ".."), errno.EINVAL),
        (lambda pool: btrfs.create_subvolume(pool / ("x" * 5000)), errno.EINVAL),
    ],
    ids=[
        "create over a subvolume",
        "snapshot over a subvolume",
        "snapshot of nothing",
        "create in a missing directory",
        "delete of nothing",
        "snapshot of a plain directory",
        "a dot-dot name",
        "a name too long",
    ],
)
def test_failures_carry_their_errno_and_say_what_failed(
    quota_pool: Path, operation: object, code: int
) -> None:
    btrfs.create_subvolume(quota_pool / "volume")
    (quota_pool / "plain").mkdir()
    assert callable(operation)
    # OSError: opening a path failed before any ioctl.
    with pytest.raises((SyscallError, OSError)) as error:
        operation(quota_pool)
    assert getattr(error.value, "errno", None) == code
    if isinstance(error.value, SyscallError):
        assert "btrfs" in str(error.value)
