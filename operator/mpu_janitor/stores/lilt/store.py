"""The LILT Store: cancels the uploads recorded in an inventory and judges every answer LILT
may give (the rules are in the package docstring)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from mpu_janitor.policy import MAX_CONCURRENCY, LiltTarget
from mpu_janitor.stores.base import (
    AccessDenied,
    ContainerNotFound,
    InvalidTarget,
    Pace,
    PartsSummary,
    RequestObserver,
    StoreCredentials,
    StoreError,
    Upload,
    UploadGone,
    UploadPage,
    unpaced,
)
from mpu_janitor.stores.lilt.api import CONTAINER, CancelAnswer, LiltApi, PendingUpload
from mpu_janitor.stores.lilt.inventory import (
    InventoryError,
    InventoryRecord,
    inventory_lock,
    open_regular,
    parse_record,
    read_part_times,
    read_unresolved,
    rfc3339,
    unresolved_path,
    update_inventory,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 1000  # inventory records per listing page
FORGET_BATCH = 100  # rewrite the inventory once this many changes are queued...
FORGET_MAX_DELAY = 5.0  # ...or this many seconds after the first one, whichever comes first
RECORD_CACHE_PAGES = 8  # recent listing pages whose records measure() finds without a scan
STORE_LOCK_TIMEOUT = 10.0  # a sweep waits this long for the writers' lock, then retries later
API_KEY_ENV = "LILT_API_KEY"
MAX_CANCEL_SWEEPS = 3  # sweeps a record's cancel may stay unsettled before it is given up
UNRECORDED_GRACE = timedelta(minutes=15)  # a pending upload younger may be being recorded
MATCH_TOLERANCE = timedelta(hours=1)  # recorded `initiated` vs LILT's `created_at`
TERMINAL_STATUSES = frozenset(
    {"complete", "completed", "cancelled", "canceled", "aborted", "failed", "error", "done"}
)


class CancelRefused(StoreError):
    """LILT answered a cancel and did not cancel: ``200 {success: false}`` or a 4xx."""

    reason = "CancelRefused"


class CancelUnverified(StoreError):
    """LILT confirmed a cancel but gave no answer about the upload to its repeat (5xx)."""

    reason = "CancelUnverified"


class UploadNotFound(StoreError):
    """First cancels answered 404: LILT does not know the uploads for this key."""

    reason = "UploadNotFound"


class CancelUnresolved(StoreError):
    """Records given up after MAX_CANCEL_SWEEPS unsettled sweeps."""

    reason = "CancelUnresolved"


class UnrecordedUploads(StoreError):
    """LILT lists pending uploads that the inventory does not record."""

    reason = "UnrecordedUploads"


class InventoryNotUpdated(StoreError):
    """The inventory could not be rewritten (pruned, annotated)."""

    reason = "InventoryNotUpdated"


@dataclass
class _Changes:
    """Inventory changes queued for the next rewrite."""

    prune: set[str] = field(default_factory=set)
    annotate: dict[str, dict[str, Any]] = field(default_factory=dict)
    give_up: dict[str, dict[str, Any]] = field(default_factory=dict)
    since: float = 0.0

    def __len__(self) -> int:
        return len(self.prune) + len(self.annotate) + len(self.give_up)


@dataclass
class _Report:
    """What this store noticed beyond single calls, for :meth:`LiltStore.findings`."""

    not_found: list[str] = field(default_factory=list)  # keys
    not_found_kept: int = 0  # 404s while the endpoint was unconfirmed: records kept
    given_up: list[tuple[str, str]] = field(default_factory=list)  # (key, last outcome)
    unrecorded: list[PendingUpload] = field(default_factory=list)
    unrecorded_count: int = 0
    not_updated: str | None = None


class _PendingIndex:
    """LILT's pending uploads, matched off one by one against the inventory's records."""

    def __init__(self, items: list[PendingUpload], now: datetime) -> None:
        cutoff = now - UNRECORDED_GRACE
        self.by_name: dict[str | None, list[PendingUpload]] = collections.defaultdict(list)
        for item in items:
            if item.created_at is None or item.created_at > cutoff:
                continue  # cannot judge, or young enough to be being recorded right now
            if (item.status or "").lower() in TERMINAL_STATUSES:
                continue
            self.by_name[item.filename].append(item)
        self.unnamed_records = 0

    def match(self, record: InventoryRecord) -> None:
        if record.filename is None:
            self.unnamed_records += 1  # matched by count at the end
            return
        candidates = self.by_name.get(record.filename)
        if not candidates:
            return
        best = min(
            range(len(candidates)),
            key=lambda n: abs(candidates[n].created_at - record.initiated),  # type: ignore[operator]
        )
        created = candidates[best].created_at
        assert created is not None
        if abs(created - record.initiated) <= MATCH_TOLERANCE:
            candidates.pop(best)

    def unrecorded(self) -> tuple[int, list[PendingUpload]]:
        left = sorted(
            (item for items in self.by_name.values() for item in items),
            key=lambda item: item.created_at or datetime.max,
        )
        return max(0, len(left) - self.unnamed_records), left[:3]


class LiltStore:
    """The uploads of one LILT account recorded in one inventory file."""

    kind = "LILT"

    def __init__(
        self,
        target: LiltTarget,
        credentials: StoreCredentials | None,
        observer: RequestObserver,
        *,
        read_timeout: float = 30.0,
    ) -> None:
        self.target = target
        api_key = (credentials.api_key if credentials is not None else None) or os.environ.get(
            API_KEY_ENV
        )
        self._api = LiltApi(
            target.endpoint,
            api_key,
            observer,
            pool_size=MAX_CONCURRENCY,  # one connection per sweep worker at most
            read_timeout=read_timeout,
            key_hint=f"set {API_KEY_ENV} in the credentials Secret or the environment",
        )
        self._lock = threading.Lock()
        self._records: collections.deque[dict[str, InventoryRecord]] = collections.deque(
            maxlen=RECORD_CACHE_PAGES
        )
        self._accepted: set[str] = set()  # LILT confirmed our cancel in this sweep: verify
        self._gone: set[str] = set()  # settled: verified gone, given up or pruned
        self._changes = _Changes()
        self._report = _Report()

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def target_id(self) -> str:
        return f"lilt:{self._api.endpoint}:{os.path.abspath(self.target.inventory_path or '-')}"

    def _inventory(self) -> str:
        if not self.target.inventory_path:
            raise InvalidTarget(
                "spec.store.lilt.inventoryPath: is required: LILT cannot list incomplete "
                "uploads, the sweep reads the inventory the uploader writes with record_upload()",
                container=CONTAINER,
            )
        return self.target.inventory_path

    def _open_inventory(self) -> int | None:
        """The inventory's descriptor (None when nothing was recorded yet)."""
        path = self._inventory()
        try:
            return open_regular(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except PermissionError as error:
            raise AccessDenied(
                f"cannot read the inventory {path}: {error}", container=CONTAINER
            ) from error
        except InventoryError as error:
            raise InvalidTarget(
                f"spec.store.lilt.inventoryPath: {error}", container=CONTAINER
            ) from error
        except OSError as error:
            raise StoreError(
                f"cannot open the inventory {path}: {error}", container=CONTAINER
            ) from error

    # -- listing -------------------------------------------------------------------------------

    def containers(self) -> list[str]:
        return [CONTAINER]

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        """The inventory, streamed in pages of 1,000 records, timed by LILT's clock. One
        request (``GET /v2/upload``, through ``pace``) per listing: its Date is LILT's clock,
        its answer proves the endpoint and the key, and its items are compared with the
        inventory (uploads pending on LILT that nobody recorded are reported)."""
        if container != CONTAINER:
            raise ContainerNotFound(
                f"a LILT store has one container, {CONTAINER!r}", container=container
            )
        path = self._inventory()
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ContainerNotFound(
                f"inventory directory {directory} does not exist (is the shared volume mounted?)",
                container=CONTAINER,
            )
        fd = self._open_inventory()
        if fd is not None:
            self._check_writable(path)
        try:
            pending = pace(self._api.pending)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        index = _PendingIndex(pending, self._api.now())
        for given_up in read_unresolved(path):
            index.match(given_up)
        if fd is None:
            yield self._page([])
            self._note_unrecorded(index)
            return
        with os.fdopen(fd, "rb") as source:
            parts = read_part_times(source)
            source.seek(0)
            batch: list[InventoryRecord] = []
            pages = 0
            for number, raw in enumerate(source, 1):
                if not raw.endswith(b"\n"):
                    continue  # the last line, still being written
                record = parse_record(raw)
                if record is None:
                    if raw.strip() and b'"partAt"' not in raw:
                        log.warning("%s:%d: not an upload record, skipped", path, number)
                    continue
                newest = parts.get(record.upload_id)
                if newest is not None and (
                    record.last_part_at is None or record.last_part_at < newest
                ):
                    record = _with(record, last_part_at=newest)
                index.match(record)
                batch.append(record)
                if len(batch) == PAGE_SIZE:
                    yield self._page(batch)
                    pages += 1
                    batch = []
            if batch or not pages:
                yield self._page(batch)
        self._note_unrecorded(index)

    def _check_writable(self, path: str) -> None:
        """Can this sweep record what it cancels (take the lock, open the file for writing)?
        If not (a read-only volume, a lock that cannot be taken), no cancel is sent: see
        :meth:`abort`. Listing and measuring go on (``list``, DryRun)."""
        try:
            with inventory_lock(path, timeout=STORE_LOCK_TIMEOUT):
                os.close(open_regular(path, os.O_WRONLY | os.O_APPEND))
        except FileNotFoundError:
            return  # pruned meanwhile: nothing to record against yet
        except OSError as error:
            log.warning("the LILT inventory %s cannot be written: %s", path, error)
            with self._lock:
                self._report.not_updated = f"cannot write {path}: {error}"

    def _page(self, records: list[InventoryRecord]) -> UploadPage:
        with self._lock:
            self._records.append({r.upload_id: r for r in records})
        return UploadPage(
            [Upload(CONTAINER, r.key, r.upload_id, r.initiated) for r in records],
            self._api.store_clock(),
        )

    def _note_unrecorded(self, index: _PendingIndex) -> None:
        count, first = index.unrecorded()
        with self._lock:
            self._report.unrecorded_count = count
            self._report.unrecorded = first

    def _record(self, upload_id: str) -> InventoryRecord | None:
        """The upload's record, from the recent pages or else the file."""
        with self._lock:
            for page in reversed(self._records):
                if upload_id in page:
                    return page[upload_id]
        fd = self._open_inventory()
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as source:
            parts = read_part_times(source)
            source.seek(0)
            for raw in source:
                if raw.endswith(b"\n") and upload_id.encode() in raw:
                    record = parse_record(raw)
                    if record is not None and record.upload_id == upload_id:
                        newest = parts.get(upload_id)
                        if newest is not None and (
                            record.last_part_at is None or record.last_part_at < newest
                        ):
                            record = _with(record, last_part_at=newest)
                        return record
        return None

    # -- measuring and verifying ---------------------------------------------------------------

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        """The recorded upload: its declared size and its newest recorded part time (LILT has
        no parts listing). For an upload whose cancel LILT confirmed in this sweep, the cancel
        is repeated (through ``pace``, as a request that finishes a stop) to verify it."""
        with self._lock:
            gone = upload.upload_id in self._gone
            accepted = upload.upload_id in self._accepted
        if gone:
            raise UploadGone(f"upload {upload.upload_id} is settled in this sweep")
        if accepted:
            answer = pace(lambda: self._api.cancel(upload.upload_id, upload.key), finish=True)
            self._verify(upload, answer)
        record = self._record(upload.upload_id)
        if record is None:
            raise UploadGone(f"upload {upload.upload_id} is no longer in the inventory")
        return PartsSummary(
            size_bytes=record.size or 0,
            part_count=0,
            newest_part=record.last_part_at,
            server_time=self._api.store_clock(),
        )

    def _verify(self, upload: Upload, answer: CancelAnswer) -> None:
        """Judge the repeat of a cancel LILT confirmed: raises UploadGone (the cancel took
        effect) or CancelUnverified (no answer about the upload)."""
        with self._lock:
            self._accepted.discard(upload.upload_id)
        if answer.confirmed or answer.refused or answer.not_found:
            # The repeat is the very request LILT has just accepted: a second confirmation
            # (an idempotent cancel) or any refusal can only come from the upload's new state.
            with self._lock:
                self._gone.add(upload.upload_id)
            raise UploadGone(f"LILT answered the repeated cancel {answer.describe()}")
        self._unsettled(upload, "CancelUnverified", accepted=True)
        raise CancelUnverified(
            f"LILT confirmed the cancel but answered its repeat {answer.describe()}: "
            "not counted; cancelled again next sweep",
            container=CONTAINER,
        )

    # -- cancelling ----------------------------------------------------------------------------

    def abort(self, upload: Upload) -> None:
        """One cancel, judged (see the package docstring for every answer). None is sent once
        the inventory could not be rewritten in this sweep: a record that cannot be pruned
        after its upload was counted freed could be counted again by a later sweep."""
        with self._lock:
            not_updated = self._report.not_updated
        if not_updated:
            raise InventoryNotUpdated(
                f"not cancelled: the inventory cannot record what was cancelled ({not_updated})",
                container=CONTAINER,
            )
        answer = self._api.cancel(upload.upload_id, upload.key)
        record = self._record(upload.upload_id)
        earlier = record is not None and record.cancel_accepted is not None
        if answer.confirmed:
            with self._lock:
                self._accepted.add(upload.upload_id)
            return
        if earlier and (answer.refused or answer.not_found):
            # LILT confirmed our cancel in an earlier sweep that could not verify it: this is
            # the answer about the upload's state that sweep lacked. Ours, counted now, once.
            with self._lock:
                self._gone.add(upload.upload_id)
            return
        if answer.not_found:
            self._not_found(upload)
            raise UploadGone(f"LILT does not know upload {upload.upload_id}: {answer.message}")
        outcome = "CancelRefused" if answer.refused else "StoreError"
        self._unsettled(upload, outcome, accepted=earlier)
        text = f"LILT did not cancel upload {upload.upload_id}: {answer.describe()}"
        if answer.refused:
            raise CancelRefused(text, container=CONTAINER)
        raise StoreError(text, container=CONTAINER)

    def _not_found(self, upload: Upload) -> None:
        """A first cancel answered 404: reported; the record moves to the unresolved file
        (only once LILT answered our listing call here, so that a misconfigured endpoint's
        404s never empty the inventory)."""
        if not self._api.endpoint_confirmed:
            with self._lock:
                self._report.not_found_kept += 1
                self._report.not_found.append(upload.key)
            return
        with self._lock:
            self._report.not_found.append(upload.key)
        self._give_up(upload, "UploadNotFound", report=False)

    def _unsettled(self, upload: Upload, outcome: str, *, accepted: bool) -> None:
        """A sweep whose cancel of this upload did not settle: counted in its record; the
        MAX_CANCEL_SWEEPS-th such sweep gives the record up."""
        record = self._record(upload.upload_id)
        if record is None:
            return
        attempts = record.attempts + 1
        fields: dict[str, Any] = {
            "attempts": attempts,
            "lastOutcome": outcome,
            "lastAttempt": rfc3339(self._api.now()),
        }
        if accepted and record.cancel_accepted is None:
            fields["cancelAccepted"] = rfc3339(self._api.now())
        if attempts >= MAX_CANCEL_SWEEPS:
            self._give_up(upload, outcome, fields=fields)
        else:
            self._queue(annotate={upload.upload_id: fields})

    def _give_up(
        self,
        upload: Upload,
        outcome: str,
        *,
        fields: dict[str, Any] | None = None,
        report: bool = True,
    ) -> None:
        fields = dict(fields or {})
        fields.setdefault("lastOutcome", outcome)
        fields.setdefault("lastAttempt", rfc3339(self._api.now()))
        fields["givenUp"] = rfc3339(self._api.now())
        with self._lock:
            self._gone.add(upload.upload_id)
            if report:
                self._report.given_up.append((upload.key, outcome))
        self._queue(give_up={upload.upload_id: fields})

    # -- the inventory's rewrites --------------------------------------------------------------

    def forget(self, upload: Upload) -> None:
        """Queue the record for pruning; the file is rewritten in batches (see FORGET_BATCH)."""
        with self._lock:
            self._gone.add(upload.upload_id)
        self._queue(prune={upload.upload_id})

    def _queue(
        self,
        *,
        prune: set[str] | None = None,
        annotate: dict[str, dict[str, Any]] | None = None,
        give_up: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        with self._lock:
            changes = self._changes
            if not len(changes):
                changes.since = time.monotonic()
            changes.prune |= prune or set()
            changes.annotate.update(annotate or {})
            changes.give_up.update(give_up or {})
            due = (
                len(changes) >= FORGET_BATCH or time.monotonic() - changes.since >= FORGET_MAX_DELAY
            )
        if due:
            try:
                self.flush()
            except OSError as error:  # retried on the next flush; reported by findings()
                log.warning("could not update the LILT inventory: %s", error)

    def flush(self) -> int:
        """Apply the queued changes to the inventory. Returns the records pruned."""
        with self._lock:
            changes, self._changes = self._changes, _Changes()
        if not len(changes):
            return 0
        try:
            done = update_inventory(
                self._inventory(),
                prune=changes.prune,
                annotate=changes.annotate,
                give_up=changes.give_up,
                lock_timeout=STORE_LOCK_TIMEOUT,
            )
        except BaseException as error:
            with self._lock:  # try again on the next flush
                self._changes.prune |= changes.prune
                for upload_id, fields in changes.annotate.items():
                    self._changes.annotate.setdefault(upload_id, fields)
                for upload_id, fields in changes.give_up.items():
                    self._changes.give_up.setdefault(upload_id, fields)
                if isinstance(error, OSError):
                    self._report.not_updated = str(error)
            raise
        with self._lock:
            self._report.not_updated = None
        return done.removed

    def findings(self, container: str) -> list[StoreError]:
        """What this sweep noticed beyond single calls, once its uploads are done: first
        cancels answered 404, records given up, pending uploads nobody recorded, an inventory
        that could not be updated. The engine reports each as a sweep issue."""
        with contextlib.suppress(OSError):  # noted in the report
            self.flush()
        with self._lock:
            report, self._report = self._report, _Report()
        unresolved = unresolved_path(self.target.inventory_path or "-")
        found: list[StoreError] = []
        if report.not_found:
            moved = len(report.not_found) - report.not_found_kept
            where = (
                f"their records were moved to {unresolved}"
                if not report.not_found_kept
                else f"{moved} record(s) moved to {unresolved}, the others kept"
            )
            found.append(
                UploadNotFound(
                    f"{len(report.not_found)} upload(s) answered 404 to their first cancel "
                    f"(first: {report.not_found[0]}): LILT does not know them for this API key. "
                    "Completed (the uploader should call forget_upload on completion), "
                    f"cancelled elsewhere, or initiated under another key; {where}",
                    container=CONTAINER,
                )
            )
        if report.given_up:
            key, outcome = report.given_up[0]
            found.append(
                CancelUnresolved(
                    f"{len(report.given_up)} upload(s) not settled after {MAX_CANCEL_SWEEPS} "
                    f"sweeps (first: {key}, last answer {outcome}); no more cancels are sent, "
                    f"their records were moved to {unresolved}: LILT may still hold them",
                    container=CONTAINER,
                )
            )
        if report.unrecorded_count:
            first = report.unrecorded[0]
            created = rfc3339(first.created_at) if first.created_at else "?"
            found.append(
                UnrecordedUploads(
                    f"LILT lists {report.unrecorded_count} pending upload(s) older than "
                    f"{int(UNRECORDED_GRACE.total_seconds() // 60)} min that the inventory "
                    f"does not record (first: id {first.id} {first.filename!r} created "
                    f"{created}): the uploader must record every upload it initiates "
                    "(record_upload or `mpu-janitor lilt-record`), or they are never cancelled",
                    container=CONTAINER,
                )
            )
        if report.not_updated:
            found.append(
                InventoryNotUpdated(
                    f"the inventory could not be updated ({report.not_updated}); "
                    "retried at the end of the sweep and next sweep",
                    container=CONTAINER,
                )
            )
        return found

    def close(self) -> None:
        """Apply what is still queued, then drop the connections. A rewrite that fails (a
        read-only volume, say) is logged, not raised: the sweep's result stands, and the next
        sweep's cancels settle those records again."""
        try:
            self.flush()
        except OSError:
            log.warning(
                "could not prune the LILT inventory %s", self.target.inventory_path, exc_info=True
            )
        finally:
            self._api.close()


def _with(record: InventoryRecord, **changes: Any) -> InventoryRecord:
    return dataclasses.replace(record, **changes)
