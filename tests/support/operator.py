"""The operator as a user runs it (``mpu-janitor operator`` in a subprocess) against the real
control plane of tests/support/controlplane.py, plus the kubectl helpers the e2e tests share:
policies, Secrets, status, conditions and Events, and many uploads made fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.integration.helpers import make_upload, open_uploads
from tests.support.controlplane import ControlPlane, free_port, wait_for
from tests.support.minio import MinioServer

REPO = Path(__file__).resolve().parents[2]


class Operator:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.killed = False

    def kill(self) -> None:
        """SIGKILL: no cleanup, no last status patch."""
        self.killed = True
        self.process.kill()
        self.process.wait(10)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, as Kubernetes stops a Pod; waits for the exit and returns its code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_operator(
    kubeconfig: Path,
    namespaces: list[str],
    tmp: Path,
    *,
    peering: str | None = None,
    priority: int | None = None,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    verbose: bool = False,
) -> Iterator[Operator]:
    port = free_port()
    log = tmp / f"operator-{port}.log"
    args = [
        "mpu-janitor",
        *(["-v"] if verbose else []),
        "operator",
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        str(port),
    ]
    args += ["--peering", peering] if peering else ["--standalone"]
    for namespace in namespaces:
        args += ["--namespace", namespace]
    args += extra_args or []
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), **(extra_env or {})}
    if priority is not None:
        env["MPU_JANITOR_PRIORITY"] = str(priority)
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    operator = Operator(process, port, log)
    try:
        wait_for(
            lambda: operator.healthy() or process.poll() is not None,
            timeout=60,
            what="operator /healthz",
        )
        assert process.poll() is None, operator.output()
        yield operator
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    killed = operator.killed and process.returncode == -9
    assert killed or process.returncode in (0, -15), operator.output()[-3000:]


def policy(name: str, namespace: str, endpoint: str, bucket: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "store": {
            "type": "S3",
            "s3": {"endpoint": endpoint, "profile": "MinIO", "buckets": [bucket]},
            "credentialsSecretRef": {"name": "minio-creds"},
        },
        "match": {"olderThan": "2s", "quietPeriod": "0s"},
        "schedule": {"interval": "1h"},
    }
    body.update(spec)
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def apply(plane: ControlPlane, document: dict[str, Any], kubeconfig: Path | None = None) -> None:
    plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(document), kubeconfig=kubeconfig)


def apply_crds(plane: ControlPlane) -> None:
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/uploadlifecyclepolicies.mpu-janitor.dev",
    )


def add_peering(plane: ControlPlane, namespace: str, name: str) -> None:
    """Kopf's peering CRD (as the chart ships it) and one namespaced peering object."""
    plane.kubectl(
        "apply",
        "--server-side",
        "-f",
        str(REPO / "charts" / "mpu-janitor" / "crds" / "kopf-peerings.yaml"),
    )
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev"
    )
    apply(
        plane,
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": name, "namespace": namespace},
        },
    )


def add_secret(plane: ControlPlane, namespace: str, minio: MinioServer) -> None:
    apply(
        plane,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "minio-creds", "namespace": namespace},
            "stringData": {
                "AWS_ACCESS_KEY_ID": minio.access_key,
                "AWS_SECRET_ACCESS_KEY": minio.secret_key,
            },
        },
    )


def status(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    found = plane.kubectl("get", "ulp", name, "-n", namespace, "-o", "json", check=False)
    if found.returncode != 0:
        return {}
    value: dict[str, Any] = json.loads(found.stdout).get("status") or {}
    return value


def ready(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    for condition in status(plane, namespace, name).get("conditions") or []:
        if condition.get("type") == "Ready":
            return dict(condition)
    return {}


def events(plane: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    listing = plane.kubectl_json(
        "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
    )
    items: list[dict[str, Any]] = listing["items"]
    return items


def make_sized_uploads(
    s3: Any, bucket: str, sizes: dict[str, int], workers: int = 16
) -> set[tuple[str, str]]:
    """One upload per key with one part of the given size, made ``workers`` at a time;
    returns the (key, upload id) pairs."""
    with ThreadPoolExecutor(workers) as pool:
        ids = list(
            pool.map(lambda item: make_upload(s3, bucket, item[0], [item[1]]), sizes.items())
        )
    return set(zip(sizes, ids, strict=True))


def open_under(s3: Any, bucket: str, prefix: str) -> set[tuple[str, str]]:
    return {(key, upload) for key, upload in open_uploads(s3, bucket) if key.startswith(prefix)}
