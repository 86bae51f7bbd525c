"""CSI on this node: btrfs, loop devices, the pool, file modes, mount propagation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from csi.config import PoolConfig
from csi.state import STATE_FILES
from daemon import hostprobe, mountinfo
from daemon.config import Config
from daemon.doctor.report import Report, Section
from daemon.hostprobe import Host

# Below this share of the pool free, volumes may meet ENOSPC before their quota.
LOW_FREE_SHARE = 0.10
GiB = 1024**3


def _size(size: float) -> str:
    return f"{size / GiB:.1f} GiB"


def check(report: Report, config: Config, host: Host) -> None:
    section = report.section("CSI")
    if config.csi is None:
        section.skip("driver", "off (no csi: section in the config)")
        return
    csi = config.csi
    if csi.pool is None:
        section.skip(
            "driver",
            f"csi.mode: {csi.mode} serves expansion requests on {config.csi_socket} and "
            "needs no storage here",
        )
        return
    pool = csi.pool
    finding = hostprobe.btrfs(host)
    _add(section, "btrfs", finding)
    # A pool image needs a loop device; otherwise only block volumes do.
    finding = hostprobe.loop_devices(host)
    if finding.ok or pool.image is not None:
        _add(section, "loop devices", finding)
    else:
        section.warn(
            "loop devices", finding.detail + ": block volumes cannot stage", finding.remedy
        )
    mounts = mountinfo.read(host.mountinfo)
    _check_pool(section, pool, mounts, host)
    _check_modes(section, pool, config.state_dir)
    _check_propagation(section, config.kubelet_dir, mounts)


def _add(section: Section, name: str, finding: hostprobe.Finding) -> None:
    if finding.ok:
        section.ok(name, finding.detail)
    else:
        section.fail(name, finding.detail, finding.remedy)


def _check_pool(
    section: Section, pool: PoolConfig, mounts: list[mountinfo.Mount], host: Host
) -> None:
    mount = next((m for m in reversed(mounts) if m.mount_point == pool.path), None)
    if mount is None:
        if pool.image is None:
            section.fail(
                "pool",
                f"{pool.path} is not a mount point (it must be a mounted btrfs filesystem)",
                "mount a btrfs filesystem there, or set csi.pool.image and size so that the "
                "daemon makes one",
            )
            return
        _check_future_image(section, pool.image, pool.size or 0)
        return
    if mount.fs_type != "btrfs":
        section.fail(
            "pool",
            f"{pool.path} is {mount.fs_type} on {mount.source}, not btrfs",
            f"mount a btrfs filesystem at {pool.path}",
        )
        return
    section.ok("pool", f"{pool.path}: btrfs on {mount.source}")
    quotas = hostprobe.btrfs_quotas_on(host, mount)
    if quotas:
        section.ok("quotas", "on (volume capacities are enforced)")
    else:
        state = "off" if quotas is False else "unknown (no sysfs entry for the device)"
        section.warn(
            "quotas",
            state,
            f"the daemon turns them on when it starts; by hand: btrfs quota enable {pool.path}",
        )
    stats = os.statvfs(pool.path)
    total, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
    detail = f"{_size(free)} free of {_size(total)}"
    if total and free / total < LOW_FREE_SHARE:
        section.warn("free space", detail, "grow the pool or delete volumes and snapshots")
    else:
        section.ok("free space", detail)


def _check_future_image(section: Section, image: Path, size: int) -> None:
    """A pool the daemon will make (or mount) from an image at start."""
    state = "exists" if image.exists() else f"is made ({_size(size)}, sparse)"
    section.ok(
        "pool", f"not mounted yet: the daemon mounts {image} at start ({image.name} {state})"
    )
    parent = next((p for p in (image, *image.parents) if p.exists()), Path("/"))
    stats = os.statvfs(parent)
    free = stats.f_bavail * stats.f_frsize
    if free < size:
        section.warn(
            "free space",
            f"{_size(free)} free under {parent}, less than the pool's {_size(size)}",
            "the image is sparse: writes fail with ENOSPC once that space is gone",
        )
    else:
        section.ok("free space", f"{_size(free)} free under {parent} for a {_size(size)} pool")


def _mode_problem(path: Path, private: bool) -> str | None:
    """What is too loose about path's mode; private: group and others get nothing."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(info.st_mode)
    loose = mode & (0o077 if private else 0o022)
    if not loose:
        return None
    return f"{path} is {mode:04o}"


def _check_modes(section: Section, pool: PoolConfig, state_dir: Path) -> None:
    # DESIGN: files holding data or state 0600, their directories 0700.
    candidates = [
        (pool.path, True),
        (pool.path / "volumes", True),
        (pool.path / "snapshots", True),
        (state_dir, True),
        *((state_dir / name, True) for name in STATE_FILES),
    ]
    if pool.image is not None:
        candidates.append((pool.image, True))
    problems = [p for path, private in candidates if (p := _mode_problem(path, private))]
    if problems:
        section.fail(
            "file modes",
            "; ".join(problems) + ": others can read volumes' data or the driver's state",
            "chmod 700 the directories and 600 the files (the daemon makes them so)",
        )
    else:
        section.ok("file modes", "pool, its volumes and the state are private to root")


def _check_propagation(section: Section, kubelet_dir: Path, mounts: list[mountinfo.Mount]) -> None:
    mount = mountinfo.containing(mounts, kubelet_dir)
    if mount is None:
        section.warn("propagation", f"no mount holds {kubelet_dir} in this mount namespace")
        return
    where = f"{kubelet_dir} is on {mount.mount_point} ({mount.propagation})"
    if mount.propagation == "shared":
        section.ok("propagation", where + ": the kubelet sees the volumes mounted here")
        return
    section.fail(
        "propagation",
        where + ": volumes mounted here stay invisible to the kubelet",
        "mount the kubelet directory into the pod with mountPropagation: Bidirectional "
        "(the host side must be shared: findmnt -o TARGET,PROPAGATION /)",
    )
