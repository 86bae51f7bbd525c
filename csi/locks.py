"""Per-volume and per-name operation locks: a second concurrent call gets ABORTED.

The spec lets a plugin refuse a call while another one on the same volume is in
flight (ABORTED; the CO retries with backoff). Locks are per key, so operations on
different volumes never wait for each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from csi.errors import AbortedError, quoted


class OperationLocks:
    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        """Hold every key for the block, or raise AbortedError if any is held already."""
        busy = [key for key in keys if key in self._held]
        if busy:
            raise AbortedError(f"an operation on {quoted(busy[0])} is already in progress")
        self._held.update(keys)
        try:
            yield
        finally:
            self._held.difference_update(keys)

    def held(self, key: str) -> bool:
        return key in self._held
