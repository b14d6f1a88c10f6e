"""Prometheus metrics (prefix ``mpu_janitor_``) from sweep results, as a custom collector.

Every series belongs to one policy and lives in this module's memory of that policy, so
:meth:`MetricsState.forget` makes all series of a deleted policy disappear at once (the
approach of crate-operator's collector). Labels never carry upload ids or keys.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mpu_janitor import __version__
from mpu_janitor.policy import Policy
from mpu_janitor.sweep import NOTICE_REASONS, SweepResult

PREFIX = "mpu_janitor_"
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
ABORT_RESULTS = {
    "aborted": "aborted",
    "already_gone": "already_gone",
    "replaced": "replaced",
    "protected": "protected",
    "failed": "failed",
}

# sweep_errors_total starts at 0 for these, so increase() sees a policy's first error.
ERROR_REASONS = (
    "InvalidSpec",
    "CredentialsNotFound",
    "CredentialsUnreadable",
    "AccessDenied",
    "StoreUnreachable",
    "BucketNotFound",
    "Throttled",
    "InternalError",
)

PolicyKey = tuple[str, str]  # (namespace, name)
DECLARED = "; LILT: sizes uploaders declared, not measured"  # LILT has no parts listing


@dataclass
class _PolicySeries:
    store: str
    interval_seconds: float = 0.0
    suspended: bool = False
    dry_run: bool = False
    older_than_seconds: float = 0.0
    # per bucket gauges from the last sweep that listed the bucket completely
    gauges: dict[str, dict[str, float]] = field(default_factory=dict)
    aborted: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    freed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    requests: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_success: float | None = None
    duration_buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_count: int = 0
    duration_sum: float = 0.0
    ready: tuple[str, str] = ("Unknown", "Sweeping")  # the Ready condition: status, reason

    def __post_init__(self) -> None:
        for reason in ERROR_REASONS:
            self.errors[reason] += 0

    def cover(self, buckets: Iterator[str] | tuple[str, ...] | list[str]) -> None:
        """Counters of a bucket start at 0 when it is first known, not at its first sweep's
        count (``increase()`` would drop that sweep)."""
        for bucket in buckets:
            for outcome in ABORT_RESULTS:
                self.aborted[(bucket, outcome)] += 0
            self.freed[bucket] += 0


class MetricsState(Collector):
    """The operator's metrics, thread-safe (sweeps report from worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: dict[PolicyKey, _PolicySeries] = {}

    def _create(self, key: PolicyKey, store: str) -> _PolicySeries:
        series = self._policies.get(key)
        if series is None or series.store != store:
            series = self._policies[key] = _PolicySeries(store=store)
        return series

    def _series(self, key: PolicyKey, store: str) -> _PolicySeries | None:
        """A known policy's series; None once it was forgotten (or never seen), so a late
        report of a deleted policy's sweep never brings its series back."""
        series = self._policies.get(key)
        return series if series is not None and series.store == store else None

    def register_policy(self, policy: Policy) -> None:
        with self._lock:
            series = self._create(policy.key, policy.store.type.value)
            series.interval_seconds = policy.interval.total_seconds()
            series.older_than_seconds = policy.match.older_than.total_seconds()
            series.suspended = policy.suspend
            series.dry_run = policy.dry_run
            if policy.store.s3 is not None:
                series.cover(policy.store.s3.buckets)
            if policy.store.glacier is not None:
                series.cover(policy.store.glacier.vaults)

    def register_invalid(self, key: PolicyKey, store: str) -> None:
        """A policy whose spec does not parse still has series (its Ready and errors)."""
        with self._lock:
            self._create(key, store)

    def set_ready(self, key: PolicyKey, store: str, status: str, reason: str) -> None:
        with self._lock:
            series = self._series(key, store)
            if series is not None:
                series.ready = (status, reason)

    def cover(self, key: PolicyKey, store: str, buckets: list[str]) -> None:
        with self._lock:
            series = self._series(key, store)
            if series is not None:
                series.cover(buckets)

    def request_observer(self, key: PolicyKey, store: str) -> RequestCounter:
        return RequestCounter(self, key, store)

    def count_request(self, key: PolicyKey, store: str, operation: str, code: str) -> None:
        with self._lock:
            series = self._series(key, store)
            if series is not None:
                series.requests[(operation, code)] += 1

    def count_error(self, key: PolicyKey, store: str, reason: str) -> None:
        with self._lock:
            series = self._series(key, store)
            if series is not None:
                series.errors[reason] += 1

    def record_sweep(self, result: SweepResult) -> None:
        key = (result.namespace, result.policy)
        with self._lock:
            series = self._series(key, result.store)
            if series is None:
                return
            for bucket, stats in result.buckets.items():
                for name, attr in ABORT_RESULTS.items():
                    series.aborted[(bucket, name)] += int(getattr(stats, attr))
                series.freed[bucket] += stats.freed_bytes
                if stats.listed and not result.cancelled:
                    series.gauges[bucket] = {
                        # What is still there after the sweep (aborted uploads are gone).
                        "incomplete_uploads": stats.incomplete_uploads - stats.aborted,
                        "incomplete_upload_bytes": stats.incomplete_bytes - stats.freed_bytes,
                        "eligible_uploads": stats.eligible
                        - (0 if result.dry_run else stats.aborted),
                        "eligible_upload_bytes": stats.eligible_bytes
                        - (0 if result.dry_run else stats.freed_bytes),
                        "oldest_incomplete_upload_age_seconds": stats.oldest_age_seconds,
                    }
            if (
                not result.cancelled
                and result.buckets
                and all(stats.listed for stats in result.buckets.values())
            ):
                # A bucket the policy no longer covers keeps no stale gauges.
                for bucket in set(series.gauges) - set(result.buckets):
                    del series.gauges[bucket]
            for reason, count in result.errors_by_reason.items():
                if reason not in NOTICE_REASONS:  # counted as aborted_uploads_total{protected}
                    series.errors[reason] += count
            if result.ok and result.finished is not None:
                series.last_success = result.finished.timestamp()
            duration = result.duration_seconds
            series.duration_count += 1
            series.duration_sum += duration
            for index, bound in enumerate(DURATION_BUCKETS):
                if duration <= bound:
                    series.duration_buckets[index] += 1

    def forget(self, key: PolicyKey) -> None:
        """Drop every series of a deleted policy."""
        with self._lock:
            self._policies.pop(key, None)

    # -- the collector -----------------------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        policy_labels = ["namespace", "policy", "store"]
        bucket_labels = [*policy_labels, "bucket"]
        gauge_help = {
            "incomplete_uploads": "Incomplete multipart uploads in scope after the last sweep",
            "incomplete_upload_bytes": "Bytes of incomplete uploads in scope after the last sweep"
            + DECLARED,
            "eligible_uploads": "Matched uploads still there (what DryRun would abort)",
            "eligible_upload_bytes": "Bytes of matched uploads still there" + DECLARED,
            "oldest_incomplete_upload_age_seconds": "Oldest upload age (store clock)",
        }
        with self._lock:
            items = sorted(self._policies.items())
            gauges = {
                name: GaugeMetricFamily(PREFIX + name, text, labels=bucket_labels)
                for name, text in gauge_help.items()
            }
            last_success = GaugeMetricFamily(
                PREFIX + "last_successful_sweep_timestamp_seconds",
                "Unix time the last sweep without failures completed",
                labels=policy_labels,
            )
            interval = GaugeMetricFamily(
                PREFIX + "policy_interval_seconds",
                "The policy's sweep interval",
                labels=policy_labels,
            )
            older_than = GaugeMetricFamily(
                PREFIX + "policy_older_than_seconds",
                "The policy's match.olderThan",
                labels=policy_labels,
            )
            aborted = CounterMetricFamily(
                PREFIX + "aborted_uploads",
                "Abort outcomes by result",
                labels=[*bucket_labels, "result"],
            )
            freed = CounterMetricFamily(
                PREFIX + "freed_bytes",
                "Bytes freed by aborts verified gone" + DECLARED,
                labels=bucket_labels,
            )
            requests = CounterMetricFamily(
                PREFIX + "store_requests",
                "Store API calls",
                labels=[*policy_labels, "operation", "code"],
            )
            errors = CounterMetricFamily(
                PREFIX + "sweep_errors", "Sweep errors by reason", labels=[*policy_labels, "reason"]
            )
            durations = HistogramMetricFamily(
                PREFIX + "sweep_duration_seconds", "Duration of sweeps", labels=policy_labels
            )
            suspended = GaugeMetricFamily(
                PREFIX + "policy_suspended",
                "1 while the policy's spec.suspend is true",
                labels=policy_labels,
            )
            dry_run = GaugeMetricFamily(
                PREFIX + "policy_dry_run",
                "1 while the policy's spec.mode is DryRun (it measures, never aborts)",
                labels=policy_labels,
            )
            ready = GaugeMetricFamily(
                PREFIX + "policy_ready",
                "1 while the policy's Ready condition is True; labels: its status and reason",
                labels=[*policy_labels, "status", "reason"],
            )
            for (namespace, name), series in items:
                base = [namespace, name, series.store]
                ready.add_metric([*base, *series.ready], 1.0 if series.ready[0] == "True" else 0.0)
                for bucket, values in sorted(series.gauges.items()):
                    for metric, value in values.items():
                        gauges[metric].add_metric([*base, bucket], value)
                if series.last_success is not None:
                    last_success.add_metric(base, series.last_success)
                interval.add_metric(base, series.interval_seconds)
                older_than.add_metric(base, series.older_than_seconds)
                suspended.add_metric(base, 1.0 if series.suspended else 0.0)
                dry_run.add_metric(base, 1.0 if series.dry_run else 0.0)
                for (bucket, outcome), count in sorted(series.aborted.items()):
                    aborted.add_metric([*base, bucket, outcome], count)
                for bucket, count in sorted(series.freed.items()):
                    freed.add_metric([*base, bucket], count)
                for (operation, code), count in sorted(series.requests.items()):
                    requests.add_metric([*base, operation, code], count)
                for reason, count in sorted(series.errors.items()):
                    errors.add_metric([*base, reason], count)
                if series.duration_count:
                    cumulative = [
                        (str(bound), float(count))
                        for bound, count in zip(
                            DURATION_BUCKETS, series.duration_buckets, strict=True
                        )
                    ]
                    cumulative.append(("+Inf", float(series.duration_count)))
                    durations.add_metric(base, cumulative, series.duration_sum)
        build = GaugeMetricFamily(
            PREFIX + "build_info", "The operator's version", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield from gauges.values()
        yield from (
            last_success,
            interval,
            older_than,
            suspended,
            dry_run,
            ready,
            aborted,
            freed,
            requests,
            errors,
            durations,
            build,
        )


class RequestCounter:
    """A store's request observer that counts into one policy's series."""

    def __init__(self, state: MetricsState, key: PolicyKey, store: str) -> None:
        self.state, self.key, self.store = state, key, store

    def __call__(self, operation: str, code: str) -> None:
        self.state.count_request(self.key, self.store, operation, code)


def new_registry(state: MetricsState) -> CollectorRegistry:
    """The policies' series plus the process's own (RSS, CPU, start time, open files, GC)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(state)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry
