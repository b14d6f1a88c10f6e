"""The typed model of an UploadLifecyclePolicy, parsed and validated from the CR document.

Every rejection names the field it is about (``spec.match.olderThan: ...``), so the same
message serves the CLI (exit code 2), the operator's ``InvalidSpec`` condition and the docs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from mpu_janitor.stores.profiles import profile as s3_profile

API_GROUP = "mpu-janitor.dev"
API_VERSION = "v1alpha1"
KIND = "UploadLifecyclePolicy"

_DURATION_RE = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_DURATION_UNITS = ("weeks", "days", "hours", "minutes", "seconds")

# Bucket names as S3 accepts them (3-63 chars); directory buckets end with --<zone>--x-s3.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_VAULT_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,255}$")
_ACCOUNT_RE = re.compile(r"^(-|\d{12})$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class PolicyError(ValueError):
    """A policy that can never work as written. ``field`` is the dotted path of the culprit."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field = field_path
        self.message = message


class StoreType(StrEnum):
    S3 = "S3"
    GLACIER = "Glacier"
    LILT = "LILT"


class Mode(StrEnum):
    ABORT = "Abort"
    DRY_RUN = "DryRun"


# What an abort does when an object exists at the upload's key (stores where an abort may
# delete that object: profiles.yaml `abort_may_delete_object`): Never abort, abort only if
# the object is older than the upload (IfObjectOlder), or abort without looking (Always).
OBJECT_AT_KEY_RULES = ("Never", "IfObjectOlder", "Always")
S3_PROFILES = ("AWS", "MinIO", "Ceph", "Scality", "TencentCOS", "Generic")  # = profiles.yaml
REQUEST_PAYERS = ("Requester",)
MAX_CONCURRENCY = 256  # spec.limits.concurrency; the stores' connection pools are this large
# The operator accepts LILT inventories only under this directory (--lilt-inventory-dir).
DEFAULT_LILT_INVENTORY_DIR = "/var/lib/mpu-janitor/lilt"


def parse_duration(text: str, field_path: str) -> timedelta:
    """``90m``, ``36h``, ``7d``, ``1d12h``, ``2w``: units in descending order, each at most once."""
    if not isinstance(text, str) or not text:
        raise PolicyError(
            field_path, f"{text!r} is not a duration: use units s m h d w, e.g. 1d12h"
        )
    match = _DURATION_RE.match(text.strip())
    if match is None or not any(match.groups()):
        raise PolicyError(
            field_path,
            f"{text!r} is not a duration: use whole numbers with units w d h m s "
            "in that order, e.g. 90m, 36h, 7d, 1d12h",
        )
    parts = {
        unit: int(value)
        for unit, value in zip(_DURATION_UNITS, match.groups(), strict=True)
        if value
    }
    return timedelta(**parts)


def format_duration(value: timedelta) -> str:
    """The inverse of :func:`parse_duration` (for messages and status)."""
    seconds = int(value.total_seconds())
    out = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out) or "0s"


@dataclass(frozen=True)
class SecretRef:
    name: str


@dataclass(frozen=True)
class S3Target:
    endpoint: str | None
    region: str
    profile: str
    buckets: tuple[str, ...]
    bucket_pattern: str | None
    expected_bucket_owner: str | None
    request_payer: str | None
    # Never | IfObjectOlder | Always; None: the profile's default (see profiles.yaml)
    abort_when_key_has_object: str | None = None

    def selects(self, bucket: str) -> bool:
        """Whether a bucket from ListBuckets belongs to this policy (pattern mode)."""
        if self.buckets:
            return bucket in self.buckets
        return self.bucket_pattern is not None and fnmatch.fnmatchcase(bucket, self.bucket_pattern)


@dataclass(frozen=True)
class GlacierTarget:
    endpoint: str | None
    region: str
    account_id: str
    vaults: tuple[str, ...]


@dataclass(frozen=True)
class LiltTarget:
    endpoint: str
    inventory_path: str


@dataclass(frozen=True)
class StoreSpec:
    type: StoreType
    s3: S3Target | None = None
    glacier: GlacierTarget | None = None
    lilt: LiltTarget | None = None
    credentials_secret_ref: SecretRef | None = None


@dataclass(frozen=True)
class MatchSpec:
    older_than: timedelta
    prefixes: tuple[str, ...] = ()
    exclude_key_globs: tuple[str, ...] = ()
    quiet_period: timedelta = timedelta(hours=1)

    def matches_key(self, key: str) -> bool:
        """Prefix and glob scope of a key (age is judged separately, on the store's clock)."""
        if self.prefixes and not any(key.startswith(prefix) for prefix in self.prefixes):
            return False
        return not any(fnmatch.fnmatchcase(key, glob) for glob in self.exclude_key_globs)


@dataclass(frozen=True)
class Limits:
    max_aborts_per_sweep: int = 10000
    requests_per_second: float = 100.0
    concurrency: int = 16


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    store: StoreSpec
    match: MatchSpec
    interval: timedelta = timedelta(hours=1)
    mode: Mode = Mode.ABORT
    limits: Limits = field(default_factory=Limits)
    suspend: bool = False
    generation: int | None = None

    @property
    def dry_run(self) -> bool:
        return self.mode is Mode.DRY_RUN

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


# --------------------------------------------------------------------------------------------
# Parsing


class _Fields:
    """Reads one mapping of the document, remembering its path for error messages."""

    def __init__(self, data: Any, path: str, known: Sequence[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError(path, f"must be an object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PolicyError(
                f"{path}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(known))})"
            )
        self.data = data
        self.path = path

    def at(self, name: str) -> str:
        return f"{self.path}.{name}"

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def string(
        self, name: str, default: str | None = None, *, required: bool = False
    ) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise PolicyError(self.at(name), "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise PolicyError(self.at(name), f"must be a non-empty string, not {value!r}")
        return value

    def choice(
        self,
        name: str,
        choices: Sequence[str],
        default: str | None = None,
        *,
        required: bool = False,
    ) -> str | None:
        if self.data.get(name) is None:
            if required:
                raise PolicyError(self.at(name), f"is required (one of {', '.join(choices)})")
            return default
        value = self.string(name)
        if value not in choices:
            raise PolicyError(
                self.at(name), f"{value!r} is not one of {', '.join(choices)} (case matters)"
            )
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise PolicyError(self.at(name), f"must be true or false, not {value!r}")
        return value

    def number(self, name: str, default: float, *, low: float, high: float, integer: bool) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(self.at(name), f"must be a number, not {value!r}")
        if integer and not float(value).is_integer():
            raise PolicyError(self.at(name), f"must be a whole number, not {value!r}")
        if not low <= value <= high:
            raise PolicyError(self.at(name), f"must be between {low:g} and {high:g}, not {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise PolicyError(self.at(name), f"must be a list of strings, not {value!r}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise PolicyError(
                    f"{self.at(name)}[{index}]", f"must be a non-empty string, not {item!r}"
                )
        if len(set(value)) != len(value):
            raise PolicyError(self.at(name), "has duplicate entries")
        return tuple(value)

    def duration(self, name: str, default: timedelta | None = None) -> timedelta:
        value = self.data.get(name)
        if value is None:
            if default is None:
                raise PolicyError(self.at(name), "is required (a duration such as 7d or 1d12h)")
            return default
        return parse_duration(value, self.at(name))


def _endpoint(fields: _Fields, name: str) -> str | None:
    endpoint = fields.string(name)
    if endpoint is not None and not re.match(r"^https?://[^\s/]+(/.*)?$", endpoint):
        raise PolicyError(fields.at(name), f"{endpoint!r} must be an http:// or https:// URL")
    return endpoint


def _parse_s3(data: Any, path: str) -> S3Target:
    f = _Fields(
        data,
        path,
        (
            "endpoint",
            "region",
            "profile",
            "buckets",
            "bucketPattern",
            "expectedBucketOwner",
            "requestPayer",
            "abortWhenKeyHasObject",
        ),
    )
    endpoint = _endpoint(f, "endpoint")
    profile = f.choice("profile", S3_PROFILES, "AWS" if endpoint is None else "Generic")
    assert profile is not None
    buckets = f.strings("buckets")
    pattern = f.string("bucketPattern")
    if bool(buckets) == (pattern is not None):
        raise PolicyError(f.at("buckets"), "set exactly one of buckets or bucketPattern")
    for index, bucket in enumerate(buckets):
        if not _BUCKET_RE.match(bucket):
            raise PolicyError(
                f"{f.at('buckets')}[{index}]", f"{bucket!r} is not a valid bucket name"
            )
        problem = s3_profile(profile).bucket_name_problem(bucket)
        if problem:
            raise PolicyError(f"{f.at('buckets')}[{index}]", problem)
    owner = f.string("expectedBucketOwner")
    if owner is not None and not re.match(r"^\d{12}$", owner):
        raise PolicyError(f.at("expectedBucketOwner"), f"{owner!r} is not a 12-digit account id")
    payer = f.choice("requestPayer", REQUEST_PAYERS)
    region = f.string("region", "us-east-1")
    assert region is not None
    object_rule = f.choice("abortWhenKeyHasObject", OBJECT_AT_KEY_RULES)
    return S3Target(endpoint, region, profile, buckets, pattern, owner, payer, object_rule)


def _parse_glacier(data: Any, path: str) -> GlacierTarget:
    f = _Fields(data, path, ("endpoint", "region", "accountId", "vaults"))
    vaults = f.strings("vaults")
    if not vaults:
        raise PolicyError(f.at("vaults"), "is required: list at least one vault")
    for index, vault in enumerate(vaults):
        if not _VAULT_RE.match(vault):
            raise PolicyError(f"{f.at('vaults')}[{index}]", f"{vault!r} is not a valid vault name")
    account = f.string("accountId", "-")
    assert account is not None
    if not _ACCOUNT_RE.match(account):
        raise PolicyError(f.at("accountId"), f"{account!r} must be '-' or a 12-digit account id")
    region = f.string("region", "us-east-1")
    assert region is not None
    return GlacierTarget(_endpoint(f, "endpoint"), region, account, vaults)


def _parse_lilt(data: Any, path: str) -> LiltTarget:
    f = _Fields(data, path, ("endpoint", "inventoryPath"))
    inventory = f.string("inventoryPath")
    if inventory is None:
        raise PolicyError(
            f.at("inventoryPath"),
            "is required: LILT cannot list incomplete uploads, the sweep reads them from the "
            "inventory the uploader records",
        )
    return LiltTarget(_endpoint(f, "endpoint") or "https://api.lilt.com", inventory)


def _parse_store(data: Any, path: str) -> StoreSpec:
    f = _Fields(data, path, ("type", "s3", "glacier", "lilt", "credentialsSecretRef"))
    store_type = StoreType(f.choice("type", [t.value for t in StoreType], required=True) or "")
    for other in ("s3", "glacier", "lilt"):
        if other != store_type.value.lower() and f.has(other):
            raise PolicyError(f.at(other), f"does not belong to a store of type {store_type.value}")
    section = store_type.value.lower()
    if not f.has(section):
        raise PolicyError(f.at(section), f"is required for type {store_type.value}")
    secret_ref = None
    if f.has("credentialsSecretRef"):
        ref = _Fields(f.data["credentialsSecretRef"], f.at("credentialsSecretRef"), ("name",))
        name = ref.string("name", required=True)
        assert name is not None
        if not _DNS_LABEL_RE.match(name):
            raise PolicyError(ref.at("name"), f"{name!r} is not a valid Secret name")
        secret_ref = SecretRef(name)
    if store_type is StoreType.S3:
        return StoreSpec(
            store_type, s3=_parse_s3(f.data["s3"], f.at("s3")), credentials_secret_ref=secret_ref
        )
    if store_type is StoreType.GLACIER:
        return StoreSpec(
            store_type,
            glacier=_parse_glacier(f.data["glacier"], f.at("glacier")),
            credentials_secret_ref=secret_ref,
        )
    return StoreSpec(
        store_type,
        lilt=_parse_lilt(f.data["lilt"], f.at("lilt")),
        credentials_secret_ref=secret_ref,
    )


def _parse_match(data: Any, path: str) -> MatchSpec:
    if data is None:
        raise PolicyError(path, "is required (at least match.olderThan)")
    f = _Fields(data, path, ("olderThan", "prefixes", "excludeKeyGlobs", "quietPeriod"))
    older_than = f.duration("olderThan")
    if older_than <= timedelta(0):
        raise PolicyError(f.at("olderThan"), "must be longer than zero")
    prefixes = f.strings("prefixes")
    globs = f.strings("excludeKeyGlobs")
    quiet = f.duration("quietPeriod", timedelta(hours=1))
    return MatchSpec(older_than, prefixes, globs, quiet)


def parse_policy(document: Mapping[str, Any]) -> Policy:
    """Parse a whole UploadLifecyclePolicy document (apiVersion, kind, metadata, spec)."""
    if not isinstance(document, Mapping):
        raise PolicyError("(document)", "must be a YAML mapping (an UploadLifecyclePolicy)")
    api_version = document.get("apiVersion")
    if api_version is not None and api_version != f"{API_GROUP}/{API_VERSION}":
        raise PolicyError("apiVersion", f"{api_version!r} must be {API_GROUP}/{API_VERSION}")
    kind = document.get("kind")
    if kind is not None and kind != KIND:
        raise PolicyError("kind", f"{kind!r} must be {KIND}")
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise PolicyError("metadata", "must be an object")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError("metadata.name", "is required")
    namespace = metadata.get("namespace") or "default"
    generation = metadata.get("generation")
    return parse_spec(
        document.get("spec"),
        name=name,
        namespace=str(namespace),
        generation=generation if isinstance(generation, int) else None,
    )


def parse_spec(spec: Any, *, name: str, namespace: str, generation: int | None = None) -> Policy:
    """Parse the ``spec`` of a policy (the operator already has metadata from Kopf)."""
    if spec is None:
        raise PolicyError("spec", "is required")
    f = _Fields(spec, "spec", ("store", "match", "schedule", "mode", "limits", "suspend"))
    if not f.has("store"):
        raise PolicyError("spec.store", "is required")
    store = _parse_store(f.data["store"], "spec.store")
    match = _parse_match(f.data.get("match"), "spec.match")
    schedule = _Fields(f.data.get("schedule"), "spec.schedule", ("interval",))
    interval = schedule.duration("interval", timedelta(hours=1))
    if interval < timedelta(seconds=10):
        raise PolicyError("spec.schedule.interval", "must be at least 10s")
    mode = Mode(f.choice("mode", [m.value for m in Mode]) or Mode.ABORT.value)
    lim = _Fields(
        f.data.get("limits"),
        "spec.limits",
        ("maxAbortsPerSweep", "requestsPerSecond", "concurrency"),
    )
    limits = Limits(
        max_aborts_per_sweep=int(
            lim.number("maxAbortsPerSweep", 10000, low=0, high=10_000_000, integer=True)
        ),
        requests_per_second=float(
            lim.number("requestsPerSecond", 100, low=0.1, high=10_000, integer=False)
        ),
        concurrency=int(lim.number("concurrency", 16, low=1, high=MAX_CONCURRENCY, integer=True)),
    )
    suspend = f.boolean("suspend", False)
    return Policy(name, namespace, store, match, interval, mode, limits, suspend, generation)
