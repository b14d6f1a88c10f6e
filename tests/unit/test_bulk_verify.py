"""Aborts proven gone in batches by one listing (stores that are BulkVerifiers), and the
safety contract kept: freed only when proven, uploads still listed verified one by one with the
repeated abort, every abort sent verified even after a stop order."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mpu_janitor.stores.base import (
    ListingProof,
    Pace,
    StoreUnreachable,
    Throttled,
    Upload,
    unpaced,
)
from mpu_janitor.sweep import BULK_VERIFY_MIN_BATCH, run_sweep
from tests.support.fake_store import FakeStore
from tests.unit.test_sweep_engine import policy

H = timedelta(hours=1)


@dataclass
class ListingStore(FakeStore):
    """A store whose listing is consistent: an upload not listed is gone."""

    listings: int = 0
    vouches: bool = True  # False: the store cannot prove anything by listing
    fail_listings: int = 0  # the next N verifying listings fail without an answer
    throttle_listings: int = 0  # the next N verifying listing requests are throttled
    batches: list[int] | None = None

    def proven_gone(
        self, container: str, uploads: Sequence[tuple[Upload, object]], pace: Pace = unpaced
    ) -> ListingProof:
        def listing() -> set[str]:
            with self.lock:
                self.listings += 1
                if self.throttle_listings > 0:
                    self.throttle_listings -= 1
                    raise Throttled("SlowDown")
                if self.fail_listings > 0:
                    self.fail_listings -= 1
                    raise StoreUnreachable("connection reset")
                return {entry.upload.upload_id for entry in self.uploads.values()}

        listed = pace(listing)
        if self.batches is not None:
            self.batches.append(len(uploads))
        if not self.vouches:
            return ListingProof(frozenset(), len(listed))
        gone = {upload.upload_id for upload, _ in uploads if upload.upload_id not in listed}
        return ListingProof(frozenset(gone), len(listed))

    def list_uploads(self, container: str, prefixes: Sequence[str], pace: Pace = unpaced) -> Any:
        for page in super().list_uploads(container, prefixes, pace):
            yield type(page)(page.uploads, page.server_time, position="page")


def calls(store: FakeStore, operation: str) -> int:
    return sum(1 for op, _ in store.calls if op == operation)


def test_one_listing_proves_a_batch_of_aborts_gone() -> None:
    store = ListingStore(page_size=100, batches=[])
    for index in range(300):
        store.add(f"k{index:04}", age=48 * H, parts=[index + 1])
    result = run_sweep(policy(limits={"concurrency": 8}), store)
    assert result.ok, result.issues
    assert result.total("aborted") == 300
    assert result.freed_bytes == sum(range(1, 301))
    assert store.uploads == {}
    # One parts listing per upload (the measure), one abort, and one listing per batch: no
    # verifying parts listing at all.
    assert calls(store, "measure") == 300
    assert calls(store, "abort") == 300
    assert store.listings == len(store.batches or []) <= 300 // BULK_VERIFY_MIN_BATCH + 1
    assert sum(store.batches or []) == 300


def test_an_abort_still_listed_is_verified_and_repeated_one_by_one() -> None:
    store = ListingStore()
    store.add("twice", age=48 * H, parts=[10, 20], aborts_needed=2)
    store.add("stubborn", age=48 * H, parts=[64], aborts_needed=99)
    store.add("easy", age=48 * H, parts=[5])
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 2
    assert result.freed_bytes == 35
    assert result.failed == 1 and result.reason == "PartialFailure"
    assert store.calls.count(("abort", "twice")) == 2
    assert store.calls.count(("abort", "stubborn")) == 3  # the same bound as without batches
    assert store.calls.count(("measure", "easy")) == 1  # proven by the listing
    assert result.buckets["bucket"].oldest_age_seconds == 48 * 3600  # stubborn is still there


def test_a_listing_that_fails_proves_nothing_and_each_abort_is_verified_alone() -> None:
    store = ListingStore(fail_listings=1)
    for index in range(10):
        store.add(f"k{index}", age=48 * H, parts=[3])
    result = run_sweep(policy(), store)
    assert result.ok, result.issues
    assert result.total("aborted") == 10 and result.freed_bytes == 30
    assert calls(store, "measure") == 20  # measured, then verified one by one


def test_a_throttled_verifying_listing_is_retried() -> None:
    store = ListingStore(throttle_listings=2)
    for index in range(10):
        store.add(f"k{index}", age=48 * H, parts=[3])
    result = run_sweep(policy(), store)
    assert result.ok, result.issues
    assert result.total("aborted") == 10
    assert store.listings == 3
    assert calls(store, "measure") == 10


def test_a_store_that_cannot_vouch_gets_every_abort_verified_alone() -> None:
    store = ListingStore(vouches=False)
    for index in range(5):
        store.add(f"k{index}", age=48 * H, parts=[7])
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 5 and result.freed_bytes == 35
    assert calls(store, "measure") == 10


def test_a_lost_abort_answer_is_never_left_to_a_listing() -> None:
    store = ListingStore()
    store.add("lost", age=48 * H, parts=[9])
    original = store.abort

    def abort_then_lose_the_answer(upload: Upload) -> None:
        original(upload)
        raise StoreUnreachable("connection dropped after the store acted")

    store.abort = abort_then_lose_the_answer  # type: ignore[method-assign]
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 1 and result.freed_bytes == 9
    assert store.listings == 0  # proven by its own parts listing
    assert calls(store, "measure") == 2


def test_after_a_stop_order_every_abort_sent_is_still_proven_and_counted() -> None:
    store = ListingStore()
    for index in range(200):
        store.add(f"k{index:03}", age=48 * H, parts=[4])
    cancel = threading.Event()
    original = store.abort

    def abort_and_stop_at_twenty(upload: Upload) -> None:
        original(upload)
        if calls(store, "abort") == 20:
            cancel.set()

    store.abort = abort_and_stop_at_twenty  # type: ignore[method-assign]
    result = run_sweep(policy(limits={"concurrency": 4}), store, cancel=cancel)
    aborted = 200 - len(store.uploads)
    assert result.cancelled
    assert 20 <= aborted <= 20 + 3
    assert result.total("aborted") == aborted  # none left unproven by the stop
    assert result.freed_bytes == 4 * aborted
    assert store.listings >= 1  # the last batch was listed during the stop


def test_a_dry_run_sends_no_verifying_listing() -> None:
    store = ListingStore()
    store.add("k", age=48 * H)
    from dataclasses import replace

    from mpu_janitor.policy import Mode

    result = run_sweep(replace(policy(), mode=Mode.DRY_RUN), store)
    assert result.total("eligible") == 1 and len(store.uploads) == 1
    assert store.listings == 0


def test_uploads_outside_the_batch_are_never_counted_from_a_listing() -> None:
    # A store that claims more than it was asked about: only the batch's ids count.
    class Boastful(ListingStore):
        def proven_gone(self, container: str, uploads: Any, pace: Pace = unpaced) -> ListingProof:
            proof = super().proven_gone(container, uploads, pace)
            return ListingProof(proof.gone | {"id-999", "id-1"}, proof.listed)

    store = Boastful()
    store.add("old", age=48 * H, parts=[5])
    store.add("young", age=H, parts=[6])
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 1 and result.freed_bytes == 5


@dataclass
class StallingStore(ListingStore):
    """Aborts answer at once until ``answered`` have; the next ones hang until ``resume`` is
    set: a sweep stuck (or killed) mid-way, with answered aborts waiting for their batch."""

    answered: int = 0
    resume: threading.Event | None = None

    def abort(self, upload: Upload) -> None:
        with self.lock:
            stall = calls(self, "abort") >= self.answered
        if stall:
            assert self.resume is not None
            self.resume.wait(30)
        super().abort(upload)


def test_answered_aborts_are_proven_and_counted_within_the_checkpoint_time() -> None:
    """An abort answered but waiting for its batch is not in the totals: a process killed then
    loses it (the next sweep lists nothing of it). With ``verify_within`` (the operator passes
    its checkpoint interval) a batch is proven no later than that after its first abort, even
    when no further abort comes to fill it: a kill loses at most a checkpoint's worth."""
    answered = BULK_VERIFY_MIN_BATCH // 2  # never a full batch
    resume = threading.Event()
    store = StallingStore(answered=answered, resume=resume)
    for index in range(answered + 4):
        store.add(f"k{index:04}", age=48 * H, parts=[1])
    counted = threading.Event()

    def progress(result: Any) -> None:
        if result.freed_bytes >= answered:
            counted.set()

    outcome: list[Any] = []
    sweeper = threading.Thread(
        target=lambda: outcome.append(
            run_sweep(
                policy(limits={"concurrency": 2}), store, progress=progress, verify_within=0.2
            )
        )
    )
    sweeper.start()
    try:
        # The sweep is stuck on its next aborts; the answered ones must still be counted.
        assert counted.wait(10), f"nothing counted while stalled ({store.listings} listings)"
    finally:
        resume.set()
        sweeper.join(30)
    assert outcome and outcome[0].freed_bytes == answered + 4 and store.uploads == {}


@dataclass
class SlowListingStore(ListingStore):
    """A verifying listing takes ``delay`` seconds (MinIO lists the whole bucket in each):
    records how many were on their way at once."""

    delay: float = 0.0
    in_flight: int = 0
    most_in_flight: int = 0

    def proven_gone(
        self, container: str, uploads: Sequence[tuple[Upload, object]], pace: Pace = unpaced
    ) -> ListingProof:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return super().proven_gone(container, uploads, pace)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_a_full_batch_waits_for_the_verifying_listing_on_its_way() -> None:
    """A bucket-wide listing is slow, and until the first one comes back the sweep does not
    know how large its batches should be: batches of the least size filled meanwhile must not
    each send a listing of the whole bucket (a 40,000-upload MinIO sweep spent its first 20 s
    so). They grow while one listing is on its way, and go with the next."""
    store = SlowListingStore(batches=[], delay=0.3)
    count = 12 * BULK_VERIFY_MIN_BATCH
    for index in range(count):
        store.add(f"k{index:05}", age=48 * H, parts=[1])
    result = run_sweep(policy(limits={"concurrency": 16}), store)
    assert result.ok, result.issues
    assert result.total("aborted") == count and store.uploads == {}
    assert store.most_in_flight == 1, f"{store.most_in_flight} verifying listings at once"
    assert sum(store.batches or []) == count
    assert len(store.batches or []) < count // BULK_VERIFY_MIN_BATCH
