"""mpu-janitor against rclone and a bare concurrent client, on one MinIO behind added latency.

One MinIO (tests/support/minio.py) and one toxiproxy (tests/support/toxiproxy.py) in front of
it, with one proxy per round-trip time (RTT): a latency toxic of RTT/2 on the requests and
another on the responses. For each RTT, each tool gets its own fresh bucket of N incomplete
uploads of one part each (seeded directly, not through the proxy), older than a second, and
aborts them all through the proxy:

* ``rclone``: ``rclone backend cleanup bench:BUCKET -o max-age=1s`` (the remote configured by
  environment), one upload at a time;
* ``mpu-janitor``: ``mpu-janitor sweep -f POLICY --output json``, the CLI as a user runs it,
  with the default concurrency cap (64: the sweep starts at 16 and grows while the answers
  come as fast as unloaded) and verification; ``requestsPerSecond`` at its ceiling (10,000) so
  the pacer does not set the pace;
* ``mpu-janitor-16``: the same with ``concurrency: 16``, the bare client's threads: the
  equal-concurrency comparison;
* ``bare boto3``: one boto3 client in this process listing the bucket and aborting every upload
  from 16 threads: no ListParts, no bytes, no verification. What a client at the same
  concurrency can do at best.

Every run is checked: no incomplete upload left in the bucket, the tool exited 0, and for
mpu-janitor ``aborted`` and ``freedBytes`` equal to what was seeded. Requests are counted by
MinIO itself (its ``minio_api_requests_total`` counters, read before and after each run), CPU
from the kernel: the tool's process (``os.wait4``; this process's own for the bare client)
and MinIO's (``/proc/PID/stat``).

    PYTHONPATH=.:operator python bench/bench_side_by_side.py                  # ~3 min
    PYTHONPATH=.:operator python bench/bench_side_by_side.py --write-readme   # + bench/README.md
    PYTHONPATH=.:operator python bench/bench_side_by_side.py --rtts 20:200 --tools mpu-janitor,bare

rclone comes from ``scripts/build-binaries.sh rclone`` (optional, not built by the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config

from tests.integration.helpers import last_json, open_uploads, policy_doc, write_policy
from tests.support.controlplane import ensure_binaries
from tests.support.minio import MinioServer
from tests.support.toxiproxy import Proxy, Toxiproxy

TOOLS = ("rclone", "mpu-janitor", "mpu-janitor-16", "bare")
LABELS = {
    "rclone": "rclone backend cleanup",
    "mpu-janitor": "mpu-janitor sweep",
    "mpu-janitor-16": "mpu-janitor sweep, concurrency 16",
    "bare": "bare boto3",
}
DEFAULT_RTTS = "20:1000,100:500"
CONCURRENCY = 16  # the bare client's threads, and where a sweep's concurrency starts
PART_SIZE = 1024
SETTLE_SECONDS = 2.5  # MinIO's clock has 1 s resolution: every upload is older than 1 s after
README = Path(__file__).with_name("README.md")
BEGIN = "<!-- bench_side_by_side: begin (written by --write-readme) -->"
END = "<!-- bench_side_by_side: end -->"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Measuring


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def run_child(argv: Sequence[str], env: dict[str, str]) -> tuple[int, str, str, float, float]:
    """Run a command to its end: (exit code, stdout, stderr, wall seconds, CPU seconds)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (
            child.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            usage.ru_utime + usage.ru_stime,
        )


class MinioRequests:
    """MinIO's own request counters by S3 API, read over HTTP (the v3 metrics are live; the v2
    ones are cached for several seconds)."""

    LINE = re.compile(
        r'^minio_api_requests_total\{name="([^"]+)"[^}]*type="s3"[^}]*\}\s+([0-9.e+]+)$', re.M
    )

    def __init__(self, endpoint: str) -> None:
        self.url = f"{endpoint}/minio/metrics/v3/api/requests"

    def read(self) -> Counter[str]:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            text = response.read().decode()
        return Counter({api: int(float(n)) for api, n in self.LINE.findall(text)})


@dataclass
class Run:
    tool: str
    rtt_ms: int
    uploads: int
    seconds: float
    client_cpu: float  # seconds, the tool's process (interpreter start-up excluded for the CLI)
    minio_cpu: float
    requests: Counter[str]
    proxy_cpu: float = 0.0  # toxiproxy's: the bench's harness, not a cost a deployment pays
    problems: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def uploads_per_second(self) -> float:
        return self.uploads / self.seconds if self.seconds else 0.0

    @property
    def requests_per_upload(self) -> float:
        return sum(self.requests.values()) / self.uploads if self.uploads else 0.0


# --------------------------------------------------------------------------------------------
# The setting: MinIO, toxiproxy, seeded buckets


class Bench:
    """MinIO with public metrics, toxiproxy with one proxy per RTT, and a direct client."""

    def __init__(self) -> None:
        self.minio = MinioServer()
        self.toxiproxy: Toxiproxy | None = None
        self.proxies: dict[int, Proxy] = {}
        self.buckets = 0

    def __enter__(self) -> Bench:
        saved = os.environ.get("MINIO_PROMETHEUS_AUTH_TYPE")
        os.environ["MINIO_PROMETHEUS_AUTH_TYPE"] = "public"  # the request counters, unsigned
        try:
            self.minio.start()
        finally:
            if saved is None:
                del os.environ["MINIO_PROMETHEUS_AUTH_TYPE"]
            else:
                os.environ["MINIO_PROMETHEUS_AUTH_TYPE"] = saved
        self.toxiproxy = Toxiproxy().start()
        self.s3 = self.minio.client()
        self.counters = MinioRequests(self.minio.endpoint)
        assert self.minio.process is not None
        self.minio_pid = self.minio.process.pid
        assert self.toxiproxy.process is not None
        self.toxiproxy_pid = self.toxiproxy.process.pid
        return self

    def __exit__(self, *exc: object) -> None:
        if self.toxiproxy is not None:
            self.toxiproxy.stop()
        self.minio.stop()

    def proxy(self, rtt_ms: int) -> Proxy:
        """A proxy adding ``rtt_ms`` per round trip: half on the way in, half on the way out."""
        if rtt_ms not in self.proxies:
            assert self.toxiproxy is not None
            proxy = self.toxiproxy.proxy(f"rtt{rtt_ms}", f"127.0.0.1:{self.minio.port}")
            for stream in ("upstream", "downstream"):
                proxy.add_toxic(f"latency-{stream}", "latency", stream=stream, latency=rtt_ms // 2)
            self.proxies[rtt_ms] = proxy
        return self.proxies[rtt_ms]

    def new_bucket(self, label: str) -> str:
        self.buckets += 1
        bucket = f"{label}-{self.buckets}"
        # A just-started MinIO can answer "not initialized" for a moment after it says ready.
        deadline = time.monotonic() + 60
        while True:
            try:
                self.s3.create_bucket(Bucket=bucket)
                return bucket
            except self.s3.exceptions.ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code != "XMinioServerNotInitialized" or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def seed(self, label: str, count: int, workers: int = 16) -> str:
        """A fresh bucket holding ``count`` incomplete uploads of one PART_SIZE part each."""
        bucket = self.new_bucket(label)
        body = b"x" * PART_SIZE

        def one(i: int) -> str:
            key = f"tmp/{i:07d}.bin"
            upload: str = self.s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            self.s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=body)
            return upload

        with ThreadPoolExecutor(workers) as pool:
            ids = set(pool.map(one, range(count)))
        if len(ids) != count:
            raise RuntimeError(f"seeded {len(ids)} distinct uploads in {bucket}, wanted {count}")
        return bucket

    def measured(
        self, tool: str, rtt_ms: int, bucket: str, uploads: int, body: Callable[[], Run]
    ) -> Run:
        """Run ``body`` between two reads of MinIO's counters and CPU; check the bucket after."""
        before, minio_before = self.counters.read(), process_cpu(self.minio_pid)
        proxy_before = process_cpu(self.toxiproxy_pid)
        run = body()
        run.minio_cpu = process_cpu(self.minio_pid) - minio_before
        run.proxy_cpu = process_cpu(self.toxiproxy_pid) - proxy_before
        run.requests = self.counters.read() - before
        left = len(open_uploads(self.s3, bucket))
        if left:
            run.problems.append(f"{left} of {uploads} uploads left in {bucket}")
        return run


# --------------------------------------------------------------------------------------------
# The three tools


def run_rclone(bench: Bench, rclone: Path, rtt_ms: int, bucket: str, uploads: int) -> Run:
    proxy = bench.proxy(rtt_ms)
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as config:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "RCLONE_CONFIG": config.name,  # empty: the remote comes from the variables below
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Minio",
            "RCLONE_CONFIG_BENCH_ENDPOINT": proxy.endpoint,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": bench.minio.access_key,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": bench.minio.secret_key,
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        }
        argv = [str(rclone), "backend", "cleanup", f"bench:{bucket}", "-o", "max-age=1s"]

        def body() -> Run:
            code, _, err, seconds, cpu = run_child(argv, env)
            run = Run("rclone", rtt_ms, uploads, seconds, cpu, 0.0, Counter())
            if code:
                run.problems.append(f"rclone exited {code}: {err.strip()[-500:]}")
            return run

        return bench.measured("rclone", rtt_ms, bucket, uploads, body)


def janitor_startup(samples: int = 3) -> tuple[float, float]:
    """Wall and CPU seconds of starting the CLI's interpreter and imports, no request sent:
    the least of a few tries, since a loaded machine only ever adds to it."""
    code = "import mpu_janitor.cli, mpu_janitor.stores.s3"
    tries = []
    for _ in range(samples):
        status, _, err, seconds, cpu = run_child([sys.executable, "-c", code], dict(os.environ))
        if status:
            raise RuntimeError(f"importing the CLI failed: {err}")
        tries.append((seconds, cpu))
    return min(t[0] for t in tries), min(t[1] for t in tries)


def janitor_policy(endpoint: str, bucket: str, concurrency: int | None) -> dict[str, Any]:
    """The policy the CLI sweeps: the default limits but a pacer wide open (the default 100
    requests/s would set the pace alone) and no abort budget; ``concurrency`` None leaves the
    cap at the CRD's default."""
    limits: dict[str, Any] = {"requestsPerSecond": 10_000, "maxAbortsPerSweep": 10_000_000}
    if concurrency is not None:
        limits["concurrency"] = concurrency
    doc = policy_doc(
        endpoint, [bucket], match={"olderThan": "1s", "quietPeriod": "0s"}, limits=limits
    )
    if concurrency is None:
        del doc["spec"]["limits"]["concurrency"]  # the tests' policy_doc sets one
    return doc


def run_janitor(
    bench: Bench,
    rtt_ms: int,
    bucket: str,
    uploads: int,
    startup_cpu: float,
    concurrency: int | None = None,
) -> Run:
    """The CLI with the default limits (``concurrency`` None: the default cap, adaptive), or
    capped at ``concurrency`` uploads at once."""
    proxy = bench.proxy(rtt_ms)
    tool = "mpu-janitor" if concurrency is None else f"mpu-janitor-{concurrency}"
    doc = janitor_policy(proxy.endpoint, bucket, concurrency)
    script = Path(sys.executable).parent / "mpu-janitor"
    with tempfile.TemporaryDirectory(prefix="mpu-janitor-bench-") as tmp:
        path = write_policy(Path(tmp), doc)
        argv = [str(script), "sweep", "-f", str(path), "--output", "json"]
        env = {**os.environ, **bench.minio.env()}

        def body() -> Run:
            code, out, err, seconds, cpu = run_child(argv, env)
            run = Run(tool, rtt_ms, uploads, seconds, cpu - startup_cpu, 0.0, Counter())
            summary = last_json(out) if out.strip() else {}
            run.detail = summary
            expected = uploads * PART_SIZE
            if code:
                run.problems.append(f"mpu-janitor exited {code}: {err.strip()[-500:]}")
            if summary.get("aborted") != uploads:
                run.problems.append(f"aborted {summary.get('aborted')}, seeded {uploads}")
            if summary.get("freedBytes") != expected:
                run.problems.append(f"freedBytes {summary.get('freedBytes')}, seeded {expected}")
            return run

        return bench.measured(tool, rtt_ms, bucket, uploads, body)


def run_bare(bench: Bench, rtt_ms: int, bucket: str, uploads: int) -> Run:
    """List, then abort every upload from CONCURRENCY threads: the client alone, nothing else."""
    proxy = bench.proxy(rtt_ms)

    def body() -> Run:
        cpu_started, started = time.process_time(), time.perf_counter()
        s3 = boto3.client(
            "s3",
            endpoint_url=proxy.endpoint,
            aws_access_key_id=bench.minio.access_key,
            aws_secret_access_key=bench.minio.secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=CONCURRENCY,
            ),
        )
        found = [
            (u["Key"], u["UploadId"])
            for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
            for u in page.get("Uploads", [])
        ]
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            done = list(
                pool.map(
                    lambda u: s3.abort_multipart_upload(Bucket=bucket, Key=u[0], UploadId=u[1]),
                    found,
                )
            )
        seconds = time.perf_counter() - started
        run = Run(
            "bare", rtt_ms, uploads, seconds, time.process_time() - cpu_started, 0.0, Counter()
        )
        if len(done) != uploads:
            run.problems.append(f"aborted {len(done)}, seeded {uploads}")
        return run

    return bench.measured("bare", rtt_ms, bucket, uploads, body)


# --------------------------------------------------------------------------------------------
# The whole run and its report


@dataclass
class Report:
    runs: list[Run]
    started: datetime.datetime
    machine: str
    versions: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    startup_seconds: float
    startup_cpu: float

    @property
    def ok(self) -> bool:
        return all(run.ok for run in self.runs)

    def find(self, tool: str, rtt_ms: int) -> Run | None:
        return next((r for r in self.runs if r.tool == tool and r.rtt_ms == rtt_ms), None)


def side_by_side(
    rtts: Sequence[tuple[int, int]], tools: Sequence[str], rclone: Path | None = None
) -> Report:
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    runs: list[Run] = []
    startup_seconds, startup_cpu = janitor_startup()
    with Bench() as bench:
        for rtt_ms, uploads in rtts:
            buckets = {tool: bench.seed(tool.replace("-", ""), uploads) for tool in tools}
            time.sleep(SETTLE_SECONDS)
            for tool in tools:
                if tool == "rclone":
                    assert rclone is not None
                    run = run_rclone(bench, rclone, rtt_ms, buckets[tool], uploads)
                elif tool == "mpu-janitor":
                    run = run_janitor(bench, rtt_ms, buckets[tool], uploads, startup_cpu)
                elif tool == "mpu-janitor-16":
                    run = run_janitor(bench, rtt_ms, buckets[tool], uploads, startup_cpu, 16)
                else:
                    run = run_bare(bench, rtt_ms, buckets[tool], uploads)
                runs.append(run)
                print(
                    f"  {rtt_ms} ms {LABELS[tool]}: {uploads} uploads in {run.seconds:.2f} s"
                    + ("" if run.ok else f"  NOT OK: {'; '.join(run.problems)}"),
                    file=sys.stderr,
                    flush=True,
                )
        versions = f"MinIO {bench.minio.binary.resolve().name.removeprefix('minio-')}"
    if rclone is not None:
        versions += f", rclone {rclone.resolve().name.removeprefix('rclone-')}"
    return Report(
        runs,
        started,
        machine(),
        versions + f", Python {platform.python_version()}",
        load_before,
        os.getloadavg(),
        startup_seconds,
        startup_cpu,
    )


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} x {model}, Linux {platform.release()}"


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.1f}x" if base else "-"


def table(report: Report) -> list[str]:
    """The results as a Markdown table (also readable on a terminal)."""
    lines = [
        "| tool | RTT | uploads | seconds | uploads/s | vs rclone | % of bare | "
        "requests/upload | client CPU us/upload | MinIO CPU us/upload | "
        "toxiproxy CPU us/upload | checked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for run in report.runs:
        rclone = report.find("rclone", run.rtt_ms)
        bare = report.find("bare", run.rtt_ms)
        vs_rclone = ratio(run.uploads_per_second, rclone.uploads_per_second if rclone else None)
        of_bare = (
            f"{100 * run.uploads_per_second / bare.uploads_per_second:.0f} %"
            if bare and run.tool != "bare"
            else "-"
        )
        cpu = f"{1e6 * run.client_cpu / run.uploads:,.0f}"
        if run.tool.startswith("mpu-janitor"):
            cpu += " (engine)"
        lines.append(
            f"| {LABELS[run.tool]} | {run.rtt_ms} ms | {run.uploads:,} | {run.seconds:.2f} | "
            f"{run.uploads_per_second:,.0f} | {vs_rclone} | {of_bare} | "
            f"{run.requests_per_upload:.2f} | {cpu} | "
            f"{1e6 * run.minio_cpu / run.uploads:,.0f} | "
            f"{1e6 * run.proxy_cpu / run.uploads:,.0f} | {'yes' if run.ok else 'NO'} |"
        )
    return lines


def notes(report: Report) -> list[str]:
    out = []
    for run in report.runs:
        ops = ", ".join(f"{api} {n:,}" for api, n in sorted(run.requests.items()))
        out.append(f"* {run.rtt_ms} ms, {LABELS[run.tool]}: MinIO counted {ops}.")
    out.append(
        f"* Starting the CLI (interpreter and imports, no request; least of 3) took "
        f"{report.startup_seconds:.2f} s and {report.startup_cpu:.2f} s of CPU, measured "
        f"apart: the mpu-janitor seconds include it, its CPU column does not."
    )
    for run in report.runs:
        if not run.tool.startswith("mpu-janitor"):
            continue
        bare = report.find("bare", run.rtt_ms)
        if bare is None or run.seconds <= report.startup_seconds:
            continue
        net = run.seconds - report.startup_seconds
        out.append(
            f"* {run.rtt_ms} ms without the start-up: {LABELS[run.tool]} {net:.2f} s, "
            f"{100 * bare.seconds / net:.0f} % of the bare client's uploads/s."
        )
    for run in report.runs:
        for problem in run.problems:
            out.append(f"* NOT OK: {run.rtt_ms} ms {LABELS[run.tool]}: {problem}")
    return out


def header(report: Report) -> list[str]:
    load = ", ".join(f"{x:.1f}" for x in report.load_before)
    after = ", ".join(f"{x:.1f}" for x in report.load_after)
    return [
        f"Measured {report.started:%Y-%m-%d %H:%M} UTC on {report.machine}; {report.versions}. "
        f"The machine is shared and was loaded (load average {load} before, {after} after); "
        f"MinIO, toxiproxy and the client share its cores.",
    ]


def write_readme(report: Report, command: str) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: the markers {BEGIN!r} and {END!r} are missing")
    body = [BEGIN, "", f"`{command}`", "", *header(report), "", *table(report), "", *notes(report)]
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(head + "\n".join(body) + "\n\n" + END + tail)


def parse_rtts(text: str, uploads: int | None) -> list[tuple[int, int]]:
    rtts = []
    for item in text.split(","):
        rtt, _, count = item.partition(":")
        rtts.append((int(rtt), uploads or int(count or 500)))
    return rtts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rtts",
        default=DEFAULT_RTTS,
        help="comma-separated RTT_MS:UPLOADS (default %(default)s)",
    )
    parser.add_argument("--uploads", type=int, help="the same N at every RTT (smaller runs)")
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--write-readme",
        action="store_true",
        help="replace the side-by-side results in bench/README.md with this run's",
    )
    args = parser.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"--tools: unknown {', '.join(sorted(unknown))} (known: {', '.join(TOOLS)})")
    rclone = ensure_binaries(["rclone"])["rclone"] if "rclone" in tools else None
    report = side_by_side(parse_rtts(args.rtts, args.uploads), tools, rclone)
    print()
    print("\n".join([*header(report), "", *table(report), "", *notes(report)]))
    if args.write_readme:
        shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-readme"]
        command = " ".join(["python bench/bench_side_by_side.py", *shown, "--write-readme"])
        write_readme(report, command)
        print(f"\nwrote {README}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
