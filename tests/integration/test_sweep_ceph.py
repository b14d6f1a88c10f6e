"""The sweep on a real Ceph RADOS Gateway (Debian's Ceph, one mon, one memstore OSD, radosgw on
127.0.0.1) with ``profile: Ceph``: the S3 behaviours proven on MinIO, proven again here, the
ways this RGW differs from AWS (each pinned, so a Ceph upgrade that changes one is noticed), and
hostile keys on both MinIO and Ceph.

Ages come from the RGW's own clock (the Date header, 1 s resolution): uploads made before a
short sleep are "old", those made after it "young".
"""

from __future__ import annotations

import contextlib
import itertools
import time
import urllib.parse
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.config
import botocore.exceptions
import pytest

from mpu_janitor.policy import Mode
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreCredentials, Upload
from mpu_janitor.sweep import run_sweep
from tests.integration.helpers import (
    last_json,
    make_upload,
    make_uploads,
    open_uploads,
    policy_doc,
    run_cli,
    to_policy,
    write_policy,
)
from tests.support.ceph import CephCluster
from tests.support.controlplane import free_port
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

AGE = 3.5  # seconds that make an upload "old" for olderThan: 2s on a 1 s Date clock
_numbers = itertools.count(1)
EPOCH = datetime.fromtimestamp(0, UTC)

Server = CephCluster | MinioServer


def creds(server: Server) -> StoreCredentials:
    return StoreCredentials(access_key_id=server.access_key, secret_access_key=server.secret_key)


def ceph_doc(ceph: CephCluster, buckets: list[str], **spec: Any) -> dict[str, Any]:
    return policy_doc(ceph.endpoint, buckets, profile="Ceph", **spec)


def sweep(server: Server, doc: dict[str, Any], *, dry_run: bool = False) -> Any:
    policy = to_policy(doc)
    if dry_run:
        policy = replace(policy, mode=Mode.DRY_RUN)
    store = open_store(policy.store, creds(server))
    try:
        return run_sweep(policy, store)
    finally:
        store.close()


def new_bucket(s3: Any, name: str) -> str:
    bucket = f"c{next(_numbers)}-{name}"[:60].lower().replace("_", "-").strip("-")
    s3.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture()
def cs3(ceph: CephCluster) -> Any:
    return ceph.client()


@pytest.fixture()
def cbucket(cs3: Any, request: pytest.FixtureRequest) -> str:
    return new_bucket(cs3, request.node.name)


def encoded_uploads(s3: Any, bucket: str) -> set[tuple[str, str]]:
    """(key, upload id) of every upload, listed URL-encoded and decoded (works for any key)."""
    found: set[tuple[str, str]] = set()
    params: dict[str, Any] = {"Bucket": bucket, "EncodingType": "url"}
    while True:
        page = s3.list_multipart_uploads(**params)
        uploads = page.get("Uploads", [])
        found.update((urllib.parse.unquote_plus(u["Key"]), u["UploadId"]) for u in uploads)
        if not page.get("IsTruncated") or not uploads:
            return found
        params.update(
            KeyMarker=urllib.parse.unquote_plus(uploads[-1]["Key"]),
            UploadIdMarker=uploads[-1]["UploadId"],
        )


# -- the S3 behaviours, on Ceph -------------------------------------------------------------


def test_only_old_matching_uploads_are_aborted(ceph: CephCluster, cs3: Any, cbucket: str) -> None:
    old = make_upload(cs3, cbucket, "tmp/old.bin", [1000, 2345])
    deep = make_upload(cs3, cbucket, "tmp/a/deep.bin", [5])
    kept_glob = make_upload(cs3, cbucket, "tmp/pinned.keep", [10])
    outside = make_upload(cs3, cbucket, "other/old.bin", [10])
    time.sleep(AGE)
    young = make_upload(cs3, cbucket, "tmp/young.bin", [10])
    doc = ceph_doc(ceph, [cbucket], match={"prefixes": ["tmp/"], "excludeKeyGlobs": ["*.keep"]})

    result = sweep(ceph, doc)

    summary = result.summary()
    assert (summary["aborted"], summary["freedBytes"], summary["failed"]) == (2, 3350, 0)
    # The prefix is used server-side: uploads outside it are never even listed.
    assert summary["scanned"] == 3  # tmp/old.bin, tmp/a/deep.bin, tmp/young.bin
    assert open_uploads(cs3, cbucket) == {
        ("tmp/pinned.keep", kept_glob),
        ("other/old.bin", outside),
        ("tmp/young.bin", young),
    }
    assert not {("tmp/old.bin", old), ("tmp/a/deep.bin", deep)} & open_uploads(cs3, cbucket)
    assert result.ok


def test_upload_written_during_quiet_period_survives(
    ceph: CephCluster, cs3: Any, cbucket: str
) -> None:
    make_upload(cs3, cbucket, "quiet.bin", [100])
    busy = make_upload(cs3, cbucket, "busy.bin", [100])
    time.sleep(4)
    cs3.upload_part(Bucket=cbucket, Key="busy.bin", UploadId=busy, PartNumber=2, Body=b"y" * 50)

    summary = sweep(ceph, ceph_doc(ceph, [cbucket], match={"quietPeriod": "3s"})).summary()

    assert (summary["skippedActive"], summary["aborted"], summary["freedBytes"]) == (1, 1, 100)
    assert open_uploads(cs3, cbucket) == {("busy.bin", busy)}


def test_dry_run_changes_nothing_and_predicts_the_real_sweep(
    ceph: CephCluster, cs3: Any, cbucket: str
) -> None:
    # (No young upload here: on a loaded machine it could age past olderThan between the two
    # sweeps and rightly change the prediction; age scope is proven above.)
    for index, sizes in enumerate([[1], [2, 3], [4, 5, 6], []]):
        make_upload(cs3, cbucket, f"k{index}", sizes)
    time.sleep(AGE)
    before = open_uploads(cs3, cbucket)
    doc = ceph_doc(ceph, [cbucket])

    dry = sweep(ceph, doc, dry_run=True).summary()
    assert open_uploads(cs3, cbucket) == before
    assert (dry["aborted"], dry["freedBytes"], dry["eligible"], dry["eligibleBytes"]) == (
        0,
        0,
        4,
        21,
    )

    real = sweep(ceph, doc).summary()
    assert (real["aborted"], real["freedBytes"], real["failed"]) == (4, 21, 0)
    assert open_uploads(cs3, cbucket) == set()


def test_freed_bytes_equal_the_sum_of_part_sizes(ceph: CephCluster, cs3: Any, cbucket: str) -> None:
    sizes = {"a": [5 * 1024 * 1024, 17], "b": [1, 1, 1], "c": [123456], "d": []}
    for key, parts in sizes.items():
        make_upload(cs3, cbucket, key, parts)
    time.sleep(AGE)
    result = sweep(ceph, ceph_doc(ceph, [cbucket]))
    assert result.freed_bytes == sum(sum(parts) for parts in sizes.values())
    summary = result.summary()
    assert (summary["remainingBytes"], summary["failed"], summary["reason"]) == (
        0,
        0,
        result.reason,
    )
    assert result.ok, summary["errors"]
    assert open_uploads(cs3, cbucket) == set()


def test_upload_aborted_by_someone_else_counts_as_gone_not_freed(
    ceph: CephCluster, cs3: Any, cbucket: str
) -> None:
    make_upload(cs3, cbucket, "mine", [100])
    theirs = make_upload(cs3, cbucket, "theirs", [200])
    time.sleep(AGE)
    policy = to_policy(ceph_doc(ceph, [cbucket]))
    store = open_store(policy.store, creds(ceph))
    real_measure = store.measure

    def racing_measure(upload: Upload, *args: Any, **kwargs: Any) -> Any:
        # Another client aborts "theirs" after our listing saw it, before we measure it:
        # Ceph's ListParts then answers 404 NoSuchKey, which the Ceph profile reads as gone.
        if upload.key == "theirs":
            cs3.abort_multipart_upload(Bucket=cbucket, Key="theirs", UploadId=theirs)
        return real_measure(upload, *args, **kwargs)

    store.measure = racing_measure  # type: ignore[method-assign]
    try:
        summary = run_sweep(policy, store).summary()
    finally:
        store.close()
    assert (summary["alreadyGone"], summary["aborted"], summary["freedBytes"]) == (1, 1, 100)
    assert summary["failed"] == 0


def test_more_than_a_thousand_uploads_and_parts(ceph: CephCluster, cs3: Any, cbucket: str) -> None:
    # 990 keys, then 20 uploads of one key that straddle the 1,000-upload page boundary (the
    # next page resumes inside that key's uploads), then one upload of 1,010 small parts
    # (UploadPart takes any size; only CompleteMultipartUpload enforces Ceph's 5 MiB minimum).
    make_uploads(cs3, cbucket, [f"bulk/{index:05}" for index in range(990)])
    make_uploads(cs3, cbucket, ["bulk/same"] * 20)
    many_parts = cs3.create_multipart_upload(Bucket=cbucket, Key="many-parts")["UploadId"]
    for number in range(1, 1011):
        cs3.upload_part(
            Bucket=cbucket, Key="many-parts", UploadId=many_parts, PartNumber=number, Body=b"z" * 3
        )
    assert len(open_uploads(cs3, cbucket)) == 1011
    time.sleep(AGE)
    doc = ceph_doc(ceph, [cbucket], limits={"concurrency": 16})

    dry = sweep(ceph, doc, dry_run=True).summary()
    assert dry["scanned"] == 1011  # no upload of "bulk/same" listed twice, none missed
    assert dry["eligibleBytes"] == 1010 * 3  # every part of the 1,010-part upload, two pages

    result = sweep(ceph, doc).summary()
    assert (result["aborted"], result["freedBytes"], result["failed"]) == (1011, 3030, 0)
    assert open_uploads(cs3, cbucket) == set()


def test_a_second_sweep_right_after_aborts_nothing(
    ceph: CephCluster, cs3: Any, cbucket: str
) -> None:
    for index in range(5):
        make_upload(cs3, cbucket, f"k{index}", [10])
    time.sleep(AGE)
    doc = ceph_doc(ceph, [cbucket])
    first = sweep(ceph, doc).summary()
    second = sweep(ceph, doc).summary()
    assert (first["aborted"], first["freedBytes"], first["failed"]) == (5, 50, 0)
    assert (second["aborted"], second["freedBytes"], second["scanned"]) == (0, 0, 0)


def test_cli_sweep_on_ceph_exits_0_with_every_abort_verified(
    ceph: CephCluster, cs3: Any, cbucket: str, tmp_path: Path
) -> None:
    # Before the Ceph profile knew NoSuchKey, every abort here was reported failed (exit 1).
    make_upload(cs3, cbucket, "tmp/a", [10, 20])
    make_upload(cs3, cbucket, "keep/b", [5])
    time.sleep(AGE)
    path = write_policy(tmp_path, ceph_doc(ceph, [cbucket], match={"prefixes": ["tmp/"]}))
    done = run_cli("sweep", "-f", str(path), "--output", "json", env=ceph.env())
    assert done.returncode == 0, done.stdout + done.stderr
    summary = last_json(done.stdout)
    assert (summary["aborted"], summary["freedBytes"], summary["failed"]) == (1, 30, 0)
    assert {key for key, _ in open_uploads(cs3, cbucket)} == {"keep/b"}


def test_cli_wrong_credentials(ceph: CephCluster, cbucket: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, ceph_doc(ceph, [cbucket]))
    env = {**ceph.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    result = run_cli("sweep", "-f", str(path), "--output", "json", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    summary = last_json(result.stdout)
    assert summary["reason"] == "AccessDenied"
    assert "SignatureDoesNotMatch" in summary["errors"][0]["message"]


def test_cli_missing_bucket(ceph: CephCluster, tmp_path: Path) -> None:
    path = write_policy(tmp_path, ceph_doc(ceph, ["no-such-bucket-here"]))
    result = run_cli("sweep", "-f", str(path), "--output", "json", env=ceph.env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    summary = last_json(result.stdout)
    assert summary["reason"] == "BucketNotFound"
    assert "no-such-bucket-here" in summary["errors"][0]["message"]


def test_cli_unreachable_endpoint(ceph: CephCluster, tmp_path: Path) -> None:
    doc = policy_doc(f"http://127.0.0.1:{free_port()}", ["b-1"], profile="Ceph")
    path = write_policy(tmp_path, doc)
    result = run_cli("sweep", "-f", str(path), "--output", "json", env=ceph.env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    summary = last_json(result.stdout)
    assert summary["reason"] == "StoreUnreachable"
    assert "Could not connect" in summary["errors"][0]["message"]


# -- how this RGW differs from AWS (the facts behind the Ceph profile's flags) --------------


def test_ceph_facts_behind_the_profile(cs3: Any, cbucket: str) -> None:
    ids = {key: make_upload(cs3, cbucket, key) for key in ("a/1", "a/2", "b/1", "pct%41")}

    # A real prefix (MinIO's is an exact key): prefix_is_exact_key: false.
    under_a = cs3.list_multipart_uploads(Bucket=cbucket, Prefix="a/")["Uploads"]
    assert sorted(u["Key"] for u in under_a) == ["a/1", "a/2"]

    # KeyMarker alone is inclusive (AWS lists only later keys): never yield an upload twice.
    after_a2 = cs3.list_multipart_uploads(Bucket=cbucket, KeyMarker="a/2")["Uploads"]
    assert after_a2[0]["Key"] == "a/2"
    # With the upload-id marker too, the next page starts after that upload.
    resumed = cs3.list_multipart_uploads(Bucket=cbucket, KeyMarker="a/2", UploadIdMarker=ids["a/2"])
    assert [u["Key"] for u in resumed["Uploads"]] == ["b/1", "pct%41"]

    # Next markers without truncation.
    whole = cs3.list_multipart_uploads(Bucket=cbucket)
    assert not whole["IsTruncated"] and whole["NextKeyMarker"] == "pct%41"

    # MaxUploads=0: truncated, no markers (a naive loop never ends).
    zero = cs3.list_multipart_uploads(Bucket=cbucket, MaxUploads=0)
    assert zero["IsTruncated"] and not zero.get("NextKeyMarker") and not zero.get("Uploads")

    # A Delimiter drops the uploads under a prefix: never sent.
    delimited = cs3.list_multipart_uploads(Bucket=cbucket, Delimiter="/")
    assert {u["Key"] for u in delimited.get("Uploads", [])} == {"pct%41"}

    # url_encoding: keys_only: Key encoded, markers raw, EncodingType not echoed.
    encoded = cs3.list_multipart_uploads(Bucket=cbucket, EncodingType="url", KeyMarker="b/1")
    assert "EncodingType" not in encoded
    assert [u["Key"] for u in encoded["Uploads"]] == ["b/1", "pct%2541"]  # "/" left as is
    assert encoded["KeyMarker"] == "b/1" and encoded["NextKeyMarker"] == "pct%41"

    # list_parts_gone_codes: [NoSuchKey]: ListParts of an aborted upload; a second abort is
    # NoSuchUpload as on AWS.
    cs3.abort_multipart_upload(Bucket=cbucket, Key="b/1", UploadId=ids["b/1"])
    with pytest.raises(botocore.exceptions.ClientError) as parts:
        cs3.list_parts(Bucket=cbucket, Key="b/1", UploadId=ids["b/1"])
    assert parts.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(botocore.exceptions.ClientError) as again:
        cs3.abort_multipart_upload(Bucket=cbucket, Key="b/1", UploadId=ids["b/1"])
    assert again.value.response["Error"]["Code"] == "NoSuchUpload"


def test_no_such_key_is_proof_of_gone_only_for_the_exact_key(
    ceph: CephCluster, cs3: Any, cbucket: str
) -> None:
    # Ceph's ListParts answers NoSuchKey for a live upload asked under another key, so reading
    # NoSuchKey as "gone" is safe only because the store asks with the exact key it listed
    # (see the hostile-key tests); an abort under the wrong key is refused (NoSuchUpload).
    live = make_upload(cs3, cbucket, "live", [7])
    with pytest.raises(botocore.exceptions.ClientError) as parts:
        cs3.list_parts(Bucket=cbucket, Key="not-live", UploadId=live)
    assert parts.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(botocore.exceptions.ClientError) as abort:
        cs3.abort_multipart_upload(Bucket=cbucket, Key="not-live", UploadId=live)
    assert abort.value.response["Error"]["Code"] == "NoSuchUpload"
    store = open_store(to_policy(ceph_doc(ceph, [cbucket])).store, creds(ceph))
    try:
        assert store.measure(Upload(cbucket, "live", live, EPOCH)).size_bytes == 7
    finally:
        store.close()
    assert open_uploads(cs3, cbucket) == {("live", live)}


# -- hostile keys, on MinIO and on Ceph -----------------------------------------------------

HOSTILE_KEYS = [
    "crlf\r\nkey",
    "tab\tkey",
    "xml <&>'\" key",
    "pct%41 plus+ space",
    "ünïcødé/日本語/🙂",
    ("k" * 250 + "/") * 4 + "k" * 20,  # 1,024 bytes (MinIO refuses path segments over 255)
    "ctl\x01\x1fkey",
]
# A key a wrong decoding of "pct%41 plus+ space" would hit.
DECOY = "pctA plus  space"


def raw_client(server: Server) -> Any:
    """A client that sends once (a 500 is not retried, so nothing is created twice)."""
    return server.client(retries={"total_max_attempts": 1})


def create_hostile(s3: Any, bucket: str, key: str, size: int) -> str:
    """Create an upload whatever its key; Ceph creates a control-character key's upload but
    answers 500 (its XML answer holds an invalid character), so find it by listing."""
    before = encoded_uploads(s3, bucket)
    with contextlib.suppress(botocore.exceptions.ClientError):
        s3.create_multipart_upload(Bucket=bucket, Key=key)
    (upload_id,) = {uid for k, uid in encoded_uploads(s3, bucket) - before if k == key}
    if size:
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"h" * size)
    return str(upload_id)


@pytest.mark.parametrize("store", ["minio", "ceph"])
def test_hostile_keys_are_listed_measured_and_aborted_exactly(
    store: str, request: pytest.FixtureRequest
) -> None:
    server: Server = request.getfixturevalue(store)
    s3 = raw_client(server)
    bucket = new_bucket(s3, f"hostile-{store}")
    sizes = {key: 10 + index for index, key in enumerate(HOSTILE_KEYS)}
    ids = {key: create_hostile(s3, bucket, key, size) for key, size in sizes.items()}
    time.sleep(AGE)
    decoy = make_upload(s3, bucket, DECOY, [1])  # young: never eligible
    last = make_upload(s3, bucket, "~last", [1])  # young; ends the listing page
    profile = "Ceph" if store == "ceph" else "MinIO"

    doc = policy_doc(server.endpoint, [bucket], profile=profile)
    store_under_test = open_store(to_policy(doc).store, creds(server))
    try:
        listed = {
            (u.key, u.upload_id)
            for p in store_under_test.list_uploads(bucket, [])
            for u in p.uploads
        }
    finally:
        store_under_test.close()
    # Every key listed exactly as written (no U+FFFD, no double decoding, nothing dropped).
    assert listed == {*ids.items(), (DECOY, decoy), ("~last", last)}

    result = sweep(server, doc)
    summary = result.summary()
    left = encoded_uploads(s3, bucket)
    if store == "ceph":
        # Ceph answers ListParts of a control-character key with 500: that upload cannot be
        # measured, so it is reported failed and left alone; every other one is aborted.
        unservable = "ctl\x01\x1fkey"
        assert summary["failed"] == 1 and summary["scanned"] == len(HOSTILE_KEYS) + 2
        assert left == {(unservable, ids[unservable]), (DECOY, decoy), ("~last", last)}
        expected = {key: size for key, size in sizes.items() if key != unservable}
    else:
        assert summary["failed"] == 0, summary["errors"]
        assert left == {(DECOY, decoy), ("~last", last)}
        expected = sizes
    assert summary["aborted"] == len(expected)
    assert summary["freedBytes"] == sum(expected.values())
