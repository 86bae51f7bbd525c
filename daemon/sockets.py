"""gRPC servers on Unix sockets, with the hygiene node-driver-registrar taught us.

- A stale path is removed only if it is a socket: anything else there is an error,
  never something to delete.
- No other user ever finds the socket connectable, not even for an instant, and the
  process umask is never touched: worker threads create files and directories at any
  moment (state, CDI specs, the NFD file), and the umask is shared by every thread
  (deviceplugin.files.add_unix_port says how).
- Whoever stops the server removes its socket.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from deviceplugin.files import add_unix_port

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


class UnixSockets:
    """Serves gRPC on Unix sockets; handed to the plugins, which do not bind sockets themselves.

    Every server also gets the standard gRPC health service (the daemon's liveness
    check calls it); `new_server` makes the servers (the daemon's meter every call).
    """

    mode = SOCKET_MODE

    def __init__(self, new_server: Callable[[], grpc.aio.Server] = grpc.aio.server) -> None:
        self._new_server = new_server

    async def serve(
        self, path: Path, add_services: Callable[[grpc.aio.Server], None]
    ) -> grpc.aio.Server:
        """Start a grpc.aio server listening on the Unix socket `path` (created fresh)."""
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        remove_socket(path)
        server = self._new_server()
        add_services(server)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        add_unix_port(server, path, self.mode)
        try:
            await server.start()
        except BaseException:
            # Cancelled or failed before the caller holds the server: nobody else
            # knows this socket exists.
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
