"""The Helm chart, rendered by the real helm: lint, the objects it makes, and its guards.

helm is built by scripts/build-binaries.sh into $MPU_JANITOR_BIN_DIR; a missing helm fails
these tests (it is never skipped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mpu_janitor.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mpu-janitor"
RELEASE, NAMESPACE = "janitor", "ops"
FULLNAME = "janitor-mpu-janitor"

# Every optional feature switched on.
ALL_FEATURES: dict[str, Any] = {
    "replicaCount": 2,
    "peering": {"enabled": True},
    "image": {"digest": "sha256:" + "a" * 64},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {"verbose": True, "extraArgs": ["--some-flag"]},
    "serviceAccount": {
        "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/janitor"}
    },
    "podAnnotations": {"example.com/a": "b"},
    "priorityClassName": "storage-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "storage", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "extraEnv": [{"name": "AWS_CA_BUNDLE", "value": "/etc/ca/ca.pem"}],
    "extraEnvFrom": [{"configMapRef": {"name": "proxy"}}],
    "extraVolumes": [{"name": "ca", "configMap": {"name": "ca"}}],
    "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca", "readOnly": True}],
    "serviceMonitor": {
        "enabled": True,
        "interval": "30s",
        "additionalLabels": {"release": "kube-prometheus-stack"},
    },
    "prometheusRule": {"enabled": True, "runbookBaseUrl": "https://example.com/runbooks"},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Storage"}},
}

POLICY_RULES = [
    {
        "apiGroups": ["mpu-janitor.dev"],
        "resources": ["uploadlifecyclepolicies"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["mpu-janitor.dev"],
        "resources": ["uploadlifecyclepolicies/status"],
        "verbs": ["get", "patch", "update"],
    },
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
]
CRD_DISCOVERY = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACE_WATCH = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
PEERING_VERBS = ["get", "list", "watch", "patch"]

ALERTS = {
    "MpuJanitorSweepsStale",
    "MpuJanitorAbortsFailing",
    "MpuJanitorIncompleteBytesHigh",
    "MpuJanitorEligibleUploadsPersist",
    "MpuJanitorPolicyNotReady",
    "MpuJanitorOperatorAbsent",
}
METRICS = {
    "incomplete_uploads",
    "incomplete_upload_bytes",
    "eligible_uploads",
    "eligible_upload_bytes",
    "oldest_incomplete_upload_age_seconds",
    "last_successful_sweep_timestamp_seconds",
    "policy_interval_seconds",
    "policy_older_than_seconds",
    "aborted_uploads_total",
    "freed_bytes_total",
    "store_requests_total",
    "sweep_errors_total",
    "sweep_duration_seconds_bucket",
    "sweep_duration_seconds_sum",
    "sweep_duration_seconds_count",
    "build_info",
}


def helm_binary(name: str = "helm") -> Path:
    candidates = [Path.home() / ".cache" / "mpu-janitor" / "bin" / name]
    if os.environ.get("MPU_JANITOR_BIN_DIR"):
        candidates.insert(0, Path(os.environ["MPU_JANITOR_BIN_DIR"]) / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"{name} not found at {candidates}: run scripts/build-binaries.sh {name}")


def helm(
    *args: str, values: dict[str, Any] | None = None, tmp_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = [str(helm_binary()), *args]
    if values is not None:
        assert tmp_path is not None
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        command += ["-f", str(values_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def render(
    tmp_path: Path, values: dict[str, Any] | None = None, *extra: str
) -> list[dict[str, Any]]:
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        *extra,
        values=values or {},
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def render_error(tmp_path: Path, values: dict[str, Any] | None = None, *extra: str) -> str:
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        *extra,
        values=values or {},
        tmp_path=tmp_path,
    )
    assert result.returncode != 0, "the chart rendered, but should have refused"
    return result.stderr


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (operator,) = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(operator)


def parsed_args(objects: list[dict[str, Any]]) -> Any:
    """The container's command line as the operator's own CLI parses it."""
    operator = container(objects)
    assert operator["command"] == ["mpu-janitor"]
    return build_parser().parse_args(operator["args"])


# --------------------------------------------------------------------------------------------


def test_lint_with_defaults_and_with_every_feature(tmp_path: Path) -> None:
    for values in ({}, ALL_FEATURES):
        result = helm("lint", "--strict", str(CHART), values=values, tmp_path=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_defaults_render_the_minimum(tmp_path: Path) -> None:
    objects = render(tmp_path)
    assert kinds(objects) == [
        "ClusterRole",
        "ClusterRole",  # <full name>-view, aggregated into the built-in view, edit and admin
        "ClusterRole",  # <full name>-edit, aggregated into the built-in edit and admin
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    for o in objects:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_deployment_defaults(tmp_path: Path) -> None:
    objects = render(tmp_path)
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    operator = container(objects)
    assert operator["image"] == "ghcr.io/mpu-janitor/mpu-janitor:0.1.0"
    security = operator["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert operator["ports"] == [{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert set(operator["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(operator["resources"]["requests"])
    assert "memory" in operator["resources"]["limits"]
    # The root filesystem is read-only: /tmp is a volume.
    assert {"name": "tmp", "mountPath": "/tmp"} in operator["volumeMounts"]
    args = parsed_args(objects)
    assert args.command == "operator"
    assert args.all_namespaces is True and args.namespace == []
    assert args.metrics_address == "0.0.0.0" and args.metrics_port == 8080
    assert args.standalone is True and args.peering is None
    assert args.verbose is False
    assert args.log_format == "text"
    service = only(objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 8080, "targetPort": "http-metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_cluster_wide_rbac_is_exact(tmp_path: Path) -> None:
    objects = render(tmp_path)
    role = only(objects, "ClusterRole", FULLNAME)
    assert role["rules"] == [*POLICY_RULES, CRD_DISCOVERY, NAMESPACE_WATCH]
    binding = only(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]


def test_every_rbac_rule_is_commented(tmp_path: Path) -> None:
    result = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--set",
        "peering.enabled=true",
        "--set",
        "watchNamespaces={a}",
    )
    assert result.returncode == 0, result.stderr
    for values in ([], ["--set", "peering.enabled=true"]):
        text = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values).stdout
        for rendered in (text, result.stdout):
            lines = [line.strip() for line in rendered.splitlines()]
            rules = [i for i, line in enumerate(lines) if line.startswith("- apiGroups:")]
            assert rules
            for index in rules:
                assert lines[index - 1].startswith("#"), (
                    f"uncommented rule: {lines[index : index + 3]}"
                )


def test_namespaced_mode_uses_roles(tmp_path: Path) -> None:
    objects = render(tmp_path, {"watchNamespaces": ["media", "backup"]})
    roles = [o for o in objects if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["backup", "media"]
    for role in roles:
        assert role["rules"] == POLICY_RULES
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["backup", "media"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    # Cluster-wide, only reading CRDs is left: no Secrets, no namespaces.
    cluster_role = only(objects, "ClusterRole", f"{FULLNAME}-crd-discovery")
    assert cluster_role["rules"] == [CRD_DISCOVERY]
    assert only(objects, "ClusterRoleBinding")["roleRef"]["name"] == f"{FULLNAME}-crd-discovery"
    args = parsed_args(objects)
    assert args.namespace == ["media", "backup"] and args.all_namespaces is False


def test_more_replicas_need_peering(tmp_path: Path) -> None:
    error = render_error(tmp_path, {"replicaCount": 2})
    assert "replicaCount is 2" in error and "peering.enabled=true" in error
    objects = render(tmp_path, {"replicaCount": 2, "peering": {"enabled": True}})
    assert only(objects, "Deployment")["spec"]["replicas"] == 2
    args = parsed_args(objects)
    assert args.peering == FULLNAME and args.standalone is False
    peering = only(objects, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1"
    assert peering["metadata"]["name"] == FULLNAME
    assert only(objects, "ClusterRole", FULLNAME)["rules"][-1] == {
        "apiGroups": ["kopf.dev"],
        "resources": ["clusterkopfpeerings"],
        "verbs": PEERING_VERBS,
    }


def test_namespaced_peering(tmp_path: Path) -> None:
    objects = render(
        tmp_path,
        {"watchNamespaces": ["media", "backup"], "peering": {"enabled": True, "name": "janitors"}},
    )
    peerings = [o for o in objects if o["kind"] == "KopfPeering"]
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == [
        ("backup", "janitors"),
        ("media", "janitors"),
    ]
    assert not [o for o in objects if o["kind"] == "ClusterKopfPeering"]
    for role in (o for o in objects if o["kind"] == "Role"):
        assert role["rules"] == [
            *POLICY_RULES,
            {
                "apiGroups": ["kopf.dev"],
                "resources": ["kopfpeerings"],
                "verbs": PEERING_VERBS,
            },
        ]
    assert parsed_args(objects).peering == "janitors"


def test_values_schema_rejects_a_typo(tmp_path: Path) -> None:
    error = render_error(tmp_path, {"replicaCont": 2})
    assert "values don't meet the specifications of the schema" in error
    assert "replicaCont" in error
    nested = render_error(tmp_path, {"serviceMonitor": {"enabeld": True}})
    assert "enabeld" in nested


def test_values_schema_rejects_a_wrong_type(tmp_path: Path) -> None:
    error = render_error(tmp_path, {"replicaCount": "two"})
    assert "replicaCount" in error
    assert re.search(r"expected integer|want integer|got string", error), error
    error = render_error(tmp_path, {"watchNamespaces": "media"})
    assert "watchNamespaces" in error


def test_values_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)

    def paths(value: Any, node: dict[str, Any], prefix: str) -> Iterator[str]:
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{prefix or '.'} is open"
            assert set(value) <= set(node["properties"]), prefix
            missing = set(node["properties"]) - set(value) - {"global", "rollingUpdate"}
            assert not missing, f"schema-only values under {prefix or '.'}: {missing}"
            for key, child in value.items():
                yield from paths(child, node["properties"][key], f"{prefix}.{key}")
        else:
            assert node.get("description"), f"{prefix} has no description"
            yield prefix

    assert len(list(paths(values, schema, ""))) > 50


def test_every_feature_on(tmp_path: Path) -> None:
    objects = render(tmp_path, ALL_FEATURES)
    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(objects)
    assert operator["image"] == "ghcr.io/mpu-janitor/mpu-janitor@sha256:" + "a" * 64
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["priorityClassName"] == "storage-critical"
    assert pod["nodeSelector"] == ALL_FEATURES["nodeSelector"]
    assert pod["tolerations"] == ALL_FEATURES["tolerations"]
    assert pod["affinity"] == ALL_FEATURES["affinity"]
    assert {"name": "ca", "configMap": {"name": "ca"}} in pod["volumes"]
    assert ALL_FEATURES["extraVolumeMounts"][0] in operator["volumeMounts"]
    assert ALL_FEATURES["extraEnv"][0] in operator["env"]
    assert operator["envFrom"] == ALL_FEATURES["extraEnvFrom"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"example.com/a": "b"}
    assert operator["args"][-1] == "--some-flag"
    args = build_parser().parse_args(operator["args"][:-1])
    assert args.verbose is True and args.peering == FULLNAME
    account = only(objects, "ServiceAccount")
    assert account["metadata"]["annotations"] == ALL_FEATURES["serviceAccount"]["annotations"]

    monitor = only(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"]
        == (deployment["spec"]["selector"]["matchLabels"])
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "http-metrics", "path": "/metrics", "honorLabels": True, "interval": "30s"}
    ]

    rule = only(objects, "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == ALERTS
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("critical", "warning")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"] == (
            f"https://example.com/runbooks#{name.lower()}"
        )
        assert alert["for"]
    assert alerts["MpuJanitorOperatorAbsent"]["labels"]["severity"] == "critical"
    assert (
        f'job="{FULLNAME}", namespace="{NAMESPACE}"' in (alerts["MpuJanitorOperatorAbsent"]["expr"])
    )
    assert "> 107374182400" in alerts["MpuJanitorIncompleteBytesHigh"]["expr"]

    dashboard = only(objects, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Storage"}
    shipped = json.loads((CHART / "dashboards" / "mpu-janitor.json").read_text())
    assert json.loads(dashboard["data"]["mpu-janitor.json"]) == {
        **shipped,
        "uid": FULLNAME,
        "title": f"mpu-janitor ({FULLNAME})",
    }


def test_monitoring_objects_only_when_enabled(tmp_path: Path) -> None:
    switches = {
        "serviceMonitor": "ServiceMonitor",
        "prometheusRule": "PrometheusRule",
        "grafanaDashboard": "ConfigMap",
    }
    default = kinds(render(tmp_path))
    for value, kind in switches.items():
        assert kind not in default
        objects = render(tmp_path, {value: {"enabled": True}})
        assert kinds(objects).count(kind) == 1
        assert sorted(set(kinds(objects)) - set(default)) == [kind]


def test_alerts_can_be_tuned_and_switched_off(tmp_path: Path) -> None:
    objects = render(
        tmp_path,
        {
            "prometheusRule": {
                "enabled": True,
                "additionalAlertLabels": {"team": "storage"},
                "rules": {
                    "sweepsStale": {"enabled": False, "severity": "warning", "for": "15m"},
                    "incompleteBytesHigh": {
                        "enabled": True,
                        "severity": "critical",
                        "for": "2h",
                        "thresholdBytes": 1000,
                    },
                },
            }
        },
    )
    alerts = {r["alert"]: r for r in only(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert set(alerts) == ALERTS - {"MpuJanitorSweepsStale"}
    bytes_high = alerts["MpuJanitorIncompleteBytesHigh"]
    assert bytes_high["for"] == "2h" and "> 1000\n" in bytes_high["expr"]
    assert bytes_high["labels"] == {"severity": "critical", "team": "storage"}
    # Runbooks are on by default: the chart README's sections.
    assert bytes_high["annotations"]["runbook_url"] == (
        "https://github.com/mpu-janitor/mpu-janitor/blob/main/charts/mpu-janitor/README.md"
        "#mpujanitorincompletebyteshigh"
    )
    objects = render(tmp_path, {"prometheusRule": {"enabled": True, "runbookBaseUrl": ""}})
    for rule in only(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]:
        assert "runbook_url" not in rule["annotations"], rule["alert"]


def test_alerts_have_runbooks_in_the_readme() -> None:
    readme = (CHART / "README.md").read_text()
    for alert in ALERTS:
        section = re.search(rf"^### {alert}\n(.*?)(?=^##)", readme, re.S | re.M)
        assert section, f"no runbook section for {alert}"
        for part in ("**Severity**", "**Fires when**", "**Impact**", "**Diagnose**"):
            assert part in section.group(1), (alert, part)


def test_dashboard_shows_the_contract_panels() -> None:
    dashboard = json.loads((CHART / "dashboards" / "mpu-janitor.json").read_text())
    by_title = {p["title"]: p for p in dashboard["panels"]}
    assert {
        "Freed bytes over time",
        "Incomplete bytes by bucket",
        "Aborts by result",
        "Sweep duration",
        "Sweep errors by reason",
    } <= set(by_title)
    assert (
        "mpu_janitor_freed_bytes_total" in by_title["Freed bytes over time"]["targets"][0]["expr"]
    )
    assert "by (result)" in by_title["Aborts by result"]["targets"][0]["expr"]
    assert "by (reason)" in by_title["Sweep errors by reason"]["targets"][0]["expr"]
    assert "bucket" in by_title["Incomplete bytes by bucket"]["targets"][0]["expr"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"mpu_janitor_([a-z_]+)", target["expr"]))
            assert used and used <= METRICS, (panel["title"], used - METRICS)


def test_the_crd_upgrade_path_is_documented() -> None:
    """Helm never upgrades crds/: the README and the install notes say what to run instead, in a
    form that works from a chart repository or a packaged .tgz (no checkout needed)."""
    command = "| kubectl apply --server-side --force-conflicts -f -"
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    readme = (CHART / "README.md").read_text()
    assert "helm show crds" in notes and command in notes
    assert "charts/mpu-janitor/crds" not in notes
    assert "## Upgrading the CRDs" in readme and "never upgrades" in readme
    section = readme[readme.index("## Upgrading the CRDs") :]
    assert re.search(r"helm show crds \S+ --version \S+ \\?\s*" + re.escape(command), section)


def test_kube_version_is_declared_and_checked(tmp_path: Path) -> None:
    """The chart says which Kubernetes it needs (the CRD's CEL rules: 1.29), and helm refuses an
    older one; without --kube-version helm assumes the Kubernetes its release was built for."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.29.0-0"
    render(tmp_path)
    error = render_error(tmp_path, {}, "--kube-version", "1.28.0")
    assert "chart requires kubeVersion: >=1.29.0-0" in error
    assert kinds(render(tmp_path, {}, "--kube-version", "1.29.3")).count("Deployment") == 1


def test_grace_period_outlasts_the_operators_own_shutdown_waits(tmp_path: Path) -> None:
    """On SIGTERM the scheduler waits for running sweeps, then for status writes: Kubernetes must
    not kill the pod before those waits are over."""
    stop = (ROOT / "operator" / "mpu_janitor" / "scheduler.py").read_text()
    stop = stop[stop.index("async def stop(") :]
    stop = stop[: stop.index("\n    def ") if "\n    def " in stop else None]
    waits = [int(t) for t in re.findall(r"asyncio\.wait\([^)]*timeout=(\d+)\)", stop)]
    assert waits, "the scheduler's shutdown waits were not found"
    pod = only(render(tmp_path), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= sum(waits) + 15


def test_pod_id_is_not_set_for_nothing(tmp_path: Path) -> None:
    """The operator passes its own identity (host name and a random suffix) to Kopf, so a POD_ID
    variable would be read by nobody."""
    source = (ROOT / "operator" / "mpu_janitor" / "handlers.py").read_text()
    assert '"identity": config.identity' in source
    env = container(render(tmp_path)).get("env", [])
    assert "POD_ID" not in {e["name"] for e in env}


def test_disruption_budget_with_peering(tmp_path: Path) -> None:
    assert "PodDisruptionBudget" not in kinds(render(tmp_path))
    objects = render(tmp_path, {"replicaCount": 2, "peering": {"enabled": True}})
    budget = only(objects, "PodDisruptionBudget")
    deployment = only(objects, "Deployment")
    assert budget["metadata"]["namespace"] == NAMESPACE
    assert budget["spec"]["maxUnavailable"] == 1
    assert (
        budget["spec"]["selector"]["matchLabels"] == (deployment["spec"]["selector"]["matchLabels"])
    )
    peering = {"replicaCount": 3, "peering": {"enabled": True}}
    tuned = render(tmp_path, {**peering, "podDisruptionBudget": {"minAvailable": 2}})
    assert only(tuned, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 2,
        "selector": budget["spec"]["selector"],
    }
    off = render(tmp_path, {**peering, "podDisruptionBudget": {"enabled": False}})
    assert "PodDisruptionBudget" not in kinds(off)


def test_namespace_override_moves_every_namespaced_object(tmp_path: Path) -> None:
    values = {
        "namespaceOverride": "storage-ops",
        "replicaCount": 2,
        "peering": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    }
    objects = render(tmp_path, values)
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"):
            assert "namespace" not in obj["metadata"], obj["kind"]
        else:
            assert obj["metadata"]["namespace"] == "storage-ops", obj["kind"]
    (subject,) = only(objects, "ClusterRoleBinding")["subjects"]
    assert subject["namespace"] == "storage-ops"
    monitor = only(objects, "ServiceMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["storage-ops"]}
    rule = only(objects, "PrometheusRule")
    absent = [r for r in rule["spec"]["groups"][0]["rules"] if r["alert"].endswith("Absent")]
    assert 'namespace="storage-ops"' in absent[0]["expr"]


def test_deployment_annotations(tmp_path: Path) -> None:
    annotations = {"reloader.stakater.com/auto": "true"}
    deployment = only(render(tmp_path, {"deploymentAnnotations": annotations}), "Deployment")
    assert deployment["metadata"]["annotations"] == annotations
    assert "annotations" not in only(render(tmp_path), "Deployment")["metadata"]


def test_readme_values_table_is_generated_from_values_yaml() -> None:
    """The README's values table is helm-docs' rendering of the `# --` comments: regenerating it
    changes nothing, and every value has a description."""
    result = subprocess.run(
        [str(helm_binary("helm-docs")), "--chart-search-root", str(CHART), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    readme = (CHART / "README.md").read_text()
    assert result.stdout == readme, (
        "charts/mpu-janitor/README.md differs from what helm-docs generates from values.yaml "
        "and README.md.gotmpl: run helm-docs --chart-search-root charts"
    )
    table = readme[readme.index("| Key | Type | Default | Description |") :]
    rows = [line.split(" | ") for line in table.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) > 60
    for key, _type, _default, description in rows:
        assert description.strip(" |"), f"{key.strip('| ')} has no `# --` description"


def test_dashboard_filters_by_cluster_and_job() -> None:
    """In a Prometheus that holds several clusters or several operator releases, the dashboard
    shows one cluster and one job at a time (or all of them)."""
    dashboard = json.loads((CHART / "dashboards" / "mpu-janitor.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names.index("cluster") < names.index("job") < names.index("namespace")
    for name in ("cluster", "job"):
        assert variables[name]["includeAll"] is True and variables[name]["allValue"] == ".*"
    assert 'cluster=~"$cluster"' in variables["job"]["definition"]
    assert 'job=~"$job"' in variables["namespace"]["definition"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for selector in re.findall(r"mpu_janitor_[a-z_]+\{([^}]*)\}", target["expr"]):
                assert 'cluster=~"$cluster"' in selector, panel["title"]
                assert 'job=~"$job"' in selector, panel["title"]


def test_two_releases_have_two_dashboards(tmp_path: Path) -> None:
    def dashboard(release: str, values: dict[str, Any]) -> dict[str, Any]:
        result = helm(
            "template", release, str(CHART), "--namespace", NAMESPACE,
            values={"grafanaDashboard": {"enabled": True, **values}}, tmp_path=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        (config,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "ConfigMap"]
        parsed: dict[str, Any] = json.loads(config["data"]["mpu-janitor.json"])
        return parsed

    first, second = dashboard("mpu-janitor", {}), dashboard("janitor-eu", {})
    assert first["uid"] == "mpu-janitor"
    assert second["uid"] == "janitor-eu-mpu-janitor"
    assert first["title"] != second["title"]
    custom = dashboard("janitor-eu", {"uid": "storage-janitor", "title": "Storage janitor"})
    assert (custom["uid"], custom["title"]) == ("storage-janitor", "Storage janitor")
    shipped = json.loads((CHART / "dashboards" / "mpu-janitor.json").read_text())
    assert {**custom, "uid": shipped["uid"], "title": shipped["title"]} == shipped


def permission_blocks() -> dict[str, list[dict[str, Any]]]:
    """The JSON policies of the README's "Permissions per store", by store heading."""
    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Permissions per store") :]
    section = section[: section.index("\n## ", 1)]
    blocks: dict[str, list[dict[str, Any]]] = {}
    for part in re.split(r"^### ", section, flags=re.M)[1:]:
        heading = part.splitlines()[0]
        blocks[heading] = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", part, re.S)]
    return blocks


def allowed_actions(document: dict[str, Any]) -> set[str]:
    statements = document.get("Statement") or document.get("statement") or []
    actions: set[str] = set()
    for statement in statements:
        found = statement.get("Action") or statement.get("action")
        actions |= {found} if isinstance(found, str) else set(found)
    return actions


def test_readme_gives_least_privilege_policies_per_store() -> None:
    """Each store's policy allows exactly the calls its store module makes, and parses."""
    source = (ROOT / "operator" / "mpu_janitor" / "stores" / "s3.py").read_text()
    # called, or passed on to be called (functools.partial(self._send, self.client.x, ...))
    s3_calls = set(re.findall(r"client\.([a-z_]+)[(,]", source))
    s3_calls |= set(re.findall(r'get_paginator\("([a-z_]+)"\)', source))
    s3_calls -= {"close", "get_paginator"}
    s3_permission = {
        "list_buckets": "s3:ListAllMyBuckets",
        "list_multipart_uploads": "s3:ListBucketMultipartUploads",
        "list_parts": "s3:ListMultipartUploadParts",
        "abort_multipart_upload": "s3:AbortMultipartUpload",
        "head_object": "s3:GetObject",
    }
    assert s3_calls == set(s3_permission), "a new S3 call needs its permission in the README"
    blocks = permission_blocks()
    (aws,) = blocks["AWS S3 (general purpose buckets)"]
    assert allowed_actions(aws) == set(s3_permission.values())
    (express,) = blocks["AWS S3 directory buckets (S3 Express One Zone)"]
    assert allowed_actions(express) == {"s3express:CreateSession"}
    (minio,) = blocks["MinIO"]
    assert allowed_actions(minio) == {
        "s3:ListBucketMultipartUploads",
        "s3:ListMultipartUploadParts",
        "s3:AbortMultipartUpload",
    }
    glacier_source = (ROOT / "operator" / "mpu_janitor" / "stores" / "glacier.py").read_text()
    glacier_calls = set(re.findall(r"client\.([a-z_]+)\(", glacier_source)) - {"close"}
    (glacier,) = blocks["Amazon S3 Glacier vaults"]
    assert allowed_actions(glacier) == {
        "glacier:" + "".join(word.title() for word in call.split("_")) for call in glacier_calls
    }
    (compatible,) = blocks["Ceph RGW and Scality"]
    assert "s3:GetObject" in allowed_actions(compatible)
    (cos,) = blocks["Tencent COS"]
    assert {"name/cos:ListMultipartUploads", "name/cos:AbortMultipartUpload"} <= (
        allowed_actions(cos)
    )
    assert "LILT" in blocks


def test_the_minio_example_can_act_before_minio_itself() -> None:
    """MinIO aborts uploads older than 24h on its own: the example's age limit is below that,
    and it says why."""
    text = (ROOT / "examples" / "minio.yaml").read_text()
    policy = yaml.safe_load(text)
    older_than = policy["spec"]["match"]["olderThan"]
    value, unit = int(older_than[:-1]), older_than[-1]
    assert value * {"m": 1 / 60, "h": 1, "d": 24}[unit] < 24
    assert "stale_uploads_expiry" in text
    readme = (CHART / "README.md").read_text()
    assert "MINIO_API_STALE_UPLOADS_EXPIRY" in readme


def test_log_format_value_reaches_the_operator(tmp_path: Path) -> None:
    objects = render(tmp_path, values={"operator": {"logFormat": "json"}})
    assert parsed_args(objects).log_format == "json"


def test_tenancy_values(tmp_path: Path) -> None:
    """Ambient credentials: the release namespace by default, the listed ones, or none;
    the endpoint allow-list as given; the operator learns its namespace from the downward API."""
    objects = render(tmp_path)
    env = container(objects)["env"]
    assert {
        "name": "POD_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    } in env
    args = parsed_args(objects)
    assert args.ambient_credentials_namespaces == NAMESPACE
    assert args.allowed_endpoints == []
    values = {
        "credentials": {
            "ambientNamespaces": ["ops", "platform"],
            "allowedEndpoints": [r"https://s3\.[a-z0-9-]+\.amazonaws\.com", "http://minio:9000"],
        },
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
    }
    objects = render(tmp_path, values)
    args = parsed_args(objects)
    assert args.ambient_credentials_namespaces == "ops,platform"
    assert args.allowed_endpoints == values["credentials"]["allowedEndpoints"]
    env = container(objects)["env"]
    assert [e["name"] for e in env] == ["POD_NAMESPACE", "HTTPS_PROXY"]
    none = parsed_args(render(tmp_path, {"credentials": {"ambientNamespaces": []}}))
    assert none.ambient_credentials_namespaces == ""


# -- tenants' roles, fairness, metrics access, NetworkPolicy ------------------------------------

SECURITY_FEATURES: dict[str, Any] = {
    "metrics": {
        "tls": {"secretName": "metrics-tls"},
        "auth": {
            "mode": "kubernetes",
            "readers": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": "mon"}],
        },
    },
    "networkPolicy": {"enabled": True, "egress": {"apiServer": {"cidrs": ["10.0.0.1/32"]}}},
    "serviceMonitor": {"enabled": True},
}


def test_lint_with_every_security_feature(tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(CHART), values=SECURITY_FEATURES, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tenants_get_policies_through_the_built_in_roles_but_never_the_status(
    tmp_path: Path,
) -> None:
    objects = render(tmp_path)
    view = only(objects, "ClusterRole", f"{FULLNAME}-view")
    edit = only(objects, "ClusterRole", f"{FULLNAME}-edit")
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in view["metadata"]["labels"].items() if k.startswith(aggregate)} == {
        aggregate + "view",
        aggregate + "edit",
        aggregate + "admin",
    }
    assert {k for k, v in edit["metadata"]["labels"].items() if k.startswith(aggregate)} == {
        aggregate + "edit",
        aggregate + "admin",
    }
    assert all(v == "true" for k, v in edit["metadata"]["labels"].items() if aggregate in k)
    assert view["rules"] == [
        {
            "apiGroups": ["mpu-janitor.dev"],
            "resources": ["uploadlifecyclepolicies"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert edit["rules"] == [
        {
            "apiGroups": ["mpu-janitor.dev"],
            "resources": ["uploadlifecyclepolicies"],
            "verbs": ["create", "update", "patch", "delete", "deletecollection"],
        }
    ]
    off = render(tmp_path, {"rbac": {"aggregateToView": False, "aggregateToEdit": False}})
    names = {o["metadata"]["name"] for o in off if o["kind"] == "ClusterRole"}
    assert names == {FULLNAME}
    # The tenants' roles do not depend on the operator's own RBAC being created here.
    alone = render(tmp_path, {"rbac": {"create": False}})
    assert {o["metadata"]["name"] for o in alone if o["kind"] == "ClusterRole"} == {
        f"{FULLNAME}-view",
        f"{FULLNAME}-edit",
    }


def test_fairness_values_reach_the_operator(tmp_path: Path) -> None:
    args = parsed_args(render(tmp_path))
    assert args.namespace_max_concurrent_sweeps == 4
    assert args.namespace_max_requests_per_second == 200
    args = parsed_args(
        render(
            tmp_path,
            {"fairness": {"namespaceMaxConcurrentSweeps": 0, "namespaceMaxRequestsPerSecond": 2.5}},
        )
    )
    assert (args.namespace_max_concurrent_sweeps, args.namespace_max_requests_per_second) == (
        0,
        2.5,
    )
    error = render_error(tmp_path, {"fairness": {"namespaceMaxConcurrentSweeps": -1}})
    assert "namespaceMaxConcurrentSweeps" in error


def test_metrics_stay_plain_http_without_review_rbac_by_default(tmp_path: Path) -> None:
    objects = render(tmp_path, {"serviceMonitor": {"enabled": True}})
    args = parsed_args(objects)
    assert args.metrics_auth == "none" and args.metrics_tls_cert is None
    assert not [o for o in objects if "metrics" in o["metadata"]["name"]]
    rules = [r for o in objects if o["kind"] == "ClusterRole" for r in o["rules"]]
    assert not [r for r in rules if "tokenreviews" in r.get("resources", [])]
    endpoint = only(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    assert "scheme" not in endpoint and "bearerTokenFile" not in endpoint


def test_metrics_over_https_with_kubernetes_authorisation(tmp_path: Path) -> None:
    objects = render(tmp_path, SECURITY_FEATURES)
    args = parsed_args(objects)
    assert args.metrics_auth == "kubernetes"
    assert args.metrics_tls_cert == "/etc/mpu-janitor/metrics-tls/tls.crt"
    assert args.metrics_tls_key == "/etc/mpu-janitor/metrics-tls/tls.key"
    operator = container(objects)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "metrics-tls", "secret": {"secretName": "metrics-tls"}} in pod["volumes"]
    assert {
        "name": "metrics-tls",
        "mountPath": "/etc/mpu-janitor/metrics-tls",
        "readOnly": True,
    } in operator["volumeMounts"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"]["scheme"] == "HTTPS"
    reviews = only(objects, "ClusterRole", f"{FULLNAME}-metrics-auth")
    assert reviews["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {
            "apiGroups": ["authorization.k8s.io"],
            "resources": ["subjectaccessreviews"],
            "verbs": ["create"],
        },
    ]
    binding = only(objects, "ClusterRoleBinding", f"{FULLNAME}-metrics-auth")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]
    reader = only(objects, "ClusterRole", f"{FULLNAME}-metrics-reader")
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    readers = only(objects, "ClusterRoleBinding", f"{FULLNAME}-metrics-reader")
    assert readers["subjects"] == SECURITY_FEATURES["metrics"]["auth"]["readers"]
    endpoint = only(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    # In namespaced mode the reviews are still cluster-scoped: the same ClusterRole.
    scoped = render(tmp_path, {**SECURITY_FEATURES, "watchNamespaces": ["media"]})
    assert only(scoped, "ClusterRole", f"{FULLNAME}-metrics-auth")["rules"] == reviews["rules"]
    error = render_error(tmp_path, {"metrics": {"auth": {"mode": "kubernetes"}}})
    assert "metrics.auth.mode=kubernetes needs metrics.tls.secretName" in error


def test_network_policy_lets_in_prometheus_only_and_out_to_dns_api_and_stores(
    tmp_path: Path,
) -> None:
    assert not [o for o in render(tmp_path) if o["kind"] == "NetworkPolicy"]
    error = render_error(tmp_path, {"networkPolicy": {"enabled": True}})
    assert "networkPolicy.egress.apiServer.cidrs" in error
    objects = render(tmp_path, SECURITY_FEATURES)
    policy = only(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == only(objects, "Deployment")["spec"]["selector"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress == {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
            }
        ],
        "ports": [{"port": "http-metrics", "protocol": "TCP"}],
    }
    dns, api, stores = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert stores == {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }
    custom = render(
        tmp_path,
        {
            "networkPolicy": {
                "enabled": True,
                "egress": {
                    "apiServer": {"cidrs": ["192.168.0.10/32"]},
                    "stores": [{"cidr": "10.20.0.0/16", "ports": [{"port": 9000}]}],
                    "extra": [{"to": [{"ipBlock": {"cidr": "10.30.0.5/32"}}]}],
                },
            }
        },
    )
    egress = only(custom, "NetworkPolicy")["spec"]["egress"]
    assert egress[2] == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 9000}]}
    assert egress[3] == {"to": [{"ipBlock": {"cidr": "10.30.0.5/32"}}]}
