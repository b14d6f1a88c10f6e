"""A corpus of hostile UploadLifecyclePolicy specs: wrong types, absurd numbers, unicode and
control characters, enormous lists, nested junk, vendor rules, over every field.

Each entry must be refused naming ``field``: exit 2 from ``mpu-janitor sweep -f`` and, through a
real API server, either a schema rejection or an accepted object that the policy model refuses
(``InvalidSpec`` in the operator). Entries with ``yaml`` text carry what JSON cannot (NaN,
infinity, non-string keys, lone surrogates, anchors, nesting deeper than any API server
allows): they go through the CLI only.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import yaml

ENDPOINT = "http://127.0.0.1:9"  # nothing listens there: no entry may get as far as a request


def base() -> dict[str, Any]:
    """A valid policy every entry spoils in one place."""
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": "hostile"},
        "spec": {
            "store": {
                "type": "S3",
                "s3": {"endpoint": ENDPOINT, "profile": "MinIO", "buckets": ["uploads"]},
            },
            "match": {"olderThan": "7d"},
        },
    }


DELETE = object()


def spoil(path: str, value: Any, document: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``document`` (default: :func:`base`) with the dotted ``path`` set to ``value``
    (or deleted, with :data:`DELETE`)."""
    document = copy.deepcopy(document if document is not None else base())
    *parents, leaf = path.split(".")
    node = document
    for name in parents:
        node = node.setdefault(name, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return document


def s3(**fields: Any) -> dict[str, Any]:
    """The base document with ``spec.store.s3`` replaced."""
    return spoil("spec.store.s3", fields)


def store(section: dict[str, Any]) -> dict[str, Any]:
    return spoil("spec.store", section)


@dataclass(frozen=True)
class Hostile:
    id: str
    field: str  # the dotted field the rejection must name
    document: Any = None
    yaml: str | None = None  # raw YAML for what JSON cannot carry (CLI only)

    @property
    def for_api_server(self) -> bool:
        return self.yaml is None

    def yaml_text(self) -> str:
        if self.yaml is not None:
            return self.yaml
        return yaml.safe_dump(self.document, allow_unicode=True, sort_keys=False)

    def json_text(self) -> str:
        return json.dumps(self.document)


def _yaml_with(path: str, scalar: str) -> str:
    """The base policy as YAML with one spec field written as raw YAML text."""
    marker = "__HOSTILE__"
    text = yaml.safe_dump(spoil(path, marker), sort_keys=False)
    return text.replace(marker, scalar, 1)


_MANY = 1001  # one more than any list may hold
_MANY_BUCKETS = [f"bucket-{index:04d}" for index in range(_MANY)]

CORPUS: list[Hostile] = [
    # ---- wrong types, every field
    Hostile("spec-list", "spec", spoil("spec", ["store", "match"])),
    Hostile("store-string", "spec.store", spoil("spec.store", "s3://uploads")),
    Hostile("store-type-number", "spec.store.type", spoil("spec.store.type", 5)),
    Hostile("s3-list", "spec.store.s3", spoil("spec.store.s3", [])),
    Hostile("endpoint-number", "spec.store.s3.endpoint", spoil("spec.store.s3.endpoint", 9000)),
    Hostile("region-list", "spec.store.s3.region", spoil("spec.store.s3.region", ["a"])),
    Hostile("profile-bool", "spec.store.s3.profile", spoil("spec.store.s3.profile", True)),
    Hostile("buckets-string", "spec.store.s3.buckets", spoil("spec.store.s3.buckets", "uploads")),
    Hostile("bucket-number", "spec.store.s3.buckets[0]", spoil("spec.store.s3.buckets", [42])),
    Hostile("bucket-null", "spec.store.s3.buckets[0]", spoil("spec.store.s3.buckets", [None])),
    Hostile("bucket-nested", "spec.store.s3.buckets[0]", spoil("spec.store.s3.buckets", [["a"]])),
    Hostile("match-string", "spec.match", spoil("spec.match", "7d")),
    Hostile("older-than-number", "spec.match.olderThan", spoil("spec.match.olderThan", 7)),
    Hostile("older-than-bool", "spec.match.olderThan", spoil("spec.match.olderThan", True)),
    Hostile("prefixes-object", "spec.match.prefixes", spoil("spec.match.prefixes", {"a": "b"})),
    Hostile(
        "glob-object",
        "spec.match.excludeKeyGlobs[0]",
        spoil("spec.match.excludeKeyGlobs", [{"x": 1}]),
    ),
    Hostile("schedule-list", "spec.schedule", spoil("spec.schedule", [])),
    Hostile("interval-number", "spec.schedule.interval", spoil("spec.schedule.interval", 3600)),
    Hostile(
        "concurrency-string", "spec.limits.concurrency", spoil("spec.limits.concurrency", "16")
    ),
    Hostile(
        "max-aborts-bool",
        "spec.limits.maxAbortsPerSweep",
        spoil("spec.limits.maxAbortsPerSweep", True),
    ),
    Hostile(
        "rps-list", "spec.limits.requestsPerSecond", spoil("spec.limits.requestsPerSecond", [])
    ),
    Hostile("suspend-string", "spec.suspend", spoil("spec.suspend", "false")),
    Hostile("mode-list", "spec.mode", spoil("spec.mode", ["Abort"])),
    Hostile(
        "secret-ref-string",
        "spec.store.credentialsSecretRef",
        spoil("spec.store.credentialsSecretRef", "creds"),
    ),
    Hostile(
        "secret-name-number",
        "spec.store.credentialsSecretRef.name",
        spoil("spec.store.credentialsSecretRef", {"name": 7}),
    ),
    # ---- huge, negative, non-finite numbers and durations
    Hostile(
        "older-than-overflow", "spec.match.olderThan", spoil("spec.match.olderThan", "99999999999d")
    ),
    Hostile("older-than-101y", "spec.match.olderThan", spoil("spec.match.olderThan", "36501d")),
    Hostile(
        "older-than-40-digits",
        "spec.match.olderThan",
        spoil("spec.match.olderThan", "9" * 40 + "s"),
    ),
    Hostile(
        "older-than-other-digits", "spec.match.olderThan", spoil("spec.match.olderThan", "\u0667d")
    ),
    Hostile(
        "interval-overflow", "spec.schedule.interval", spoil("spec.schedule.interval", "99999999w")
    ),
    Hostile("interval-101y", "spec.schedule.interval", spoil("spec.schedule.interval", "5300w")),
    Hostile(
        "quiet-period-overflow",
        "spec.match.quietPeriod",
        spoil("spec.match.quietPeriod", "99999999999999999999d"),
    ),
    Hostile(
        "concurrency-400-digits",
        "spec.limits.concurrency",
        yaml=_yaml_with("spec.limits.concurrency", "1" + "0" * 400),
    ),
    Hostile(
        "concurrency-negative", "spec.limits.concurrency", spoil("spec.limits.concurrency", -1)
    ),
    Hostile(
        "concurrency-1e308", "spec.limits.concurrency", spoil("spec.limits.concurrency", 1e308)
    ),
    Hostile(
        "concurrency-fraction", "spec.limits.concurrency", spoil("spec.limits.concurrency", 2.5)
    ),
    Hostile(
        "max-aborts-negative",
        "spec.limits.maxAbortsPerSweep",
        spoil("spec.limits.maxAbortsPerSweep", -5),
    ),
    Hostile(
        "max-aborts-past-int64",
        "spec.limits.maxAbortsPerSweep",
        spoil("spec.limits.maxAbortsPerSweep", 10**19),
    ),
    Hostile(
        "rps-nan",
        "spec.limits.requestsPerSecond",
        yaml=_yaml_with("spec.limits.requestsPerSecond", ".nan"),
    ),
    Hostile(
        "rps-inf",
        "spec.limits.requestsPerSecond",
        yaml=_yaml_with("spec.limits.requestsPerSecond", ".inf"),
    ),
    Hostile(
        "rps-minus-inf",
        "spec.limits.requestsPerSecond",
        yaml=_yaml_with("spec.limits.requestsPerSecond", "-.inf"),
    ),
    Hostile(
        "rps-1e400",
        "spec.limits.requestsPerSecond",
        yaml=_yaml_with("spec.limits.requestsPerSecond", "1.0e+400"),
    ),
    Hostile("rps-zero", "spec.limits.requestsPerSecond", spoil("spec.limits.requestsPerSecond", 0)),
    # ---- strings: unicode, control characters, lengths, URLs
    Hostile("region-spaces", "spec.store.s3.region", spoil("spec.store.s3.region", "us east 1")),
    Hostile("region-newline", "spec.store.s3.region", spoil("spec.store.s3.region", "us-east-1\n")),
    Hostile(
        "region-unicode",
        "spec.store.s3.region",
        spoil("spec.store.s3.region", "\uff95\uff70\uff74\uff7d-1"),
    ),
    Hostile("region-digits", "spec.store.s3.region", spoil("spec.store.s3.region", "12345")),
    Hostile("region-64", "spec.store.s3.region", spoil("spec.store.s3.region", "a" * 64)),
    Hostile(
        "endpoint-ipv6-open",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://[::1"),
    ),
    Hostile(
        "endpoint-credentials",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://user:password@minio:9000"),
    ),
    Hostile(
        "endpoint-port-range",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://minio:99999"),
    ),
    Hostile(
        "endpoint-nul",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://minio:9000/\x00"),
    ),
    Hostile(
        "endpoint-idn",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "https://mínio.example"),
    ),
    Hostile(
        "endpoint-ftp", "spec.store.s3.endpoint", spoil("spec.store.s3.endpoint", "ftp://minio")
    ),
    Hostile(
        "endpoint-query",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://minio:9000?x=1"),
    ),
    Hostile(
        "endpoint-huge",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://" + "a" * 3000),
    ),
    Hostile(
        "endpoint-bad-ipv6",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://[1:2:3:4:5:6:7:8:9]:9000"),
    ),
    Hostile(
        "endpoint-empty-label",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://minio..storage:9000"),
    ),
    Hostile(
        "endpoint-label-64",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", "http://" + "a" * 64 + ".example"),
    ),
    Hostile(
        "bucket-newline", "spec.store.s3.buckets[0]", spoil("spec.store.s3.buckets", ["uploads\n"])
    ),
    Hostile(
        "bucket-fullwidth",
        "spec.store.s3.buckets[0]",
        spoil("spec.store.s3.buckets", ["\uff55ploads"]),
    ),
    Hostile(
        "bucket-pattern-huge",
        "spec.store.s3.bucketPattern",
        s3(endpoint=ENDPOINT, profile="MinIO", bucketPattern="x" * 5000),
    ),
    Hostile(
        "prefix-1025-chars", "spec.match.prefixes[0]", spoil("spec.match.prefixes", ["a" * 1025])
    ),
    Hostile(
        "prefix-1200-bytes", "spec.match.prefixes[0]", spoil("spec.match.prefixes", ["é" * 600])
    ),
    Hostile("prefix-empty", "spec.match.prefixes[0]", spoil("spec.match.prefixes", [""])),
    Hostile(
        "glob-huge",
        "spec.match.excludeKeyGlobs[0]",
        spoil("spec.match.excludeKeyGlobs", ["*" * 5000]),
    ),
    Hostile(
        "glob-lone-surrogate",
        "spec.match.excludeKeyGlobs[0]",
        yaml=_yaml_with("spec.match.excludeKeyGlobs", '["\\ud800*"]'),
    ),
    Hostile("name-control-characters", "metadata.name", spoil("metadata", {"name": "bad\x07name"})),
    Hostile(
        "secret-name-newline",
        "spec.store.credentialsSecretRef.name",
        spoil("spec.store.credentialsSecretRef", {"name": "creds\n"}),
    ),
    Hostile(
        "inventory-nul",
        "spec.store.lilt.inventoryPath",
        store({"type": "LILT", "lilt": {"inventoryPath": "/var/lib/mpu-janitor/lilt/\x00x"}}),
    ),
    Hostile(
        "inventory-huge",
        "spec.store.lilt.inventoryPath",
        store({"type": "LILT", "lilt": {"inventoryPath": "/" + "a" * 5000}}),
    ),
    Hostile(
        "lilt-endpoint-credentials",
        "spec.store.lilt.endpoint",
        store(
            {
                "type": "LILT",
                "lilt": {
                    "endpoint": "https://key:secret@api.lilt.com",
                    "inventoryPath": "/var/lib/mpu-janitor/lilt/inventory.jsonl",
                },
            }
        ),
    ),
    Hostile(
        "vault-newline",
        "spec.store.glacier.vaults[0]",
        store({"type": "Glacier", "glacier": {"vaults": ["photos\n"]}}),
    ),
    Hostile(
        "glacier-region-spaces",
        "spec.store.glacier.region",
        store({"type": "Glacier", "glacier": {"vaults": ["photos"], "region": "eu west 1"}}),
    ),
    Hostile(
        "glacier-account-other-digits",
        "spec.store.glacier.accountId",
        store({"type": "Glacier", "glacier": {"vaults": ["photos"], "accountId": "\u0661" * 12}}),
    ),
    Hostile(
        "owner-other-digits",
        "spec.store.s3.expectedBucketOwner",
        s3(buckets=["uploads"], expectedBucketOwner="\u0661" * 12),
    ),
    # ---- enormous lists
    Hostile("buckets-1001", "spec.store.s3.buckets", spoil("spec.store.s3.buckets", _MANY_BUCKETS)),
    Hostile(
        "prefixes-1001",
        "spec.match.prefixes",
        spoil("spec.match.prefixes", [f"p{i}/" for i in range(_MANY)]),
    ),
    Hostile(
        "globs-1001",
        "spec.match.excludeKeyGlobs",
        spoil("spec.match.excludeKeyGlobs", [f"*.k{i}" for i in range(_MANY)]),
    ),
    Hostile(
        "vaults-1001",
        "spec.store.glacier.vaults",
        store({"type": "Glacier", "glacier": {"vaults": [f"v{i}" for i in range(_MANY)]}}),
    ),
    Hostile(
        "prefixes-100000",
        "spec.match.prefixes",
        yaml=yaml.safe_dump(spoil("spec.match.prefixes", [f"p{i}/" for i in range(100_000)])),
    ),
    # ---- nested junk and YAML oddities
    Hostile("older-than-object", "spec.match.olderThan", spoil("spec.match.olderThan", {"$ne": 1})),
    Hostile(
        "endpoint-object",
        "spec.store.s3.endpoint",
        spoil("spec.store.s3.endpoint", {"url": ENDPOINT}),
    ),
    Hostile(
        "unknown-nested-field",
        "spec.store.s3.extra",
        spoil("spec.store.s3.extra", {"a": [1, {"b": 2}]}),
    ),
    Hostile(
        "mixed-key-types",
        "spec.match.x",
        yaml=_yaml_with("spec.match", "{olderThan: 7d, 1: one, x: two, null: three}"),
    ),
    Hostile(
        "self-referencing-list",
        "spec.match.prefixes[0]",
        yaml=_yaml_with("spec.match.prefixes", "&loop [*loop]"),
    ),
    Hostile(
        "nested-10000-deep", "-f", yaml=_yaml_with("spec.match.prefixes", "[" * 10000 + "]" * 10000)
    ),
    Hostile("top-level-list", "(document)", yaml="- kind: UploadLifecyclePolicy\n"),
    Hostile(
        "binary-bucket",
        "spec.store.s3.buckets[0]",
        yaml=_yaml_with("spec.store.s3.buckets", "[!!binary aGk=]"),
    ),
    Hostile("spec-null", "spec", spoil("spec", None)),
    # ---- vendor rules (profile data): credentials never sent to the wrong service
    Hostile(
        "cos-without-endpoint",
        "spec.store.s3.endpoint",
        s3(profile="TencentCOS", region="ap-guangzhou", buckets=["uploads-1250000000"]),
    ),
    Hostile(
        "minio-without-endpoint", "spec.store.s3.endpoint", s3(profile="MinIO", buckets=["uploads"])
    ),
    Hostile(
        "scality-without-endpoint",
        "spec.store.s3.endpoint",
        s3(profile="Scality", buckets=["uploads"]),
    ),
    Hostile(
        "cos-bucket-host",
        "spec.store.s3.endpoint",
        s3(
            profile="TencentCOS",
            region="ap-guangzhou",
            endpoint="https://uploads-1250000000.cos.ap-guangzhou.myqcloud.com",
            buckets=["uploads-1250000000"],
        ),
    ),
    Hostile(
        "cos-default-region",
        "spec.store.s3.region",
        s3(
            profile="TencentCOS",
            endpoint="https://cos.ap-guangzhou.myqcloud.com",
            buckets=["uploads-1250000000"],
        ),
    ),
    Hostile(
        "cos-as-generic",
        "spec.store.s3.profile",
        s3(
            profile="Generic",
            region="ap-guangzhou",
            endpoint="https://cos.ap-guangzhou.myqcloud.com",
            buckets=["uploads-1250000000"],
        ),
    ),
    Hostile(
        "scality-expected-owner",
        "spec.store.s3.expectedBucketOwner",
        s3(
            endpoint=ENDPOINT,
            profile="Scality",
            buckets=["uploads"],
            expectedBucketOwner="111122223333",
        ),
    ),
    Hostile(
        "minio-request-payer",
        "spec.store.s3.requestPayer",
        s3(endpoint=ENDPOINT, profile="MinIO", buckets=["uploads"], requestPayer="Requester"),
    ),
    Hostile(
        "cos-expected-owner",
        "spec.store.s3.expectedBucketOwner",
        s3(
            profile="TencentCOS",
            region="ap-guangzhou",
            endpoint="https://cos.ap-guangzhou.myqcloud.com",
            buckets=["uploads-1250000000"],
            expectedBucketOwner="111122223333",
        ),
    ),
]
