"""Sweeps through the real toxiproxy between the engine and MinIO: latency, connections reset
(after a while, or once a connection has carried so many bytes: mid-response), connections that
stall then close, slow closes. While a toxic is on, every sweep keeps its promises; once it is
removed, at most two more sweeps reach the true end state with exact totals.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

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
from tests.support.minio import MinioServer
from tests.support.toxiproxy import Proxy

pytestmark = pytest.mark.reliability

# name -> toxics: (toxiproxy type, stream, toxicity, attributes)
TOXICS: dict[str, list[tuple[str, str, float, dict[str, Any]]]] = {
    "latency": [
        ("latency", "downstream", 1.0, {"latency": 25, "jitter": 20}),
        ("latency", "upstream", 1.0, {"latency": 10, "jitter": 5}),
    ],
    # A third of the connections reset (RST) 300 ms after they open, whatever they carry.
    "reset_peer": [("reset_peer", "downstream", 0.3, {"timeout": 300})],
    # Every connection closed once it carried a few KiB more than one whole listing of the
    # bucket (set at run time, see LISTING_MARGIN): a fresh connection carries the listing,
    # a used one is cut in the middle of an answer.
    "limit_data": [("limit_data", "downstream", 1.0, {})],
    # A fifth of the connections stop carrying data and close after 500 ms.
    "timeout": [("timeout", "downstream", 0.2, {"timeout": 500})],
    "slow_close": [("slow_close", "downstream", 1.0, {"delay": 300})],
}
LISTING_MARGIN = 8192
# One connection at a time for limit_data, so each carries far more than its limit (the
# sweep's ~900 answers are ~4 listings' worth of bytes): with 4, each carried about as much as
# its limit and some runs cut nothing.
CONCURRENCY = {"limit_data": 1}
# Toxics that break requests (the others only slow them down).
BREAKING = {"reset_peer", "limit_data", "timeout"}


@pytest.fixture(scope="module")
def populations(minio: MinioServer) -> Iterator[dict[str, Population]]:
    """One bucket per toxic, made at once so their parts age past the quiet period together."""
    s3 = minio.client()
    made: dict[str, Population] = {}
    for name in TOXICS:
        bucket = f"tox-{name.replace('_', '-')}"
        s3.create_bucket(Bucket=bucket)
        made[name] = make_population(
            s3, bucket, eligible=300, other_prefix=20, excluded=20, active=10
        )
    wait_until_quiet(max(made.values(), key=lambda p: p.last_eligible_part))
    yield made


OK_CODES = ("200", "204", "404")


@pytest.mark.parametrize("name", list(TOXICS))
def test_sweeps_through_toxics(
    name: str,
    minio: MinioServer,
    s3: Any,
    toxic_proxy: Proxy,
    populations: dict[str, Population],
    report: dict[str, Any],
) -> None:
    population = populations[name]
    doc = fault_policy(
        toxic_proxy.endpoint, population.bucket, concurrency=CONCURRENCY.get(name, 32)
    )
    attempts: Counter[tuple[str, str]] = Counter()

    def observe(operation: str, code: str) -> None:
        attempts[(operation, code)] += 1

    def run() -> dict[str, Any]:
        return sweep_once(minio, doc, observe).summary()

    for index, (kind, stream, toxicity, attributes) in enumerate(TOXICS[name]):
        if kind == "limit_data":
            listing = s3.list_multipart_uploads(Bucket=population.bucket)["ResponseMetadata"]
            attributes = {"bytes": int(listing["HTTPHeaders"]["content-length"]) + LISTING_MARGIN}
            report["limit_data_bytes"] = attributes["bytes"]
        toxic_proxy.add_toxic(
            f"{kind}-{index}", kind, stream=stream, toxicity=toxicity, **attributes
        )
    problems: list[str] = []
    records: list[SweepRecord] = []
    started = time.monotonic()
    record, listed = sweep_with_truth(s3, population, run)
    records.append(record)
    report["toxic"] = name
    report["toxic_sweep"] = {
        "seconds": round(time.monotonic() - started, 1),
        "summary": short(record.summary),
        "attempts": {f"{op} {code}": n for (op, code), n in sorted(attempts.items())},
    }
    problems += [f"sweep 1 ({name}): {p}" for p in check_sweep(population, record, listed)]

    toxic_proxy.clear_toxics()
    report["extra_sweeps"] = []
    for number in range(2, 2 + MAX_EXTRA_SWEEPS):
        record, listed = sweep_with_truth(s3, population, run)
        records.append(record)
        report["extra_sweeps"].append(short(record.summary))
        problems += [f"sweep {number}: {p}" for p in check_sweep(population, record, listed)]
        if not set(population.eligible) & listed:
            break
    problems += check_end_state(population, records, listed)
    report["problems"] = problems
    assert not problems, "\n".join(problems)
    if name in BREAKING:
        # Requests were broken and retried: attempts that got no usable answer (a connection
        # closed or reset, a timeout, a body cut short), each shown under its own code. (How
        # many requests a clean sweep sends depends on how many aborts its listings proved.)
        broken = {f"{op} {code}": n for (op, code), n in attempts.items() if code not in OK_CODES}
        assert broken, f"the {name} toxic broke no request: {report['toxic_sweep']}"
