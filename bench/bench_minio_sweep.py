"""Sweeps of a real MinIO: uploads/s, requests/s and wall time at a few limits settings.

Starts MinIO on 127.0.0.1 (tests/support/minio.py), and for each ``concurrency:requestsPerSecond``
setting seeds a fresh bucket with N incomplete uploads (small parts, seeded by a thread pool),
then times a DryRun sweep and an Abort sweep of it through the engine (``run_sweep`` over
``open_store``), counting every store request with the store's request observer. The bytes
the DryRun calls eligible and the bytes the Abort sweep frees must both equal the seeded bytes,
and no upload may be left. It also records the size of every listing page and the peak memory
of the listing alone (``--listing-probe N`` repeats that on a bucket of N uploads). Finally it
times the CLI end to end once (``mpu-janitor sweep -f POLICY --output json``, a new interpreter
included).

    PYTHONPATH=.:operator python bench/bench_minio_sweep.py
    PYTHONPATH=.:operator python bench/bench_minio_sweep.py --uploads 5000 --settings 16:10000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mpu_janitor.policy import Mode
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import Pace, Store, StoreCredentials, UploadPage, unpaced
from mpu_janitor.sweep import inventory, run_sweep
from tests.integration.helpers import (
    last_json,
    make_upload,
    open_uploads,
    policy_doc,
    run_cli,
    to_policy,
    write_policy,
)
from tests.support.minio import MinioServer

DEFAULT_SETTINGS = "4:10000,16:10000,32:10000,16:200"
OLDER_THAN = "1s"
SETTLE_SECONDS = 2.5  # MinIO's Date header has 1 s resolution: wait until every upload is old


class RequestCounter:
    """The store's request observer: counts (operation, code) from any worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[str, str]] = Counter()

    def __call__(self, operation: str, code: str) -> None:
        with self._lock:
            self.counts[(operation, code)] += 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def by_operation(self) -> str:
        with self._lock:
            ops: Counter[str] = Counter()
            for (operation, code), n in self.counts.items():
                ops[f"{operation}:{code}"] += n
        return " ".join(f"{name}={n}" for name, n in sorted(ops.items()))


class PageCounter:
    """A Store that passes everything through and records the size of each listing page."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.page_sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        for page in self.store.list_uploads(container, prefixes):
            self.page_sizes.append(len(page.uploads))
            yield page


@dataclass
class Seeded:
    bucket: str
    uploads: int
    bytes: int
    seconds: float


@dataclass
class SweepRun:
    mode: str
    concurrency: int
    rate: float
    uploads: int
    seconds: float
    requests: int
    operations: str
    summary: dict[str, Any] = field(repr=False)
    expected_bytes: int
    left_over: int
    page_sizes: list[int]

    @property
    def uploads_per_second(self) -> float:
        return self.uploads / self.seconds if self.seconds else 0.0

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def bytes_ok(self) -> bool:
        s = self.summary
        if s["failed"] or s["eligible"] != self.uploads:
            return False
        if s["eligibleBytes"] != self.expected_bytes:
            return False
        if self.mode == "DryRun":
            return s["aborted"] == 0 and s["freedBytes"] == 0 and self.left_over == self.uploads
        return (
            s["aborted"] == self.uploads
            and s["freedBytes"] == self.expected_bytes
            and self.left_over == 0
        )


def credentials(minio: MinioServer) -> StoreCredentials:
    return StoreCredentials(access_key_id=minio.access_key, secret_access_key=minio.secret_key)


def seed(s3: Any, bucket: str, count: int, *, parts: int, part_size: int, workers: int) -> Seeded:
    """A fresh bucket with ``count`` incomplete uploads of ``parts`` parts each."""
    s3.create_bucket(Bucket=bucket)
    sizes = [part_size] * parts
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        ids = list(
            pool.map(lambda i: make_upload(s3, bucket, f"tmp/{i:07d}.bin", sizes), range(count))
        )
    seconds = time.perf_counter() - started
    if len(set(ids)) != count:
        raise RuntimeError(f"seeded {len(set(ids))} distinct uploads, wanted {count}")
    return Seeded(bucket, count, count * parts * part_size, seconds)


def doc_for(minio: MinioServer, bucket: str, mode: str, concurrency: int, rate: float) -> Any:
    return policy_doc(
        minio.endpoint,
        [bucket],
        mode=mode,
        match={"olderThan": OLDER_THAN, "quietPeriod": "0s"},
        limits={
            "requestsPerSecond": rate,
            "concurrency": concurrency,
            "maxAbortsPerSweep": 10_000_000,
        },
    )


def timed_sweep(
    minio: MinioServer, s3: Any, seeded: Seeded, mode: str, concurrency: int, rate: float
) -> SweepRun:
    policy = to_policy(doc_for(minio, seeded.bucket, mode, concurrency, rate))
    if mode == "DryRun":
        policy = replace(policy, mode=Mode.DRY_RUN)
    counter = RequestCounter()
    store = PageCounter(open_store(policy.store, credentials(minio), counter))
    try:
        started = time.perf_counter()
        result = run_sweep(policy, store)
        seconds = time.perf_counter() - started
    finally:
        store.close()
    return SweepRun(
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        uploads=seeded.uploads,
        seconds=seconds,
        requests=counter.total,
        operations=counter.by_operation(),
        summary=result.summary(),
        expected_bytes=seeded.bytes,
        left_over=len(open_uploads(s3, seeded.bucket)),
        page_sizes=store.page_sizes,
    )


@dataclass
class Listing:
    uploads: int
    page_sizes: list[int]
    peak_traced_bytes: int


def listing_memory(minio: MinioServer, seeded: Seeded) -> Listing:
    """Peak traced memory of the store's listing alone (no sweep): what one page costs."""
    policy = to_policy(doc_for(minio, seeded.bucket, "DryRun", 1, 10_000))
    store = open_store(policy.store, credentials(minio))
    sizes: list[int] = []
    try:
        tracemalloc.start()
        for page in store.list_uploads(seeded.bucket, policy.match.prefixes):
            sizes.append(len(page.uploads))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        store.close()
    return Listing(sum(sizes), sizes, peak)


@dataclass
class InventoryRun:
    uploads: int
    bytes: int
    seconds: float
    requests: int
    expected_bytes: int

    @property
    def ok(self) -> bool:
        return self.bytes == self.expected_bytes


def timed_inventory(minio: MinioServer, seeded: Seeded) -> InventoryRun:
    """``inventory()`` (what ``mpu-janitor list`` prints) over the whole bucket."""
    policy = to_policy(doc_for(minio, seeded.bucket, "DryRun", 16, 10_000))
    counter = RequestCounter()
    store = open_store(policy.store, credentials(minio), counter)
    count = size = 0
    try:
        started = time.perf_counter()
        for item in inventory(policy, store):
            count += 1
            size += item.size_bytes
        seconds = time.perf_counter() - started
    finally:
        store.close()
    return InventoryRun(count, size, seconds, counter.total, seeded.bytes)


@dataclass
class CliRun:
    concurrency: int
    rate: float
    seconds: float
    startup_seconds: float
    exit_code: int
    summary: dict[str, Any]
    expected_bytes: int
    uploads: int
    left_over: int

    @property
    def ok(self) -> bool:
        s = self.summary
        return (
            self.exit_code == 0
            and s.get("aborted") == self.uploads
            and s.get("freedBytes") == self.expected_bytes
            and self.left_over == 0
        )


def timed_cli(minio: MinioServer, s3: Any, seeded: Seeded, concurrency: int, rate: float) -> CliRun:
    """``mpu-janitor sweep -f POLICY --output json`` (Abort) as a user runs it."""
    env = minio.env()
    # What every CLI run pays before its first request: the interpreter and the imports.
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import mpu_janitor.cli, mpu_janitor.stores.s3, boto3"],
        check=True,
    )
    startup = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="mpu-janitor-bench-") as tmp:
        path = write_policy(Path(tmp), doc_for(minio, seeded.bucket, "Abort", concurrency, rate))
        started = time.perf_counter()
        done = run_cli("sweep", "-f", str(path), "--output", "json", env=env)
        seconds = time.perf_counter() - started
    summary = last_json(done.stdout) if done.stdout.strip() else {}
    return CliRun(
        concurrency=concurrency,
        rate=rate,
        seconds=seconds,
        startup_seconds=startup,
        exit_code=done.returncode,
        summary=summary,
        expected_bytes=seeded.bytes,
        uploads=seeded.uploads,
        left_over=len(open_uploads(s3, seeded.bucket)),
    )


def parse_settings(text: str) -> list[tuple[int, float]]:
    settings = []
    for item in text.split(","):
        concurrency, rate = item.split(":")
        settings.append((int(concurrency), float(rate)))
    return settings


def print_runs(runs: list[SweepRun]) -> None:
    header = (
        f"{'mode':<7}{'conc':>5}{'rps limit':>10}{'uploads':>8}{'wall s':>8}"
        f"{'uploads/s':>10}{'requests':>9}{'req/s':>8}{'list pages':>11}{'largest':>8}  bytes ok"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        print(
            f"{run.mode:<7}{run.concurrency:>5}{run.rate:>10,.0f}{run.uploads:>8,}"
            f"{run.seconds:>8.2f}{run.uploads_per_second:>10,.0f}{run.requests:>9,}"
            f"{run.requests_per_second:>8,.0f}{len(run.page_sizes):>11}"
            f"{max(run.page_sizes, default=0):>8,}  {'yes' if run.bytes_ok else 'NO'}"
        )
        if not run.bytes_ok:
            print(f"    {run.summary} expected {run.expected_bytes} B, left {run.left_over}")
    print("\nrequests by operation:code")
    for run in runs:
        print(f"  {run.mode:<7} c={run.concurrency:<3} rps={run.rate:<6g} {run.operations}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=2000, help="uploads per bucket")
    parser.add_argument("--parts", type=int, default=2, help="parts per upload")
    parser.add_argument("--part-size", type=int, default=1024, help="bytes per part")
    parser.add_argument("--seed-workers", type=int, default=16, help="seeding threads")
    parser.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help="comma-separated concurrency:requestsPerSecond (default %(default)s)",
    )
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI end-to-end run")
    parser.add_argument(
        "--listing-probe",
        type=int,
        default=0,
        metavar="N",
        help="also measure the listing's memory on a bucket of N part-less uploads",
    )
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)

    minio = MinioServer().start()
    print(
        f"MinIO {minio.endpoint} ({minio.binary.name}); {args.uploads:,} uploads x "
        f"{args.parts} parts x {args.part_size} B per bucket; Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs (MinIO shares them)"
    )
    runs: list[SweepRun] = []
    seeds: list[Seeded] = []
    listings: list[Listing] = []
    inventories: list[InventoryRun] = []
    cli: CliRun | None = None
    try:
        s3 = minio.client()
        for number, (concurrency, rate) in enumerate(settings, start=1):
            seeded = seed(
                s3,
                f"bench-{number}",
                args.uploads,
                parts=args.parts,
                part_size=args.part_size,
                workers=args.seed_workers,
            )
            seeds.append(seeded)
            if number == 1:
                listings.append(listing_memory(minio, seeded))
                inventories.append(timed_inventory(minio, seeded))
            time.sleep(SETTLE_SECONDS)
            for mode in ("DryRun", "Abort"):
                run = timed_sweep(minio, s3, seeded, mode, concurrency, rate)
                runs.append(run)
                print(
                    f"  {mode} c={concurrency} rps={rate:g}: {run.seconds:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
        if args.listing_probe:
            probe = seed(s3, "bench-listing", args.listing_probe, parts=0, part_size=0, workers=16)
            seeds.append(probe)
            listings.append(listing_memory(minio, probe))
        if not args.no_cli:
            concurrency, rate = settings[0] if len(settings) == 1 else (16, 10_000)
            seeded = seed(
                s3,
                "bench-cli",
                args.uploads,
                parts=args.parts,
                part_size=args.part_size,
                workers=args.seed_workers,
            )
            seeds.append(seeded)
            time.sleep(SETTLE_SECONDS)
            cli = timed_cli(minio, s3, seeded, concurrency, rate)
    finally:
        minio.stop()

    print()
    for seeded in seeds:
        rate = seeded.uploads / seeded.seconds if seeded.seconds else 0.0
        print(
            f"seeded {seeded.bucket}: {seeded.uploads:,} uploads, {seeded.bytes:,} B "
            f"in {seeded.seconds:.1f}s ({rate:,.0f} uploads/s, {args.seed_workers} threads)"
        )
    print()
    for listing in listings:
        print(
            f"listing alone (store.list_uploads): {listing.uploads:,} uploads in "
            f"{len(listing.page_sizes)} page(s), largest {max(listing.page_sizes, default=0):,}; "
            f"peak traced {listing.peak_traced_bytes / 2**20:.1f} MiB "
            f"({listing.peak_traced_bytes / max(listing.uploads, 1):,.0f} B/upload)"
        )
    for inv in inventories:
        print(
            f"inventory(): {inv.uploads:,} uploads, {inv.bytes:,} B in {inv.seconds:.2f}s "
            f"({inv.uploads / inv.seconds:,.0f} uploads/s, {inv.requests / inv.seconds:,.0f} "
            f"req/s, one request at a time): {'ok' if inv.ok else 'BYTES DIFFER'}"
        )
    print()
    print_runs(runs)
    ok = all(run.bytes_ok for run in runs) and all(inv.ok for inv in inventories)
    if cli is not None:
        print(
            f"\nCLI end to end (Abort, c={cli.concurrency} rps={cli.rate:g}): "
            f"{cli.seconds:.2f}s wall for "
            f"{cli.uploads:,} uploads ({cli.uploads / cli.seconds:,.0f} uploads/s), of which "
            f"~{cli.startup_seconds:.2f}s is starting Python and importing (boto3 included); "
            f"exit {cli.exit_code}, aborted {cli.summary.get('aborted')}, freedBytes "
            f"{cli.summary.get('freedBytes')} (seeded {cli.expected_bytes}): "
            f"{'ok' if cli.ok else 'NOT OK'}"
        )
        ok = ok and cli.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
