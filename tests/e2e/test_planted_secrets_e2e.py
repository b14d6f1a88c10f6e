"""Planted secrets never surface. A verbose operator (`-v`: botocore's requests logged) sweeps
three policies on the real control plane: one with MinIO's real keys (its secret key is random,
so distinctive), one with planted S3 keys and a planted session token that MinIO refuses, and a
LILT policy whose planted API key the LILT API (an HTTP fake) accepts. Each planted value is
then searched for in everything the operator said: its whole log, every policy's status, every
Event of the namespace and /metrics."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.integration.helpers import make_upload, open_uploads
from tests.support.controlplane import ControlPlane, wait_for
from tests.support.lilt_server import FakeLilt
from tests.support.minio import MinioServer
from tests.support.operator import add_secret, apply, apply_crds, policy, ready, running_operator

ACCESS_KEY = "AKIAPLANTEDLEAK7Q3ZX"
SECRET_KEY = "plantedSecretKey/Zq8w+K1mN0pQ7rS2tU4vX6yA9bC3"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjPLANTEDe2eSessionToken0123456789abcdef"
LILT_KEY = "lilt-PLANTED-e2e-key-9c1b7a"


def secret(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": data,
    }


def test_planted_secrets_appear_in_no_log_status_event_or_metric(
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    plane = control_plane
    apply_crds(plane)
    add_secret(plane, namespace, minio)
    planted_s3 = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
    }
    apply(plane, secret(namespace, "planted-s3", planted_s3))
    apply(plane, secret(namespace, "planted-lilt", {"LILT_API_KEY": LILT_KEY}))
    make_upload(s3, bucket, "tmp/a", [10])
    inventory_dir = tmp_path / "lilt"
    (inventory_dir / namespace).mkdir(parents=True)
    inventory = inventory_dir / namespace / "inventory.jsonl"

    with FakeLilt(api_key=LILT_KEY) as lilt:
        upload_id, key = lilt.initiate("doc.zip", 1024, age=timedelta(days=2))
        initiated = (datetime.now(UTC) - timedelta(days=2)).isoformat()
        inventory.write_text(
            json.dumps({"uploadId": upload_id, "key": key, "initiated": initiated}) + "\n"
        )
        time.sleep(2.5)  # the S3 upload is older than the policies' olderThan: 2s
        apply(plane, policy("good", namespace, minio.endpoint, bucket))
        refused = policy("planted", namespace, minio.endpoint, bucket)
        refused["spec"]["store"]["credentialsSecretRef"] = {"name": "planted-s3"}
        apply(plane, refused)
        lilt_policy = policy("lilt", namespace, minio.endpoint, bucket)
        lilt_policy["spec"]["store"] = {
            "type": "LILT",
            "lilt": {"endpoint": lilt.url, "inventoryPath": str(inventory)},
            "credentialsSecretRef": {"name": "planted-lilt"},
        }
        lilt_policy["spec"]["match"] = {"olderThan": "1d"}
        apply(plane, lilt_policy)

        extra = ["--lilt-inventory-dir", str(inventory_dir)]
        with running_operator(
            plane.kubeconfig, [namespace], tmp_path, extra_args=extra, verbose=True
        ) as op:

            def settled() -> bool:
                reasons = {
                    name: ready(plane, namespace, name).get("reason")
                    for name in ("good", "planted", "lilt")
                }
                return (
                    reasons["good"] == "SweepSucceeded"
                    and reasons["lilt"] == "SweepSucceeded"
                    and reasons["planted"] not in (None, "Sweeping")
                )

            wait_for(settled, timeout=120, what="the three policies swept")
            # The planted keys were really used: MinIO refused them, LILT accepted its key.
            assert ready(plane, namespace, "planted")["status"] == "False"
            assert not lilt.is_pending(upload_id)
            assert any(r.method == "DELETE" for r in lilt.requests)
            assert open_uploads(s3, bucket) == set()
            said = {
                "operator log (-v)": op.output(),
                "/metrics": op.metrics(),
                "policies": plane.kubectl("get", "ulp", "-n", namespace, "-o", "yaml").stdout,
                "Events": plane.kubectl("get", "events", "-n", namespace, "-o", "yaml").stdout,
            }

    assert "planted" in said["policies"] and "lilt" in said["Events"]  # what is searched
    planted = {
        "access key": ACCESS_KEY,
        "secret key": SECRET_KEY,
        "session token": SESSION_TOKEN,
        "LILT key": LILT_KEY,
        "MinIO's secret key": minio.secret_key,
    }
    # As given, and base64-encoded as a Secret's data holds it.
    spellings = {
        **planted,
        **{
            f"{what} (base64)": base64.b64encode(v.encode()).decode() for what, v in planted.items()
        },
    }
    leaks = [
        f"{what} in {where}"
        for where, text in said.items()
        for what, value in spellings.items()
        if value in text
    ]
    assert leaks == []
