"""Shared fixtures: short temp dirs (Unix socket paths are limited to 107 bytes), root skips,
and every test run at debug log level through the daemon's own formatter."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from daemon.logs import JsonFormatter
from deviceplugin.testkit import FakeKubelet


class _FormattingHandler(logging.Handler):
    """Formats each record as `nodeplug run` would and keeps every failure to do so.

    logging only prints a handler's errors to stderr; a test must fail on them.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.format(record)
        except Exception as error:
            self.failures.append(f"{record.name}: {record.msg!r}: {error!r}")


@pytest.fixture(autouse=True)
def _debug_logging() -> Iterator[None]:
    """Run every test with the root logger at DEBUG.

    A debug call is only turned into a record when its level is enabled, so a bad
    `extra=` (a reserved LogRecord key such as "name") kills the daemon only under
    `--log-level debug`: at the default level no test would see it.
    """
    root = logging.getLogger()
    handler = _FormattingHandler()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert not handler.failures, handler.failures


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
    """A simulated kubelet serving <short_tmp>/device-plugins/kubelet.sock.

    Beside <short_tmp>/kubelet (the root dir), as confined_to() puts devicePluginDir:
    the real kubelet's device-plugin directory does not follow its --root-dir.
    """
    async with FakeKubelet(short_tmp / "device-plugins") as fake:
        yield fake
