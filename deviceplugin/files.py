"""Files that appear whole: atomic replacement, and Unix sockets bound out of sight.

Atomic replacement: readers see the old file or the new one, never half of one.

Sockets: no other user may find one connectable, not even for an instant, and the
process umask is never touched to get there: worker threads create files and
directories at any moment, and the umask is shared by every thread. So a socket is
bound inside a fresh private directory (0700) beside its path, chmod-ed, then
hard-linked into place, which fails rather than replace anything. The directory's
name starts with a dot: the kubelet's plugin watcher ignores those.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import grpc

# The staging path's length beyond its directory: "/" + mkdtemp's ".XXXXXXXX" + "/s".
_STAGING_SUFFIX = len("/.XXXXXXXX/s")


def bound_path_length(path: Path) -> int:
    """The longest path add_unix_port() binds for a socket at `path` (both must fit sun_path)."""
    return max(len(str(path)), len(str(path.parent)) + _STAGING_SUFFIX)


def add_unix_port(server: grpc.aio.Server, path: Path, mode: int) -> None:
    """Make `server` listen on a new Unix socket at `path`, with `mode` from the start.

    grpc unlinks the path it bound when the server stops, so that is the staging
    name (fresh each time, so it never hits a socket staged later), not `path`:
    whoever stops the server removes `path`, or leaves it, as a killed process would.
    """
    staging = Path(tempfile.mkdtemp(prefix=".", dir=path.parent))
    staged = staging / "s"
    try:
        server.add_insecure_port(f"unix:{staged}")
        staged.chmod(mode)
        os.link(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        staging.rmdir()


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, chmod, rename over `path`, fsync the directory."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).chmod(mode)
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(temporary).unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
