"""The lighter request path for ListParts and AbortMultipartUpload (stores/s3_fast.py) on real
servers (MinIO, Ceph RGW, moto's S3 server), against botocore's own path: the same uploads
aborted, the same bytes freed, the same requests seen by the request observer, with hostile
keys and with answers that are not clean (503 SlowDown, 500, an answer cut short, an answer
lost after the store acted)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest
from moto.server import ThreadedMotoServer

from mpu_janitor.stores import open_store, s3_fast
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.sweep import run_sweep
from tests.integration.helpers import make_upload, policy_doc, to_policy
from tests.integration.test_sweep_ceph import (
    encoded_uploads,
    new_bucket,
    raw_client,
)
from tests.support.fault_proxy import CUT_BODY, FaultProxy
from tests.support.minio import MinioServer
from tests.support.s3_access import S3Access

pytestmark = pytest.mark.integration

AGE = 3.5  # seconds that make an upload "old" for olderThan: 2s on a 1 s Date clock

KEYS = [
    "ünïcødé/日本語/🙂",
    "spaces in  the key ",
    "plus+sign",
    "percent%41%2F%",
    "question?mark=1&x",
    "hash#fragment",
    "double//slash///",
    "/leading slash",
    "tilde~dot.key;a=b",
    ("k" * 200 + "/") * 4 + "k" * 196,  # 1,000 bytes (MinIO refuses path segments over 255)
]


class _Moto(S3Access):
    """moto's S3 server with the attributes the helpers read."""

    access_key = "test"
    secret_key = "test"

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"


@pytest.fixture(scope="module")
def moto() -> Iterator[_Moto]:
    server = _Moto()
    yield server
    server.server.stop()


@pytest.fixture(params=[True, False], ids=["fast-path", "botocore-only"])
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(s3_fast, "ENABLED", request.param)
    return bool(request.param)


@pytest.fixture()
def fast_answers(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, str]]:
    """Every attempt the fast path made, by operation and the observer's code."""
    seen: Counter[tuple[str, str]] = Counter()
    observe = s3_fast.FastS3._observe

    def spy(self: s3_fast.FastS3, operation: str, code: str) -> None:
        seen[operation, code] += 1
        observe(self, operation, code)

    monkeypatch.setattr(s3_fast.FastS3, "_observe", spy)
    return seen


def created(s3: Any, bucket: str, key: str, size: int) -> bool:
    """Create an upload of one ``size``-byte part at ``key``; False if the server refuses
    the key."""
    try:
        upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"h" * size)
    except botocore.exceptions.ClientError:
        return False
    return True


def sweep(endpoint: str, server: Any, bucket: str, profile: str) -> tuple[Any, Counter[Any]]:
    """One sweep of ``bucket``; the request observer's counts by (operation, code)."""
    observed: Counter[tuple[str, str]] = Counter()
    policy = to_policy(policy_doc(endpoint, [bucket], profile=profile))
    store = open_store(
        policy.store,
        StoreCredentials(server.access_key, server.secret_key),
        lambda operation, code: observed.update([(operation, code)]),
    )
    try:
        return run_sweep(policy, store), observed
    finally:
        store.close()


@pytest.mark.parametrize("server_name", ["minio", "ceph", "moto"])
def test_hostile_keys_are_measured_and_aborted_exactly_on_both_paths(
    server_name: str,
    fast_path: bool,
    fast_answers: Counter[tuple[str, str]],
    request: pytest.FixtureRequest,
) -> None:
    server = request.getfixturevalue(server_name)
    s3 = raw_client(server)
    bucket = new_bucket(s3, f"fast-{server_name}-{fast_path}")
    sizes = {key: 100 + index for index, key in enumerate(KEYS)}
    refused = {key for key, size in sizes.items() if not created(s3, bucket, key, size)}
    # MinIO refuses "//" and a leading "/" in a key; every other key is served everywhere.
    assert refused <= {"double//slash///", "/leading slash"}
    sizes = {key: size for key, size in sizes.items() if key not in refused}
    make_upload(s3, bucket, "two-parts", [5 * 1024 * 1024, 7])
    sizes["two-parts"] = 5 * 1024 * 1024 + 7
    # A refused key may still leave an empty upload (MinIO makes "/x" into "x"): all are swept.
    uploads = len(encoded_uploads(s3, bucket))
    if server_name != "moto":  # moto reports a fixed 2010 Initiated
        time.sleep(AGE)
    profile = {"minio": "MinIO", "ceph": "Ceph", "moto": "AWS"}[server_name]

    result, observed = sweep(server.endpoint, server, bucket, profile)

    summary = result.summary()
    assert summary["failed"] == 0, summary["errors"]
    assert summary["aborted"] == uploads
    assert summary["freedBytes"] == sum(sizes.values())
    assert encoded_uploads(s3, bucket) == set()
    assert observed["AbortMultipartUpload", "204"] == uploads
    assert observed["ListParts", "200"] >= uploads
    if fast_path:
        # The fast path sent them all, and every one was a clean answer (404: a verifying
        # ListParts that found the upload gone).
        assert fast_answers["AbortMultipartUpload", "204"] == uploads
        assert fast_answers["ListParts", "200"] == observed["ListParts", "200"]
        assert fast_answers["ListParts", "404"] == observed["ListParts", "404"]
        clean = {("AbortMultipartUpload", "204"), ("ListParts", "200"), ("ListParts", "404")}
        assert set(fast_answers) <= clean
    else:
        assert not fast_answers


@pytest.fixture()
def faulty(minio: MinioServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(minio.endpoint, fraction=0.0, seed=11).start()
    yield proxy
    proxy.stop()


def test_answers_that_are_not_clean_behave_as_on_botocore(
    minio: MinioServer,
    faulty: FaultProxy,
    fast_path: bool,
    fast_answers: Counter[tuple[str, str]],
) -> None:
    s3 = raw_client(minio)
    bucket = new_bucket(s3, f"fast-faults-{fast_path}")
    keys = [f"f/{index:02}" for index in range(8)]
    for index, key in enumerate(keys):
        make_upload(s3, bucket, key, [10 + index])
    time.sleep(AGE)
    faulty.force("ListParts", "slowdown", 1, key=keys[0])
    faulty.force("ListParts", CUT_BODY, 1, key=keys[1])
    faulty.force("ListParts", "internal", 1, key=keys[2])
    faulty.force("AbortMultipartUpload", "internal", 1, key=keys[3])
    faulty.force("AbortMultipartUpload", "slowdown", 1, key=keys[4])
    faulty.force("AbortMultipartUpload", "drop_after", 1, key=keys[5])
    faulty.force("AbortMultipartUpload", CUT_BODY, 1, key=keys[6])

    result, observed = sweep(faulty.endpoint, minio, bucket, "MinIO")

    summary = result.summary()
    assert summary["failed"] == 0, summary["errors"]
    assert summary["aborted"] == len(keys)
    assert summary["freedBytes"] == sum(10 + index for index in range(len(keys)))
    assert encoded_uploads(s3, bucket) == set()
    # Every attempt seen, the faulted ones included, whichever path sent it.
    assert observed["ListParts", "503"] == 1
    assert observed["ListParts", "500"] == 1
    assert observed["ListParts", "IncompleteRead"] == 1
    assert observed["AbortMultipartUpload", "500"] == 1
    assert observed["AbortMultipartUpload", "503"] == 1
    # The abort whose answer was lost: seen as the connection closing, then sent again (a
    # connection the proxy cut may be picked from the pool once more, on either path).
    assert observed["AbortMultipartUpload", "ConnectionClosedError"] >= 1
    if fast_path:
        # The fast path met each fault first and handed the call to botocore.
        assert fast_answers["ListParts", "503"] == 1
        assert fast_answers["AbortMultipartUpload", "500"] == 1
        assert fast_answers["ListParts", "IncompleteRead"] == 1
