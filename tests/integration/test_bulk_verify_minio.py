"""Aborts proven gone by MinIO's listing: about two requests per aborted upload instead of
three, with the freed bytes exact and nothing outside the policy touched."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.sweep import BULK_VERIFY_MIN_BATCH, run_sweep
from tests.integration.helpers import make_upload, make_uploads, open_uploads, policy_doc, to_policy
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

AGE = 3.5


def counted_sweep(minio: MinioServer, doc: dict[str, Any]) -> tuple[Any, Counter[str]]:
    requests: Counter[str] = Counter()
    policy = to_policy(doc)
    credentials = StoreCredentials(
        access_key_id=minio.access_key, secret_access_key=minio.secret_key
    )
    store = open_store(policy.store, credentials, lambda op, code: requests.update([op]))
    try:
        return run_sweep(policy, store), requests
    finally:
        store.close()


def test_a_listing_proves_aborts_gone_with_no_parts_listing_to_verify(
    minio: MinioServer, s3: Any, bucket: str
) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: make_upload(s3, bucket, f"tmp/{i:04}", [1 + i % 7]), range(300)))
    # An upload the policy keeps (another prefix), begun before the sweep's listing: the table
    # MinIO lists from holds it all along, which is how a listing shows that this table was
    # not emptied by a restart.
    outside = make_upload(s3, bucket, "keep/old", [10])
    time.sleep(AGE)
    young = make_upload(s3, bucket, "tmp/young", [10])
    doc = policy_doc(
        minio.endpoint, [bucket], match={"prefixes": ["tmp/"]}, limits={"concurrency": 8}
    )

    result, requests = counted_sweep(minio, doc)

    summary = result.summary()
    assert summary["aborted"] == 300 and summary["failed"] == 0, summary
    assert summary["freedBytes"] == summary["eligibleBytes"] == sum(1 + i % 7 for i in range(300))
    assert open_uploads(s3, bucket) == {("tmp/young", young), ("keep/old", outside)}
    assert requests["AbortMultipartUpload"] == 300
    assert requests["ListParts"] == 301  # the measures only: no verifying parts listing
    batches = 300 // BULK_VERIFY_MIN_BATCH + 1
    assert 2 <= requests["ListMultipartUploads"] <= 1 + batches
    per_upload = sum(requests.values()) / 300
    assert per_upload < 2.1, requests


def test_without_anything_left_to_show_the_table_each_abort_is_verified_alone(
    minio: MinioServer, s3: Any, bucket: str
) -> None:
    # Every upload eligible and fewer than a batch: the verifying listing is empty, which a
    # restarted MinIO would answer too, so each abort gets its own parts listing.
    make_uploads(s3, bucket, [f"k{index}" for index in range(10)])
    time.sleep(AGE)
    result, requests = counted_sweep(minio, policy_doc(minio.endpoint, [bucket]))
    summary = result.summary()
    assert summary["aborted"] == 10 and summary["failed"] == 0
    assert requests["ListParts"] == 20
    assert open_uploads(s3, bucket) == set()
