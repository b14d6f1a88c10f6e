"""The test control plane itself: the versions the fixtures claim, the controllers the other
e2e tests rely on (namespaces finish terminating, garbage collection, default ServiceAccounts),
an API server restart, and ServiceAccount identities that have only the RBAC they are given."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support.controlplane import ControlPlane, wait_for

pytestmark = pytest.mark.e2e

KUBE_VERSION = "v1.35.4"


def _exists(plane: ControlPlane, *args: str) -> bool:
    result = plane.kubectl("get", *args, "--ignore-not-found", "-o", "name")
    return bool(result.stdout.strip())


def test_versions(control_plane: ControlPlane) -> None:
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert versions["clientVersion"]["gitVersion"] == KUBE_VERSION
    assert versions["serverVersion"]["gitVersion"] == KUBE_VERSION
    assert versions["serverVersion"]["minor"] == "35"
    helm = control_plane.helm("version", "--short").stdout
    assert helm.startswith("v3."), helm


def test_default_service_account_is_created(
    control_plane: ControlPlane, make_namespace: Callable[[str], str]
) -> None:
    ns = make_namespace("sa")
    wait_for(
        lambda: _exists(control_plane, "serviceaccount", "default", "-n", ns),
        timeout=60,
        what=f"serviceaccount default in {ns}",
    )


def test_namespace_deletion_completes(
    control_plane: ControlPlane, make_namespace: Callable[[str], str]
) -> None:
    ns = make_namespace("gone")
    control_plane.kubectl("create", "configmap", "data", "-n", ns, "--from-literal=a=b")
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")
    wait_for(
        lambda: not _exists(control_plane, "namespace", ns),
        timeout=90,
        what=f"namespace {ns} to finish terminating",
    )


def test_garbage_collector_removes_dependents(control_plane: ControlPlane, namespace: str) -> None:
    owner = json.loads(
        control_plane.kubectl("create", "configmap", "owner", "-n", namespace, "-o", "json").stdout
    )
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
    }
    control_plane.kubectl("create", "-f", "-", input=json.dumps(dependent))
    control_plane.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(
        lambda: not _exists(control_plane, "configmap", "dependent", "-n", namespace),
        timeout=60,
        what="the garbage collector to delete the dependent ConfigMap",
    )


def test_restart_apiserver_keeps_port_and_data(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.kubectl("create", "configmap", "survivor", "-n", namespace, "--from-literal=k=v")
    server = control_plane.server
    old_pid = control_plane.processes["kube-apiserver"].pid
    seconds = control_plane.restart_apiserver()
    assert control_plane.processes["kube-apiserver"].pid != old_pid
    assert control_plane.server == server
    assert seconds < 120
    data = control_plane.kubectl_json("get", "configmap", "survivor", "-n", namespace)["data"]
    assert data == {"k": "v"}


def test_service_account_identity_has_only_its_rbac(
    control_plane: ControlPlane, make_namespace: Callable[[str], str]
) -> None:
    team_a, team_b = make_namespace("team-a"), make_namespace("team-b")
    for ns in (team_a, team_b):
        control_plane.kubectl(
            "create", "secret", "generic", "creds", "-n", ns, "--from-literal=AWS_ACCESS_KEY_ID=x"
        )
    control_plane.kubectl(
        "create", "role", "read-secrets", "-n", team_a, "--verb=get", "--resource=secrets"
    )
    control_plane.kubectl(
        "create",
        "rolebinding",
        "read-secrets",
        "-n",
        team_a,
        "--role=read-secrets",
        f"--serviceaccount={team_a}:janitor",
    )
    kubeconfig = control_plane.service_account_kubeconfig(team_a, "janitor")

    def can_i(*args: str) -> str:
        result = control_plane.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        return result.stdout.strip()

    whoami = control_plane.kubectl_json("auth", "whoami", kubeconfig=kubeconfig)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{team_a}:janitor"

    assert can_i("get", "secrets", "-n", team_a) == "yes"
    assert can_i("get", "secrets", "-n", team_b) == "no"
    assert can_i("list", "secrets", "-n", team_a) == "no"
    assert can_i("delete", "secrets", "-n", team_a) == "no"

    # The same answers from real requests, not only from the authorizer's self-review.
    got = control_plane.kubectl_json("get", "secret", "creds", "-n", team_a, kubeconfig=kubeconfig)
    assert got["metadata"]["name"] == "creds"
    denied = control_plane.kubectl(
        "get", "secret", "creds", "-n", team_b, kubeconfig=kubeconfig, check=False
    )
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f'User "system:serviceaccount:{team_a}:janitor" cannot get resource "secrets"' in (
        denied.stderr
    )
    listed = control_plane.kubectl(
        "get", "secrets", "-n", team_a, kubeconfig=kubeconfig, check=False
    )
    assert listed.returncode != 0 and "cannot list resource" in listed.stderr
