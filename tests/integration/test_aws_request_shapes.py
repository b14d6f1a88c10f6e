"""AWS-only request shapes on moto's S3 server: ExpectedBucketOwner and RequestPayer on every
call, IfMatchInitiatedTime on directory-bucket aborts. (moto reports a fixed 2010 Initiated,
so nothing about age is tested here.)"""

from __future__ import annotations

import email.utils
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from mpu_janitor.policy import parse_policy
from mpu_janitor.stores import open_store, s3_fast
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.sweep import run_sweep
from tests.integration.helpers import make_upload, open_uploads
from tests.support.recording_proxy import Recorded, RecordingProxy

pytestmark = pytest.mark.integration

DIRECTORY_BUCKET = "media--use1-az4--x-s3"


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def no_express_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    # moto has no CreateSession; with S3 Express session auth off, directory-bucket calls are
    # signed like any other and still carry their own headers.
    monkeypatch.setenv("AWS_S3_DISABLE_EXPRESS_SESSION_AUTH", "true")


def client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )


@pytest.fixture(params=[True, False], ids=["fast-path", "botocore-only"])
def fast_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every shape holds on both request paths (stores/s3_fast.py and botocore's)."""
    monkeypatch.setattr(s3_fast, "ENABLED", request.param)
    return bool(request.param)


def sweep_recording(moto: str, s3_spec: dict[str, Any]) -> tuple[Any, list[Recorded]]:
    """A sweep through a proxy that records every request on the wire."""
    with RecordingProxy(moto) as proxy:
        result = _sweep(proxy.url, s3_spec)
    return result, [r for r in proxy.requests if r.method != "HEAD"]


def _sweep(endpoint: str, s3_spec: dict[str, Any]) -> Any:
    policy = parse_policy(
        {
            "metadata": {"name": "aws", "namespace": "ns"},
            "spec": {
                "store": {"type": "S3", "s3": {"endpoint": endpoint, "profile": "AWS", **s3_spec}},
                "match": {"olderThan": "1d", "quietPeriod": "0s"},
            },
        }
    )
    store = open_store(policy.store, StoreCredentials("test", "test"))
    try:
        return run_sweep(policy, store)
    finally:
        store.close()


def headers(request: Recorded) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


def test_owner_and_payer_go_with_every_call(moto_endpoint: str, fast_path: bool) -> None:
    s3 = client(moto_endpoint)
    s3.create_bucket(Bucket="payer-1")
    make_upload(s3, "payer-1", "a", [100, 23])
    make_upload(s3, "payer-1", "b", [7])

    result, sent = sweep_recording(
        moto_endpoint,
        {
            "buckets": ["payer-1"],
            "expectedBucketOwner": "111122223333",
            "requestPayer": "Requester",
        },
    )

    assert result.summary()["aborted"] == 2
    assert result.freed_bytes == 130
    assert open_uploads(s3, "payer-1") == set()
    methods = {request.method for request in sent}
    assert methods == {"GET", "DELETE"}
    assert sum(request.method == "DELETE" for request in sent) == 2  # nothing sent twice
    assert sum("uploadId=" in request.path and request.method == "GET" for request in sent) >= 2
    for request in sent:
        seen = headers(request)
        assert seen["x-amz-expected-bucket-owner"] == "111122223333"
        assert seen["x-amz-request-payer"] == "requester"
        assert "x-amz-if-match-initiated-time" not in seen
        assert "mpu-janitor/" in seen["user-agent"]
        assert seen["authorization"].startswith("AWS4-HMAC-SHA256 Credential=test/")


def test_directory_bucket_abort_is_conditional_on_initiation(
    moto_endpoint: str, no_express_sessions: None, fast_path: bool
) -> None:
    s3 = client(moto_endpoint)
    s3.create_bucket(
        Bucket=DIRECTORY_BUCKET,
        CreateBucketConfiguration={
            "Location": {"Type": "AvailabilityZone", "Name": "use1-az4"},
            "Bucket": {"Type": "Directory", "DataRedundancy": "SingleAvailabilityZone"},
        },
    )
    make_upload(s3, DIRECTORY_BUCKET, "clip.mp4", [42])
    initiated = s3.list_multipart_uploads(Bucket=DIRECTORY_BUCKET)["Uploads"][0]["Initiated"]

    result, sent = sweep_recording(
        moto_endpoint, {"buckets": [DIRECTORY_BUCKET], "requestPayer": "Requester"}
    )

    assert result.summary()["aborted"] == 1 and result.freed_bytes == 42
    aborts = [request for request in sent if request.method == "DELETE"]
    assert len(aborts) == 1
    header = headers(aborts[0])["x-amz-if-match-initiated-time"]
    assert email.utils.parsedate_to_datetime(header) == initiated
    # Directory buckets take no RequestPayer.
    assert all("x-amz-request-payer" not in headers(request) for request in sent)
