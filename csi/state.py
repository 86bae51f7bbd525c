"""The driver's one state store: volumes, snapshots, stagings and publications.

Three JSON files under stateDir:

- csi-state.json and csi-state.b.json: volumes, snapshots and group snapshots,
  which outlive a reboot, written in turn. Each write overwrites the older of the
  two in place and fsyncs it: one flush, no new inode, no rename, no directory
  fsync (a durable replace by rename costs two flushes and the renames; 4-5x the
  time on a busy disk). Each carries a generation and a checksum of its records;
  the newer valid one is the state. A crash (or power cut) during a write leaves
  that file torn, fails its checksum and is passed over: the other one holds the
  state before the interrupted change, whose call never returned. So the file
  not written last always holds the state before the last change, for an admin
  to recover from if both are damaged anyway (a disk, an editor).
- csi-node-state.<boot id>.json: stagings and publications, which are mounts and
  loop devices, gone with the boot they were made in. Replaced atomically (temp
  file, rename), never fsync'd: a killed daemon finds the file as the page cache
  holds it, and a power cut means a new boot, whose file this is not (files of
  other boots are removed at load). So stage, publish and their undoing cost no
  fsync at all.

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
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from csi.errors import NotFoundError, SetupError
from csi.files import private_directory

log = logging.getLogger(__name__)

STATE_FILES = ("csi-state.json", "csi-state.b.json")
NODE_STATE_FILE = "csi-node-state.{boot}.json"
# What format version 2 kept of the state before the last change.
_LEGACY_PREVIOUS = "csi-state.json.prev"
# 2: stagings and publications moved to the node state file. Version 1 files are read
# (their stagings and publications taken over); a version 1 daemon refuses version 2,
# rather than take the missing stagings for none and unmount them.
# 3: two files written in turn, each with its generation and checksum. A version 1 or 2
# csi-state.json is read as generation 0; older daemons refuse version 3.
FORMAT_VERSION = 3
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
_FIELDS: dict[type, tuple[str, ...]] = {
    kind: tuple(f.name for f in fields(kind))
    for kind in (VolumeRecord, SnapshotRecord, GroupSnapshotRecord, StageRecord, PublishRecord)
}


def _plain(record: object) -> dict[str, Any]:
    return {name: getattr(record, name) for name in _FIELDS[type(record)]}


def _encode(data: dict[str, Any]) -> bytes:
    """data as JSON, a record a line: readable, and made by the C encoder (indent= is not)."""
    lines = []
    for key, value in sorted(data.items()):
        if isinstance(value, dict) and value:
            records = ",\n".join(
                f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                for k, v in sorted(value.items())
            )
            lines.append(f" {json.dumps(key)}: {{\n{records}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


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
        """The tables as JSON values; they share lists and dicts with the records, so
        encode them before the records can change (dataclasses.asdict copies them, at
        ~20 µs a record)."""
        return {
            "version": FORMAT_VERSION,
            **{table: {k: _plain(r) for k, r in getattr(self, table).items()} for table in tables},
        }

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
    """The state cannot be read: the message names the files, the problems and the way out."""

    def __init__(self, problems: dict[Path, str]) -> None:
        paths = list(problems)
        if paths[0].name in STATE_FILES:
            way_out = (
                "repair the one that holds the latest state (each is the whole state; without "
                'its "checksum" field a file is taken as it is), then restart the daemon. '
                "Removing them would make the driver forget every volume (their data stays "
                "in the pool)."
            )
        else:
            way_out = (
                "repair it, or remove it and restart the daemon: the driver then unmounts "
                "the volumes it finds staged or published (the pods using them lose them "
                "until they are started again)."
            )
        what = "; ".join(f"{path} {problem}" for path, problem in problems.items())
        super().__init__(
            f"CSI state file {what}. The CSI driver is not serving; device plugins "
            f"are. To recover, {way_out}"
        )


class _UnusableError(Exception):
    """One state file cannot be used; the message says why."""


class _NewerError(_UnusableError):
    """A state file written by a newer nodeplug: never passed over."""


def _decode(text: str) -> dict[str, Any]:
    if not text.strip():
        raise _UnusableError("is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _UnusableError(f"is not valid JSON (truncated?): {error}") from None
    if not isinstance(data, dict):
        raise _UnusableError("does not hold a JSON object")
    version = data.get("version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise _NewerError(
            f"was written by a newer nodeplug (format version {version}; this one reads "
            f"{FORMAT_VERSION}): run that version again",
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _UnusableError(f"has an unknown format version {version!r}")
    return data


def _state(data: dict[str, Any]) -> State:
    try:
        return State.from_json(data)
    except (TypeError, ValueError, AttributeError) as error:
        raise _UnusableError(f"holds a record this version cannot read: {error}") from None


def _checksum(data: dict[str, Any]) -> str:
    records = {table: data.get(table, {}) for table in _CONTROLLER_TABLES}
    canonical = json.dumps(records, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Written:
    """One of the two controller state files as read: its generation and state."""

    generation: int
    state: State
    legacy: bool


def _read_controller(path: Path) -> _Written | None:
    """The state one of the two files holds; None if missing, _UnusableError if torn or damaged."""
    text = _text(path)
    if text is None:
        return None
    data = _decode(text)
    if data["version"] < FORMAT_VERSION:
        return _Written(0, _state(data), legacy=True)
    generation = data.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise _UnusableError(f"has no valid generation ({generation!r})")
    # No checksum: a file an admin repaired by hand, taken as it is.
    if "checksum" in data and data["checksum"] != _checksum(data):
        raise _UnusableError("does not match its checksum (a write cut short, or changed)")
    return _Written(generation, _state(data), legacy=False)


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise _UnusableError("is not UTF-8 text") from None
    except OSError as error:
        raise _UnusableError(f"cannot be read: {error.strerror}") from None


def _read_node(path: Path) -> State | None:
    try:
        text = _text(path)
        return None if text is None else _state(_decode(text))
    except _UnusableError as error:
        raise StateFileError({path: str(error)}) from None


def _write_in_place(path: Path, data: bytes) -> None:
    """Overwrite path with data and flush it (one fsync; the directory too if it is new)."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        created = os.fstat(descriptor).st_size == 0
        os.pwrite(descriptor, data, 0)
        os.ftruncate(descriptor, len(data))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if created:
        _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace path with data (temp file, rename): a killed daemon leaves the old or the new."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        Path(temporary).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(temporary).unlink()
        raise


def boot_id() -> str:
    return BOOT_ID.read_text(encoding="ascii").strip()


class StateStore:
    """The in-memory State, and `save()` that persists it (serialized, off the loop)."""

    def __init__(self, directory: Path, boot: str | None = None) -> None:
        self.paths = tuple(directory / name for name in STATE_FILES)
        self.node_path = directory / NODE_STATE_FILE.format(boot=boot or boot_id())
        self.state = State()
        self._write_lock = asyncio.Lock()
        # Group commit: each save() call bumps `_changes`; a write covers every change
        # counted before it serialized, so callers queued behind it need no write of their own.
        self._changes = 0
        self._saved = 0
        # The generation written last, and which of the two files the next write overwrites.
        self._generation = 0
        self._next = 0
        # What was written last (node file; checksum of the records): a save writes
        # only what changed.
        self._node_written = b""
        self._records_written = ""
        self._checksum = ""

    def load(self) -> State:
        """Read the state files (none yet: an empty state); StateFileError if unusable."""
        directory = self.node_path.parent
        private_directory(directory)
        found, problems = self._read_controller_files()
        if found:
            newest = max(found, key=lambda index: found[index].generation)
            for path, problem in problems.items():
                log.warning(
                    "passing over a state file a crash interrupted or that was damaged",
                    extra={"path": str(path), "problem": problem, "using": str(self.paths[newest])},
                )
            self.state = found[newest].state
            self._generation, self._next = found[newest].generation, 1 - newest
            if found[newest].legacy:
                self._migrate()
        elif problems:
            raise StateFileError(problems)
        else:
            self.state = State()
        node = _read_node(self.node_path)
        if node is not None:
            self.state.stagings, self.state.publications = node.stagings, node.publications
        for stale in directory.glob(NODE_STATE_FILE.format(boot="*")):
            if stale != self.node_path:
                # Another boot's mounts and loop devices: gone with it.
                stale.unlink(missing_ok=True)
        self._node_written = b""
        self._records_written = ""
        return self.state

    def _read_controller_files(self) -> tuple[dict[int, _Written], dict[Path, str]]:
        """The usable files by index, and what is wrong with the others (missing: neither)."""
        found: dict[int, _Written] = {}
        problems: dict[Path, str] = {}
        for index, path in enumerate(self.paths):
            try:
                written = _read_controller(path)
            except _NewerError as error:
                raise StateFileError({path: str(error)}) from None
            except _UnusableError as error:
                problems[path] = str(error)
            else:
                if written is not None:
                    found[index] = written
        return found, problems

    def _migrate(self) -> None:
        """Take over a format 1 or 2 csi-state.json: the same state into the other file.

        csi-state.json stays as it is until the next write overwrites it, so an older
        daemon started in between still finds the state, and refuses it from then on.
        """
        encoded = self._encode_records()
        if encoded is not None:
            _write_in_place(self.paths[self._next], encoded)
            self._written_records()
        (self.node_path.parent / _LEGACY_PREVIOUS).unlink(missing_ok=True)

    def _encode_records(self) -> bytes | None:
        """The next write of the volumes' records; None if the last one holds them."""
        data = self.state.to_json(_CONTROLLER_TABLES)
        checksum = _checksum(data)
        if checksum == self._records_written:
            return None
        self._checksum = checksum
        return _encode({**data, "generation": self._generation + 1, "checksum": checksum})

    def _written_records(self) -> None:
        self._generation, self._next = self._generation + 1, 1 - self._next
        self._records_written = self._checksum

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
            node = _encode(self.state.to_json(_NODE_TABLES))
            if node != self._node_written:
                await _to_the_end(_write_atomically, self.node_path, node)
                self._node_written = node
            if durable:
                records = self._encode_records()
                if records is not None:
                    await _to_the_end(_write_in_place, self.paths[self._next], records)
                    self._written_records()
                self._saved = covered


async def _to_the_end(function: Callable[..., None], *arguments: Any) -> None:
    """Run function in a thread and wait for its end, even when the caller is cancelled.

    The caller holds the write lock: released while the thread still writes, it
    would let the next write into the same file at the same time.
    """
    done = asyncio.get_running_loop().run_in_executor(None, function, *arguments)
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await done
        raise


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
