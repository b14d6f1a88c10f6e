"""The S3 store proving aborts gone with one listing (profiles.yaml ``listing_proves_gone``),
against scripted answers: what each profile may vouch for, and what it must leave to the
engine's per-upload parts listing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from botocore.stub import Stubber

from mpu_janitor.stores.base import Upload
from mpu_janitor.stores.s3 import S3Store
from tests.unit.test_s3_listing import META, expect_list, page, stubbed, upload

__all__ = ["stubbed"]  # the fixture, shared with the listing tests

LISTED_AT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)  # META's Date
BEFORE = datetime(2026, 1, 1, tzinfo=UTC)  # upload() initiated every upload at this time


def node_page(node: str | None, *uploads: dict[str, Any], **fields: Any) -> dict[str, Any]:
    headers = dict(META["HTTPHeaders"])
    if node is not None:
        headers["x-amz-id-2"] = node
    return {**page(*uploads, **fields), "ResponseMetadata": {**META, "HTTPHeaders": headers}}


def listed_with_positions(store: S3Store, bucket: str = "bkt") -> list[tuple[Upload, object]]:
    return [(u, p.position) for p in store.list_uploads(bucket, []) for u in p.uploads]


def test_a_consistent_listing_relists_from_the_batch_s_own_page_until_past_its_keys(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("AWS")
    expect_list(stub, page(upload("a", "u1"), upload("b", "u2"), IsTruncated=True))
    expect_list(
        stub,
        page(upload("c", "u3"), upload("d", "u4"), upload("e", "u5"), IsTruncated=True),
        KeyMarker="b",
        UploadIdMarker="u2",
    )
    expect_list(stub, page(upload("f", "u6")), KeyMarker="e", UploadIdMarker="u5")
    found = listed_with_positions(store)
    batch = [(u, p) for u, p in found if u.key in ("c", "d")]
    # Listed again from the markers of c's and d's page; "d" is still there; the page runs past
    # "d", so no further page is asked for.
    expect_list(
        stub,
        page(upload("d", "u4"), upload("e", "u5"), IsTruncated=True),
        KeyMarker="b",
        UploadIdMarker="u2",
    )
    assert store.proven_gone("bkt", batch).gone == {"u3"}
    stub.assert_no_pending_responses()


def test_a_consistent_listing_follows_pages_until_it_has_covered_every_key(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("AWS")
    expect_list(stub, page(upload("a", "u1"), upload("z", "u9")))
    batch = listed_with_positions(store)
    expect_list(stub, page(upload("b", "u2"), IsTruncated=True))
    expect_list(stub, page(upload("y", "u8")), KeyMarker="b", UploadIdMarker="u2")
    assert store.proven_gone("bkt", batch).gone == {"u1", "u9"}
    stub.assert_no_pending_responses()


def test_profiles_whose_listing_proves_nothing_send_no_request(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    for profile in ("Generic", "Ceph", "Scality", "TencentCOS"):
        store, stub = stubbed(profile)
        expect_list(stub, page(upload("a", "u1")))
        batch = listed_with_positions(store)
        assert store.proven_gone("bkt", batch).gone == set(), profile
        stub.assert_no_pending_responses()


def test_aws_directory_buckets_are_never_vouched_for(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, _ = stubbed("AWS")
    gone = Upload("b--use1-az4--x-s3", "a", "u1", BEFORE)
    assert store.proven_gone("b--use1-az4--x-s3", [(gone, object())]).gone == set()


def test_an_upload_without_a_position_of_the_store_s_is_never_vouched_for(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, _ = stubbed("AWS")
    assert store.proven_gone("bkt", [(Upload("bkt", "a", "u1", BEFORE), "elsewhere")]).gone == set()


def test_minio_vouches_only_for_the_same_node_with_its_table_intact(
    stubbed: Callable[[str], tuple[S3Store, Stubber]],
) -> None:
    store, stub = stubbed("MinIO")
    expect_list(stub, node_page("node-a", upload("a", "u1"), upload("b", "u2"), upload("w", "u3")))
    batch = [(u, p) for u, p in listed_with_positions(store) if u.key in ("a", "b")]
    # The same node, and "w" (begun before the first listing) is still in its table.
    expect_list(stub, node_page("node-a", upload("b", "u2"), upload("w", "u3")))
    assert store.proven_gone("bkt", batch).gone == {"u1"}
    # Another node's table never held them: its silence proves nothing.
    expect_list(stub, node_page("node-b", upload("w", "u3")))
    assert store.proven_gone("bkt", batch).gone == set()
    # An answer without the node header proves nothing either.
    expect_list(stub, node_page(None, upload("w", "u3")))
    assert store.proven_gone("bkt", batch).gone == set()
    # An empty table (a restart empties it) proves nothing.
    expect_list(stub, node_page("node-a"))
    assert store.proven_gone("bkt", batch).gone == set()
    # Nor does a table holding only uploads begun after the first listing (restarted since).
    late = {"Key": "n", "UploadId": "u7", "Initiated": datetime(2026, 1, 2, tzinfo=UTC)}
    expect_list(stub, node_page("node-a", late))
    assert store.proven_gone("bkt", batch).gone == set()
    stub.assert_no_pending_responses()
