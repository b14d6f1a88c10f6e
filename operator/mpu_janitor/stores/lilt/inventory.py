"""The LILT inventory: a JSON Lines file of the multipart uploads an uploader initiated.

LILT cannot list incomplete multipart uploads, so the uploader records each one right after
initiating it (:func:`record_upload`) and, if it can, the time of each part it sends
(:func:`record_part`); the sweep reads the records back, cancels from them and rewrites the
file (:func:`update_inventory`). See the package docstring for the format and the rules.

Only regular files are opened (never blocking: a FIFO or a device is refused with
:class:`InventoryError`), and waiting for the writers' lock is bounded and can be cancelled
(:class:`InventoryLocked`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 30.0  # seconds a writer waits for the lock before giving up
LOCK_POLL = 0.05
UNRESOLVED_SUFFIX = ".unresolved"


class InventoryError(OSError):
    """The inventory (or its lock file) cannot be used: not a regular file, or locked."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "inventory error"


class InventoryLocked(InventoryError):
    """The writers' lock was not obtained within the timeout, or the wait was cancelled."""


@dataclass(frozen=True, slots=True)
class InventoryRecord:
    upload_id: str
    key: str
    initiated: datetime
    filename: str | None = None
    size: int | None = None
    last_part_at: datetime | None = None  # the newest part the uploader recorded
    cancel_accepted: datetime | None = None  # LILT confirmed our cancel, not yet verified
    attempts: int = 0  # sweeps whose cancel of this upload did not settle
    last_outcome: str | None = None


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 time with a zone, or None (an age needs a zone; never guess one)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.astimezone(UTC) if moment.tzinfo is not None else None


def unresolved_path(path: str | os.PathLike[str]) -> Path:
    """Where records the sweep gave up on are kept for a person: ``<inventory>.unresolved``."""
    return Path(f"{os.fspath(path)}{UNRESOLVED_SUFFIX}")


def _load(raw: bytes) -> dict[str, Any] | None:
    """One line as a JSON object, or None (a torn or foreign line)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _record(data: Mapping[str, Any]) -> InventoryRecord | None:
    upload_id, key = data.get("uploadId"), data.get("key")
    if not isinstance(upload_id, str) or not upload_id or not isinstance(key, str) or not key:
        return None
    initiated = parse_time(data.get("initiated"))
    if initiated is None:
        return None
    size = data.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        size = None
    attempts = data.get("attempts")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        attempts = 0
    filename, outcome = data.get("filename"), data.get("lastOutcome")
    return InventoryRecord(
        upload_id,
        key,
        initiated,
        filename if isinstance(filename, str) else None,
        size,
        parse_time(data.get("lastPartAt")),
        parse_time(data.get("cancelAccepted")),
        attempts,
        outcome if isinstance(outcome, str) else None,
    )


def parse_record(raw: bytes) -> InventoryRecord | None:
    """One inventory line, or None when it is not a usable upload record."""
    data = _load(raw)
    return None if data is None else _record(data)


def _part_event(data: Mapping[str, Any]) -> tuple[str, datetime] | None:
    """A part line ``{"uploadId", "partAt"}`` (no key), or None."""
    upload_id = data.get("uploadId")
    if "key" in data or not isinstance(upload_id, str) or not upload_id:
        return None
    moment = parse_time(data.get("partAt"))
    return None if moment is None else (upload_id, moment)


def read_part_times(source: IO[bytes]) -> dict[str, datetime]:
    """The newest recorded part time per upload, from the part lines of an open inventory."""
    newest: dict[str, datetime] = {}
    for raw in source:
        if b'"partAt"' not in raw or not raw.endswith(b"\n"):
            continue
        data = _load(raw)
        event = _part_event(data) if data is not None else None
        if event is not None and (event[0] not in newest or newest[event[0]] < event[1]):
            newest[event[0]] = event[1]
    return newest


# --------------------------------------------------------------------------------------------
# Opening only regular files, locking with a bound


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a file"


def open_regular(path: str, flags: int, mode: int = 0o660) -> int:
    """``os.open`` that never blocks on a FIFO or a device and refuses anything but a regular
    file (InventoryError naming the path)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except IsADirectoryError as error:
        raise InventoryError(f"{path} is a directory, not a regular file") from error
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise InventoryError(f"{path} is {_kind(status.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def inventory_lock(
    path: str, *, timeout: float = LOCK_TIMEOUT, cancel: threading.Event | None = None
) -> Iterator[None]:
    """The writers' lock: ``flock`` on ``<path>.lock``, which is never replaced (the inventory
    is, when rewritten, so a lock on it would not exclude a writer holding the old file).
    Waits at most ``timeout`` seconds, and stops waiting once ``cancel`` is set."""
    lock_path = f"{path}.lock"
    fd = open_regular(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            if cancel is not None and cancel.is_set():
                raise InventoryLocked(f"waiting for the lock {lock_path} was cancelled")
            if time.monotonic() >= deadline:
                raise InventoryLocked(
                    f"could not take the lock {lock_path} within {timeout:g} s "
                    "(another writer holds it)"
                )
            if cancel is not None:
                cancel.wait(LOCK_POLL)
            else:
                time.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(
    path: str | os.PathLike[str],
    record: Mapping[str, Any],
    *,
    lock_timeout: float,
    cancel: threading.Event | None,
) -> None:
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    target = os.fspath(path)
    with inventory_lock(target, timeout=lock_timeout, cancel=cancel):
        created = not os.path.exists(target)
        fd = open_regular(target, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                # A writer died mid-line: start on a fresh line rather than glue onto its debris.
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(os.path.dirname(os.path.abspath(target)))


def record_upload(
    path: str | os.PathLike[str],
    upload_id: str,
    key: str,
    initiated: datetime | None = None,
    filename: str | None = None,
    size: int | None = None,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
    cancel: threading.Event | None = None,
) -> None:
    """Record a LILT multipart upload right after initiating it (for the uploader to call).

    ``upload_id`` and ``key`` are the initiate response's ``uploadId`` and ``key``;
    ``initiated`` (timezone-aware) is best taken from that response's Date header, and
    defaults to now on this machine's clock; ``size`` is the file size declared at initiation.
    Safe to call from many threads and processes at once; the record is on disk on return.
    Raises InventoryError when the path is not a regular file or the lock cannot be taken."""
    if not upload_id or not key:
        raise ValueError("upload_id and key are required (the initiate response's uploadId, key)")
    moment = initiated if initiated is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("initiated must be timezone-aware")
    if size is not None and size < 0:
        raise ValueError("size must not be negative")
    record: dict[str, Any] = {"uploadId": upload_id, "key": key, "initiated": rfc3339(moment)}
    if filename is not None:
        record["filename"] = filename
    if size is not None:
        record["size"] = int(size)
    _append(path, record, lock_timeout=lock_timeout, cancel=cancel)


def record_part(
    path: str | os.PathLike[str],
    upload_id: str,
    at: datetime | None = None,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
    cancel: threading.Event | None = None,
) -> None:
    """Record that a part of an upload arrived (for the uploader to call after each part, or
    every few): the sweep then skips the upload while its newest part is younger than the
    policy's ``quietPeriod``. ``at`` (timezone-aware) defaults to now on this machine's clock."""
    if not upload_id:
        raise ValueError("upload_id is required")
    moment = at if at is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("the part time must be timezone-aware")
    _append(
        path,
        {"uploadId": upload_id, "partAt": rfc3339(moment)},
        lock_timeout=lock_timeout,
        cancel=cancel,
    )


# --------------------------------------------------------------------------------------------
# Rewriting: pruning, annotating, giving up


@dataclass(frozen=True, slots=True)
class InventoryChanges:
    removed: int = 0  # records pruned
    annotated: int = 0
    given_up: int = 0  # records moved to the unresolved file


def update_inventory(
    path: str | os.PathLike[str],
    *,
    prune: Set[str] = frozenset(),
    annotate: Mapping[str, Mapping[str, Any]] | None = None,
    give_up: Mapping[str, Mapping[str, Any]] | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    cancel: threading.Event | None = None,
) -> InventoryChanges:
    """One atomic rewrite under the writers' lock: records of ``prune`` go (every copy), those
    of ``annotate`` get the given fields, those of ``give_up`` move (with the given fields) to
    the unresolved file. Part lines are folded into their record's ``lastPartAt``; part lines
    of no record and lines that are not JSON (debris of a writer killed mid-line) go."""
    annotate, give_up = annotate or {}, give_up or {}
    target = os.fspath(path)
    if not (prune or annotate or give_up):
        return InventoryChanges()
    directory = os.path.dirname(os.path.abspath(target))
    with inventory_lock(target, timeout=lock_timeout, cancel=cancel):
        try:
            source = os.fdopen(open_regular(target, os.O_RDONLY), "rb")
        except FileNotFoundError:
            return InventoryChanges()
        with source:
            mode = stat.S_IMODE(os.fstat(source.fileno()).st_mode)
            parts = read_part_times(source)
            source.seek(0)
            lines = list(source)
        removed = annotated = debris = 0
        kept: list[bytes] = []
        moved: list[bytes] = []
        records = {r.upload_id for raw in lines if (r := parse_record(raw)) is not None}
        for raw in lines:
            data = _load(raw)
            if data is None:
                debris += 1
                continue
            event = _part_event(data)
            if event is not None:
                continue  # folded into its record below (or dropped with it)
            upload_id = data.get("uploadId")
            if not isinstance(upload_id, str) or upload_id not in records:
                kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
                continue
            if upload_id in parts:
                folded = parse_time(data.get("lastPartAt"))
                if folded is None or folded < parts[upload_id]:
                    data["lastPartAt"] = rfc3339(parts[upload_id])
            if upload_id in prune:
                removed += 1
                continue
            if upload_id in give_up:
                moved.append(_dump({**data, **give_up[upload_id]}))
                continue
            if upload_id in annotate:
                data.update(annotate[upload_id])
                annotated += 1
            kept.append(_dump(data))
        if not (removed or annotated or moved or debris or parts):
            return InventoryChanges()
        if moved:
            _append_lines(unresolved_path(target), moved, mode)
        fd, temp = tempfile.mkstemp(prefix=".inventory-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.writelines(kept)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, mode)  # mkstemp makes 0600: keep the uploader able to write
            os.replace(temp, target)
            _fsync_dir(directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
    if debris:
        log.warning("%s: dropped %d unreadable line(s) while rewriting", target, debris)
    return InventoryChanges(removed, annotated, len(moved))


def _dump(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _append_lines(path: Path, lines: list[bytes], mode: int) -> None:
    fd = open_regular(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        for line in lines:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_unresolved(path: str | os.PathLike[str]) -> list[InventoryRecord]:
    """The records the sweep gave up on (empty when there is no such file)."""
    try:
        fd = open_regular(str(unresolved_path(path)), os.O_RDONLY)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as source:
        return [r for raw in source if (r := parse_record(raw)) is not None]


def prune_uploads(path: str | os.PathLike[str], upload_ids: Set[str]) -> int:
    """Remove the records of ``upload_ids`` (every copy), atomically, under the writers' lock.
    Returns how many records were removed."""
    return update_inventory(path, prune=upload_ids).removed


def forget_upload(path: str | os.PathLike[str], upload_id: str) -> bool:
    """Remove one upload's record, e.g. once the uploader has completed it."""
    return prune_uploads(path, {upload_id}) > 0
