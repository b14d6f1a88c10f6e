"""The workload-identity and CA-bundle fields on the real API server: its CEL rules and patterns
refuse what the policy model refuses, naming the same field, and apply the documented defaults."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mpu_janitor.policy import PolicyError, parse_policy
from tests.e2e.test_crd_api import _set, crd, create, ns
from tests.support.controlplane import ControlPlane

__all__ = ["crd", "ns"]  # fixtures

ROLE = "arn:aws:iam::111122223333:role/uploads-janitor"
IDENTITY = {
    "apiVersion": "mpu-janitor.dev/v1alpha1",
    "kind": "UploadLifecyclePolicy",
    "metadata": {"name": "identity"},
    "spec": {
        "store": {
            "type": "S3",
            "s3": {"buckets": ["uploads"], "region": "eu-west-1"},
            "serviceAccountRef": {"name": "uploads-janitor"},
            "roleArn": ROLE,
            "caBundleSecretRef": {"name": "private-ca"},
        },
        "match": {"olderThan": "7d"},
    },
}

INVALID = [
    (
        "secret-and-service-account",
        _set(IDENTITY, "spec.store.credentialsSecretRef", {"name": "creds"}),
        "spec.store.serviceAccountRef",
        "not both",
    ),
    (
        "service-account-without-role",
        _set(IDENTITY, "spec.store.roleArn", ...),
        "spec.store.roleArn",
        "required with serviceAccountRef",
    ),
    (
        "role-not-an-arn",
        _set(IDENTITY, "spec.store.roleArn", "arn:aws:s3:::uploads"),
        "spec.store.roleArn",
        "should match",
    ),
    (
        "external-id-too-short",
        _set(IDENTITY, "spec.store.assumeRole", {"roleArn": ROLE, "externalId": "x"}),
        "spec.store.assumeRole.externalId",
        "should be at least 2",
    ),
    (
        "service-account-name",
        _set(IDENTITY, "spec.store.serviceAccountRef", {"name": "Uploads Janitor"}),
        "spec.store.serviceAccountRef.name",
        "should match",
    ),
    (
        "ca-bundle-key",
        _set(IDENTITY, "spec.store.caBundleSecretRef", {"name": "ca", "key": "ca/crt"}),
        "spec.store.caBundleSecretRef.key",
        "should match",
    ),
]


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [pytest.param(doc, field, words, id=case) for case, doc, field, words in INVALID],
)
def test_the_api_server_and_the_model_refuse_the_same_field(
    crd: ControlPlane, ns: str, document: dict[str, Any], field: str, words: str
) -> None:
    result = create(crd, document, ns)
    assert result.returncode != 0, f"accepted:\n{result.stdout}"
    assert f"{field}:" in result.stderr or f"{field} " in result.stderr, result.stderr
    assert words in result.stderr, result.stderr
    with pytest.raises(PolicyError) as caught:
        parse_policy(document)
    assert caught.value.field == field


def test_the_api_server_applies_the_identity_defaults(crd: ControlPlane, ns: str) -> None:
    chained = _set(IDENTITY, "spec.store.assumeRole", {"roleArn": ROLE, "externalId": "t-7"})
    result = create(crd, chained, ns, "--dry-run=server", "-o", "json")
    assert result.returncode == 0, result.stderr
    store = json.loads(result.stdout)["spec"]["store"]
    assert store["serviceAccountRef"] == {
        "name": "uploads-janitor",
        "audience": "sts.amazonaws.com",
    }
    assert store["caBundleSecretRef"] == {"name": "private-ca", "key": "ca.crt"}
    parsed = parse_policy({**chained, "metadata": {"name": "identity", "namespace": ns}})
    assert parsed.store.workload_identity is not None
    assert parsed.store.workload_identity.audience == store["serviceAccountRef"]["audience"]
    assert parsed.store.ca_bundle_ref is not None
    assert parsed.store.ca_bundle_ref.key == store["caBundleSecretRef"]["key"]
