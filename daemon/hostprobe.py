"""Read-only facts about this machine that the CSI pool depends on.

Shared by `nodeplug sandbox` (to say why it leaves CSI out) and `nodeplug doctor`.
Everything is read from /proc and /sys (paths in `Host`, so tests point them at a
made-up node): nothing is mounted, loaded, attached or written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from daemon.mountinfo import Mount


@dataclass(frozen=True, slots=True)
class Host:
    """Where this machine's facts are read from."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    modules: Path = Path("/lib/modules")
    etc: Path = Path("/etc")
    kernel_release: str = os.uname().release

    @property
    def mountinfo(self) -> Path:
        return self.proc / "self" / "mountinfo"


@dataclass(frozen=True, slots=True)
class Finding:
    ok: bool
    detail: str
    remedy: str | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def btrfs(host: Host) -> Finding:
    """Whether the kernel can mount btrfs: built in or loaded, or a module it can load."""
    filesystems = _read(host.proc / "filesystems") or ""
    if any(line.split()[-1:] == ["btrfs"] for line in filesystems.splitlines()):
        return Finding(True, "btrfs is in the running kernel")
    release = host.modules / host.kernel_release
    for index in ("modules.builtin", "modules.dep"):
        text = _read(release / index) or ""
        if any(_is_btrfs_module(line.split(":")[0]) for line in text.splitlines()):
            return Finding(True, f"btrfs module in {release} (loaded at the first mount)")
    return Finding(
        False,
        "this kernel has no btrfs (not in /proc/filesystems, no module)",
        "install the kernel's btrfs module (e.g. linux-modules-extra on Ubuntu) and "
        "`modprobe btrfs`, or use a kernel built with btrfs",
    )


def _is_btrfs_module(path: str) -> bool:
    # kernel/fs/btrfs/btrfs.ko, possibly compressed (.ko.xz, .ko.zst, .ko.gz).
    name = path.rpartition("/")[2]
    return name == "btrfs.ko" or name.startswith("btrfs.ko.")


def free_loop_devices(host: Host) -> list[str]:
    """Loop devices with no file attached (sysfs has no loop/ directory for them)."""
    devices = sorted((host.sys / "block").glob("loop*"))
    return [device.name for device in devices if not (device / "loop").exists()]


def loop_devices(host: Host, needed: int = 1) -> Finding:
    free = free_loop_devices(host)
    total = len(list((host.sys / "block").glob("loop*")))
    control = (host.dev / "loop-control").exists()
    if len(free) >= needed:
        return Finding(True, f"{len(free)} of {total} loop devices free")
    if total == 0 and not control:
        return Finding(
            False,
            "no loop devices and no /dev/loop-control",
            "load the loop module (`modprobe loop`); in a pod, run it privileged",
        )
    return Finding(
        False,
        f"{len(free)} of {total} loop devices free",
        "`losetup -a` lists who holds them: detach one that is no longer needed, or retry later",
    )


def btrfs_quotas_on(host: Host, mount: Mount) -> bool | None:
    """Whether quotas are on for a mounted btrfs (its sysfs dir has qgroups/); None: unknown."""
    device = Path(mount.source).name
    for filesystem in (host.sys / "fs" / "btrfs").glob("*"):
        if (filesystem / "devices" / device).exists():
            return (filesystem / "qgroups").is_dir()
    return None
