"""The Glacier store against a local Glacier endpoint that speaks the documented wire format:
the real boto3 client signs (checked by the server), sends and parses every request."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.retries.standard import ExponentialBackoff

from mpu_janitor.policy import GlacierTarget, parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.aws import MAX_RETRIES
from mpu_janitor.stores.base import (
    AccessDenied,
    ContainerNotFound,
    StoreCredentials,
    StoreUnreachable,
    Throttled,
    Upload,
    UploadGone,
)
from mpu_janitor.stores.glacier import GlacierStore, parse_range
from mpu_janitor.sweep import TargetLocks, run_sweep
from tests.support.glacier_server import FakeGlacier, MiB

pytestmark = pytest.mark.integration

VAULT = "media-archive"
TOTAL_ATTEMPTS = MAX_RETRIES + 1  # botocore's client-config max_attempts counts retries


class Requests:
    """The store's request observer: every (operation, code) it reported, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, operation: str, code: str) -> None:
        self.seen.append((operation, code))


@pytest.fixture()
def glacier() -> Iterator[FakeGlacier]:
    with FakeGlacier() as server:
        server.create_vault(VAULT)
        yield server


@pytest.fixture()
def observed() -> Requests:
    return Requests()


def make_store(
    server: FakeGlacier,
    observer: Requests | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    account: str = "-",
    endpoint: str | None = None,
    read_timeout: float = 30.0,
) -> GlacierStore:
    target = GlacierTarget(endpoint or server.url, server.region, account, (VAULT,))
    credentials = StoreCredentials(access_key or server.access_key, secret_key or server.secret_key)
    return GlacierStore(target, credentials, observer or Requests(), read_timeout=read_timeout)


@pytest.fixture()
def store(glacier: FakeGlacier, observed: Requests) -> Iterator[GlacierStore]:
    store = make_store(glacier, observed)
    yield store
    store.close()


@pytest.fixture()
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3's retries without their jittered sleeps (up to 15 s for throttling): same
    attempts, same decisions, a fast test."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def uploads_of(store: GlacierStore) -> list[Upload]:
    return [upload for page in store.list_uploads(VAULT, []) for upload in page.uploads]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Listing


def test_lists_every_upload_over_pages_of_50(glacier: FakeGlacier, store: GlacierStore) -> None:
    created = {glacier.add_upload(VAULT, f"tmp/file-{n}") for n in range(120)}

    pages = list(store.list_uploads(VAULT, []))

    assert [len(page.uploads) for page in pages] == [50, 50, 20]
    listed = [upload.upload_id for page in pages for upload in page.uploads]
    assert len(listed) == len(set(listed)) == 120
    assert set(listed) == created
    listings = [r for r in glacier.requests if r.method == "GET"]
    assert [r.query["limit"] for r in listings] == [["50"]] * 3
    assert "marker" not in listings[0].query
    assert all("marker" in r.query for r in listings[1:])


def test_upload_fields_come_from_the_listing(glacier: FakeGlacier, store: GlacierStore) -> None:
    named = glacier.add_upload(VAULT, "backups/db.tar", age=timedelta(days=3))
    unnamed = glacier.add_upload(VAULT, None, age=timedelta(hours=2))
    expected = {u.upload_id: u for u in glacier.uploads(VAULT)}

    uploads = {upload.upload_id: upload for upload in uploads_of(store)}

    assert uploads[named].key == "backups/db.tar"
    assert uploads[unnamed].key == ""  # no ArchiveDescription
    for upload_id in (named, unnamed):
        assert uploads[upload_id].container == VAULT
        assert uploads[upload_id].initiated == expected[upload_id].created  # CreationDate


def test_missing_vault_is_container_not_found(store: GlacierStore) -> None:
    with pytest.raises(ContainerNotFound) as caught:
        list(store.list_uploads("no-such-vault", []))
    assert caught.value.container == "no-such-vault"
    assert caught.value.reason == "BucketNotFound"


def test_every_request_is_signed_and_versioned(glacier: FakeGlacier, store: GlacierStore) -> None:
    upload_id = glacier.add_upload(VAULT, "x", parts=2)
    upload = uploads_of(store)[0]
    store.measure(upload)
    store.abort(upload)

    assert glacier.requests, "the store sent nothing"
    for received in glacier.requests:
        assert received.headers["x-amz-glacier-version"] == "2012-06-01"
        assert received.headers["authorization"].startswith(
            f"AWS4-HMAC-SHA256 Credential={glacier.access_key}/"
        )
        assert received.status < 300, received  # the server verified every signature
    assert not glacier.has_upload(VAULT, upload_id)


# --------------------------------------------------------------------------------------------
# Measuring and aborting


def test_measure_sums_the_range_spans_over_every_parts_page(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.add_upload(VAULT, "video.mxf", part_size=MiB, parts=2345, last_part_size=12345)
    upload = uploads_of(store)[0]

    parts = store.measure(upload)

    assert parts.size_bytes == 2344 * MiB + 12345
    assert parts.part_count == 2345
    # Glacier parts carry no timestamp: a first look cannot rule out a part that just landed.
    assert parts.newest_part == parts.server_time
    part_listings = [r for r in glacier.requests if r.method == "GET" and r.path.count("/") == 5]
    assert len(part_listings) == 47  # 46 pages of 50 and one of 45


def test_an_upload_without_parts_holds_nothing(glacier: FakeGlacier, store: GlacierStore) -> None:
    glacier.add_upload(VAULT, "empty")
    parts = store.measure(uploads_of(store)[0])
    assert (parts.size_bytes, parts.part_count) == (0, 0)


def test_range_spans_include_both_ends() -> None:
    assert parse_range("0-1048575") == 1048576
    assert parse_range("4194304-4194304") == 1
    with pytest.raises(ValueError):
        parse_range("10-3")


def test_abort_then_measure_is_upload_gone(glacier: FakeGlacier, store: GlacierStore) -> None:
    kept = glacier.add_upload(VAULT, "kept", parts=1)
    doomed = glacier.add_upload(VAULT, "doomed", parts=3)
    upload = next(u for u in uploads_of(store) if u.upload_id == doomed)

    store.abort(upload)

    with pytest.raises(UploadGone):
        store.measure(upload)
    assert [u.upload_id for u in uploads_of(store)] == [kept]
    assert glacier.has_upload(VAULT, kept)


def test_a_repeated_abort_succeeds_for_a_short_time_then_is_gone(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.add_upload(VAULT, "twice", parts=1)
    upload = uploads_of(store)[0]
    store.abort(upload)
    store.abort(
        upload
    )  # Glacier: "stopping an already-stopped upload will succeed, for a short time"

    glacier.abort_grace = timedelta(0)
    with pytest.raises(UploadGone):
        store.abort(upload)


def test_abort_of_an_unknown_upload_is_upload_gone(store: GlacierStore) -> None:
    ghost = Upload(VAULT, "ghost", "no-such-upload-id", datetime.now(UTC))
    with pytest.raises(UploadGone):
        store.abort(ghost)
    with pytest.raises(UploadGone):
        store.measure(ghost)


# --------------------------------------------------------------------------------------------
# Throttling, access, reachability


@pytest.mark.usefixtures("no_backoff")
def test_short_throttling_is_absorbed_by_boto3_retries(
    glacier: FakeGlacier, store: GlacierStore, observed: Requests
) -> None:
    glacier.add_upload(VAULT, "a")
    glacier.throttle(2)

    assert len(uploads_of(store)) == 1
    assert observed.seen == [
        ("ListMultipartUploads", "400"),
        ("ListMultipartUploads", "400"),
        ("ListMultipartUploads", "200"),
    ]


@pytest.mark.usefixtures("no_backoff")
def test_lasting_throttling_is_throttled(
    glacier: FakeGlacier, store: GlacierStore, observed: Requests
) -> None:
    code = "ThrottlingException"  # LimitExceededException is a quota: test_glacier_listings.py
    glacier.add_upload(VAULT, "a", parts=1)
    upload = uploads_of(store)[0]
    glacier.clear_requests()
    glacier.throttle(100, code)

    with pytest.raises(Throttled) as caught:
        store.measure(upload)

    assert code in str(caught.value)
    assert caught.value.reason == "Throttled"
    assert len(glacier.requests) == TOTAL_ATTEMPTS
    assert observed.seen[-TOTAL_ATTEMPTS:] == [("ListParts", "400")] * TOTAL_ATTEMPTS


@pytest.mark.parametrize(
    ("credentials", "code"),
    [
        ({"secret_key": "not-the-secret"}, "InvalidSignatureException"),
        ({"access_key": "AKIAUNKNOWNKEY000000"}, "UnrecognizedClientException"),
        ({"account": "999988887777"}, "AccessDeniedException"),
    ],
)
def test_refused_credentials_are_access_denied(
    glacier: FakeGlacier, credentials: dict[str, Any], code: str
) -> None:
    store = make_store(glacier, **credentials)
    with pytest.raises(AccessDenied) as caught:
        list(store.list_uploads(VAULT, []))
    assert code in str(caught.value)
    assert caught.value.reason == "AccessDenied"
    assert len(glacier.requests) == 1  # not retried: a refusal does not go away by asking again


def test_an_unreachable_endpoint_is_store_unreachable(glacier: FakeGlacier) -> None:
    store = make_store(glacier, endpoint=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(StoreUnreachable) as caught:
        list(store.list_uploads(VAULT, []))
    assert caught.value.reason == "StoreUnreachable"


@pytest.mark.usefixtures("no_backoff")
def test_a_store_that_does_not_answer_is_store_unreachable(
    glacier: FakeGlacier, observed: Requests
) -> None:
    store = make_store(glacier, observed, read_timeout=0.3)
    glacier.hang(TOTAL_ATTEMPTS, 1.0)
    with pytest.raises(StoreUnreachable):
        list(store.list_uploads(VAULT, []))
    assert observed.seen == [("ListMultipartUploads", "Timeout")] * TOTAL_ATTEMPTS


def test_the_default_credential_chain_is_used_without_explicit_keys(
    glacier: FakeGlacier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", glacier.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", glacier.secret_key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    glacier.add_upload(VAULT, "via-env")
    target = GlacierTarget(glacier.url, glacier.region, "-", (VAULT,))

    store = GlacierStore(target, None, Requests())

    assert [u.key for u in uploads_of(store)] == ["via-env"]


# --------------------------------------------------------------------------------------------
# The store's clock


def test_times_come_from_the_store_clock_not_the_local_one(
    glacier: FakeGlacier, store: GlacierStore
) -> None:
    glacier.clock_offset = timedelta(minutes=-10)  # this node runs 10 minutes fast
    glacier.add_upload(VAULT, "a", parts=1)

    page = next(iter(store.list_uploads(VAULT, [])))
    parts = store.measure(page.uploads[0])

    for moment in (page.server_time, parts.server_time):
        assert abs(moment - glacier.now()) < timedelta(seconds=2)
        assert datetime.now(UTC) - moment > timedelta(minutes=9)


def test_identity_and_containers(glacier: FakeGlacier) -> None:
    target = GlacierTarget(None, "eu-west-1", "111122223333", ("a", "b"))
    store = GlacierStore(target, StoreCredentials("k", "s"), Requests())
    assert store.kind == "Glacier"
    assert store.containers() == ["a", "b"]
    # A vault is its region and name: the account spelling ("-" or the id) is left out.
    assert store.target_id == "glacier:aws:eu-west-1"
    assert make_store(glacier).target_id == f"glacier:{glacier.url}"


# --------------------------------------------------------------------------------------------
# A whole sweep through the engine


def glacier_policy(server: FakeGlacier, vaults: list[str], mode: str = "Abort") -> Any:
    return parse_policy(
        {
            "apiVersion": "mpu-janitor.dev/v1alpha1",
            "kind": "UploadLifecyclePolicy",
            "metadata": {"name": "stale-archives", "namespace": "media"},
            "spec": {
                "store": {
                    "type": "Glacier",
                    "glacier": {"endpoint": server.url, "region": server.region, "vaults": vaults},
                },
                # quietPeriod 0s: age alone decides (the quiet period on Glacier, judged by
                # watching uploads across sweeps, is tested in test_glacier_listings.py).
                "match": {
                    "olderThan": "7d",
                    "quietPeriod": "0s",
                    "prefixes": ["tmp/"],
                    "excludeKeyGlobs": ["*.keep"],
                },
                "mode": mode,
                "limits": {"requestsPerSecond": 1000, "concurrency": 8},
            },
        }
    )


def test_a_sweep_aborts_exactly_the_eligible_uploads_and_reports_freed_bytes(
    glacier: FakeGlacier,
) -> None:
    old = timedelta(days=10)
    glacier.create_vault("second")
    # The node's clock runs 10 minutes fast: on it, "almost" below looks older than 7 days.
    glacier.clock_offset = timedelta(minutes=-10)
    eligible = {
        glacier.add_upload(VAULT, "tmp/a.bin", age=old, parts=3, last_part_size=100): 2 * MiB + 100,
        glacier.add_upload(VAULT, "tmp/b.bin", age=old, parts=1200): 1200 * MiB,
        glacier.add_upload(VAULT, "tmp/c.bin", age=old): 0,
        glacier.add_upload("second", "tmp/d.bin", age=old, parts=2, part_size=4 * MiB): 8 * MiB,
    }
    kept = {
        glacier.add_upload(VAULT, "tmp/young.bin", age=timedelta(days=1), parts=2),
        glacier.add_upload(VAULT, "tmp/almost.bin", age=timedelta(days=7, minutes=-5), parts=1),
        glacier.add_upload(VAULT, "tmp/precious.keep", age=old, parts=1),
        glacier.add_upload(VAULT, "final/outside-prefix.bin", age=old, parts=1),
        glacier.add_upload(VAULT, None, age=old, parts=1),
    }
    policy = glacier_policy(glacier, [VAULT, "second"])
    store = open_store(policy.store, StoreCredentials(glacier.access_key, glacier.secret_key))

    result = run_sweep(policy, store, locks=TargetLocks())

    assert result.issues == []
    assert result.total("aborted") == len(eligible)
    assert result.freed_bytes == sum(eligible.values())
    assert result.failed == 0
    assert result.total("already_gone") == 0
    assert result.buckets[VAULT].scanned == 5  # tmp/ minus *.keep
    assert result.buckets["second"].aborted == 1
    remaining = {u.upload_id for u in glacier.uploads(VAULT) + glacier.uploads("second")}
    assert remaining == kept
    assert result.summary()["reason"] == "SweepSucceeded"


def test_a_dry_run_sweep_counts_what_it_would_free_and_aborts_nothing(
    glacier: FakeGlacier,
) -> None:
    glacier.add_upload(VAULT, "tmp/a.bin", age=timedelta(days=8), parts=5)
    glacier.add_upload(VAULT, "tmp/b.bin", age=timedelta(days=2), parts=5)
    policy = glacier_policy(glacier, [VAULT], mode="DryRun")
    store = open_store(policy.store, StoreCredentials(glacier.access_key, glacier.secret_key))

    result = run_sweep(policy, store, locks=TargetLocks())

    assert (result.total("eligible"), result.total("eligible_bytes")) == (1, 5 * MiB)
    assert (result.total("aborted"), result.freed_bytes) == (0, 0)
    assert len(glacier.uploads(VAULT)) == 2
    assert not [r for r in glacier.requests if r.method == "DELETE"]
