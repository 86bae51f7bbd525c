"""Shared fixtures: short temp dirs (Unix socket paths are limited to 107 bytes), root skips."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from deviceplugin.testkit import FakeKubelet


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path; pytest's tmp_path can be too long for socket paths."""
    path = Path(tempfile.mkdtemp(prefix="np-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (mknod, netlink uevents, mounts or loop devices)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
async def kubelet(short_tmp: Path) -> AsyncIterator[FakeKubelet]:
    """A simulated kubelet serving <short_tmp>/kubelet/device-plugins/kubelet.sock."""
    async with FakeKubelet(short_tmp / "kubelet" / "device-plugins") as fake:
        yield fake
