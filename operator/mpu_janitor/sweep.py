"""The sweep engine: list, match, measure, abort, verify, report (DESIGN section 3).

One sweep streams a store's listing page by page, measures each in-scope upload from its
parts listing, skips active ones, aborts the eligible ones (unless DryRun), proves each abort
with a second parts listing, and counts freed bytes only for uploads verified gone. It knows
nothing of Kopf or Prometheus: the caller gets one typed SweepResult.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mpu_janitor.pacing import Cancelled, Pacer
from mpu_janitor.policy import Policy
from mpu_janitor.stores.base import (
    AbortRefused,
    PartsSummary,
    Store,
    StoreError,
    Throttled,
    Upload,
    UploadGone,
    UploadReplaced,
)

log = logging.getLogger(__name__)

ABORT_ATTEMPTS = 3  # abort + verify rounds before an upload counts as failed
VERIFY_BACKOFF_SECONDS = 0.5  # doubled each round: the stores say an abort may need repeating
THROTTLE_RETRIES = 6  # per call, on top of boto3's own retries
MAX_ISSUES = 20  # status stays small: keep the first few messages, count the rest
# Issues that report the safety rules at work, not a failure: they leave the sweep Ready.
NOTICE_REASONS = frozenset({"ObjectAtKey", "ObjectCheckFailed"})


@dataclass
class BucketStats:
    """What one sweep saw and did in one bucket or vault."""

    scanned: int = 0  # uploads in scope (prefixes and globs)
    incomplete_uploads: int = 0  # in scope and present when measured
    incomplete_bytes: int = 0
    eligible: int = 0  # old enough and quiet: what DryRun would abort
    eligible_bytes: int = 0
    skipped_active: int = 0  # old enough but a part arrived within the quiet period
    aborted: int = 0  # verified gone after our abort
    already_gone: int = 0  # vanished before our abort took effect: not freed by us
    replaced: int = 0  # 412 on a conditional abort
    protected: int = 0  # not aborted: an object at the key could be deleted with the upload
    deferred: int = 0  # eligible but past maxAbortsPerSweep
    failed: int = 0
    freed_bytes: int = 0
    oldest_age_seconds: float = 0.0
    listed: bool = False  # the listing completed (gauges are trustworthy)


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

    def total(self, name: str) -> int:
        return sum(int(getattr(stats, name)) for stats in self.buckets.values())

    @property
    def failed(self) -> int:
        return self.total("failed")

    @property
    def freed_bytes(self) -> int:
        return self.total("freed_bytes")

    @property
    def remaining_bytes(self) -> int:
        """Bytes still held by incomplete uploads in scope after this sweep."""
        gone = sum(s.freed_bytes for s in self.buckets.values())
        return max(0, self.total("incomplete_bytes") - gone)

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
        out: dict[str, Any] = {
            "policy": f"{self.namespace}/{self.policy}",
            "store": self.store,
            "mode": "DryRun" if self.dry_run else "Abort",
            "startTime": _rfc3339(self.started),
            "completionTime": _rfc3339(self.finished) if self.finished else None,
            "scanned": self.total("scanned"),
            "eligible": self.total("eligible"),
            "eligibleBytes": self.total("eligible_bytes"),
            "aborted": self.total("aborted"),
            "skippedActive": self.total("skipped_active"),
            "alreadyGone": self.total("already_gone"),
            "replaced": self.total("replaced"),
            "protected": self.total("protected"),
            "deferred": self.total("deferred"),
            "failed": self.failed,
            "freedBytes": self.freed_bytes,
            "incompleteUploads": self.total("incomplete_uploads"),
            "incompleteBytes": self.total("incomplete_bytes"),
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


class _Sweep:
    """The state of one running sweep (shared by its worker threads under one lock)."""

    def __init__(self, policy: Policy, store: Store, cancel: threading.Event) -> None:
        self.policy = policy
        self.store = store
        self.cancel = cancel
        self.pacer = Pacer(policy.limits.requests_per_second, cancel=cancel)
        self.lock = threading.Lock()
        self.abort_budget = policy.limits.max_aborts_per_sweep
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

    def add(self, container: str, **deltas: int) -> None:
        with self.lock:
            stats = self.stats(container)
            for name, delta in deltas.items():
                setattr(stats, name, getattr(stats, name) + delta)

    def issue(self, reason: str, message: str, container: str | None) -> None:
        with self.lock:
            self.result.errors_by_reason[reason] += 1
            if len(self.result.issues) < MAX_ISSUES:
                self.result.issues.append(SweepIssue(reason, message, container))

    # -- calls with pacing and throttling ------------------------------------------------------

    def call(self, fn: Callable[[Upload], Any], upload: Upload, *, finish: bool = False) -> Any:
        """One paced store call; throttling slows the sweep and retries instead of failing.
        ``finish``: the call goes out even if the sweep is being stopped (verifying an abort
        already sent, so what it freed is counted)."""
        for attempt in range(THROTTLE_RETRIES + 1):
            self.pacer.acquire(cancellable=not finish)
            try:
                value = fn(upload)
            except Throttled as error:
                if attempt == THROTTLE_RETRIES:
                    raise
                log.info("throttled by the store; slowing down (attempt %d)", attempt + 1)
                self.pacer.throttled(attempt, error.retry_after)
                continue
            self.pacer.succeeded()
            return value
        raise AssertionError("unreachable")

    # -- one upload ------------------------------------------------------------------------------

    def process(self, upload: Upload, age: timedelta) -> None:
        container = upload.container
        try:
            self._process(upload, age)
        except Cancelled:
            with self.lock:
                self.result.cancelled = True
        except StoreError as error:
            self.add(container, failed=1)
            self.issue(error.reason, f"{upload.key}: {error}", container)
        except Exception as error:  # one bad upload never stops the sweep
            log.exception("unexpected error on an upload in %s", container)
            self.add(container, failed=1)
            self.issue("InternalError", f"{type(error).__name__}: {error}", container)

    def _process(self, upload: Upload, age: timedelta) -> None:
        container = upload.container
        match = self.policy.match
        try:
            parts: PartsSummary = self.call(self.store.measure, upload)
        except UploadGone:
            self.add(container, already_gone=1)
            return
        with self.lock:
            stats = self.stats(container)
            stats.incomplete_uploads += 1
            stats.incomplete_bytes += parts.size_bytes
            stats.oldest_age_seconds = max(stats.oldest_age_seconds, age.total_seconds())
        if age < match.older_than:
            return
        if (
            parts.newest_part is not None
            and parts.server_time - parts.newest_part < match.quiet_period
        ):
            self.add(container, skipped_active=1)
            return
        self.add(container, eligible=1, eligible_bytes=parts.size_bytes)
        if self.policy.dry_run:
            return
        with self.lock:
            if self.abort_budget <= 0:
                self.stats(container).deferred += 1
                return
            self.abort_budget -= 1
        self._abort_and_verify(upload, parts.size_bytes)

    def _abort_and_verify(self, upload: Upload, size: int) -> None:
        container = upload.container
        for attempt in range(ABORT_ATTEMPTS):
            try:
                self.call(self.store.abort, upload)
            except UploadGone:
                if attempt == 0:
                    # Gone before our first abort: someone else (or the store) freed it.
                    self.add(container, already_gone=1)
                    return
                # Our earlier abort took effect after its verification listing.
                self._freed(upload, size)
                return
            except UploadReplaced:
                self.add(container, replaced=1)
                return
            except AbortRefused as refused:
                self.add(container, protected=1)
                self.issue(refused.reason, str(refused), container)
                return
            try:
                self.call(self.store.measure, upload, finish=True)
            except UploadGone:
                self._freed(upload, size)
                return
            # Parts still listed: a part upload in flight may have landed; abort again.
            log.info("parts still listed after abort of %s; repeating", upload.key)
            self.pacer.sleep(VERIFY_BACKOFF_SECONDS * 2**attempt)
        self.add(container, failed=1)
        self.issue(
            "AbortNotVerified",
            f"{upload.key}: parts still listed after {ABORT_ATTEMPTS} aborts",
            container,
        )

    def _freed(self, upload: Upload, size: int) -> None:
        self.add(upload.container, aborted=1, freed_bytes=size)
        try:
            self.store.forget(upload)
        except Exception:  # the upload is gone either way; a stale inventory entry is harmless
            log.warning("could not prune %s from the store's inventory", upload.key, exc_info=True)

    # -- one container -----------------------------------------------------------------------------

    def sweep_container(
        self, container: str, pool: ThreadPoolExecutor, progress: ProgressCallback | None
    ) -> None:
        in_flight = threading.BoundedSemaphore(self.policy.limits.concurrency * 2)
        futures: set[Future[None]] = set()

        def done(future: Future[None]) -> None:
            in_flight.release()
            with self.lock:
                futures.discard(future)
            if progress is not None:  # after every upload: the caller decides how often to show
                progress(self.result)

        with self.lock:
            self.stats(container)
        pages = self.store.list_uploads(container, self.policy.match.prefixes)
        try:
            while True:
                self.pacer.acquire()
                page = next(pages, None)
                if page is None:
                    break
                for upload in page.uploads:
                    if not self.policy.match.matches_key(upload.key):
                        continue
                    self.add(container, scanned=1)
                    age = page.server_time - upload.initiated
                    while not in_flight.acquire(timeout=0.2):
                        if self.cancel.is_set():
                            raise Cancelled()
                    future = pool.submit(self.process, upload, age)
                    with self.lock:
                        futures.add(future)
                    future.add_done_callback(done)
                if progress is not None:
                    progress(self.result)
            with self.lock:
                self.stats(container).listed = True
        finally:
            # Wait for this container's uploads before its lock is released.
            while True:
                with self.lock:
                    pending = list(futures)
                if not pending:
                    break
                for future in pending:
                    future.result()


def run_sweep(
    policy: Policy,
    store: Store,
    *,
    cancel: threading.Event | None = None,
    progress: ProgressCallback | None = None,
    locks: TargetLocks = TARGET_LOCKS,
) -> SweepResult:
    """One sweep of every bucket or vault of a policy. Never raises for store trouble: every
    failure is counted and described in the result."""
    cancel = cancel or threading.Event()
    sweep = _Sweep(policy, store, cancel)
    result = sweep.result
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
                    sweep.sweep_container(container, pool, progress)
            except Cancelled:
                result.cancelled = True
                break
            except StoreError as error:
                sweep.issue(error.reason, str(error), container)
            except Exception as error:
                log.exception("unexpected error listing %s", container)
                sweep.issue("InternalError", f"{type(error).__name__}: {error}", container)
    result.finished = datetime.now(UTC)
    if progress is not None:
        progress(result)
    return result


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InventoryItem:
    upload: Upload
    age: timedelta
    size_bytes: int
    part_count: int
    newest_part: datetime | None
    eligible: bool
    active: bool


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

    def measure(upload: Upload) -> PartsSummary | None:
        pacer.acquire()
        try:
            return store.measure(upload)
        except UploadGone:
            return None

    def item(upload: Upload, age: timedelta, parts: PartsSummary) -> InventoryItem:
        active = (
            parts.newest_part is not None
            and parts.server_time - parts.newest_part < match.quiet_period
        )
        eligible = age >= match.older_than and not active
        return InventoryItem(
            upload, age, parts.size_bytes, parts.part_count, parts.newest_part, eligible, active
        )

    pending: deque[tuple[Upload, timedelta, Future[PartsSummary | None]]] = deque()
    with ThreadPoolExecutor(
        max_workers=policy.limits.concurrency, thread_name_prefix="inventory"
    ) as pool:
        try:
            for container in store.containers():
                for page in store.list_uploads(container, match.prefixes):
                    pacer.acquire()
                    for upload in page.uploads:
                        if not match.matches_key(upload.key):
                            continue
                        age = page.server_time - upload.initiated
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
