"""Scality and Tencent COS behaviours, replayed by an HTTP fake in the vendors' documented wire
shapes (no Scality or COS server runs here), through the real boto3 client and the sweep
engine: no object deleted by an abort, uppercase booleans, zone-less times, errors blamed on
the right side, and what ``freedBytes`` means where an unknown abort answers 204."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mpu_janitor.policy import parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import (
    InvalidTarget,
    StoreCredentials,
    StoreUnreachable,
    Upload,
)
from mpu_janitor.stores.s3 import S3Store
from mpu_janitor.sweep import SweepResult, TargetLocks, run_sweep
from tests.support.vendor_s3 import VendorBehaviour, VendorS3

pytestmark = pytest.mark.integration

BUCKET = "uploads"
KEYS = StoreCredentials(access_key_id="AKIAVENDOR", secret_access_key="vendor-secret")
OLD = timedelta(days=3)


def policy_for(
    server: VendorS3, *, profile: str = "Scality", s3: dict[str, Any] | None = None
) -> Any:
    return parse_policy(
        {
            "apiVersion": "mpu-janitor.dev/v1alpha1",
            "kind": "UploadLifecyclePolicy",
            "metadata": {"name": "vendor", "namespace": "default"},
            "spec": {
                "store": {
                    "type": "S3",
                    "s3": {
                        "endpoint": server.url,
                        "profile": profile,
                        "buckets": [BUCKET],
                        **(s3 or {}),
                    },
                },
                "match": {"olderThan": "1d", "quietPeriod": "1h"},
                "limits": {"requestsPerSecond": 1000, "concurrency": 4},
            },
        }
    )


def sweep(server: VendorS3, **kwargs: Any) -> SweepResult:
    policy = policy_for(server, **kwargs)
    store = open_store(policy.store, KEYS)
    try:
        return run_sweep(policy, store, locks=TargetLocks())
    finally:
        store.close()


@contextlib.contextmanager
def vendor(**behaviour: Any) -> Iterator[VendorS3]:
    with VendorS3(VendorBehaviour(**behaviour)) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture()
def scality() -> Iterator[VendorS3]:
    """A CloudServer build whose abort deletes the data of whatever object is at the key."""
    with vendor(abort_deletes_object="any-object", unknown_abort_status=204) as server:
        yield server


# -- Scality: an abort must never delete a real object ------------------------------------------


def test_upload_redone_successfully_is_not_aborted_and_the_object_survives(
    scality: VendorS3,
) -> None:
    abandoned = scality.add_upload(BUCKET, "video/a.mp4", age=OLD)
    scality.put_object(BUCKET, "video/a.mp4", age=timedelta(days=2))  # the redo, completed
    lonely = scality.add_upload(BUCKET, "video/b.mp4", age=OLD)

    result = sweep(scality)

    assert ("uploads", "video/a.mp4") in scality.objects, "the real object was deleted"
    assert scality.open_uploads(BUCKET) == {abandoned.upload_id}
    assert lonely.upload_id not in scality.open_uploads(BUCKET)
    summary = result.summary()
    assert summary["aborted"] == 1
    assert summary["protected"] == 1
    assert [e["reason"] for e in summary["errors"]] == ["ObjectAtKey"]
    assert "video/a.mp4" in summary["errors"][0]["message"]
    assert result.reason == "SweepSucceeded"  # protection is the design working, not a failure


def test_completed_upload_left_listed_is_not_aborted(scality: VendorS3) -> None:
    """PR #6268's case: CompleteMultipartUpload wrote the object but its overview key stayed,
    so the upload is still listed, old and quiet; aborting it deletes the completed object."""
    scality.behaviour.abort_deletes_object = "same-upload"
    upload = scality.add_upload(BUCKET, "db/dump.tar", age=OLD)
    scality.put_object(BUCKET, "db/dump.tar", age=timedelta(days=2), upload_id=upload.upload_id)

    result = sweep(scality, s3={"abortWhenKeyHasObject": "IfObjectOlder"})

    assert ("uploads", "db/dump.tar") in scality.objects
    assert result.summary()["protected"] == 1
    assert scality.count("AbortMultipartUpload") == 0


def test_object_older_than_the_upload_is_protected_by_default(scality: VendorS3) -> None:
    """Builds between PR #5691 and #5849 delete any object at the key: the default protects it."""
    scality.put_object(BUCKET, "img/old.png", age=timedelta(days=30))
    scality.add_upload(BUCKET, "img/old.png", age=OLD)

    result = sweep(scality)

    assert ("uploads", "img/old.png") in scality.objects
    assert result.summary()["protected"] == 1


def test_policy_opts_in_to_abort_over_older_objects(scality: VendorS3) -> None:
    scality.behaviour.abort_deletes_object = "same-upload"  # a build with PR #5849
    scality.put_object(BUCKET, "img/old.png", age=timedelta(days=30))
    older = scality.add_upload(BUCKET, "img/old.png", age=OLD)
    scality.put_object(BUCKET, "img/new.png", age=timedelta(hours=30))
    newer = scality.add_upload(BUCKET, "img/new.png", age=OLD)

    result = sweep(scality, s3={"abortWhenKeyHasObject": "IfObjectOlder"})

    assert scality.open_uploads(BUCKET) == {newer.upload_id}
    assert older.upload_id not in scality.open_uploads(BUCKET)
    assert set(scality.objects) == {("uploads", "img/old.png"), ("uploads", "img/new.png")}
    assert (result.summary()["aborted"], result.summary()["protected"]) == (1, 1)


def test_always_sends_no_object_check(scality: VendorS3) -> None:
    scality.add_upload(BUCKET, "x/1", age=OLD)
    sweep(scality, s3={"abortWhenKeyHasObject": "Always"})
    assert scality.count("HeadObject") == 0
    assert scality.count("AbortMultipartUpload") == 1


def test_object_check_that_cannot_answer_protects_the_upload(scality: VendorS3) -> None:
    """No permission to HeadObject: safety can't be proven, so nothing is aborted."""
    scality.behaviour.head_status = 403
    upload = scality.add_upload(BUCKET, "x/1", age=OLD)

    result = sweep(scality)

    assert scality.open_uploads(BUCKET) == {upload.upload_id}
    assert result.summary()["protected"] == 1
    assert "ObjectCheckFailed" in [e["reason"] for e in result.summary()["errors"]]


def test_generic_profile_sends_no_object_check() -> None:
    with vendor() as server:
        server.add_upload(BUCKET, "x/1", age=OLD)
        result = sweep(server, profile="Generic")
        assert server.count("HeadObject") == 0
        assert result.summary()["aborted"] == 1


# -- what freedBytes means where an unknown abort answers 204 ------------------------------------


@pytest.mark.parametrize(("status", "freed"), [(404, 0), (204, 1024)])
def test_upload_ended_by_someone_else_between_measure_and_abort(status: int, freed: int) -> None:
    """Scality answers 204 to aborting an unknown upload unless legacyAwsBehavior is set (then
    404, as AWS): an upload someone else ended just before our abort is counted freed there.
    The README states this per profile; this test pins both behaviours."""
    with vendor(unknown_abort_status=status) as server:
        upload = server.add_upload(BUCKET, "race/1", age=OLD)
        policy = policy_for(server, s3={"abortWhenKeyHasObject": "Always"})
        store = open_store(policy.store, KEYS)
        assert isinstance(store, S3Store)
        original_abort = store.abort

        def abort_after_someone_else(target: Upload, **kwargs: Any) -> None:
            with server.lock:
                server.buckets[BUCKET].clear()  # another client aborted it meanwhile
            original_abort(target, **kwargs)

        store.abort = abort_after_someone_else  # type: ignore[method-assign]
        result = run_sweep(policy, store, locks=TargetLocks())
        store.close()
        assert server.open_uploads(BUCKET) == set()
        assert result.summary()["freedBytes"] == freed
        assert result.summary()["alreadyGone"] == (1 if status == 404 else 0)
        assert upload.upload_id


def test_abort_whose_answer_was_lost_is_ours() -> None:
    """The abort took effect, its answer was lost (500), botocore retried and got
    NoSuchUpload: that is our abort, counted freed once verified, not "already gone"."""
    with vendor(abort_answer_lost=True) as server:
        server.add_upload(BUCKET, "lost/1", age=OLD, part_sizes=[4096])
        result = sweep(server, profile="Generic")
        summary = result.summary()
        assert server.count("AbortMultipartUpload") == 2
        assert (summary["aborted"], summary["alreadyGone"], summary["freedBytes"]) == (1, 0, 4096)


# -- Tencent COS listing shapes -------------------------------------------------------------------


def test_uppercase_booleans_do_not_end_the_listing() -> None:
    with vendor(uppercase_booleans=True, max_page=10) as server:
        for index in range(25):
            server.add_upload(BUCKET, f"k/{index:03d}", age=OLD, part_sizes=[10] * 12)
        server.behaviour.max_page = 10
        result = sweep(server, profile="Generic")
        assert result.summary()["scanned"] == 25
        assert result.summary()["freedBytes"] == 25 * 120  # parts pages past the first too
        assert server.open_uploads(BUCKET) == set()


@pytest.fixture()
def tokyo() -> Iterator[None]:
    """The operator's local zone at UTC+9: zone-less store times must not move by 9 hours."""
    previous = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    yield
    if previous is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = previous
    time.tzset()


@pytest.mark.parametrize("time_format", ["iso-naive", "ctime"])
def test_zone_less_times_are_utc(tokyo: None, time_format: str) -> None:
    with vendor(time_format=time_format) as server:
        upload = server.add_upload(BUCKET, "young", age=timedelta(hours=3))
        store = open_store(policy_for(server, profile="Generic").store, KEYS)
        pages = list(store.list_uploads(BUCKET, []))
        listed = pages[0].uploads[0]
        assert listed.initiated == upload.initiated.astimezone(UTC)
        parts = store.measure(listed)
        assert parts.newest_part == upload.parts_modified.astimezone(UTC)
        store.close()
        # and so a sweep at olderThan 1d leaves the 3-hour-old upload alone
        result = sweep(server, profile="Generic")
        assert result.summary()["aborted"] == 0
        assert server.open_uploads(BUCKET) == {upload.upload_id}


# -- errors blamed on the right side -------------------------------------------------------------


@pytest.mark.parametrize("code", ["RequestTimeout", "UserNetworkTooSlow"])
def test_request_timeouts_are_transient_not_invalid_spec(code: str) -> None:
    with vendor() as server:
        server.fail_next("ListMultipartUploads", 400, code, count=50)
        store = open_store(policy_for(server, profile="Generic").store, KEYS)
        with pytest.raises(StoreUnreachable):
            list(store.list_uploads(BUCKET, []))
        store.close()


def test_cos_path_style_refusal_names_the_profile() -> None:
    with vendor() as server:
        server.fail_next("ListMultipartUploads", 403, "PathStyleDomainForbidden")
        store = open_store(policy_for(server, profile="Generic").store, KEYS)
        with pytest.raises(InvalidTarget, match="profile TencentCOS"):
            list(store.list_uploads(BUCKET, []))
        store.close()


def test_sweep_time_is_the_stores_clock_not_ours() -> None:
    """A sanity check of the fake itself: its Date header is what ages are judged on."""
    with vendor() as server:
        server.clock_offset = timedelta(days=-10)
        server.add_upload(BUCKET, "a", age=timedelta(days=3))
        result = sweep(server, profile="Generic")
        assert result.summary()["aborted"] == 1
        assert datetime.now(UTC) - server.now() > timedelta(days=9)


def test_no_date_header_means_no_age_and_no_quiet_period_judged() -> None:
    """Without the store's clock nothing is judged on ours: the upload is skipped and counted."""
    with vendor(send_date=False) as server:
        upload = server.add_upload(BUCKET, "a", age=OLD)
        store = open_store(policy_for(server, profile="Generic").store, KEYS)
        page = next(iter(store.list_uploads(BUCKET, [])))
        assert page.server_time is None
        assert store.measure(page.uploads[0]).server_time is None
        store.close()
        summary = sweep(server, profile="Generic").summary()
        assert (summary["aborted"], summary["skippedNoClock"]) == (0, 1)
        assert server.open_uploads(BUCKET) == {upload.upload_id}


@pytest.mark.parametrize("operation", ["ListParts", "ListMultipartUploads"])
def test_an_answer_cut_after_its_headers_is_never_read_as_empty(operation: str) -> None:
    """botocore does not enforce Content-Length and reads an empty 200 body as "no parts" or
    "no uploads": a cut answer must be an error (retried), never a short count."""
    with vendor(cut_after_headers={operation: 1}) as server:
        server.add_upload(BUCKET, "a", age=OLD, part_sizes=[700, 300])
        server.add_upload(BUCKET, "b", age=OLD, part_sizes=[24])
        summary = sweep(server, profile="Generic").summary()
        assert server.open_uploads(BUCKET) == set()
        assert (summary["aborted"], summary["freedBytes"]) == (2, 1024)
        assert server.count(operation) >= 2  # the cut answer was asked again
