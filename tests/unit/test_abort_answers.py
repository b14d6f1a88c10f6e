"""An abort whose last answer is a server error after the client's retries (500 InternalError:
an earlier attempt may have been carried out and its answer lost) is verified like one that got
no answer at all: counted freed once a listing shows it gone, never left uncounted."""

from __future__ import annotations

from datetime import timedelta

from mpu_janitor.stores.base import StoreError, Upload
from mpu_janitor.sweep import SweepResult, run_sweep
from tests.support.fake_store import FakeStore
from tests.unit.test_bulk_verify import ListingStore
from tests.unit.test_sweep_engine import policy

H = timedelta(hours=1)


def aborted_then_server_error(store: FakeStore) -> None:
    original = store.abort

    def abort(upload: Upload) -> None:
        original(upload)  # the store carried it out; the answers to every retry were 500s
        raise StoreError("InternalError: We encountered an internal error. Please try again.")

    store.abort = abort  # type: ignore[method-assign]


def test_a_server_error_after_an_abort_took_effect_is_verified_and_counted() -> None:
    """Where a listing reads the store's state back (the S3 stores)."""
    store = ListingStore()
    store.add("k", age=48 * H, parts=[5])
    aborted_then_server_error(store)
    result = run(store)
    assert store.uploads == {}
    assert result.total("aborted") == 1 and result.freed_bytes == 5, result.issues
    assert result.failed == 0


def test_elsewhere_a_server_error_on_an_abort_keeps_its_documented_outcome() -> None:
    """LILT and Glacier: a server error is failed in this sweep and cancelled again on a later
    one (their documented outcome), with one abort request, not verification rounds."""
    store = FakeStore()
    store.add("k", age=48 * H, parts=[5])
    calls: list[str] = []
    original = store.abort

    def abort(upload: Upload) -> None:
        calls.append(upload.upload_id)
        original(upload)
        raise StoreError("InternalError: We encountered an internal error. Please try again.")

    store.abort = abort  # type: ignore[method-assign]
    result = run(store)
    assert len(calls) == 1
    assert result.failed == 1 and result.total("aborted") == 0


def test_a_server_error_on_an_abort_that_did_nothing_is_a_failure_after_its_rounds() -> None:
    store = ListingStore()
    store.add("k", age=48 * H, parts=[5])

    def abort(upload: Upload) -> None:
        raise StoreError("InternalError: We encountered an internal error. Please try again.")

    store.abort = abort  # type: ignore[method-assign]
    result = run(store)
    assert len(store.uploads) == 1
    assert result.failed == 1 and result.total("aborted") == 0
    assert result.issues[0].reason == "StoreError"


def run(store: FakeStore) -> SweepResult:
    return run_sweep(policy(), store)
