"""The chart's alerts, evaluated by Prometheus's own promtool against synthetic series.

The rules are rendered from the chart by helm (so the test sees exactly what is shipped), then
`promtool check rules` validates them and `promtool test rules` evaluates each alert on series
that must make it fire and series that must not. helm and promtool are built by
scripts/build-binaries.sh into $MPU_JANITOR_BIN_DIR; a missing binary fails these tests.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mpu-janitor"
RELEASE, NAMESPACE = "janitor", "ops"
JOB = "janitor-mpu-janitor"  # the Service's name: the job label a ServiceMonitor gives
TARGET = f'job="{JOB}", instance="10.0.0.7:8080", pod="{JOB}-5d9c7-x2x9k"'
GIB = 1024**3


def binary(name: str) -> Path:
    candidates = [Path.home() / ".cache" / "mpu-janitor" / "bin" / name]
    if os.environ.get("MPU_JANITOR_BIN_DIR"):
        candidates.insert(0, Path(os.environ["MPU_JANITOR_BIN_DIR"]) / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} not found at {candidates}: run scripts/build-binaries.sh {name}")


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def rule_groups() -> list[dict[str, Any]]:
    """The rule groups of the chart's PrometheusRule, with every alert on and a runbook URL."""
    result = run(
        binary("helm"), "template", RELEASE, CHART, "--namespace", NAMESPACE,
        "--set", "prometheusRule.enabled=true",
        "--set", "prometheusRule.runbookBaseUrl=https://example.com/runbooks",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (rule,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "PrometheusRule"]
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def write_rules(directory: Path, groups: list[dict[str, Any]], *, annotations: bool) -> Path:
    groups = copy.deepcopy(groups)
    if not annotations:
        # promtool compares annotations exactly; the expressions are what is tested here.
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool_test(directory: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (directory / "tests.yaml").write_text(yaml.safe_dump(unit, sort_keys=False))
    return run(binary("promtool"), "test", "rules", "tests.yaml", cwd=directory)


def series(metric: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{metric}{{{labels}}}", "values": values}


def policy_labels(policy: str, store: str = "S3", namespace: str = "media") -> str:
    return f'{TARGET}, namespace="{namespace}", policy="{policy}", store="{store}"'


def alert(name: str, **labels: str) -> dict[str, Any]:
    severity = "critical" if name == "MpuJanitorOperatorAbsent" else "warning"
    return {"exp_labels": {**labels, "severity": severity}}


# --------------------------------------------------------------------------------------------


def test_rules_pass_promtool_check(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    path = write_rules(tmp_path, rule_groups, annotations=True)
    result = run(binary("promtool"), "check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_sweeps_stale(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    write_rules(tmp_path, rule_groups, annotations=False)
    hourly = "3600+0x300"  # the policy's interval: 1h, for five hours of 1m samples
    tests = [{
        "interval": "1m",
        "input_series": [
            # Swept successfully a minute after start, never since: stale after 3h.
            series("mpu_janitor_policy_interval_seconds", policy_labels("stale"), hourly),
            series("mpu_janitor_last_successful_sweep_timestamp_seconds",
                   policy_labels("stale"), "60+0x300"),
            # Succeeds all the time.
            series("mpu_janitor_policy_interval_seconds", policy_labels("healthy"), hourly),
            series("mpu_janitor_last_successful_sweep_timestamp_seconds",
                   policy_labels("healthy"), "0+60x300"),
            # Never succeeded; its Secret is missing, so every attempt is an error.
            series("mpu_janitor_policy_interval_seconds", policy_labels("broken"), hourly),
            series("mpu_janitor_sweep_errors_total",
                   policy_labels("broken") + ', reason="CredentialsNotFound"', "0+1x300"),
            # Never succeeded, but only two sweeps so far (a 1d interval): not yet stale.
            series("mpu_janitor_policy_interval_seconds", policy_labels("young"), "86400+0x300"),
            series("mpu_janitor_sweep_duration_seconds_count", policy_labels("young"), "2+0x300"),
            # Suspended for hours on purpose: no alert.
            series("mpu_janitor_policy_interval_seconds", policy_labels("paused"), hourly),
            series("mpu_janitor_policy_suspended", policy_labels("paused"), "1+0x300"),
            series("mpu_janitor_last_successful_sweep_timestamp_seconds",
                   policy_labels("paused"), "60+0x300"),
            # Failed many times before, succeeds now.
            series("mpu_janitor_policy_interval_seconds", policy_labels("recovered"), hourly),
            series("mpu_janitor_sweep_errors_total",
                   policy_labels("recovered") + ', reason="Throttled"', "0+1x300"),
            series("mpu_janitor_last_successful_sweep_timestamp_seconds",
                   policy_labels("recovered"), "0+60x300"),
        ],
        "alert_rule_test": [
            {"eval_time": "2h", "alertname": "MpuJanitorSweepsStale",
             "exp_alerts": [alert("MpuJanitorSweepsStale", namespace="media", policy="broken",
                                  store="S3")]},
            {"eval_time": "4h", "alertname": "MpuJanitorSweepsStale",
             "exp_alerts": [
                 alert("MpuJanitorSweepsStale", namespace="media", policy="broken", store="S3"),
                 alert("MpuJanitorSweepsStale", namespace="media", policy="stale", store="S3"),
             ]},
        ],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_aborts_failing(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    write_rules(tmp_path, rule_groups, annotations=False)

    def aborted(bucket: str, result: str, values: str) -> dict[str, str]:
        labels = policy_labels("p") + f', bucket="{bucket}", result="{result}"'
        return series("mpu_janitor_aborted_uploads_total", labels, values)

    tests = [{
        "interval": "1m",
        "input_series": [
            aborted("stuck", "failed", "0+1x180"),  # fails at every sweep
            aborted("stuck", "aborted", "0+0x180"),
            aborted("flaky", "failed", "0x29 1+0x150"),  # failed once, then fine
            aborted("flaky", "aborted", "0+3x180"),
            aborted("fine", "failed", "0+0x180"),
            aborted("fine", "aborted", "0+5x180"),
        ],
        "alert_rule_test": [
            {"eval_time": "50m", "alertname": "MpuJanitorAbortsFailing", "exp_alerts": []},
            {"eval_time": "2h", "alertname": "MpuJanitorAbortsFailing",
             "exp_alerts": [alert("MpuJanitorAbortsFailing", namespace="media", policy="p",
                                  store="S3", bucket="stuck")]},
            {"eval_time": "3h", "alertname": "MpuJanitorAbortsFailing",
             "exp_alerts": [alert("MpuJanitorAbortsFailing", namespace="media", policy="p",
                                  store="S3", bucket="stuck")]},
        ],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_incomplete_bytes_high(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    write_rules(tmp_path, rule_groups, annotations=False)

    def incomplete(bucket: str, values: str) -> dict[str, str]:
        labels = policy_labels("p", store="Glacier") + f', bucket="{bucket}"'
        return series("mpu_janitor_incomplete_upload_bytes", labels, values)

    tests = [{
        "interval": "1m",
        "input_series": [
            incomplete("big", f"{150 * GIB}+0x480"),
            incomplete("spike", f"{150 * GIB}+0x120 {GIB}+0x360"),
            incomplete("small", f"{GIB}+0x480"),
        ],
        "alert_rule_test": [
            {"eval_time": "5h", "alertname": "MpuJanitorIncompleteBytesHigh", "exp_alerts": []},
            {"eval_time": "7h", "alertname": "MpuJanitorIncompleteBytesHigh",
             "exp_alerts": [alert("MpuJanitorIncompleteBytesHigh", namespace="media",
                                  policy="p", store="Glacier", bucket="big")]},
        ],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_eligible_uploads_persist(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    write_rules(tmp_path, rule_groups, annotations=False)
    day = 86400

    def per_bucket(metric: str, bucket: str, value: float) -> dict[str, str]:
        labels = policy_labels("weekly") + f', bucket="{bucket}"'
        return series(f"mpu_janitor_{metric}", labels, f"{value}+0x120")

    tests = [{
        "interval": "1m",
        "input_series": [
            series("mpu_janitor_policy_older_than_seconds", policy_labels("weekly"),
                   f"{7 * day}+0x120"),
            # 15 days old with eligible uploads left: twice past the 7d limit.
            per_bucket("oldest_incomplete_upload_age_seconds", "stuck", 15 * day),
            per_bucket("eligible_uploads", "stuck", 3),
            # As old, but nothing eligible: the old upload is still receiving parts.
            per_bucket("oldest_incomplete_upload_age_seconds", "active", 15 * day),
            per_bucket("eligible_uploads", "active", 0),
            # Eligible uploads, but younger than twice the limit: the next sweep takes them.
            per_bucket("oldest_incomplete_upload_age_seconds", "behind", 10 * day),
            per_bucket("eligible_uploads", "behind", 5),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "MpuJanitorEligibleUploadsPersist",
             "exp_alerts": []},
            {"eval_time": "90m", "alertname": "MpuJanitorEligibleUploadsPersist",
             "exp_alerts": [alert("MpuJanitorEligibleUploadsPersist", namespace="media",
                                  policy="weekly", store="S3", bucket="stuck")]},
        ],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_and_suspended_policies_are_not_eligible_alerts(
    tmp_path: Path, rule_groups: list[dict[str, Any]]
) -> None:
    """A DryRun policy never aborts and a suspended one does not sweep: old eligible uploads
    are what their owners asked for, not an alert."""
    write_rules(tmp_path, rule_groups, annotations=False)
    day = 86400
    inputs = []
    for policy in ("enforced", "dry", "paused", "was-dry"):
        labels = policy_labels(policy)
        inputs += [
            series("mpu_janitor_policy_older_than_seconds", labels, f"{7 * day}+0x120"),
            series(
                "mpu_janitor_oldest_incomplete_upload_age_seconds",
                labels + ', bucket="b"',
                f"{15 * day}+0x120",
            ),
            series("mpu_janitor_eligible_uploads", labels + ', bucket="b"', "3+0x120"),
        ]
    inputs += [
        series("mpu_janitor_policy_dry_run", policy_labels("enforced"), "0+0x120"),
        series("mpu_janitor_policy_dry_run", policy_labels("dry"), "1+0x120"),
        series("mpu_janitor_policy_suspended", policy_labels("paused"), "1+0x120"),
        # Switched from DryRun to Abort at 10m: its eligible uploads must now go.
        series("mpu_janitor_policy_dry_run", policy_labels("was-dry"), "1x10 0+0x110"),
    ]
    tests = [{
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {"eval_time": "90m", "alertname": "MpuJanitorEligibleUploadsPersist",
             "exp_alerts": [
                 alert("MpuJanitorEligibleUploadsPersist", namespace="media", policy="enforced",
                       store="S3", bucket="b"),
                 alert("MpuJanitorEligibleUploadsPersist", namespace="media", policy="was-dry",
                       store="S3", bucket="b"),
             ]},
        ],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_policy_not_ready(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    """Fires when a policy has not been Ready for more than three of its own intervals, with the
    reason; not for a policy that is Ready again, nor one with a long interval, nor a suspended
    one. (mpu_janitor_policy_ready: 1 when Ready, 0 when not, labelled with the reason.)"""
    write_rules(tmp_path, rule_groups, annotations=False)
    hourly, daily = "3600+0x600", "86400+0x600"

    def ready(policy: str, reason: str, values: str) -> dict[str, str]:
        labels = f'{TARGET}, namespace="media", policy="{policy}", reason="{reason}"'
        return series("mpu_janitor_policy_ready", labels, values)

    tests = [{
        "interval": "1m",
        "input_series": [
            # Not Ready from the start (a missing Secret): 3h of a 1h interval, then `for`.
            series("mpu_janitor_policy_interval_seconds", policy_labels("broken"), hourly),
            ready("broken", "CredentialsNotFound", "0+0x600"),
            # Ready for 2h, then not: fires 3h after it was last Ready.
            series("mpu_janitor_policy_interval_seconds", policy_labels("lapsed"), hourly),
            ready("lapsed", "Swept", "1+0x120"),
            ready("lapsed", "StoreUnreachable", "_x120 0+0x480"),
            # Not Ready for 2h, then Ready again.
            series("mpu_janitor_policy_interval_seconds", policy_labels("recovered"), hourly),
            ready("recovered", "Throttled", "0+0x120"),
            ready("recovered", "Swept", "_x120 1+0x480"),
            # A daily policy not Ready for 10h: within three intervals.
            series("mpu_janitor_policy_interval_seconds", policy_labels("daily"), daily),
            ready("daily", "StoreUnreachable", "0+0x600"),
            # Suspended on purpose.
            series("mpu_janitor_policy_interval_seconds", policy_labels("paused"), hourly),
            series("mpu_janitor_policy_suspended", policy_labels("paused"), "1+0x600"),
            ready("paused", "Suspended", "0+0x600"),
        ],
        "alert_rule_test": [
            {"eval_time": "2h", "alertname": "MpuJanitorPolicyNotReady", "exp_alerts": []},
            {"eval_time": "4h", "alertname": "MpuJanitorPolicyNotReady",
             "exp_alerts": [alert("MpuJanitorPolicyNotReady", namespace="media", policy="broken",
                                  reason="CredentialsNotFound")]},
            {"eval_time": "6h", "alertname": "MpuJanitorPolicyNotReady",
             "exp_alerts": [
                 alert("MpuJanitorPolicyNotReady", namespace="media", policy="broken",
                       reason="CredentialsNotFound"),
                 alert("MpuJanitorPolicyNotReady", namespace="media", policy="lapsed",
                       reason="StoreUnreachable"),
             ]},
        ],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_keep_the_cluster_label(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    """With several clusters in one Prometheus (Thanos, Mimir), the same policy in two clusters
    is two alerts, each saying which cluster, and a healthy cluster does not hide a sick one."""
    write_rules(tmp_path, rule_groups, annotations=False)
    day = 86400

    def labels(cluster: str, bucket: str | None = None) -> str:
        text = f'cluster="{cluster}", {policy_labels("p")}'
        return text + (f', bucket="{bucket}"' if bucket else "")

    inputs = []
    for cluster, healthy in (("eu", False), ("us", True)):
        inputs += [
            series("mpu_janitor_policy_interval_seconds", labels(cluster), "3600+0x480"),
            series(
                "mpu_janitor_last_successful_sweep_timestamp_seconds",
                labels(cluster),
                "0+60x480" if healthy else "60+0x480",
            ),
            series(
                "mpu_janitor_aborted_uploads_total",
                labels(cluster, "b") + ', result="failed"',
                "0+0x480" if healthy else "0+1x480",
            ),
            series(
                "mpu_janitor_incomplete_upload_bytes",
                labels(cluster, "b"),
                f"{GIB if healthy else 150 * GIB}+0x480",
            ),
            series("mpu_janitor_policy_older_than_seconds", labels(cluster), f"{7 * day}+0x480"),
            series(
                "mpu_janitor_oldest_incomplete_upload_age_seconds",
                labels(cluster, "b"),
                f"{(1 if healthy else 15) * day}+0x480",
            ),
            series("mpu_janitor_eligible_uploads", labels(cluster, "b"), "3+0x480"),
            series(
                "mpu_janitor_policy_ready",
                f'cluster="{cluster}", {TARGET}, namespace="media", policy="p", '
                + ('reason="Swept"' if healthy else 'reason="StoreUnreachable"'),
                "1+0x480" if healthy else "0+0x480",
            ),
        ]
    eu = {"cluster": "eu", "namespace": "media", "policy": "p"}
    expected = {
        "MpuJanitorSweepsStale": {**eu, "store": "S3"},
        "MpuJanitorAbortsFailing": {**eu, "store": "S3", "bucket": "b"},
        "MpuJanitorIncompleteBytesHigh": {**eu, "store": "S3", "bucket": "b"},
        "MpuJanitorEligibleUploadsPersist": {**eu, "store": "S3", "bucket": "b"},
        "MpuJanitorPolicyNotReady": {**eu, "reason": "StoreUnreachable"},
    }
    tests = [{
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {"eval_time": "7h30m", "alertname": name, "exp_alerts": [alert(name, **labels)]}
            for name, labels in expected.items()
        ],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_absent(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    write_rules(tmp_path, rule_groups, annotations=False)
    up = f'job="{JOB}", namespace="{NAMESPACE}", instance="10.0.0.7:8080"'
    firing = [alert("MpuJanitorOperatorAbsent", job=JOB, namespace=NAMESPACE)]
    tests = [
        {   # Up all along.
            "interval": "1m",
            "input_series": [series("up", up, "1+0x60")],
            "alert_rule_test": [
                {"eval_time": "45m", "alertname": "MpuJanitorOperatorAbsent", "exp_alerts": []},
            ],
        },
        {   # Scraped, then down (crash loop): fires after `for`.
            "interval": "1m",
            "input_series": [series("up", up, "1x10 0x50")],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "MpuJanitorOperatorAbsent", "exp_alerts": []},
                {"eval_time": "45m", "alertname": "MpuJanitorOperatorAbsent",
                 "exp_alerts": firing},
            ],
        },
        {   # Two replicas with peering: one is down, the other is up.
            "interval": "1m",
            "input_series": [
                series("up", up, "1+0x60"),
                series("up", f'job="{JOB}", namespace="{NAMESPACE}", instance="10.0.0.8:8080"',
                       "0+0x60"),
            ],
            "alert_rule_test": [
                {"eval_time": "45m", "alertname": "MpuJanitorOperatorAbsent", "exp_alerts": []},
            ],
        },
        {   # Never scraped, only another job is up.
            "interval": "1m",
            "input_series": [series("up", 'job="other", namespace="ops"', "1+0x60")],
            "alert_rule_test": [
                {"eval_time": "45m", "alertname": "MpuJanitorOperatorAbsent",
                 "exp_alerts": firing},
            ],
        },
    ]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_annotations_render(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    """The templated annotations, as Alertmanager receives them, for one alert."""
    write_rules(tmp_path, rule_groups, annotations=True)
    labels = policy_labels("p", namespace="media") + ', bucket="uploads"'
    tests = [{
        "interval": "1m",
        "input_series": [
            series("mpu_janitor_incomplete_upload_bytes", labels, f"{150 * GIB}+0x480"),
        ],
        "alert_rule_test": [{
            "eval_time": "7h",
            "alertname": "MpuJanitorIncompleteBytesHigh",
            "exp_alerts": [{
                "exp_labels": {"namespace": "media", "policy": "p", "store": "S3",
                               "bucket": "uploads", "severity": "warning"},
                "exp_annotations": {
                    "summary": "Incomplete multipart uploads hold a lot of storage.",
                    "description": (
                        "Incomplete multipart uploads in uploads (policy media/p, S3) hold "
                        "150GiB, above 107374182400 bytes for 6h."
                    ),
                    "runbook_url": "https://example.com/runbooks#mpujanitorincompletebyteshigh",
                },
            }],
        }],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_wrong_expectation_fails(tmp_path: Path, rule_groups: list[dict[str, Any]]) -> None:
    """The harness can fail: an alert expected where the series say otherwise is reported."""
    write_rules(tmp_path, rule_groups, annotations=False)
    labels = policy_labels("p") + ', bucket="small"'
    tests = [{
        "interval": "1m",
        "input_series": [series("mpu_janitor_incomplete_upload_bytes", labels, f"{GIB}+0x480")],
        "alert_rule_test": [{
            "eval_time": "7h", "alertname": "MpuJanitorIncompleteBytesHigh",
            "exp_alerts": [alert("MpuJanitorIncompleteBytesHigh", namespace="media", policy="p",
                                 store="S3", bucket="small")],
        }],
    }]  # fmt: skip
    result = promtool_test(tmp_path, tests)
    assert result.returncode == 1
    assert "MpuJanitorIncompleteBytesHigh" in result.stdout + result.stderr
