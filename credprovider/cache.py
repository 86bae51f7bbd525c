"""A small on-disk cache of minted registry tokens, so repeated execs do not repeat
network exchanges. One private file per key in the private cache directory, written
atomically; an entry is used only while it has more than a margin of life left.
Writing an entry also removes entries untouched for a day (any token of ours is
re-minted well before that).
"""

from __future__ import annotations

import os
import time

from credprovider.errors import ProviderError
from credprovider.files import private_dir, read_private, write_private
from credprovider.wire import dumps, loads

_PREFIX = "token-"
# A token handed to the kubelet must outlive the pull that uses it.
MARGIN_SECONDS = 30


def _path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{_PREFIX}{key}.json")


def get(cache_dir: str, key: str) -> tuple[str, float] | None:
    """(token, seconds left) for `key` (a hex digest), or None when absent or expiring."""
    path = _path(private_dir(cache_dir), key)
    if not os.path.exists(path):
        return None
    try:
        entry = loads(read_private(path, "token cache").decode())
    except (ValueError, UnicodeDecodeError, ProviderError):
        return None  # damaged or foreign: mint a new one, which replaces it
    if not isinstance(entry, dict):
        return None
    token, expires = entry.get("token"), entry.get("expires")
    if not isinstance(token, str) or not isinstance(expires, str):
        return None
    try:
        left = float(expires) - time.time()
    except ValueError:
        return None
    return (token, left) if left > MARGIN_SECONDS else None


def put(cache_dir: str, key: str, token: str, seconds: float) -> None:
    """Keep `token` for `seconds`; a cache that cannot be written only costs a re-mint."""
    import contextlib  # noqa: PLC0415 - only minting sources get here

    directory = private_dir(cache_dir)
    now = time.time()
    entry = dumps({"token": token, "expires": repr(now + seconds)}).encode()
    with contextlib.suppress(OSError):
        write_private(_path(directory, key), entry)
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.startswith(_PREFIX) and os.stat(path).st_mtime < now - 86400:
                os.unlink(path)
