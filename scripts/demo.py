"""The one-command demo: a local control plane and MinIO, the operator, stale uploads, a policy,
and the result as a user sees it (kubectl get ulp, status, Events, the freed-bytes metric).

Run it through scripts/demo.sh, which prepares the virtualenv and builds the binaries.
Everything runs on 127.0.0.1 and is stopped and removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

from tests.integration.helpers import make_upload, open_uploads  # noqa: E402
from tests.support.controlplane import ControlPlane, free_port, wait_for  # noqa: E402
from tests.support.minio import MinioServer  # noqa: E402

NAMESPACE = "media"
BUCKET = "uploads"
OLDER_THAN_SECONDS = 15


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(plane: ControlPlane, *args: str) -> str:
    print(f"$ kubectl {' '.join(args)}")
    output = plane.kubectl(*args).stdout
    print(output.rstrip())
    return str(output)


def main() -> int:
    step("starting a local control plane (etcd, kube-apiserver, kube-controller-manager)")
    plane = ControlPlane()
    minio = MinioServer()
    operator: subprocess.Popen[bytes] | None = None
    try:
        plane.start()
        print(f"kube-apiserver {plane.server} ready; kubeconfig {plane.kubeconfig}")
        step("starting MinIO")
        minio.start()
        print(f"MinIO at {minio.endpoint}")

        step("installing the CRD")
        show(plane, "apply", "-f", str(REPO / "crds"))
        plane.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/uploadlifecyclepolicies.mpu-janitor.dev",
        )
        plane.create_namespace(NAMESPACE)
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "minio-creds", "namespace": NAMESPACE},
            "stringData": {
                "AWS_ACCESS_KEY_ID": minio.access_key,
                "AWS_SECRET_ACCESS_KEY": minio.secret_key,
            },
        }
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(secret))

        step("starting the operator (mpu-janitor operator)")
        metrics_port = free_port()
        log_path = plane.root / "operator.log"
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}
        with open(log_path, "wb") as log:
            operator = subprocess.Popen(
                [
                    "mpu-janitor",
                    "operator",
                    "--namespace",
                    NAMESPACE,
                    "--standalone",
                    "--metrics-address",
                    "127.0.0.1",
                    "--metrics-port",
                    str(metrics_port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: _get(f"http://127.0.0.1:{metrics_port}/healthz") == "ok",
            timeout=60,
            what="operator /healthz",
        )
        print(f"operator running (pid {operator.pid}), metrics on :{metrics_port}")

        step("seeding incomplete uploads")
        s3 = minio.client()
        s3.create_bucket(Bucket=BUCKET)
        stale = {
            "tmp/render-01.mov": [5 * 1024 * 1024, 3 * 1024 * 1024],
            "tmp/render-02.mov": [5 * 1024 * 1024],
            "ingest/batch-17.parquet": [1024 * 1024, 1024 * 1024, 512],
        }
        for key, parts in stale.items():
            make_upload(s3, BUCKET, key, parts)
        make_upload(s3, BUCKET, "tmp/master.keep", [2 * 1024 * 1024])  # excluded by a glob
        print(
            f"3 uploads to go stale ({sum(map(sum, stale.values()))} bytes) and 1 kept by "
            f"glob; waiting {OLDER_THAN_SECONDS}s so they are older than olderThan"
        )
        time.sleep(OLDER_THAN_SECONDS + 1)
        make_upload(s3, BUCKET, "tmp/render-03.mov", [5 * 1024 * 1024])  # fresh: survives
        print("plus 1 fresh upload that must survive")

        step("applying a policy (examples/minio.yaml, with a demo-sized olderThan)")
        policy = yaml.safe_load((REPO / "examples" / "minio.yaml").read_text())
        policy["metadata"] = {"name": "stale-uploads", "namespace": NAMESPACE}
        spec = policy["spec"]
        spec["store"]["s3"].update(endpoint=minio.endpoint, buckets=[BUCKET])
        spec["store"]["credentialsSecretRef"] = {"name": "minio-creds"}
        spec["match"] = {
            "olderThan": f"{OLDER_THAN_SECONDS}s",
            "quietPeriod": "5s",
            "prefixes": ["tmp/", "ingest/"],
            "excludeKeyGlobs": ["*.keep"],
        }
        print(yaml.safe_dump(policy, sort_keys=False).rstrip())
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(policy))
        wait_for(
            lambda: (
                plane.kubectl_json("get", "ulp", "-n", NAMESPACE, "stale-uploads")
                .get("status", {})
                .get("lastSweep")
            ),
            timeout=120,
            what="the first sweep",
        )

        step("what the user sees")
        show(plane, "get", "ulp", "-n", NAMESPACE)
        show(plane, "get", "ulp", "-n", NAMESPACE, "-o", "wide")
        print("$ kubectl get ulp stale-uploads -n media -o yaml  (status)")
        status = plane.kubectl_json("get", "ulp", "-n", NAMESPACE, "stale-uploads")["status"]
        print(yaml.safe_dump({"status": status}, sort_keys=False).rstrip())
        show(
            plane,
            "get",
            "events",
            "-n",
            NAMESPACE,
            "--field-selector",
            "involvedObject.name=stale-uploads",
        )
        print(f"$ curl -s 127.0.0.1:{metrics_port}/metrics | grep freed_bytes_total")
        metrics = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        print(
            "\n".join(
                line
                for line in metrics.splitlines()
                if "freed_bytes_total{" in line or "aborted_uploads_total{" in line
            )
        )
        left = sorted(key for key, _ in open_uploads(s3, BUCKET))
        print(f"\nuploads left in s3://{BUCKET}: {left}")
        freed = status["lastSweep"]["freedBytes"]
        expected = sum(map(sum, stale.values()))
        ok = freed == expected and left == ["tmp/master.keep", "tmp/render-03.mov"]
        print(f"freed {freed} bytes (expected {expected}): {'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    except Exception:
        if operator is not None and (plane.root / "operator.log").exists():
            print((plane.root / "operator.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        step("cleaning up")
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        minio.stop()
        plane.stop()
        print("stopped the operator, MinIO and the control plane; removed their files")


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode().strip())
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
