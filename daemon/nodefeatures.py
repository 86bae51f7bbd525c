"""A Node Feature Discovery local feature file: node labels without API access.

nfd-worker reads every file in features.d/ and turns each `name=value` line into the
label feature.node.kubernetes.io/<name>=<value>. nodeplug writes one line per device
resource (its healthy physical devices) and one for its CSI driver.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from deviceplugin.files import write_atomically

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# Label names (after the feature.node.kubernetes.io/ prefix) and values: at most 63 characters.
_MAX = 63
_DEBOUNCE_SECONDS = 0.1


def feature_name(kind: str, name: str) -> str:
    readable = f"nodeplug-{kind}-" + _UNSAFE.sub("-", name.replace("/", "."))
    if len(readable) <= _MAX:
        return readable
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{readable[: _MAX - 11]}-{digest}"


def render(resources: Mapping[str, int], csi_driver: str | None) -> str:
    lines = ["# Written by nodeplug; rewritten whenever its devices change."]
    lines += [
        f"{feature_name('resource', name)}={count}" for name, count in sorted(resources.items())
    ]
    if csi_driver is not None:
        lines.append(f"{feature_name('csi', csi_driver)}=true")
    return "\n".join(lines) + "\n"


class NodeFeatureFile:
    """Rewrites the file when told something changed (debounced), from a snapshot function."""

    def __init__(self, path: Path, snapshot: Callable[[], tuple[Mapping[str, int], str | None]]):
        self.path = path
        self._snapshot = snapshot
        self._changed = asyncio.Event()
        self._written: str | None = None

    def changed(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        while True:
            resources, csi_driver = self._snapshot()
            text = render(resources, csi_driver)
            if text != self._written:
                await asyncio.to_thread(write_atomically, self.path, text.encode())
                self._written = text
            await self._changed.wait()
            await asyncio.sleep(_DEBOUNCE_SECONDS)
            self._changed.clear()
