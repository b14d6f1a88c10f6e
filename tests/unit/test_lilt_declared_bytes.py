"""LILT's bytes are the sizes uploaders declared at initiation, not measured: the status
message and the metrics' help say so, so nobody mistakes them for measured bytes."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import generate_latest

from mpu_janitor.metrics import MetricsState, new_registry
from mpu_janitor.status import sweep_message
from mpu_janitor.sweep import BucketStats, SweepResult


def result(store: str) -> SweepResult:
    return SweepResult(
        namespace="translation",
        policy="uploads",
        store=store,
        dry_run=False,
        started=datetime(2025, 1, 1, tzinfo=UTC),
        finished=datetime(2025, 1, 1, 0, 1, tzinfo=UTC),
        buckets={
            "lilt": BucketStats(
                scanned=2, aborted=1, freed_bytes=4096, incomplete_bytes=8192, listed=True
            )
        },
    )


def test_the_status_says_lilt_bytes_are_declared() -> None:
    assert "4096 bytes freed (declared by the uploader, not measured)" in sweep_message(
        result("LILT")
    )
    assert "declared" not in sweep_message(result("S3"))


def test_the_metrics_say_lilt_bytes_are_declared() -> None:
    state = MetricsState()
    state.record_sweep(result("LILT"))
    text = generate_latest(new_registry(state)).decode()
    for name in ("freed_bytes_total", "incomplete_upload_bytes", "eligible_upload_bytes"):
        (help_line,) = [
            line for line in text.splitlines() if line.startswith(f"# HELP mpu_janitor_{name} ")
        ]
        assert "LILT: sizes uploaders declared, not measured" in help_line
