"""Mount table reading and the mount operations the node service needs."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from csi.errors import CommandError
from csi.system import run

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


async def bind(source: Path, target: Path, readonly: bool, options: list[str]) -> None:
    """Bind-mount source onto target; read-only needs a remount (the kernel ignores ro on bind)."""
    await run("mount", "--bind", "--", str(source), str(target))
    extra = [o for o in options if o not in {"bind", "rw", "ro"}]
    if readonly or extra:
        flags = ",".join(["remount", "bind", "ro" if readonly else "rw", *extra])
        try:
            await run("mount", "-o", flags, "--", str(target))
        except CommandError:
            await unmount(target)
            raise


async def unmount(path: Path) -> None:
    """Unmount every mount stacked at path; lazily if the filesystem is busy."""
    while await mounted_at(path) is not None:
        try:
            await run("umount", "--", str(path))
        except CommandError:
            await run("umount", "-l", "--", str(path))


async def remove_mount_point(path: Path) -> None:
    """Remove the file or empty directory the driver created as a mount point."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            await asyncio.to_thread(path.rmdir)
        else:
            await asyncio.to_thread(path.unlink)
