"""The lighter request path (stores/s3_fast.py) builds the very request botocore builds, for
hostile keys, on path-style and virtual-hosted endpoints, and reads only clean answers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import botocore.awsrequest
import pytest

from mpu_janitor.policy import parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.stores.s3 import S3Store
from mpu_janitor.stores.s3_fast import (
    Answer,
    Fallback,
    FastS3,
    Gone,
    error_code,
    parse_list_parts,
)

KEYS = [
    "plain",
    "ünïcødé/日本語/🙂",
    "spaces in  key ",
    "plus+sign",
    "percent%41%2F%",
    "question?mark=1&x",
    "hash#fragment",
    "double//slash///",
    "/leading",
    "tilde~;a=b,c$d@e:f'(g)*!",
    "k" * 1000,
]

# Headers that differ between two requests by design (clock, per-call ids) or by signature.
_VARYING = {"x-amz-date", "authorization", "amz-sdk-invocation-id", "x-amz-content-sha256"}

PARTS = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListPartsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket>
<Key>k</Key><UploadId>u</UploadId><NextPartNumberMarker>2</NextPartNumberMarker>
<MaxParts>1000</MaxParts><IsTruncated>TRUE</IsTruncated>
<Part><PartNumber>1</PartNumber><LastModified>2026-11-22T10:00:00.000Z</LastModified>
<ETag>"x"</ETag><Size>5242880</Size></Part>
<Part><PartNumber>2</PartNumber><LastModified>2026-11-22T10:00:01Z</LastModified>
<ETag>"y"</ETag><Size>7</Size></Part></ListPartsResult>"""


def store(endpoint: str, profile: str, **s3: Any) -> S3Store:
    if profile == "AWS-eu":
        profile, s3 = "AWS", {**s3, "region": "eu-west-1"}
    if endpoint:
        s3 = {**s3, "endpoint": endpoint}
    bucket = "bkt"
    if profile == "TencentCOS":
        bucket, s3 = "bkt-1250000000", {**s3, "region": "ap-guangzhou"}
    policy = parse_policy(
        {
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "store": {
                    "type": "S3",
                    "s3": {"profile": profile, "buckets": [bucket], **s3},
                },
                "match": {"olderThan": "1d"},
            },
        }
    )
    opened = open_store(policy.store, StoreCredentials("AKIDEXAMPLE", "secret"))
    assert isinstance(opened, S3Store)
    return opened


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, *_: Any, **__: Any) -> Any:
        yield self.body


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
    headers = {"Date": "Sun, 22 Nov 2026 10:00:00 GMT", **(headers or {})}
    headers.setdefault("Content-Length", str(len(body)))
    return botocore.awsrequest.AWSResponse("http://x", status, headers, _Raw(body))


class Wire:
    """Stands in for the HTTP session: records what would be sent, answers as told."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.sent: list[Any] = []

    def send(self, request: Any) -> Any:
        self.sent.append(request)
        reply = self.answers.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def botocore_request(s3: S3Store, operation: str, **params: Any) -> Any:
    """The request botocore itself builds for the same call (never sent)."""
    seen: list[Any] = []

    def capture(request: Any, **_: Any) -> Any:
        seen.append(request)
        return answer(204 if operation == "AbortMultipartUpload" else 200, PARTS)

    s3.client.meta.events.register(f"before-send.s3.{operation}", capture)
    call = {"ListParts": s3.client.list_parts, "AbortMultipartUpload": None}[operation]
    (call or s3.client.abort_multipart_upload)(**params)
    return seen[0]


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def same_request(ours: Any, theirs: Any) -> None:
    assert ours.method == theirs.method
    assert ours.url == theirs.url
    mine = {k.lower(): text(v) for k, v in ours.headers.items() if k.lower() not in _VARYING}
    botos = {k.lower(): text(v) for k, v in theirs.headers.items() if k.lower() not in _VARYING}
    assert mine == botos


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(
    ("endpoint", "profile", "host"),
    [
        ("http://127.0.0.1:9000", "MinIO", "127.0.0.1:9000"),
        (
            "https://cos.ap-guangzhou.myqcloud.com",
            "TencentCOS",
            "bkt-1250000000.cos.ap-guangzhou.myqcloud.com",
        ),
        ("https://s3.example.com", "Generic", "s3.example.com"),
        ("", "AWS", "bkt.s3.amazonaws.com"),
        ("", "AWS-eu", "bkt.s3.eu-west-1.amazonaws.com"),
    ],
)
def test_the_request_is_the_one_botocore_builds(
    key: str, endpoint: str, profile: str, host: str
) -> None:
    s3 = store(endpoint, profile)
    wire = Wire(answer(200, PARTS), answer(204))
    s3.fast._session = wire
    bucket = s3.target.buckets[0]
    params = {"Bucket": bucket, "Key": key, "UploadId": "up/id+=", "MaxParts": 1000}
    common = {"ExpectedBucketOwner": "111122223333"}

    s3.fast.list_parts({**params, "PartNumberMarker": 3, **common}, frozenset())
    assert s3.fast.abort({"Bucket": bucket, "Key": key, "UploadId": "up/id+=", **common})

    listed, aborted = wire.sent
    assert listed.url.split("/")[2] == host
    same_request(
        listed,
        botocore_request(s3, "ListParts", **params, PartNumberMarker=3, **common),
    )
    same_request(
        aborted,
        botocore_request(
            s3, "AbortMultipartUpload", Bucket=bucket, Key=key, UploadId="up/id+=", **common
        ),
    )
    assert text(listed.headers["Authorization"]).startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"
    )


def test_a_list_parts_page_reads_as_botocore_reads_it() -> None:
    page = parse_list_parts(Answer(200, {"date": "d"}, PARTS))
    assert page is not None
    assert page["IsTruncated"] is True  # Tencent COS's TRUE
    assert page["NextPartNumberMarker"] == 2
    assert page["Parts"] == [
        {"PartNumber": 1, "Size": 5242880, "LastModified": datetime(2026, 11, 22, 10, tzinfo=UTC)},
        {"PartNumber": 2, "Size": 7, "LastModified": datetime(2026, 11, 22, 10, 0, 1, tzinfo=UTC)},
    ]
    assert page["ResponseMetadata"]["HTTPHeaders"] == {"date": "d"}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>proxy error</html>",
        b"<ListPartsResult><IsTruncated>maybe</IsTruncated></ListPartsResult>",
        b"<ListPartsResult><Part><PartNumber>1</PartNumber></Part></ListPartsResult>",
        b"<ListPartsResult><Part><PartNumber>x</PartNumber><Size>1</Size>"
        b"<LastModified>2026-11-22T10:00:00Z</LastModified></Part></ListPartsResult>",
        PARTS[: len(PARTS) // 2],
    ],
)
def test_a_body_it_does_not_understand_goes_to_botocore(body: bytes) -> None:
    assert parse_list_parts(Answer(200, {}, body)) is None


def test_error_codes() -> None:
    assert error_code(b"<Error><Code>NoSuchUpload</Code><Message>m</Message></Error>") == (
        "NoSuchUpload"
    )
    assert error_code(b"not xml") is None
    assert error_code(b"") is None


def fast(*answers: Any) -> tuple[FastS3, Wire, list[tuple[str, str]]]:
    s3 = store("http://127.0.0.1:9000", "Ceph")
    seen: list[tuple[str, str]] = []
    wire = Wire(*answers)
    s3.fast._session = wire
    s3.fast.observer = lambda operation, code: seen.append((operation, code))
    return s3.fast, wire, seen


PARAMS = {"Bucket": "bkt", "Key": "k", "UploadId": "u", "MaxParts": 1000}
GONE = frozenset({"NoSuchUpload", "NoSuchKey"})


def test_only_clean_list_parts_answers_are_read_here() -> None:
    nosuchkey = b"<Error><Code>NoSuchKey</Code></Error>"
    client, _, seen = fast(
        answer(200, PARTS),
        answer(404, nosuchkey),
        answer(503, b"<Error><Code>SlowDown</Code></Error>"),
        answer(200, PARTS, {"Content-Length": str(len(PARTS) + 10)}),  # cut short
        answer(404, b"<Error><Code>NoSuchBucket</Code></Error>"),
        ConnectionResetError(),
    )
    assert client.list_parts(PARAMS, GONE) is not None
    with pytest.raises(Gone):
        client.list_parts(PARAMS, GONE)  # Ceph's way of saying the upload is gone
    for _ in range(4):
        assert client.list_parts(PARAMS, GONE) is None  # botocore sends it again
    assert seen == [
        ("ListParts", "200"),
        ("ListParts", "404"),
        ("ListParts", "503"),
        ("ListParts", "IncompleteRead"),
        ("ListParts", "404"),
        ("ListParts", "ConnectionResetError"),
    ]


def test_an_abort_that_may_have_been_applied_says_so() -> None:
    client, _, seen = fast(
        answer(204),
        answer(404, b"<Error><Code>NoSuchUpload</Code></Error>"),
        answer(500, b"<Error><Code>InternalError</Code></Error>"),
        answer(400, b"<Error><Code>RequestTimeout</Code></Error>"),
        ConnectionResetError(),
        answer(403, b"<Error><Code>AccessDenied</Code></Error>"),
        answer(503, b"<Error><Code>SlowDown</Code></Error>"),
    )
    abort = {"Bucket": "bkt", "Key": "k", "UploadId": "u"}
    assert client.abort(abort)
    with pytest.raises(Gone):
        client.abort(abort)
    outcomes = []
    for _ in range(5):
        with pytest.raises(Fallback) as fallback:
            client.abort(abort)
        outcomes.append(fallback.value.maybe_applied)
    # 500, a retried 400, no answer, 503: maybe applied; 403: refused, not applied.
    assert outcomes == [True, True, True, False, True]
    assert [code for _, code in seen] == [
        "204",
        "404",
        "500",
        "400",
        "ConnectionResetError",
        "403",
        "503",
    ]
