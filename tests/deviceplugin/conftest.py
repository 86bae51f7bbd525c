"""A daemon and a simulated kubelet, wired over real Unix sockets in a temp dir."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from daemon import config as configuration
from daemon.supervisor import Backends, Daemon


def make_config(root: Path, *plugins: dict[str, Any]) -> configuration.Config:
    return configuration.parse(configuration.confined_to({"devicePlugins": list(plugins)}, root))


@contextlib.asynccontextmanager
async def running(
    config: configuration.Config, backends: Backends | None = None
) -> AsyncIterator[Daemon]:
    """Run a Daemon in this loop for the block; stop it and check it stopped cleanly."""
    if backends is None:
        backends = configuration.create_backends(config)
    daemon = Daemon(config, backends)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
