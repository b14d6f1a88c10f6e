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
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.sweep import run_sweep
from tests.integration.helpers import make_upload, open_uploads

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


def sweep_recording(endpoint: str, s3_spec: dict[str, Any]) -> tuple[Any, list[Any]]:
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
    sent: list[Any] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request))
    try:
        return run_sweep(policy, store), sent
    finally:
        store.close()


def test_owner_and_payer_go_with_every_call(moto_endpoint: str) -> None:
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
    for request in sent:
        assert request.headers["x-amz-expected-bucket-owner"] == b"111122223333"
        assert request.headers["x-amz-request-payer"] == b"requester"
        assert "x-amz-if-match-initiated-time" not in request.headers


def test_directory_bucket_abort_is_conditional_on_initiation(
    moto_endpoint: str, no_express_sessions: None
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
    header = aborts[0].headers["x-amz-if-match-initiated-time"].decode()
    assert email.utils.parsedate_to_datetime(header) == initiated
    # Directory buckets take no RequestPayer.
    assert all("x-amz-request-payer" not in request.headers for request in sent)
