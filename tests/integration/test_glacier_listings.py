"""The Glacier store under what AWS documents loosely or only shows under load: the page size
of 2018, markers that cycle or go stale, throttled pages, lagging aborts, uploads completed
meanwhile, parts landing during a listing, errors blamed on the right side, and the quiet
period on a store whose parts carry no time. Each behaviour is a variant of the HTTP fake
(tests/support/glacier_server.py); the real boto3 client signs, sends and parses every request.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from botocore.retries.standard import ExponentialBackoff

from mpu_janitor.policy import GlacierTarget, parse_policy
from mpu_janitor.stores import glacier as glacier_module
from mpu_janitor.stores import open_store
from mpu_janitor.stores.aws import MAX_RETRIES
from mpu_janitor.stores.base import (
    ContainerNotFound,
    StoreCredentials,
    StoreError,
    Throttled,
    Upload,
)
from mpu_janitor.stores.glacier import PAGE_SIZE, ActivityMemory, GlacierStore
from mpu_janitor.sweep import ABORT_ATTEMPTS, TargetLocks, run_sweep
from tests.support.glacier_server import FakeGlacier, GlacierError, MiB

pytestmark = pytest.mark.integration

VAULT = "media-archive"
TOTAL_ATTEMPTS = MAX_RETRIES + 1
T = TypeVar("T")


class RetryingPace:
    """The engine's side of the Pace contract: one request per call, a throttled request
    retried alone (here at once, and at most ``retries`` times)."""

    def __init__(self, retries: int = 5) -> None:
        self.retries = retries
        self.calls = 0
        self.throttled = 0

    def __call__(self, request: Callable[[], T], *, finish: bool = False) -> T:
        self.calls += 1
        for _ in range(self.retries):
            try:
                return request()
            except Throttled:
                self.throttled += 1
        return request()


@pytest.fixture()
def glacier() -> Iterator[FakeGlacier]:
    with FakeGlacier() as server:
        server.create_vault(VAULT)
        server.request_budget = 400  # a looping client fails instead of hanging the suite
        # Tests move the store's clock hours ahead to stand for time passing between sweeps;
        # the signing clock stays the local one, so the skew check is widened here.
        server.max_skew = timedelta(days=1)
        yield server


@pytest.fixture()
def memory() -> ActivityMemory:
    return ActivityMemory()


@pytest.fixture()
def store(glacier: FakeGlacier, memory: ActivityMemory) -> Iterator[GlacierStore]:
    target = GlacierTarget(glacier.url, glacier.region, "-", (VAULT,))
    store = GlacierStore(
        target,
        StoreCredentials(glacier.access_key, glacier.secret_key),
        lambda operation, code: None,
        activity=memory,
    )
    yield store
    store.close()


@pytest.fixture()
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def listed(store: GlacierStore, pace: Any = None) -> list[Upload]:
    pages = store.list_uploads(VAULT, [], pace) if pace else store.list_uploads(VAULT, [])
    return [upload for page in pages for upload in page.uploads]


def listing_requests(glacier: FakeGlacier) -> list[Any]:
    return [r for r in glacier.requests if r.method == "GET" and r.path.count("/") == 4]


def parts_requests(glacier: FakeGlacier) -> list[Any]:
    return [r for r in glacier.requests if r.method == "GET" and r.path.count("/") == 5]


def marker_of(received: Any) -> str | None:
    values = received.query.get("marker")
    return values[0] if values else None


def listing_order(glacier: FakeGlacier) -> list[str]:
    """The upload ids in the order the fake lists them (a hash of the id)."""
    return sorted((u.upload_id for u in glacier.uploads(VAULT)), key=glacier._order)


def glacier_policy(server: FakeGlacier, **match: Any) -> Any:
    return parse_policy(
        {
            "apiVersion": "mpu-janitor.dev/v1alpha1",
            "kind": "UploadLifecyclePolicy",
            "metadata": {"name": "archives", "namespace": "media"},
            "spec": {
                "store": {
                    "type": "Glacier",
                    "glacier": {"endpoint": server.url, "region": server.region, "vaults": [VAULT]},
                },
                "match": {"olderThan": "7d", "quietPeriod": "0s", **match},
                "mode": "Abort",
                "limits": {"requestsPerSecond": 1000, "concurrency": 8},
            },
        }
    )


def sweep(server: FakeGlacier, memory: ActivityMemory | None = None, **match: Any) -> Any:
    policy = glacier_policy(server, **match)
    credentials = StoreCredentials(server.access_key, server.secret_key)
    store = open_store(policy.store, credentials)
    if memory is not None:
        assert isinstance(store, GlacierStore)
        store.activity = memory
    try:
        return run_sweep(policy, store, locks=TargetLocks())
    finally:
        store.close()


def deletes_by_upload(glacier: FakeGlacier) -> Counter[str]:
    return Counter(r.path.rsplit("/", 1)[1] for r in glacier.requests if r.method == "DELETE")


# --------------------------------------------------------------------------------------------
# 1. Page size: the documented maximum, 50, whether AWS rejects more or caps it


@pytest.mark.parametrize("variant", ["reject", "cap"])
def test_listings_ask_for_pages_of_the_documented_maximum(
    glacier: FakeGlacier, store: GlacierStore, variant: str
) -> None:
    glacier.page_limit = variant
    created = {glacier.add_upload(VAULT, f"tmp/{n}") for n in range(120)}
    big = next(iter(created))
    for index in range(120):
        glacier.add_part(VAULT, big, index)

    pages = list(store.list_uploads(VAULT, []))
    upload = next(u for page in pages for u in page.uploads if u.upload_id == big)
    parts = store.measure(upload)

    assert PAGE_SIZE == 50
    assert [len(page.uploads) for page in pages] == [50, 50, 20]
    assert {u.upload_id for page in pages for u in page.uploads} == created
    assert (parts.part_count, parts.size_bytes) == (120, 120 * MiB)
    assert len(parts_requests(glacier)) == 3
    assert all(r.query["limit"] == ["50"] for r in glacier.requests)
    assert all(r.status == 200 for r in glacier.requests)


# --------------------------------------------------------------------------------------------
# 2. Listings that cannot end; every page one paced request, a throttled page retried alone


def test_a_marker_cycle_in_the_uploads_listing_is_an_error_not_a_loop(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.cycle_markers = True
    for n in range(200):
        glacier.add_upload(VAULT, f"tmp/{n}")

    with pytest.raises(StoreError) as caught:
        listed(store)

    assert "cycle" in str(caught.value)
    assert caught.value.container == VAULT
    assert not isinstance(caught.value, ContainerNotFound)
    # None -> A, A -> B, B -> A: the third answer closes the cycle; nothing more is asked.
    assert len(listing_requests(glacier)) == 3


def test_a_marker_cycle_in_a_parts_listing_is_an_error_not_a_loop(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.add_upload(VAULT, "tmp/big", parts=200)
    upload = listed(store)[0]
    glacier.cycle_markers = True

    with pytest.raises(StoreError) as caught:
        store.measure(upload)

    assert "cycle" in str(caught.value)
    assert len(parts_requests(glacier)) == 3


def test_a_parts_listing_that_never_ends_is_capped(
    glacier: FakeGlacier, store: GlacierStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    glacier.add_upload(VAULT, "tmp/big", parts=200)
    upload = listed(store)[0]
    glacier.clear_requests()
    monkeypatch.setattr(glacier_module, "MAX_PART_PAGES", 3)  # stands for 10,000 pages

    with pytest.raises(StoreError) as caught:
        store.measure(upload)

    assert "did not end" in str(caught.value)
    assert len(parts_requests(glacier)) == 3


@pytest.mark.usefixtures("no_backoff")
def test_a_throttled_listing_page_is_retried_alone_through_pace(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    created = {glacier.add_upload(VAULT, f"tmp/{n}") for n in range(200)}
    # Pages 1 and 2 answer; page 3 is throttled past boto3's own retries, once.
    glacier.throttle(TOTAL_ATTEMPTS, after=2)
    pace = RetryingPace()

    uploads = listed(store, pace)

    assert sorted(u.upload_id for u in uploads) == sorted(created)
    assert (pace.calls, pace.throttled) == (4, 1)  # one call per page, page 3 retried once
    markers = [marker_of(r) for r in listing_requests(glacier)]
    assert markers[0] is None and markers.count(None) == 1  # page 1 never asked again
    assert Counter(markers)[markers[1]] == 1
    assert Counter(markers)[markers[2]] == TOTAL_ATTEMPTS + 1  # page 3, and only page 3, again
    assert Counter(markers)[markers[-1]] == 1
    assert len(markers) == 4 + TOTAL_ATTEMPTS


@pytest.mark.usefixtures("no_backoff")
def test_a_throttled_parts_page_is_retried_alone_through_pace(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.add_upload(VAULT, "tmp/big", parts=175, last_part_size=7)
    upload = listed(store)[0]
    glacier.clear_requests()
    glacier.throttle(TOTAL_ATTEMPTS, after=2)
    pace = RetryingPace()

    parts = store.measure(upload, pace)

    assert (parts.part_count, parts.size_bytes) == (175, 174 * MiB + 7)
    assert (pace.calls, pace.throttled) == (4, 1)
    markers = [marker_of(r) for r in parts_requests(glacier)]
    assert markers.count(None) == 1
    assert [m for m in Counter(markers).values()] == [1, 1, TOTAL_ATTEMPTS + 1, 1]


def test_every_page_goes_through_pace_and_a_cancel_stops_between_pages(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    from mpu_janitor.pacing import Cancelled

    for n in range(200):
        glacier.add_upload(VAULT, f"tmp/{n}")
    calls = 0

    def pace(request: Callable[[], T], *, finish: bool = False) -> T:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise Cancelled()
        return request()

    pages = store.list_uploads(VAULT, [], pace)
    assert len(next(pages).uploads) == 50
    assert len(next(pages).uploads) == 50
    with pytest.raises(Cancelled):
        next(pages)
    assert len(listing_requests(glacier)) == 2  # nothing sent after the stop


# --------------------------------------------------------------------------------------------
# 3. Stale markers: the upload a marker names is gone


def test_a_stale_marker_restarts_the_listing_and_every_eligible_upload_is_aborted_once(
    glacier: FakeGlacier,
) -> None:
    glacier.stale_markers = "404"
    old, young = timedelta(days=10), timedelta(hours=1)
    eligible = {glacier.add_upload(VAULT, f"tmp/old-{n}", age=old, parts=1) for n in range(90)}
    kept = {glacier.add_upload(VAULT, f"tmp/young-{n}", age=young, parts=1) for n in range(30)}
    order = listing_order(glacier)
    head_of_page_2 = order[50]  # the upload the first marker names
    completed_by_uploader = threading.Event()

    def uploader_completes(method: str, path: str) -> None:
        # While page 1 is being processed, the uploader completes the upload page 2 begins at.
        if method == "GET" and path.count("/") == 5 and not completed_by_uploader.is_set():
            completed_by_uploader.set()
            glacier.complete(VAULT, head_of_page_2)

    glacier.request_hook = uploader_completes

    result = sweep(glacier)

    eligible.discard(head_of_page_2)
    kept.discard(head_of_page_2)
    assert result.issues == []
    assert result.total("aborted") == len(eligible)
    assert result.total("scanned") == len(eligible) + len(kept)  # each upload handled once
    assert {u.upload_id for u in glacier.uploads(VAULT)} == kept
    deletes = deletes_by_upload(glacier)
    assert set(deletes) == eligible
    assert max(deletes.values()) == 1
    restarts = [r for r in listing_requests(glacier) if r.status == 200 and marker_of(r) is None]
    assert len(restarts) == 2  # the first listing, and one restart


def test_a_stale_marker_past_what_a_listing_can_remember_ends_it_with_a_store_error(
    glacier: FakeGlacier, store: GlacierStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(glacier_module, "MAX_REMEMBERED", 10)
    glacier.stale_markers = "404"
    for n in range(80):
        glacier.add_upload(VAULT, f"tmp/{n}")
    pages = store.list_uploads(VAULT, [])
    first = next(pages).uploads
    glacier.complete(VAULT, listing_order(glacier)[50])  # the upload page 2 begins at

    with pytest.raises(StoreError) as caught:
        next(pages)

    # Restarting could not skip what was yielded: stop (the next sweep continues), never
    # repeat an upload, never call the vault missing.
    assert len(first) == 50
    assert not isinstance(caught.value, ContainerNotFound)
    assert "lost its place" in str(caught.value)


def test_stale_markers_restart_a_listing_a_bounded_number_of_times(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.stale_markers = "404"
    for n in range(120):
        glacier.add_upload(VAULT, f"tmp/{n}")

    # After each page, the upload the next page begins at is completed by its uploader.
    listing = store.list_uploads(VAULT, [])
    seen: list[str] = []
    with pytest.raises(StoreError) as caught:
        for page in listing:
            seen.extend(u.upload_id for u in page.uploads)
            remaining = [u for u in listing_order(glacier) if u not in seen]
            if remaining:
                glacier.complete(VAULT, remaining[0])

    assert "lost its place" in str(caught.value)
    assert len(seen) == len(set(seen))  # never an upload twice
    restarts = [r for r in listing_requests(glacier) if marker_of(r) is None]
    assert len(restarts) == 1 + glacier_module.MAX_RESTARTS


def test_a_vault_deleted_mid_listing_is_still_container_not_found(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.stale_markers = "404"
    for n in range(80):
        glacier.add_upload(VAULT, f"tmp/{n}")
    pages = store.list_uploads(VAULT, [])
    assert len(next(pages).uploads) == 50
    with glacier._lock:
        del glacier._state.vaults[VAULT]

    with pytest.raises(ContainerNotFound):
        next(pages)


# --------------------------------------------------------------------------------------------
# 4. After an abort: a lagging parts listing; an upload completed meanwhile


def test_a_lagging_abort_is_verified_by_the_repeated_verification(glacier: FakeGlacier) -> None:
    glacier.abort_lag = ABORT_ATTEMPTS - 1  # parts still listed on all but the last verify
    upload_id = glacier.add_upload(VAULT, "tmp/a", age=timedelta(days=10), parts=3)

    result = sweep(glacier)

    assert result.issues == []
    assert (result.total("aborted"), result.freed_bytes) == (1, 3 * MiB)
    assert result.failed == 0
    assert deletes_by_upload(glacier)[upload_id] == ABORT_ATTEMPTS  # repeated, within grace


def test_a_lag_longer_than_the_verification_rounds_is_never_counted_freed(
    glacier: FakeGlacier,
) -> None:
    glacier.abort_lag = ABORT_ATTEMPTS  # parts listed on every verify of this sweep
    glacier.add_upload(VAULT, "tmp/a", age=timedelta(days=10), parts=3)

    result = sweep(glacier)

    # Unproven: a failure saying so, no bytes claimed (the next sweep no longer lists it).
    assert (result.total("aborted"), result.freed_bytes, result.failed) == (0, 0, 1)
    assert [i.reason for i in result.issues] == ["AbortNotVerified"]
    assert sweep(glacier).total("scanned") == 0


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ((404, "ResourceNotFoundException"), "already_gone"),
        ((400, "InvalidParameterValueException"), "failed"),
    ],
)
def test_aborting_an_upload_completed_meanwhile_has_a_defined_outcome(
    glacier: FakeGlacier, answer: tuple[int, str], outcome: str
) -> None:
    glacier.completed_error = answer
    upload_id = glacier.add_upload(VAULT, "tmp/finishing", age=timedelta(days=10), parts=3)

    def uploader_completes_first(method: str, path: str) -> None:
        if method == "DELETE":
            glacier.complete(VAULT, upload_id)

    glacier.request_hook = uploader_completes_first

    result = sweep(glacier)

    # Never counted as freed, never aborted twice; the archive stays what the uploader made.
    assert (result.total("aborted"), result.freed_bytes) == (0, 0)
    assert result.total(outcome) == 1
    assert deletes_by_upload(glacier)[upload_id] == 1
    if outcome == "failed":
        assert [i.reason for i in result.issues] == ["StoreError"]
        assert "tmp/finishing" in result.issues[0].message
    else:
        assert result.issues == []


# --------------------------------------------------------------------------------------------
# 5. Parts landing during a multi-page parts listing


def test_a_part_listed_twice_is_counted_once(glacier: FakeGlacier, store: GlacierStore) -> None:
    glacier.part_markers = "position"
    upload_id = glacier.add_upload(VAULT, "tmp/parallel")
    for index in range(1, 121):  # part 0 is still on its way
        glacier.add_part(VAULT, upload_id, index)
    upload = listed(store)[0]

    def part_zero_lands(listed_id: str, page: int) -> None:
        if page == 2:  # between pages 1 and 2: every later part shifts by one position
            glacier.add_part(VAULT, upload_id, 0)

    glacier.parts_page_hook = part_zero_lands

    parts = store.measure(upload)

    # Part 50 was listed on pages 1 and 2; part 0 landed behind the listing.
    assert (parts.part_count, parts.size_bytes) == (120, 120 * MiB)
    again = store.measure(upload)
    assert (again.part_count, again.size_bytes) == (121, 121 * MiB)


# --------------------------------------------------------------------------------------------
# 6. Errors blamed on the right side


@pytest.mark.parametrize(
    "code", ["InvalidParameterValueException", "MissingParameterValueException"]
)
def test_a_request_the_store_refuses_is_a_store_fault_not_an_invalid_spec(
    glacier: FakeGlacier, store: GlacierStore, code: str
) -> None:
    def refuse(method: str, path: str) -> None:
        raise GlacierError(400, code, "e.g. a proxy stripped x-amz-glacier-version")

    glacier.request_hook = refuse

    with pytest.raises(StoreError) as caught:
        listed(store)

    assert caught.value.reason == "StoreError"  # the policy was validated: not InvalidSpec
    assert code in str(caught.value)


@pytest.mark.usefixtures("no_backoff")
def test_a_quota_error_is_not_the_rate_signal(glacier: FakeGlacier, store: GlacierStore) -> None:
    glacier.add_upload(VAULT, "tmp/a")
    glacier.throttle(100, "LimitExceededException")

    with pytest.raises(StoreError) as caught:
        listed(store, RetryingPace())

    assert not isinstance(caught.value, Throttled)
    assert caught.value.reason == "StoreError"
    assert "LimitExceededException" in str(caught.value)
    assert "quota" in str(caught.value)


@pytest.mark.usefixtures("no_backoff")
def test_throttling_exception_is_the_rate_signal(glacier: FakeGlacier, store: GlacierStore) -> None:
    glacier.add_upload(VAULT, "tmp/a")
    glacier.throttle(100)  # the fake throttles as AWS does: ThrottlingException

    with pytest.raises(Throttled) as caught:
        listed(store)

    assert "ThrottlingException" in str(caught.value)
    assert len(glacier.requests) == TOTAL_ATTEMPTS


# --------------------------------------------------------------------------------------------
# 8. quietPeriod on a store whose parts carry no time


def test_an_upload_whose_parts_changed_within_the_quiet_period_is_skipped(
    glacier: FakeGlacier, memory: ActivityMemory
) -> None:
    old = timedelta(days=10)
    still_uploading = glacier.add_upload(VAULT, "tmp/busy", age=old, parts=2)
    replaced_part = glacier.add_upload(VAULT, "tmp/redo", age=old, parts=2)
    abandoned = glacier.add_upload(VAULT, "tmp/idle", age=old, parts=2)

    first = sweep(glacier, memory, quietPeriod="1h")
    # Nothing is known of these uploads yet: a part may have landed a second ago.
    assert (first.total("skipped_active"), first.total("aborted")) == (3, 0)
    assert first.total("incomplete_bytes") == 6 * MiB

    glacier.clock_offset += timedelta(minutes=30)
    glacier.add_part(VAULT, still_uploading, 2)
    second = sweep(glacier, memory, quietPeriod="1h")
    assert (second.total("skipped_active"), second.total("aborted")) == (3, 0)

    glacier.clock_offset += timedelta(minutes=40)  # 70 min after the first look, 40 after busy
    glacier.add_part(VAULT, replaced_part, 1)  # the same range again: a new tree hash
    third = sweep(glacier, memory, quietPeriod="1h")
    assert third.total("skipped_active") == 2
    assert (third.total("aborted"), third.freed_bytes) == (1, 2 * MiB)
    assert {u.upload_id for u in glacier.uploads(VAULT)} == {still_uploading, replaced_part}

    glacier.clock_offset += timedelta(minutes=61)
    fourth = sweep(glacier, memory, quietPeriod="1h")
    assert (fourth.total("aborted"), fourth.freed_bytes) == (2, 5 * MiB)
    assert glacier.uploads(VAULT) == []
    assert abandoned not in {u.upload_id for u in glacier.uploads(VAULT)}


def test_an_upload_without_parts_is_judged_by_age_alone(
    glacier: FakeGlacier, memory: ActivityMemory
) -> None:
    glacier.add_upload(VAULT, "tmp/empty", age=timedelta(days=10))
    result = sweep(glacier, memory, quietPeriod="1h")
    assert (result.total("aborted"), result.total("skipped_active")) == (1, 0)


def test_the_activity_memory_is_bounded_and_forgetting_is_the_safe_side(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    store.activity = ActivityMemory(capacity=2)
    for n in range(3):
        glacier.add_upload(VAULT, f"tmp/{n}", parts=1)
    first, second, third = listed(store)
    looks = {}
    for upload in (first, second, third):  # the third look pushes the first out
        parts = store.measure(upload)
        assert parts.newest_part == parts.server_time  # never seen: as if a part just landed
        looks[upload.upload_id] = parts.server_time
    assert len(store.activity) == 2

    glacier.clock_offset += timedelta(hours=2)

    # The forgotten upload looks new again (active: never aborted early); the last one is
    # known unchanged since its first look.
    forgotten = store.measure(first)
    assert forgotten.newest_part == forgotten.server_time
    assert forgotten.server_time - looks[first.upload_id] >= timedelta(hours=2)
    assert store.measure(third).newest_part == looks[third.upload_id]
