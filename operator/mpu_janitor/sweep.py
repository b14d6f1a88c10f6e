"""The sweep engine: list, match, measure, abort, verify, report (DESIGN section 3).

One sweep streams a store's listing page by page, measures each in-scope upload from its
parts listing, skips active ones, aborts the eligible ones (unless DryRun), proves each abort
with a second parts listing, and counts freed bytes only for uploads verified gone. It knows
nothing of Kopf or Prometheus: the caller gets one typed SweepResult.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from mpu_janitor.pacing import Cancelled, ConcurrencyLimit, Pacer
from mpu_janitor.policy import MatchSpec, Policy
from mpu_janitor.stores.base import (
    AbortRefused,
    BulkVerifier,
    PartsSummary,
    Store,
    StoreError,
    StoreUnreachable,
    Throttled,
    Upload,
    UploadGone,
    UploadReplaced,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

ABORT_ATTEMPTS = 3  # abort + verify rounds before an upload counts as failed
# Aborts proven gone by one listing (stores that are BulkVerifiers): a batch is verified once it
# holds this many, or more as the container and the verifying listings grow (batch_size).
BULK_VERIFY_MIN_BATCH = 64
BULK_VERIFY_MAX_BATCH = 8192  # about 2.5 MB of pending aborts at most
VERIFY_BACKOFF_SECONDS = 0.5  # doubled each round: the stores say an abort may need repeating
MAX_ISSUES = 20  # status stays small: keep the first few messages, count the rest
# Issues that report the safety rules at work, not a failure: they leave the sweep Ready.
NOTICE_REASONS = frozenset({"ObjectAtKey", "ObjectCheckFailed"})


def inconclusive(error: StoreError) -> bool:
    """A verifying listing that failed without a refusal (no answer, a server error, a cut or
    unreadable answer): it proves neither that the upload is gone nor that it is there."""
    return type(error) in (StoreError, StoreUnreachable, Throttled)


@dataclass
class BucketStats:
    """What one sweep saw and did in one bucket or vault."""

    scanned: int = 0  # uploads in scope (prefixes and globs)
    incomplete_uploads: int = 0  # in scope and present when measured
    incomplete_bytes: int = 0
    eligible: int = 0  # old enough and quiet: what DryRun would abort
    eligible_bytes: int = 0
    skipped_active: int = 0  # old enough but a part arrived within the quiet period
    skipped_no_clock: int = 0  # not judged: the store sent no Date header to judge age on
    aborted: int = 0  # verified gone after our abort
    already_gone: int = 0  # vanished before our abort took effect: not freed by us
    replaced: int = 0  # 412 on a conditional abort
    protected: int = 0  # not aborted: an object at the key could be deleted with the upload
    deferred: int = 0  # eligible but past maxAbortsPerSweep
    failed: int = 0
    freed_bytes: int = 0
    oldest_age_seconds: float = 0.0  # of the uploads still there (not gone in this sweep)
    listed: bool = False  # the listing completed (gauges are trustworthy)

    def __add__(self, other: BucketStats) -> BucketStats:
        """Counters added, the oldest age the older of both, ``listed`` only if both were."""
        added: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if item.name == "oldest_age_seconds":
                added[item.name] = max(mine, theirs)
            elif item.name == "listed":
                added[item.name] = mine and theirs
            else:
                added[item.name] = mine + theirs
        return BucketStats(**added)


@dataclass(frozen=True)
class SweepIssue:
    reason: str
    message: str
    container: str | None = None


@dataclass
class SweepResult:
    namespace: str
    policy: str
    store: str
    dry_run: bool
    started: datetime
    finished: datetime | None = None
    buckets: dict[str, BucketStats] = field(default_factory=dict)
    issues: list[SweepIssue] = field(default_factory=list)
    errors_by_reason: Counter[str] = field(default_factory=Counter)
    cancelled: bool = False

    @property
    def totals(self) -> BucketStats:
        """Every container's counters added up (``oldest_age_seconds``: the oldest of all;
        ``listed``: every listing completed)."""
        return sum(self.buckets.values(), BucketStats(listed=True))

    def total(self, name: str) -> int:
        """One counter added up over every container (``total("aborted")``)."""
        return int(getattr(self.totals, name))

    @property
    def failed(self) -> int:
        return self.totals.failed

    @property
    def freed_bytes(self) -> int:
        return self.totals.freed_bytes

    @property
    def remaining_bytes(self) -> int:
        """Bytes still held by incomplete uploads in scope after this sweep."""
        totals = self.totals
        return max(0, totals.incomplete_bytes - totals.freed_bytes)

    @property
    def failures(self) -> list[SweepIssue]:
        return [issue for issue in self.issues if issue.reason not in NOTICE_REASONS]

    @property
    def ok(self) -> bool:
        return not self.failures and self.failed == 0 and not self.cancelled

    @property
    def reason(self) -> str:
        """The Ready condition reason this sweep earns."""
        if self.ok:
            return "SweepSucceeded"
        if self.cancelled:
            return "SweepCancelled"
        reasons = [issue.reason for issue in self.failures]
        listed_any = any(stats.listed for stats in self.buckets.values())
        if reasons and not listed_any:
            return reasons[0]
        if "Throttled" in reasons and len(set(reasons)) == 1:
            return "Throttled"
        return "PartialFailure"

    @property
    def duration_seconds(self) -> float:
        end = self.finished or datetime.now(UTC)
        return (end - self.started).total_seconds()

    def summary(self) -> dict[str, Any]:
        """The JSON summary of the CLI and the ``lastSweep`` of the status (camelCase)."""
        t = self.totals
        out: dict[str, Any] = {
            "policy": f"{self.namespace}/{self.policy}",
            "store": self.store,
            "mode": "DryRun" if self.dry_run else "Abort",
            "startTime": _rfc3339(self.started),
            "completionTime": _rfc3339(self.finished) if self.finished else None,
            "scanned": t.scanned,
            "eligible": t.eligible,
            "eligibleBytes": t.eligible_bytes,
            "aborted": t.aborted,
            "skippedActive": t.skipped_active,
            "skippedNoClock": t.skipped_no_clock,
            "alreadyGone": t.already_gone,
            "replaced": t.replaced,
            "protected": t.protected,
            "deferred": t.deferred,
            "failed": self.failed,
            "freedBytes": self.freed_bytes,
            "incompleteUploads": t.incomplete_uploads,
            "incompleteBytes": t.incomplete_bytes,
            "remainingBytes": self.remaining_bytes,
            "reason": self.reason,
            "errors": [
                {"reason": i.reason, "message": i.message, "bucket": i.container}
                for i in self.issues
            ],
        }
        return out


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------
# One lock per store target (endpoint + bucket or vault), shared by every sweep in the process.


class TargetLocks:
    """Two policies that cover the same bucket never sweep it at the same time."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, key: str, cancel: threading.Event) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        while not lock.acquire(timeout=0.2):
            if cancel.is_set():
                raise Cancelled()
        try:
            yield
        finally:
            lock.release()


TARGET_LOCKS = TargetLocks()

ProgressCallback = Callable[["SweepResult"], None]


# --------------------------------------------------------------------------------------------


class Verdict(enum.Enum):
    """What the policy's match says of one measured upload (prefixes and globs aside)."""

    YOUNG = "young"  # younger than olderThan
    ACTIVE = "active"  # old enough, but a part arrived within the quiet period
    ELIGIBLE = "eligible"  # old enough and quiet: what an Abort sweep aborts
    UNJUDGED = "unjudged"  # the store gave no clock to judge on


def judge(match: MatchSpec, age: timedelta | None, parts: PartsSummary) -> Verdict:
    """The one rule for age and quiet period, shared by the sweep and the inventory. Both are
    judged on the store's clock only: without it (no Date header) nothing is judged."""
    if age is None:
        return Verdict.UNJUDGED
    if age < match.older_than:
        return Verdict.YOUNG
    if parts.newest_part is not None:
        if parts.server_time is None:
            return Verdict.UNJUDGED
        if parts.server_time - parts.newest_part < match.quiet_period:
            return Verdict.ACTIVE
    return Verdict.ELIGIBLE


class Fate(enum.Enum):
    """What became of one upload the sweep acted on."""

    GONE = "gone"  # verified gone (freed by us, or already gone)
    KEPT = "kept"  # still there after the sweep (not eligible, refused, failed, ...)
    PENDING = "pending"  # aborted, waiting for its batch's verifying listing


@dataclass(frozen=True, slots=True)
class _Unverified:
    """An upload aborted with a clean answer, waiting for a listing to prove it gone."""

    upload: Upload
    size: int
    age: timedelta
    position: object


class RecentUploads:
    """The upload ids a sweep listed most recently, so a repeat is counted (and acted on) once.

    Repeats a listing can produce: the first upload of a page repeating the last of the
    previous one (stores whose markers are inclusive), and an upload listed again while its
    first sighting is still being measured or aborted (where a repeated abort answers 204, both
    would be "verified gone" and its bytes counted twice). Both lie within the last few pages,
    and the uploads in flight are among the last ``2 x concurrency`` listed, so a window of the
    last ``capacity`` ids (4,096 by default, more than four pages of 1,000 and than the largest
    in-flight window, 512) keeps memory flat. A repeat from further back (a store restarting its
    listing from the top, which the stores here never do: each keeps its marker and retries one
    page) would be measured again; its parts listing then answers NoSuchUpload if this sweep
    aborted it, so it can be counted "already gone" but never freed twice."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[tuple[str, str], None] = OrderedDict()

    def first_sighting(self, upload: Upload) -> bool:
        key = (upload.container, upload.upload_id)
        if key in self._ids:
            return False
        self._ids[key] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


NO_CLOCK_MESSAGE = (
    "the store answered without a Date header: ages and quiet periods are judged on the "
    "store's clock only, never on ours, so its uploads were skipped unjudged (skippedNoClock)"
)


class _Sweep:
    """The state of one running sweep (shared by its worker threads under one lock)."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        cancel: threading.Event,
        progress: ProgressCallback | None = None,
        verify_within: float | None = None,
    ) -> None:
        self.policy = policy
        self.progress = progress
        # A batch of aborts is proven no later than this after its first abort was answered
        # (None: when it is full, or at the container's end): the operator's checkpoints then
        # hold every abort answered more than this before them, so a killed process loses
        # no more than that (its next sweep lists nothing of an abort it made).
        self.verify_within = verify_within
        self.batch_timer: threading.Timer | None = None
        self.aged_batches = 0  # batches being proven by their timer, under the lock
        self.store = store
        self.cancel = cancel
        self.pacer = Pacer(policy.limits.requests_per_second, cancel=cancel)
        # limits.concurrency is the cap: the sweep starts lower and adapts to the store's answers.
        self.concurrency = ConcurrencyLimit(policy.limits.concurrency)
        self.pacer.concurrency = self.concurrency
        self.lock = threading.Lock()
        self.abort_budget = policy.limits.max_aborts_per_sweep
        self.recent = RecentUploads(max(4096, 4 * policy.limits.concurrency))
        self.no_clock_reported: set[str] = set()
        verifier = store if callable(getattr(store, "proven_gone", None)) else None
        self.bulk: BulkVerifier | None = verifier  # type: ignore[assignment]
        self.unverified: list[_Unverified] = []  # this container's, under the lock
        self.listed = 0  # uploads submitted in this container
        self.last_listing = 0  # uploads the last verifying listing held
        self.verifying = 0  # verifying listings on their way, under the lock
        # Aborts a verifying listing did not prove gone, waiting for the sweep's own thread to
        # hand each to a worker with a slot of its own (a worker that holds a slot never waits
        # for another, so the limit can never deadlock); at most one batch.
        self.unproven: deque[_Unverified] = deque()
        self.result = SweepResult(
            namespace=policy.namespace,
            policy=policy.name,
            store=store.kind,
            dry_run=policy.dry_run,
            started=datetime.now(UTC),
        )

    # -- bookkeeping ---------------------------------------------------------------------------

    def stats(self, container: str) -> BucketStats:
        return self.result.buckets.setdefault(container, BucketStats())

    @contextlib.contextmanager
    def counting(self, container: str) -> Iterator[BucketStats]:
        """The counters of one container, held under the sweep's lock while written."""
        with self.lock:
            yield self.stats(container)

    def issue(self, reason: str, message: str, container: str | None) -> None:
        with self.lock:
            self.result.errors_by_reason[reason] += 1
            if len(self.result.issues) < MAX_ISSUES:
                self.result.issues.append(SweepIssue(reason, message, container))

    def no_clock(self, container: str) -> None:
        """An upload whose age (or quiet period) cannot be judged on the store's clock."""
        with self.counting(container) as stats:
            stats.skipped_no_clock += 1
            first = container not in self.no_clock_reported
            self.no_clock_reported.add(container)
        if first:
            self.issue("NoStoreClock", NO_CLOCK_MESSAGE, container)

    # -- every store request of the sweep --------------------------------------------------------

    def pace(self, request: Callable[[], T], *, finish: bool = False) -> T:
        """The engine's ``Pace`` for one upload's requests (parts listing, abort); their answer
        times steer the adaptive concurrency."""
        return self.pacer.send(request, finish=finish)

    def finishing_pace(self, request: Callable[[], T], *, finish: bool = False) -> T:
        """The ``Pace`` of a verifying parts listing: every page goes out even during a stop."""
        return self.pacer.send(request, finish=True)

    def listing_pace(self, request: Callable[[], T], *, finish: bool = False) -> T:
        """The ``Pace`` of a container's listing: its pages' size, not the store's load, sets
        their answer time, so they do not steer the concurrency."""
        return self.pacer.send(request, finish=finish, timed=False)

    def verifying_listing_pace(self, request: Callable[[], T], *, finish: bool = False) -> T:
        """The ``Pace`` of a listing that verifies aborts already sent: goes out during a stop."""
        return self.pacer.send(request, finish=True, timed=False)

    # -- one upload ------------------------------------------------------------------------------

    def process(self, upload: Upload, age: timedelta, position: object = None) -> None:
        """One upload, in the slot of the concurrency limit its submitter took for it."""
        try:
            self._guarded(upload, age, position)
        finally:
            self.concurrency.release()

    def _guarded(self, upload: Upload, age: timedelta, position: object) -> None:
        container = upload.container
        try:
            if self.cancel.is_set():
                raise Cancelled()  # queued when the stop order came: dropped untouched
            self._process(upload, age, position)
        except Cancelled:
            with self.lock:
                self.result.cancelled = True
        except StoreError as error:
            with self.counting(container) as stats:
                stats.failed += 1
            self.issue(error.reason, f"{upload.key}: {error}", container)
        except Exception as error:  # one bad upload never stops the sweep
            log.exception("unexpected error on an upload in %s", container)
            with self.counting(container) as stats:
                stats.failed += 1
            self.issue("InternalError", f"{type(error).__name__}: {error}", container)

    def _process(self, upload: Upload, age: timedelta, position: object) -> None:
        container = upload.container
        try:
            parts: PartsSummary = self.store.measure(upload, self.pace)
        except UploadGone:
            with self.counting(container) as stats:
                stats.already_gone += 1
            return
        with self.counting(container) as stats:
            stats.incomplete_uploads += 1
            stats.incomplete_bytes += parts.size_bytes
        fate = Fate.KEPT
        try:
            verdict = judge(self.policy.match, age, parts)
            fate = self._act(upload, verdict, parts.size_bytes, age, position)
        finally:
            if fate is Fate.KEPT:  # the oldest-age figure: uploads still there after the sweep
                self._still_there(container, age)

    def _still_there(self, container: str, age: timedelta) -> None:
        with self.counting(container) as stats:
            stats.oldest_age_seconds = max(stats.oldest_age_seconds, age.total_seconds())

    def _act(
        self, upload: Upload, verdict: Verdict, size: int, age: timedelta, position: object
    ) -> Fate:
        """Count or abort one measured upload by its verdict."""
        container = upload.container
        if verdict is Verdict.YOUNG:
            return Fate.KEPT
        if verdict is Verdict.UNJUDGED:
            self.no_clock(container)
            return Fate.KEPT
        if verdict is Verdict.ACTIVE:
            with self.counting(container) as stats:
                stats.skipped_active += 1
            return Fate.KEPT
        with self.counting(container) as stats:
            stats.eligible += 1
            stats.eligible_bytes += size
        if self.policy.dry_run:
            return Fate.KEPT
        with self.counting(container) as stats:
            if self.abort_budget <= 0:
                stats.deferred += 1
                return Fate.KEPT
            self.abort_budget -= 1
        return self._abort_and_verify(upload, size, age, position)

    def _abort_and_verify(
        self,
        upload: Upload,
        size: int,
        age: timedelta,
        position: object = None,
        *,
        aborted_once: bool = False,
    ) -> Fate:
        """Abort, then prove it gone. A stop order prevents every new abort, never the
        verification of one already sent.

        Where the store can prove many aborts gone with one listing (a ``BulkVerifier``) and
        the first abort got a clean answer, the upload waits for its batch's listing (PENDING);
        one the listing does not prove gone comes back here with ``aborted_once``, to the
        rounds every other upload goes through: a parts listing, then the abort again.

        An abort that got no answer (connection dropped or timed out after the client's
        retries) may still have been carried out, and a verifying listing that fails without a
        refusal proves nothing either way: both go to the next round (listing, then abort again), so
        an abort the store carried out is counted once it is seen gone, and an upload still
        listed after every round is counted failed (the next sweep tries again)."""
        container = upload.container
        last_error: StoreError | None = None
        for attempt in range(ABORT_ATTEMPTS):
            if not (aborted_once and attempt == 0):
                try:
                    self.pace(lambda: self.store.abort(upload))
                except UploadGone:
                    if attempt == 0:
                        # Gone before our first abort: someone else (or the store) freed it.
                        with self.counting(container) as stats:
                            stats.already_gone += 1
                        return Fate.GONE
                    # Our earlier abort took effect after its verification listing.
                    self._freed(upload, size)
                    return Fate.GONE
                except UploadReplaced:
                    with self.counting(container) as stats:
                        stats.replaced += 1
                    return Fate.KEPT
                except AbortRefused as refused:
                    with self.counting(container) as stats:
                        stats.protected += 1
                    self.issue(refused.reason, str(refused), container)
                    return Fate.KEPT
                except StoreError as error:
                    # No usable answer: no connection or a timeout; and, where a listing can
                    # read the store's state back (S3 stores: BulkVerifier), a server error
                    # after the client's retries (an earlier attempt may have been carried out
                    # and its answer lost). A refusal (AccessDenied, ...) is an answer: it
                    # fails. LILT and Glacier keep their documented outcome of a server error:
                    # failed, cancelled again on a later sweep.
                    if not inconclusive(error) or (
                        self.bulk is None and not isinstance(error, StoreUnreachable)
                    ):
                        raise
                    last_error = error
                    log.info("abort of %s got no usable answer (%s); verifying", upload.key, error)
                else:
                    if attempt == 0 and self.bulk is not None and position is not None:
                        self._await_listing(_Unverified(upload, size, age, position))
                        return Fate.PENDING
            try:
                self.store.measure(upload, self.finishing_pace)
            except UploadGone:
                self._freed(upload, size)
                return Fate.GONE
            except StoreError as error:
                if not inconclusive(error):
                    raise
                last_error = error
                log.info("verifying listing of %s failed (%s); repeating", upload.key, error)
            else:
                # Parts still listed: a part upload in flight may have landed; abort again.
                log.info("parts still listed after abort of %s; repeating", upload.key)
            self.pacer.sleep(VERIFY_BACKOFF_SECONDS * 2**attempt)
        with self.counting(container) as stats:
            stats.failed += 1
        if last_error is not None:
            self.issue(
                last_error.reason,
                f"{upload.key}: abort not verified after {ABORT_ATTEMPTS} rounds: {last_error}",
                container,
            )
        else:
            self.issue(
                "AbortNotVerified",
                f"{upload.key}: parts still listed after {ABORT_ATTEMPTS} aborts",
                container,
            )
        return Fate.KEPT

    # -- aborts proven gone in batches, by one listing each ----------------------------------------

    def batch_size(self) -> int:
        """A batch grows with the container and with what the last verifying listing cost (a
        listing may hold the whole bucket: MinIO answers every upload at once, so a batch of a
        quarter of it keeps the uploads listed to verify within about four times the bucket),
        bounded so memory stays flat."""
        wanted = max(self.listed // 16, self.last_listing // 4)
        return min(BULK_VERIFY_MAX_BATCH, max(BULK_VERIFY_MIN_BATCH, wanted))

    def _await_listing(self, item: _Unverified) -> None:
        """Queue an aborted upload for its batch's listing; the worker that fills the batch
        sends that listing."""
        with self.lock:
            self.unverified.append(item)
            waiting = len(self.unverified)
            # While a verifying listing is on its way, a full batch grows until it is back (up
            # to the largest batch): a listing may hold the whole bucket, and until the first
            # comes back, batches of the least size would each send one.
            if waiting < self.batch_size() or (self.verifying and waiting < BULK_VERIFY_MAX_BATCH):
                if waiting == 1 and self.verify_within is not None:
                    self.batch_timer = threading.Timer(
                        self.verify_within, self._verify_aged, args=(self.unverified,)
                    )
                    self.batch_timer.daemon = True
                    self.batch_timer.start()
                return
            batch = self._take_batch()
        self.verify_batch(batch)

    def _take_batch(self) -> list[_Unverified]:
        """The pending batch, replaced by an empty one (under the lock)."""
        batch, self.unverified = self.unverified, []
        if self.batch_timer is not None:
            self.batch_timer.cancel()
            self.batch_timer = None
        return batch

    def _verify_aged(self, batch: list[_Unverified]) -> None:
        """``verify_within`` after a batch's first abort: prove it now, full or not (unless it
        was taken meanwhile), and report the counts (a checkpoint may be due)."""
        with self.lock:
            if self.unverified is not batch or not batch:
                return
            self._take_batch()
            self.aged_batches += 1
        try:
            self.verify_batch(batch)
        finally:
            with self.lock:
                self.aged_batches -= 1
        if self.progress is not None:
            self.progress(self.result)

    def flush_unverified(self) -> None:
        """Verify what is left in the batch (the end of a container, or a stop order)."""
        with self.lock:
            batch = self._take_batch()
        if batch:
            self.verify_batch(batch)

    def verify_batch(self, batch: list[_Unverified]) -> None:
        """One listing (every page of it goes out even during a stop: these aborts were sent)
        proves some gone; the others are verified one by one, each as a task of its own."""
        assert self.bulk is not None
        container = batch[0].upload.container
        ids = {item.upload.upload_id for item in batch}
        gone: frozenset[str] = frozenset()
        with self.lock:
            self.verifying += 1
        try:
            proof = self.bulk.proven_gone(
                container,
                [(item.upload, item.position) for item in batch],
                self.verifying_listing_pace,
            )
            gone = proof.gone
            with self.lock:
                self.last_listing = proof.listed
        except Exception as error:  # proves nothing: every upload is verified on its own
            log.info(
                "verifying listing of %d aborts in %s failed (%s)", len(batch), container, error
            )
        finally:
            with self.lock:
                self.verifying -= 1
        unproven = []
        for item in batch:
            if item.upload.upload_id in gone and item.upload.upload_id in ids:
                self._freed(item.upload, item.size)
            else:
                unproven.append(item)
        with self.lock:
            self.unproven.extend(unproven)

    def verify_one(self, item: _Unverified) -> None:
        """An aborted upload its batch's listing did not prove gone: the parts listing, then
        the abort again, as for every upload on stores that cannot prove it by listing."""
        upload = item.upload
        fate = Fate.KEPT
        try:
            fate = self._abort_and_verify(upload, item.size, item.age, aborted_once=True)
        except Cancelled:
            with self.lock:
                self.result.cancelled = True
        except StoreError as error:
            with self.counting(upload.container) as stats:
                stats.failed += 1
            self.issue(error.reason, f"{upload.key}: {error}", upload.container)
        except Exception as error:
            log.exception("unexpected error verifying an abort in %s", upload.container)
            with self.counting(upload.container) as stats:
                stats.failed += 1
            self.issue("InternalError", f"{type(error).__name__}: {error}", upload.container)
        finally:
            self.concurrency.release()
            if fate is Fate.KEPT:
                self._still_there(upload.container, item.age)

    def _freed(self, upload: Upload, size: int) -> None:
        with self.counting(upload.container) as stats:
            stats.aborted += 1
            stats.freed_bytes += size
        try:
            self.store.forget(upload)
        except Exception:  # the upload is gone either way; a stale inventory entry is harmless
            log.warning("could not prune %s from the store's inventory", upload.key, exc_info=True)

    def report_findings(self, container: str) -> None:
        """Conditions a store noticed beyond single calls, once the container's uploads are
        done (LILT: first cancels answered 404, given-up records, unrecorded uploads)."""
        findings: Callable[[str], list[StoreError]] | None = getattr(self.store, "findings", None)
        if findings is None:
            return
        try:
            found = findings(container)
        except Exception:
            log.exception("a store's findings failed")
            return
        for finding in found:
            self.issue(finding.reason, str(finding), container)

    # -- one container -----------------------------------------------------------------------------

    def sweep_container(
        self, container: str, pool: ThreadPoolExecutor, progress: ProgressCallback | None
    ) -> None:
        futures: set[Future[None]] = set()

        def finished(future: Future[None]) -> None:
            with self.lock:
                futures.discard(future)
            if progress is not None:  # after every upload: the caller decides how often to show
                progress(self.result)

        def submit(task: Callable[[], None]) -> None:
            """Hand a task holding a slot (taken by the caller, released by the task)."""
            try:
                future = pool.submit(task)
            except BaseException:
                self.concurrency.release()
                raise
            with self.lock:
                futures.add(future)
            future.add_done_callback(finished)

        def hand_out_unproven() -> None:
            """Aborts already sent: verified even during a stop (the slot wait is not
            cancellable; slots come back as the running uploads finish)."""
            while True:
                with self.lock:
                    if not self.unproven:
                        return
                    item = self.unproven.popleft()
                self.concurrency.acquire()
                submit(functools.partial(self.verify_one, item))

        def finish_all() -> None:
            while True:
                hand_out_unproven()
                with self.lock:
                    pending = list(futures)
                if not pending:
                    with self.lock:
                        if not self.unproven and not self.aged_batches:
                            return
                        proving = not self.unproven
                    if proving:  # a batch proven by its timer: its leftovers come next
                        time.sleep(0.01)
                    continue
                pending[0].result()

        with self.lock:
            self.stats(container)
            self.listed = 0
            self.last_listing = 0
            self._take_batch()
        pages = self.store.list_uploads(container, self.policy.match.prefixes, self.listing_pace)
        try:
            for page in pages:
                for upload in page.uploads:
                    if self.cancel.is_set():
                        raise Cancelled()
                    if not self.policy.match.matches_key(upload.key):
                        continue
                    if not self.recent.first_sighting(upload):
                        continue  # a listing repeat: this upload is already counted
                    with self.counting(container) as stats:
                        stats.scanned += 1
                    if page.server_time is None:
                        self.no_clock(container)  # Verdict.UNJUDGED, without measuring
                        continue
                    age = page.server_time - upload.initiated
                    hand_out_unproven()
                    # A slot of the adaptive limit before the upload goes to a worker (the
                    # worker releases it): no more uploads wait in the pool than run.
                    self.concurrency.acquire(self.cancel)
                    self.listed += 1
                    submit(functools.partial(self.process, upload, age, page.position))
                if progress is not None:
                    progress(self.result)
            with self.lock:
                self.stats(container).listed = True
        finally:
            # Wait for this container's uploads, and prove every abort sent, before its lock
            # is released (a stop order included: what was aborted is verified and counted).
            finish_all()
            if self.bulk is not None:
                self.flush_unverified()
                finish_all()


def run_sweep(
    policy: Policy,
    store: Store,
    *,
    cancel: threading.Event | None = None,
    progress: ProgressCallback | None = None,
    locks: TargetLocks = TARGET_LOCKS,
    verify_within: float | None = None,
) -> SweepResult:
    """One sweep of every bucket or vault of a policy. Never raises for store trouble: every
    failure is counted and described in the result. ``verify_within``: seconds after which an
    answered abort waiting for its batch's listing is proven anyway (the operator's checkpoint
    interval); None: batches are proven when full and at each container's end."""
    cancel = cancel or threading.Event()
    sweep = _Sweep(policy, store, cancel, progress, verify_within)
    result = sweep.result
    if progress is not None:
        progress(result)  # from the start: a live display reads the counts as they change
    try:
        containers = store.containers()
    except StoreError as error:
        sweep.issue(error.reason, str(error), None)
        containers = []
    with ThreadPoolExecutor(
        max_workers=policy.limits.concurrency, thread_name_prefix=f"sweep-{policy.name}"
    ) as pool:
        for container in containers:
            if cancel.is_set():
                result.cancelled = True
                break
            try:
                with locks.hold(f"{store.target_id}|{container}", cancel):
                    try:
                        sweep.sweep_container(container, pool, progress)
                    finally:
                        sweep.report_findings(container)
            except Cancelled:
                result.cancelled = True
                break
            except StoreError as error:
                sweep.issue(error.reason, str(error), container)
            except Exception as error:
                log.exception("unexpected error listing %s", container)
                sweep.issue("InternalError", f"{type(error).__name__}: {error}", container)
    if cancel.is_set():  # a stop order came mid-sweep: what it skipped is unknown
        result.cancelled = True
    result.finished = datetime.now(UTC)
    if progress is not None:
        progress(result)
    return result


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InventoryItem:
    upload: Upload
    age: timedelta | None  # None: the store sent no Date header, so no age is judged
    size_bytes: int
    part_count: int
    newest_part: datetime | None
    eligible: bool
    active: bool
    verdict: Verdict


def inventory(
    policy: Policy, store: Store, *, cancel: threading.Event | None = None
) -> Iterator[InventoryItem]:
    """The uploads a policy covers, measured, without changing anything (``mpu-janitor list``),
    in listing order. Parts listings run ``limits.concurrency`` at a time under the policy's
    request rate, with a bounded window ahead, so memory stays flat. Raises StoreError on a
    listing failure (and on a measuring failure, which a read-only listing cannot hide)."""
    own_cancel = cancel is None
    cancel = cancel or threading.Event()
    pacer = Pacer(policy.limits.requests_per_second, cancel=cancel)
    match = policy.match
    window = policy.limits.concurrency * 2
    recent = RecentUploads(max(4096, 2 * window))

    def measure(upload: Upload) -> PartsSummary | None:
        try:
            return store.measure(upload, pacer.send)
        except UploadGone:
            return None

    def item(upload: Upload, age: timedelta | None, parts: PartsSummary) -> InventoryItem:
        verdict = judge(match, age, parts)
        return InventoryItem(
            upload,
            age,
            parts.size_bytes,
            parts.part_count,
            parts.newest_part,
            verdict is Verdict.ELIGIBLE,
            verdict is Verdict.ACTIVE,
            verdict,
        )

    pending: deque[tuple[Upload, timedelta | None, Future[PartsSummary | None]]] = deque()
    with ThreadPoolExecutor(
        max_workers=policy.limits.concurrency, thread_name_prefix="inventory"
    ) as pool:
        try:
            for container in store.containers():
                for page in store.list_uploads(container, match.prefixes, pacer.send):
                    for upload in page.uploads:
                        if not match.matches_key(upload.key) or not recent.first_sighting(upload):
                            continue
                        age = (
                            None
                            if page.server_time is None
                            else page.server_time - upload.initiated
                        )
                        pending.append((upload, age, pool.submit(measure, upload)))
                        while len(pending) >= window:
                            done_upload, done_age, future = pending.popleft()
                            parts = future.result()
                            if parts is not None:
                                yield item(done_upload, done_age, parts)
            while pending:
                done_upload, done_age, future = pending.popleft()
                parts = future.result()
                if parts is not None:
                    yield item(done_upload, done_age, parts)
        finally:
            if own_cancel:
                cancel.set()  # a consumer that stops early stops the workers too
            for _, _, future in pending:
                future.cancel()
