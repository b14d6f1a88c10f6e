"""The policy model: durations, defaults, and a clear error naming the field for bad input."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from mpu_janitor.policy import Mode, PolicyError, StoreType, parse_duration, parse_policy

BASE: dict[str, Any] = {
    "apiVersion": "mpu-janitor.dev/v1alpha1",
    "kind": "UploadLifecyclePolicy",
    "metadata": {"name": "stale", "namespace": "media"},
    "spec": {
        "store": {
            "type": "S3",
            "s3": {"endpoint": "http://127.0.0.1:9000", "profile": "MinIO", "buckets": ["uploads"]},
        },
        "match": {"olderThan": "7d"},
    },
}


def with_spec(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    node = doc["spec"]
    *parents, leaf = path.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


DELETE = object()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", timedelta(minutes=90)),
        ("36h", timedelta(hours=36)),
        ("7d", timedelta(days=7)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("2w", timedelta(weeks=2)),
        ("1w2d3h4m5s", timedelta(weeks=1, days=2, hours=3, minutes=4, seconds=5)),
        ("0s", timedelta(0)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text, "x") == expected


@pytest.mark.parametrize("text", ["7", "7 days", "1h1d", "d", "", "1.5h", "-1h", "1y", "1h 30m"])
def test_bad_durations_name_the_field(text: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_duration(text, "spec.match.olderThan")
    assert info.value.field == "spec.match.olderThan"
    assert "duration" in str(info.value)


def test_defaults() -> None:
    policy = parse_policy(BASE)
    assert policy.name == "stale" and policy.namespace == "media"
    assert policy.store.type is StoreType.S3
    assert policy.store.s3 is not None and policy.store.s3.region == "us-east-1"
    assert policy.match.older_than == timedelta(days=7)
    assert policy.match.quiet_period == timedelta(hours=1)
    assert policy.interval == timedelta(hours=1)
    assert policy.mode is Mode.ABORT and not policy.dry_run
    assert policy.limits.max_aborts_per_sweep == 10000
    assert policy.limits.requests_per_second == 100
    assert policy.limits.concurrency == 64
    assert policy.suspend is False


def test_profile_defaults_to_aws_without_endpoint_and_generic_with_one() -> None:
    doc = with_spec("store.s3", {"buckets": ["b-1"]})
    policy = parse_policy(doc)
    assert policy.store.s3 is not None and policy.store.s3.profile == "AWS"
    doc = with_spec("store.s3", {"buckets": ["b-1"], "endpoint": "https://s3.example:443"})
    policy = parse_policy(doc)
    assert policy.store.s3 is not None and policy.store.s3.profile == "Generic"


def test_key_matching_prefixes_and_globs() -> None:
    doc = with_spec(
        "match",
        {
            "olderThan": "1d",
            "prefixes": ["tmp/", "ingest/"],
            "excludeKeyGlobs": ["*.keep", "tmp/pinned/*"],
        },
    )
    match = parse_policy(doc).match
    assert match.matches_key("tmp/a.bin")
    assert match.matches_key("ingest/x/y")
    assert not match.matches_key("other/a.bin")
    assert not match.matches_key("tmp/a.keep")
    assert not match.matches_key("tmp/pinned/a.bin")
    # Globs are globs, not regexes: a dot is a dot.
    doc = with_spec("match", {"olderThan": "1d", "excludeKeyGlobs": ["a.b"]})
    assert parse_policy(doc).match.matches_key("axb")


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        ("store.type", "Azure", "spec.store.type", "not one of"),
        ("store.type", DELETE, "spec.store.type", "required"),
        ("store.s3.profile", "minio", "spec.store.s3.profile", "not one of"),
        ("store.s3.buckets", ["Bad_Bucket"], "spec.store.s3.buckets[0]", "bucket name"),
        ("store.s3.buckets", DELETE, "spec.store.s3.buckets", "exactly one"),
        ("store.s3.bucketPattern", "up*", "spec.store.s3.buckets", "exactly one"),
        ("store.s3.endpoint", "minio:9000", "spec.store.s3.endpoint", "http"),
        ("store.s3.expectedBucketOwner", "12", "spec.store.s3.expectedBucketOwner", "12-digit"),
        ("store.s3.requestPayer", "requester", "spec.store.s3.requestPayer", "not one of"),
        ("store.s3.bucket", ["x"], "spec.store.s3.bucket", "unknown field"),
        ("store.glacier", {"vaults": ["v"]}, "spec.store.glacier", "does not belong"),
        (
            "store.credentialsSecretRef",
            {"name": "Bad Name"},
            "spec.store.credentialsSecretRef.name",
            "Secret name",
        ),
        ("match.olderThan", DELETE, "spec.match.olderThan", "required"),
        ("match.olderThan", "7 days", "spec.match.olderThan", "duration"),
        ("match.olderThan", "0s", "spec.match.olderThan", "longer than zero"),
        ("match.quietPeriod", "soon", "spec.match.quietPeriod", "duration"),
        ("match.prefixes", "tmp/", "spec.match.prefixes", "list"),
        ("match.excludeKeyGlobs", ["", "x"], "spec.match.excludeKeyGlobs[0]", "non-empty"),
        ("mode", "abort", "spec.mode", "not one of"),
        ("schedule.interval", "1s", "spec.schedule.interval", "at least"),
        ("limits.concurrency", 0, "spec.limits.concurrency", "between"),
        ("limits.concurrency", 2.5, "spec.limits.concurrency", "whole number"),
        ("limits.requestsPerSecond", -1, "spec.limits.requestsPerSecond", "between"),
        ("limits.maxAbortsPerSweep", "many", "spec.limits.maxAbortsPerSweep", "number"),
        ("suspend", "yes", "spec.suspend", "true or false"),
    ],
)
def test_invalid_fields_are_named(path: str, value: Any, field: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(with_spec(path, value))
    assert info.value.field == field
    assert words in str(info.value)
    assert str(info.value).startswith(field + ":")


def test_tencent_cos_bucket_needs_appid_suffix() -> None:
    doc = with_spec(
        "store.s3",
        {
            "endpoint": "https://cos.ap-guangzhou.myqcloud.com",
            "region": "ap-guangzhou",
            "profile": "TencentCOS",
            "buckets": ["uploads"],
        },
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert info.value.field == "spec.store.s3.buckets[0]"
    assert "APPID" in str(info.value)
    doc["spec"]["store"]["s3"]["buckets"] = ["uploads-1250000000"]
    assert parse_policy(doc).store.s3 is not None


def test_document_level_errors() -> None:
    with pytest.raises(PolicyError, match="apiVersion"):
        parse_policy({**BASE, "apiVersion": "v1"})
    with pytest.raises(PolicyError, match="kind"):
        parse_policy({**BASE, "kind": "Secret"})
    with pytest.raises(PolicyError, match=r"metadata\.name"):
        parse_policy({**BASE, "metadata": {}})
    with pytest.raises(PolicyError, match=r"^spec: is required"):
        parse_policy({k: v for k, v in BASE.items() if k != "spec"})


def test_glacier_and_lilt() -> None:
    doc = with_spec("store", {"type": "Glacier", "glacier": {"vaults": ["photos"]}})
    policy = parse_policy(doc)
    assert policy.store.glacier is not None
    assert policy.store.glacier.account_id == "-"
    doc = with_spec("store", {"type": "Glacier", "glacier": {"vaults": []}})
    with pytest.raises(PolicyError, match=r"spec\.store\.glacier\.vaults"):
        parse_policy(doc)
    doc = with_spec("store", {"type": "LILT", "lilt": {"inventoryPath": "/var/lib/x.jsonl"}})
    policy = parse_policy(doc)
    assert policy.store.lilt is not None and policy.store.lilt.endpoint == "https://api.lilt.com"


def test_abort_when_key_has_object_is_a_choice_with_a_profile_default() -> None:
    from mpu_janitor.stores.profiles import profile

    def target(**s3: Any) -> Any:
        body = {"endpoint": "https://s3.example", "profile": "Scality", "buckets": ["media"], **s3}
        spec = {"store": {"type": "S3", "s3": body}, "match": {"olderThan": "1d"}}
        return parse_policy({"metadata": {"name": "p", "namespace": "n"}, "spec": spec})

    assert target().store.s3.abort_when_key_has_object is None
    assert profile("Scality").default_object_rule == "Never"
    assert profile("MinIO").default_object_rule == "Always"
    chosen = target(abortWhenKeyHasObject="IfObjectOlder").store.s3
    assert chosen.abort_when_key_has_object == "IfObjectOlder"
    with pytest.raises(PolicyError, match=r"spec\.store\.s3\.abortWhenKeyHasObject"):
        target(abortWhenKeyHasObject="Sometimes")


# --------------------------------------------------------------------------------------------
# Exclusion globs: the user's only protection


def excluding(*globs: str) -> Any:
    return parse_policy(with_spec("match", {"olderThan": "1d", "excludeKeyGlobs": list(globs)}))


@pytest.mark.parametrize(
    ("glob", "protected", "not_protected"),
    [
        # A literal [ ] * ? goes in brackets (fnmatch's own escape); the CRD documents it.
        ("backup[[]*[]]*", ["backup[1]/x", "backup[]"], ["backup1/x", "backup(1)/x"]),
        ("*[*]", ["a*", "dir/*"], ["a", "a?"]),
        ("*[?]", ["why?"], ["why", "why!"]),
        ("logs/[[]2024[]].gz", ["logs/[2024].gz"], ["logs/2.gz", "logs/[2025].gz"]),
        ("a]b", ["a]b"], ["ab"]),
        ("[!a]*", ["b", "[x"], ["a", "abc"]),
        # A backslash is an ordinary character, not an escape.
        ("dir\\*", ["dir\\x", "dir\\"], ["dir*", "dirx"]),
        # * crosses /: ** is the same as * (documented).
        ("tmp/**/keep", ["tmp/a/b/keep", "tmp//keep"], ["tmp/keep", "tmp/a/keep2"]),
        ("tmp/*/keep", ["tmp/a/b/keep"], ["tmp/keep"]),
    ],
)
def test_globs_match_literal_brackets_stars_and_questions(
    glob: str, protected: list[str], not_protected: list[str]
) -> None:
    match = excluding(glob).match
    for key in protected:
        assert not match.matches_key(key), (glob, key)
    for key in not_protected:
        assert match.matches_key(key), (glob, key)


def test_globs_protect_both_unicode_forms() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    for glob in (f"{composed}/*", f"{decomposed}/*", "caf?/*"):
        match = excluding(glob).match
        for key in (f"{composed}/x", f"{decomposed}/x"):
            if glob == "caf?/*" and key.startswith(decomposed):
                continue  # ? is one character: "e\u0301" is two, until normalised
            assert not match.matches_key(key), (glob, key)
    # A glob written decomposed protects composed keys and vice versa; unrelated keys are not.
    assert excluding(f"{decomposed}*").match.matches_key("cafe/x")
    # ? matches the composed form of a decomposed key too (its NFC is one character).
    assert not excluding("caf?/x").match.matches_key(f"{decomposed}/x")


def test_prefixes_compare_exactly() -> None:
    """Prefixes only narrow what a policy touches, so they are not normalised: a decomposed
    key is outside a composed prefix (it is left alone, never wrongly aborted)."""
    doc = with_spec("match", {"olderThan": "1d", "prefixes": ["caf\u00e9/"]})
    match = parse_policy(doc).match
    assert match.matches_key("caf\u00e9/x")
    assert not match.matches_key("cafe\u0301/x")


# --------------------------------------------------------------------------------------------
# Vendor rules from profile data


def s3_spec(**fields: Any) -> dict[str, Any]:
    return with_spec("store.s3", fields)


COS = {"endpoint": "https://cos.ap-guangzhou.myqcloud.com", "buckets": ["uploads-1250000000"]}


@pytest.mark.parametrize("profile", ["MinIO", "Ceph", "Scality", "TencentCOS", "Generic"])
def test_every_non_aws_profile_requires_an_endpoint(profile: str) -> None:
    bucket = "uploads-1250000000"
    with pytest.raises(PolicyError) as caught:
        parse_policy(s3_spec(profile=profile, buckets=[bucket], region="ap-guangzhou"))
    assert caught.value.field == "spec.store.s3.endpoint"
    assert "go to AWS" in caught.value.message
    aws = parse_policy(s3_spec(profile="AWS", buckets=[bucket])).store.s3
    assert aws is not None and aws.endpoint is None


def test_cos_endpoint_without_profile_picks_tencent_cos() -> None:
    for endpoint in (COS["endpoint"], "https://cos.ap-guangzhou.tencentcos.cn"):
        target = parse_policy(s3_spec(**COS | {"endpoint": endpoint}, region="ap-guangzhou"))
        assert target.store.s3 is not None and target.store.s3.profile == "TencentCOS"


@pytest.mark.parametrize("profile", ["Generic", "MinIO", "AWS"])
def test_cos_endpoint_with_another_profile_is_refused_with_a_hint(profile: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(s3_spec(**COS, profile=profile, region="ap-guangzhou"))
    assert caught.value.field == "spec.store.s3.profile"
    assert "use profile TencentCOS" in caught.value.message


def test_cos_needs_the_region_of_its_service_domain() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(s3_spec(**COS, profile="TencentCOS"))  # region defaults to us-east-1
    assert caught.value.field == "spec.store.s3.region"
    assert "set region: ap-guangzhou" in caught.value.message
    with pytest.raises(PolicyError, match=r"^spec\.store\.s3\.region: .*ap-guangzhou"):
        parse_policy(s3_spec(**COS, profile="TencentCOS", region="ap-beijing"))
    target = parse_policy(s3_spec(**COS, profile="TencentCOS", region="ap-guangzhou")).store.s3
    assert target is not None and target.region == "ap-guangzhou"


@pytest.mark.parametrize(
    ("endpoint", "words"),
    [
        ("https://uploads-1250000000.cos.ap-guangzhou.myqcloud.com", "would be doubled"),
        ("https://UPLOADS-1250000000.cos.ap-guangzhou.myqcloud.com", "would be doubled"),
        ("https://service.cos.myqcloud.com", "not the region's service domain"),
        ("https://cos-website.ap-guangzhou.myqcloud.com", "not the region's service domain"),
    ],
)
def test_cos_endpoint_must_be_the_regions_service_domain(endpoint: str, words: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(s3_spec(**COS | {"endpoint": endpoint}, region="ap-guangzhou"))
    assert caught.value.field == "spec.store.s3.endpoint"
    assert words in caught.value.message
    assert "https://cos.<region>.myqcloud.com" in caught.value.message


@pytest.mark.parametrize(
    ("profile", "field", "value", "why"),
    [
        ("Scality", "expectedBucketOwner", "111122223333", "multipart upload calls do not check"),
        ("TencentCOS", "expectedBucketOwner", "111122223333", "does not document"),
        ("MinIO", "expectedBucketOwner", "111122223333", "MinIO"),
        ("Ceph", "expectedBucketOwner", "111122223333", "RGW"),
        ("Generic", "expectedBucketOwner", "111122223333", "unknown store"),
        ("Scality", "requestPayer", "Requester", "multipart upload calls do not check"),
        ("TencentCOS", "requestPayer", "Requester", "does not document"),
        ("MinIO", "requestPayer", "Requester", "Requester Pays"),
        ("Generic", "requestPayer", "Requester", "unknown store"),
    ],
)
def test_protections_a_store_does_not_honour_are_refused_saying_why(
    profile: str, field: str, value: str, why: str
) -> None:
    fields: dict[str, Any] = {"endpoint": "https://store.example", "buckets": ["uploads"]}
    if profile == "TencentCOS":
        fields = {**COS, "region": "ap-guangzhou"}
    with pytest.raises(PolicyError) as caught:
        parse_policy(s3_spec(**fields, profile=profile, **{field: value}))
    assert caught.value.field == f"spec.store.s3.{field}"
    assert why in caught.value.message


def test_aws_honours_both_and_ceph_honours_request_payer() -> None:
    aws = parse_policy(
        s3_spec(buckets=["uploads"], expectedBucketOwner="111122223333", requestPayer="Requester")
    ).store.s3
    assert aws is not None and aws.expected_bucket_owner == "111122223333"
    ceph = parse_policy(
        s3_spec(
            endpoint="https://rgw.example",
            profile="Ceph",
            buckets=["b-1"],
            requestPayer="Requester",
        )
    ).store.s3
    assert ceph is not None and ceph.request_payer == "Requester"


def test_profile_rules_are_data() -> None:
    """The model reads flags, never profile names: a profile's rules come from profiles.yaml."""
    from mpu_janitor.stores.profiles import load_profiles

    profiles = load_profiles()
    assert [n for n, p in profiles.items() if not p.requires_endpoint] == ["AWS"]
    assert [n for n, p in profiles.items() if not p.no_expected_bucket_owner] == ["AWS"]
    assert sorted(n for n, p in profiles.items() if not p.no_request_payer) == ["AWS", "Ceph"]
    assert [n for n, p in profiles.items() if p.endpoint_domains] == ["TencentCOS"]
    import inspect

    from mpu_janitor import policy

    source = inspect.getsource(policy)
    for name in ("MinIO", "Ceph", "Scality", "TencentCOS"):
        assert source.count(f'"{name}"') <= 1, name  # only in the S3_PROFILES tuple


def test_a_minio_policy_older_than_minios_own_expiry_is_told_so() -> None:
    def minio(older_than: str) -> Any:
        s3 = {"endpoint": "http://minio:9000", "profile": "MinIO", "buckets": ["media"]}
        spec = {"store": {"type": "S3", "s3": s3}, "match": {"olderThan": older_than}}
        return parse_policy({"metadata": {"name": "p", "namespace": "n"}, "spec": spec})

    note = minio("7d").store_expiry_note()
    assert note is not None and "olderThan 1w" in note and "MinIO" in note
    assert minio("1d").store_expiry_note() is not None  # at the expiry: MinIO is first
    assert minio("23h").store_expiry_note() is None
