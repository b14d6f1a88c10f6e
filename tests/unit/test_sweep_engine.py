"""The sweep engine's safety contract (DESIGN section 3) on an in-memory store."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from mpu_janitor.policy import Mode, parse_policy
from mpu_janitor.stores.base import Pace, StoreUnreachable, Upload, unpaced
from mpu_janitor.sweep import TargetLocks, run_sweep
from tests.support.fake_store import FakeStore

H = timedelta(hours=1)


def policy(**spec: Any) -> Any:
    base: dict[str, Any] = {
        "store": {"type": "S3", "s3": {"buckets": ["bucket"]}},
        "match": {"olderThan": "1d", "quietPeriod": "1h"},
        "limits": {"requestsPerSecond": 10000, "concurrency": 4},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_policy({"metadata": {"name": "p", "namespace": "ns"}, "spec": base})


def test_ages_use_the_store_clock_not_ours() -> None:
    # The store's clock is in 2030; ours is years behind. Only the store's ages count.
    store = FakeStore()
    store.add("old", age=25 * H)
    store.add("young", age=23 * H)
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 1
    assert [u.upload.key for u in store.uploads.values()] == ["young"]
    assert result.buckets["bucket"].oldest_age_seconds == 23 * 3600  # the old one is gone
    # And a store clock *behind* ours never makes an upload look older than it is.
    store = FakeStore(server_now=datetime(2001, 1, 1, tzinfo=UTC))
    store.add("young", age=2 * H)
    assert run_sweep(policy(), store).total("aborted") == 0


def test_freed_bytes_are_exact_and_only_for_verified_aborts() -> None:
    store = FakeStore()
    store.add("a", age=48 * H, parts=[5, 7, 11])
    store.add("b", age=48 * H, parts=[1000])
    store.add("stubborn", age=48 * H, parts=[64], aborts_needed=99)
    result = run_sweep(policy(), store)
    summary = result.summary()
    assert summary["aborted"] == 2
    assert summary["freedBytes"] == 5 + 7 + 11 + 1000
    assert summary["failed"] == 1
    assert summary["eligibleBytes"] == 5 + 7 + 11 + 1000 + 64
    assert summary["remainingBytes"] == 64
    assert [c for c in store.calls if c == ("abort", "stubborn")] == [("abort", "stubborn")] * 3
    assert result.reason == "PartialFailure"
    assert sorted(store.forgotten) == ["a", "b"]  # pruned once each, in any order


def test_an_abort_that_needs_repeating_is_repeated_and_counted_once() -> None:
    store = FakeStore()
    store.add("twice", age=48 * H, parts=[10, 20], aborts_needed=2)
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 1
    assert result.freed_bytes == 30
    assert result.failed == 0
    assert store.calls.count(("abort", "twice")) == 2


def test_quiet_period_protects_active_uploads() -> None:
    store = FakeStore()
    store.add("active", age=48 * H, parts=[1, 2], last_part_age=timedelta(minutes=10))
    store.add("quiet", age=48 * H, parts=[1, 2], last_part_age=2 * H)
    result = run_sweep(policy(), store)
    assert result.total("skipped_active") == 1
    assert result.total("aborted") == 1
    assert [u.upload.key for u in store.uploads.values()] == ["active"]


def test_dry_run_changes_nothing_and_predicts_the_real_sweep() -> None:
    store = FakeStore()
    for index in range(5):
        store.add(f"k{index}", age=48 * H, parts=[index + 1])
    store.add("new", age=H)
    dry = run_sweep(replace(policy(), mode=Mode.DRY_RUN), store)
    assert len(store.uploads) == 6
    assert not [c for c in store.calls if c[0] == "abort"]
    assert dry.total("aborted") == 0 and dry.freed_bytes == 0
    real = run_sweep(policy(), store)
    assert real.freed_bytes == dry.total("eligible_bytes") == 15
    assert real.total("aborted") == dry.total("eligible") == 5


def test_abort_cap_defers_the_rest() -> None:
    store = FakeStore()
    for index in range(5):
        store.add(f"k{index}", age=48 * H)
    result = run_sweep(policy(limits={"maxAbortsPerSweep": 2}), store)
    assert result.total("aborted") == 2
    assert result.total("deferred") == 3
    assert len(store.uploads) == 3


def test_prefixes_and_globs_are_never_touched() -> None:
    store = FakeStore()
    store.add("tmp/a", age=48 * H)
    store.add("tmp/a.keep", age=48 * H)
    store.add("other/a", age=48 * H)
    result = run_sweep(policy(match={"prefixes": ["tmp/"], "excludeKeyGlobs": ["*.keep"]}), store)
    assert result.total("scanned") == 1
    touched = {key for _, key in store.calls}
    assert touched == {"tmp/a"}


def test_replaced_upload_is_skipped() -> None:
    store = FakeStore()
    upload = store.add("k", age=48 * H)
    store.uploads[upload.upload_id].replaced = True
    result = run_sweep(policy(), store)
    assert result.total("replaced") == 1
    assert result.total("aborted") == 0 and result.freed_bytes == 0
    assert result.ok


def test_throttling_slows_down_instead_of_failing() -> None:
    store = FakeStore()
    for index in range(3):
        store.add(f"k{index}", age=48 * H)
    store.throttle_next = 3
    result = run_sweep(policy(), store)
    assert result.ok, result.issues
    assert result.total("aborted") == 3


def test_upload_gone_before_measure_or_abort_is_already_gone() -> None:
    store = FakeStore()
    vanishing = store.add("vanishing", age=48 * H)
    original_abort = store.abort

    def racing_abort(upload: Upload) -> None:
        if upload.key == "vanishing":
            store.uploads.pop(vanishing.upload_id, None)  # someone else aborted it
        original_abort(upload)

    store.abort = racing_abort  # type: ignore[method-assign]
    result = run_sweep(policy(), store)
    assert result.total("already_gone") == 1
    assert result.total("aborted") == 0 and result.freed_bytes == 0


def test_a_store_error_on_one_upload_never_stops_the_others() -> None:
    store = FakeStore()
    store.add("bad", age=48 * H)
    store.add("good", age=48 * H)
    original = store.measure

    def flaky(upload: Upload, pace: Pace = unpaced) -> Any:
        if upload.key == "bad":
            raise StoreUnreachable("connection reset")
        return original(upload, pace)

    store.measure = flaky  # type: ignore[method-assign]
    result = run_sweep(policy(), store)
    assert result.failed == 1
    assert result.total("aborted") == 1
    assert result.issues[0].reason == "StoreUnreachable"


def test_listing_is_streamed_with_bounded_work_in_flight() -> None:
    store = FakeStore(page_size=100)
    for index in range(2000):
        store.add(f"k{index:05}", age=H)  # young: measured, not aborted
    seen_ahead: list[int] = []
    measure = store.measure

    def tracking(upload: Upload, pace: Pace = unpaced) -> Any:
        seen_ahead.append(store.yielded - len([c for c in store.calls if c[0] == "measure"]))
        return measure(upload, pace)

    store.measure = tracking  # type: ignore[method-assign]
    result = run_sweep(policy(limits={"concurrency": 4}), store)
    assert result.total("scanned") == 2000
    # Never more than one page plus the in-flight window ahead of the workers.
    assert max(seen_ahead) <= 100 + 4 * 2 + 4


def test_cancel_stops_between_uploads_promptly() -> None:
    store = FakeStore()
    for index in range(500):
        store.add(f"k{index}", age=48 * H)
    cancel = threading.Event()
    pol = policy(limits={"requestsPerSecond": 50, "concurrency": 2})
    # Stop once 20 uploads are done; at most the in-flight ones may finish after that.
    done_calls = store.abort

    def abort_then_maybe_stop(upload: Upload) -> None:
        done_calls(upload)
        if len([c for c in store.calls if c[0] == "abort"]) == 20:
            cancel.set()

    store.abort = abort_then_maybe_stop  # type: ignore[method-assign]
    result = run_sweep(pol, store, cancel=cancel)
    assert result.cancelled
    assert result.reason == "SweepCancelled"
    aborts = len([c for c in store.calls if c[0] == "abort"])
    assert 20 <= aborts <= 20 + 2  # the two workers' uploads in flight, then nothing more
    assert result.total("aborted") <= aborts
    assert len(store.uploads) >= 500 - aborts


def test_two_sweeps_of_one_target_never_overlap() -> None:
    locks = TargetLocks()
    active = 0
    overlap = []

    class SlowStore(FakeStore):
        def list_uploads(self, container: str, prefixes: Any, pace: Any = None) -> Any:
            nonlocal active
            active += 1
            overlap.append(active)
            time.sleep(0.3)
            yield from super().list_uploads(container, prefixes)
            active -= 1

    stores = [SlowStore(), SlowStore()]
    for s in stores:
        s.add("k", age=48 * H)
    threads = [
        threading.Thread(target=run_sweep, args=(policy(), s), kwargs={"locks": locks})
        for s in stores
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlap) == 1


def test_a_store_asked_wait_is_honoured() -> None:
    from mpu_janitor.pacing import Pacer
    from mpu_janitor.stores.base import Throttled

    waits: list[float] = []

    class RecordingPacer(Pacer):
        def sleep(self, seconds: float, *, cancellable: bool = True) -> None:
            waits.append(seconds)

    pacer = RecordingPacer(100)
    pacer.throttled(0, Throttled("quota", retry_after=60).retry_after)
    pacer.throttled(0)
    assert waits[0] == 60
    assert waits[1] < 1
    assert pacer.rate == 25  # halved twice


# -- every request through the engine's pace ----------------------------------------------------


def test_a_throttled_listing_page_is_retried_not_the_end_of_the_bucket() -> None:
    store = FakeStore(page_size=10)
    for index in range(30):
        store.add(f"k{index:02}", age=48 * H)
    store.throttle_pages = 0
    pages_before_throttle = 1

    original = store.list_uploads

    def throttle_second_page(container: str, prefixes: Any, pace: Pace = unpaced) -> Any:
        for number, page in enumerate(original(container, prefixes, pace)):
            if number == pages_before_throttle - 1:
                store.throttle_pages = 2  # the next page request is throttled twice
            yield page

    store.list_uploads = throttle_second_page  # type: ignore[method-assign]
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 30, result.issues
    assert result.ok, result.issues
    assert store.uploads == {}
    assert store.page_requests == 3 + 2  # three pages, the second sent three times


def test_a_store_asked_wait_is_capped() -> None:
    from mpu_janitor.pacing import MAX_RETRY_AFTER_SECONDS, Pacer

    waits: list[float] = []

    class RecordingPacer(Pacer):
        def sleep(self, seconds: float, *, cancellable: bool = True) -> None:
            waits.append(seconds)

    RecordingPacer(100).throttled(0, 10 * 86400.0)
    assert waits == [MAX_RETRY_AFTER_SECONDS] and MAX_RETRY_AFTER_SECONDS == 300


def test_a_cancel_during_a_throttled_verify_still_counts_the_abort_sent() -> None:
    store = FakeStore(throttle_retry_after=0.2)
    store.add("k", age=48 * H, parts=[40, 2])
    cancel = threading.Event()
    original = store.abort

    def abort_then_stop(upload: Upload) -> None:
        original(upload)  # the abort reached the store ...
        store.throttle_next = 1  # ... its verifying parts listing will be throttled once
        cancel.set()  # ... and the stop order arrives meanwhile

    store.abort = abort_then_stop  # type: ignore[method-assign]
    result = run_sweep(policy(), store, cancel=cancel)
    assert store.uploads == {}
    assert result.cancelled
    assert result.total("aborted") == 1
    assert result.freed_bytes == 42


def test_after_a_stop_order_no_queued_upload_is_measured_or_aborted() -> None:
    store = FakeStore()
    for index in range(200):
        store.add(f"k{index:03}", age=48 * H)
    cancel = threading.Event()
    at_stop: list[int] = []
    original = store.abort

    def abort_and_stop_at_ten(upload: Upload) -> None:
        original(upload)
        with store.lock:
            aborts = sum(1 for call in store.calls if call[0] == "abort")
        if aborts == 10:
            at_stop.append(len(store.calls))
            cancel.set()

    store.abort = abort_and_stop_at_ten  # type: ignore[method-assign]
    pol = policy(limits={"concurrency": 4})
    result = run_sweep(pol, store, cancel=cancel)
    aborts = [c for c in store.calls if c[0] == "abort"]
    # At most the other three workers' aborts were already under way at the stop.
    assert 10 <= len(aborts) <= 10 + 3
    gone = 200 - len(store.uploads)
    assert result.total("aborted") == gone == len(aborts)
    assert result.freed_bytes == 100 * gone
    # Queued uploads are dropped: besides the verifying listings of aborts already sent,
    # at most the in-flight workers' parts listings went out after the stop.
    after = store.calls[at_stop[0] :]
    assert len([c for c in after if c[0] == "measure"]) <= 2 * 3 + 3


# -- one upload id, one count --------------------------------------------------------------------


def test_an_upload_repeated_by_inclusive_markers_is_counted_once() -> None:
    store = FakeStore(page_size=10, repeat_boundary=True)
    for index in range(25):
        store.add(f"k{index:02}", age=48 * H, parts=[3])
    store.add("young", age=H, parts=[5])
    result = run_sweep(policy(), store)
    assert store.yielded > 26  # the listing did repeat uploads
    assert result.total("scanned") == 26
    assert result.total("incomplete_uploads") == 26
    assert result.total("aborted") == 25
    assert result.total("already_gone") == 0
    assert result.freed_bytes == 75
    assert result.total("incomplete_bytes") == 80
    aborts = [key for op, key in store.calls if op == "abort"]
    assert sorted(aborts) == sorted(set(aborts))


def test_an_upload_repeated_while_in_flight_is_never_freed_twice() -> None:
    # A store where a repeated abort answers 204 (MinIO, Glacier): two concurrent
    # aborts of one id would both be verified gone.
    store = FakeStore(page_size=1, repeat_boundary=True)
    store.add("only", age=48 * H, parts=[7])
    store.add("other", age=48 * H, parts=[9])
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 2
    assert result.freed_bytes == 16
    assert result.total("scanned") == 2


def test_the_oldest_age_ignores_uploads_aborted_in_this_sweep() -> None:
    store = FakeStore()
    store.add("month-old", age=30 * 24 * H)
    store.add("young", age=2 * H)
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 1
    assert result.buckets["bucket"].oldest_age_seconds == 2 * 3600
    # A dry run aborts nothing: the month-old upload is still the oldest.
    store.add("month-old-again", age=30 * 24 * H)
    dry = run_sweep(replace(policy(), mode=Mode.DRY_RUN), store)
    assert dry.buckets["bucket"].oldest_age_seconds == 30 * 24 * 3600


# -- the store's clock or none ----------------------------------------------------------------


def test_without_a_date_header_no_age_is_judged() -> None:
    store = FakeStore(no_date=True)
    store.add("ancient", age=400 * 24 * H)
    store.add("older", age=48 * H)
    result = run_sweep(policy(), store)
    assert result.total("aborted") == 0
    assert len(store.uploads) == 2
    assert not [c for c in store.calls if c[0] == "abort"]
    assert result.summary()["skippedNoClock"] == 2
    assert result.total("eligible") == 0
    assert result.issues and "Date" in result.issues[0].message
    assert result.issues[0].reason == "NoStoreClock"


def test_during_a_stop_a_throttled_verify_waits_briefly_and_still_goes_out() -> None:
    from mpu_janitor.pacing import STOPPING_WAIT_SECONDS, Pacer
    from mpu_janitor.stores.base import Throttled

    waits: list[float] = []

    class RecordingPacer(Pacer):
        def sleep(self, seconds: float, *, cancellable: bool = True) -> None:
            assert not cancellable
            waits.append(seconds)

    stop = threading.Event()
    stop.set()
    answers: list[Any] = [Throttled("quota", retry_after=300), Throttled("quota"), "parts"]

    def request() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert RecordingPacer(100, cancel=stop).send(request, finish=True) == "parts"
    assert len(waits) == 2 and max(waits) <= STOPPING_WAIT_SECONDS == 5


def test_list_and_sweep_judge_every_upload_alike() -> None:
    from mpu_janitor.sweep import inventory

    def mixed() -> FakeStore:
        store = FakeStore()
        store.add("young", age=2 * H)
        store.add("active", age=48 * H, last_part_age=timedelta(minutes=5))
        store.add("quiet", age=48 * H, last_part_age=3 * H)
        store.add("no-parts", age=48 * H, parts=())
        store.add("just-old", age=24 * H + timedelta(seconds=1))
        return store

    listed = {item.upload.key: item for item in inventory(policy(), mixed())}
    assert {k for k, i in listed.items() if i.eligible} == {"quiet", "no-parts", "just-old"}
    assert {k for k, i in listed.items() if i.active} == {"active"}
    store = mixed()
    result = run_sweep(policy(), store)
    assert {u.upload.key for u in store.uploads.values()} == {"young", "active"}
    assert result.total("skipped_active") == 1
    # Without the store's clock, neither judges anything.
    unclocked = FakeStore(no_date=True)
    unclocked.add("old", age=48 * H)
    assert [item.eligible for item in inventory(policy(), unclocked)] == [False]
