"""The typed model of an UploadLifecyclePolicy, parsed and validated from the CR document.

Every rejection names the field it is about (``spec.match.olderThan: ...``), so the same
message serves the CLI (exit code 2), the operator's ``InvalidSpec`` condition and the docs.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from mpu_janitor.stores.profiles import S3Profile, load_profiles
from mpu_janitor.stores.profiles import profile as s3_profile

API_GROUP = "mpu-janitor.dev"
API_VERSION = "v1alpha1"
KIND = "UploadLifecyclePolicy"

# Every pattern is ASCII-only and matched whole (re.fullmatch): Python's \d and $ would let
# other scripts' digits and a trailing newline through, which the API server's RE2 refuses.
_DURATION_RE = re.compile(r"(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_SECONDS = (604800, 86400, 3600, 60, 1)

# Bucket names as S3 accepts them (3-63 chars); directory buckets end with --<zone>--x-s3.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_VAULT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,255}")
_ACCOUNT_RE = re.compile(r"-|[0-9]{12}")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# A region is one host label, as botocore requires (and not all digits, which it refuses too).
_REGION_RE = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")
# http(s)://host[:port][/path]: a DNS name (dot-separated labels of 1-63 letters, digits and
# inner hyphens, as botocore requires) or a bracketed IPv6 address, no user:password@, no query
# or fragment, only URL-safe ASCII. The CRD carries the same pattern.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ENDPOINT_PATTERN = (
    rf"https?://(\[[0-9A-Fa-f:.]+\]|{_LABEL}(\.{_LABEL})*)(:[0-9]{{1,5}})?"
    r"(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?"
)
MAX_HOST_LENGTH = 253
_ENDPOINT_RE = re.compile(ENDPOINT_PATTERN)


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
# spec.limits.concurrency's default cap (bench/README.md, "bench_side_by_side.py": at 100 ms
# RTT a cap of 16 holds a sweep to a third of what 64 reaches; at 20 ms the two are equal).
DEFAULT_CONCURRENCY = 64
# Bounds on everything a policy may ask for; the CRD carries the same (tests/unit/test_crd.py).
MAX_DURATION = timedelta(days=36500)  # 100 years: far beyond any use, far below any overflow
MAX_DURATION_LENGTH = 32
MAX_LIST_ITEMS = 1000  # buckets, vaults, prefixes, excludeKeyGlobs
MAX_KEY_BYTES = 1024  # an S3 object key: a longer prefix can never match
MAX_GLOB_LENGTH = 1024
MAX_BUCKET_PATTERN_LENGTH = 255
MAX_ENDPOINT_LENGTH = 2048
MAX_PATH_LENGTH = 4096
MAX_NAME_LENGTH = 253
# The longest repr of a hostile value quoted in a message.
_SHOWN = 60
# The operator accepts LILT inventories only under this directory (--lilt-inventory-dir).
DEFAULT_LILT_INVENTORY_DIR = "/var/lib/mpu-janitor/lilt"
# Workload identity (spec.store.serviceAccountRef): the token's audience unless the policy names
# one (what EKS's IRSA and AWS's OIDC providers expect), and the IAM role ARNs STS accepts.
DEFAULT_AUDIENCE = "sts.amazonaws.com"
ROLE_ARN_PATTERN = r"arn:[a-z][a-z0-9-]{0,31}:iam::([0-9]{12})?:role/[A-Za-z0-9+=,.@_/-]{1,512}"
_ROLE_ARN_RE = re.compile(ROLE_ARN_PATTERN)
MAX_ROLE_ARN_LENGTH = 2048
# STS: ExternalId is 2-1224 characters of [\w+=,.@:/-].
EXTERNAL_ID_PATTERN = r"[A-Za-z0-9_+=,.@:/-]{2,1224}"
_EXTERNAL_ID_RE = re.compile(EXTERNAL_ID_PATTERN)
MAX_AUDIENCE_LENGTH = 1024
_AUDIENCE_RE = re.compile(r"[!-~]{1,1024}")  # printable ASCII, no space
DEFAULT_CA_KEY = "ca.crt"
_SECRET_KEY_RE = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def show(value: Any) -> str:
    """A value for a message: its repr, cut short (a hostile value may be megabytes)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 5] + "...'"


def parse_duration(text: str, field_path: str) -> timedelta:
    """``90m``, ``36h``, ``7d``, ``1d12h``, ``2w``: units in descending order, each at most once,
    at most :data:`MAX_DURATION` in all."""
    if not isinstance(text, str) or not text:
        raise PolicyError(
            field_path, f"{show(text)} is not a duration: use units s m h d w, e.g. 1d12h"
        )
    match = _DURATION_RE.fullmatch(text.strip()) if len(text) <= MAX_DURATION_LENGTH else None
    if match is None or not any(match.groups()):
        raise PolicyError(
            field_path,
            f"{show(text)} is not a duration: use whole numbers with units w d h m s "
            "in that order, e.g. 90m, 36h, 7d, 1d12h",
        )
    seconds = sum(
        int(value) * size
        for value, size in zip(match.groups(), _DURATION_SECONDS, strict=True)
        if value
    )
    if seconds > MAX_DURATION.total_seconds():
        raise PolicyError(
            field_path, f"{show(text)} is longer than {format_duration(MAX_DURATION)} (100 years)"
        )
    return timedelta(seconds=seconds)


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
class WorkloadIdentity:
    """Per-tenant AWS identity: a short-lived token of ``service_account`` (a ServiceAccount in
    the policy's own namespace, for ``audience``) exchanged with STS AssumeRoleWithWebIdentity
    for ``role_arn``; then, for another account, AssumeRole of ``assume_role_arn`` (with
    ``external_id`` when that role's trust policy asks for one)."""

    service_account: str
    role_arn: str
    audience: str = DEFAULT_AUDIENCE
    assume_role_arn: str | None = None
    external_id: str | None = None


@dataclass(frozen=True)
class CaBundleRef:
    """A Secret key in the policy's own namespace holding the PEM CA(s) the store's endpoint
    is verified with (instead of the system's trust store)."""

    name: str
    key: str = DEFAULT_CA_KEY


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
    workload_identity: WorkloadIdentity | None = None
    ca_bundle_ref: CaBundleRef | None = None


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@dataclass(frozen=True)
class MatchSpec:
    """Which keys a policy may touch. ``exclude_key_globs`` are fnmatch globs over the whole
    key: ``*`` matches any run of characters, ``/`` included (so ``**`` is the same as ``*``),
    ``?`` one character, ``[abc]``/``[a-z]``/``[!abc]`` one character of a set; ``[[]``,
    ``[]]``, ``[*]`` and ``[?]`` match a literal ``[``, ``]``, ``*`` and ``?``; a backslash is an
    ordinary character. A key is excluded when a glob matches it as written or when the NFC
    forms of both match (a decomposed ``e\u0301`` is protected by a glob written with ``é``).
    Prefixes compare exactly: they only ever narrow what a policy touches."""

    older_than: timedelta
    prefixes: tuple[str, ...] = ()
    exclude_key_globs: tuple[str, ...] = ()
    quiet_period: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        normalised = tuple(nfc(glob) for glob in self.exclude_key_globs)
        object.__setattr__(self, "_nfc_globs", normalised)

    def matches_key(self, key: str) -> bool:
        """Prefix and glob scope of a key (age is judged separately, on the store's clock)."""
        if self.prefixes and not any(key.startswith(prefix) for prefix in self.prefixes):
            return False
        return not self.excluded(key)

    def excluded(self, key: str) -> bool:
        if any(fnmatch.fnmatchcase(key, glob) for glob in self.exclude_key_globs):
            return True
        key_nfc = nfc(key)
        globs: tuple[str, ...] = getattr(self, "_nfc_globs")  # noqa: B009
        return any(fnmatch.fnmatchcase(key_nfc, glob) for glob in globs)


@dataclass(frozen=True)
class Limits:
    max_aborts_per_sweep: int = 10000
    requests_per_second: float = 100.0
    # The cap: a sweep starts at 16 (or lower) and adapts within it (pacing.ConcurrencyLimit).
    concurrency: int = DEFAULT_CONCURRENCY


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

    def store_expiry_note(self) -> str | None:
        """Why this policy may never act: its store aborts uploads of its olderThan by itself
        (MinIO, after 24 h by default). None when the store has no such expiry."""
        if self.store.s3 is None:
            return None
        profile = s3_profile(self.store.s3.profile)
        expiry = profile.self_expiry_seconds
        if expiry is None or self.match.older_than < timedelta(seconds=expiry):
            return None
        return (
            f"olderThan {format_duration(self.match.older_than)} is at or above the age at "
            f"which {profile.name} aborts incomplete uploads itself ({profile.self_expiry}): "
            "unless that expiry was raised, the store frees them first and this policy "
            "finds nothing to abort"
        )


# --------------------------------------------------------------------------------------------
# Parsing


def _text_problem(value: str) -> str | None:
    """Why a string can never be sent anywhere (a lone surrogate from YAML), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{show(value)} is not valid Unicode text (a lone surrogate)"
    return None


class _Fields:
    """Reads one mapping of the document, remembering its path for error messages."""

    def __init__(self, data: Any, path: str, known: Sequence[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise PolicyError(path, f"must be an object, not {type(data).__name__}")
        unknown = sorted((key for key in data if key not in known), key=repr)
        if unknown:
            name = unknown[0] if isinstance(unknown[0], str) else show(unknown[0])
            raise PolicyError(
                f"{path}.{name}", f"unknown field (known: {', '.join(sorted(known))})"
            )
        self.data = data
        self.path = path

    def at(self, name: str) -> str:
        return f"{self.path}.{name}"

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def string(
        self,
        name: str,
        default: str | None = None,
        *,
        required: bool = False,
        max_length: int = MAX_NAME_LENGTH,
    ) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise PolicyError(self.at(name), "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise PolicyError(self.at(name), f"must be a non-empty string, not {show(value)}")
        if len(value) > max_length:
            raise PolicyError(self.at(name), f"is longer than {max_length} characters")
        problem = _text_problem(value)
        if problem:
            raise PolicyError(self.at(name), problem)
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
                self.at(name), f"{show(value)} is not one of {', '.join(choices)} (case matters)"
            )
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise PolicyError(self.at(name), f"must be true or false, not {show(value)}")
        return value

    def number(self, name: str, default: float, *, low: float, high: float, integer: bool) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(self.at(name), f"must be a number, not {show(value)}")
        # Compare before any conversion: float(10**400) overflows, and NaN compares false.
        if not low <= value <= high:
            raise PolicyError(
                self.at(name), f"must be between {low:g} and {high:g}, not {show(value)}"
            )
        if integer and not float(value).is_integer():
            raise PolicyError(self.at(name), f"must be a whole number, not {show(value)}")
        return value

    def strings(
        self, name: str, *, max_length: int, max_bytes: int | None = None
    ) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise PolicyError(self.at(name), f"must be a list of strings, not {show(value)}")
        if len(value) > MAX_LIST_ITEMS:
            raise PolicyError(
                self.at(name), f"has {len(value)} entries, more than {MAX_LIST_ITEMS}"
            )
        for index, item in enumerate(value):
            where = f"{self.at(name)}[{index}]"
            if not isinstance(item, str) or not item:
                raise PolicyError(where, f"must be a non-empty string, not {show(item)}")
            if len(item) > max_length:
                raise PolicyError(where, f"is longer than {max_length} characters")
            problem = _text_problem(item)
            if problem:
                raise PolicyError(where, problem)
            if max_bytes is not None and len(item.encode("utf-8")) > max_bytes:
                raise PolicyError(where, f"is longer than {max_bytes} bytes in UTF-8")
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

    def region(self, name: str) -> str:
        region = self.string(name, "us-east-1")
        assert region is not None
        if not _REGION_RE.fullmatch(region) or region.isdigit():
            raise PolicyError(
                self.at(name),
                f"{show(region)} is not a region name (letters, digits and hyphens, "
                "at most 63, for example eu-west-1)",
            )
        return region


def _endpoint(fields: _Fields, name: str) -> str | None:
    """An http(s) URL the store client can use; never one carrying credentials."""
    endpoint = fields.string(name, max_length=MAX_ENDPOINT_LENGTH)
    if endpoint is None:
        return None
    where = fields.at(name)
    authority = endpoint.partition("//")[2].partition("/")[0]
    if "@" in authority:
        raise PolicyError(
            where,
            "must not carry a user name or password: credentials belong in the Secret named "
            "by spec.store.credentialsSecretRef",
        )
    if not _ENDPOINT_RE.fullmatch(endpoint):
        raise PolicyError(
            where,
            f"{show(endpoint)} must be an http:// or https:// URL: a host name (ASCII; "
            "punycode for others) or a [bracketed] IPv6 address, an optional port and path, "
            "no query",
        )
    if authority.startswith("["):
        host, _, rest = authority.partition("]")
        host, port = host + "]", rest.removeprefix(":")
    else:
        host, _, port = authority.partition(":")
    if len(host) > MAX_HOST_LENGTH:
        raise PolicyError(where, f"the host name is longer than {MAX_HOST_LENGTH} characters")
    if port and not 0 < int(port) <= 65535:
        raise PolicyError(where, f"port {port} is not between 1 and 65535")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise PolicyError(where, f"{show(host)} is not an IPv6 address") from None
    return endpoint


def endpoint_host(endpoint: str) -> str:
    """The lower-cased host of an endpoint that :func:`_endpoint` accepted."""
    authority = endpoint.partition("//")[2].partition("/")[0].lower()
    if authority.startswith("["):
        return authority[: authority.index("]") + 1]
    return authority.partition(":")[0]


def _profile_owning(host: str | None) -> S3Profile | None:
    """The profile whose vendor owns an endpoint's domain (Tencent COS: myqcloud.com), if any."""
    if host is None:
        return None
    for candidate in load_profiles().values():
        if any(host == d or host.endswith("." + d) for d in candidate.endpoint_domains):
            return candidate
    return None


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
    host = endpoint_host(endpoint) if endpoint is not None else None
    owner = _profile_owning(host)
    named = f.choice("profile", S3_PROFILES)
    if named is None:
        # Absent: the vendor that owns the endpoint's domain, else AWS or Generic.
        named = owner.name if owner else ("AWS" if endpoint is None else "Generic")
    elif owner is not None and owner.name != named:
        raise PolicyError(
            f.at("profile"),
            f"{host} is a {owner.name} endpoint: use profile {owner.name} "
            f"(profile {named} would address it the wrong way)",
        )
    profile = s3_profile(named)
    region = f.region("region")
    if endpoint is None and profile.requires_endpoint:
        raise PolicyError(
            f.at("endpoint"),
            f"is required with profile {named}: without it requests, signed with the store's "
            f"access key, go to AWS (for example {profile.endpoint_example or 'https://host:port'})",
        )
    buckets = f.strings("buckets", max_length=63)
    pattern = f.string("bucketPattern", max_length=MAX_BUCKET_PATTERN_LENGTH)
    if bool(buckets) == (pattern is not None):
        raise PolicyError(f.at("buckets"), "set exactly one of buckets or bucketPattern")
    for index, bucket in enumerate(buckets):
        if not _BUCKET_RE.fullmatch(bucket):
            raise PolicyError(
                f"{f.at('buckets')}[{index}]", f"{show(bucket)} is not a valid bucket name"
            )
        problem = profile.bucket_name_problem(bucket)
        if problem:
            raise PolicyError(f"{f.at('buckets')}[{index}]", problem)
    if host is not None and profile.endpoint_host is not None:
        _check_vendor_endpoint(f, profile, host, region, buckets)
    owner_id = f.string("expectedBucketOwner")
    if owner_id is not None:
        if not re.fullmatch(r"[0-9]{12}", owner_id):
            raise PolicyError(
                f.at("expectedBucketOwner"), f"{show(owner_id)} is not a 12-digit account id"
            )
        if profile.no_expected_bucket_owner:
            raise PolicyError(
                f.at("expectedBucketOwner"),
                f"does not protect on profile {named}: {profile.no_expected_bucket_owner}; "
                "remove it (only AWS S3 enforces it)",
            )
    payer = f.choice("requestPayer", REQUEST_PAYERS)
    if payer is not None and profile.no_request_payer:
        raise PolicyError(
            f.at("requestPayer"), f"is not honoured on profile {named}: {profile.no_request_payer}"
        )
    object_rule = f.choice("abortWhenKeyHasObject", OBJECT_AT_KEY_RULES)
    return S3Target(endpoint, region, named, buckets, pattern, owner_id, payer, object_rule)


def _check_vendor_endpoint(
    f: _Fields, profile: S3Profile, host: str, region: str, buckets: Sequence[str]
) -> None:
    """A vendor whose endpoint is a per-region service domain (Tencent COS): the endpoint must
    be that domain, not a bucket's own host (the client adds the bucket: it would be doubled),
    and the region must be the endpoint's (requests are signed with it)."""
    assert profile.endpoint_host is not None
    match = re.fullmatch(profile.endpoint_host, host)
    if match is None:
        bucket = next((b for b in buckets if host.startswith(b.lower() + ".")), None)
        why = (
            f"{host} is the bucket {bucket}'s own host; the client adds the bucket to the host, "
            "so it would be doubled"
            if bucket
            else f"{host} is not the region's service domain"
        )
        raise PolicyError(
            f.at("endpoint"),
            f"{why}: with profile {profile.name} use {profile.endpoint_example}",
        )
    endpoint_region = match.group("region")
    if endpoint_region != region:
        raise PolicyError(
            f.at("region"),
            f"{show(region)} is not the endpoint's region {endpoint_region!r}: profile "
            f"{profile.name} signs requests with the bucket's region, set region: "
            f"{endpoint_region}",
        )


def _parse_glacier(data: Any, path: str) -> GlacierTarget:
    f = _Fields(data, path, ("endpoint", "region", "accountId", "vaults"))
    vaults = f.strings("vaults", max_length=255)
    if not vaults:
        raise PolicyError(f.at("vaults"), "is required: list at least one vault")
    for index, vault in enumerate(vaults):
        if not _VAULT_RE.fullmatch(vault):
            raise PolicyError(
                f"{f.at('vaults')}[{index}]", f"{show(vault)} is not a valid vault name"
            )
    account = f.string("accountId", "-")
    assert account is not None
    if not _ACCOUNT_RE.fullmatch(account):
        raise PolicyError(
            f.at("accountId"), f"{show(account)} must be '-' or a 12-digit account id"
        )
    region = f.region("region")
    return GlacierTarget(_endpoint(f, "endpoint"), region, account, vaults)


def _parse_lilt(data: Any, path: str) -> LiltTarget:
    f = _Fields(data, path, ("endpoint", "inventoryPath"))
    inventory = f.string("inventoryPath", max_length=MAX_PATH_LENGTH)
    if inventory is None:
        raise PolicyError(
            f.at("inventoryPath"),
            "is required: LILT cannot list incomplete uploads, the sweep reads them from the "
            "inventory the uploader records",
        )
    if "\x00" in inventory:
        raise PolicyError(f.at("inventoryPath"), "must not contain a NUL character")
    return LiltTarget(_endpoint(f, "endpoint") or "https://api.lilt.com", inventory)


def _secret_name(f: _Fields, name: str = "name") -> str:
    value = f.string(name, required=True)
    assert value is not None
    if not _DNS_LABEL_RE.fullmatch(value):
        raise PolicyError(f.at(name), f"{show(value)} is not a valid object name")
    return value


def _role_arn(f: _Fields, name: str) -> str | None:
    arn = f.string(name, max_length=MAX_ROLE_ARN_LENGTH)
    if arn is not None and not _ROLE_ARN_RE.fullmatch(arn):
        raise PolicyError(
            f.at(name),
            f"{show(arn)} is not an IAM role ARN (arn:aws:iam::111122223333:role/name)",
        )
    return arn


def _parse_workload_identity(f: _Fields, store_type: StoreType) -> WorkloadIdentity | None:
    """spec.store.serviceAccountRef, roleArn and assumeRole (S3 and Glacier only)."""
    if not f.has("serviceAccountRef"):
        for only_with in ("roleArn", "assumeRole"):
            if f.has(only_with):
                raise PolicyError(
                    f.at(only_with),
                    "is used only with spec.store.serviceAccountRef (the ServiceAccount whose "
                    "token is exchanged for the role)",
                )
        return None
    where = f.at("serviceAccountRef")
    if store_type is StoreType.LILT:
        raise PolicyError(where, "is for the S3 and Glacier stores: LILT takes a Secret's key")
    if f.has("credentialsSecretRef"):
        raise PolicyError(
            where,
            "set either serviceAccountRef (workload identity) or credentialsSecretRef "
            "(a Secret's keys), not both",
        )
    ref = _Fields(f.data["serviceAccountRef"], where, ("name", "audience"))
    account = _secret_name(ref)
    audience = ref.string("audience", DEFAULT_AUDIENCE, max_length=MAX_AUDIENCE_LENGTH)
    assert audience is not None
    if not _AUDIENCE_RE.fullmatch(audience):
        raise PolicyError(
            ref.at("audience"), f"{show(audience)} must be printable ASCII, no spaces"
        )
    role_arn = _role_arn(f, "roleArn")
    if role_arn is None:
        raise PolicyError(
            f.at("roleArn"),
            "is required with serviceAccountRef: the IAM role the ServiceAccount's token is "
            "exchanged for (AssumeRoleWithWebIdentity)",
        )
    assume_arn = external_id = None
    if f.has("assumeRole"):
        chained = _Fields(f.data["assumeRole"], f.at("assumeRole"), ("roleArn", "externalId"))
        assume_arn = _role_arn(chained, "roleArn")
        if assume_arn is None:
            raise PolicyError(chained.at("roleArn"), "is required: the role to assume next")
        external_id = chained.string("externalId", max_length=1224)
        if external_id is not None and not _EXTERNAL_ID_RE.fullmatch(external_id):
            raise PolicyError(
                chained.at("externalId"),
                f"{show(external_id)} must be 2 to 1224 letters, digits or +=,.@:/-_",
            )
    return WorkloadIdentity(account, role_arn, audience, assume_arn, external_id)


def _parse_ca_bundle(f: _Fields, store_type: StoreType) -> CaBundleRef | None:
    if not f.has("caBundleSecretRef"):
        return None
    ref = _Fields(f.data["caBundleSecretRef"], f.at("caBundleSecretRef"), ("name", "key"))
    if store_type is StoreType.LILT:
        raise PolicyError(ref.path, "is for the S3 and Glacier stores")
    name = _secret_name(ref)
    key = ref.string("key", DEFAULT_CA_KEY)
    assert key is not None
    if not _SECRET_KEY_RE.fullmatch(key):
        raise PolicyError(ref.at("key"), f"{show(key)} is not a Secret key (letters, digits, -._)")
    return CaBundleRef(name, key)


def _parse_store(data: Any, path: str) -> StoreSpec:
    f = _Fields(
        data,
        path,
        (
            "type",
            "s3",
            "glacier",
            "lilt",
            "credentialsSecretRef",
            "serviceAccountRef",
            "roleArn",
            "assumeRole",
            "caBundleSecretRef",
        ),
    )
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
        if not _DNS_LABEL_RE.fullmatch(name):
            raise PolicyError(ref.at("name"), f"{show(name)} is not a valid Secret name")
        secret_ref = SecretRef(name)
    identity = _parse_workload_identity(f, store_type)
    ca_bundle = _parse_ca_bundle(f, store_type)
    common: dict[str, Any] = {
        "credentials_secret_ref": secret_ref,
        "workload_identity": identity,
        "ca_bundle_ref": ca_bundle,
    }
    if store_type is StoreType.S3:
        return StoreSpec(store_type, s3=_parse_s3(f.data["s3"], f.at("s3")), **common)
    if store_type is StoreType.GLACIER:
        return StoreSpec(
            store_type, glacier=_parse_glacier(f.data["glacier"], f.at("glacier")), **common
        )
    return StoreSpec(store_type, lilt=_parse_lilt(f.data["lilt"], f.at("lilt")), **common)


def _parse_match(data: Any, path: str) -> MatchSpec:
    if data is None:
        raise PolicyError(path, "is required (at least match.olderThan)")
    f = _Fields(data, path, ("olderThan", "prefixes", "excludeKeyGlobs", "quietPeriod"))
    older_than = f.duration("olderThan")
    if older_than <= timedelta(0):
        raise PolicyError(f.at("olderThan"), "must be longer than zero")
    prefixes = f.strings("prefixes", max_length=MAX_KEY_BYTES, max_bytes=MAX_KEY_BYTES)
    globs = f.strings("excludeKeyGlobs", max_length=MAX_GLOB_LENGTH)
    quiet = f.duration("quietPeriod", timedelta(hours=1))
    return MatchSpec(older_than, prefixes, globs, quiet)


def parse_policy(document: Mapping[str, Any]) -> Policy:
    """Parse a whole UploadLifecyclePolicy document (apiVersion, kind, metadata, spec)."""
    if not isinstance(document, Mapping):
        raise PolicyError("(document)", "must be a YAML mapping (an UploadLifecyclePolicy)")
    api_version = document.get("apiVersion")
    if api_version is not None and api_version != f"{API_GROUP}/{API_VERSION}":
        raise PolicyError("apiVersion", f"{show(api_version)} must be {API_GROUP}/{API_VERSION}")
    kind = document.get("kind")
    if kind is not None and kind != KIND:
        raise PolicyError("kind", f"{show(kind)} must be {KIND}")
    metadata = document.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise PolicyError("metadata", "must be an object")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError("metadata.name", "is required")
    if not _DNS_LABEL_RE.fullmatch(name):
        raise PolicyError("metadata.name", f"{show(name)} is not a valid object name")
    namespace = metadata.get("namespace") or "default"
    if not isinstance(namespace, str) or not _DNS_LABEL_RE.fullmatch(namespace):
        raise PolicyError("metadata.namespace", f"{show(namespace)} is not a valid namespace")
    generation = metadata.get("generation")
    return parse_spec(
        document.get("spec"),
        name=name,
        namespace=namespace,
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
        concurrency=int(
            lim.number(
                "concurrency", DEFAULT_CONCURRENCY, low=1, high=MAX_CONCURRENCY, integer=True
            )
        ),
    )
    suspend = f.boolean("suspend", False)
    return Policy(name, namespace, store, match, interval, mode, limits, suspend, generation)
