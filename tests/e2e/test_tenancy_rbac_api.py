"""Tenants against the real API server, with the chart installed by helm: two tenant
namespaces whose ServiceAccounts hold Kubernetes' built-in ``edit`` and ``view`` roles (into
which the chart aggregates its policy rules), and the operator's own ServiceAccount, whose
``kubectl auth can-i --list`` must equal the list the chart README documents, exactly."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.test_helm_install import CHART, ULP, can_i, chart, exists  # noqa: F401
from tests.support.controlplane import ControlPlane, wait_for

pytestmark = pytest.mark.e2e

README = CHART / "README.md"


def policy(name: str, namespace: str) -> str:
    return json.dumps(
        {
            "apiVersion": "mpu-janitor.dev/v1alpha1",
            "kind": "UploadLifecyclePolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "store": {
                    "type": "S3",
                    "credentialsSecretRef": {"name": "creds"},
                    "s3": {"buckets": ["uploads"]},
                },
                "match": {"olderThan": "1d"},
            },
        }
    )


def bind(plane: ControlPlane, role: str, namespace: str, account: str) -> None:
    plane.kubectl(
        "create",
        "rolebinding",
        f"{account}-{role}",
        f"--clusterrole={role}",
        f"--serviceaccount={namespace}:{account}",
        "-n",
        namespace,
    )


Row = tuple[str, str, str, str]


def rules_of(output: str) -> list[Row]:
    """``kubectl auth can-i --list`` as sorted (resource, non-resource URLs, resource names,
    verbs) rows, read by the header's column positions (duplicates kept)."""
    lines = [line for line in output.splitlines() if line.strip()]
    header = lines[0]
    starts = [
        0,
        *(header.index(title) for title in ("Non-Resource URLs", "Resource Names", "Verbs")),
    ]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append((cells[0], cells[1], cells[2], cells[3]))
    return sorted(rows)


def documented(mode: str) -> list[Row]:
    """The rows the chart README documents for ``mode`` (after its ``can-i: <mode>`` marker)."""
    text = README.read_text()
    match = re.search(rf"<!-- can-i: {re.escape(mode)} -->\s*```text\n(.*?)```", text, re.S)
    assert match, f"the chart README documents no can-i list for {mode!r}"
    return rules_of(match.group(1))


def granted(plane: ControlPlane, kubeconfig: Path, namespace: str, baseline: Path) -> list[Row]:
    """What ``kubeconfig``'s identity may do in ``namespace`` beyond what every authenticated
    ServiceAccount may (discovery, health, self-reviews: ``baseline``, one with no binding)."""

    def listed(config: Path) -> Counter[Row]:
        output = plane.kubectl("auth", "can-i", "--list", "-n", namespace, kubeconfig=config)
        return Counter(rules_of(output.stdout))

    own, everyone = listed(kubeconfig), listed(baseline)
    assert not everyone - own, f"rows every ServiceAccount has, but not this one: {everyone - own}"
    return sorted((own - everyone).elements())


def run_as(plane: ControlPlane, kubeconfig: Path, *args: str, input: str | None = None) -> str:
    return plane.kubectl(*args, kubeconfig=kubeconfig, input=input).stdout


def refused(plane: ControlPlane, kubeconfig: Path, *args: str, input: str | None = None) -> str:
    result = plane.kubectl(*args, kubeconfig=kubeconfig, input=input, check=False)
    assert result.returncode != 0, f"{' '.join(args)} was allowed: {result.stdout}"
    assert "Forbidden" in result.stderr or "forbidden" in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def release(
    chart: Path,  # noqa: F811
    control_plane: ControlPlane,
    make_namespace: Callable[[str], str],
) -> Iterator[tuple[str, str]]:
    release, release_ns = "tenancy", make_namespace("tenancy-op")
    control_plane.helm("install", release, str(chart), "-n", release_ns)
    try:
        yield release, release_ns
    finally:
        control_plane.helm("uninstall", release, "-n", release_ns, "--ignore-not-found")


def test_tenants_use_policies_through_the_built_in_roles_and_only_in_their_namespace(
    release: tuple[str, str], control_plane: ControlPlane, make_namespace: Callable[[str], str]
) -> None:
    plane = control_plane
    name, _ = release
    team_a, team_b = make_namespace("tenant-a"), make_namespace("tenant-b")
    for namespace in (team_a, team_b):
        plane.kubectl(
            "create",
            "secret",
            "generic",
            "creds",
            "-n",
            namespace,
            f"--from-literal=AWS_SECRET_ACCESS_KEY=secret-of-{namespace}",
        )
    alice = plane.service_account_kubeconfig(team_a, "alice")  # edit in tenant A
    bob = plane.service_account_kubeconfig(team_b, "bob")  # edit in tenant B
    viewer = plane.service_account_kubeconfig(team_a, "viewer")  # view in tenant A
    bind(plane, "edit", team_a, "alice")
    bind(plane, "edit", team_b, "bob")
    bind(plane, "view", team_a, "viewer")
    # The aggregation controller folds the chart's rules into edit and view.
    wait_for(
        lambda: (
            can_i(plane, alice, "create", ULP, "-n", team_a)
            and can_i(plane, viewer, "list", ULP, "-n", team_a)
        ),
        timeout=60,
        what="the chart's rules to be aggregated into the built-in edit and view roles",
    )
    aggregated = plane.kubectl_json("get", "clusterrole", "edit")
    assert any(ULP.split(".")[0] in rule.get("resources", []) for rule in aggregated["rules"])

    # Tenant A creates, changes and deletes policies in A...
    run_as(plane, alice, "apply", "-f", "-", input=policy("mine", team_a))
    run_as(plane, alice, "annotate", "ulp", "mine", "-n", team_a, "example.com/owner=alice")
    # ...but not in B, whatever verb.
    refused(plane, alice, "create", "-f", "-", input=policy("theirs", team_b))
    run_as(plane, bob, "apply", "-f", "-", input=policy("theirs", team_b))
    refused(plane, alice, "get", "ulp", "theirs", "-n", team_b)
    refused(plane, alice, "delete", "ulp", "theirs", "-n", team_b)
    # Nor read B's Secret (the operator reads Secrets only in the policy's own namespace).
    stderr = refused(plane, alice, "get", "secret", "creds", "-n", team_b)
    assert f"secret-of-{team_b}" not in stderr

    # No tenant writes status: only the operator does.
    status = json.dumps({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    refused(
        plane, alice, "patch", "ulp", "mine", "-n", team_a, "--subresource=status",
        "--type=merge", "-p", status,
    )  # fmt: skip
    # Through the main resource, the status is ignored (the CRD's status subresource).
    run_as(plane, alice, "patch", "ulp", "mine", "-n", team_a, "--type=merge", "-p", status)
    stored = plane.kubectl_json("get", "ulp", "mine", "-n", team_a)
    assert not (stored.get("status") or {}).get("conditions")
    assert not can_i(plane, alice, "update", ULP, "--subresource=status", "-n", team_a)

    # view reads, never writes.
    listed = run_as(plane, viewer, "get", "ulp", "-n", team_a, "-o", "name")
    assert listed.split() == ["uploadlifecyclepolicy.mpu-janitor.dev/mine"]
    refused(plane, viewer, "delete", "ulp", "mine", "-n", team_a)
    refused(plane, viewer, "get", "ulp", "-n", team_b)
    run_as(plane, alice, "delete", "ulp", "mine", "-n", team_a)

    # Without the chart, the built-in roles give nothing on policies any more.
    plane.helm("uninstall", name, "-n", release[1])
    wait_for(
        lambda: not can_i(plane, alice, "create", ULP, "-n", team_a),
        timeout=60,
        what="the aggregated rules to leave the built-in edit role",
    )


def test_the_operators_permissions_are_exactly_the_documented_list_cluster_wide(
    release: tuple[str, str], control_plane: ControlPlane, make_namespace: Callable[[str], str]
) -> None:
    plane = control_plane
    name, release_ns = release
    team = make_namespace("team")
    baseline = plane.service_account_kubeconfig(team, "nobody")
    account = f"{name}-mpu-janitor"
    kubeconfig = plane.service_account_kubeconfig(release_ns, account, create=False)
    assert granted(plane, kubeconfig, team, baseline) == documented("cluster-wide")


def test_the_operators_permissions_are_exactly_the_documented_list_namespaced(
    chart: Path,  # noqa: F811
    control_plane: ControlPlane,
    make_namespace: Callable[[str], str],
) -> None:
    plane = control_plane
    watched, other, release_ns = (
        make_namespace("watched"),
        make_namespace("unwatched"),
        make_namespace("scoped-op"),
    )
    baseline = plane.service_account_kubeconfig(other, "nobody")
    release = "listed"
    plane.helm(
        "install", release, str(chart), "-n", release_ns, f"--set=watchNamespaces[0]={watched}"
    )
    try:
        kubeconfig = plane.service_account_kubeconfig(
            release_ns, f"{release}-mpu-janitor", create=False
        )
        assert granted(plane, kubeconfig, watched, baseline) == documented("namespaced, watched")
        assert granted(plane, kubeconfig, other, baseline) == documented("namespaced, not watched")
    finally:
        plane.helm("uninstall", release, "-n", release_ns, "--ignore-not-found")
