"""The operator (``mpu-janitor operator`` in a subprocess) against a real kube-apiserver and a
real MinIO: the lifecycle of a policy as a user drives it with kubectl, an API server restart,
deletion while the operator is down, and the chart's RBAC as the only permissions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import make_upload, open_uploads
from tests.support.controlplane import ControlPlane, wait_for
from tests.support.minio import MinioServer
from tests.support.operator import (
    REPO,
    Operator,
    add_peering,
    add_secret,
    apply,
    events,
    policy,
    ready,
    running_operator,
    status,
)

AGE = 3.5  # seconds: older than the policies' olderThan of 2s on MinIO's 1 s Date clock


@pytest.fixture()
def admin_operator(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> Iterator[Operator]:
    control_plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/uploadlifecyclepolicies.mpu-janitor.dev",
    )
    with running_operator(control_plane.kubeconfig, [namespace], tmp_path) as operator:
        yield operator


def test_policy_lifecycle_with_kubectl(
    control_plane: ControlPlane,
    namespace: str,
    admin_operator: Operator,
    minio: MinioServer,
    s3: Any,
    bucket: str,
) -> None:
    plane = control_plane
    add_secret(plane, namespace, minio)
    make_upload(s3, bucket, "tmp/a.bin", [1000, 234])
    make_upload(s3, bucket, "keep/b.bin", [50])
    time.sleep(AGE)

    # Create: the first sweep runs at once.
    apply(
        plane,
        policy(
            "stale",
            namespace,
            minio.endpoint,
            bucket,
            match={"olderThan": "2s", "quietPeriod": "0s", "prefixes": ["tmp/"]},
        ),
    )
    wait_for(
        lambda: status(plane, namespace, "stale").get("lastSweep"), timeout=60, what="first sweep"
    )
    first = status(plane, namespace, "stale")
    assert first["lastSweep"]["aborted"] == 1
    assert first["lastSweep"]["freedBytes"] == 1234
    assert first["observedGeneration"] == 1
    assert ready(plane, namespace, "stale")["reason"] == "SweepSucceeded"
    assert {key for key, _ in open_uploads(s3, bucket)} == {"keep/b.bin"}
    table = plane.kubectl("get", "ulp", "-n", namespace).stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "STORE",
        "MODE",
        "SUSPEND",
        "READY",
        "LAST",
        "ABORTED",
        "FREED",
        "LAST",
        "SWEEP",
        "NEXT",
        "SWEEP",
        "AGE",
    ]
    # freed storage as a person reads it: 1234 bytes is 1.21Ki
    assert table[1].split()[:7] == ["stale", "S3", "Abort", "false", "True", "1", "1.21Ki"]
    reasons = [e["reason"] for e in events(plane, namespace, "stale")]
    assert reasons.count("SweepSucceeded") == 1
    # No finalizer: deleting the policy never waits for the operator.
    body = plane.kubectl_json("get", "ulp", "stale", "-n", namespace)
    assert not body["metadata"].get("finalizers")
    assert 'policy="stale"' in admin_operator.metrics()

    # Update: the spec change takes effect at once.
    plane.kubectl(
        "patch",
        "ulp",
        "stale",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"match": {"prefixes": ["tmp/", "keep/"]}}}),
    )
    wait_for(
        lambda: (
            status(plane, namespace, "stale").get("observedGeneration") == 2
            and status(plane, namespace, "stale")["lastSweep"]["freedBytes"] == 50
        ),
        timeout=60,
        what="sweep of generation 2",
    )
    assert status(plane, namespace, "stale")["totals"] == {
        "abortedUploads": 2,
        "freedBytes": 1284,
        "freed": "1.25Ki",
    }
    assert open_uploads(s3, bucket) == set()

    # Suspend: Ready True with reason Suspended; a sweep request is not acted on.
    plane.kubectl(
        "patch",
        "ulp",
        "stale",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": true}}',
    )
    wait_for(
        lambda: ready(plane, namespace, "stale").get("reason") == "Suspended",
        timeout=30,
        what="Suspended",
    )
    make_upload(s3, bucket, "tmp/c.bin", [9])
    time.sleep(AGE)
    plane.kubectl("annotate", "ulp", "stale", "-n", namespace, "mpu-janitor.dev/sweep-now=1")
    time.sleep(3)
    assert {key for key, _ in open_uploads(s3, bucket)} == {"tmp/c.bin"}

    # Resume, then trigger a sweep with the annotation (the interval is 1h).
    plane.kubectl(
        "patch",
        "ulp",
        "stale",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": false}}',
    )
    wait_for(lambda: not open_uploads(s3, bucket), timeout=60, what="sweep after resume")
    make_upload(s3, bucket, "tmp/d.bin", [11])
    time.sleep(AGE)
    plane.kubectl(
        "annotate", "ulp", "stale", "-n", namespace, "--overwrite", "mpu-janitor.dev/sweep-now=2"
    )
    wait_for(lambda: not open_uploads(s3, bucket), timeout=60, what="sweep-now")
    wait_for(
        lambda: status(plane, namespace, "stale").get("totals", {}).get("freedBytes") == 1304,
        timeout=30,
        what="totals after sweep-now",
    )
    metrics = admin_operator.metrics()
    assert (
        f'mpu_janitor_freed_bytes_total{{bucket="{bucket}",namespace="{namespace}",'
        f'policy="stale",store="S3"}} 1304.0'
    ) in metrics

    # Delete: returns at once, and the policy's series leave /metrics.
    # (kubectl fails if the object is not gone within 30 s: no finalizer holds it.)
    plane.kubectl("delete", "ulp", "stale", "-n", namespace, "--timeout=30s")
    wait_for(
        lambda: 'policy="stale"' not in admin_operator.metrics(),
        timeout=30,
        what="series of the deleted policy gone",
    )


def test_invalid_and_credential_problems_do_not_stop_others(
    control_plane: ControlPlane,
    namespace: str,
    admin_operator: Operator,
    minio: MinioServer,
    s3: Any,
    bucket: str,
) -> None:
    plane = control_plane
    add_secret(plane, namespace, minio)
    make_upload(s3, bucket, "x", [77])
    time.sleep(AGE)
    lost = policy("lost-secret", namespace, minio.endpoint, bucket, mode="DryRun")
    lost["spec"]["store"]["credentialsSecretRef"] = {"name": "does-not-exist"}
    apply(plane, lost)
    apply(plane, policy("good", namespace, minio.endpoint, bucket))
    wait_for(
        lambda: ready(plane, namespace, "lost-secret").get("reason") == "CredentialsNotFound",
        timeout=60,
        what="CredentialsNotFound",
    )
    assert "does-not-exist" in ready(plane, namespace, "lost-secret")["message"]
    wait_for(
        lambda: status(plane, namespace, "good").get("lastSweep"),
        timeout=60,
        what="the good policy's sweep",
    )
    assert status(plane, namespace, "good")["lastSweep"]["freedBytes"] == 77
    warnings = [e for e in events(plane, namespace, "lost-secret") if e["type"] == "Warning"]
    assert warnings and warnings[0]["reason"] == "CredentialsNotFound"
    assert minio.secret_key not in json.dumps(events(plane, namespace, "good"))


def test_broken_policies_show_in_status_events_and_metrics(
    control_plane: ControlPlane,
    namespace: str,
    admin_operator: Operator,
    minio: MinioServer,
    bucket: str,
) -> None:
    """Three policies the API server accepts but that cannot sweep: each is Ready=False with
    its reason (Stalled=True), has a Warning Event and series, right after it is created.
    (A region like "us east 1", once accepted and then refused by the store's client, is now
    refused by the schema itself; a port past 65535 is what only the policy model refuses.)"""
    plane = control_plane
    invalid = policy("outside", namespace, minio.endpoint, bucket)
    invalid["spec"]["store"] = {
        "type": "LILT",
        "lilt": {"inventoryPath": "/etc/mpu-janitor-escape.jsonl"},
        "credentialsSecretRef": {"name": "minio-creds"},
    }
    unopenable = policy("bad-port", namespace, minio.endpoint, bucket)
    unopenable["spec"]["store"]["s3"]["endpoint"] = "http://127.0.0.1:99999"
    unopenable["spec"]["store"].pop("credentialsSecretRef")
    no_secret = policy("no-secret", namespace, minio.endpoint, bucket)
    expected = {
        "outside": "InvalidSpec",
        "bad-port": "InvalidSpec",
        "no-secret": "CredentialsNotFound",
    }
    for document in (invalid, unopenable, no_secret):
        apply(plane, document)
    for name, reason in expected.items():
        wait_for(
            lambda name=name, reason=reason: ready(plane, namespace, name).get("reason") == reason,
            timeout=30,
            what=f"{name}: Ready reason {reason}",
        )
        conditions = {c["type"]: c for c in status(plane, namespace, name)["conditions"]}
        assert conditions["Ready"]["status"] == "False"
        assert conditions["Stalled"]["status"] == "True"
        assert conditions["Ready"]["observedGeneration"] == 1
        warnings = [e for e in events(plane, namespace, name) if e["type"] == "Warning"]
        assert [e["reason"] for e in warnings] == [reason], name
    assert "spec.store.s3.endpoint" in ready(plane, namespace, "bad-port")["message"]
    assert "inventoryPath" in ready(plane, namespace, "outside")["message"]
    text = admin_operator.metrics()
    for name, reason in expected.items():
        ready_series = [
            line
            for line in text.splitlines()
            if line.startswith("mpu_janitor_policy_ready{") and f'policy="{name}"' in line
        ]
        assert len(ready_series) == 1 and f'reason="{reason}"' in ready_series[0], text
        assert ready_series[0].endswith(" 0.0")
        errors = [
            line
            for line in text.splitlines()
            if line.startswith("mpu_janitor_sweep_errors_total{")
            and f'policy="{name}"' in line
            and f'reason="{reason}"' in line
        ]
        assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 1, text
    # The Secret is missing at every retry, but said so once.
    time.sleep(2)
    assert len([e for e in events(plane, namespace, "no-secret") if e["type"] == "Warning"]) == 1


def test_operator_resumes_after_apiserver_restart(
    control_plane: ControlPlane,
    namespace: str,
    admin_operator: Operator,
    minio: MinioServer,
    s3: Any,
    bucket: str,
) -> None:
    plane = control_plane
    add_secret(plane, namespace, minio)
    apply(plane, policy("steady", namespace, minio.endpoint, bucket))
    wait_for(
        lambda: status(plane, namespace, "steady").get("lastSweep"), timeout=60, what="first sweep"
    )

    ready_after = plane.restart_apiserver()
    restarted = time.monotonic()
    make_upload(s3, bucket, "after-restart", [5])
    time.sleep(AGE)
    plane.kubectl("annotate", "ulp", "steady", "-n", namespace, "mpu-janitor.dev/sweep-now=r1")
    wait_for(
        lambda: not open_uploads(s3, bucket),
        timeout=30,
        what="a sweep requested after the API server restart",
    )
    print(
        f"apiserver ready {ready_after:.1f}s after restart; "
        f"sweep done {time.monotonic() - restarted:.1f}s after that"
    )
    assert admin_operator.process.poll() is None


def test_deleting_a_namespace_never_waits_for_a_stopped_operator(
    control_plane: ControlPlane,
    make_namespace: Callable[[str], str],
    minio: MinioServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    plane = control_plane
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    doomed = make_namespace("doomed")
    add_secret(plane, doomed, minio)
    with running_operator(plane.kubeconfig, [doomed], tmp_path):
        apply(plane, policy("p", doomed, minio.endpoint, bucket))
        wait_for(lambda: status(plane, doomed, "p").get("lastSweep"), timeout=60, what="a sweep")
    # The operator is gone now; the namespace (and its policy) still go away.
    plane.kubectl("delete", "namespace", doomed, "--wait=false")
    wait_for(
        lambda: plane.kubectl("get", "namespace", doomed, check=False).returncode != 0,
        timeout=90,
        what="namespace deleted",
    )


def test_operator_runs_with_only_the_charts_rbac(
    control_plane: ControlPlane,
    make_namespace: Callable[[str], str],
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    plane = control_plane
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    watched = make_namespace("team")
    other = make_namespace("other")
    release_ns = make_namespace("janitor")
    plane.helm(
        "install",
        "janitor",
        str(REPO / "charts" / "mpu-janitor"),
        "-n",
        release_ns,
        "--set",
        f"watchNamespaces={{{watched}}}",
        "--skip-crds",
    )
    accounts = plane.kubectl_json("get", "serviceaccounts", "-n", release_ns)["items"]
    account = next(a["metadata"]["name"] for a in accounts if a["metadata"]["name"] != "default")
    kubeconfig = plane.service_account_kubeconfig(release_ns, account, create=False)
    add_secret(plane, watched, minio)
    add_secret(plane, other, minio)

    # The chart's identity may read Secrets where it watches, and nowhere else.
    def can(verb: str, resource: str, ns: str) -> str:
        result = plane.kubectl(
            "auth", "can-i", verb, resource, "-n", ns, kubeconfig=kubeconfig, check=False
        )
        return str(result.stdout.strip())

    assert can("get", "secrets", watched) == "yes"
    assert can("get", "secrets", other) == "no"
    denied = plane.kubectl(
        "get", "secret", "minio-creds", "-n", other, kubeconfig=kubeconfig, check=False
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    make_upload(s3, bucket, "old", [321])
    time.sleep(AGE)
    with running_operator(kubeconfig, [watched], tmp_path) as operator:
        apply(plane, policy("rbac", watched, minio.endpoint, bucket))
        wait_for(
            lambda: status(plane, watched, "rbac").get("lastSweep"),
            timeout=60,
            what="a sweep under the chart's RBAC",
        )
        assert status(plane, watched, "rbac")["lastSweep"]["freedBytes"] == 321
        assert [e["reason"] for e in events(plane, watched, "rbac")] == ["SweepSucceeded"]
        # The only refusal is Kopf's optional listing of namespaces, which falls back to the
        # namespaces it was given; everything the sweep needs was allowed.
        refused = [line for line in operator.output().splitlines() if "orbidden" in line]
        assert all(
            'resource "namespaces"' in line or "list namespaces" in line for line in refused
        ), refused
    plane.helm("uninstall", "janitor", "-n", release_ns)


def test_peering_keeps_one_replica_sweeping(
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    plane = control_plane
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    add_peering(plane, namespace, "janitors")
    add_secret(plane, namespace, minio)

    def swept_by(operator: Operator) -> bool:
        return 'operation="ListMultipartUploads"' in operator.metrics()

    with running_operator(
        plane.kubeconfig, [namespace], tmp_path, peering="janitors", priority=100
    ) as standby:
        with running_operator(
            plane.kubeconfig, [namespace], tmp_path, peering="janitors", priority=200
        ) as active:
            make_upload(s3, bucket, "early", [5])
            time.sleep(5)  # both have announced themselves in the peering object
            apply(plane, policy("shared", namespace, minio.endpoint, bucket))
            wait_for(
                lambda: status(plane, namespace, "shared").get("lastSweep"),
                timeout=60,
                what="a sweep",
            )
            time.sleep(3)
            assert swept_by(active)
            assert not swept_by(standby)
        # The active replica stopped (and left the peering object): the standby takes over.
        make_upload(s3, bucket, "late", [3])
        time.sleep(AGE)
        plane.kubectl(
            "annotate", "ulp", "shared", "-n", namespace, "mpu-janitor.dev/sweep-now=takeover"
        )
        wait_for(
            lambda: not open_uploads(s3, bucket),
            timeout=90,
            what="the standby sweeping after the active replica stopped",
        )
        assert swept_by(standby)
        # The standby continued from the totals its peer wrote, not from what it saw at start.
        wait_for(
            lambda: status(plane, namespace, "shared").get("handledSweepNow") == "takeover",
            timeout=30,
            what="the takeover sweep reported",
        )
        assert status(plane, namespace, "shared")["totals"] == {
            "abortedUploads": 2,
            "freedBytes": 8,
            "freed": "8",
        }


def test_sigkill_during_a_big_sweep_loses_nothing(
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    """SIGKILL the operator five times while it sweeps 5,000 uploads: the store ends as the
    policy says, nothing outside it is touched, and the status totals never count an upload
    twice and lose at most what was freed since the last checkpoint before each kill."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    plane = control_plane
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    add_secret(plane, namespace, minio)
    eligible, kept = 5000, 200
    sizes = {f"tmp/{i:05d}": 64 + i % 64 for i in range(eligible)}
    keep = {f"keep/{i:04d}": 10 for i in range(kept)}
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda item: make_upload(s3, bucket, item[0], [item[1]]), {**sizes, **keep}.items()
            )
        )
    keep_ids = {(k, u) for k, u in open_uploads(s3, bucket) if k.startswith("keep/")}
    assert len(keep_ids) == kept
    truth = sum(sizes.values())
    time.sleep(AGE)
    rps, checkpoint_seconds = 300, 1.0
    apply(
        plane,
        policy(
            "big",
            namespace,
            minio.endpoint,
            bucket,
            match={"olderThan": "2s", "quietPeriod": "0s", "prefixes": ["tmp/"]},
            limits={"requestsPerSecond": rps, "concurrency": 2},
        ),
    )
    env = {"MPU_JANITOR_PROGRESS_SECONDS": str(checkpoint_seconds)}
    rng = random.Random(9)
    kills: list[dict[str, int]] = []

    def totals() -> dict[str, int]:
        return dict(status(plane, namespace, "big").get("totals") or {})

    def finished() -> bool:
        last = status(plane, namespace, "big").get("lastSweep") or {}
        return bool(last.get("completionTime"))

    while len(kills) < 5 and not finished():
        before = totals().get("freedBytes", 0)
        with running_operator(plane.kubeconfig, [namespace], tmp_path, extra_env=env) as op:
            # Let at least one checkpoint of this run land, then kill at a random moment.
            wait_for(
                lambda before=before: totals().get("freedBytes", 0) > before or finished(),
                timeout=120,
                what="a checkpoint after the restart",
            )
            time.sleep(rng.uniform(0.2, 1.5))
            op.kill()
        remaining = sum(1 for k, _ in open_uploads(s3, bucket) if k.startswith("tmp/"))
        kills.append({"statusFreed": totals().get("freedBytes", 0), "remaining": remaining})
    with running_operator(plane.kubeconfig, [namespace], tmp_path, extra_env=env):
        wait_for(finished, timeout=300, what="the sweep to complete after the kills")
    final = totals()
    left = open_uploads(s3, bucket)
    print(f"\ncrash test: {eligible} eligible + {kept} kept uploads, {len(kills)} SIGKILLs")
    for number, kill in enumerate(kills, start=1):
        print(f"  kill {number}: status freedBytes {kill['statusFreed']}, {kill['remaining']} left")
    print(f"  truth freedBytes {truth}, status {final}, lost {truth - final['freedBytes']} bytes")
    assert len(kills) == 5, "the sweep finished before five kills"
    assert left == keep_ids  # every eligible upload gone, every other one untouched
    assert final["freedBytes"] <= truth and final["abortedUploads"] <= eligible
    # What one kill can lose: what was freed since the last checkpoint, at most `rps`
    # requests a second for `checkpoint_seconds` (one request per upload at the very least).
    per_checkpoint = int(rps * checkpoint_seconds * max(sizes.values()))
    assert truth - final["freedBytes"] <= len(kills) * per_checkpoint
