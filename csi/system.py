"""Storage commands and ioctls (mkfs, mount -o loop; btrfs and loop devices) for the driver.

Hot paths (every create, delete, stage and publish) use ioctls: one costs 0.01-0.1
ms where spawning a command costs 1-1.4 ms and a watcher thread. Commands remain
where a filesystem needs its helpers (mkfs, mount of the pool image); those run
through `run`, which never blocks the loop. The ioctls are synchronous and quick
but may wait on the filesystem (a transaction commit): callers run them in a
thread (asyncio.to_thread).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging

from csi.errors import CommandError

log = logging.getLogger(__name__)

# A storage command that hangs (a stuck device) must not hang an RPC forever.
COMMAND_TIMEOUT = 120.0

# _IOC() of the kernel's asm-generic/ioctl.h: direction, size, type and number in one word.
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def ioc(direction: int, kind: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | number


def io(kind: int, number: int) -> int:
    return ioc(_IOC_NONE, kind, number, 0)


def iow(kind: int, number: int, size: int) -> int:
    return ioc(_IOC_WRITE, kind, number, size)


def ior(kind: int, number: int, size: int) -> int:
    return ioc(_IOC_READ, kind, number, size)


def iowr(kind: int, number: int, size: int) -> int:
    return ioc(_IOC_READ | _IOC_WRITE, kind, number, size)


class SyscallError(CommandError):
    """An ioctl or system call on storage failed; `errno` says how."""

    def __init__(self, what: str, error: OSError) -> None:
        super().__init__(f"{what}: {error.strerror}")
        self.errno = error.errno


# What an ioctl takes: a structure or a number the kernel reads and fills in place, or a value.
Argument = ctypes.Structure | ctypes.c_uint64 | ctypes.c_uint | int


def ioctl(descriptor: int, request: int, argument: Argument, what: str) -> int:
    """ioctl(2) with a structure the kernel reads and fills in place, or an integer."""
    try:
        if isinstance(argument, int):
            return fcntl.ioctl(descriptor, request, argument)
        return int(fcntl.ioctl(descriptor, request, argument, True))
    except OSError as error:
        raise SyscallError(what, error) from None


async def run(*argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run argv (never through a shell); return stdout; raise CommandError on failure."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except BaseException:
        # Cancelled or timed out: the command must not outlive the request.
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if check and process.returncode != 0:
        message = stderr.decode(errors="replace").strip() or f"exit status {process.returncode}"
        raise CommandError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''}: {message}")
    log.debug("ran %s", argv)
    return stdout.decode(errors="replace")
