"""What the sandbox leaves on this machine, released at exit whatever happened before.

Release runs after the event loop has finished (asyncio.run waits for to_thread work),
so a registry started in a thread is known by then, and nothing races it. It touches
only what lies below the sandbox's own directory: mounts there (innermost first) and
loop devices whose backing file is there; never another user's loop device or mount.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from daemon import mountinfo

SYS_BLOCK = Path("/sys/block")
_COMMAND_TIMEOUT = 30


class HostResources:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._callbacks: list[Callable[[], None]] = []

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call `callback` at release (last registered, first called)."""
        self._callbacks.append(callback)

    def release(self) -> list[str]:
        """Stop, unmount, detach and remove; what could not be cleaned, in words."""
        problems = []
        for callback in reversed(self._callbacks):
            try:
                callback()
            except Exception as error:
                problems.append(f"{callback!r}: {error}")
        self._callbacks.clear()
        problems += [
            f"could not unmount {mount.mount_point}"
            for mount in mountinfo.below(mountinfo.read(), self.root)
            if _run("umount", str(mount.mount_point))
            and _run("umount", "-l", str(mount.mount_point))
        ]
        problems += [
            f"could not detach {device}"
            for device in loop_devices_below(self.root)
            if _run("losetup", "-d", device)
        ]
        if any(mountinfo.below(mountinfo.read(), self.root)):
            # Removing files below a mount would remove the mounted filesystem's files.
            problems.append(f"{self.root} is left in place: something is still mounted below it")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems


def loop_devices_below(root: Path, sys_block: Path = SYS_BLOCK) -> list[str]:
    """/dev/loopN devices attached to a file below root."""
    devices = []
    for backing in sorted(sys_block.glob("loop*/loop/backing_file")):
        with contextlib.suppress(OSError):
            name = backing.read_text().strip().removesuffix(" (deleted)")
            if Path(name).is_relative_to(root):
                devices.append(f"/dev/{backing.parent.parent.name}")
    return devices


def _run(*argv: str) -> int:
    """The command's exit status (not found or hung counts as a failure)."""
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 1
    return result.returncode
