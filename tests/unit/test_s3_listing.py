"""The S3 store's listing and parts-listing loops against scripted answers (botocore's Stubber):
markers, URL-encoded keys, pages that make no progress, and the profile flags that describe
how a provider differs. The real servers prove the same on MinIO and Ceph (integration tier)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from botocore.stub import Stubber

from mpu_janitor.policy import S3Target
from mpu_janitor.stores import s3 as s3_module
from mpu_janitor.stores.base import StoreCredentials, StoreError, Throttled, UploadGone
from mpu_janitor.stores.s3 import S3Store

T = TypeVar("T")
WHEN = datetime(2026, 1, 1, tzinfo=UTC)
META = {"HTTPStatusCode": 200, "HTTPHeaders": {"date": "Thu, 01 Jan 2026 12:00:00 GMT"}}


def store_for(profile: str = "Generic") -> S3Store:
    target = S3Target(
        endpoint="http://127.0.0.1:9",
        region="us-east-1",
        profile=profile,
        buckets=("bkt",),
        bucket_pattern=None,
        expected_bucket_owner=None,
        request_payer=None,
    )
    return S3Store(target, StoreCredentials("k", "s"), lambda op, code: None)


@pytest.fixture()
def stubbed() -> Iterator[Callable[[str], tuple[S3Store, Stubber]]]:
    made: list[Stubber] = []

    def make(profile: str = "Generic") -> tuple[S3Store, Stubber]:
        store = store_for(profile)
        stub = Stubber(store.client)
        stub.activate()
        made.append(stub)
        return store, stub

    yield make
    for stub in made:
        stub.deactivate()


def upload(key: str, upload_id: str) -> dict[str, Any]:
    return {"Key": key, "UploadId": upload_id, "Initiated": WHEN}


def page(*uploads: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"Bucket": "bkt", "Uploads": list(uploads), "ResponseMetadata": META, **fields}


def listed(store: S3Store, prefixes: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    return [
        (u.key, u.upload_id) for p in store.list_uploads("bkt", list(prefixes)) for u in p.uploads
    ]


def expect_list(stub: Stubber, response: dict[str, Any], **params: Any) -> None:
    expected = {"Bucket": "bkt", "MaxUploads": 1000, "EncodingType": "url", **params}
    stub.add_response("list_multipart_uploads", response, expected)


# -- URL-encoded listings -------------------------------------------------------------------


def test_keys_and_markers_are_url_decoded_when_the_store_says_it_encoded_them(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Generic")
    first = page(
        upload("crlf%0D%0Akey", "u1"),
        upload("pct%2541%3C%26%3E", "u2"),
        IsTruncated=True,
        EncodingType="url",
        NextKeyMarker="pct%2541%3C%26%3E",
        NextUploadIdMarker="u2",
    )
    expect_list(stub, first)
    # The marker goes back decoded (botocore encodes the query string itself).
    expect_list(
        stub,
        page(upload("%C3%BCn%C3%AF", "u3"), IsTruncated=False, EncodingType="url"),
        KeyMarker="pct%41<&>",
        UploadIdMarker="u2",
    )
    assert listed(store) == [("crlf\r\nkey", "u1"), ("pct%41<&>", "u2"), ("ünï", "u3")]
    stub.assert_no_pending_responses()


def test_keys_only_encoding_decodes_keys_but_never_the_raw_markers(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    # Ceph encodes <Key> but sends markers raw and never echoes EncodingType: decoding its
    # marker "pct%41" would resume at "pctA" and mis-identify or skip uploads.
    store, stub = stubbed("Ceph")
    expect_list(
        stub,
        page(
            upload("pct%2541", "u1"),
            IsTruncated=True,
            NextKeyMarker="pct%41",
            NextUploadIdMarker="u1",
        ),
    )
    expect_list(
        stub,
        page(upload("z%0A", "u2"), IsTruncated=False, NextKeyMarker="z\n", NextUploadIdMarker="u2"),
        KeyMarker="pct%41",
        UploadIdMarker="u1",
    )
    assert listed(store) == [("pct%41", "u1"), ("z\n", "u2")]


# -- markers and progress -------------------------------------------------------------------


def test_an_inclusive_key_marker_never_yields_an_upload_twice(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    # Ceph's KeyMarker includes that key's uploads again when the upload-id marker is ignored.
    store, stub = stubbed("Ceph")
    expect_list(
        stub,
        page(
            upload("a", "u1"),
            upload("b", "u2"),
            IsTruncated=True,
            NextKeyMarker="b",
            NextUploadIdMarker="u2",
        ),
    )
    expect_list(
        stub,
        page(upload("b", "u2"), upload("c", "u3"), IsTruncated=False, NextKeyMarker="c"),
        KeyMarker="b",
        UploadIdMarker="u2",
    )
    assert listed(store) == [("a", "u1"), ("b", "u2"), ("c", "u3")]


def test_next_markers_without_truncation_end_the_listing(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Ceph")
    expect_list(
        stub,
        page(upload("a", "u1"), IsTruncated=False, NextKeyMarker="a", NextUploadIdMarker="u1"),
    )
    assert listed(store) == [("a", "u1")]
    stub.assert_no_pending_responses()


@pytest.mark.parametrize("profile", ["Generic", "AWS", "MinIO", "Ceph", "Scality"])
def test_a_truncated_page_without_markers_is_an_error_not_an_endless_loop(
    stubbed: Callable[[str], tuple[S3Store, Stubber]], profile: str
) -> None:
    # Ceph answers MaxUploads=0 with IsTruncated=true and no markers.
    store, stub = stubbed(profile)
    expect_list(stub, page(IsTruncated=True))
    with pytest.raises(StoreError, match="no progress"):
        listed(store)


def test_a_page_repeating_its_markers_is_an_error(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Generic")
    same = page(upload("a", "u1"), IsTruncated=True, NextKeyMarker="a", NextUploadIdMarker="u1")
    expect_list(stub, same)
    expect_list(stub, same, KeyMarker="a", UploadIdMarker="u1")
    with pytest.raises(StoreError, match="no progress"):
        listed(store)


def test_a_marker_cycle_is_an_error(stubbed: Callable[[str], tuple[S3Store, Stubber]]) -> None:
    # Empty truncated pages that point A -> B -> A.
    store, stub = stubbed("Generic")
    to_a = page(IsTruncated=True, NextKeyMarker="a", NextUploadIdMarker="u1")
    to_b = page(IsTruncated=True, NextKeyMarker="b", NextUploadIdMarker="u2")
    expect_list(stub, to_a)
    expect_list(stub, to_b, KeyMarker="a", UploadIdMarker="u1")
    expect_list(stub, to_a, KeyMarker="b", UploadIdMarker="u2")
    with pytest.raises(StoreError, match="no progress"):
        listed(store)


def test_directory_buckets_resume_on_the_opaque_key_marker_alone(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("AWS")
    bucket = "data--use1-az4--x-s3"
    first = {
        "Bucket": bucket,
        "Uploads": [upload("k1", "u1")],
        "IsTruncated": True,
        "NextKeyMarker": "opaque%3Dtoken",
        "EncodingType": "url",
        "ResponseMetadata": META,
    }
    last = {**first, "Uploads": [upload("k2", "u2")], "IsTruncated": False}
    del last["NextKeyMarker"]
    common = {"Bucket": bucket, "MaxUploads": 1000, "EncodingType": "url"}
    stub.add_response("list_multipart_uploads", first, common)
    stub.add_response("list_multipart_uploads", last, {**common, "KeyMarker": "opaque=token"})
    keys = [u.key for p in store.list_uploads(bucket, []) for u in p.uploads]
    assert keys == ["k1", "k2"]
    stub.assert_no_pending_responses()


def test_no_delimiter_is_ever_sent_and_prefixes_go_to_the_server(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Ceph")
    expect_list(stub, page(upload("a/1", "u1"), IsTruncated=False), Prefix="a/")
    expect_list(stub, page(upload("b/2", "u2"), IsTruncated=False), Prefix="b/")
    assert listed(store, ("b/", "a/", "a/x/")) == [("a/1", "u1"), ("b/2", "u2")]
    stub.assert_no_pending_responses()  # the Stubber also rejects any unexpected parameter


def test_every_listing_page_goes_through_pace(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Generic")
    expect_list(
        stub,
        page(upload("a", "u1"), IsTruncated=True, NextKeyMarker="a", NextUploadIdMarker="u1"),
    )
    expect_list(
        stub, page(upload("b", "u2"), IsTruncated=False), KeyMarker="a", UploadIdMarker="u1"
    )
    paced: list[int] = []

    def pace(request: Callable[[], T], *, finish: bool = False) -> T:
        paced.append(1)
        return request()

    keys = [u.key for p in store.list_uploads("bkt", [], pace) for u in p.uploads]
    assert keys == ["a", "b"] and len(paced) == 2


# -- parts listings -------------------------------------------------------------------------


def parts_page(numbers: list[int], **fields: Any) -> dict[str, Any]:
    parts = [{"PartNumber": n, "Size": 10 * n, "LastModified": WHEN} for n in numbers]
    return {"Parts": parts, "ResponseMetadata": META, **fields}


def expect_parts(stub: Stubber, response: dict[str, Any], **params: Any) -> None:
    expected = {"Bucket": "bkt", "Key": "k", "UploadId": "u", "MaxParts": 1000, **params}
    stub.add_response("list_parts", response, expected)


def an_upload() -> Any:
    from mpu_janitor.stores.base import Upload

    return Upload("bkt", "k", "u", WHEN)


def test_parts_pages_go_through_pace_and_sum_every_part(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Generic")
    expect_parts(stub, parts_page([1, 2], IsTruncated=True, NextPartNumberMarker=2))
    expect_parts(stub, parts_page([3], IsTruncated=False), PartNumberMarker=2)
    paced: list[int] = []

    def pace(request: Callable[[], T], *, finish: bool = False) -> T:
        paced.append(1)
        return request()

    summary = store.measure(an_upload(), pace)
    assert (summary.size_bytes, summary.part_count, len(paced)) == (60, 3, 2)


def test_a_parts_page_that_makes_no_progress_is_an_error(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Generic")
    expect_parts(stub, parts_page([1], IsTruncated=True, NextPartNumberMarker=1))
    expect_parts(
        stub, parts_page([1], IsTruncated=True, NextPartNumberMarker=1), PartNumberMarker=1
    )
    with pytest.raises(StoreError, match="no progress"):
        store.measure(an_upload())


def test_a_truncated_parts_page_without_a_marker_is_an_error(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Ceph")
    expect_parts(stub, parts_page([], IsTruncated=True))
    with pytest.raises(StoreError, match="no progress"):
        store.measure(an_upload())


def test_no_such_key_from_list_parts_means_gone_only_where_the_profile_says_so(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    ceph, ceph_stub = stubbed("Ceph")
    ceph_stub.add_client_error(
        "list_parts", "NoSuchKey", http_status_code=404, expected_params=None
    )
    with pytest.raises(UploadGone):
        ceph.measure(an_upload())

    generic, generic_stub = stubbed("Generic")
    generic_stub.add_client_error(
        "list_parts", "NoSuchKey", http_status_code=404, expected_params=None
    )
    with pytest.raises(StoreError) as raised:
        generic.measure(an_upload())
    assert not isinstance(raised.value, UploadGone)


def retrying_pace(sent: list[str]) -> Any:
    """The engine's contract in small: a Throttled request is sent again, alone."""

    def pace(request: Callable[[], T], *, finish: bool = False) -> T:
        while True:
            sent.append("request")
            try:
                return request()
            except Throttled:
                sent.append("throttled")

    return pace


def test_a_throttled_page_is_retried_alone_from_its_own_markers(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Ceph")
    expect_list(
        stub,
        page(upload("a", "u1"), IsTruncated=True, NextKeyMarker="a", NextUploadIdMarker="u1"),
    )
    stub.add_client_error(
        "list_multipart_uploads",
        "SlowDown",
        http_status_code=503,
        expected_params={
            "Bucket": "bkt",
            "MaxUploads": 1000,
            "EncodingType": "url",
            "KeyMarker": "a",
            "UploadIdMarker": "u1",
        },
    )
    expect_list(
        stub, page(upload("b", "u2"), IsTruncated=False), KeyMarker="a", UploadIdMarker="u1"
    )
    sent: list[str] = []
    keys = [u.key for p in store.list_uploads("bkt", [], retrying_pace(sent)) for u in p.uploads]
    assert keys == ["a", "b"]  # the first page is not listed again
    assert sent == ["request", "request", "throttled", "request"]
    stub.assert_no_pending_responses()


def test_a_throttled_parts_page_is_retried_alone(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Generic")
    expect_parts(stub, parts_page([1, 2], IsTruncated=True, NextPartNumberMarker=2))
    stub.add_client_error("list_parts", "SlowDown", http_status_code=503, expected_params=None)
    expect_parts(stub, parts_page([3], IsTruncated=False), PartNumberMarker=2)
    sent: list[str] = []
    summary = store.measure(an_upload(), retrying_pace(sent))
    assert (summary.size_bytes, summary.part_count) == (60, 3)  # parts 1 and 2 counted once
    stub.assert_no_pending_responses()


def test_endless_empty_truncated_pages_are_an_error(
    stubbed: Callable[[str], tuple[S3Store, Stubber]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every page names a new marker but lists nothing: stopped after MAX_EMPTY_PAGES.
    monkeypatch.setattr(s3_module, "MAX_EMPTY_PAGES", 3)
    store, stub = stubbed("Generic")
    previous: dict[str, Any] = {}
    for index in range(4):
        marker = {"NextKeyMarker": f"k{index}", "NextUploadIdMarker": f"u{index}"}
        expect_list(stub, page(IsTruncated=True, **marker), **previous)
        previous = {"KeyMarker": f"k{index}", "UploadIdMarker": f"u{index}"}
    with pytest.raises(
        StoreError, match=r"no progress: 4 truncated pages in a row without an upload"
    ):
        listed(store)


def test_a_store_that_ignores_the_encoding_request_keeps_its_raw_keys(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    # No EncodingType in the answer: the keys are raw, and decoding "100%25+done" would name
    # another key ("100% done").
    store, stub = stubbed("Generic")
    expect_list(
        stub,
        page(upload("100%25+done", "u1"), IsTruncated=True, NextKeyMarker="100%25+done"),
    )
    expect_list(
        stub,
        page(upload("a+b", "u2"), IsTruncated=False),
        KeyMarker="100%25+done",
        UploadIdMarker="u1",
    )
    assert listed(store) == [("100%25+done", "u1"), ("a+b", "u2")]


def test_a_parts_listing_past_the_highest_part_number_is_an_error(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("Generic")
    expect_parts(stub, parts_page([], IsTruncated=True, NextPartNumberMarker=10001))
    with pytest.raises(StoreError, match="no progress"):
        store.measure(an_upload())
