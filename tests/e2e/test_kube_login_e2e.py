"""Logging in and talking to a real kube-apiserver the way a person's laptop does: the operator
started with a kubeconfig whose user is an exec plugin (as cloud CLIs and OIDC helpers are)
and a non-current ``--context``; and the operator's Kubernetes client (KubeClient, on
kubernetes_asyncio) against the real API: Secrets, status merge patches, errors, re-login."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import Configuration

from mpu_janitor.kube import Forbidden, KubeClient, NotFound
from mpu_janitor.login import Login, logged_in
from tests.e2e.test_operator_e2e import (
    AGE,
    REPO,
    Operator,
    add_secret,
    apply,
    events,
    policy,
    ready,
    status,
)
from tests.integration.helpers import make_upload, open_uploads
from tests.support.controlplane import ControlPlane, wait_for
from tests.support.minio import MinioServer
from tests.support.operator import running_operator

EXEC_API = "client.authentication.k8s.io/v1"


def install_crds(plane: ControlPlane) -> None:
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/uploadlifecyclepolicies.mpu-janitor.dev",
    )


def exec_kubeconfig(plane: ControlPlane, directory: Path) -> tuple[Path, Path]:
    """A kubeconfig whose current context logs in with a wrong token, and whose ``laptop``
    context logs in through an exec plugin that prints a token the API server accepts.
    Returns the kubeconfig and the file where the plugin counts its runs."""
    runs = directory / "plugin-runs"
    plugin = directory / "kube-login-plugin"
    plugin.write_text(
        "#!/bin/sh\n"
        f'echo "$KUBERNETES_EXEC_INFO" >> "{runs}"\n'
        "cat <<EOF\n"
        f'{{"apiVersion": "{EXEC_API}", "kind": "ExecCredential",'
        f' "status": {{"token": "{plane.admin_token}"}}}}\n'
        "EOF\n"
    )
    plugin.chmod(0o755)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {"server": plane.server, "certificate-authority": str(plane.ca_file)},
            }
        ],
        "users": [
            {"name": "stale", "user": {"token": "not-a-valid-token"}},
            {
                "name": "laptop",
                "user": {
                    "exec": {
                        "apiVersion": EXEC_API,
                        "command": str(plugin),
                        "interactiveMode": "Never",
                    }
                },
            },
        ],
        "contexts": [
            {"name": "stale", "context": {"cluster": "test", "user": "stale"}},
            {"name": "laptop", "context": {"cluster": "test", "user": "laptop"}},
        ],
        "current-context": "stale",
    }
    path = directory / "laptop.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path, runs


@contextmanager
def operator_with_context(
    kubeconfig: Path, context: str, namespace: str, directory: Path
) -> Iterator[Operator]:
    extra = ["--context", context]
    with running_operator(kubeconfig, [namespace], directory, extra_args=extra) as operator:
        yield operator


def test_operator_logs_in_through_an_exec_plugin(
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    plane = control_plane
    install_crds(plane)
    add_secret(plane, namespace, minio)
    kubeconfig, runs = exec_kubeconfig(plane, tmp_path)
    make_upload(s3, bucket, "tmp/a.bin", [1000, 24])
    time.sleep(AGE)
    apply(plane, policy("laptop", namespace, minio.endpoint, bucket))
    with operator_with_context(kubeconfig, "laptop", namespace, tmp_path) as operator:
        wait_for(
            lambda: status(plane, namespace, "laptop").get("lastSweep"),
            timeout=60,
            what="a sweep by the operator logged in through the exec plugin",
        )
        assert ready(plane, namespace, "laptop")["reason"] == "SweepSucceeded", operator.output()[
            -3000:
        ]
        posted = wait_for(
            lambda: [e for e in events(plane, namespace, "laptop") if e["type"] == "Normal"],
            timeout=30,
            what="the sweep's Event",
        )
    assert status(plane, namespace, "laptop")["lastSweep"]["freedBytes"] == 1024
    assert open_uploads(s3, bucket) == set()
    # The plugin gave the only credentials that work (the current context's token is wrong).
    assert runs.read_text().count("ExecCredential") >= 2  # Kopf's login and the client's
    assert "not-a-valid-token" not in operator.output()
    # Kopf posted the Event, naming our component.
    (event,) = posted
    assert event["reason"] == "SweepSucceeded"
    assert event["reportingComponent"] == "mpu-janitor.dev/operator"
    assert event["source"]["component"] == "mpu-janitor.dev/operator"


# -- the client facade against the real API server ------------------------------------------


@pytest.fixture()
def admin_kubeconfig(control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))
    return control_plane.kubeconfig


@asynccontextmanager
async def client(context: str | None = None) -> AsyncIterator[KubeClient]:
    kube = KubeClient(lambda: logged_in(context))
    try:
        yield kube
    finally:
        await kube.close()


async def test_secrets_status_patches_and_errors(
    control_plane: ControlPlane, namespace: str, admin_kubeconfig: Path
) -> None:
    plane = control_plane
    install_crds(plane)
    plane.kubectl(
        "create", "secret", "generic", "creds", "-n", namespace, "--from-literal=KEY=value"
    )
    apply(plane, policy("p", namespace, "http://127.0.0.1:1", "bucket"))
    async with client() as kube:
        secret = await kube.get_secret(namespace, "creds")
        assert secret["data"] == {"KEY": "dmFsdWU="}  # base64, as the API has it
        with pytest.raises(NotFound, match='secrets "absent" not found'):
            await kube.get_secret(namespace, "absent")

        # Merge patches of the status subresource: keys merge, None removes one.
        await kube.patch_policy_status(
            namespace, "p", {"observedGeneration": 1, "handledSweepNow": "a"}
        )
        await kube.patch_policy_status(
            namespace, "p", {"handledSweepNow": None, "observedGeneration": 2}
        )
        assert status(plane, namespace, "p") == {"observedGeneration": 2}
        body = plane.kubectl_json("get", "ulp", "p", "-n", namespace)
        assert body["spec"]["store"]["s3"]["buckets"] == ["bucket"]  # spec untouched
        with pytest.raises(NotFound):
            await kube.patch_policy_status(namespace, "gone", {"observedGeneration": 1})
        with pytest.raises(NotFound):
            await kube.get_peering("no-such-peering")
        plane.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev")
        apply(
            plane,
            {
                "apiVersion": "kopf.dev/v1",
                "kind": "KopfPeering",
                "metadata": {"name": "peers", "namespace": namespace},
                "status": {"someone": {"priority": 7, "lifetime": 60}},
            },
        )
        peering = await kube.get_peering("peers", namespace)
        assert peering["status"]["someone"]["priority"] == 7

        # A call without a method of its own: who are we?
        review = await kube.request(
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
        assert review["status"]["userInfo"]["username"] == "admin"


async def test_forbidden_is_forbidden(
    control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plane = control_plane
    plane.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=K=v")
    kubeconfig = plane.service_account_kubeconfig(namespace, "nobody")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    async with client() as kube:
        with pytest.raises(Forbidden, match="cannot get resource"):
            await kube.get_secret(namespace, "creds")


async def test_a_refused_token_logs_in_again(control_plane: ControlPlane, namespace: str) -> None:
    """What a rotated ServiceAccount token looks like: the first login's token is refused
    (401), the client logs in again and the call succeeds."""
    plane = control_plane
    plane.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=K=v")
    tokens = ["revoked-token", plane.admin_token]
    used: list[str] = []

    @asynccontextmanager
    async def login() -> AsyncIterator[Login]:
        token = tokens[min(len(used), 1)]
        used.append(token)
        configuration = Configuration(host=plane.server, ssl_ca_cert=str(plane.ca_file))
        configuration.api_key["BearerToken"] = f"Bearer {token}"
        yield Login(configuration)

    kube = KubeClient(login)
    try:
        assert (await kube.get_secret(namespace, "creds"))["data"] == {"K": "dg=="}
    finally:
        await kube.close()
    assert used == ["revoked-token", plane.admin_token]
