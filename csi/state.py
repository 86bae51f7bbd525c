"""The driver's one state store: volumes, snapshots, stagings and publications.

Two JSON files under stateDir, each replaced atomically (temp file, rename) on
every change to it, so a crash leaves either the old or the new one, never a
torn one:

- csi-state.json: volumes, snapshots and group snapshots, which outlive a reboot.
  Its writes are durable (the temp file fsync'd before the rename, the directory
  after): a power cut too leaves the old or the new state. The file each write
  replaces stays beside it as csi-state.json.prev: if the current one is damaged
  anyway (a disk, an editor), the one before the last change is there to recover
  from.
- csi-node-state.<boot id>.json: stagings and publications, which are mounts and
  loop devices, gone with the boot they were made in. Its writes need no fsync:
  a killed daemon finds the file as the page cache holds it, and a power cut
  means a new boot, whose file this is not (files of other boots are removed at
  load). So stage, publish and their undoing cost no fsync at all.

Records carry a status: a node operation first records its intent ("pending"),
then does the work, then records "ready"; after a crash the reconciler finishes or
undoes whatever is still pending. A create in the pool records nothing before its
work, which the reconciler finds by its pending name instead (see pool.py): its
one durable write is the READY record. A file the driver cannot read stops the driver
(StateFileError) rather than being taken for an empty state, which would forget
every volume.
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
NODE_STATE_FILE = "csi-node-state.{boot}.json"
PREVIOUS_SUFFIX = ".prev"
# 2: stagings and publications moved to the node state file. Version 1 files are read
# (their stagings and publications taken over); a version 1 daemon refuses version 2,
# rather than take the missing stagings for none and unmount them.
FORMAT_VERSION = 2
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_CONTROLLER_TABLES = ("volumes", "snapshots", "group_snapshots")
_NODE_TABLES = ("stagings", "publications")


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

    def to_json(self, tables: Sequence[str]) -> dict[str, Any]:
        records = asdict(self)
        return {"version": FORMAT_VERSION, **{table: records[table] for table in tables}}

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
        if path.name == STATE_FILE:
            previous = path.with_name(path.name + PREVIOUS_SUFFIX)
            kept = "it exists" if previous.exists() else "it is missing"
            way_out = (
                f"compare it with {previous} (the state before the last change; {kept}), "
                f"copy the right one to {path} or repair it, then restart the daemon. "
                f"Removing {path} would make the driver forget every volume (their data "
                "stays in the pool)."
            )
        else:
            way_out = (
                "repair it, or remove it and restart the daemon: the driver then unmounts "
                "the volumes it finds staged or published (the pods using them lose them "
                "until they are started again)."
            )
        super().__init__(
            f"CSI state file {path} {problem}. The CSI driver is not serving; device plugins "
            f"are. To recover, {way_out}"
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
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StateFileError(path, f"has an unknown format version {version!r}")
    try:
        return State.from_json(data)
    except (TypeError, ValueError, AttributeError) as error:
        raise StateFileError(path, f"holds a record this version cannot read: {error}") from None


def _write_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace path with data: a crash leaves the old or the new file.

    durable: fsync the data before the rename (else a power cut may leave the new
    name holding no data) and the directory after (else it may bring the old file
    back), and keep the replaced file as .prev.
    """
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        if durable:
            _keep_previous(path)
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(temporary).unlink()
        raise
    if not durable:
        return
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


def _read(path: Path) -> State | None:
    """The state in one file; None if there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise StateFileError(path, "is not UTF-8 text") from None
    except OSError as error:
        raise StateFileError(path, f"cannot be read: {error.strerror}") from None
    return _parse(path, text)


def boot_id() -> str:
    return BOOT_ID.read_text(encoding="ascii").strip()


class StateStore:
    """The in-memory State, and `save()` that persists it (serialized, off the loop)."""

    def __init__(self, directory: Path, boot: str | None = None) -> None:
        self.path = directory / STATE_FILE
        self.node_path = directory / NODE_STATE_FILE.format(boot=boot or boot_id())
        self.state = State()
        self._write_lock = asyncio.Lock()
        # Group commit: each save() call bumps `_changes`; a write covers every change
        # counted before it serialized, so callers queued behind it need no write of their own.
        self._changes = 0
        self._saved = 0
        # What each file holds now: a save writes only the files whose content changed.
        self._written: dict[Path, bytes] = {}

    def load(self) -> State:
        """Read the state files (none yet: an empty state); StateFileError if one is unusable."""
        private_directory(self.path.parent)
        self.state = _read(self.path) or State()
        node = _read(self.node_path)
        if node is not None:
            self.state.stagings, self.state.publications = node.stagings, node.publications
        for stale in self.path.parent.glob(NODE_STATE_FILE.format(boot="*")):
            if stale != self.node_path:
                # Another boot's mounts and loop devices: gone with it.
                stale.unlink(missing_ok=True)
        self._written = {}
        return self.state

    async def save(self, durable: bool = True) -> None:
        """Persist every change made before this call, when it returns.

        durable=False: changes to volumes and snapshots may wait for the next durable
        save (the caller's work is done and a crash before then is finished by the
        reconciler: a deletion recorded as DELETING); node changes are written anyway.
        """
        self._changes += 1
        mine = self._changes
        async with self._write_lock:
            if self._saved >= mine:
                return  # a write that serialized after our change already holds it
            covered = self._changes
            files: list[tuple[Path, Sequence[str], bool]] = [(self.node_path, _NODE_TABLES, False)]
            if durable:
                files.append((self.path, _CONTROLLER_TABLES, True))
            for path, tables, lasting in files:
                data = json.dumps(self.state.to_json(tables), indent=1, sort_keys=True).encode()
                if self._written.get(path) != data:
                    await asyncio.to_thread(_write_atomically, path, data, lasting)
                    self._written[path] = data
            if durable:
                self._saved = covered


async def create_recorded(
    store: StateStore,
    entries: Sequence[Entry],
    work: Callable[[], Awaitable[None]],
    undo: Callable[[], Awaitable[None]],
    place: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Do the work and record its entries READY, in one write; on failure undo and forget.

    Without place, the intent (the entries, PENDING) is written first: a crash
    during the work leaves PENDING records that the reconciler undoes. With place,
    the work leaves its result where the reconciler deletes it unless a READY record
    claims it (a pending subvolume), so no intent is written: the READY write, then
    place() moves the result into place (a crash in between: the reconciler does).
    The entries are in the in-memory state, PENDING, while the work runs.
    """
    for table, key, record in entries:
        table[key] = record
    if place is None:
        await store.save()
    try:
        await work()
        for _, _, record in entries:
            record.status = Status.READY
        await store.save()
        if place is not None:
            await place()
    except BaseException:
        with contextlib.suppress(Exception):
            await undo()
        for table, key, _ in entries:
            table.pop(key, None)
        await store.save()
        raise


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
    # Not durable: if this is lost, the reconciler finishes the DELETING records.
    await store.save(durable=False)
