"""Watch the kubelet's device-plugins directory with inotify.

The kubelet tells plugins nothing when it restarts: it deletes every socket in this
directory and creates kubelet.sock again. Both are inotify events; inode numbers are
never compared (filesystems reuse them). One watcher serves every resource plugin.
"""

from __future__ import annotations

import asyncio
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from asyncinotify import Inotify, Mask

log = logging.getLogger(__name__)

# k8s.io/kubelet pkg/apis/deviceplugin/v1beta1/constants.go, DevicePluginPath: the device
# manager serves kubelet.sock here whatever the kubelet's --root-dir. k0s moves the root
# dir to /var/lib/k0s/kubelet and MicroK8s to /var/snap/microk8s/common/var/lib/kubelet;
# plugins_registry/ and plugins/ move with it, device-plugins/ does not.
DEVICE_PLUGIN_PATH = Path("/var/lib/kubelet/device-plugins")
KUBELET_SOCKET = "kubelet.sock"
_WHERE_HINT = f"the kubelet serves kubelet.sock in {DEVICE_PLUGIN_PATH} whatever its --root-dir"
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
    """Publishes what appears in and vanishes from one directory to every subscriber.

    expect_kubelet: the directory is where the kubelet serves kubelet.sock; say so,
    once each time the watcher starts waiting for it, since a daemon that waits in
    silence looks like one that works (a kubelet with another --root-dir still
    serves it in /var/lib/kubelet/device-plugins).
    """

    def __init__(self, directory: Path, *, expect_kubelet: bool = False) -> None:
        self.directory = directory
        self.expect_kubelet = expect_kubelet
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

    @property
    def kubelet_socket(self) -> Path:
        return self.directory / KUBELET_SOCKET

    def kubelet_present(self) -> bool:
        try:
            return stat.S_ISSOCK(self.kubelet_socket.lstat().st_mode)
        except FileNotFoundError:
            return False

    def _announce_wait(self, message: str) -> None:
        if self.expect_kubelet and not self.kubelet_present():
            log.info(message, extra={"socket": str(self.kubelet_socket), "hint": _WHERE_HINT})

    async def run(self) -> None:
        with Inotify() as inotify:
            while True:
                # The kubelet creates this directory too; whoever is first, the mode is its.
                self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
                current = inotify.add_watch(self.directory, _WATCH_MASK)
                self.ready.set()
                self._announce_wait("waiting for the kubelet: no kubelet.sock yet")
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
                        if str(event.name) == KUBELET_SOCKET:
                            if created:
                                self.kubelet_starts += 1
                            else:
                                self._announce_wait("waiting for the kubelet: kubelet.sock removed")
                        self._publish(SocketEvent(str(event.name), created))
                self._publish(SocketEvent(None, created=False))
