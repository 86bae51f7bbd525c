"""Running storage commands (mount, btrfs, losetup, mkfs) without blocking the loop."""

from __future__ import annotations

import asyncio
import logging

from csi.errors import CommandError

log = logging.getLogger(__name__)

# A storage command that hangs (a stuck device) must not hang an RPC forever.
COMMAND_TIMEOUT = 120.0


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
