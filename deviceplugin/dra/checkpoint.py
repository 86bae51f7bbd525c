"""Prepared claims of one DRA driver, checkpointed so that a restarted daemon keeps its word.

One JSON file under stateDir (0600), replaced atomically on every change. A claim is
recorded once prepared (its CDI spec written), with the answer the kubelet got: after a
restart it is answered from here, never prepared twice, and Unprepare finds it. A crash
before the record leaves at most the claim's CDI spec file, named by its UID: the
driver deletes specs the checkpoint does not know at start, and the kubelet, which got
no answer, calls Prepare again. No intent record is needed: preparing has no other
side effect to undo (the backend's allocate hook returns edits, it holds nothing).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deviceplugin.files import write_atomically

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class PreparedDevice:
    """One device of a prepared claim, as the kubelet is told of it."""

    requests: tuple[str, ...]
    pool: str
    device: str
    cdi_ids: tuple[str, ...]


@dataclass(slots=True)
class ClaimRecord:
    namespace: str
    name: str
    devices: list[PreparedDevice] = field(default_factory=list)


class CheckpointError(Exception):
    pass


class Checkpoint:
    """The records, in memory and on disk.

    `document()` renders the records on the event loop (they change there);
    `write()` puts a rendering on disk and belongs in a thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.claims: dict[str, ClaimRecord] = {}

    def load(self) -> None:
        """Read the file if there is one; a file we cannot trust stops the driver."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot read the DRA checkpoint {self.path}: {error}") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{self.path}: unknown checkpoint format")
        try:
            self.claims = {uid: _record(raw) for uid, raw in data["claims"].items()}
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{self.path}: malformed record: {error!r}") from None

    def document(self) -> bytes:
        document = {
            "version": FORMAT_VERSION,
            "claims": {uid: asdict(record) for uid, record in sorted(self.claims.items())},
        }
        return json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"

    def write(self, document: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomically(self.path, document, mode=0o600)


def _record(raw: dict[str, Any]) -> ClaimRecord:
    devices = [
        PreparedDevice(tuple(d["requests"]), d["pool"], d["device"], tuple(d["cdi_ids"]))
        for d in raw["devices"]
    ]
    return ClaimRecord(raw["namespace"], raw["name"], devices)
