"""Create operations that outlive the call that started them.

csi-provisioner and csi-snapshotter give each CreateVolume and CreateSnapshot
call a deadline (their --timeout) and take DEADLINE_EXCEEDED to mean "maybe still
in progress": they call again with the same name and parameters until they get
an answer (isFinalError in both sidecars). grpc.aio cancels the handler when the
deadline passes; if the operation were cancelled with it, its work would be
undone and an operation slower than the deadline could never finish. So each
create runs in a task of its own, keyed by its name: the handler waits for it
shielded, a call with the same name that comes while it runs waits for the same
task, and one that comes after it finished finds its result recorded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from csi.errors import AbortedError
from csi.state import Status

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Record(Protocol):
    status: Status


class Operations:
    def __init__(self) -> None:
        self._running: dict[str, tuple[asyncio.Task[Any], object]] = {}

    def running(self, key: str, kind: type[T]) -> T | None:
        """The record the operation in flight under key works on, if there is one.

        Its task records it in the state only once it runs: a call with the same name
        that comes in between finds it here, not there.
        """
        entry = self._running.get(key)
        return entry[1] if entry is not None and isinstance(entry[1], kind) else None

    def start(self, key: str, subject: object, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run work under key until it is done, whatever happens to the caller."""
        task = asyncio.create_task(work, name=key)
        self._running[key] = (task, subject)
        task.add_done_callback(lambda done: self._finished(key, done))
        return task

    async def settled(self, key: str, record: _Record, what: str) -> None:
        """Return once the record found (or just started) under key is ready.

        A record being created under key is waited for, shielded: a caller whose
        deadline passes leaves the operation running. It is waited for to its end,
        even once its record is READY: the result is in place only then. A record
        being deleted, or one no operation is working on, is ABORTED (the CO retries).
        """
        entry = self._running.get(key)
        if entry is not None and entry[1] is record:
            await asyncio.shield(entry[0])
        elif record.status is not Status.READY:
            raise AbortedError(f"{what} is being created or deleted")

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._running.get(key, (None,))[0] is task:
            del self._running[key]
        if not task.cancelled() and (error := task.exception()) is not None:
            # Its callers get the error too, if any is still waiting.
            log.info("an operation failed", extra={"operation": key, "error": str(error)})

    async def stop(self) -> None:
        """Cancel what is in flight (the driver stops); each undoes its work or, after a
        crash, the reconciler does at the next start."""
        tasks = [task for task, _ in self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
