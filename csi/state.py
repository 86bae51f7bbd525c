"""The driver's one state store: volumes, snapshots, stagings and publications.

It lives in one JSON file under stateDir, replaced atomically on every change
(temp file, fsync, rename, fsync of the directory), so a crash leaves either the
old or the new state, never a torn one. The file each write replaces stays
beside it as csi-state.json.prev: if the current one is damaged anyway (a disk,
an editor), the one before the last change is there to recover from. Records
carry a status: an operation first records its intent ("pending"), then does
the work, then records "ready"; after a crash the reconciler finishes or undoes
whatever is still pending. A file the driver cannot read stops the driver
(StateFileError) rather than being taken for an empty state, which would
forget every volume.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from csi.errors import NotFoundError, SetupError
from csi.files import private_directory

STATE_FILE = "csi-state.json"
PREVIOUS_SUFFIX = ".prev"
FORMAT_VERSION = 1


class Status(StrEnum):
    PENDING = "pending"
    READY = "ready"
    DELETING = "deleting"


class _Record(Protocol):
    status: Status


Rec = TypeVar("Rec", bound=_Record)
# A record and where it lives: (table, key, record).
Entry = tuple[dict[str, Any], str, _Record]


@dataclass(slots=True)
class VolumeRecord:
    id: str
    name: str
    capacity: int
    block: bool
    parameters: dict[str, str]
    # "snapshot:<id>" or "volume:<id>" when pre-populated, else "".
    source: str
    created: float
    status: Status = Status.PENDING


@dataclass(slots=True)
class SnapshotRecord:
    id: str
    # "" for a member of a group snapshot: those are found through their group.
    name: str
    source_volume_id: str
    size: int
    created: float
    status: Status = Status.PENDING
    group_snapshot_id: str = ""


@dataclass(slots=True)
class GroupSnapshotRecord:
    id: str
    name: str
    source_volume_ids: list[str]
    # One member snapshot per source volume, in the same order.
    snapshot_ids: list[str]
    created: float
    status: Status = Status.PENDING


@dataclass(slots=True)
class StageRecord:
    volume_id: str
    path: str
    # The capability it was staged with, to tell a repeat from a conflict.
    capability: str
    loop_device: str = ""
    status: Status = Status.PENDING


@dataclass(slots=True)
class PublishRecord:
    volume_id: str
    path: str
    staging_path: str
    capability: str
    readonly: bool
    # A read-only block publication's own read-only loop device (see node._publish).
    loop_device: str = ""
    status: Status = Status.PENDING


R = TypeVar("R")


def _load_records(kind: type[R], items: object) -> dict[str, R]:
    if not isinstance(items, dict):
        raise TypeError(f"{kind.__name__}: expected a mapping")
    names = {f.name for f in fields(kind)}  # type: ignore[arg-type]
    return {
        key: kind(**{k: v for k, v in value.items() if k in names}) for key, value in items.items()
    }


@dataclass(slots=True)
class State:
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)
    snapshots: dict[str, SnapshotRecord] = field(default_factory=dict)
    # Keyed by staging path / target path: one volume per path.
    stagings: dict[str, StageRecord] = field(default_factory=dict)
    publications: dict[str, PublishRecord] = field(default_factory=dict)
    group_snapshots: dict[str, GroupSnapshotRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        state = cls(
            volumes=_load_records(VolumeRecord, data.get("volumes", {})),
            snapshots=_load_records(SnapshotRecord, data.get("snapshots", {})),
            stagings=_load_records(StageRecord, data.get("stagings", {})),
            publications=_load_records(PublishRecord, data.get("publications", {})),
            group_snapshots=_load_records(GroupSnapshotRecord, data.get("group_snapshots", {})),
        )
        records: list[_Record] = [
            *state.volumes.values(),
            *state.snapshots.values(),
            *state.stagings.values(),
            *state.publications.values(),
            *state.group_snapshots.values(),
        ]
        for record in records:
            record.status = Status(record.status)
        return state

    def volume_by_name(self, name: str) -> VolumeRecord | None:
        return next((v for v in self.volumes.values() if v.name == name), None)

    def snapshot_by_name(self, name: str) -> SnapshotRecord | None:
        return next((s for s in self.snapshots.values() if s.name == name), None)

    def group_snapshot_by_name(self, name: str) -> GroupSnapshotRecord | None:
        return next((g for g in self.group_snapshots.values() if g.name == name), None)


def live(table: dict[str, Rec], key: str, what: str) -> Rec:
    """The record under key, ready or being created; NOT_FOUND if missing or being deleted."""
    record = table.get(key)
    if record is None or record.status is Status.DELETING:
        raise NotFoundError(f"{what} {key} does not exist")
    return record


class StateFileError(SetupError):
    """The state file cannot be read: the message names it, the problem and the way out."""

    def __init__(self, path: Path, problem: str) -> None:
        previous = path.with_name(path.name + PREVIOUS_SUFFIX)
        kept = "it exists" if previous.exists() else "it is missing"
        super().__init__(
            f"CSI state file {path} {problem}. The CSI driver is not serving; device plugins "
            f"are. To recover, compare it with {previous} (the state before the last change; "
            f"{kept}), copy the right one to {path} or repair it, then restart the daemon. "
            f"Removing {path} would make the driver forget every volume (their data stays "
            "in the pool)."
        )


def _parse(path: Path, text: str) -> State:
    if not text.strip():
        raise StateFileError(path, "is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise StateFileError(path, f"is not valid JSON (truncated?): {error}") from None
    if not isinstance(data, dict):
        raise StateFileError(path, "does not hold a JSON object")
    version = data.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise StateFileError(
            path,
            f"was written by a newer nodeplug (format version {version}; this one reads "
            f"{FORMAT_VERSION}): run that version again",
        )
    if version != FORMAT_VERSION:
        raise StateFileError(path, f"has an unknown format version {version!r}")
    try:
        return State.from_json(data)
    except (TypeError, ValueError, AttributeError) as error:
        raise StateFileError(path, f"holds a record this version cannot read: {error}") from None


def _write_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        _keep_previous(path)
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(temporary).unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _keep_previous(path: Path) -> None:
    """Make the file about to be replaced the .prev one (a hard link: no copy, atomic)."""
    previous = path.with_name(path.name + PREVIOUS_SUFFIX)
    linked = path.with_name(f".{previous.name}.new")
    linked.unlink(missing_ok=True)
    try:
        linked.hardlink_to(path)
    except FileNotFoundError:
        return  # the first write: nothing before it
    linked.replace(previous)


class StateStore:
    """The in-memory State, and `save()` that persists it (serialized, off the loop)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE
        self.state = State()
        self._write_lock = asyncio.Lock()
        # Group commit: each save() call bumps `_changes`; a write covers every change
        # counted before it serialized, so callers queued behind it need no write of their own.
        self._changes = 0
        self._saved = 0

    def load(self) -> State:
        """Read the state file (none yet: an empty state); StateFileError if it is unusable."""
        private_directory(self.path.parent)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.state = State()
            return self.state
        except UnicodeDecodeError:
            raise StateFileError(self.path, "is not UTF-8 text") from None
        except OSError as error:
            raise StateFileError(self.path, f"cannot be read: {error.strerror}") from None
        self.state = _parse(self.path, text)
        return self.state

    async def save(self) -> None:
        """Persist every change made before this call (durably, when it returns)."""
        self._changes += 1
        mine = self._changes
        async with self._write_lock:
            if self._saved >= mine:
                return  # a write that serialized after our change already holds it
            covered = self._changes
            data = json.dumps(self.state.to_json(), indent=1, sort_keys=True).encode()
            await asyncio.to_thread(_write_atomically, self.path, data)
            self._saved = covered


async def create_recorded(
    store: StateStore,
    entries: Sequence[Entry],
    work: Callable[[], Awaitable[None]],
    undo: Callable[[], Awaitable[None]],
) -> None:
    """Record the intent (PENDING), do the work, record READY; on failure undo and forget.

    All entries are recorded in one write and turn READY in one write. A crash in
    between leaves PENDING records that the reconciler undoes.
    """
    for table, key, record in entries:
        table[key] = record
    await store.save()
    try:
        await work()
    except BaseException:
        with contextlib.suppress(Exception):
            await undo()
        for table, key, _ in entries:
            table.pop(key, None)
        await store.save()
        raise
    for _, _, record in entries:
        record.status = Status.READY
    await store.save()


async def delete_recorded(
    store: StateStore, entries: Sequence[Entry], work: Callable[[], Awaitable[None]]
) -> None:
    """Record DELETING, do the work, forget the records; a crash leaves DELETING to finish."""
    for _, _, record in entries:
        record.status = Status.DELETING
    await store.save()
    await work()
    for table, key, _ in entries:
        del table[key]
    await store.save()
