"""Requests per aborted upload and engine CPU per upload, per store profile, on real servers.

For each store that runs here (MinIO with the MinIO profile, Ceph RGW with the Ceph profile,
moto's S3 server with the AWS profile), seeds a bucket with N uploads of one small part plus a
few the policy keeps (another prefix), and runs one Abort sweep in this process through
``open_store`` and ``run_sweep``. The store's request observer counts every HTTP attempt by
operation; CPU is this process's (the engine and the S3 client; the servers run in their own
processes, except moto, which runs in threads of this one and is therefore left out of the CPU
column). Each run is checked: every seeded upload aborted, the freed bytes exact, the kept
uploads still there.

    PYTHONPATH=.:operator python bench/bench_per_store.py --uploads 500
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3

from mpu_janitor.policy import parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.sweep import run_sweep
from tests.integration.helpers import open_uploads

PART = 100
KEPT = 5


@dataclass
class StoreRun:
    store: str
    uploads: int
    seconds: float
    cpu_seconds: float | None
    requests: Counter[str]
    ok: bool
    problem: str = ""


def seed(s3: Any, bucket: str, count: int) -> None:
    def one(index: int) -> None:
        key = f"tmp/{index:06d}"
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * PART)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))
    for index in range(KEPT):
        s3.create_multipart_upload(Bucket=bucket, Key=f"keep/{index}")


def sweep(
    label: str,
    endpoint: str,
    profile: str,
    credentials: StoreCredentials,
    s3: Any,
    count: int,
    older_than: str,
    with_cpu: bool,
) -> StoreRun:
    bucket = "perstore-" + re.sub("[^a-z0-9]", "", label.lower())
    s3.create_bucket(Bucket=bucket)
    seed(s3, bucket, count)
    time.sleep(2.5)
    policy = parse_policy(
        {
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": {
                "store": {
                    "type": "S3",
                    "s3": {"endpoint": endpoint, "profile": profile, "buckets": [bucket]},
                },
                "match": {"olderThan": older_than, "quietPeriod": "0s", "prefixes": ["tmp/"]},
                "limits": {"requestsPerSecond": 10_000, "maxAbortsPerSweep": 10_000_000},
            },
        }
    )
    requests: Counter[str] = Counter()
    store = open_store(policy.store, credentials, lambda op, code: requests.update([op]))
    started, cpu = time.perf_counter(), time.process_time()
    try:
        result = run_sweep(policy, store)
    finally:
        store.close()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    summary = result.summary()
    left = {key for key, _ in open_uploads(s3, bucket)}
    problems = []
    if summary["aborted"] != count or summary["freedBytes"] != count * PART:
        problems.append(f"aborted {summary['aborted']}, freed {summary['freedBytes']}")
    if left != {f"keep/{index}" for index in range(KEPT)}:
        problems.append(f"left {len(left)} uploads, expected the {KEPT} kept")
    return StoreRun(
        label,
        count,
        seconds,
        cpu_seconds if with_cpu else None,
        requests,
        not problems,
        "; ".join(problems),
    )


def client(endpoint: str, key: str, secret: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=500)
    parser.add_argument("--stores", default="MinIO,Ceph,AWS")
    args = parser.parse_args(argv)
    runs: list[StoreRun] = []
    wanted = args.stores.split(",")
    runners: dict[str, Callable[[], StoreRun]] = {}

    def minio() -> StoreRun:
        from tests.support.minio import MinioServer

        server = MinioServer().start()
        try:
            time.sleep(1)
            creds = StoreCredentials(server.access_key, server.secret_key)
            s3 = server.client()
            return sweep("MinIO", server.endpoint, "MinIO", creds, s3, args.uploads, "1s", True)
        finally:
            server.stop()

    def ceph() -> StoreRun:
        from tests.support.ceph import CephCluster

        cluster = CephCluster().start()
        try:
            creds = StoreCredentials(cluster.access_key, cluster.secret_key)
            s3 = client(cluster.endpoint, cluster.access_key, cluster.secret_key)
            return sweep("Ceph", cluster.endpoint, "Ceph", creds, s3, args.uploads, "1s", True)
        finally:
            cluster.stop()

    def aws() -> StoreRun:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            creds = StoreCredentials("test", "test")
            s3 = client(endpoint, "test", "test")
            # moto answers a fixed Initiated of 2010: every upload is old.
            return sweep("AWS (moto)", endpoint, "AWS", creds, s3, args.uploads, "1d", False)
        finally:
            server.stop()

    runners = {"MinIO": minio, "Ceph": ceph, "AWS": aws}
    for name in wanted:
        run = runners[name]()
        runs.append(run)
        print(f"  {run.store}: {run.seconds:.1f} s", file=sys.stderr, flush=True)
    print("| store | uploads | requests/upload | engine CPU us/upload | requests | checked |")
    print("|---|---:|---:|---:|---|:-:|")
    for run in runs:
        ops = ", ".join(f"{op} {n:,}" for op, n in sorted(run.requests.items()))
        cpu = "-" if run.cpu_seconds is None else f"{1e6 * run.cpu_seconds / run.uploads:,.0f}"
        print(
            f"| {run.store} | {run.uploads:,} | {sum(run.requests.values()) / run.uploads:.2f} "
            f"| {cpu} | {ops} | {'yes' if run.ok else 'NO: ' + run.problem} |"
        )
    return 0 if all(run.ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
