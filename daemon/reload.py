"""Live reload: SIGHUP, or any change of the config file, applies the new config.

A ConfigMap mounted as a volume changes by an atomic swap of its `..data` symlink, an
editor by writing in place or renaming a temp file over it: watching the directory
catches all three. A new config that cannot be built, for whatever reason (validation,
a backend that fails to import or to start), is rejected with its reasons and the
running one stays in force: a reload never stops the daemon. Only the backends of
resources that start anew are built.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from asyncinotify import Inotify, Mask

from csi.config import Mode as CsiMode
from daemon import config as configuration

if TYPE_CHECKING:
    from daemon.supervisor import Daemon

log = logging.getLogger(__name__)

_DIRECTORY_EVENTS = Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.CREATE | Mask.DELETE
# Editors and kubelet volume updates touch a file several times in a burst.
_SETTLE_SECONDS = 0.1


class ConfigReloader:
    def __init__(self, path: Path, csi_mode: CsiMode | None = None) -> None:
        self.path = path
        # The CSI mode the command serves (`nodeplug controller`): every reload keeps it.
        self.csi_mode = csi_mode
        self._requested = asyncio.Event()
        # One reload at a time: two applying at once would stop the same units twice.
        self._reloading = asyncio.Lock()

    def request(self) -> None:
        """Reload soon (the SIGHUP handler)."""
        self._requested.set()

    async def run(self, daemon: Daemon) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch_file())
            while True:
                await self._requested.wait()
                await asyncio.sleep(_SETTLE_SECONDS)
                self._requested.clear()
                await self.reload(daemon)

    async def reload(self, daemon: Daemon) -> str:
        """Load, validate and apply the file; return "applied", "unchanged" or "rejected"."""
        async with self._reloading:
            return await self._reload(daemon)

    async def _reload(self, daemon: Daemon) -> str:
        source = str(self.path)
        try:
            config = configuration.load(self.path, self.csi_mode)
            if config == daemon.config:
                backends = None
            else:
                starting = daemon.plugins_to_start(config)
                backends = configuration.create_backends(config, source, only=starting)
        except configuration.ConfigError as error:
            log.error(  # noqa: TRY400 - a bad file is expected input, not a crash to trace
                "new config rejected; the running config stays in force",
                extra={"config": source, "problems": error.problems},
            )
            result = "rejected"
        except Exception:
            log.exception(
                "new config could not be built; the running config stays in force",
                extra={"config": source},
            )
            result = "rejected"
        else:
            if backends is None:
                result = "unchanged"
            else:
                await daemon.apply(config, backends)
                result = "applied"
        daemon.metrics.reloads.labels(result).inc()
        log.info("config reload", extra={"result": result})
        return result

    async def _watch_file(self) -> None:
        directory = self.path.parent
        with Inotify() as inotify:
            inotify.add_watch(directory, _DIRECTORY_EVENTS)
            async for event in inotify:
                name = str(event.name) if event.name is not None else ""
                if name == self.path.name or name.startswith(".."):
                    self._requested.set()
