"""/proc/<pid>/mountinfo, with what the daemon's own tools need from it: propagation.

The CSI driver keeps its own reader (csi/mounts.py); this one also keeps the optional
fields (`shared:N`, `master:N`), which say whether a mount made below a path reaches
other mount namespaces, such as the kubelet's (`nodeplug doctor`), and serves the
sandbox's clean-up. See proc(5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SELF = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class Mount:
    mount_point: Path
    # The filesystem-relative root of the mount (a bind mount's source directory).
    root: str
    fs_type: str
    source: str
    # Optional fields: "shared:N", "master:N", "propagate_from:N", "unbindable".
    tags: tuple[str, ...]

    @property
    def propagation(self) -> str:
        """shared, slave (receives only), private or unbindable, as findmnt names them."""
        kinds = {tag.partition(":")[0] for tag in self.tags}
        if "shared" in kinds:
            return "shared"
        if "master" in kinds:
            return "slave"
        return "unbindable" if "unbindable" in kinds else "private"


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse(text: str) -> list[Mount]:
    """Mounts in the file's order (a mount is listed after the mounts it sits on)."""
    mounts = []
    for line in text.splitlines():
        left, separator, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if not separator or len(fields) < 6 or len(after) < 2:
            continue
        mounts.append(
            Mount(
                mount_point=Path(_unescape(fields[4])),
                root=_unescape(fields[3]),
                fs_type=after[0],
                source=_unescape(after[1]),
                tags=tuple(fields[6:]),
            )
        )
    return mounts


def read(path: Path = SELF) -> list[Mount]:
    return parse(path.read_text(encoding="utf-8", errors="replace"))


def containing(mounts: list[Mount], path: Path) -> Mount | None:
    """The mount `path` lives on: the last listed whose mount point is path or above it."""
    found = None
    for mount in mounts:
        if path.is_relative_to(mount.mount_point) and (
            found is None or len(mount.mount_point.parts) >= len(found.mount_point.parts)
        ):
            found = mount
    return found


def below(mounts: list[Mount], root: Path) -> list[Mount]:
    """Mounts at or below root, innermost (last mounted) first: the order to unmount."""
    return [m for m in reversed(mounts) if m.mount_point.is_relative_to(root)]
