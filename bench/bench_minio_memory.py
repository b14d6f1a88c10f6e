"""Peak memory of a whole sweep of a MinIO bucket, for several bucket sizes.

MinIO answers ListMultipartUploads with every upload of the bucket in one response, whatever
max-uploads says. This seeds a bucket with N part-less incomplete uploads for each N, then runs
``mpu-janitor sweep -f POLICY --output json`` (Abort, the default limits but the request rate at
its ceiling) as a fresh process and reads its peak RSS from the kernel (``ru_maxrss`` of
``os.wait4``): the whole process, interpreter, boto3, listing and engine. Each run is checked:
the CLI exited 0, ``aborted`` is N and the bucket is empty afterwards. Requests are counted by
MinIO itself, and the seeding rate is printed first, so the time a larger N takes here can be
estimated before asking for it.

    PYTHONPATH=.:operator python bench/bench_minio_memory.py --sizes 10000,30000
    PYTHONPATH=.:operator python bench/bench_minio_memory.py --code /tmp/old/operator  # other code

``--code DIR`` runs the CLI from another source root (for example an export of an earlier
commit, ``git archive COMMIT operator | tar -x -C /tmp/old``) to compare before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.bench_side_by_side import MinioRequests, process_cpu

from tests.integration.helpers import last_json, open_uploads, policy_doc, write_policy
from tests.support.minio import MinioServer

SETTLE_SECONDS = 2.5


@dataclass
class MemoryRun:
    uploads: int
    seed_seconds: float
    sweep_seconds: float
    peak_rss_mib: float
    cpu_seconds: float
    minio_cpu_seconds: float
    requests: dict[str, int]
    ok: bool
    problem: str = ""

    @property
    def requests_per_upload(self) -> float:
        return sum(self.requests.values()) / self.uploads


def seed(s3: object, bucket: str, count: int, workers: int = 16) -> float:
    """``count`` part-less uploads; the seconds it took."""
    started = time.perf_counter()

    def one(index: int) -> None:
        s3.create_multipart_upload(Bucket=bucket, Key=f"tmp/{index:07d}.bin")  # type: ignore[attr-defined]

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - started


def sweep(
    minio: MinioServer, bucket: str, uploads: int, code: Path | None, concurrency: int | None
) -> MemoryRun:
    doc = policy_doc(
        minio.endpoint,
        [bucket],
        match={"olderThan": "1s", "quietPeriod": "0s"},
        limits={"requestsPerSecond": 10_000, "maxAbortsPerSweep": 10_000_000},
    )
    doc["spec"]["limits"].pop("concurrency")  # the default, unless asked
    if concurrency is not None:
        doc["spec"]["limits"]["concurrency"] = concurrency
    env = {**os.environ, **minio.env()}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    counters = MinioRequests(minio.endpoint)
    assert minio.process is not None
    with tempfile.TemporaryDirectory(prefix="mpu-janitor-mem-") as tmp:
        path = write_policy(Path(tmp), doc)
        argv = [sys.executable, "-m", "mpu_janitor.cli", "sweep", "-f", str(path)]
        argv += ["--output", "json"]
        before, minio_before = counters.read(), process_cpu(minio.process.pid)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            pid = os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                    (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
                ],
            )
            _, status, usage = os.wait4(pid, 0)
            seconds = time.perf_counter() - started
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode()
    requests = dict(counters.read() - before)
    minio_cpu = process_cpu(minio.process.pid) - minio_before
    code_ = os.waitstatus_to_exitcode(status)
    summary = last_json(stdout) if stdout.strip() else {}
    left = len(open_uploads(minio.client(), bucket))
    problems = []
    if code_:
        problems.append(f"exit {code_}: {stderr.strip()[-300:]}")
    if summary.get("aborted") != uploads:
        problems.append(f"aborted {summary.get('aborted')} of {uploads}")
    if left:
        problems.append(f"{left} uploads left")
    return MemoryRun(
        uploads,
        0.0,
        seconds,
        usage.ru_maxrss / 1024,
        usage.ru_utime + usage.ru_stime,
        minio_cpu,
        requests,
        not problems,
        "; ".join(problems),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,30000", help="comma-separated N")
    parser.add_argument("--code", type=Path, help="the operator source root to run the CLI from")
    parser.add_argument("--concurrency", type=int, help="spec.limits.concurrency (default: unset)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    saved = os.environ.get("MINIO_PROMETHEUS_AUTH_TYPE")
    os.environ["MINIO_PROMETHEUS_AUTH_TYPE"] = "public"
    minio = MinioServer().start()
    if saved is None:
        del os.environ["MINIO_PROMETHEUS_AUTH_TYPE"]
    runs: list[MemoryRun] = []
    try:
        s3 = minio.client()
        for number, count in enumerate(sizes):
            bucket = f"mem-{number}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    s3.create_bucket(Bucket=bucket)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            seeded = seed(s3, bucket, count)
            print(
                f"  seeded {count:,} uploads in {seeded:.1f} s ({count / seeded:,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(SETTLE_SECONDS)
            run = sweep(minio, bucket, count, args.code, args.concurrency)
            run.seed_seconds = seeded
            runs.append(run)
            print(
                f"  swept {count:,} in {run.sweep_seconds:.1f} s, peak RSS "
                f"{run.peak_rss_mib:.1f} MiB" + ("" if run.ok else f"  NOT OK: {run.problem}"),
                file=sys.stderr,
                flush=True,
            )
    finally:
        minio.stop()
    print(
        "| uploads | seed s | sweep s | uploads/s | peak RSS MiB | requests/upload | "
        "CLI CPU us/upload | MinIO CPU us/upload | checked |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")
    for run in runs:
        print(
            f"| {run.uploads:,} | {run.seed_seconds:.0f} | {run.sweep_seconds:.1f} | "
            f"{run.uploads / run.sweep_seconds:,.0f} | {run.peak_rss_mib:.1f} | "
            f"{run.requests_per_upload:.2f} | {1e6 * run.cpu_seconds / run.uploads:,.0f} | "
            f"{1e6 * run.minio_cpu_seconds / run.uploads:,.0f} | {'yes' if run.ok else 'NO'} |"
        )
    for run in runs:
        ops = ", ".join(f"{api} {n:,}" for api, n in sorted(run.requests.items()))
        print(f"* {run.uploads:,}: MinIO counted {ops}.")
    if len(runs) > 1:
        print(
            f"* Peak RSS at {runs[-1].uploads:,} / at {runs[0].uploads:,}: "
            f"x{runs[-1].peak_rss_mib / runs[0].peak_rss_mib:.2f}"
        )
    return 0 if all(run.ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
