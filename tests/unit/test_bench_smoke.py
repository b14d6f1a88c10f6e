"""The benchmarks still run and still count right (tiny N; correctness only, never time)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from bench.bench_engine_memory import MODES, run_one
from bench.bench_minio_sweep import (
    SETTLE_SECONDS,
    listing_memory,
    seed,
    timed_cli,
    timed_inventory,
    timed_sweep,
)
from bench.bench_side_by_side import PART_SIZE, janitor_policy, side_by_side, table
from bench.streaming_store import StreamingStore

from mpu_janitor.policy import Limits, parse_policy
from mpu_janitor.sweep import run_sweep
from tests.support.minio import MinioServer


def test_streaming_store_expectations_match_a_real_sweep() -> None:
    store = StreamingStore(1234, page_size=100)
    expected = store.expected()
    assert expected.scanned == 1234
    assert expected.skipped_active == 124  # indices 1, 11, ..., 1231
    assert expected.eligible == 1234 - 124 - 124  # minus the young (0, 10, ..., 1230)
    doc = {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "store": {"type": "S3", "s3": {"buckets": ["bench"]}},
            "match": {"olderThan": "1d", "quietPeriod": "5m"},
            "limits": {"requestsPerSecond": 10000, "concurrency": 4},
        },
    }
    result = run_sweep(parse_policy(doc), store).summary()
    assert result["aborted"] == expected.eligible
    assert result["freedBytes"] == expected.eligible_bytes
    assert result["skippedActive"] == expected.skipped_active
    assert store.pages == 13
    assert store.pending_aborts == 0


@pytest.mark.parametrize("mode", MODES)
def test_engine_benchmark_counts_are_exact(mode: str) -> None:
    run = run_one(mode, 2500, trace=True, concurrency=4)
    assert run.correct, run.detail
    assert run.peak_traced_bytes is not None and run.peak_traced_bytes > 0
    assert run.max_pending_aborts <= 4  # only workers abort: the store's state stays bounded
    calls = {"DryRun": 3 + 2500, "inventory": 3 + 2500, "Abort": 3 + 2500 + 2 * 2000}
    assert run.store_calls == calls[mode]


@pytest.fixture(scope="module")
def minio() -> Iterator[MinioServer]:
    server = MinioServer().start()
    yield server
    server.stop()


@pytest.mark.integration
def test_minio_benchmark_counts_requests_and_bytes(minio: MinioServer) -> None:
    s3 = minio.client()
    seeded = seed(s3, "smoke", 20, parts=2, part_size=100, workers=4)
    assert seeded.bytes == 20 * 2 * 100
    listing = listing_memory(minio, seeded)
    assert listing.uploads == 20 and listing.page_sizes == [20]
    time.sleep(SETTLE_SECONDS)
    inv = timed_inventory(minio, seeded)
    assert inv.ok and inv.uploads == 20
    assert inv.requests == 1 + 20
    dry = timed_sweep(minio, s3, seeded, "DryRun", 4, 10000)
    assert dry.bytes_ok, dry.summary
    assert dry.requests == 1 + 20  # one listing page, one ListParts each
    assert dry.page_sizes == [20]
    abort = timed_sweep(minio, s3, seeded, "Abort", 4, 10000)
    assert abort.bytes_ok, abort.summary
    # + abort each, one verifying listing that finds the bucket empty, and (since an empty
    # MinIO table could also be a restarted one) the verifying ListParts each.
    assert abort.requests == 1 + 3 * 20 + 1

    seeded = seed(s3, "smoke-cli", 10, parts=1, part_size=100, workers=4)
    time.sleep(SETTLE_SECONDS)
    cli = timed_cli(minio, s3, seeded, 4, 10000)
    assert cli.ok, cli.summary


@pytest.mark.integration
def test_side_by_side_benchmark_checks_and_counts_without_rclone() -> None:
    """The side-by-side bench at a tiny N, rclone left out (the tests never build rclone)."""
    report = side_by_side([(4, 12)], ["mpu-janitor", "bare"])
    assert report.ok, [run.problems for run in report.runs]
    janitor, bare = report.runs
    assert (janitor.tool, bare.tool) == ("mpu-janitor", "bare")
    assert janitor.detail["freedBytes"] == 12 * PART_SIZE
    # Counted by MinIO: one listing, then ListParts and abort each; one verifying listing finds
    # the bucket empty (as a restarted MinIO's would be): the verifying ListParts each.
    assert janitor.requests == {
        "ListMultipartUploads": 2,
        "ListObjectParts": 2 * 12,
        "AbortMultipartUpload": 12,
    }
    assert bare.requests == {"ListMultipartUploads": 1, "AbortMultipartUpload": 12}
    lines = table(report)
    assert len(lines) == 2 + 2 and "| mpu-janitor sweep | 4 ms | 12 |" in lines[2]


def test_side_by_side_default_run_sweeps_with_the_default_concurrency() -> None:
    """The default run is compared with the bare client at the default concurrency: its policy
    carries no cap of its own (the tests' policy helper sets 8), and the 64 run carries 64."""
    default = parse_policy(janitor_policy("http://127.0.0.1:9", "bucket", None))
    assert default.limits.concurrency == Limits().concurrency
    capped = parse_policy(janitor_policy("http://127.0.0.1:9", "bucket", 64))
    assert capped.limits.concurrency == 64
