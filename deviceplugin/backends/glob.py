"""`glob` backend: every character or block device node matching path globs is a device.

    backend: glob
    config:
      paths: ["/dev/widget*", "/dev/accel/accel*"]
      permissions: rw            # cgroup permissions in the container (r, w, m)
      containerDir: /dev/widgets  # optional: where nodes appear in the container

Hotplug and removal are inotify events on the directories the globs can match in
(including parents that do not exist yet), so a new node is seen within milliseconds
and nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import itertools
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import msgspec
from asyncinotify import Inotify, Mask, Watch

from deviceplugin import configkit
from deviceplugin.backend import Device, DeviceNode
from deviceplugin.backends.common import (
    NumaNodes,
    Permissions,
    collection_paused,
    device_id,
    device_ids,
    new_device,
)

log = logging.getLogger(__name__)

_DIR_EVENTS = (
    Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.ONLYDIR
)
_KINDS = {stat.S_IFCHR: "char", stat.S_IFBLK: "block"}
# Coalesce a burst of events (a driver creating many nodes) into one snapshot.
_SETTLE_SECONDS = 0.002


class AbsolutePattern(configkit.Checked):
    @classmethod
    def check(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must be an absolute path pattern")
        if "\0" in value or "/../" in f"{value}/" or "/./" in f"{value}/":
            raise ValueError(f"{value!r} must be a plain absolute pattern (no '..', '.', NUL)")
        return os.path.normpath(value)


class GlobConfig(configkit.Section, frozen=True):
    paths: Annotated[list[AbsolutePattern], msgspec.Meta(min_length=1)]
    permissions: Permissions = Permissions("rw")
    container_dir: AbsolutePattern | None = None


def _static_base(pattern: str) -> str:
    """The directory above the first wildcard: device ids are paths relative to it."""
    parts = PurePosixPath(pattern).parts
    static = [p for p in itertools.takewhile(lambda part: not glob.has_magic(part), parts)]
    return str(PurePosixPath(*static[: len(parts) - 1]))


def _matching_nodes(pattern: str) -> Iterator[tuple[str, tuple[str, int]]]:
    """The device nodes glob.glob(pattern) finds, sorted, each with its kind ("char" or
    "block") and device number (symlinks followed); other files are left out.

    The last component is matched against a listing of each directory and each match
    stat-ed relative to it: glob's per-name overhead and full-path lookups would
    dominate a scan of tens of thousands of nodes. Names are sorted before the stats,
    and only the two numbers of each stat are kept: on a start with tens of thousands
    of nodes, each object kept is one more the garbage collector walks.
    """
    directory_pattern, _, name_pattern = pattern.rpartition("/")
    directory_pattern = directory_pattern or "/"
    directories = [directory_pattern]
    if glob.has_magic(directory_pattern):
        # Sorting by the directory and then by the name within sorts by the whole path
        # when every directory ends in "/": directories of one pattern are equally deep,
        # so none of these prefixes is a prefix of another.
        directories = sorted(f"{d.rstrip('/')}/" for d in glob.glob(directory_pattern))
    match = re.compile(fnmatch.translate(name_pattern)).match
    hidden = name_pattern.startswith(".")  # as glob: a dot matches only a dot
    for directory in directories:
        try:
            descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue  # gone, or not a directory
        try:
            names = os.listdir(descriptor)  # noqa: PTH208 - names relative to the descriptor
            names.sort()
            prefix = f"{directory.rstrip('/')}/"
            for name in names:
                if match(name) is None or (name[0] == "." and not hidden):
                    continue
                try:
                    status = os.stat(name, dir_fd=descriptor)
                except OSError:
                    continue  # removed while we looked
                kind = _KINDS.get(stat.S_IFMT(status.st_mode))
                if kind is not None:
                    yield prefix + name, (kind, status.st_rdev)
        finally:
            os.close(descriptor)


def _levels(pattern: str) -> tuple[list[str], list[str]]:
    """Directory patterns to watch, and the patterns an interesting entry matches.

    For /dev/dri/card*: watch /, /dev, /dev/dri; entries of interest are /dev,
    /dev/dri and /dev/dri/card* (a parent appearing matters as much as a node).
    """
    parts = PurePosixPath(pattern).parts
    prefixes = [str(PurePosixPath(*parts[: i + 1])) for i in range(len(parts))]
    return prefixes[:-1], prefixes[1:]


class GlobBackend:
    def __init__(self, config: GlobConfig) -> None:
        self.config = config
        levels = [_levels(p) for p in config.paths]
        self._dir_patterns = sorted({d for dirs, _ in levels for d in dirs})
        self._entry_patterns = sorted({e for _, entries in levels for e in entries})

    def scan(self) -> list[Device]:
        with collection_paused():  # every device made lives on: nothing to collect
            return self._scan()

    def _scan(self) -> list[Device]:
        # Per node only what must be: a scan may meet tens of thousands. Ids and NUMA
        # nodes are found for a whole pattern's nodes at once (at C speed where it can
        # be), and devices are made without the dataclass's __init__ (new_device).
        numa = NumaNodes()
        permissions, container_dir = self.config.permissions, self.config.container_dir
        devices: dict[str, Device] = {}
        for pattern in self.config.paths:
            found = list(_matching_nodes(pattern))
            if not found:
                continue
            paths, numbers = zip(*found, strict=True)
            base = _static_base(pattern)
            prefix = base if base.endswith("/") else f"{base}/"
            # Paths keep the pattern's literal prefix as it is written.
            ids = device_ids([path.removeprefix(prefix).replace("/", "-") for path in paths])
            for identifier, path, numa_node in zip(
                ids, paths, numa.of_numbers(numbers), strict=True
            ):
                if identifier in devices:  # two patterns, same relative name: the whole path
                    identifier = device_id(path.lstrip("/").replace("/", "-"))  # noqa: PLW2901
                    if identifier in devices:
                        continue
                container_path = None
                if container_dir is not None:
                    container_path = f"{container_dir}/{path.rpartition('/')[2]}"
                node = DeviceNode(path, container_path, permissions)
                devices[identifier] = new_device(identifier, numa_node, (node,))
        return list(devices.values())

    def _watch_dirs(self, inotify: Inotify, watches: dict[str, Watch]) -> None:
        wanted = {
            d for pattern in self._dir_patterns for d in glob.glob(pattern) if Path(d).is_dir()
        }
        for directory in wanted - watches.keys():
            try:
                watches[directory] = inotify.add_watch(directory, _DIR_EVENTS)
            except OSError as error:  # vanished, or not a directory after all
                log.debug("cannot watch %s: %s", directory, error)
        for directory in watches.keys() - wanted:
            with contextlib.suppress(OSError):
                inotify.rm_watch(watches.pop(directory))

    def _interesting(self, path: Path | None) -> bool:
        return path is None or any(fnmatch.fnmatchcase(str(path), p) for p in self._entry_patterns)

    async def watch(self) -> AsyncIterator[list[Device]]:
        # sync_timeout=0: sync_get() polls. asyncinotify 4.4 defines InitFlags.NONBLOCK as
        # O_CLOEXEC, so the fd blocks and draining must not rely on EAGAIN.
        with Inotify(sync_timeout=0) as inotify:
            watches: dict[str, Watch] = {}
            while True:
                # Watch first, then scan: a node created in between is in the scan or an event.
                self._watch_dirs(inotify, watches)
                yield await asyncio.to_thread(self.scan)
                await self._next_change(inotify, watches)

    async def _next_change(self, inotify: Inotify, watches: dict[str, Watch]) -> None:
        """Wait for an event that can change the scan, then take the rest of its burst."""
        while True:
            event = await inotify.get()
            if event.mask & Mask.IGNORED:
                _forget(watches, event.watch)
                break
            if self._interesting(event.path):
                break
        await asyncio.sleep(_SETTLE_SECONDS)
        while (queued := inotify.sync_get()) is not None:
            if queued.mask & Mask.IGNORED:
                _forget(watches, queued.watch)


def _forget(watches: dict[str, Watch], gone: Watch | None) -> None:
    """Drop a watch the kernel removed (its directory was deleted)."""
    for directory, watch in list(watches.items()):
        if watch is gone:
            del watches[directory]


def create(config: Mapping[str, Any]) -> GlobBackend:
    return GlobBackend(configkit.convert(config, GlobConfig))
