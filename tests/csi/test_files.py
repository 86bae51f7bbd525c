"""The driver's files: private modes, checked by another user, and pool images made whole."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csi import files
from csi.config import CsiConfig
from csi.driver import CsiDriver
from csi.errors import SetupError
from deviceplugin import configkit
from tests.csi.conftest import DRIVER, cleanup_below

pytestmark = pytest.mark.root

NOBODY = 65534
# Run as nobody: try to read each path (a directory is listed); print what happened.
_PROBE = """
import json, os, sys
results = {}
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as file:
                file.read(1)
        results[path] = "read"
    except OSError as error:
        results[path] = type(error).__name__
print(json.dumps(results))
"""


def read_as_nobody(paths: list[Path]) -> dict[str, str]:
    result = subprocess.run(
        # Debian's own Python: the test's interpreter may live where nobody cannot reach.
        ["/usr/bin/python3", "-I", "-c", _PROBE, *map(str, paths)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=True,
    )
    outcome: dict[str, str] = json.loads(result.stdout)
    return outcome


def image_config(root: Path, size: str = "256Mi") -> CsiConfig:
    return configkit.convert(
        {
            "driverName": DRIVER,
            "pool": {"path": str(root / "pool"), "image": str(root / "pool.img"), "size": size},
        },
        CsiConfig,
    )


@pytest.fixture
async def open_root(short_tmp: Path) -> AsyncIterator[Path]:
    """A temp root anyone may enter, so that only the driver's own modes protect its files."""
    short_tmp.chmod(0o755)
    try:
        yield short_tmp
    finally:
        cleanup_below(short_tmp)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_no_file_of_the_driver_is_readable_by_another_user(open_root: Path) -> None:
    driver = CsiDriver(image_config(open_root), open_root / "kubelet", open_root / "state")
    await driver.start()
    volume = driver.pool.volume_path("v" + "1" * 32)
    await driver.pool.provision(volume, None, block=False, size=2**30)
    secret = volume / "secret"
    descriptor = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(descriptor, b"the volume's own data")
    os.close(descriptor)
    os.sync()

    assert mode(open_root / "pool.img") == 0o600
    assert mode(open_root / "state") == 0o700
    state_files = [path for path in driver.store.paths if path.exists()]
    assert state_files
    for path in state_files:
        assert mode(path) == 0o600, path
    for directory in (driver.pool.root, driver.pool.volumes, driver.pool.snapshots):
        assert mode(directory) == 0o700, directory
    probes = [
        open_root / "pool.img",
        open_root / "state",
        *state_files,
        driver.pool.root,
        driver.pool.volumes,
        secret,
    ]
    outcome = read_as_nobody(probes)
    assert all(result == "PermissionError" for result in outcome.values()), outcome
    # The probe itself can read what is meant to be readable.
    assert read_as_nobody([open_root]) == {str(open_root): "read"}


async def test_loose_modes_left_by_an_older_version_are_tightened(open_root: Path) -> None:
    config = image_config(open_root)
    await CsiDriver(config, open_root / "kubelet", open_root / "state").start()
    (open_root / "pool.img").chmod(0o644)
    (open_root / "state").chmod(0o755)
    (open_root / "pool" / "volumes").chmod(0o755)
    await CsiDriver(config, open_root / "kubelet", open_root / "state").start()
    assert mode(open_root / "pool.img") == 0o600
    assert mode(open_root / "state") == 0o700
    assert mode(open_root / "pool" / "volumes") == 0o700


def test_a_private_path_that_is_a_symlink_or_someone_elses_is_refused(short_tmp: Path) -> None:
    real = short_tmp / "real"
    real.mkdir()
    (short_tmp / "link").symlink_to(real)
    with pytest.raises(files.UnsafeFileError, match="symlink"):
        files.private_directory(short_tmp / "link")
    theirs = short_tmp / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(files.UnsafeFileError, match="uid 65534"):
        files.private_directory(theirs)
    image = short_tmp / "image"
    image.write_bytes(b"")
    os.chown(image, NOBODY, NOBODY)
    with pytest.raises(files.UnsafeFileError, match="uid 65534"):
        files.private_file(image)
    with pytest.raises(files.UnsafeFileError, match="not a regular file"):
        files.private_file(real)


async def test_a_pool_image_creation_that_fails_leaves_nothing(open_root: Path) -> None:
    # ext4 (this machine's /tmp) holds files up to 16 TiB: creating the image fails.
    too_big = image_config(open_root, "17Ti")
    driver = CsiDriver(too_big, open_root / "kubelet", open_root / "state")
    with pytest.raises(SetupError, match="cannot hold a file"):
        await driver.start()
    assert not list(open_root.iterdir())
    # Fixed, it starts: nothing from the failed attempt is in the way.
    fixed = CsiDriver(image_config(open_root), open_root / "kubelet", open_root / "state")
    await fixed.start()
    assert fixed.ready


async def test_an_empty_pool_image_from_an_interrupted_creation_is_replaced(
    open_root: Path,
) -> None:
    (open_root / "pool.img").write_bytes(b"")
    driver = CsiDriver(image_config(open_root), open_root / "kubelet", open_root / "state")
    await driver.start()
    assert driver.ready
    assert (open_root / "pool.img").stat().st_size == 256 * 1024**2
