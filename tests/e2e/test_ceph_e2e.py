"""The operator (``mpu-janitor operator`` in a subprocess) on a real kube-apiserver against a
real Ceph RADOS Gateway, once: the policy of ``examples/ceph-rgw.yaml`` (pointed at the test
cluster) sweeps, the status says what was aborted and freed, and /metrics agrees."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mpu_janitor.status import quantity
from tests.e2e.test_operator_e2e import (
    REPO,
    Operator,
    apply,
    events,
    ready,
    running_operator,
    status,
)
from tests.integration.helpers import make_upload, open_uploads
from tests.support.ceph import CephCluster
from tests.support.controlplane import ControlPlane, wait_for

AGE = 3.5  # seconds: older than the policy's olderThan of 2s on the RGW's 1 s Date clock


def samples(operator: Operator, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(operator.metrics()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def example_policy(namespace: str, ceph: CephCluster, bucket: str) -> dict[str, Any]:
    """examples/ceph-rgw.yaml as shipped, pointed at the test cluster, with second-scale ages."""
    document: dict[str, Any] = yaml.safe_load((REPO / "examples" / "ceph-rgw.yaml").read_text())
    spec = document["spec"]
    assert spec["store"]["s3"]["profile"] == "Ceph"
    document["metadata"]["namespace"] = namespace
    spec["store"]["s3"]["endpoint"] = ceph.endpoint
    spec["store"]["s3"]["buckets"] = [bucket]
    spec["match"]["olderThan"] = "2s"
    spec["match"]["quietPeriod"] = "0s"
    return document


def test_operator_sweeps_ceph_with_the_example_policy(
    control_plane: ControlPlane, namespace: str, ceph: CephCluster, tmp_path: Path
) -> None:
    plane = control_plane
    s3 = ceph.client()
    bucket = f"e2e-{namespace}"
    s3.create_bucket(Bucket=bucket)
    make_upload(s3, bucket, "tmp/a.bin", [1000, 234])
    make_upload(s3, bucket, "registry/layer", [5 * 1024 * 1024, 66])
    other_bucket = f"e2e-other-{namespace}"  # not in the policy: never touched
    s3.create_bucket(Bucket=other_bucket)
    elsewhere = make_upload(s3, other_bucket, "tmp/a.bin", [7])
    time.sleep(AGE)

    document = example_policy(namespace, ceph, bucket)
    name = document["metadata"]["name"]
    secret = document["spec"]["store"]["credentialsSecretRef"]["name"]
    apply(
        plane,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret, "namespace": namespace},
            "stringData": {
                "AWS_ACCESS_KEY_ID": ceph.access_key,
                "AWS_SECRET_ACCESS_KEY": ceph.secret_key,
            },
        },
    )
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/uploadlifecyclepolicies.mpu-janitor.dev",
    )
    with running_operator(plane.kubeconfig, [namespace], tmp_path) as operator:
        apply(plane, document)
        wait_for(
            lambda: status(plane, namespace, name).get("lastSweep"), timeout=90, what="a sweep"
        )
        last = status(plane, namespace, name)["lastSweep"]
        freed = 1000 + 234 + 5 * 1024 * 1024 + 66
        assert (last["aborted"], last["freedBytes"], last["failed"]) == (2, freed, 0), last
        assert last["alreadyGone"] == 0
        condition = ready(plane, namespace, name)
        assert (condition["status"], condition["reason"]) == ("True", "SweepSucceeded")
        assert status(plane, namespace, name)["totals"] == {
            "abortedUploads": 2,
            "freedBytes": freed,
            "freed": quantity(freed),
        }
        assert open_uploads(s3, bucket) == set()
        assert open_uploads(s3, other_bucket) == {("tmp/a.bin", elsewhere)}
        assert [e["reason"] for e in events(plane, namespace, name)].count("SweepSucceeded") == 1

        labels = (("bucket", bucket), ("namespace", namespace), ("policy", name), ("store", "S3"))
        assert samples(operator, "mpu_janitor_freed_bytes_total") == {labels: float(freed)}
        aborted = samples(operator, "mpu_janitor_aborted_uploads_total")
        assert aborted.get(tuple(sorted((*labels, ("result", "aborted"))))) == 2.0
        assert not [
            value for key, value in aborted.items() if ("result", "failed") in key and value
        ]
        assert not any(samples(operator, "mpu_janitor_sweep_errors_total").values())
        # The verifying ListParts met Ceph's 404 (NoSuchKey) and read it as "gone".
        requests = samples(operator, "mpu_janitor_store_requests_total")
        codes = {dict(key)["code"] for key in requests if dict(key)["operation"] == "ListParts"}
        assert "404" in codes
