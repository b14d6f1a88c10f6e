"""A population of uploads with a known truth, and the invariants a sweep under faults keeps.

A :class:`Population` is made directly against MinIO (never through a fault): uploads the
policy must abort (``eligible``, each with one small part of a known size), uploads outside the
policy (another prefix, a key the exclusion glob protects) and uploads inside it that are still
being written (a part younger than the quiet period, rewritten all through every sweep). After each
sweep the store's own listing is the truth the sweep's counts are checked against.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mpu_janitor.policy import Policy, parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.sweep import SweepResult, TargetLocks, run_sweep
from tests.integration.helpers import open_uploads, policy_doc
from tests.support.minio import MinioServer

PREFIX = "in/"
EXCLUDE_GLOB = "*.keep"
QUIET_PERIOD_SECONDS = 8  # the active uploads' writers send a part every 2 s
OLDER_THAN = "2s"
MAX_EXTRA_SWEEPS = 2  # sweeps after the faults stop that must reach the true end state


@dataclass
class Population:
    bucket: str
    eligible: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (key, bytes)
    out_of_scope: dict[str, str] = field(default_factory=dict)  # id -> key
    active: dict[str, str] = field(default_factory=dict)  # id -> key
    last_eligible_part: float = 0.0  # time.monotonic() after the last eligible part
    parts_sent: int = 0  # parts the active uploads' writers sent after their first

    @property
    def eligible_bytes(self) -> int:
        return sum(size for _, size in self.eligible.values())

    @property
    def protected(self) -> dict[str, str]:
        """Every upload the policy must never abort."""
        return {**self.out_of_scope, **self.active}


def part_size(index: int) -> int:
    return 1 + (index * 37) % 200


def _upload(s3: Any, bucket: str, key: str, size: int) -> str:
    upload_id: str = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b"x" * size)
    return upload_id


def make_population(
    s3: Any,
    bucket: str,
    *,
    eligible: int,
    other_prefix: int,
    excluded: int,
    active: int,
    workers: int = 24,
) -> Population:
    """Uploads created concurrently: eligible first (their parts must age past the quiet
    period), then the ones outside the policy, then the active ones."""
    population = Population(bucket)
    eligible_keys = [(f"{PREFIX}e/{i:06}", part_size(i)) for i in range(eligible)]
    # Out of scope: another prefix, and keys under the policy's prefix the glob protects.
    outside = [(f"out/{i:06}", part_size(i)) for i in range(other_prefix)]
    outside += [(f"{PREFIX}x/{i:06}.keep", part_size(i)) for i in range(excluded)]
    # Active: under the prefix, still being written (see writers_at_work).
    active_keys = [(f"{PREFIX}a/{i:06}", part_size(i)) for i in range(active)]
    with ThreadPoolExecutor(workers) as pool:
        ids = list(pool.map(lambda item: _upload(s3, bucket, *item), eligible_keys))
        population.last_eligible_part = time.monotonic()
        population.eligible = {
            upload_id: item for upload_id, item in zip(ids, eligible_keys, strict=True)
        }
        ids = list(pool.map(lambda item: _upload(s3, bucket, *item), outside))
        population.out_of_scope = {
            upload_id: key for upload_id, (key, _) in zip(ids, outside, strict=True)
        }
        ids = list(pool.map(lambda item: _upload(s3, bucket, *item), active_keys))
        population.active = {
            upload_id: key for upload_id, (key, _) in zip(ids, active_keys, strict=True)
        }
    return population


def wait_until_quiet(population: Population) -> None:
    """Until the eligible uploads' parts are older than the quiet period (by a margin)."""
    remaining = population.last_eligible_part + QUIET_PERIOD_SECONDS + 1.5 - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def refresh_active(s3: Any, population: Population, workers: int = 16) -> None:
    """The active uploads' writers send their next part (one byte each)."""
    population.parts_sent += 1
    number = population.parts_sent + 1

    def write(item: tuple[str, str]) -> None:
        upload_id, key = item
        s3.upload_part(
            Bucket=population.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=b"a"
        )

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, population.active.items()))


@contextlib.contextmanager
def writers_at_work(s3: Any, population: Population, every: float = 2.0) -> Iterator[None]:
    """The active uploads keep receiving parts for as long as the sweep runs (whatever order the
    store lists them in and however long faults make the sweep), so each is younger than the
    quiet period whenever it is measured. A writer that fails (its upload aborted) fails the
    test after the sweep."""
    stop = threading.Event()
    failures: list[BaseException] = []
    refresh_active(s3, population)

    def loop() -> None:
        while not stop.wait(every):
            try:
                refresh_active(s3, population)
            except Exception as error:
                failures.append(error)
                return

    thread = threading.Thread(target=loop, name="active-writers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
    if failures:
        raise AssertionError(f"an active upload's writer failed: {failures[0]!r}")


def fault_policy(endpoint: str, bucket: str, *, concurrency: int = 32) -> dict[str, Any]:
    return policy_doc(
        endpoint,
        [bucket],
        match={
            "prefixes": [PREFIX],
            "excludeKeyGlobs": [EXCLUDE_GLOB],
            "olderThan": OLDER_THAN,
            "quietPeriod": f"{QUIET_PERIOD_SECONDS}s",
        },
        limits={"requestsPerSecond": 5000, "concurrency": concurrency},
    )


def sweep_once(
    minio: MinioServer,
    doc: dict[str, Any],
    observer: Callable[[str, str], None] | None = None,
) -> SweepResult:
    """One sweep in this process, the way the operator runs it (a policy parsed from its
    document, a store opened for it), with a lock table of its own."""
    policy: Policy = parse_policy(doc)
    credentials = StoreCredentials(
        access_key_id=minio.access_key, secret_access_key=minio.secret_key
    )
    store = (
        open_store(policy.store, credentials, observer)
        if observer is not None
        else open_store(policy.store, credentials)
    )
    try:
        return run_sweep(policy, store, locks=TargetLocks())
    finally:
        store.close()


@dataclass
class SweepRecord:
    """One sweep's summary next to the store's truth before and after it."""

    summary: dict[str, Any]
    eligible_before: set[str]
    eligible_after: set[str]

    @property
    def gone(self) -> set[str]:
        return self.eligible_before - self.eligible_after


def listed_ids(s3: Any, bucket: str) -> set[str]:
    return {upload_id for _, upload_id in open_uploads(s3, bucket)}


def check_sweep(population: Population, record: SweepRecord, listed_after: set[str]) -> list[str]:
    """The per-sweep contract, as a list of broken promises (empty: all kept)."""
    problems: list[str] = []
    summary = record.summary
    touched = {
        key for upload_id, key in population.protected.items() if upload_id not in listed_after
    }
    if touched:
        problems.append(
            f"{len(touched)} uploads outside the policy were aborted: {sorted(touched)[:5]}"
        )
    gone = record.gone
    gone_bytes = sum(population.eligible[upload_id][1] for upload_id in gone)
    if summary["aborted"] > len(gone):
        problems.append(
            f"aborted {summary['aborted']} but only {len(gone)} eligible uploads left the listing "
            "(counted freed twice, or while still listed)"
        )
    if summary["freedBytes"] > gone_bytes:
        problems.append(
            f"freedBytes {summary['freedBytes']} > {gone_bytes} bytes of the uploads that left"
        )
    in_scope_listed = len(record.eligible_before) + len(population.active)
    if summary["scanned"] != in_scope_listed:
        problems.append(
            f"scanned {summary['scanned']} != {in_scope_listed} uploads in scope in the listing"
        )
    accounted = (
        summary["skippedActive"]
        + summary["aborted"]
        + summary["alreadyGone"]
        + summary["replaced"]
        + summary["deferred"]
        + summary["failed"]
    )
    if accounted != summary["scanned"]:
        problems.append(
            f"counts do not add up: skippedActive+aborted+alreadyGone+replaced+deferred+failed "
            f"= {accounted} != scanned {summary['scanned']}"
        )
    # Every eligible upload ends aborted, replaced, deferred, failed or already gone (the last
    # two may also happen before an upload is judged eligible, hence a range).
    settled = summary["aborted"] + summary["replaced"] + summary["deferred"]
    if not settled <= summary["eligible"] <= settled + summary["failed"] + summary["alreadyGone"]:
        problems.append(
            f"eligible {summary['eligible']} does not match what became of the eligible uploads: "
            f"{short(summary)}"
        )
    if summary["skippedActive"] > len(population.active):
        problems.append(
            f"skippedActive {summary['skippedActive']} > {len(population.active)} active uploads"
        )
    return problems


def check_end_state(
    population: Population, records: list[SweepRecord], listed_after: set[str]
) -> list[str]:
    """After the faults stop: the true end state, reached with exact totals."""
    problems: list[str] = []
    left = set(population.eligible) & listed_after
    if left:
        problems.append(f"{len(left)} eligible uploads still listed after {len(records)} sweeps")
    missing = set(population.protected) - listed_after
    if missing:
        problems.append(f"{len(missing)} protected uploads gone")
    total_aborted = sum(r.summary["aborted"] for r in records)
    total_freed = sum(r.summary["freedBytes"] for r in records)
    if total_aborted != len(population.eligible):
        problems.append(
            f"aborted across sweeps {total_aborted} != {len(population.eligible)} eligible uploads"
        )
    if total_freed != population.eligible_bytes:
        problems.append(
            f"freedBytes across sweeps {total_freed} != {population.eligible_bytes} eligible bytes"
        )
    return problems


def sweep_with_truth(
    s3: Any,
    population: Population,
    run: Callable[[], dict[str, Any]],
) -> tuple[SweepRecord, set[str]]:
    """One sweep while the active uploads are being written, and the store's truth around it."""
    before = listed_ids(s3, population.bucket) & set(population.eligible)
    with writers_at_work(s3, population):
        summary = run()
    listed_after = listed_ids(s3, population.bucket)
    return SweepRecord(summary, before, listed_after & set(population.eligible)), listed_after


def short(summary: dict[str, Any]) -> dict[str, Any]:
    """The counts of a summary, for messages and the run's report."""
    keys = (
        "scanned",
        "eligible",
        "aborted",
        "skippedActive",
        "alreadyGone",
        "replaced",
        "deferred",
        "failed",
        "freedBytes",
        "reason",
    )
    out = {key: summary[key] for key in keys}
    if summary.get("errors"):
        out["errors"] = [error["message"][:200] for error in summary["errors"][:5]]
    return out
