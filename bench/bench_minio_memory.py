"""Peak memory of a whole sweep of a MinIO bucket, for several bucket sizes.

MinIO answers ListMultipartUploads with every upload of the bucket in one response, whatever
max-uploads says. This seeds a bucket with N part-less incomplete uploads for each N, then runs
``mpu-janitor sweep -f POLICY --output json`` (Abort, the default limits but the request rate at
its ceiling) as a fresh process and reads its peak RSS from the kernel: the CLI's own
``VmHWM`` (the whole process, interpreter, botocore, listing and engine), which it writes as it
exits. Not ``ru_maxrss`` from ``os.wait4``: a process spawned by ``posix_spawn`` (or forked)
keeps its parent's high-water mark across ``exec``, so that figure was this bench's own peak
after seeding N uploads whenever it was the larger (until 2026-11-22 it reported 120 MiB for a
40,000-upload sweep that peaked at 68 MiB). Each run is checked:
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
from typing import Any

from bench.bench_side_by_side import MinioRequests, process_cpu

from tests.integration.helpers import last_json, open_uploads, policy_doc, write_policy
from tests.support.minio import MinioServer

SETTLE_SECONDS = 2.5
POLL_SECONDS = 0.05
# Runs the CLI as ``python -m mpu_janitor.cli`` would, and writes the process's peak RSS (kB) to
# the file named by MPU_JANITOR_BENCH_PEAK_FILE as it exits.
PEAK_REPORTING_MAIN = """
import atexit, os, runpy, sys

def report():
    with open("/proc/self/status", encoding="ascii") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["MPU_JANITOR_BENCH_PEAK_FILE"], "w", encoding="ascii") as out:
        out.write(peak)

atexit.register(report)
sys.argv[0] = "mpu_janitor.cli"
runpy.run_module("mpu_janitor.cli", run_name="__main__", alter_sys=True)
"""


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


@dataclass
class Child:
    status: int  # as os.wait4 gives it
    usage: Any  # resource.struct_rusage
    peak_mib: float  # the CLI's own VmHWM
    stdout: str
    stderr: str


def run_measured(args: list[str], env: dict[str, str]) -> Child:
    """``python -m mpu_janitor.cli ARGS`` as a fresh process: its exit status, CPU, output and
    its own peak RSS (``VmHWM``, written as it exits; while it runs it is also polled, for a
    process that ends without running its exit handlers)."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(prefix="mpu-janitor-peak-") as peak_file,
    ):
        argv = [sys.executable, "-c", PEAK_REPORTING_MAIN, *args]
        pid = os.posix_spawn(
            argv[0],
            argv,
            {**env, "MPU_JANITOR_BENCH_PEAK_FILE": peak_file.name},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
            ],
        )
        polled = 0
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            polled = max(polled, vm_hwm_kib(pid))
            time.sleep(POLL_SECONDS)
        reported = Path(peak_file.name).read_text(encoding="ascii").strip()
        out.seek(0)
        err.seek(0)
        peak_kib = int(reported) if reported.isdigit() else polled
        return Child(status, usage, peak_kib / 1024, out.read().decode(), err.read().decode())


def vm_hwm_kib(pid: int) -> int:
    """A running process's peak RSS so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


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
        argv = ["sweep", "-f", str(path), "--output", "json"]
        before, minio_before = counters.read(), process_cpu(minio.process.pid)
        started = time.perf_counter()
        child = run_measured(argv, env)
        seconds = time.perf_counter() - started
        status, usage, peak_mib = child.status, child.usage, child.peak_mib
        stdout, stderr = child.stdout, child.stderr
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
        peak_mib,
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
