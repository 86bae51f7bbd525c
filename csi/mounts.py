"""Mount table reading, and the mount operations the node service needs (through safepath)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from csi import safepath

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class Mount:
    # The filesystem-relative root of the mount (a bind mount's source directory).
    root: str
    mount_point: str
    options: frozenset[str]
    fs_type: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        after = right.split()
        if len(fields) < 6 or len(after) < 2:
            continue
        mounts.append(
            Mount(
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fs_type=after[0],
                source=_unescape(after[1]),
            )
        )
    return mounts


async def mounts() -> list[Mount]:
    text = await asyncio.to_thread(MOUNTINFO.read_text, encoding="utf-8")
    return parse_mountinfo(text)


async def mounted_at(path: Path) -> Mount | None:
    """The topmost mount at exactly path, if any."""
    found = None
    for mount in await mounts():
        if mount.mount_point == str(path):
            found = mount
    return found


async def bind(
    source: Path,
    root: Path,
    target: Path,
    readonly: bool,
    options: Sequence[str],
    file: bool = False,
) -> None:
    """Bind-mount a path the driver owns (a subvolume, a loop device) at a request path.

    target, beneath root, is created as a directory (or a file) if missing; see safepath.
    """

    def mount() -> None:
        with safepath.cloned(source) as tree:
            attributes = safepath.mount_attributes(options, readonly)
            safepath.attach(tree, root, target, attributes, file)

    await asyncio.to_thread(mount)


async def rebind(
    root: Path, source: Path, target: Path, readonly: bool, options: Sequence[str]
) -> None:
    """Bind-mount what is mounted at one request path (a staging path) at another."""

    def mount() -> None:
        with safepath.cloned_beneath(root, source) as tree:
            attributes = safepath.mount_attributes(options, readonly)
            safepath.attach(tree, root, target, attributes, file=False)

    await asyncio.to_thread(mount)


async def make_directory(root: Path, path: Path) -> None:
    await asyncio.to_thread(safepath.make_directory, root, path, 0o750)


async def unmount(root: Path, path: Path) -> None:
    """Unmount every mount stacked at path (beneath root); lazily if one is busy."""
    # A path that cannot be walked (gone, or through a symlink) has nothing of ours
    # mounted at it, and what a symlink leads to is never touched.
    with contextlib.suppress(safepath.PathError):
        await asyncio.to_thread(safepath.unmount, root, path)


async def remove_mount_point(root: Path, path: Path) -> None:
    """Remove the file or empty directory the driver created as a mount point."""
    await asyncio.to_thread(safepath.remove, root, path)
