"""LILT documents only the 200 ``{success: true}`` answer of a cancel: these tests run whole
sweeps under every plausible answer to a first and to a repeated cancel (200,
``200 {success: false}``, 404, 400, 500) and to the quota (429, 403 and 503 with quota wording),
and show that each leads to its documented outcome: nothing counted freed twice or without
LILT's confirmation, never an upload cancelled forever, and nothing left unsettled silently."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mpu_janitor.policy import LiltTarget, parse_policy
from mpu_janitor.stores.base import StoreCredentials, Throttled, Upload
from mpu_janitor.stores.lilt import (
    CONTAINER,
    MAX_CANCEL_SWEEPS,
    LiltStore,
    record_upload,
    unresolved_path,
)
from mpu_janitor.sweep import SweepResult, TargetLocks, run_sweep
from tests.support.lilt_server import CANCEL_ANSWERS, QUOTA_STATUSES, FakeLilt

pytestmark = pytest.mark.integration

SIZE = 7_340_032


@pytest.fixture()
def lilt() -> Iterator[FakeLilt]:
    with FakeLilt() as server:
        yield server


@pytest.fixture()
def inventory(tmp_path: Path) -> Path:
    return tmp_path / "lilt-uploads.jsonl"


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_upload(server: FakeLilt, inventory: Path, filename: str, size: int = SIZE) -> Upload:
    upload_id, key = server.initiate(filename, size, age=timedelta(days=3))
    initiated = server.now() - timedelta(days=3)
    record_upload(inventory, upload_id, key, initiated=initiated, filename=filename, size=size)
    return Upload(CONTAINER, key, upload_id, initiated)


def sweep(server: FakeLilt, inventory: Path) -> SweepResult:
    return sweep_with(server, inventory, concurrency=2)


def sweep_with(server: FakeLilt, inventory: Path, *, concurrency: int) -> SweepResult:
    policy = parse_policy(
        {
            "apiVersion": "mpu-janitor.dev/v1alpha1",
            "kind": "UploadLifecyclePolicy",
            "metadata": {"name": "lilt-uploads", "namespace": "translation"},
            "spec": {
                "store": {
                    "type": "LILT",
                    "lilt": {"endpoint": server.url, "inventoryPath": str(inventory)},
                },
                "match": {"olderThan": "2d"},
                "limits": {"requestsPerSecond": 1000, "concurrency": concurrency},
            },
        }
    )
    store = LiltStore(
        LiltTarget(server.url, str(inventory)),
        StoreCredentials(api_key=server.api_key),
        lambda operation, code: None,
    )
    try:
        return run_sweep(policy, store, locks=TargetLocks())
    finally:
        store.close()


def cancels(server: FakeLilt) -> int:
    return sum(1 for r in server.requests if r.method == "DELETE")


# What each first answer means (the documented outcomes, README "LILT"):
#   200            LILT confirmed the cancel: the repeat decides when it is counted
#   200-false, 400 LILT refused: failed (CancelRefused), retried on later sweeps, then given up
#   500            no answer about the upload: failed, retried on later sweeps, then given up
#   404            LILT does not know the upload for this key: counted already gone, reported
#                  (UploadNotFound), its record moved to the unresolved file at once
# and each repeat answer, after a confirmed cancel:
#   404, 200, 200-false, 400   an answer about the upload's state to a request LILT has just
#                              accepted: the cancel took effect, counted freed once, pruned
#   500                        no answer: failed (CancelUnverified), the next sweeps cancel
#                              again; a later state answer counts it then, once
SETTLED_BY_REPEAT = {"404", "200", "200-false", "400"}


@pytest.mark.parametrize("repeat", CANCEL_ANSWERS)
@pytest.mark.parametrize("first", CANCEL_ANSWERS)
def test_every_cancel_answer_settles_within_bounded_sweeps(
    lilt: FakeLilt, inventory: Path, first: str, repeat: str
) -> None:
    lilt.first_cancel, lilt.repeat_cancel = first, repeat
    upload = start_upload(lilt, inventory, "a.zip")
    record_upload(inventory, "young", "uploads/young", filename="young.zip")  # not yet eligible

    results = [sweep(lilt, inventory) for _ in range(MAX_CANCEL_SWEEPS + 2)]

    freed = sum(r.freed_bytes for r in results)
    aborted = sum(r.total("aborted") for r in results)
    cancelled_on_lilt = not lilt.is_pending(upload.upload_id)
    # Nothing is counted freed twice, nor without LILT having cancelled the upload.
    assert (aborted, freed) in ((0, 0), (1, SIZE))
    if freed:
        assert cancelled_on_lilt
    # Bounded: the last two sweeps send no cancel at all, and every record is settled.
    before = cancels(lilt)
    assert before <= MAX_CANCEL_SWEEPS + 1
    lilt.clear_requests()
    for extra in (sweep(lilt, inventory), sweep(lilt, inventory)):
        assert extra.freed_bytes == 0 and extra.failed == 0
    assert cancels(lilt) == 0
    assert [r["uploadId"] for r in lines(inventory)] == ["young"]
    # Never silent: every sweep that left the upload unsettled says why.
    for result in results:
        if result.failed or result.total("already_gone"):
            assert result.issues, result.summary()

    given_up = [r["uploadId"] for r in lines(unresolved_path(inventory))]
    if first == "200" and repeat in SETTLED_BY_REPEAT:
        assert (aborted, freed) == (1, SIZE)
        assert results[0].issues == [] and results[0].total("aborted") == 1
        assert given_up == []
    elif first == "200":  # repeat 500: never verified, given up, never counted
        assert (aborted, freed) == (0, 0)
        assert {i.reason for i in results[0].issues} == {"CancelUnverified"}
        assert given_up == [upload.upload_id]
        assert cancelled_on_lilt
    elif first == "404":
        assert (aborted, freed) == (0, 0)
        assert results[0].total("already_gone") == 1
        assert "UploadNotFound" in {i.reason for i in results[0].issues}
        assert given_up == [upload.upload_id]  # kept for a person with the right key
        assert not cancelled_on_lilt
        assert before == 1
    else:  # refused or failed: retried on MAX_CANCEL_SWEEPS sweeps, then given up
        assert (aborted, freed) == (0, 0)
        assert before == MAX_CANCEL_SWEEPS
        assert all(r.failed == 1 for r in results[:MAX_CANCEL_SWEEPS])
        reason = "CancelRefused" if first in ("200-false", "400") else "StoreError"
        assert reason in {i.reason for i in results[0].issues}
        assert "CancelUnresolved" in {i.reason for i in results[MAX_CANCEL_SWEEPS - 1].issues}
        assert given_up == [upload.upload_id]
        assert not cancelled_on_lilt


def test_a_cancel_verified_on_a_later_sweep_is_counted_then_once(
    lilt: FakeLilt, inventory: Path
) -> None:
    lilt.repeat_cancel = "500"  # LILT confirms the cancel, then fails to answer its repeat
    upload = start_upload(lilt, inventory, "a.zip")

    first = sweep(lilt, inventory)
    assert (first.total("aborted"), first.freed_bytes, first.failed) == (0, 0, 1)
    assert [r["uploadId"] for r in lines(inventory)] == [upload.upload_id]  # retried

    lilt.repeat_cancel = "404"  # LILT answers again: the upload is gone
    second = sweep(lilt, inventory)
    third = sweep(lilt, inventory)

    assert (second.total("aborted"), second.freed_bytes, second.failed) == (1, SIZE, 0)
    assert (third.total("aborted"), third.freed_bytes) == (0, 0)
    assert lines(inventory) == [] and lines(unresolved_path(inventory)) == []


def test_a_first_cancel_404_is_reported_and_its_record_kept_for_a_person(
    lilt: FakeLilt, inventory: Path
) -> None:
    lilt.first_cancel = "404"  # e.g. uploaded under another user's key
    upload = start_upload(lilt, inventory, "someone-elses.zip")

    result = sweep(lilt, inventory)

    (issue,) = [i for i in result.issues if i.reason == "UploadNotFound"]
    assert "1 " in issue.message and str(unresolved_path(inventory)) in issue.message
    assert result.total("already_gone") == 1 and result.freed_bytes == 0
    (kept,) = lines(unresolved_path(inventory))
    assert (kept["uploadId"], kept["key"], kept["lastOutcome"]) == (
        upload.upload_id,
        upload.key,
        "UploadNotFound",
    )
    assert lines(inventory) == []


@pytest.mark.parametrize("status", QUOTA_STATUSES)
def test_every_quota_answer_slows_the_sweep_down(
    lilt: FakeLilt, inventory: Path, status: int
) -> None:
    lilt.quota_status = status
    upload = start_upload(lilt, inventory, "a.zip")
    store = LiltStore(
        LiltTarget(lilt.url, str(inventory)),
        StoreCredentials(api_key=lilt.api_key),
        lambda operation, code: None,
    )
    lilt.throttle(2)
    with pytest.raises(Throttled) as listing:
        list(store.list_uploads(CONTAINER, []))
    with pytest.raises(Throttled) as cancel:
        store.abort(upload)
    assert listing.value.retry_after == cancel.value.retry_after == 60
    assert lilt.is_pending(upload.upload_id)
    store.abort(upload)  # the quota is back
    assert not lilt.is_pending(upload.upload_id)
    store.close()


def test_a_403_without_quota_wording_is_still_access_denied(
    lilt: FakeLilt, inventory: Path
) -> None:
    from mpu_janitor.stores.base import AccessDenied

    store = LiltStore(
        LiltTarget(lilt.url, str(inventory)),
        StoreCredentials(api_key="not-the-key"),
        lambda operation, code: None,
    )
    with pytest.raises(AccessDenied):
        list(store.list_uploads(CONTAINER, []))


def test_no_cancel_is_sent_once_the_inventory_cannot_record_what_was_cancelled(
    lilt: FakeLilt, inventory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mpu_janitor.stores.lilt.store as lilt_store

    monkeypatch.setattr(lilt_store, "FORGET_BATCH", 1)  # rewrite after every verified upload
    # The inventory becomes unwritable after the listing checked it (a volume remounted
    # read-only in the middle of the sweep, say).
    monkeypatch.setattr(LiltStore, "_check_writable", lambda self, path: None)
    uploads = [start_upload(lilt, inventory, f"{n}.zip") for n in range(4)]
    lock = Path(f"{inventory}.lock")
    lock.unlink()
    lock.mkdir()  # the inventory can no longer be rewritten

    result = sweep_with(lilt, inventory, concurrency=1)

    # The first verified upload is counted; its record cannot be pruned, so no further cancel
    # goes out (a LILT that confirms repeated cancels would count it again next sweep).
    assert (result.total("aborted"), result.freed_bytes) == (1, SIZE)
    assert result.failed == 3
    assert "InventoryNotUpdated" in {issue.reason for issue in result.issues}
    assert sum(not lilt.is_pending(u.upload_id) for u in uploads) == 1


def test_an_inventory_that_cannot_be_written_gets_no_cancel_at_all(
    lilt: FakeLilt, inventory: Path
) -> None:
    uploads = [start_upload(lilt, inventory, f"{n}.zip") for n in range(2)]
    lock = Path(f"{inventory}.lock")
    lock.unlink()
    lock.mkdir()  # as a read-only volume would: nothing the sweep does could be recorded

    result = sweep(lilt, inventory)

    assert (result.total("scanned"), result.total("aborted"), result.failed) == (2, 0, 2)
    assert {issue.reason for issue in result.issues} == {"InventoryNotUpdated"}
    assert cancels(lilt) == 0
    assert all(lilt.is_pending(u.upload_id) for u in uploads)
    store = LiltStore(
        LiltTarget(lilt.url, str(inventory)),
        StoreCredentials(api_key=lilt.api_key),
        lambda operation, code: None,
    )
    (page,) = store.list_uploads(CONTAINER, [])
    assert len(page.uploads) == 2  # still listed
