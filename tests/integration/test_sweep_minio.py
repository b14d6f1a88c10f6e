"""The sweep on a real MinIO: what is aborted, what survives, and the exact bytes freed.

Ages come from MinIO's own clock (the Date header), so these tests use second-scale ages:
uploads made before a short sleep are "old", those made after it are "young".
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mpu_janitor.policy import Mode
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import Pace, StoreCredentials, Upload, unpaced
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
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

AGE = (
    3.5  # seconds that make an upload "old" for olderThan: 2s (the Date header has 1 s resolution)
)


def creds(minio: MinioServer) -> StoreCredentials:
    return StoreCredentials(access_key_id=minio.access_key, secret_access_key=minio.secret_key)


def sweep(minio: MinioServer, doc: dict[str, Any], *, dry_run: bool = False) -> Any:
    policy = to_policy(doc)
    if dry_run:
        policy = replace(policy, mode=Mode.DRY_RUN)
    store = open_store(policy.store, creds(minio))
    try:
        return run_sweep(policy, store)
    finally:
        store.close()


def test_only_old_matching_uploads_are_aborted(minio: MinioServer, s3: Any, bucket: str) -> None:
    old = make_upload(s3, bucket, "tmp/old.bin", [1000, 2345])
    kept_glob = make_upload(s3, bucket, "tmp/pinned.keep", [10])
    outside = make_upload(s3, bucket, "other/old.bin", [10])
    time.sleep(AGE)
    young = make_upload(s3, bucket, "tmp/young.bin", [10])
    doc = policy_doc(
        minio.endpoint, [bucket], match={"prefixes": ["tmp/"], "excludeKeyGlobs": ["*.keep"]}
    )

    result = sweep(minio, doc)

    summary = result.summary()
    assert summary["aborted"] == 1
    assert summary["freedBytes"] == 3345
    assert summary["scanned"] == 2  # tmp/old.bin and tmp/young.bin; the rest is out of scope
    assert open_uploads(s3, bucket) == {
        ("tmp/pinned.keep", kept_glob),
        ("other/old.bin", outside),
        ("tmp/young.bin", young),
    }
    assert ("tmp/old.bin", old) not in open_uploads(s3, bucket)
    assert result.ok


def test_minio_prefix_quirk_lists_bucket_wide(minio: MinioServer, s3: Any, bucket: str) -> None:
    # MinIO treats the listing prefix as an exact key: the MinIO profile lists bucket-wide and
    # filters on our side, so uploads under a prefix are still found.
    make_upload(s3, bucket, "tmp/a/b.bin", [10])
    make_upload(s3, bucket, "tmp/c.bin", [20])
    raw = s3.list_multipart_uploads(Bucket=bucket, Prefix="tmp/").get("Uploads", [])
    time.sleep(AGE)
    result = sweep(minio, policy_doc(minio.endpoint, [bucket], match={"prefixes": ["tmp/"]}))
    assert result.summary()["aborted"] == 2
    assert result.freed_bytes == 30
    assert len(raw) < 2, "MinIO now honours prefixes: the profile flag can be revisited"


def test_upload_written_during_quiet_period_survives(
    minio: MinioServer, s3: Any, bucket: str
) -> None:
    quiet = make_upload(s3, bucket, "quiet.bin", [100])
    busy = make_upload(s3, bucket, "busy.bin", [100])
    time.sleep(4)
    s3.upload_part(Bucket=bucket, Key="busy.bin", UploadId=busy, PartNumber=2, Body=b"y" * 50)
    doc = policy_doc(minio.endpoint, [bucket], match={"quietPeriod": "3s"})

    result = sweep(minio, doc)

    summary = result.summary()
    assert summary["skippedActive"] == 1
    assert summary["aborted"] == 1
    assert summary["freedBytes"] == 100
    assert open_uploads(s3, bucket) == {("busy.bin", busy)}
    assert ("quiet.bin", quiet) not in open_uploads(s3, bucket)


def test_dry_run_changes_nothing_and_predicts_the_real_sweep(
    minio: MinioServer, s3: Any, bucket: str
) -> None:
    for index, sizes in enumerate([[1], [2, 3], [4, 5, 6], []]):
        make_upload(s3, bucket, f"k{index}", sizes)
    # "young" must stay young through both sweeps, however slow a loaded machine makes them
    time.sleep(9.5)  # 8 s and the 1 s resolution of the Date header
    make_upload(s3, bucket, "young", [99])
    before = open_uploads(s3, bucket)
    doc = policy_doc(minio.endpoint, [bucket], match={"olderThan": "8s", "quietPeriod": "0s"})

    dry = sweep(minio, doc, dry_run=True).summary()
    assert open_uploads(s3, bucket) == before
    assert dry["aborted"] == 0 and dry["freedBytes"] == 0
    assert dry["eligible"] == 4 and dry["eligibleBytes"] == 21

    real = sweep(minio, doc).summary()
    assert real["aborted"] == dry["eligible"]
    assert real["freedBytes"] == dry["eligibleBytes"]
    assert {key for key, _ in open_uploads(s3, bucket)} == {"young"}


def test_freed_bytes_equal_the_sum_of_part_sizes(minio: MinioServer, s3: Any, bucket: str) -> None:
    sizes = {"a": [5 * 1024 * 1024, 17], "b": [1, 1, 1], "c": [123456], "d": []}
    for key, parts in sizes.items():
        make_upload(s3, bucket, key, parts)
    time.sleep(AGE)
    result = sweep(minio, policy_doc(minio.endpoint, [bucket]))
    assert result.freed_bytes == sum(sum(parts) for parts in sizes.values())
    assert result.summary()["remainingBytes"] == 0
    assert open_uploads(s3, bucket) == set()


def test_upload_aborted_by_someone_else_counts_as_gone_not_freed(
    minio: MinioServer, s3: Any, bucket: str
) -> None:
    make_upload(s3, bucket, "mine", [100])
    theirs = make_upload(s3, bucket, "theirs", [200])
    time.sleep(AGE)
    policy = to_policy(policy_doc(minio.endpoint, [bucket]))
    store = open_store(policy.store, creds(minio))
    real_measure = store.measure

    def racing_measure(upload: Upload, pace: Pace = unpaced) -> Any:
        # Another client aborts "theirs" after our listing saw it, before we touch it.
        # (MinIO answers 204 to an abort of an unknown upload id, so only a listing can tell
        # that it was gone before our abort; see the S3 store's notes.)
        if upload.key == "theirs":
            s3.abort_multipart_upload(Bucket=bucket, Key="theirs", UploadId=theirs)
        return real_measure(upload, pace)

    store.measure = racing_measure  # type: ignore[method-assign]
    result = run_sweep(policy, store).summary()
    assert result["alreadyGone"] == 1
    assert result["aborted"] == 1
    assert result["freedBytes"] == 100
    assert result["failed"] == 0


def test_more_than_a_thousand_uploads_and_parts(minio: MinioServer, s3: Any, bucket: str) -> None:
    keys = [f"bulk/{index:05}" for index in range(1010)]
    make_uploads(s3, bucket, keys)
    many_parts = s3.create_multipart_upload(Bucket=bucket, Key="many-parts")["UploadId"]
    for number in range(1, 1011):
        s3.upload_part(
            Bucket=bucket, Key="many-parts", UploadId=many_parts, PartNumber=number, Body=b"z" * 3
        )
    time.sleep(AGE)
    doc = policy_doc(minio.endpoint, [bucket], limits={"concurrency": 16})

    dry = sweep(minio, doc, dry_run=True).summary()
    assert dry["scanned"] == 1011
    assert dry["eligibleBytes"] == 1010 * 3  # every part of the 1,010-part upload, all pages

    result = sweep(minio, doc).summary()
    assert result["aborted"] == 1011
    assert result["freedBytes"] == 3030
    assert open_uploads(s3, bucket) == set()


def test_a_second_sweep_right_after_aborts_nothing(
    minio: MinioServer, s3: Any, bucket: str
) -> None:
    for index in range(5):
        make_upload(s3, bucket, f"k{index}", [10])
    time.sleep(AGE)
    doc = policy_doc(minio.endpoint, [bucket])
    first = sweep(minio, doc).summary()
    second = sweep(minio, doc).summary()
    assert first["aborted"] == 5 and first["freedBytes"] == 50
    assert second["aborted"] == 0 and second["freedBytes"] == 0 and second["scanned"] == 0


def test_cli_sweep_json_summary(minio: MinioServer, s3: Any, bucket: str, tmp_path: Path) -> None:
    make_upload(s3, bucket, "tmp/a", [10, 20])
    make_upload(s3, bucket, "keep/b", [5])
    time.sleep(AGE)
    path = write_policy(
        tmp_path, policy_doc(minio.endpoint, [bucket], match={"prefixes": ["tmp/"]})
    )

    listing = run_cli("list", "-f", str(path), "--output", "json", env=minio.env())
    assert listing.returncode == 0, listing.stderr
    uploads = last_json(listing.stdout)["uploads"]
    assert [(u["key"], u["bytes"], u["state"]) for u in uploads] == [("tmp/a", 30, "eligible")]

    table = run_cli("list", "-f", str(path), env=minio.env())
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["BUCKET", "AGE", "PARTS", "BYTES", "STATE", "UPLOAD", "ID", "KEY"]
    assert lines[1].split()[2:5] == ["2", "30", "B"] and lines[1].endswith("tmp/a")
    assert "eligible" in lines[1] and lines[-1] == "1 incomplete uploads"

    dry = run_cli("sweep", "-f", str(path), "--dry-run", "--output", "json", env=minio.env())
    assert dry.returncode == 0, dry.stderr
    assert last_json(dry.stdout)["eligibleBytes"] == 30
    assert len(open_uploads(s3, bucket)) == 2

    done = run_cli("sweep", "-f", str(path), "--output", "json", env=minio.env())
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    for key in (
        "scanned",
        "eligible",
        "aborted",
        "skippedActive",
        "alreadyGone",
        "failed",
        "freedBytes",
    ):
        assert key in summary
    assert (summary["aborted"], summary["freedBytes"], summary["failed"]) == (1, 30, 0)

    table = run_cli("sweep", "-f", str(path), env=minio.env())
    assert table.returncode == 0
    assert bucket in table.stdout and "0 aborted" in table.stdout


def test_cli_wrong_credentials(minio: MinioServer, bucket: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, policy_doc(minio.endpoint, [bucket]))
    env = {**minio.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    result = run_cli("sweep", "-f", str(path), "--output", "json", env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    summary = last_json(result.stdout)
    assert summary["reason"] == "AccessDenied"
    assert "SignatureDoesNotMatch" in summary["errors"][0]["message"]
    table = run_cli("sweep", "-f", str(path), env=env)
    assert table.returncode == 1 and "error [" in table.stdout and "AccessDenied" in table.stdout


def test_cli_missing_bucket(minio: MinioServer, tmp_path: Path) -> None:
    path = write_policy(tmp_path, policy_doc(minio.endpoint, ["no-such-bucket-here"]))
    result = run_cli("sweep", "-f", str(path), "--output", "json", env=minio.env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    summary = last_json(result.stdout)
    assert summary["reason"] == "BucketNotFound"
    assert "no-such-bucket-here" in summary["errors"][0]["message"]


def test_cli_unreachable_endpoint(minio: MinioServer, tmp_path: Path) -> None:
    from tests.support.controlplane import free_port

    path = write_policy(tmp_path, policy_doc(f"http://127.0.0.1:{free_port()}", ["b-1"]))
    result = run_cli("sweep", "-f", str(path), "--output", "json", env=minio.env())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    summary = last_json(result.stdout)
    assert summary["reason"] == "StoreUnreachable"
    assert "Could not connect" in summary["errors"][0]["message"]


def test_cli_bad_policy_names_the_field(tmp_path: Path) -> None:
    doc = policy_doc("http://127.0.0.1:1", ["b-1"], match={"olderThan": "7 days"})
    result = run_cli("sweep", "-f", str(write_policy(tmp_path, doc)))
    assert result.returncode == 2
    assert "spec.match.olderThan" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("sweep", "-f", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
