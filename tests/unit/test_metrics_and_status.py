"""Prometheus series from sweep results, and the status written to a policy."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import generate_latest

from mpu_janitor.metrics import MetricsState, new_registry
from mpu_janitor.policy import parse_policy
from mpu_janitor.progress import Progress
from mpu_janitor.status import problem_status, ready_condition, sweep_status
from mpu_janitor.sweep import BucketStats, SweepIssue, SweepResult

START = datetime(2030, 1, 1, tzinfo=UTC)


def result(**buckets: BucketStats) -> SweepResult:
    return SweepResult(
        "media", "stale", "S3", False, START, START + timedelta(seconds=3), buckets=dict(buckets)
    )


def known_state() -> MetricsState:
    """Metrics that know the policy media/stale (series exist only for policies seen)."""
    state = MetricsState()
    state.register_policy(
        parse_policy(
            {
                "metadata": {"name": "stale", "namespace": "media"},
                "spec": {
                    "store": {"type": "S3", "s3": {"bucketPattern": "*"}},
                    "match": {"olderThan": "1d"},
                },
            }
        )
    )
    return state


def scrape(state: MetricsState) -> str:
    return generate_latest(new_registry(state)).decode()


def test_series_from_a_sweep_and_their_removal() -> None:
    state = MetricsState()
    state.register_policy(
        parse_policy(
            {
                "metadata": {"name": "stale", "namespace": "media"},
                "spec": {
                    "store": {"type": "S3", "s3": {"buckets": ["a-1"]}},
                    "match": {"olderThan": "7d"},
                },
            }
        )
    )
    stats = BucketStats(
        scanned=3,
        incomplete_uploads=3,
        incomplete_bytes=600,
        eligible=2,
        eligible_bytes=500,
        aborted=2,
        freed_bytes=500,
        oldest_age_seconds=9000,
        listed=True,
    )
    state.record_sweep(result(**{"a-1": stats}))
    state.record_sweep(result(**{"a-1": BucketStats(listed=True)}))
    state.count_request(("media", "stale"), "S3", "AbortMultipartUpload", "204")
    text = scrape(state)
    labels = 'bucket="a-1",namespace="media",policy="stale",store="S3"'
    assert f"mpu_janitor_freed_bytes_total{{{labels}}} 500.0" in text
    assert (
        'mpu_janitor_aborted_uploads_total{bucket="a-1",namespace="media",policy="stale",'
        'result="aborted",store="S3"} 2.0'
    ) in text
    # Gauges describe the last sweep: nothing is left after the second one.
    assert f"mpu_janitor_incomplete_upload_bytes{{{labels}}} 0.0" in text
    assert (
        'mpu_janitor_policy_older_than_seconds{namespace="media",policy="stale",'
        'store="S3"} 604800.0'
    ) in text
    assert 'mpu_janitor_sweep_duration_seconds_count{namespace="media",policy="stale"' in text
    assert 'mpu_janitor_sweep_duration_seconds_bucket{le="5.0",namespace="media"' in text
    assert (
        'mpu_janitor_store_requests_total{code="204",namespace="media",'
        'operation="AbortMultipartUpload",policy="stale",store="S3"} 1.0'
    ) in text
    assert "mpu_janitor_last_successful_sweep_timestamp_seconds" in text
    assert "mpu_janitor_build_info" in text
    assert 'mpu_janitor_policy_suspended{namespace="media",policy="stale",store="S3"} 0.0' in text
    # the alerts leave DryRun policies out of "eligible uploads persist"
    assert 'mpu_janitor_policy_dry_run{namespace="media",policy="stale",store="S3"} 0.0' in text
    state.forget(("media", "stale"))
    assert 'policy="stale"' not in scrape(state)


def test_gauges_of_a_bucket_no_longer_covered_disappear() -> None:
    state = known_state()
    state.record_sweep(result(**{"old-1": BucketStats(incomplete_bytes=5, listed=True)}))
    state.record_sweep(result(**{"new-1": BucketStats(incomplete_bytes=7, listed=True)}))
    text = scrape(state)
    assert 'mpu_janitor_incomplete_upload_bytes{bucket="new-1"' in text
    assert 'mpu_janitor_incomplete_upload_bytes{bucket="old-1"' not in text


def test_dry_run_gauges_show_what_would_be_freed() -> None:
    state = known_state()
    dry = result(
        **{
            "b-1": BucketStats(
                incomplete_uploads=2,
                incomplete_bytes=30,
                eligible=2,
                eligible_bytes=30,
                listed=True,
            )
        }
    )
    dry.dry_run = True
    state.record_sweep(dry)
    text = scrape(state)
    assert 'mpu_janitor_eligible_upload_bytes{bucket="b-1",namespace="media"' in text
    assert ',store="S3"} 30.0' in text.split("mpu_janitor_eligible_upload_bytes{")[1]


def test_failed_sweep_does_not_move_last_success() -> None:
    state = known_state()
    failed = result(**{"b-1": BucketStats(failed=1, listed=True)})
    failed.issues.append(SweepIssue("AccessDenied", "denied", "b-1"))
    failed.errors_by_reason["AccessDenied"] += 1
    state.record_sweep(failed)
    text = scrape(state)
    assert "mpu_janitor_last_successful_sweep_timestamp_seconds{" not in text
    assert (
        'mpu_janitor_sweep_errors_total{namespace="media",policy="stale",'
        'reason="AccessDenied",store="S3"} 1.0'
    ) in text


def test_ready_transition_time_moves_only_when_status_changes() -> None:
    first = ready_condition(
        None, ready=True, reason="SweepSucceeded", message="ok", generation=1, now=START
    )
    same = ready_condition(
        {"conditions": [first]},
        ready=True,
        reason="SweepSucceeded",
        message="ok again",
        generation=2,
        now=START + timedelta(hours=1),
    )
    assert same["lastTransitionTime"] == first["lastTransitionTime"] == "2030-01-01T00:00:00Z"
    assert same["observedGeneration"] == 2
    flipped = ready_condition(
        {"conditions": [same]},
        ready=False,
        reason="AccessDenied",
        message="no",
        generation=2,
        now=START + timedelta(hours=2),
    )
    assert flipped["lastTransitionTime"] == "2030-01-01T02:00:00Z"
    assert flipped["status"] == "False"


def test_status_totals_accumulate_and_problems_keep_them() -> None:
    one = result(**{"b-1": BucketStats(aborted=2, freed_bytes=100, listed=True)})
    first = sweep_status({}, one, generation=1, next_sweep=START)
    second = sweep_status(first, one, generation=1, next_sweep=START)
    assert second["totals"] == {"abortedUploads": 4, "freedBytes": 200, "freed": "200"}
    assert second["nextSweepTime"] == "2030-01-01T00:00:00Z"
    problem = problem_status(second, reason="CredentialsNotFound", message="gone", generation=1)
    assert "totals" not in problem and "lastSweep" not in problem
    assert problem["conditions"][0]["reason"] == "CredentialsNotFound"


def test_progress_is_shown_on_a_terminal_only() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    running = result(**{"b-1": BucketStats(scanned=1500, eligible=3, aborted=2, freed_bytes=2048)})
    terminal = Terminal()
    progress = Progress(terminal)
    progress(running)
    progress.finish()
    assert "0 measured, 2 aborted, 2.0 KiB freed, " in terminal.getvalue()
    assert terminal.getvalue().startswith("\r")
    piped = io.StringIO()
    Progress(piped)(running)
    assert piped.getvalue() == ""


def test_the_chart_uses_only_metrics_the_operator_exports() -> None:
    import json
    import re
    from pathlib import Path

    chart = Path(__file__).resolve().parents[2] / "charts" / "mpu-janitor"
    state = MetricsState()
    state.register_policy(
        parse_policy(
            {
                "metadata": {"name": "p", "namespace": "n"},
                "spec": {
                    "store": {"type": "S3", "s3": {"buckets": ["b-1"]}},
                    "match": {"olderThan": "1d"},
                },
            }
        )
    )
    sweep = SweepResult(
        "n",
        "p",
        "S3",
        False,
        START,
        START + timedelta(seconds=3),
        buckets={"b-1": BucketStats(listed=True)},
    )
    sweep.errors_by_reason["Throttled"] += 1
    state.record_sweep(sweep)
    state.count_request(("n", "p"), "S3", "ListParts", "200")
    exported = set(re.findall(r"^(mpu_janitor_[a-z_]+)[{ ]", scrape(state), re.MULTILINE))
    dashboard = json.loads((chart / "dashboards" / "mpu-janitor.json").read_text())
    expressions = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    expressions += (chart / "templates" / "prometheusrule.yaml").read_text()
    used = set(re.findall(r"mpu_janitor_[a-z_]+", expressions))
    assert used, "no metric found in the dashboard and rules"
    assert used <= exported, used - exported


def test_a_deleted_policys_series_never_come_back() -> None:
    state = known_state()
    observer = state.request_observer(("media", "stale"), "S3")
    state.forget(("media", "stale"))
    # A sweep still in flight when the policy was deleted reports afterwards.
    observer("ListMultipartUploads", "200")
    state.count_error(("media", "stale"), "S3", "Throttled")
    state.record_sweep(result(**{"b-1": BucketStats(aborted=1, freed_bytes=5, listed=True)}))
    assert 'policy="stale"' not in scrape(state)


def test_counters_start_at_zero_for_every_covered_bucket() -> None:
    state = MetricsState()
    state.register_policy(
        parse_policy(
            {
                "metadata": {"name": "stale", "namespace": "media"},
                "spec": {
                    "store": {"type": "S3", "s3": {"buckets": ["a-1", "b-1"]}},
                    "match": {"olderThan": "7d"},
                },
            }
        )
    )
    text = scrape(state)
    for bucket in ("a-1", "b-1"):
        assert (
            f'mpu_janitor_freed_bytes_total{{bucket="{bucket}",namespace="media",'
            f'policy="stale",store="S3"}} 0.0'
        ) in text
        assert (
            f'mpu_janitor_aborted_uploads_total{{bucket="{bucket}",namespace="media",'
            f'policy="stale",result="aborted",store="S3"}} 0.0'
        ) in text
    assert (
        'mpu_janitor_sweep_errors_total{namespace="media",policy="stale",'
        'reason="AccessDenied",store="S3"} 0.0'
    ) in text
    assert "process_start_time_seconds" in text or "python_gc_objects_collected_total" in text


async def test_metrics_speak_openmetrics_when_asked() -> None:
    import aiohttp

    from mpu_janitor.handlers import OperatorConfig, start_http

    class Ticking:
        last_tick = 0.0

    config = OperatorConfig(metrics_address="127.0.0.1", metrics_port=0)
    runner = await start_http(config, known_state(), Ticking())  # type: ignore[arg-type]
    try:
        url = f"http://127.0.0.1:{config.bound_port}/metrics"
        async with aiohttp.ClientSession() as session:
            accept = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            async with session.get(url, headers={"Accept": accept}) as response:
                assert response.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await response.text()).endswith("# EOF\n")
            async with session.get(url) as response:
                assert response.headers["Content-Type"].startswith("text/plain")
    finally:
        await runner.cleanup()


def test_json_logs_are_one_object_a_line(capsys: Any) -> None:
    import json
    import logging

    from mpu_janitor.handlers import configure_logging

    try:
        configure_logging(verbose=False, log_format="json")
        logging.getLogger("mpu_janitor.scheduler").warning("policy %s is invalid", "ns/p")
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        record = json.loads(lines[-1])
        assert record["message"] == "policy ns/p is invalid"
        assert record["severity"] == "warn" or record.get("level") in ("warning", "WARNING")
    finally:
        logging.getLogger().handlers.clear()


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0"),
        (512, "512"),
        (1024, "1Ki"),
        (1234, "1.21Ki"),
        (15 * 2**20, "15Mi"),
        (1_564_119_715, "1.46Gi"),
        (100 * 2**20, "100Mi"),
        (1023 * 1024, "1023Ki"),
    ],
)
def test_freed_bytes_as_a_person_reads_them(count: int, shown: str) -> None:
    from mpu_janitor.status import quantity

    assert quantity(count) == shown


def test_a_policy_note_reaches_the_ready_message() -> None:
    from mpu_janitor.status import sweep_status

    status = sweep_status(
        None,
        result(**{"b-1": BucketStats(listed=True)}),
        generation=1,
        next_sweep=None,
        note="olderThan 1w is at or above the age at which MinIO aborts uploads itself",
    )
    (ready,) = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready["message"].endswith(
        "; note: olderThan 1w is at or above the age at which MinIO aborts uploads itself"
    )
