"""Sweeps through an HTTP fault layer in front of MinIO: 10% of the sweep's requests answered
503 SlowDown or 500 InternalError, or forwarded to MinIO and their answer lost (the connection
dropped after MinIO acted). The store's listing is the truth every count is checked against.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.helpers import last_json, run_cli, write_policy
from tests.reliability.helpers import (
    MAX_EXTRA_SWEEPS,
    Population,
    SweepRecord,
    check_end_state,
    check_sweep,
    fault_policy,
    make_population,
    short,
    sweep_once,
    sweep_with_truth,
    wait_until_quiet,
)
from tests.support.fault_proxy import CUT_BODY, FAULT_KINDS, FaultProxy, describe
from tests.support.minio import MinioServer

pytestmark = pytest.mark.reliability


def untouched_outside_policy(proxy: FaultProxy, population: Population) -> list[str]:
    """What reached MinIO for uploads the policy does not cover: nothing for those out of
    scope, no abort for the active ones."""
    _, forwarded = proxy.snapshot()
    problems = []
    for request in forwarded:
        if request.upload_id in population.out_of_scope:
            problems.append(f"{request.operation} sent for out-of-scope {request.key}")
        if request.upload_id in population.active and request.operation == "AbortMultipartUpload":
            problems.append(f"abort sent for active {request.key}")
    return problems[:10]


def sweeps_until_done(
    s3: Any,
    population: Population,
    proxy: FaultProxy,
    run: Any,
    report: dict[str, Any],
) -> None:
    """One sweep with faults, then up to MAX_EXTRA_SWEEPS without: check every promise."""
    problems: list[str] = []
    records: list[SweepRecord] = []
    started = time.monotonic()
    record, listed = sweep_with_truth(s3, population, run)
    records.append(record)
    counts, _ = proxy.snapshot()
    report["faulted_sweep"] = {
        "seconds": round(time.monotonic() - started, 1),
        "summary": short(record.summary),
        "faults_by_kind": proxy.faults_by_kind(),
        "requests": describe(counts),
        "eligible_gone": len(record.gone),
    }
    problems += [f"sweep 1 (faults): {p}" for p in check_sweep(population, record, listed)]
    problems += untouched_outside_policy(proxy, population)

    proxy.set_faults(False)
    report["extra_sweeps"] = []
    for number in range(2, 2 + MAX_EXTRA_SWEEPS):
        record, listed = sweep_with_truth(s3, population, run)
        records.append(record)
        report["extra_sweeps"].append(short(record.summary))
        problems += [f"sweep {number}: {p}" for p in check_sweep(population, record, listed)]
        if not set(population.eligible) & listed:
            break
    problems += untouched_outside_policy(proxy, population)
    problems += check_end_state(population, records, listed)
    report["problems"] = problems
    assert not problems, "\n".join(problems)


def test_ten_percent_faults_over_five_thousand_uploads(
    minio: MinioServer, s3: Any, bucket: str, fault_proxy: FaultProxy, report: dict[str, Any]
) -> None:
    started = time.monotonic()
    population = make_population(
        s3, bucket, eligible=4600, other_prefix=150, excluded=150, active=100
    )
    report["setup_seconds"] = round(time.monotonic() - started, 1)
    wait_until_quiet(population)
    doc = fault_policy(fault_proxy.endpoint, bucket)

    sweeps_until_done(s3, population, fault_proxy, lambda: sweep_once(minio, doc).summary(), report)

    faults = report["faulted_sweep"]["faults_by_kind"]
    assert set(faults) == set(FAULT_KINDS) and all(faults[kind] > 0 for kind in FAULT_KINDS)


def test_cli_sweep_through_faults(
    minio: MinioServer,
    s3: Any,
    bucket: str,
    fault_proxy: FaultProxy,
    report: dict[str, Any],
    tmp_path: Any,
) -> None:
    population = make_population(s3, bucket, eligible=1000, other_prefix=50, excluded=50, active=30)
    wait_until_quiet(population)
    path = write_policy(tmp_path, fault_policy(fault_proxy.endpoint, bucket))
    exits: list[int] = []

    def run() -> dict[str, Any]:
        done = run_cli("sweep", "-f", str(path), "--output", "json", env=minio.env())
        exits.append(done.returncode)
        return last_json(done.stdout)

    sweeps_until_done(s3, population, fault_proxy, run, report)
    report["exit_codes"] = exits
    assert exits[-1] == 0


def test_a_throttled_listing_is_retried_not_the_end_of_the_bucket(
    minio: MinioServer, s3: Any, bucket: str, fault_proxy: FaultProxy, report: dict[str, Any]
) -> None:
    # Every try of one ListMultipartUploads call (botocore's first attempt and its 4 retries)
    # answered SlowDown: the engine must retry that page like any throttled call.
    population = make_population(s3, bucket, eligible=200, other_prefix=20, excluded=20, active=10)
    wait_until_quiet(population)
    fault_proxy.force("ListMultipartUploads", "slowdown", 5)
    doc = fault_policy(fault_proxy.endpoint, bucket)

    sweeps_until_done(s3, population, fault_proxy, lambda: sweep_once(minio, doc).summary(), report)


def test_an_abort_whose_answers_are_all_lost_is_counted_once_verified(
    minio: MinioServer, s3: Any, bucket: str, fault_proxy: FaultProxy, report: dict[str, Any]
) -> None:
    # MinIO aborts the upload on the first try; that answer and the answers to all 4 retries
    # are lost. The upload is gone, freed by this sweep: a parts listing proves it.
    population = make_population(s3, bucket, eligible=200, other_prefix=20, excluded=20, active=10)
    wait_until_quiet(population)
    victim = sorted(key for key, _ in population.eligible.values())[0]
    fault_proxy.force("AbortMultipartUpload", "drop_after", 5, key=victim)
    doc = fault_policy(fault_proxy.endpoint, bucket)

    sweeps_until_done(s3, population, fault_proxy, lambda: sweep_once(minio, doc).summary(), report)


def test_a_verifying_listing_cut_mid_answer_still_proves_the_abort(
    minio: MinioServer, s3: Any, bucket: str, fault_proxy: FaultProxy, report: dict[str, Any]
) -> None:
    # The parts listing that verifies one abort gets MinIO's 404 NoSuchUpload status and
    # headers but only half its XML body (as toxiproxy's limit_data cuts answers). The upload
    # is gone, freed by this sweep's abort: it must be counted freed, now or on a later sweep.
    population = make_population(s3, bucket, eligible=200, other_prefix=20, excluded=20, active=10)
    wait_until_quiet(population)
    victim = sorted(key for key, _ in population.eligible.values())[0]
    fault_proxy.force("ListParts", CUT_BODY, 1, key=victim, after=1)  # the measure passes
    doc = fault_policy(fault_proxy.endpoint, bucket)

    sweeps_until_done(s3, population, fault_proxy, lambda: sweep_once(minio, doc).summary(), report)
