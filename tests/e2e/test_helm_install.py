"""The Helm chart against a real API server: install creates the objects (and the CRDs), the
operator's ServiceAccount has the RBAC it needs and no more (checked with a real token from the
TokenRequest API), uninstall removes them. Nothing runs Pods here, so no ``--wait``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.controlplane import REPO_ROOT, ControlPlane, wait_for

pytestmark = pytest.mark.e2e

CHART = REPO_ROOT / "charts" / "mpu-janitor"
RELEASE = "mpu-janitor"
RELEASE_NS = "mpu-janitor"
ULP = "uploadlifecyclepolicies.mpu-janitor.dev"


@pytest.fixture(scope="module")
def chart() -> Path:
    wait_for((CHART / "Chart.yaml").exists, timeout=600, interval=5, what=f"{CHART}/Chart.yaml")
    return CHART


def manifest_objects(plane: ControlPlane, release: str, namespace: str) -> list[dict[str, Any]]:
    """The objects of a release, from ``helm get manifest``."""
    text = plane.helm("get", "manifest", release, "-n", namespace).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def ref(obj: dict[str, Any], release_ns: str) -> list[str]:
    """kubectl arguments that name ``obj`` (kind.group/name, and its namespace if any)."""
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    kind = f"{obj['kind'].lower()}.{group}" if group else obj["kind"].lower()
    args = [f"{kind}/{obj['metadata']['name']}"]
    cluster_scoped = obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering")
    if not cluster_scoped:
        args += ["-n", obj["metadata"].get("namespace", release_ns)]
    return args


def exists(plane: ControlPlane, args: list[str]) -> bool:
    result = plane.kubectl("get", *args, "--ignore-not-found", "-o", "name")
    return bool(result.stdout.strip())


def can_i(plane: ControlPlane, kubeconfig: Path, *args: str) -> bool:
    result = plane.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


@pytest.fixture
def installed(chart: Path, control_plane: ControlPlane) -> Iterator[ControlPlane]:
    result = control_plane.helm(
        "install", RELEASE, str(chart), "-n", RELEASE_NS, "--create-namespace"
    )
    assert "STATUS: deployed" in result.stdout
    try:
        yield control_plane
    finally:
        control_plane.helm("uninstall", RELEASE, "-n", RELEASE_NS, "--ignore-not-found")
        # Wait until the namespace is gone: the next install re-creates it.
        control_plane.kubectl(
            "delete", "namespace", RELEASE_NS, "--ignore-not-found", "--timeout=90s"
        )


def test_install_creates_objects_and_uninstall_removes_them(installed: ControlPlane) -> None:
    plane = installed
    objects = manifest_objects(plane, RELEASE, RELEASE_NS)
    kinds = {obj["kind"] for obj in objects}
    assert {
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
    } <= kinds, kinds
    for obj in objects:
        assert exists(plane, ref(obj, RELEASE_NS)), f"{obj['kind']} {obj['metadata']['name']}"

    # The same objects by their well-known names and labels.
    labelled = plane.kubectl(
        "get",
        "deployment,serviceaccount,service",
        "-n",
        RELEASE_NS,
        f"-l=app.kubernetes.io/instance={RELEASE}",
        "-o",
        "name",
    ).stdout.split()
    assert sorted(labelled) == [
        "deployment.apps/mpu-janitor",
        "service/mpu-janitor",
        "serviceaccount/mpu-janitor",
    ]
    deployment = plane.kubectl_json("get", "deployment", RELEASE, "-n", RELEASE_NS)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mpu-janitor"
    assert deployment["spec"]["replicas"] == 1
    binding = plane.kubectl_json("get", "clusterrolebinding", RELEASE)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": RELEASE,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mpu-janitor", "namespace": RELEASE_NS}
    ]

    # Helm installed the CRDs from the chart's crds/ directory.
    plane.kubectl("wait", "--for=condition=Established", f"crd/{ULP}", "--timeout=60s")
    status = json.loads(plane.helm("status", RELEASE, "-n", RELEASE_NS, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"

    out = plane.helm("uninstall", RELEASE, "-n", RELEASE_NS).stdout
    assert f'release "{RELEASE}" uninstalled' in out
    refs = [ref(obj, RELEASE_NS) for obj in objects]
    wait_for(
        lambda: not any(exists(plane, args) for args in refs),
        timeout=60,
        what="the release's objects to be deleted",
    )
    listed = plane.helm("list", "-n", RELEASE_NS, "-q").stdout.split()
    assert RELEASE not in listed
    # Helm never deletes CRDs from crds/ (that would delete every policy): they stay.
    assert exists(plane, [f"crd/{ULP}"])


def test_chart_rbac_cluster_wide(
    installed: ControlPlane, make_namespace: Callable[[str], str]
) -> None:
    plane = installed
    team = make_namespace("team")
    plane.kubectl(
        "create", "secret", "generic", "creds", "-n", team, "--from-literal=AWS_ACCESS_KEY_ID=x"
    )
    kubeconfig = plane.service_account_kubeconfig(RELEASE_NS, "mpu-janitor", create=False)

    needed = [
        ("list", ULP, "--all-namespaces"),
        ("watch", ULP, "--all-namespaces"),
        ("get", ULP, "-n", team),
        ("patch", ULP, "--subresource=status", "-n", team),
        ("create", "events", "-n", team),
        ("create", "events.events.k8s.io", "-n", team),
        ("get", "secrets", "-n", team),
        ("create", "serviceaccounts", "--subresource=token", "-n", team),
        ("list", "customresourcedefinitions.apiextensions.k8s.io"),
        ("watch", "namespaces"),
    ]
    for args in needed:
        assert can_i(plane, kubeconfig, *args), f"the operator cannot {' '.join(args)}"
    not_needed = [
        ("list", "secrets", "-n", team),
        ("watch", "secrets", "--all-namespaces"),
        ("create", "secrets", "-n", team),
        ("get", "serviceaccounts", "-n", team),
        ("list", "serviceaccounts", "-n", team),
        ("create", "serviceaccounts", "-n", team),
        ("delete", ULP, "-n", team),
        ("create", ULP, "-n", team),
        ("get", "configmaps", "-n", team),
        ("create", "pods", "-n", team),
        ("delete", "namespaces"),
        ("create", "clusterrolebindings"),
    ]
    for args in not_needed:
        assert not can_i(plane, kubeconfig, *args), f"the operator may {' '.join(args)}"

    # Real requests with the operator's identity.
    listed = plane.kubectl("get", "ulp", "--all-namespaces", kubeconfig=kubeconfig)
    assert listed.returncode == 0
    secret = plane.kubectl_json("get", "secret", "creds", "-n", team, kubeconfig=kubeconfig)
    assert secret["metadata"]["name"] == "creds"
    denied = plane.kubectl("get", "secrets", "-n", team, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr


def test_chart_rbac_namespaced_mode(
    chart: Path, control_plane: ControlPlane, make_namespace: Callable[[str], str]
) -> None:
    plane = control_plane
    team_a, team_b, release_ns = (
        make_namespace("team-a"),
        make_namespace("team-b"),
        make_namespace("scoped-op"),
    )
    release = "scoped"
    for ns in (team_a, team_b):
        plane.kubectl(
            "create", "secret", "generic", "creds", "-n", ns, "--from-literal=AWS_ACCESS_KEY_ID=x"
        )
    plane.helm(
        "install", release, str(chart), "-n", release_ns, f"--set=watchNamespaces[0]={team_a}"
    )
    try:
        objects = manifest_objects(plane, release, release_ns)
        roles = {
            (o["kind"], o["metadata"].get("namespace"))
            for o in objects
            if o["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
        }
        assert roles == {
            ("Role", team_a),
            ("RoleBinding", team_a),
            ("ClusterRole", None),
            ("ClusterRoleBinding", None),
        }, roles

        sa = f"{release}-mpu-janitor"
        kubeconfig = plane.service_account_kubeconfig(release_ns, sa, create=False)
        assert can_i(plane, kubeconfig, "get", "secrets", "-n", team_a)
        assert not can_i(plane, kubeconfig, "get", "secrets", "-n", team_b)
        assert can_i(plane, kubeconfig, "list", ULP, "-n", team_a)
        assert not can_i(plane, kubeconfig, "list", ULP, "-n", team_b)
        assert not can_i(plane, kubeconfig, "list", ULP, "--all-namespaces")
        assert can_i(plane, kubeconfig, "list", "customresourcedefinitions.apiextensions.k8s.io")

        got = plane.kubectl_json("get", "secret", "creds", "-n", team_a, kubeconfig=kubeconfig)
        assert got["metadata"]["namespace"] == team_a
        denied = plane.kubectl(
            "get", "secret", "creds", "-n", team_b, kubeconfig=kubeconfig, check=False
        )
        assert denied.returncode != 0
        assert f'cannot get resource "secrets" in API group "" in the namespace "{team_b}"' in (
            denied.stderr
        )
    finally:
        plane.helm("uninstall", release, "-n", release_ns, "--ignore-not-found")
    wait_for(
        lambda: not exists(plane, ["role", f"{release}-mpu-janitor", "-n", team_a]),
        timeout=60,
        what="the release's Role to be deleted",
    )


def test_packaged_chart_installs_and_its_crds_upgrade_by_server_side_apply(
    chart: Path, control_plane: ControlPlane, make_namespace: Callable[[str], str], tmp_path: Path
) -> None:
    """What a user of a published chart does: install the packaged .tgz (here with peering and
    two replicas, so the PodDisruptionBudget is made too), then upgrade the CRDs the way the
    README says, from the package itself, over the CRDs Helm created."""
    plane = control_plane
    packaged = plane.helm("package", str(chart), "--destination", str(tmp_path)).stdout
    (tgz,) = tmp_path.glob("mpu-janitor-*.tgz")
    assert str(tgz) in packaged
    release, release_ns = "packaged", make_namespace("packaged-op")
    result = plane.helm(
        "install",
        release,
        str(tgz),
        "-n",
        release_ns,
        "--set=replicaCount=2",
        "--set=peering.enabled=true",
    )
    assert "STATUS: deployed" in result.stdout
    # The install notes tell how to upgrade the CRDs without a checkout of the repository.
    assert "helm show crds" in result.stdout
    try:
        name = f"{release}-mpu-janitor"
        budget = plane.kubectl_json("get", "poddisruptionbudget", name, "-n", release_ns)
        assert budget["spec"]["maxUnavailable"] == 1
        deployment = plane.kubectl_json("get", "deployment", name, "-n", release_ns)
        assert budget["spec"]["selector"] == deployment["spec"]["selector"]
        assert exists(plane, [f"clusterkopfpeering.kopf.dev/{name}"])

        crds = plane.helm("show", "crds", str(tgz)).stdout
        applied = plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=crds
        ).stdout
        assert f"customresourcedefinition.apiextensions.k8s.io/{ULP} serverside-applied" in (
            applied
        )
        crd = plane.kubectl_json("get", "crd", ULP, "--show-managed-fields")
        managers = {m["manager"] for m in crd["metadata"]["managedFields"]}
        assert "kubectl" in managers, managers
        plane.kubectl("wait", "--for=condition=Established", f"crd/{ULP}", "--timeout=60s")
    finally:
        plane.helm("uninstall", release, "-n", release_ns, "--ignore-not-found")
