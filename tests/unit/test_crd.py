"""The UploadLifecyclePolicy CRD: its structure, and its agreement with the policy model.

The CRD (crds/) and mpu_janitor.policy must accept the same fields, with the same names, enums,
defaults and bounds; the chart ships a byte-identical copy; every example parses.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mpu_janitor import policy as model
from mpu_janitor.policy import PolicyError, parse_duration, parse_policy

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
CHART_CRD_DIR = ROOT / "charts" / "mpu-janitor" / "crds"
CRD_PATH = CRD_DIR / "uploadlifecyclepolicies.yaml"
EXAMPLES = ROOT / "examples"


def load_crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return crd


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_crd()


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return dict(only)


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> dict[str, Any]:
    return dict(version["schema"]["openAPIV3Schema"])


def node(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The schema node of a dotted path such as ``spec.store.s3``."""
    here = schema
    for name in dotted.split("."):
        here = here["properties"][name]
    return here


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path: properties, array items, additionalProperties."""
    yield path or "(root)", schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def as_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as a JSON Schema that rejects unknown fields, as the API server's strict
    field validation does (`kubectl apply` rejects them; pruning would drop them silently)."""
    converted = copy.deepcopy(schema)
    for _, each in walk(converted):
        if each.get("type") == "object" and "properties" in each:
            each.setdefault("additionalProperties", False)
    converted["properties"]["metadata"]["additionalProperties"] = True
    return converted


# --------------------------------------------------------------------------------------------
# Structure


def test_names_scope_and_version(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "uploadlifecyclepolicies.mpu-janitor.dev"
    spec = crd["spec"]
    assert spec["group"] == model.API_GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": model.KIND,
        "listKind": "UploadLifecyclePolicyList",
        "plural": "uploadlifecyclepolicies",
        "singular": "uploadlifecyclepolicy",
        "shortNames": ["ulp"],
        "categories": ["mpu-janitor"],
    }
    assert version["name"] == model.API_VERSION
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    # metadata is the only exception: the API server forbids anything but its type there.
    missing = [
        path
        for path, each in walk(schema)
        if path != "metadata" and not str(each.get("description", "")).strip()
    ]
    assert missing == []
    assert node(schema, "metadata") == {"type": "object"}
    # The walk really covers spec and status, down to array items.
    paths = {path for path, _ in walk(schema)}
    assert {
        "spec.store.s3.buckets[]",
        "status.conditions[].lastTransitionTime",
        "status.lastSweep.freedBytes",
        "status.totals.abortedUploads",
    } <= paths


def test_schema_is_structural_and_closed(schema: dict[str, Any]) -> None:
    for path, each in walk(schema):
        assert "type" in each, f"{path} has no type"
        assert "x-kubernetes-preserve-unknown-fields" not in each, f"{path} keeps unknown fields"
        if each["type"] == "object" and path not in ("metadata",):
            assert each.get("properties"), f"{path} is an object without properties"
        if each["type"] == "array":
            assert isinstance(each.get("items"), dict), f"{path} is an array without items"


def test_required_fields(schema: dict[str, Any]) -> None:
    assert schema["required"] == ["spec"]
    assert sorted(node(schema, "spec")["required"]) == ["match", "store"]
    assert node(schema, "spec.store")["required"] == ["type"]
    assert node(schema, "spec.match")["required"] == ["olderThan"]
    assert node(schema, "spec.store.glacier")["required"] == ["vaults"]
    assert node(schema, "spec.store.credentialsSecretRef")["required"] == ["name"]


def test_status_schema(schema: dict[str, Any]) -> None:
    status = node(schema, "status")
    assert set(status["properties"]) == {
        "observedGeneration",
        "conditions",
        "lastSweep",
        "totals",
        "nextSweepTime",
        "lastSuccessfulSweepTime",
        "handledSweepNow",
    }
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    condition = conditions["items"]["properties"]
    assert set(condition) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert condition["status"]["enum"] == ["True", "False", "Unknown"]
    assert condition["lastTransitionTime"]["format"] == "date-time"
    last_sweep = status["properties"]["lastSweep"]["properties"]
    counts = {
        "scanned",
        "eligible",
        "eligibleBytes",
        "aborted",
        "skippedActive",
        "alreadyGone",
        "replaced",
        "protected",
        "deferred",
        "failed",
        "freedBytes",
        "remainingBytes",
    }
    assert set(last_sweep) == counts | {"startTime", "completionTime"}
    for name in counts:
        assert last_sweep[name]["type"] == "integer" and last_sweep[name]["minimum"] == 0
    totals = set(status["properties"]["totals"]["properties"])
    assert totals == {"abortedUploads", "freedBytes", "freed"}
    assert status["properties"]["nextSweepTime"]["format"] == "date-time"


def test_printer_columns(version: dict[str, Any]) -> None:
    ready = '.status.conditions[?(@.type=="Ready")]'
    columns = [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in version["additionalPrinterColumns"]
    ]
    assert columns == [
        ("Store", "string", ".spec.store.type", 0),
        ("Mode", "string", ".spec.mode", 0),
        ("Suspend", "boolean", ".spec.suspend", 0),
        ("Ready", "string", f"{ready}.status", 0),
        ("Reason", "string", f"{ready}.reason", 1),
        ("Eligible", "integer", ".status.lastSweep.eligible", 1),
        ("Last aborted", "integer", ".status.lastSweep.aborted", 0),
        ("Freed", "string", ".status.totals.freed", 0),
        ("Last sweep", "date", ".status.lastSweep.completionTime", 0),
        # a future time: a date column would print <invalid>
        ("Next sweep", "string", ".status.nextSweepTime", 0),
        ("Age", "date", ".metadata.creationTimestamp", 0),
        ("Message", "string", f"{ready}.message", 1),
    ]


def test_cel_rules_name_the_field(schema: dict[str, Any]) -> None:
    """Every CEL rule's message starts with the field it is about, like the model's errors."""
    rules = {
        path: each["x-kubernetes-validations"]
        for path, each in walk(schema)
        if "x-kubernetes-validations" in each
    }
    assert set(rules) == {
        "spec.store",
        "spec.store.s3",
        "spec.store.s3.region",
        "spec.store.glacier.region",
        "spec.match.olderThan",
        "spec.match.quietPeriod",
        "spec.schedule.interval",
        "spec.limits.requestsPerSecond",
    }
    for path, validations in rules.items():
        for validation in validations:
            assert validation["message"].startswith(path), (path, validation["message"])
    store_messages = [v["message"] for v in rules["spec.store"]]
    assert [m.split()[0] for m in store_messages] == [
        "spec.store.s3",
        "spec.store.glacier",
        "spec.store.lilt",
        "spec.store.serviceAccountRef:",
        "spec.store.roleArn",
    ]
    assert "exactly one of buckets or bucketPattern" in rules["spec.store.s3"][0]["message"]


# --------------------------------------------------------------------------------------------
# Agreement with the policy model

S3_DOC = {
    "apiVersion": "mpu-janitor.dev/v1alpha1",
    "kind": "UploadLifecyclePolicy",
    "metadata": {"name": "p", "namespace": "ns"},
    "spec": {
        "store": {
            "type": "S3",
            "s3": {"endpoint": "https://minio:9000", "buckets": ["uploads"]},
            "credentialsSecretRef": {"name": "creds"},
        },
        "match": {"olderThan": "7d"},
        "schedule": {"interval": "1h"},
        "limits": {"concurrency": 4},
    },
}
AWS_DOC = {
    **S3_DOC,
    "spec": {
        "store": {"type": "S3", "s3": {"buckets": ["uploads"], "region": "eu-west-1"}},
        "match": {"olderThan": "7d"},
    },
}
GLACIER_DOC = {
    **S3_DOC,
    "spec": {
        "store": {"type": "Glacier", "glacier": {"vaults": ["v1"]}},
        "match": {"olderThan": "2d"},
    },
}
LILT_DOC = {
    **S3_DOC,
    "spec": {
        "store": {"type": "LILT", "lilt": {"inventoryPath": "/var/lib/mpu-janitor/lilt/i.jsonl"}},
        "match": {"olderThan": "1d"},
    },
}

# Every object of the spec, with a document in which it is present.
IDENTITY_DOC = {
    **S3_DOC,
    "spec": {
        "store": {
            "type": "S3",
            "s3": {"buckets": ["uploads"], "region": "eu-west-1"},
            "serviceAccountRef": {"name": "janitor"},
            "roleArn": "arn:aws:iam::111122223333:role/janitor",
            "assumeRole": {"roleArn": "arn:aws:iam::444455556666:role/uploads"},
            "caBundleSecretRef": {"name": "ca"},
        },
        "match": {"olderThan": "7d"},
    },
}
IDENTITY_FIELDS = tuple(
    f"spec.store.{name}"
    for name in ("serviceAccountRef", "roleArn", "assumeRole", "caBundleSecretRef")
)
SPEC_OBJECTS = {
    "spec": S3_DOC,
    "spec.store": S3_DOC,
    "spec.store.s3": S3_DOC,
    "spec.store.credentialsSecretRef": S3_DOC,
    "spec.store.serviceAccountRef": IDENTITY_DOC,
    "spec.store.assumeRole": IDENTITY_DOC,
    "spec.store.caBundleSecretRef": IDENTITY_DOC,
    "spec.store.glacier": GLACIER_DOC,
    "spec.store.lilt": LILT_DOC,
    "spec.match": S3_DOC,
    "spec.schedule": S3_DOC,
    "spec.limits": S3_DOC,
}


def with_value(document: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of a document with ``dotted`` (from the top: spec.x.y) set to ``value``."""
    changed = copy.deepcopy(document)
    *parents, last = dotted.split(".")
    here = changed
    for name in parents:
        here = here.setdefault(name, {})
    here[last] = value
    return changed


def fields_known_to_model(document: dict[str, Any], dotted: str) -> set[str]:
    """The fields the model accepts in one object, read from its own unknown-field error."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(with_value(document, f"{dotted}.notAField", "x"))
    assert caught.value.field == f"{dotted}.notAField"
    known = re.fullmatch(r"unknown field \(known: (.*)\)", caught.value.message)
    assert known is not None, caught.value.message
    return set(known.group(1).split(", "))


def test_every_spec_object_is_covered(schema: dict[str, Any]) -> None:
    objects = {
        path for path, each in walk(node(schema, "spec"), "spec") if each["type"] == "object"
    }
    assert objects == set(SPEC_OBJECTS)


@pytest.mark.parametrize("dotted", sorted(SPEC_OBJECTS))
def test_schema_and_model_accept_the_same_fields(schema: dict[str, Any], dotted: str) -> None:
    assert parse_policy(SPEC_OBJECTS[dotted])  # the baseline is valid
    assert set(node(schema, dotted)["properties"]) == fields_known_to_model(
        SPEC_OBJECTS[dotted], dotted
    )


def test_enums_match_the_model(schema: dict[str, Any]) -> None:
    assert node(schema, "spec.store.type")["enum"] == [t.value for t in model.StoreType]
    assert node(schema, "spec.mode")["enum"] == [m.value for m in model.Mode]
    assert tuple(node(schema, "spec.store.s3.profile")["enum"]) == model.S3_PROFILES
    assert tuple(node(schema, "spec.store.s3.requestPayer")["enum"]) == model.REQUEST_PAYERS


def test_defaults_match_the_model(schema: dict[str, Any]) -> None:
    def default(dotted: str) -> Any:
        return node(schema, dotted)["default"]

    s3 = parse_policy(S3_DOC)
    bare = parse_policy(
        {**S3_DOC, "spec": {"store": S3_DOC["spec"]["store"], "match": {"olderThan": "7d"}}}
    )
    assert bare.interval == parse_duration(default("spec.schedule.interval"), "x")
    assert bare.match.quiet_period == parse_duration(default("spec.match.quietPeriod"), "x")
    assert bare.mode.value == default("spec.mode")
    assert bare.suspend is default("spec.suspend") is False
    assert bare.limits.max_aborts_per_sweep == default("spec.limits.maxAbortsPerSweep")
    assert bare.limits.requests_per_second == default("spec.limits.requestsPerSecond")
    assert bare.limits.concurrency == default("spec.limits.concurrency")
    assert s3.store.s3 is not None and s3.store.s3.region == default("spec.store.s3.region")
    glacier = parse_policy(GLACIER_DOC).store.glacier
    assert glacier is not None
    assert glacier.region == default("spec.store.glacier.region")
    assert glacier.account_id == default("spec.store.glacier.accountId")
    lilt = parse_policy(LILT_DOC).store.lilt
    assert lilt is not None and lilt.endpoint == default("spec.store.lilt.endpoint")
    # Objects whose fields all have defaults default to {} so that the API server fills them.
    assert default("spec.schedule") == {} and default("spec.limits") == {}
    # The profile's default depends on the endpoint: the schema must not pick one.
    assert "default" not in node(schema, "spec.store.s3.profile")


@pytest.mark.parametrize("name", ["maxAbortsPerSweep", "requestsPerSecond", "concurrency"])
def test_numeric_bounds_match_the_model(schema: dict[str, Any], name: str) -> None:
    field = node(schema, f"spec.limits.{name}")
    low, high = field["minimum"], field["maximum"]
    step = 1 if field["type"] == "integer" else low / 10
    for accepted in (low, high):
        parse_policy(with_value(S3_DOC, f"spec.limits.{name}", accepted))
    for rejected in (low - step, high + step):
        with pytest.raises(PolicyError) as caught:
            parse_policy(with_value(S3_DOC, f"spec.limits.{name}", rejected))
        assert caught.value.field == f"spec.limits.{name}"


DURATIONS = [
    "90m",
    "36h",
    "7d",
    "1d12h",
    "2w",
    "1w2d3h4m5s",
    "10s",
    "",
    "7",
    "d",
    "7 days",
    "1h1d",
    "-1h",
    "1.5h",
    "7D",
    " 7d",
]


@pytest.mark.parametrize(
    "dotted", ["spec.match.olderThan", "spec.match.quietPeriod", "spec.schedule.interval"]
)
def test_duration_pattern_agrees_with_the_model(schema: dict[str, Any], dotted: str) -> None:
    field = node(schema, dotted)
    assert field["minLength"] == 2
    assert field["pattern"] == "^([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
    for text in DURATIONS:
        by_schema = len(text) >= field["minLength"] and re.search(field["pattern"], text)
        try:
            parse_duration(text, dotted)
            by_model = True
        except PolicyError:
            by_model = False
        if text.strip() != text:
            continue  # the model tolerates surrounding blanks; the schema is stricter
        assert bool(by_schema) == by_model, text


BUCKETS = [
    "uploads",
    "a.b-c",
    "abc",
    "scratch--use1-az4--x-s3",
    "uploads-1250000000",
    "ab",
    "Uploads",
    "-uploads",
    "uploads-",
    "a" * 63,
    "a" * 64,
    "under_score",
]


def test_bucket_pattern_agrees_with_the_model(schema: dict[str, Any]) -> None:
    pattern = node(schema, "spec.store.s3.buckets")["items"]["pattern"]
    for bucket in BUCKETS:
        try:
            parse_policy(with_value(S3_DOC, "spec.store.s3.buckets", [bucket]))
            by_model = True
        except PolicyError:
            by_model = False
        assert bool(re.search(pattern, bucket)) == by_model, bucket


@pytest.mark.parametrize(
    ("dotted", "good", "bad"),
    [
        ("spec.store.s3.expectedBucketOwner", "111122223333", "11112222333"),
        ("spec.store.s3.endpoint", "http://minio:9000/base", "minio:9000"),
        ("spec.store.credentialsSecretRef.name", "minio-creds", "Minio_Creds"),
        ("spec.store.serviceAccountRef.name", "janitor", "Janitor"),
        ("spec.store.roleArn", "arn:aws:iam::111122223333:role/a/b", "arn:aws:s3:::bucket"),
        ("spec.store.assumeRole.roleArn", "arn:aws-cn:iam::111122223333:role/x", "role/x"),
        ("spec.store.assumeRole.externalId", "tenant-7:abc", "tenant 7"),
        ("spec.store.serviceAccountRef.audience", "https://sts.example", "two words"),
        ("spec.store.caBundleSecretRef.name", "private-ca", "Private_CA"),
        ("spec.store.caBundleSecretRef.key", "ca.pem", "ca/pem"),
    ],
)
def test_string_patterns_agree_with_the_model(
    schema: dict[str, Any], dotted: str, good: str, bad: str
) -> None:
    pattern = node(schema, dotted)["pattern"]
    document = AWS_DOC if dotted.endswith("expectedBucketOwner") else S3_DOC
    if dotted.startswith(IDENTITY_FIELDS):
        document = IDENTITY_DOC
    parse_policy(with_value(document, dotted, good))
    assert re.search(pattern, good)
    with pytest.raises(PolicyError):
        parse_policy(with_value(document, dotted, bad))
    assert not re.search(pattern, bad)


# --------------------------------------------------------------------------------------------
# Bounds: every value the schema accepts is one the model can use (or refuses, naming the field)


def spec_nodes(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((path, each) for path, each in walk(node(schema, "spec"), "spec"))


def test_every_spec_string_and_list_is_bounded(schema: dict[str, Any]) -> None:
    unbounded = [
        path
        for path, each in spec_nodes(schema)
        if (each["type"] == "string" and "maxLength" not in each and "enum" not in each)
        or (each["type"] == "array" and "maxItems" not in each)
    ]
    assert unbounded == []


LIST_BOUNDS = [
    ("spec.store.s3.buckets", S3_DOC, lambda i: f"bucket-{i:04d}"),
    ("spec.store.glacier.vaults", GLACIER_DOC, lambda i: f"v{i}"),
    ("spec.match.prefixes", S3_DOC, lambda i: f"p{i}/"),
    ("spec.match.excludeKeyGlobs", S3_DOC, lambda i: f"*.k{i}"),
]


@pytest.mark.parametrize(("dotted", "document", "item"), LIST_BOUNDS)
def test_list_bounds_match_the_model(
    schema: dict[str, Any], dotted: str, document: dict[str, Any], item: Any
) -> None:
    assert node(schema, dotted)["maxItems"] == model.MAX_LIST_ITEMS
    validator = jsonschema.Draft7Validator(as_json_schema(schema))
    full = with_value(document, dotted, [item(i) for i in range(model.MAX_LIST_ITEMS)])
    parse_policy(full)
    assert list(validator.iter_errors(full)) == []
    over = with_value(document, dotted, [item(i) for i in range(model.MAX_LIST_ITEMS + 1)])
    with pytest.raises(PolicyError) as caught:
        parse_policy(over)
    assert caught.value.field == dotted
    assert list(validator.iter_errors(over))


STRING_BOUNDS = [
    ("spec.store.s3.endpoint", S3_DOC, model.MAX_ENDPOINT_LENGTH, "https://m/{}"),
    ("spec.store.glacier.endpoint", GLACIER_DOC, model.MAX_ENDPOINT_LENGTH, "https://m/{}"),
    ("spec.store.lilt.endpoint", LILT_DOC, model.MAX_ENDPOINT_LENGTH, "https://m/{}"),
    ("spec.store.lilt.inventoryPath", LILT_DOC, model.MAX_PATH_LENGTH, "/var/{}"),
    ("spec.store.s3.region", S3_DOC, 63, "r{}"),
    ("spec.store.glacier.region", GLACIER_DOC, 63, "r{}"),
    ("spec.store.credentialsSecretRef.name", S3_DOC, model.MAX_NAME_LENGTH, "s{}"),
    ("spec.store.serviceAccountRef.name", IDENTITY_DOC, model.MAX_NAME_LENGTH, "s{}"),
    ("spec.store.caBundleSecretRef.name", IDENTITY_DOC, model.MAX_NAME_LENGTH, "s{}"),
    ("spec.store.caBundleSecretRef.key", IDENTITY_DOC, 253, "k{}"),
    ("spec.store.serviceAccountRef.audience", IDENTITY_DOC, model.MAX_AUDIENCE_LENGTH, "a{}"),
    ("spec.store.assumeRole.externalId", IDENTITY_DOC, 1224, "e{}"),
    ("spec.match.olderThan", S3_DOC, model.MAX_DURATION_LENGTH, "{}1s"),
    ("spec.match.quietPeriod", S3_DOC, model.MAX_DURATION_LENGTH, "{}1s"),
    ("spec.schedule.interval", S3_DOC, model.MAX_DURATION_LENGTH, "{}1h"),
]


@pytest.mark.parametrize(("dotted", "document", "limit", "form"), STRING_BOUNDS)
def test_string_bounds_match_the_model(
    schema: dict[str, Any], dotted: str, document: dict[str, Any], limit: int, form: str
) -> None:
    assert node(schema, dotted)["maxLength"] == limit
    filler = "0" if "{}1" in form else "a"

    def sized(length: int) -> str:
        return form.format(filler * (length - len(form) + 2))

    validator = jsonschema.Draft7Validator(as_json_schema(schema))
    at_limit = with_value(document, dotted, sized(limit))
    parse_policy(at_limit)
    assert list(validator.iter_errors(at_limit)) == []
    over = with_value(document, dotted, sized(limit + 1))
    with pytest.raises(PolicyError) as caught:
        parse_policy(over)
    assert caught.value.field == dotted
    assert list(validator.iter_errors(over))


@pytest.mark.parametrize(
    ("dotted", "document", "limit"),
    [
        ("spec.match.prefixes", S3_DOC, model.MAX_KEY_BYTES),
        ("spec.match.excludeKeyGlobs", S3_DOC, model.MAX_GLOB_LENGTH),
        ("spec.store.s3.buckets", S3_DOC, 63),
        ("spec.store.glacier.vaults", GLACIER_DOC, 255),
    ],
)
def test_list_item_lengths_match_the_model(
    schema: dict[str, Any], dotted: str, document: dict[str, Any], limit: int
) -> None:
    assert node(schema, dotted)["items"]["maxLength"] == limit
    validator = jsonschema.Draft7Validator(as_json_schema(schema))
    parse_policy(with_value(document, dotted, ["a" * limit]))
    over = with_value(document, dotted, ["a" * (limit + 1)])
    with pytest.raises(PolicyError) as caught:
        parse_policy(over)
    assert caught.value.field == f"{dotted}[0]"
    assert list(validator.iter_errors(over))


def test_bucket_pattern_is_bounded_like_the_model(schema: dict[str, Any]) -> None:
    field = node(schema, "spec.store.s3.bucketPattern")
    assert field["maxLength"] == model.MAX_BUCKET_PATTERN_LENGTH
    pattern_doc = with_value(S3_DOC, "spec.store.s3.buckets", None)
    parse_policy(with_value(pattern_doc, "spec.store.s3.bucketPattern", "a" * 255))
    with pytest.raises(PolicyError, match=r"^spec\.store\.s3\.bucketPattern: "):
        parse_policy(with_value(pattern_doc, "spec.store.s3.bucketPattern", "a" * 256))


MAX_SECONDS = int(model.MAX_DURATION.total_seconds())


@pytest.mark.parametrize(
    "dotted", ["spec.match.olderThan", "spec.match.quietPeriod", "spec.schedule.interval"]
)
def test_durations_are_capped_at_100_years_in_both(schema: dict[str, Any], dotted: str) -> None:
    rules = node(schema, dotted).get("x-kubernetes-validations", [])
    (cap,) = [r for r in rules if "100 years" in r["message"]]
    assert cap["rule"].endswith(f"<= {MAX_SECONDS}")
    assert dotted in cap["message"]
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        assert f"'[0-9]+{unit}'" in cap["rule"]
        assert f"* {size}" in cap["rule"] or size == 1
    assert MAX_SECONDS == 36500 * 86400
    assert parse_duration("36500d", dotted) == model.MAX_DURATION
    assert parse_duration("5214w2d", dotted) == model.MAX_DURATION
    for text in ("36501d", "36500d1s", "5215w", "99999999999d", "9" * 30 + "s"):
        with pytest.raises(PolicyError, match="100 years") as caught:
            parse_duration(text, dotted)
        assert caught.value.field == dotted


def re2_search(pattern: str, text: str) -> bool:
    """re.search with RE2's meaning of a final ``$`` (the end of the text, never before a
    trailing newline as in Python)."""
    if pattern.endswith("$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, text) is not None


ENDPOINTS = {
    "http://minio:9000": True,
    "https://minio.storage:9000/base/path": True,
    "http://127.0.0.1:9000": True,
    "http://[::1]:9000": True,
    "https://s3.eu-west-1.amazonaws.com": True,
    "minio:9000": False,
    "ftp://minio": False,
    "http://[::1": False,
    "http://user:password@minio:9000": False,
    "http://minio:9000?x=1": False,
    "http://minio:9000#top": False,
    "http://mínio:9000": False,
    "http://minio:9000/a b": False,
    "http://minio:9000/\n": False,
    "http://-minio": False,
    "http://a..b": False,
    "http://a.-b": False,
    "http://minio.": False,
    "http://" + "a" * 64 + ".example": False,
    "http://" + "a" * 63 + ".example": True,
    "http://": False,
}


def test_endpoint_pattern_agrees_with_the_model(schema: dict[str, Any]) -> None:
    for dotted in ("spec.store.s3.endpoint", "spec.store.glacier.endpoint"):
        assert node(schema, dotted)["pattern"] == f"^{model.ENDPOINT_PATTERN}$"
    pattern = node(schema, "spec.store.s3.endpoint")["pattern"]
    for endpoint, usable in ENDPOINTS.items():
        try:
            parse_policy(with_value(S3_DOC, "spec.store.s3.endpoint", endpoint))
            by_model = True
        except PolicyError as error:
            assert error.field == "spec.store.s3.endpoint", error
            by_model = False
        assert by_model == usable, endpoint
        assert re2_search(pattern, endpoint) == usable, endpoint
    # What the pattern cannot say, the model still refuses, naming the field.
    long_host = ".".join(["a" * 63] * 4)  # 255 characters of valid labels
    for stricter in (
        "http://minio:99999",
        "http://minio:0",
        "http://[1:2:3:4:5:6:7:8:9]",
        f"http://{long_host}",
    ):
        assert re2_search(pattern, stricter)
        with pytest.raises(PolicyError) as caught:
            parse_policy(with_value(S3_DOC, "spec.store.s3.endpoint", stricter))
        assert caught.value.field == "spec.store.s3.endpoint"


REGIONS = {
    "us-east-1": True,
    "eu-west-1": True,
    "default": True,
    "US": True,
    "a": True,
    "us east 1": False,
    "us-east-1\n": False,
    "-us": False,
    "us-": False,
    "us_east_1": False,
    "\uff55s": False,
    "12345": False,
    "a" * 64: False,
}


def test_region_pattern_agrees_with_the_model(schema: dict[str, Any]) -> None:
    field = node(schema, "spec.store.s3.region")
    glacier = node(schema, "spec.store.glacier.region")
    assert (field["pattern"], field["maxLength"]) == (glacier["pattern"], glacier["maxLength"])
    (digits_rule,) = field["x-kubernetes-validations"]
    for region, usable in REGIONS.items():
        try:
            parse_policy(with_value(S3_DOC, "spec.store.s3.region", region))
            by_model = True
        except PolicyError as error:
            assert error.field == "spec.store.s3.region", error
            by_model = False
        assert by_model == usable, region
        by_schema = (
            len(region) <= field["maxLength"]
            and re2_search(field["pattern"], region)
            and not region.isdigit()
        )
        assert by_schema == usable, region
    assert digits_rule["rule"] == "!self.matches('^[0-9]+$')"


def test_schema_rejects_what_the_model_rejects(schema: dict[str, Any]) -> None:
    """The same documents, through the CRD schema (as a JSON Schema, without CEL)."""
    validator = jsonschema.Draft7Validator(as_json_schema(schema))
    assert list(validator.iter_errors(S3_DOC)) == []
    bad_documents = {
        "unknown field": with_value(S3_DOC, "spec.store.s3.bucket", "uploads"),
        "mode case": with_value(S3_DOC, "spec.mode", "abort"),
        "store type": with_value(S3_DOC, "spec.store.type", "GCS"),
        "profile": with_value(S3_DOC, "spec.store.s3.profile", "minio"),
        "duration": with_value(S3_DOC, "spec.match.olderThan", "7 days"),
        "empty duration": with_value(S3_DOC, "spec.match.olderThan", ""),
        "concurrency": with_value(S3_DOC, "spec.limits.concurrency", 0),
        "rate": with_value(S3_DOC, "spec.limits.requestsPerSecond", 0.01),
        "suspend type": with_value(S3_DOC, "spec.suspend", "yes"),
        "no match": {**S3_DOC, "spec": {"store": S3_DOC["spec"]["store"]}},
        "no olderThan": with_value(S3_DOC, "spec.match", {"prefixes": ["tmp/"]}),
        "no store type": with_value(S3_DOC, "spec.store", {"s3": {"buckets": ["uploads"]}}),
        "duplicate bucket": with_value(S3_DOC, "spec.store.s3.buckets", ["a12", "a12"]),
        "empty vaults": with_value(GLACIER_DOC, "spec.store.glacier.vaults", []),
        "glacier account": with_value(GLACIER_DOC, "spec.store.glacier.accountId", "12"),
    }
    for why, document in bad_documents.items():
        with pytest.raises(PolicyError):
            parse_policy(document)
        if why == "duplicate bucket":
            continue  # x-kubernetes-list-type: set, enforced by the API server itself
        assert list(validator.iter_errors(document)), why
    assert node(schema, "spec.store.s3.buckets")["x-kubernetes-list-type"] == "set"


# --------------------------------------------------------------------------------------------
# Examples and the chart's copy


def example_policies() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == model.KIND:
                found.append((path.name, document))
    return found


def test_examples_parse_and_validate(schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(as_json_schema(schema))
    policies = example_policies()
    assert len(policies) >= 9
    for name, document in policies:
        parse_policy(document)
        assert [e.message for e in validator.iter_errors(document)] == [], name


def test_examples_cover_every_store() -> None:
    parsed = [parse_policy(document) for _, document in example_policies()]
    s3 = [p.store.s3 for p in parsed if p.store.s3 is not None]
    assert {t.profile for t in s3} == set(model.S3_PROFILES)
    assert any(p.store.glacier for p in parsed)
    assert any(p.store.type is model.StoreType.LILT for p in parsed)
    assert any(b.endswith("--x-s3") for t in s3 for b in t.buckets), "a directory bucket"
    assert any(t.profile == "AWS" and t.expected_bucket_owner and t.request_payer for t in s3)
    cos = [t for t in s3 if t.profile == "TencentCOS"]
    assert cos and all(re.search(r"-[0-9]+$", b) for t in cos for b in t.buckets)
    assert any(p.dry_run for p in parsed) and any(not p.dry_run for p in parsed)
    assert all(p.match.older_than > timedelta(0) for p in parsed)


def test_credentials_secret_example() -> None:
    secrets = [
        d
        for d in yaml.safe_load_all((EXAMPLES / "credentials-secret.yaml").read_text())
        if d and d["kind"] == "Secret"
    ]
    keys = {key for secret in secrets for key in secret["stringData"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LILT_API_KEY"} <= keys
    referenced = {
        (p.namespace, p.store.credentials_secret_ref.name)
        for p in (parse_policy(d) for _, d in example_policies())
        if p.store.credentials_secret_ref
    }
    shipped = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in secrets}
    assert shipped <= referenced  # each example Secret is one a policy example names


def test_chart_crds_are_a_copy_of_the_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in CRD_DIR.glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in CHART_CRD_DIR.glob("*.yaml")}
    assert sorted(chart) == sorted(top)
    drifted = [name for name in top if top[name] != chart[name]]
    assert drifted == [], "run: cp crds/*.yaml charts/mpu-janitor/crds/"


def test_kopf_peering_crds() -> None:
    documents = list(yaml.safe_load_all((CRD_DIR / "kopf-peerings.yaml").read_text()))
    by_name = {d["metadata"]["name"]: d["spec"] for d in documents}
    assert by_name["clusterkopfpeerings.kopf.dev"]["scope"] == "Cluster"
    assert by_name["clusterkopfpeerings.kopf.dev"]["names"]["kind"] == "ClusterKopfPeering"
    assert by_name["kopfpeerings.kopf.dev"]["scope"] == "Namespaced"
    assert by_name["kopfpeerings.kopf.dev"]["names"]["kind"] == "KopfPeering"


def test_status_the_operator_writes_fits_the_schema(schema: dict[str, Any]) -> None:
    # Every key the operator writes must be in the schema, or the API server prunes it.
    from datetime import UTC, datetime

    from mpu_janitor.status import sweep_status
    from mpu_janitor.sweep import BucketStats, SweepResult

    result = SweepResult(
        "ns",
        "p",
        "S3",
        False,
        datetime.now(UTC),
        datetime.now(UTC),
        buckets={"b": BucketStats(scanned=1, listed=True)},
    )
    written = sweep_status({}, result, generation=1, next_sweep=datetime.now(UTC))
    written["handledSweepNow"] = "1"
    status = node(schema, "status")["properties"]
    assert set(written) <= set(status)
    assert set(written["lastSweep"]) <= set(status["lastSweep"]["properties"])
    assert set(written["totals"]) <= set(status["totals"]["properties"])
    condition = written["conditions"][0]
    assert set(condition) <= set(status["conditions"]["items"]["properties"])
