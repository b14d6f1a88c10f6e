"""Many policies on one operator: 1,000 policies over 100 namespaces on a real kube-apiserver,
each on its own MinIO bucket with a few incomplete uploads.

Starts a control plane (tests/support/controlplane.py), MinIO (tests/support/minio.py) and,
in front of MinIO, a recording proxy that notes the time, method and path of every request,
so the bench sees each policy's listings and aborts as the store saw them. The chart is
installed cluster-wide (its Deployment never runs: there is no kubelet) and the operator runs
here as `mpu-janitor operator` with the chart's ServiceAccount, so its requests meet the chart's
RBAC and the API server's priority and fairness as a ServiceAccount's would.

Phases, each printed:

1. burst: every policy created at once (8 client threads, interval 1h); apply-to-first-abort
   for each (from the create request to the first abort the store receives for its bucket)
   and the time until every bucket is empty;
2. idle: every policy scheduled, none due: the operator's CPU over ``--idle-seconds``, its RSS
   and peak RSS;
3. probes while scheduled: ``--probes`` new policies, one every ``--probe-gap`` seconds, each on
   its own bucket; apply-to-first-abort p50/p95/max (the target: p95 < 3 s);
4. busy: every policy patched to ``--interval`` (default 60s) and watched for
   ``--busy-intervals`` intervals: each policy's listings (one per sweep) give its gaps; a gap
   of more than twice the interval is a sweep more than one interval late. The operator's CPU
   while busy, and probes again under that load.

The API server's own counters give the operator's requests per second by verb and resource,
and whether priority and fairness queued or rejected any of them.

    PYTHONPATH=.:operator python bench/bench_policies.py
    PYTHONPATH=.:operator python bench/bench_policies.py --policies 200 --namespaces 20
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.controlplane import ControlPlane, free_port, wait_for
from tests.support.counting_proxy import CountingProxy, SeenRequest, _Handler
from tests.support.minio import MinioServer

REPO = Path(__file__).resolve().parents[1]
OLDER_THAN = "2s"
AGE = 3.5  # older than olderThan on MinIO's 1 s Date clock
PART = b"x" * 1024
RELEASE, RELEASE_NAMESPACE = "bench", "mpu-janitor-bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the recording proxy ---------------------------------------------------------------------


@dataclass
class Seen:
    at: float
    method: str
    bucket: str
    listing: bool  # ListMultipartUploads: one a sweep (MinIO returns every upload at once)
    abort: bool


class _PathHandler(_Handler):
    def _forward(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        bucket = split.path.strip("/").split("/", 1)[0]
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        is_bucket = "/" not in split.path.strip("/")
        self.fake.note(
            Seen(
                time.monotonic(),
                self.command,
                bucket,
                listing=self.command == "GET" and is_bucket and "uploads" in query,
                abort=self.command == "DELETE" and "uploadId" in query,
            )
        )
        super()._forward()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class RecordingProxy(CountingProxy):
    thread_name = "recording-proxy"

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: list[Seen] = []

    def record(self, seen: SeenRequest) -> None:  # CountingProxy's own list: not needed here
        pass

    def note(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def since(self, start: float) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.at >= start]


RecordingProxy.handler = _PathHandler


# -- the API server, as the bench's own client -----------------------------------------------


class Api:
    """Plain HTTPS calls with the admin token, one keep-alive connection per thread."""

    def __init__(self, plane: ControlPlane) -> None:
        self.host = urllib.parse.urlsplit(plane.server).netloc
        self.token = plane.admin_token
        self.context = ssl.create_default_context(cafile=str(plane.ca_file))
        self.context.check_hostname = False
        self.local = threading.local()

    def call(self, method: str, path: str, body: Any = None, content_type: str = "") -> Any:
        for attempt in range(5):
            connection = getattr(self.local, "connection", None)
            if connection is None:
                connection = http.client.HTTPSConnection(
                    self.host, context=self.context, timeout=60
                )
                self.local.connection = connection
            headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = content_type or "application/json"
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self.local.connection = None
                time.sleep(0.2 * (attempt + 1))
                continue
            if response.status == 429 or response.status >= 500:
                time.sleep(0.2 * (attempt + 1))
                continue
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
            return json.loads(payload) if payload and payload[:1] == b"{" else payload.decode()
        raise RuntimeError(f"{method} {path}: no answer after 5 tries")

    def counters(self) -> Counter[tuple[str, ...]]:
        """The API server's request counters: requests by (user kind, verb, resource,
        subresource) is not exported, so: requests by (verb, resource, subresource) and the
        flow-control rejections and dispatches by priority level."""
        text = self.call("GET", "/metrics")
        found: Counter[tuple[str, ...]] = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "apiserver_request_total":
                    key = ("request", labels.get("verb", ""), labels.get("resource", ""))
                    found[(*key, labels.get("subresource", ""))] += int(sample.value)
                elif sample.name == "apiserver_flowcontrol_rejected_requests_total":
                    found[("rejected", labels.get("priority_level", ""))] += int(sample.value)
                elif sample.name == "apiserver_flowcontrol_dispatched_requests_total":
                    found[("dispatched", labels.get("priority_level", ""))] += int(sample.value)
                elif sample.name == "apiserver_flowcontrol_request_wait_duration_seconds_sum":
                    level = labels.get("priority_level", "")
                    found[("waited-ms", level)] += int(sample.value * 1000)
        return found


# -- the operator process ----------------------------------------------------------------------


class OperatorProcess:
    def __init__(
        self, kubeconfig: Path, log: Path, extra_args: Sequence[str], profile: str = ""
    ) -> None:
        self.port = free_port()
        command = ["mpu-janitor"]
        if profile:  # cProfile of the event loop's thread (Kopf, scheduler, status writes)
            command = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "mpu_janitor.cli"]
        args = [*command, "operator", "--all-namespaces", "--standalone"]
        args += ["--metrics-address", "127.0.0.1", "--metrics-port", str(self.port)]
        args += ["--ambient-credentials-namespaces", "", *extra_args]
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.log = log
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(
                args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def loop_cpu_seconds(self) -> float:
        """CPU of the main thread alone: the event loop (Kopf, scheduler, API calls)."""
        pid = self.process.pid
        with open(f"/proc/{pid}/task/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def memory_mib(self, key: str) -> float:
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/task"))

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Options:
    policies: int = 1000
    namespaces: int = 100
    uploads: int = 3
    interval: str = "60s"
    busy_intervals: int = 4
    idle_seconds: float = 60.0
    probes: int = 40
    probe_gap: float = 1.0
    workers: int = 8
    operator_args: tuple[str, ...] = ()
    profile: str = ""


@dataclass
class Results:
    lines: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)


def percentile(values: Sequence[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def seconds(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]]


def policy_body(name: str, namespace: str, endpoint: str, bucket: str, interval: str) -> Any:
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": {"bench": "policies"}},
        "spec": {
            "store": {
                "type": "S3",
                "s3": {"endpoint": endpoint, "profile": "MinIO", "buckets": [bucket]},
                "credentialsSecretRef": {"name": "minio-creds"},
            },
            "match": {"olderThan": OLDER_THAN, "quietPeriod": "0s"},
            "schedule": {"interval": interval},
        },
    }


def in_parallel(workers: int, function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


class Bench:
    def __init__(self, plane: ControlPlane, minio: MinioServer, options: Options) -> None:
        self.plane, self.minio, self.options = plane, minio, options
        self.api = Api(plane)
        self.s3 = minio.client()
        self.results = Results()
        self.tag = secrets.token_hex(2)
        self.namespaces = [f"bench-{self.tag}-{i:03d}" for i in range(options.namespaces)]
        # (namespace, name, bucket) of every policy; probes are extra, on their own buckets.
        self.policies = [
            (self.namespaces[i % options.namespaces], f"p{i:05d}", f"b-{self.tag}-{i:05d}")
            for i in range(options.policies)
        ]
        probes = 2 * options.probes
        self.probes = [
            (self.namespaces[i % options.namespaces], f"probe{i:04d}", f"q-{self.tag}-{i:04d}")
            for i in range(probes)
        ]

    # -- setup

    def setup(self, proxy: RecordingProxy, tmp: Path) -> OperatorProcess:
        say, plane = self.results.say, self.plane
        started = time.monotonic()
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        plane.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/uploadlifecyclepolicies.mpu-janitor.dev",
        )
        plane.kubectl("create", "namespace", RELEASE_NAMESPACE)
        chart = str(REPO / "charts" / "mpu-janitor")
        plane.helm("install", RELEASE, chart, "-n", RELEASE_NAMESPACE, "--skip-crds")
        accounts = plane.kubectl_json("get", "serviceaccounts", "-n", RELEASE_NAMESPACE)["items"]
        account = next(
            a["metadata"]["name"] for a in accounts if a["metadata"]["name"] != "default"
        )
        kubeconfig = plane.service_account_kubeconfig(
            RELEASE_NAMESPACE, account, create=False, duration="24h"
        )
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "minio-creds"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": self.minio.access_key,
                "AWS_SECRET_ACCESS_KEY": self.minio.secret_key,
            },
        }

        def namespace(name: str) -> None:
            self.api.call("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
            self.api.call("POST", f"/api/v1/namespaces/{name}/secrets", secret)

        in_parallel(self.options.workers, namespace, self.namespaces)
        say(f"setup: {len(self.namespaces)} namespaces with a Secret each")

        self.upload_ids: dict[str, list[str]] = {}

        def seed(bucket: str) -> None:
            self.s3.create_bucket(Bucket=bucket)
            ids = []
            for number in range(self.options.uploads):
                key = f"tmp/{number}.bin"
                upload = self.s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
                self.s3.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=PART
                )
                ids.append(upload)
            self.upload_ids[bucket] = ids

        buckets = [b for _, _, b in self.policies + self.probes]
        in_parallel(16, seed, buckets)
        say(
            f"setup: {len(buckets)} buckets with {self.options.uploads} uploads of 1 KiB each "
            f"({time.monotonic() - started:.0f} s so far)"
        )
        operator = OperatorProcess(
            kubeconfig, tmp / "operator.log", self.options.operator_args, self.options.profile
        )
        wait_for(operator.healthy, timeout=120, what="operator /healthz")
        time.sleep(2)  # its watch is up
        say(
            f"operator: pid {operator.process.pid}, RSS {operator.memory_mib('VmRSS'):.0f} MiB "
            "with no policy"
        )
        return operator

    # -- helpers

    def create(self, item: tuple[str, str, str], endpoint: str, interval: str) -> float:
        namespace, name, bucket = item
        body = policy_body(name, namespace, endpoint, bucket, interval)
        sent = time.monotonic()
        path = f"/apis/mpu-janitor.dev/v1alpha1/namespaces/{namespace}/uploadlifecyclepolicies"
        self.api.call("POST", path, body)
        return sent

    def first_aborts(self, proxy: RecordingProxy, since: float) -> dict[str, float]:
        first: dict[str, float] = {}
        for seen in proxy.since(since):
            if seen.abort and seen.bucket not in first:
                first[seen.bucket] = seen.at
        return first

    def latencies(
        self, proxy: RecordingProxy, applied: dict[str, float], timeout: float
    ) -> list[float]:
        since = min(applied.values())
        wait_for(
            lambda: set(applied) <= set(self.first_aborts(proxy, since)),
            timeout=timeout,
            interval=1,
            what="a first abort in every bucket",
        )
        first = self.first_aborts(proxy, since)
        return [first[bucket] - applied[bucket] for bucket in applied]

    def emptied(self, proxy: RecordingProxy, buckets: Iterable[str], since: float) -> float:
        """Wait until every upload of these buckets was aborted; the time it took."""
        wanted = {b: len(self.upload_ids[b]) for b in buckets}

        def done() -> bool:
            counts = Counter(s.bucket for s in proxy.since(since) if s.abort)
            return all(counts[b] >= n for b, n in wanted.items())

        wait_for(done, timeout=3600, interval=1, what="every bucket emptied")
        return time.monotonic() - since

    def report_latency(self, label: str, values: list[float]) -> None:
        p50, p95 = percentile(values, 0.5), percentile(values, 0.95)
        self.results.numbers[f"{label}_p50"] = p50
        self.results.numbers[f"{label}_p95"] = p95
        self.results.say(
            f"{label}: apply-to-first-abort p50 {p50:.2f} s, p95 {p95:.2f} s, "
            f"max {max(values):.2f} s over {len(values)} policies"
        )

    def report_api(
        self, label: str, before: Counter[tuple[str, ...]], wall: float, sweeps: int = 0
    ) -> None:
        after = self.api.counters()
        delta = after - before
        requests = {k[1:]: v for k, v in delta.items() if k[0] == "request"}
        ours = {
            k: v
            for k, v in requests.items()
            if k[1] in ("uploadlifecyclepolicies", "secrets", "events", "clusterkopfpeerings")
        }
        parts = ", ".join(
            f"{verb} {resource}{'/' + sub if sub else ''} {count / wall:.1f}/s"
            for (verb, resource, sub), count in sorted(ours.items(), key=lambda kv: -kv[1])
        )
        self.results.say(f"{label}: API requests {parts or 'none'}")
        if sweeps:
            per_sweep = ", ".join(
                f"{verb} {resource}{'/' + sub if sub else ''} {count / sweeps:.2f}"
                for (verb, resource, sub), count in sorted(ours.items(), key=lambda kv: -kv[1])
            )
            total = sum(ours.values()) / sweeps
            self.results.numbers[f"{label}_requests_per_sweep"] = total
            self.results.say(f"{label}: API requests per sweep {total:.2f} ({per_sweep})")
        rejected = sum(v for k, v in delta.items() if k[0] == "rejected")
        waited = {k[1]: v for k, v in delta.items() if k[0] == "waited-ms" and v}
        self.results.say(
            f"{label}: priority and fairness rejected {rejected}, queued "
            + (", ".join(f"{lvl} {ms} ms in total" for lvl, ms in waited.items()) or "nothing")
        )

    def cpu_over(self, operator: OperatorProcess, wall: float) -> float:
        cpu = operator.cpu_seconds()
        time.sleep(wall)
        return (operator.cpu_seconds() - cpu) / wall

    def probe(
        self, proxy: RecordingProxy, probes: list[tuple[str, str, str]], endpoint: str
    ) -> list[float]:
        applied: dict[str, float] = {}
        for item in probes:
            applied[item[2]] = self.create(item, endpoint, "1h")
            time.sleep(self.options.probe_gap)
        return self.latencies(proxy, applied, timeout=600)

    # -- phases

    def run(self, proxy: RecordingProxy, operator: OperatorProcess) -> Results:
        options, say = self.options, self.results.say
        numbers = self.results.numbers
        endpoint = proxy.url

        # 1. burst
        counters = self.api.counters()
        cpu0, started = operator.cpu_seconds(), time.monotonic()
        sent = in_parallel(
            options.workers, lambda item: self.create(item, endpoint, "1h"), self.policies
        )
        created = time.monotonic() - started
        applied = {item[2]: at for item, at in zip(self.policies, sent, strict=True)}
        burst = self.latencies(proxy, applied, timeout=3600)
        all_empty = self.emptied(proxy, applied, started)
        wall = time.monotonic() - started
        say(
            f"burst: {len(self.policies)} policies created in {created:.1f} s "
            f"({len(self.policies) / created:.0f}/s), every bucket empty after {all_empty:.1f} s"
        )
        self.report_latency("burst", burst)
        numbers["burst_all_empty_s"] = all_empty
        say(f"burst: operator CPU {100 * (operator.cpu_seconds() - cpu0) / wall:.0f}% of a core")
        self.report_api("burst", counters, wall)

        # 2. idle
        time.sleep(10)  # the last status writes and Events settle
        counters, s3_since = self.api.counters(), time.monotonic()
        idle = self.cpu_over(operator, options.idle_seconds)
        s3_idle = len(proxy.since(s3_since))
        numbers.update(
            idle_cpu=idle,
            rss_mib=operator.memory_mib("VmRSS"),
            peak_rss_mib=operator.memory_mib("VmHWM"),
        )
        say(
            f"idle: {len(self.policies)} policies scheduled, none due: operator CPU "
            f"{100 * idle:.1f}% of a core over {options.idle_seconds:.0f} s, RSS "
            f"{numbers['rss_mib']:.0f} MiB (peak {numbers['peak_rss_mib']:.0f} MiB), "
            f"{operator.threads()} threads, {s3_idle} store requests"
        )
        self.report_api("idle", counters, options.idle_seconds)

        # 3. probes while every policy is scheduled
        self.report_latency("scheduled", self.probe(proxy, self.probes[: options.probes], endpoint))

        # 4. busy: every policy on a short interval
        interval = seconds(options.interval)
        counters, patched = self.api.counters(), time.monotonic()
        cpu0, loop0 = operator.cpu_seconds(), operator.loop_cpu_seconds()

        def patch(item: tuple[str, str, str]) -> None:
            namespace, name, _ = item
            self.api.call(
                "PATCH",
                f"/apis/mpu-janitor.dev/v1alpha1/namespaces/{namespace}/uploadlifecyclepolicies/"
                f"{name}",
                {"spec": {"schedule": {"interval": options.interval}}},
                "application/merge-patch+json",
            )

        in_parallel(options.workers, patch, self.policies)
        say(
            f"busy: {len(self.policies)} policies patched to interval {options.interval} in "
            f"{time.monotonic() - patched:.1f} s; watching {options.busy_intervals} intervals"
        )
        watch = options.busy_intervals * interval
        half = max(0.0, watch / 2 - options.probes * options.probe_gap / 2)
        time.sleep(half)
        busy_probes = self.probe(proxy, self.probes[options.probes :], endpoint)
        time.sleep(max(0.0, patched + watch - time.monotonic()))
        ended = time.monotonic()
        busy_cpu = (operator.cpu_seconds() - cpu0) / (ended - patched)
        loop_cpu = operator.loop_cpu_seconds() - loop0
        self.report_latency("busy", busy_probes)
        listings: dict[str, list[float]] = defaultdict(list)
        mine = {b for _, _, b in self.policies}
        for seen in proxy.since(patched):
            if seen.listing and seen.bucket in mine:
                listings[seen.bucket].append(seen.at)
        gaps, late, first = [], 0, []
        for bucket in mine:
            times = sorted(listings.get(bucket, []))
            first.append((times[0] if times else ended) - patched)
            # the gaps between sweeps, and from the last sweep to the end of the watch
            edges = [*times, ended]
            for earlier, later in itertools.pairwise(edges):
                gaps.append(later - earlier)
                late += later - earlier > 2 * interval
        sweeps = sum(len(t) for t in listings.values())
        numbers.update(
            busy_cpu=busy_cpu,
            max_gap_intervals=max(gaps) / interval,
            late_sweeps=late,
            busy_rss_mib=operator.memory_mib("VmRSS"),
            peak_rss_mib=operator.memory_mib("VmHWM"),
        )
        say(
            f"busy: {sweeps} sweeps in {ended - patched:.0f} s ({sweeps / (ended - patched):.1f}"
            f"/s); first sweep after the patch p95 {percentile(first, 0.95):.1f} s, max "
            f"{max(first):.1f} s; gap between sweeps p50 {percentile(gaps, 0.5):.1f} s, p99 "
            f"{percentile(gaps, 0.99):.1f} s, max {max(gaps):.1f} s ({max(gaps) / interval:.2f} "
            f"intervals); {late} gaps over two intervals (a sweep more than one interval late)"
        )
        numbers["loop_ms_per_sweep"] = 1000 * loop_cpu / max(1, sweeps)
        say(
            f"busy: operator CPU {100 * busy_cpu:.0f}% of a core (event loop thread "
            f"{100 * loop_cpu / (ended - patched):.0f}%, {numbers['loop_ms_per_sweep']:.1f} ms a "
            f"sweep), RSS {numbers['busy_rss_mib']:.0f} MiB (peak {numbers['peak_rss_mib']:.0f} "
            "MiB)"
        )
        self.report_api("busy", counters, ended - patched, sweeps)
        return self.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Options()
    parser.add_argument("--policies", type=int, default=defaults.policies)
    parser.add_argument("--namespaces", type=int, default=defaults.namespaces)
    parser.add_argument("--uploads", type=int, default=defaults.uploads, help="per bucket")
    parser.add_argument("--interval", default=defaults.interval, help="busy phase: 60s, 2m")
    parser.add_argument("--busy-intervals", type=int, default=defaults.busy_intervals)
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_seconds)
    parser.add_argument("--probes", type=int, default=defaults.probes)
    parser.add_argument("--probe-gap", type=float, default=defaults.probe_gap)
    parser.add_argument(
        "--operator-arg", action="append", default=[], help="passed to mpu-janitor operator"
    )
    parser.add_argument("--profile", default="", help="write the operator's cProfile here")
    args = parser.parse_args(argv)
    options = Options(
        policies=args.policies,
        namespaces=args.namespaces,
        uploads=args.uploads,
        interval=args.interval,
        busy_intervals=args.busy_intervals,
        idle_seconds=args.idle_seconds,
        probes=args.probes,
        probe_gap=args.probe_gap,
        operator_args=tuple(args.operator_arg),
        profile=args.profile,
    )
    print(
        f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        flush=True,
    )
    plane, minio, proxy, operator = ControlPlane(), MinioServer(), None, None
    try:
        plane.start()
        minio.start()
        proxy = RecordingProxy(minio.endpoint).start()
        bench = Bench(plane, minio, options)
        operator = bench.setup(proxy, plane.root)
        bench.run(proxy, operator)
        return 0
    finally:
        if operator is not None:
            operator.stop()
            tail = operator.log.read_text(errors="replace").splitlines()
            errors = [line for line in tail if " ERROR " in line or "Traceback" in line]
            print(f"operator log: {len(tail)} lines, {len(errors)} errors", flush=True)
            for line in errors[:5]:
                print("  " + line[:300])
        if proxy is not None:
            proxy.stop()
        minio.stop()
        plane.stop()


if __name__ == "__main__":
    sys.exit(main())
