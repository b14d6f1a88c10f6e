"""The LILT store and its inventory against a local LILT upload API (the documented cancel,
initiate and pending-uploads calls, Basic auth, the 429 quota answer)."""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import urllib3

from mpu_janitor.policy import LiltTarget, parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import (
    AccessDenied,
    ContainerNotFound,
    InvalidTarget,
    StoreCredentials,
    StoreError,
    StoreUnreachable,
    Throttled,
    Upload,
    UploadGone,
)
from mpu_janitor.stores.lilt import (
    CONTAINER,
    LiltStore,
    forget_upload,
    parse_record,
    prune_uploads,
    record_part,
    record_upload,
    unresolved_path,
)
from mpu_janitor.sweep import TargetLocks, run_sweep
from tests.support.lilt_server import FakeLilt

pytestmark = pytest.mark.integration


class Requests:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, operation: str, code: str) -> None:
        self.seen.append((operation, code))


@pytest.fixture()
def lilt() -> Iterator[FakeLilt]:
    with FakeLilt() as server:
        yield server


@pytest.fixture()
def inventory(tmp_path: Path) -> Path:
    return tmp_path / "lilt-uploads.jsonl"


@pytest.fixture()
def observed() -> Requests:
    return Requests()


def make_store(
    server: FakeLilt,
    inventory: Path | None,
    observer: Requests | None = None,
    *,
    api_key: str | None = None,
    endpoint: str | None = None,
) -> LiltStore:
    target = LiltTarget(endpoint or server.url, str(inventory) if inventory else None)
    credentials = StoreCredentials(api_key=api_key or server.api_key)
    return LiltStore(target, credentials, observer or Requests())


@pytest.fixture()
def store(lilt: FakeLilt, inventory: Path, observed: Requests) -> Iterator[LiltStore]:
    store = make_store(lilt, inventory, observed)
    yield store
    store.close()


def start_upload(
    server: FakeLilt,
    inventory: Path,
    filename: str,
    *,
    age: timedelta = timedelta(0),
    size: int | None = None,
) -> Upload:
    """What the uploader does: initiate at LILT, then record the upload in the inventory."""
    upload_id, key = server.initiate(filename, size, age=age)
    initiated = server.now() - age
    record_upload(inventory, upload_id, key, initiated=initiated, filename=filename, size=size)
    return Upload(CONTAINER, key, upload_id, initiated)


def records(inventory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in inventory.read_text().splitlines()]


def listed(store: LiltStore) -> list[Upload]:
    return [upload for page in store.list_uploads(CONTAINER, []) for upload in page.uploads]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# The inventory


def test_record_upload_writes_one_json_line_per_upload(inventory: Path) -> None:
    moment = datetime(2025, 1, 31, 12, 0, 1, 250000, tzinfo=UTC)
    record_upload(inventory, "u-1", "uploads/1/a.zip", initiated=moment, filename="a.zip", size=10)
    record_upload(inventory, "u-2", "uploads/2/b.zip", initiated=moment)

    assert records(inventory) == [
        {
            "uploadId": "u-1",
            "key": "uploads/1/a.zip",
            "initiated": "2025-01-31T12:00:01.250Z",
            "filename": "a.zip",
            "size": 10,
        },
        {"uploadId": "u-2", "key": "uploads/2/b.zip", "initiated": "2025-01-31T12:00:01.250Z"},
    ]
    parsed = parse_record(inventory.read_bytes().splitlines(keepends=True)[0])
    assert parsed is not None and parsed.initiated == moment and parsed.size == 10


def test_record_upload_refuses_what_could_never_be_swept(inventory: Path) -> None:
    with pytest.raises(ValueError, match="timezone"):
        record_upload(inventory, "u", "k", initiated=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="required"):
        record_upload(inventory, "", "k")
    with pytest.raises(ValueError, match="required"):
        record_upload(inventory, "u", "")
    assert not inventory.exists()


def test_concurrent_writers_and_pruning_lose_no_record(inventory: Path) -> None:
    threads, per_thread = 16, 150
    doomed = {f"doomed-{n}" for n in range(200)}
    for upload_id in sorted(doomed):
        record_upload(inventory, upload_id, f"k/{upload_id}")
    start = threading.Barrier(threads + 1)

    def writer(number: int) -> None:
        start.wait()
        for n in range(per_thread):
            record_upload(inventory, f"t{number}-{n}", f"uploads/{number}/{n}.bin", size=n)

    def pruner() -> None:
        start.wait()
        for chunk in range(0, 200, 10):  # rewrites the file 20 times while the writers append
            prune_uploads(inventory, {f"doomed-{n}" for n in range(chunk, chunk + 10)})

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads - 1)]
    workers.append(threading.Thread(target=pruner))
    for worker in workers:
        worker.start()
    start.wait()
    for worker in workers:
        worker.join()

    ids = [record["uploadId"] for record in records(inventory)]
    expected = {f"t{t}-{n}" for t in range(threads - 1) for n in range(per_thread)}
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == expected


def test_a_record_after_a_torn_line_is_not_lost(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    first = start_upload(lilt, inventory, "first.bin")
    with open(inventory, "ab") as damaged:  # a writer killed in the middle of its line
        damaged.write(b'{"uploadId":"half-writ')
    second = start_upload(lilt, inventory, "second.bin")

    assert [u.upload_id for u in listed(store)] == [first.upload_id, second.upload_id]
    forget_upload(inventory, first.upload_id)
    assert [r["uploadId"] for r in records(inventory)] == [second.upload_id]  # debris gone too


def test_the_inventory_is_streamed_in_pages_of_1000(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    with open(inventory, "w") as out:
        for n in range(2500):
            out.write(
                json.dumps(
                    {"uploadId": f"u{n}", "key": f"k/{n}", "initiated": "2025-01-01T00:00:00Z"}
                )
                + "\n"
            )
        out.write("not json\n")
        out.write(
            json.dumps({"uploadId": "no-zone", "key": "k", "initiated": "2025-01-01T00:00"}) + "\n"
        )
        out.write('{"uploadId": "being-written", "key": "k/x", "initiated": "2025-0')

    pages = list(store.list_uploads(CONTAINER, []))

    assert [len(page.uploads) for page in pages] == [1000, 1000, 500]
    assert [u.upload_id for page in pages for u in page.uploads] == [f"u{n}" for n in range(2500)]
    assert all(page.server_time for page in pages)


def test_nothing_recorded_yet_is_one_empty_page(store: LiltStore) -> None:
    pages = list(store.list_uploads(CONTAINER, []))
    assert [page.uploads for page in pages] == [[]]


def test_an_inventory_on_a_missing_volume_is_container_not_found(
    lilt: FakeLilt, tmp_path: Path
) -> None:
    store = make_store(lilt, tmp_path / "not-mounted" / "uploads.jsonl")
    with pytest.raises(ContainerNotFound, match="not-mounted"):
        list(store.list_uploads(CONTAINER, []))


def test_a_policy_without_an_inventory_is_invalid(lilt: FakeLilt) -> None:
    store = make_store(lilt, None)
    with pytest.raises(InvalidTarget, match="inventoryPath") as caught:
        list(store.list_uploads(CONTAINER, []))
    assert caught.value.reason == "InvalidSpec"


def test_forget_prunes_verified_uploads_from_the_inventory(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    uploads = [start_upload(lilt, inventory, f"{n}.bin", size=n) for n in range(5)]
    os.chmod(inventory, 0o664)

    for upload in uploads[1:4]:
        store.forget(upload)
    store.close()  # flushes the batch

    assert [r["uploadId"] for r in records(inventory)] == [
        uploads[0].upload_id,
        uploads[4].upload_id,
    ]
    assert stat.S_IMODE(inventory.stat().st_mode) == 0o664  # the uploader can still append
    with pytest.raises(UploadGone):
        store.measure(uploads[2])


# --------------------------------------------------------------------------------------------
# Cancelling and verifying


def test_cancel_sends_basic_auth_and_s3key_and_never_the_key_parameter(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    upload = start_upload(lilt, inventory, "report final.docx")
    listed(store)
    store.abort(upload)

    assert not lilt.is_pending(upload.upload_id)
    basic = "Basic " + base64.b64encode(f"{lilt.api_key}:{lilt.api_key}".encode()).decode()
    assert lilt.requests
    for received in lilt.requests:
        assert received.headers["authorization"] == basic
        assert "key" not in received.query
        assert lilt.api_key not in received.path
        assert all(lilt.api_key not in v for values in received.query.values() for v in values)
    cancel = lilt.requests[-1]
    assert (cancel.method, cancel.path) == ("DELETE", f"/v2/upload/s3/multipart/{upload.upload_id}")
    assert cancel.query == {"s3Key": [upload.key]}
    assert cancel.status == 200
    # Percent-encoded as LILT's client does: a space is %20 (a + would be a plus sign).
    assert cancel.raw_query == "s3Key=" + upload.key.replace(" ", "%20")


def test_abort_then_measure_is_upload_gone(
    lilt: FakeLilt, inventory: Path, store: LiltStore, observed: Requests
) -> None:
    upload = start_upload(lilt, inventory, "a.bin", size=4096)
    listed(store)

    before = store.measure(upload)
    assert (before.size_bytes, before.newest_part) == (4096, None)
    assert [r.method for r in lilt.requests] == ["GET"]  # measuring sends nothing

    store.abort(upload)
    with pytest.raises(UploadGone):
        store.measure(upload)

    assert observed.seen == [
        ("ListUploads", "200"),
        ("CancelMultipartUpload", "200"),
        ("CancelMultipartUpload", "404"),  # the verification: LILT no longer knows it
    ]


def test_a_repeated_cancel_that_lilt_accepts_again_confirms_the_cancel(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    lilt.repeat_cancel = "200"  # an idempotent cancel: LILT confirms it once more
    upload = start_upload(lilt, inventory, "a.bin", size=1)
    listed(store)
    store.abort(upload)
    with pytest.raises(UploadGone):
        store.measure(upload)


def test_cancel_of_an_unknown_upload_is_upload_gone(lilt: FakeLilt, store: LiltStore) -> None:
    with pytest.raises(UploadGone):
        store.abort(Upload(CONTAINER, "uploads/none", "no-such-upload", datetime.now(UTC)))
    upload_id, _ = lilt.initiate("x.bin")
    with pytest.raises(UploadGone):  # right id, wrong S3 key
        store.abort(Upload(CONTAINER, "uploads/other", upload_id, datetime.now(UTC)))
    assert lilt.is_pending(upload_id)


def test_measure_reports_the_recorded_size_or_zero(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    sized = start_upload(lilt, inventory, "sized.bin", size=123_456_789)
    unsized = start_upload(lilt, inventory, "unsized.bin")
    listed(store)
    assert store.measure(sized).size_bytes == 123_456_789
    assert store.measure(unsized).size_bytes == 0
    # A fresh store that has not listed yet finds the size in the file.
    assert make_store(lilt, inventory).measure(sized).size_bytes == 123_456_789


# --------------------------------------------------------------------------------------------
# Quota, access, reachability, clock


def test_the_quota_answer_is_throttled(lilt: FakeLilt, inventory: Path, store: LiltStore) -> None:
    upload = start_upload(lilt, inventory, "a.bin")
    lilt.throttle(2)
    with pytest.raises(Throttled, match="60"):
        listed(store)
    with pytest.raises(Throttled) as caught:
        store.abort(upload)
    assert caught.value.reason == "Throttled"
    assert lilt.is_pending(upload.upload_id)
    store.abort(upload)  # the quota is back
    assert not lilt.is_pending(upload.upload_id)


def test_a_wrong_api_key_is_access_denied(lilt: FakeLilt, inventory: Path) -> None:
    upload = start_upload(lilt, inventory, "a.bin")
    store = make_store(lilt, inventory, api_key="not-the-key")
    with pytest.raises(AccessDenied, match="401"):
        listed(store)
    with pytest.raises(AccessDenied):
        store.abort(upload)
    assert lilt.is_pending(upload.upload_id)


def test_the_api_key_comes_from_the_environment_without_a_secret(
    lilt: FakeLilt, inventory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = start_upload(lilt, inventory, "a.bin")
    target = LiltTarget(lilt.url, str(inventory))

    monkeypatch.delenv("LILT_API_KEY", raising=False)
    with pytest.raises(AccessDenied, match="LILT_API_KEY"):
        listed(LiltStore(target, None, Requests()))
    assert lilt.requests == []  # nothing sent without a key

    monkeypatch.setenv("LILT_API_KEY", lilt.api_key)
    assert [u.upload_id for u in listed(LiltStore(target, None, Requests()))] == [upload.upload_id]


def test_an_unreachable_lilt_is_store_unreachable(
    lilt: FakeLilt, inventory: Path, observed: Requests
) -> None:
    upload = start_upload(lilt, inventory, "a.bin")
    store = make_store(lilt, inventory, observed, endpoint=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(StoreUnreachable):
        store.abort(upload)
    assert observed.seen == [("CancelMultipartUpload", "ConnectionError")]


def test_ages_are_judged_on_lilt_clock(lilt: FakeLilt, inventory: Path, store: LiltStore) -> None:
    lilt.clock_offset = timedelta(hours=-3)  # this node's clock is three hours fast
    start_upload(lilt, inventory, "a.bin", age=timedelta(hours=1))

    page = next(iter(store.list_uploads(CONTAINER, [])))

    assert abs(page.server_time - lilt.now()) < timedelta(seconds=2)
    age = page.server_time - page.uploads[0].initiated
    assert timedelta(minutes=59) < age < timedelta(minutes=61)  # not 4 hours
    assert abs(store.measure(page.uploads[0]).server_time - lilt.now()) < timedelta(seconds=2)


def test_without_a_date_header_no_clock_is_used(
    lilt: FakeLilt, inventory: Path, store: LiltStore, caplog: pytest.LogCaptureFixture
) -> None:
    lilt.send_date = False
    lilt.clock_offset = timedelta(hours=-3)
    start_upload(lilt, inventory, "a.bin")

    page = next(iter(store.list_uploads(CONTAINER, [])))

    assert page.server_time is None  # the engine judges no age, never on the local clock
    assert "no Date header" in caplog.text


def test_identity_and_containers(lilt: FakeLilt, inventory: Path, store: LiltStore) -> None:
    assert store.kind == "LILT"
    assert store.containers() == [CONTAINER]
    assert store.target_id == f"lilt:{lilt.url}:{inventory}"
    with pytest.raises(ContainerNotFound):
        list(store.list_uploads("elsewhere", []))


# --------------------------------------------------------------------------------------------
# The uploader's side and a whole sweep through the engine


def uploader_initiates(server: FakeLilt, inventory: Path, filename: str, size: int) -> str:
    """The team's uploader: initiate over HTTP, then record the response in the inventory,
    timed by the Date of LILT's answer."""
    http = urllib3.PoolManager()
    response = http.request(
        "POST",
        f"{server.url}/v2/upload/s3/multipart",
        json={"filename": filename, "type": "application/octet-stream", "metadata": {"size": size}},
        headers=urllib3.util.make_headers(basic_auth=f"{server.api_key}:{server.api_key}"),
    )
    assert response.status == 200
    body = response.json()
    from email.utils import parsedate_to_datetime

    record_upload(
        inventory,
        body["uploadId"],
        body["key"],
        initiated=parsedate_to_datetime(response.headers["Date"]),
        filename=filename,
        size=size,
    )
    return str(body["uploadId"])


def lilt_policy(server: FakeLilt, inventory: Path) -> Any:
    return parse_policy(
        {
            "apiVersion": "mpu-janitor.dev/v1alpha1",
            "kind": "UploadLifecyclePolicy",
            "metadata": {"name": "lilt-uploads", "namespace": "translation"},
            "spec": {
                "store": {
                    "type": "LILT",
                    "lilt": {"endpoint": server.url, "inventoryPath": str(inventory)},
                },
                "match": {"olderThan": "2d", "excludeKeyGlobs": ["*.keep"]},
                "limits": {"requestsPerSecond": 1000, "concurrency": 4},
            },
        }
    )


def test_a_sweep_cancels_exactly_the_eligible_uploads_and_prunes_them(
    lilt: FakeLilt, inventory: Path
) -> None:
    lilt.clock_offset = timedelta(hours=-1)  # on the node's clock, "borderline" would be 2d+
    old = timedelta(days=3)
    eligible = {
        start_upload(lilt, inventory, "a.zip", age=old, size=5_000_000).upload_id: 5_000_000,
        start_upload(lilt, inventory, "b.zip", age=old, size=70).upload_id: 70,
        start_upload(lilt, inventory, "c.zip", age=old).upload_id: 0,
    }
    kept = {
        uploader_initiates(lilt, inventory, "fresh.zip", 10),
        start_upload(
            lilt, inventory, "borderline.zip", age=timedelta(days=2, minutes=-30), size=1
        ).upload_id,
        start_upload(lilt, inventory, "precious.keep", age=old, size=1).upload_id,
    }
    policy = lilt_policy(lilt, inventory)
    store = open_store(policy.store, StoreCredentials(api_key=lilt.api_key))

    result = run_sweep(policy, store, locks=TargetLocks())
    store.close()

    assert result.issues == []
    assert (result.total("scanned"), result.total("aborted")) == (5, len(eligible))
    assert result.freed_bytes == sum(eligible.values())
    assert result.failed == 0
    assert not any(lilt.is_pending(upload_id) for upload_id in eligible)
    assert all(lilt.is_pending(upload_id) for upload_id in kept)
    assert {r["uploadId"] for r in records(inventory)} == kept
    assert all("key" not in r.query for r in lilt.requests)


def test_a_sweep_never_claims_bytes_it_could_not_verify(lilt: FakeLilt, inventory: Path) -> None:
    lilt.repeat_cancel = "500"  # LILT confirms the cancel but cannot answer its repeat
    upload = start_upload(lilt, inventory, "a.zip", age=timedelta(days=3), size=999)
    policy = lilt_policy(lilt, inventory)
    store = open_store(policy.store, StoreCredentials(api_key=lilt.api_key))

    result = run_sweep(policy, store, locks=TargetLocks())
    store.close()

    assert (result.total("aborted"), result.freed_bytes, result.failed) == (0, 0, 1)
    assert result.reason == "PartialFailure"
    assert [r["uploadId"] for r in records(inventory)] == [upload.upload_id]  # retried next time


def test_a_sweep_prunes_records_lilt_no_longer_knows_without_claiming_them(
    lilt: FakeLilt, inventory: Path
) -> None:
    completed = start_upload(lilt, inventory, "done.zip", age=timedelta(days=3), size=50)
    lilt.complete(completed.upload_id)  # the uploader finished it but never forgot the record
    policy = lilt_policy(lilt, inventory)
    store = open_store(policy.store, StoreCredentials(api_key=lilt.api_key))

    result = run_sweep(policy, store, locks=TargetLocks())
    store.close()

    assert (result.total("already_gone"), result.total("aborted"), result.freed_bytes) == (1, 0, 0)
    assert [issue.reason for issue in result.issues] == ["UploadNotFound"]  # never silent
    assert "forget_upload" in result.issues[0].message  # what the uploader should do
    assert records(inventory) == []


def test_a_misrouted_endpoint_never_empties_the_inventory(lilt: FakeLilt, inventory: Path) -> None:
    upload = start_upload(lilt, inventory, "a.zip", age=timedelta(days=3), size=50)
    store = make_store(lilt, inventory, endpoint=f"{lilt.url}/not-the-api")

    with pytest.raises(StoreError, match="endpoint"):  # the pending-uploads call 404s there
        listed(store)
    with pytest.raises(UploadGone):  # and so does every cancel
        store.abort(upload)
    store.close()

    assert [r["uploadId"] for r in records(inventory)] == [upload.upload_id]
    assert not unresolved_path(inventory).exists()
    assert lilt.is_pending(upload.upload_id)


def test_a_prune_that_fails_does_not_fail_the_close(
    lilt: FakeLilt, inventory: Path, store: LiltStore, caplog: pytest.LogCaptureFixture
) -> None:
    upload = start_upload(lilt, inventory, "a.zip")
    store.forget(upload)
    lock = Path(f"{inventory}.lock")
    lock.unlink()
    lock.mkdir()  # the lock can no longer be taken (a failure even root cannot bypass)

    store.close()

    assert "could not prune" in caplog.text
    assert [r["uploadId"] for r in records(inventory)] == [upload.upload_id]


def test_uploaders_record_with_the_cli(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    inventory_file = tmp_path / "inventory.jsonl"
    script = Path(sys.executable).parent / "mpu-janitor"
    for upload_id, key in (("u-1", "uploads/a.bin"), ("u-2", "uploads/b.bin")):
        done = subprocess.run(
            [
                str(script),
                "lilt-record",
                "--inventory",
                str(inventory_file),
                "--upload-id",
                upload_id,
                "--key",
                key,
                "--size",
                "1024",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in inventory_file.read_text().splitlines()]
    assert [(r["uploadId"], r["key"], r["size"]) for r in records] == [
        ("u-1", "uploads/a.bin", 1024),
        ("u-2", "uploads/b.bin", 1024),
    ]
    bad = subprocess.run(
        [
            str(script),
            "lilt-record",
            "--inventory",
            str(inventory_file),
            "--upload-id",
            "u-3",
            "--key",
            "k",
            "--size",
            "-5",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "size" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------------
# Documented requests only, every one paced


def test_the_clock_and_reachability_come_from_one_documented_request(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    with open(inventory, "w") as out:
        for n in range(2500):
            out.write(
                json.dumps(
                    {"uploadId": f"u{n}", "key": f"k/{n}", "initiated": "2025-01-01T00:00:00Z"}
                )
                + "\n"
            )
    lilt.clock_offset = timedelta(hours=-3)

    pages = list(store.list_uploads(CONTAINER, []))

    assert len(pages) == 3
    # GET /v2/upload without parameters: the documented pending-uploads call (ids=0 is no id).
    assert [(r.method, r.path, r.raw_query, r.status) for r in lilt.requests] == [
        ("GET", "/v2/upload", "", 200)
    ]
    assert all(abs(page.server_time - lilt.now()) < timedelta(seconds=2) for page in pages)


def test_cancel_answers_keep_the_clock(lilt: FakeLilt, inventory: Path, store: LiltStore) -> None:
    upload = start_upload(lilt, inventory, "a.bin", size=1)
    listed(store)
    lilt.clock_offset = timedelta(hours=5)  # LILT's clock moved (or ours drifted)
    store.abort(upload)
    assert abs(store.measure(start_upload(lilt, inventory, "b.bin")).server_time - lilt.now()) < (
        timedelta(seconds=2)
    )


class RecordingPace:
    """A pace that counts the requests it sends, retries a throttled one (like the engine),
    and stops before a request once told to."""

    def __init__(self) -> None:
        self.sent = 0
        self.finishing = 0
        self.stopping = False

    def __call__(self, request: Any, *, finish: bool = False) -> Any:
        from mpu_janitor.pacing import Cancelled

        if self.stopping and not finish:
            raise Cancelled()
        while True:
            self.sent += 1
            self.finishing += finish
            try:
                return request()
            except Throttled:
                continue


def test_every_request_of_a_listing_and_a_verification_goes_through_pace(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    upload = start_upload(lilt, inventory, "a.bin", size=1)
    pace = RecordingPace()
    lilt.throttle(1)  # the first request is throttled: retried alone

    pages = list(store.list_uploads(CONTAINER, [], pace))
    assert [u.upload_id for page in pages for u in page.uploads] == [upload.upload_id]
    store.abort(upload)
    with pytest.raises(UploadGone):
        store.measure(upload, pace)  # the verifying repeat of the cancel

    sent_by_store = [r for r in lilt.requests if r.method == "GET" or r.status != 200]
    assert pace.sent == len(sent_by_store) == 3  # throttled GET, GET, verifying DELETE
    assert pace.finishing == 1  # the verification goes out even during a stop


def test_a_stopping_sweep_sends_no_listing_request(
    lilt: FakeLilt, inventory: Path, store: LiltStore
) -> None:
    from mpu_janitor.pacing import Cancelled

    start_upload(lilt, inventory, "a.bin")
    pace = RecordingPace()
    pace.stopping = True
    with pytest.raises(Cancelled):
        list(store.list_uploads(CONTAINER, [], pace))
    assert lilt.requests == []


# --------------------------------------------------------------------------------------------
# Completeness: LILT's pending uploads against the inventory


def test_pending_uploads_the_inventory_never_recorded_are_reported(
    lilt: FakeLilt, inventory: Path
) -> None:
    recorded = start_upload(lilt, inventory, "recorded.zip", age=timedelta(hours=5), size=1)
    lilt.initiate("unrecorded-1.zip", 10, age=timedelta(hours=5))
    lilt.initiate("unrecorded-2.zip", 10, age=timedelta(days=9))
    lilt.initiate("just-initiated.zip", 10)  # its uploader may be recording it right now
    policy = lilt_policy(lilt, inventory)
    store = open_store(policy.store, StoreCredentials(api_key=lilt.api_key))

    result = run_sweep(policy, store, locks=TargetLocks())
    store.close()

    (issue,) = result.issues
    assert issue.reason == "UnrecordedUploads"
    assert issue.message.startswith("LILT lists 2 pending upload(s)")
    assert "unrecorded-2.zip" in issue.message and "lilt-record" in issue.message
    assert lilt.is_pending(recorded.upload_id)  # young: kept, and counted as recorded


def test_an_inventory_that_records_every_upload_reports_nothing(
    lilt: FakeLilt, inventory: Path
) -> None:
    for n in range(3):
        start_upload(lilt, inventory, "same-name.zip", age=timedelta(hours=n + 1))
    record_upload(inventory, "elsewhere", "uploads/x", filename="other.zip")  # not on LILT
    policy = lilt_policy(lilt, inventory)
    store = open_store(policy.store, StoreCredentials(api_key=lilt.api_key))

    result = run_sweep(policy, store, locks=TargetLocks())
    store.close()

    assert result.issues == []


# --------------------------------------------------------------------------------------------
# quietPeriod: part times recorded by the uploader


def test_recorded_part_times_keep_active_uploads(lilt: FakeLilt, inventory: Path) -> None:
    old = timedelta(days=3)
    active = start_upload(lilt, inventory, "active.zip", age=old, size=1)
    quiet = start_upload(lilt, inventory, "quiet.zip", age=old, size=2)
    unknown = start_upload(lilt, inventory, "unknown.zip", age=old, size=4)
    record_part(inventory, active.upload_id, at=lilt.now() - timedelta(hours=5))
    record_part(inventory, active.upload_id, at=lilt.now() - timedelta(minutes=10))
    record_part(inventory, quiet.upload_id, at=lilt.now() - timedelta(hours=2))
    policy = lilt_policy(lilt, inventory)  # quietPeriod: the default hour
    store = open_store(policy.store, StoreCredentials(api_key=lilt.api_key))

    measured = store.measure(active)
    assert measured.newest_part is not None
    assert abs(measured.newest_part - (lilt.now() - timedelta(minutes=10))) < timedelta(seconds=2)
    assert store.measure(unknown).newest_part is None  # no part time: activity unknown
    result = run_sweep(policy, store, locks=TargetLocks())
    store.close()

    assert (result.total("skipped_active"), result.total("aborted")) == (1, 2)
    assert lilt.is_pending(active.upload_id)
    assert not lilt.is_pending(quiet.upload_id) and not lilt.is_pending(unknown.upload_id)
    assert [r["uploadId"] for r in records(inventory) if "key" in r] == [active.upload_id]
    # Pruning drops the part times of pruned uploads and keeps the others' newest.
    assert {r["uploadId"] for r in records(inventory)} == {active.upload_id}


def test_uploaders_record_part_times_with_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    inventory_file = tmp_path / "inventory.jsonl"
    script = Path(sys.executable).parent / "mpu-janitor"
    base = [str(script), "lilt-record", "--inventory", str(inventory_file), "--upload-id", "u-1"]
    for extra in (
        ["--key", "uploads/a.bin"],
        ["--part-time"],
        ["--part-time", "2025-03-01T10:00:00Z"],
    ):
        done = subprocess.run(base + extra, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in inventory_file.read_text().splitlines()]
    assert [sorted(line) for line in lines] == [
        ["initiated", "key", "uploadId"],
        ["partAt", "uploadId"],
        ["partAt", "uploadId"],
    ]
    assert lines[2]["partAt"] == "2025-03-01T10:00:00.000Z"
    bad = subprocess.run(
        [*base, "--part-time", "yesterday"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "--part-time" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(base, capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "--key" in missing.stderr


@pytest.mark.parametrize(
    "filename", ["a+b.zip", "q&a=1.zip", "50% #1?.zip", "überall ünïcode.zip", "tab\there.zip"]
)
def test_keys_with_reserved_characters_cancel_the_right_upload(
    lilt: FakeLilt, inventory: Path, store: LiltStore, filename: str
) -> None:
    upload = start_upload(lilt, inventory, filename)
    other = start_upload(lilt, inventory, filename.replace(".zip", ".other.zip"))
    listed(store)
    store.abort(upload)
    assert not lilt.is_pending(upload.upload_id)
    assert lilt.is_pending(other.upload_id)
    assert lilt.requests[-1].query == {"s3Key": [upload.key]}
