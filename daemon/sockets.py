"""gRPC servers on Unix sockets, with the hygiene node-driver-registrar taught us.

- A stale path is removed only if it is a socket: anything else there is an error,
  never something to delete.
- No other user ever finds the socket connectable, not even for an instant, and the
  process umask is never touched: worker threads create files and directories at any
  moment (state, CDI specs, the NFD file), and the umask is shared by every thread.
  So the socket is bound inside a fresh private directory (0700) beside its path,
  chmod-ed, then hard-linked into place, which fails rather than replace anything.
  The directory's name starts with a dot: the kubelet's plugin watcher ignores those.
- Whoever stops the server removes its socket.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

SOCKET_MODE = 0o600


class SocketPathError(OSError):
    pass


def remove_socket(path: Path) -> None:
    """Remove path if it is a socket; do nothing if it is gone; refuse anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


# The staging path's length beyond its directory: "/" + mkdtemp's ".XXXXXXXX" + "/s".
_STAGING_SUFFIX = len("/.XXXXXXXX/s")


def bound_path_length(path: Path) -> int:
    """The longest path serve() binds for a socket at `path` (both must fit sun_path)."""
    return max(len(str(path)), len(str(path.parent)) + _STAGING_SUFFIX)


class UnixSockets:
    """Serves gRPC on Unix sockets; handed to the plugins, which do not bind sockets themselves.

    Every server also gets the standard gRPC health service (the daemon's liveness
    check calls it) and the given interceptors (metrics, request ids).
    """

    mode = SOCKET_MODE

    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self._interceptors = list(interceptors)

    async def serve(
        self, path: Path, add_services: Callable[[grpc.aio.Server], None]
    ) -> grpc.aio.Server:
        """Start a grpc.aio server listening on the Unix socket `path` (created fresh)."""
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        remove_socket(path)
        server = grpc.aio.server(interceptors=self._interceptors)
        add_services(server)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        # grpc unlinks the path it bound when the server stops: a fresh name each time
        # keeps that from ever hitting a socket staged later.
        staging = Path(tempfile.mkdtemp(prefix=".", dir=path.parent))
        staged = staging / "s"
        try:
            server.add_insecure_port(f"unix:{staged}")
            staged.chmod(self.mode)
            os.link(staged, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            staging.rmdir()
        try:
            await server.start()
        except BaseException:
            # Cancelled or failed before the caller holds the server: nobody else
            # knows this socket exists (grpc would only unlink the staging name).
            remove_socket(path)
            raise
        return server

    async def stop(self, server: grpc.aio.Server, path: Path, grace: float | None) -> None:
        """Stop serving (in-flight calls get `grace` seconds) and remove the socket."""
        await server.stop(grace)
        with contextlib.suppress(SocketPathError):
            remove_socket(path)

    def is_socket(self, path: Path) -> bool:
        return is_socket(path)
