"""The LILT inventory: a JSON Lines file of the multipart uploads an uploader initiated.

LILT cannot list incomplete multipart uploads, so the uploader records each one right after
initiating it (:func:`record_upload`), and the sweep reads the records back, cancels from them
and prunes them (:func:`prune_uploads`). See the package docstring for the file format.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterator, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InventoryRecord:
    upload_id: str
    key: str
    initiated: datetime
    filename: str | None = None
    size: int | None = None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _load(raw: bytes) -> dict[str, Any] | None:
    """One line as a JSON object, or None (a torn or foreign line)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_record(raw: bytes) -> InventoryRecord | None:
    """One inventory line, or None when it is not a usable upload record."""
    data = _load(raw)
    if data is None:
        return None
    upload_id, key, initiated = data.get("uploadId"), data.get("key"), data.get("initiated")
    if not isinstance(upload_id, str) or not upload_id or not isinstance(key, str) or not key:
        return None
    if not isinstance(initiated, str):
        return None
    try:
        moment = datetime.fromisoformat(initiated)
    except ValueError:
        return None
    if moment.tzinfo is None:  # an age needs a zone; never guess one
        return None
    size = data.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        size = None
    filename = data.get("filename")
    return InventoryRecord(
        upload_id,
        key,
        moment.astimezone(UTC),
        filename if isinstance(filename, str) else None,
        size,
    )


@contextlib.contextmanager
def _inventory_lock(path: str) -> Iterator[None]:
    """The writers' lock: ``flock`` on ``<path>.lock``, which is never replaced (the inventory
    is, when pruned, so a lock on it would not exclude a writer holding the old file)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_upload(
    path: str | os.PathLike[str],
    upload_id: str,
    key: str,
    initiated: datetime | None = None,
    filename: str | None = None,
    size: int | None = None,
) -> None:
    """Record a LILT multipart upload right after initiating it (for the uploader to call).

    ``upload_id`` and ``key`` are the initiate response's ``uploadId`` and ``key``;
    ``initiated`` (timezone-aware) is best taken from that response's Date header, and
    defaults to now on this machine's clock; ``size`` is the file size declared at initiation.
    Safe to call from many threads and processes at once; the record is on disk on return."""
    if not upload_id or not key:
        raise ValueError("upload_id and key are required (the initiate response's uploadId, key)")
    moment = initiated if initiated is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("initiated must be timezone-aware")
    if size is not None and size < 0:
        raise ValueError("size must not be negative")
    record: dict[str, Any] = {"uploadId": upload_id, "key": key, "initiated": _rfc3339(moment)}
    if filename is not None:
        record["filename"] = filename
    if size is not None:
        record["size"] = int(size)
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    target = os.fspath(path)
    with _inventory_lock(target):
        created = not os.path.exists(target)
        fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o660)
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


def prune_uploads(path: str | os.PathLike[str], upload_ids: Set[str]) -> int:
    """Remove the records of ``upload_ids`` (every copy), atomically, under the writers' lock.
    Lines that are not JSON (debris of a writer killed mid-line) go too. Returns how many
    records were removed."""
    target = os.fspath(path)
    if not upload_ids:
        return 0
    directory = os.path.dirname(os.path.abspath(target))
    with _inventory_lock(target):
        try:
            source = open(target, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            return 0
        removed = debris = 0
        fd, temp = tempfile.mkstemp(prefix=".inventory-", suffix=".tmp", dir=directory)
        try:
            with source, os.fdopen(fd, "wb") as out:
                mode = stat.S_IMODE(os.fstat(source.fileno()).st_mode)
                for raw in source:
                    data = _load(raw)
                    if data is None:
                        debris += 1
                        continue
                    if data.get("uploadId") in upload_ids:
                        removed += 1
                        continue
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                out.flush()
                os.fsync(out.fileno())
            if removed == 0 and debris == 0:
                os.unlink(temp)
                return 0
            os.chmod(temp, mode)  # mkstemp makes 0600: keep the uploader able to write
            os.replace(temp, target)
            _fsync_dir(directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
    if debris:
        log.warning("%s: dropped %d unreadable line(s) while pruning", target, debris)
    return removed


def forget_upload(path: str | os.PathLike[str], upload_id: str) -> bool:
    """Remove one upload's record, e.g. once the uploader has completed it."""
    return prune_uploads(path, {upload_id}) > 0
