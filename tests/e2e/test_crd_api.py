"""The UploadLifecyclePolicy CRD as a real kube-apiserver serves it: installation, discovery
(short name, category, explain), printer columns, the status subresource, defaulting, and
rejection of invalid policies with a message that names the field."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpu_janitor.policy import PolicyError, parse_policy
from tests.support.controlplane import REPO_ROOT, ControlPlane, wait_for

CRD_DIR = REPO_ROOT / "crds"
CRD_FILE = CRD_DIR / "uploadlifecyclepolicies.yaml"
CRD_NAME = "uploadlifecyclepolicies.mpu-janitor.dev"
EXAMPLES_DIR = REPO_ROOT / "examples"
LILT_INVENTORY = "/var/lib/mpu-janitor/lilt/inventory.jsonl"

pytestmark = pytest.mark.e2e


def policy(**spec_overrides: Any) -> dict[str, Any]:
    """A valid S3 policy; keyword arguments replace top-level spec fields."""
    document: dict[str, Any] = {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": "stale-uploads"},
        "spec": {
            "store": {
                "type": "S3",
                "s3": {
                    "endpoint": "https://minio.storage:9000",
                    "profile": "MinIO",
                    "buckets": ["uploads", "backups"],
                },
                "credentialsSecretRef": {"name": "minio-creds"},
            },
            "match": {"olderThan": "7d", "prefixes": ["tmp/"], "excludeKeyGlobs": ["*.keep"]},
        },
    }
    document["spec"].update(spec_overrides)
    return document


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set (or, with value ``...``, delete) the dotted ``path`` in a copy of ``document``."""
    document = copy.deepcopy(document)
    *parents, leaf = path.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return document


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """``kubectl apply -f crds/`` and wait until the CRD is Established."""
    wait_for(CRD_FILE.exists, timeout=600, interval=5, what=f"{CRD_FILE} to be written")
    control_plane.kubectl("apply", "-f", str(CRD_DIR))
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    yield control_plane


@pytest.fixture
def ns(crd: ControlPlane, make_namespace: Callable[[str], str]) -> str:
    return make_namespace("crd")


def create(
    plane: ControlPlane, document: dict[str, Any], namespace: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``kubectl create`` from stdin, unchecked: the caller asserts on the outcome."""
    return plane.kubectl(
        "create", "-n", namespace, "-f", "-", *extra, input=json.dumps(document), check=False
    )


def flat(text: str) -> str:
    """Whitespace-normalised text (kubectl explain wraps descriptions)."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------ installation


def test_crd_is_established_with_names_and_status_subresource(crd: ControlPlane) -> None:
    obj = crd.kubectl_json("get", "crd", CRD_NAME)
    conditions = {c["type"]: c["status"] for c in obj["status"]["conditions"]}
    assert conditions.get("Established") == "True"
    assert conditions.get("NamesAccepted") == "True"
    accepted = obj["status"]["acceptedNames"]
    assert accepted["kind"] == "UploadLifecyclePolicy"
    assert accepted["shortNames"] == ["ulp"]
    assert accepted["categories"] == ["mpu-janitor"]
    (version,) = obj["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}

    resources = crd.kubectl("api-resources", "--api-group=mpu-janitor.dev", "-o", "wide").stdout
    row = next(
        line for line in resources.splitlines() if line.startswith("uploadlifecyclepolicies")
    )
    assert "ulp" in row.split()
    assert "mpu-janitor" in row
    assert "true" in row.split()  # namespaced


def test_reapplying_the_crd_is_unchanged(crd: ControlPlane) -> None:
    out = crd.kubectl("apply", "-f", str(CRD_DIR)).stdout
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME} unchanged" in out


def test_explain_shows_field_descriptions(crd: ControlPlane) -> None:
    # explain reads the published OpenAPI, which the apiserver rebuilds shortly after a CRD
    # appears: poll until the group is there.
    def explain(path: str) -> str:
        result = crd.kubectl("explain", path, check=False)
        return result.stdout if result.returncode == 0 else ""

    spec = wait_for(
        lambda: explain("uploadlifecyclepolicy.spec"),
        timeout=60,
        what="kubectl explain uploadlifecyclepolicy.spec",
    )
    assert "GROUP:      mpu-janitor.dev" in spec
    assert "The desired cleanup" in flat(spec)
    for field in ("store", "match", "schedule", "mode", "limits", "suspend"):
        assert re.search(rf"^\s+{field}\s+<", spec, re.M), f"{field} missing from:\n{spec}"
    assert re.search(r"^\s+match\s+<Object> -required-", spec, re.M)
    assert re.search(r"^\s+store\s+<Object> -required-", spec, re.M)
    assert "DryRun only counts what would be aborted and freed" in flat(spec)

    match = explain("uploadlifecyclepolicy.spec.match")
    assert "Which incomplete uploads are stale enough to abort" in flat(match)
    assert re.search(r"^\s+olderThan\s+<string> -required-", match, re.M)
    assert "measured from the upload's Initiated time on the store's clock" in flat(match)
    assert "Globs, not regular expressions" in flat(match)
    assert re.search(r"^\s+quietPeriod\s+<string>", match, re.M)

    store_type = explain("ulp.spec.store.type")  # the short name works in explain too
    assert "ENUM: S3 Glacier LILT DESCRIPTION: The store family" in flat(store_type), store_type


# ------------------------------------------------------------------------------ discovery


def test_short_name_and_category_list_policies(crd: ControlPlane, ns: str) -> None:
    empty = crd.kubectl("get", "ulp", "-n", ns)
    assert "No resources found" in empty.stderr

    created = create(crd, policy(), ns)
    assert created.returncode == 0, created.stderr
    assert "uploadlifecyclepolicy.mpu-janitor.dev/stale-uploads created" in created.stdout

    by_short = crd.kubectl("get", "ulp", "-n", ns, "-o", "name").stdout.split()
    by_category = crd.kubectl("get", "mpu-janitor", "-n", ns, "-o", "name").stdout.split()
    by_plural = crd.kubectl("get", "uploadlifecyclepolicies", "-n", ns, "-o", "name").stdout.split()
    expected = ["uploadlifecyclepolicy.mpu-janitor.dev/stale-uploads"]
    assert by_short == by_category == by_plural == expected


def test_printer_columns_and_status_subresource(crd: ControlPlane, ns: str) -> None:
    assert create(crd, policy(mode="DryRun"), ns).returncode == 0

    header = crd.kubectl("get", "ulp", "-n", ns).stdout.splitlines()[0]
    assert re.split(r"\s{2,}", header.strip()) == [
        "NAME",
        "STORE",
        "MODE",
        "SUSPEND",
        "READY",
        "LAST ABORTED",
        "FREED",
        "LAST SWEEP",
        "NEXT SWEEP",
        "AGE",
    ]
    wide = crd.kubectl("get", "ulp", "-n", ns, "-o", "wide").stdout.splitlines()
    assert re.split(r"\s{2,}", wide[0].strip()) == [
        "NAME",
        "STORE",
        "MODE",
        "SUSPEND",
        "READY",
        "REASON",
        "ELIGIBLE",
        "LAST ABORTED",
        "FREED",
        "LAST SWEEP",
        "NEXT SWEEP",
        "AGE",
        "MESSAGE",
    ]
    assert wide[1].split()[:3] == ["stale-uploads", "S3", "DryRun"]

    status = {
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "SweepSucceeded",
                    "message": "aborted 3 uploads",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                    "observedGeneration": 1,
                }
            ],
            "lastSweep": {"completionTime": "2026-01-01T00:00:00Z", "eligible": 5, "aborted": 3},
            "totals": {"abortedUploads": 3, "freedBytes": 123456789, "freed": "118Mi"},
        },
        # Through the status subresource a spec change is ignored.
        "spec": {"mode": "Abort"},
    }
    crd.kubectl(
        "patch",
        "ulp",
        "stale-uploads",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    row = crd.kubectl("get", "ulp", "-n", ns, "-o", "wide", "--no-headers").stdout.split()
    # suspend, ready, reason, eligible (wide), last aborted, freed as a person reads it
    assert row[:9] == [
        "stale-uploads",
        "S3",
        "DryRun",
        "false",
        "True",
        "SweepSucceeded",
        "5",
        "3",
        "118Mi",
    ]
    assert " ".join(row).endswith("aborted 3 uploads")
    stored = crd.kubectl_json("get", "ulp", "stale-uploads", "-n", ns)
    assert stored["spec"]["mode"] == "DryRun"
    assert stored["status"]["totals"]["freedBytes"] == 123456789

    # A status the schema forbids is rejected on the subresource as well.
    bad = crd.kubectl(
        "patch",
        "ulp",
        "stale-uploads",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"totals": {"freedBytes": -1}}}',
        check=False,
    )
    assert bad.returncode != 0
    assert "status.totals.freedBytes" in bad.stderr


# ------------------------------------------------------------------------------ validation

BASE = policy()

# (id, document, field the message must name, words the message must contain)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "store-type-enum",
        _set(BASE, "spec.store.type", "Azure"),
        "spec.store.type",
        'Unsupported value: "Azure"',
    ),
    ("mode-enum", _set(BASE, "spec.mode", "abort"), "spec.mode", 'Unsupported value: "abort"'),
    (
        "profile-enum",
        _set(BASE, "spec.store.s3.profile", "Minio"),
        "spec.store.s3.profile",
        'Unsupported value: "Minio"',
    ),
    (
        "older-than-missing",
        _set(BASE, "spec.match.olderThan", ...),
        "spec.match.olderThan",
        "Required value",
    ),
    ("match-missing", _set(BASE, "spec.match", ...), "spec.match", "Required value"),
    (
        "older-than-words",
        _set(BASE, "spec.match.olderThan", "7 days"),
        "spec.match.olderThan",
        "should match",
    ),
    (
        "older-than-zero",
        _set(BASE, "spec.match.olderThan", "0d"),
        "spec.match.olderThan",
        "longer than zero",
    ),
    (
        "quiet-period-units",
        _set(BASE, "spec.match.quietPeriod", "1hour"),
        "spec.match.quietPeriod",
        "should match",
    ),
    (
        "interval-too-short",
        _set(BASE, "spec.schedule", {"interval": "5s"}),
        "spec.schedule.interval",
        "at least 10s",
    ),
    (
        "concurrency-zero",
        _set(BASE, "spec.limits", {"concurrency": 0}),
        "spec.limits.concurrency",
        "greater than or equal to 1",
    ),
    (
        "rps-negative",
        _set(BASE, "spec.limits", {"requestsPerSecond": -5}),
        "spec.limits.requestsPerSecond",
        "should be greater than or equal to",
    ),
    (
        "rps-too-small",
        _set(BASE, "spec.limits", {"requestsPerSecond": 0.05}),
        "spec.limits.requestsPerSecond",
        "greater than or equal to 0.1",
    ),
    (
        "max-aborts-negative",
        _set(BASE, "spec.limits", {"maxAbortsPerSweep": -1}),
        "spec.limits.maxAbortsPerSweep",
        "greater than or equal to 0",
    ),
    (
        "concurrency-not-integer",
        _set(BASE, "spec.limits", {"concurrency": "many"}),
        "spec.limits.concurrency",
        "must be of type integer",
    ),
    (
        "suspend-not-boolean",
        _set(BASE, "spec.suspend", "yes"),
        "spec.suspend",
        "must be of type boolean",
    ),
    (
        "buckets-and-pattern",
        _set(BASE, "spec.store.s3.bucketPattern", "tenant-*"),
        "spec.store.s3",
        "exactly one of buckets or bucketPattern",
    ),
    (
        "neither-buckets-nor-pattern",
        _set(BASE, "spec.store.s3.buckets", ...),
        "spec.store.s3",
        "exactly one of buckets or bucketPattern",
    ),
    (
        "bad-bucket-name",
        _set(BASE, "spec.store.s3.buckets", ["uploads", "Bad_Bucket"]),
        "spec.store.s3.buckets[1]",
        "should match",
    ),
    (
        "endpoint-not-url",
        _set(BASE, "spec.store.s3.endpoint", "minio.storage:9000"),
        "spec.store.s3.endpoint",
        "should match",
    ),
    (
        "owner-not-account-id",
        _set(BASE, "spec.store.s3.expectedBucketOwner", "12345"),
        "spec.store.s3.expectedBucketOwner",
        "should match",
    ),
    (
        "request-payer-enum",
        _set(BASE, "spec.store.s3.requestPayer", "BucketOwner"),
        "spec.store.s3.requestPayer",
        'Unsupported value: "BucketOwner"',
    ),
    (
        "glacier-section-on-s3",
        _set(BASE, "spec.store.glacier", {"vaults": ["v1"]}),
        "spec.store.glacier",
        "only then",
    ),
    (
        "s3-section-missing",
        _set(BASE, "spec.store.s3", ...),
        "spec.store.s3",
        "must be set when spec.store.type is S3",
    ),
    (
        "lilt-section-on-s3",
        _set(BASE, "spec.store.lilt", {"inventoryPath": LILT_INVENTORY}),
        "spec.store.lilt",
        "must be set when spec.store.type is LILT, and only then",
    ),
    (
        "lilt-section-missing",
        policy(store={"type": "LILT"}),
        "spec.store.lilt",
        "must be set when spec.store.type is LILT, and only then",
    ),
    (
        "lilt-inventory-missing",
        policy(store={"type": "LILT", "lilt": {"endpoint": "https://api.lilt.com"}}),
        "spec.store.lilt.inventoryPath",
        "Required value",
    ),
    (
        "glacier-no-vaults",
        _set(
            _set(_set(BASE, "spec.store.s3", ...), "spec.store.type", "Glacier"),
            "spec.store.glacier",
            {"vaults": []},
        ),
        "spec.store.glacier.vaults",
        "at least 1 items",
    ),
    (
        "glacier-account-id",
        _set(
            _set(_set(BASE, "spec.store.s3", ...), "spec.store.type", "Glacier"),
            "spec.store.glacier",
            {"vaults": ["v1"], "accountId": "me"},
        ),
        "spec.store.glacier.accountId",
        "should match",
    ),
    (
        "secret-name",
        _set(BASE, "spec.store.credentialsSecretRef", {"name": "Minio Creds"}),
        "spec.store.credentialsSecretRef.name",
        "should match",
    ),
    (
        "older-than-past-100-years",
        _set(BASE, "spec.match.olderThan", "99999999999d"),
        "spec.match.olderThan",
        "at most 100 years",
    ),
    (
        "interval-past-100-years",
        _set(BASE, "spec.schedule", {"interval": "5300w"}),
        "spec.schedule.interval",
        "at most 100 years",
    ),
    (
        "region-with-spaces",
        _set(BASE, "spec.store.s3.region", "us east 1"),
        "spec.store.s3.region",
        "should match",
    ),
    (
        "endpoint-with-credentials",
        _set(BASE, "spec.store.s3.endpoint", "https://user:password@minio.storage:9000"),
        "spec.store.s3.endpoint",
        "should match",
    ),
    (
        "endpoint-open-ipv6",
        _set(BASE, "spec.store.s3.endpoint", "http://[::1"),
        "spec.store.s3.endpoint",
        "should match",
    ),
    (
        "too-many-prefixes",
        _set(BASE, "spec.match.prefixes", [f"p{i}/" for i in range(1001)]),
        "spec.match.prefixes",
        "must have at most 1000 items",
    ),
    (
        "prefix-too-long",
        _set(BASE, "spec.match.prefixes", ["p" * 1025]),
        "spec.match.prefixes[0]",
        "Too long",
    ),
    (
        "duplicate-buckets",
        _set(BASE, "spec.store.s3.buckets", ["uploads", "uploads"]),
        "spec.store.s3.buckets[1]",
        "Duplicate value",
    ),
]


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [pytest.param(doc, field, words, id=case) for case, doc, field, words in INVALID],
)
def test_invalid_policy_is_rejected_naming_the_field(
    crd: ControlPlane, ns: str, document: dict[str, Any], field: str, words: str
) -> None:
    result = create(crd, document, ns)
    assert result.returncode != 0, f"accepted:\n{result.stdout}"
    message = result.stderr
    assert "is invalid" in message, message
    assert f"{field}:" in message or f"{field} " in message, message
    assert words in message, message
    assert crd.kubectl("get", "ulp", "-n", ns, "-o", "name").stdout == ""


def test_zero_requests_per_second_is_rejected(crd: ControlPlane, ns: str) -> None:
    result = create(crd, _set(BASE, "spec.limits", {"requestsPerSecond": 0}), ns)
    assert result.returncode != 0, "requestsPerSecond: 0 was accepted"
    assert "spec.limits.requestsPerSecond" in result.stderr


def test_unknown_field_is_rejected_with_strict_validation(crd: ControlPlane, ns: str) -> None:
    typo = _set(BASE, "spec.match.olderThen", "30d")
    strict = create(crd, typo, ns, "--validate=strict")
    assert strict.returncode != 0
    assert 'unknown field "spec.match.olderThen"' in strict.stderr

    # Without strict validation the server prunes the unknown field (it is never stored).
    lax = create(crd, typo, ns, "--validate=ignore")
    assert lax.returncode == 0, lax.stderr
    stored = crd.kubectl_json("get", "ulp", "stale-uploads", "-n", ns)
    assert "olderThen" not in stored["spec"]["match"]
    assert stored["spec"]["match"]["olderThan"] == "7d"


# ------------------------------------------------------------------------------ valid policies

VALID: list[tuple[str, dict[str, Any]]] = [
    ("s3-minio-buckets", BASE),
    (
        "s3-aws-pattern",
        policy(
            store={
                "type": "S3",
                "s3": {
                    "region": "eu-west-1",
                    "bucketPattern": "tenant-*-uploads",
                    "expectedBucketOwner": "111122223333",
                    "requestPayer": "Requester",
                },
            }
        ),
    ),
    (
        "s3-directory-bucket",
        policy(store={"type": "S3", "s3": {"buckets": ["ingest--use1-az4--x-s3"]}}),
    ),
    (
        "glacier",
        policy(
            store={
                "type": "Glacier",
                "glacier": {"vaults": ["archive-2024"], "accountId": "111122223333"},
                "credentialsSecretRef": {"name": "glacier-creds"},
            }
        ),
    ),
    ("lilt", policy(store={"type": "LILT", "lilt": {"inventoryPath": LILT_INVENTORY}})),
    (
        "tencent-cos",
        policy(
            store={
                "type": "S3",
                "s3": {
                    "endpoint": "https://cos.ap-guangzhou.myqcloud.com",
                    "region": "ap-guangzhou",
                    "buckets": ["uploads-1250000000"],
                },
            }
        ),
    ),
    (
        "longest-durations",
        policy(
            match={"olderThan": "36500d", "quietPeriod": "5214w2d"},
            schedule={"interval": "3153600000s"},
        ),
    ),
    ("ipv6-endpoint", _set(BASE, "spec.store.s3.endpoint", "http://[fd00::1]:9000/base")),
    (
        "full",
        policy(
            match={"olderThan": "1d12h", "quietPeriod": "30m"},
            schedule={"interval": "10s"},
            mode="DryRun",
            suspend=True,
            limits={"maxAbortsPerSweep": 0, "requestsPerSecond": 0.5, "concurrency": 256},
        ),
    ),
]


@pytest.mark.parametrize("document", [pytest.param(doc, id=case) for case, doc in VALID])
def test_valid_policy_is_accepted(crd: ControlPlane, ns: str, document: dict[str, Any]) -> None:
    result = create(crd, document, ns, "--validate=strict")
    assert result.returncode == 0, result.stderr


def test_server_applies_the_documented_defaults(crd: ControlPlane, ns: str) -> None:
    minimal = policy(
        store={"type": "S3", "s3": {"buckets": ["uploads"]}}, match={"olderThan": "7d"}
    )
    result = create(crd, minimal, ns, "--dry-run=server", "-o", "json")
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)["spec"]
    assert spec["mode"] == "Abort"
    assert spec["suspend"] is False
    assert spec["schedule"] == {"interval": "1h"}
    assert spec["match"]["quietPeriod"] == "1h"
    assert spec["limits"] == {
        "maxAbortsPerSweep": 10000,
        "requestsPerSecond": 100,
        "concurrency": 64,
    }
    assert spec["store"]["s3"]["region"] == "us-east-1"
    assert crd.kubectl("get", "ulp", "-n", ns, "-o", "name").stdout == ""  # dry run: not stored


def _example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.glob("**/*.y*ml") if p.suffix in (".yaml", ".yml"))


def test_examples_are_accepted_by_the_api_server(crd: ControlPlane, ns: str) -> None:
    files = _example_files()
    assert files, f"no example policies in {EXAMPLES_DIR}"
    policies = 0
    for path in files:
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document.get("kind") != "UploadLifecyclePolicy":
                continue
            policies += 1
            document.setdefault("metadata", {}).pop("namespace", None)
            result = create(crd, document, ns, "--dry-run=server", "--validate=strict")
            assert result.returncode == 0, f"{path.relative_to(REPO_ROOT)}: {result.stderr}"
    assert policies, f"no UploadLifecyclePolicy in {[str(p) for p in files]}"


# ------------------------------------------------------------------------------ one contract

# The CRD schema and mpu_janitor.policy must agree: what the API server rejects, the CLI (which
# reads the same YAML without an API server) rejects too, naming the same field.


@pytest.mark.parametrize(
    ("document", "field"),
    [pytest.param(doc, field, id=case) for case, doc, field, _ in INVALID]
    + [
        pytest.param(
            _set(BASE, "spec.match.olderThen", "30d"), "spec.match.olderThen", id="unknown-field"
        )
    ],
)
def test_policy_model_rejects_what_the_schema_rejects(document: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(document)
    named = caught.value.field
    assert field.startswith(named) or named.startswith(field), (field, str(caught.value))


@pytest.mark.parametrize("document", [pytest.param(doc, id=case) for case, doc in VALID])
def test_policy_model_accepts_what_the_schema_accepts(document: dict[str, Any]) -> None:
    parse_policy(document)
