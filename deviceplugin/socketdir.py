"""Watch the kubelet's device-plugins directory with inotify.

The kubelet tells plugins nothing when it restarts: it deletes every socket in this
directory and creates kubelet.sock again. Both are inotify events; inode numbers are
never compared (filesystems reuse them). One watcher serves every resource plugin.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from asyncinotify import Inotify, Mask

log = logging.getLogger(__name__)

KUBELET_SOCKET = "kubelet.sock"
_WATCH_MASK = (
    Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF
)


@dataclass(frozen=True, slots=True)
class SocketEvent:
    """A name appeared in or vanished from the directory.

    name None means "anything may have changed" (the directory itself was replaced,
    or the kernel's event queue overflowed): subscribers re-check everything.
    """

    name: str | None
    created: bool


class SocketDirWatcher:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ready = asyncio.Event()
        # kubelet.sock created while watching: each one is a kubelet (re)start.
        self.kubelet_starts = 0
        self._subscribers: set[asyncio.Queue[SocketEvent]] = set()

    def subscribe(self) -> asyncio.Queue[SocketEvent]:
        queue: asyncio.Queue[SocketEvent] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[SocketEvent]) -> None:
        self._subscribers.discard(queue)

    def _publish(self, event: SocketEvent) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)

    async def run(self) -> None:
        with Inotify() as inotify:
            while True:
                # The kubelet creates this directory too; whoever is first, the mode is its.
                self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
                current = inotify.add_watch(self.directory, _WATCH_MASK)
                self.ready.set()
                async for event in inotify:
                    if event.watch is not current and not event.mask & Mask.Q_OVERFLOW:
                        continue  # late events of a directory we no longer watch
                    if event.mask & (Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED):
                        log.warning("%s was removed or moved; recreating it", self.directory)
                        if event.mask & Mask.MOVE_SELF:
                            inotify.rm_watch(current)
                        break
                    if event.mask & Mask.Q_OVERFLOW:
                        log.warning("inotify queue overflowed; re-checking all sockets")
                        self._publish(SocketEvent(None, created=False))
                    elif event.name is not None:
                        created = bool(event.mask & (Mask.CREATE | Mask.MOVED_TO))
                        if created and str(event.name) == KUBELET_SOCKET:
                            self.kubelet_starts += 1
                        self._publish(SocketEvent(str(event.name), created))
                self._publish(SocketEvent(None, created=False))
