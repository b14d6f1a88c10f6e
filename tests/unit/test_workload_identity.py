"""Workload identity (spec.store.serviceAccountRef, roleArn, assumeRole): validation that names
the field, and the exchange and renewal against a real STS (moto's server over HTTP) with the
store's requests recorded on the wire, so the keys that signed them can be compared with the
ones STS issued. The TokenRequest against the real API server is in tests/e2e."""

from __future__ import annotations

import asyncio
import copy
import http.server
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest

from mpu_janitor.credentials import (
    SESSION_SECONDS,
    CredentialsNotFound,
    WebIdentityExchange,
    WorkloadIdentityFailed,
    load_credentials,
    renewing_credentials,
    session_name,
)
from mpu_janitor.kube import Forbidden, NotFound
from mpu_janitor.policy import (
    DEFAULT_AUDIENCE,
    Policy,
    PolicyError,
    WorkloadIdentity,
    parse_policy,
)
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreCredentials, StoreError
from mpu_janitor.tenancy import KnownSecrets, known_secrets, scrub
from tests.support.recording_proxy import MotoServer, RecordingProxy

ROLE = "arn:aws:iam::111122223333:role/uploads-janitor"
OTHER_ACCOUNT_ROLE = "arn:aws:iam::444455556666:role/uploads"
BUCKET = "identity-bucket"


def document(**store: Any) -> dict[str, Any]:
    spec_store: dict[str, Any] = {
        "type": "S3",
        "s3": {"endpoint": "http://127.0.0.1:9", "profile": "Generic", "buckets": [BUCKET]},
        "serviceAccountRef": {"name": "janitor"},
        "roleArn": ROLE,
    }
    spec_store.update(store)
    for name, value in list(spec_store.items()):
        if value is None:
            del spec_store[name]
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": "uploads", "namespace": "team-a"},
        "spec": {"store": spec_store, "match": {"olderThan": "1d", "quietPeriod": "0s"}},
    }


# -- validation ---------------------------------------------------------------------------------


def test_a_valid_identity_and_its_defaults() -> None:
    policy = parse_policy(document())
    identity = policy.store.workload_identity
    assert identity == WorkloadIdentity("janitor", ROLE, DEFAULT_AUDIENCE)
    assert identity.audience == "sts.amazonaws.com"
    chained = parse_policy(
        document(
            assumeRole={"roleArn": OTHER_ACCOUNT_ROLE, "externalId": "tenant-a:7f3"},
            serviceAccountRef={"name": "janitor", "audience": "https://sts.internal"},
        )
    ).store.workload_identity
    assert chained is not None
    assert (chained.assume_role_arn, chained.external_id, chained.audience) == (
        OTHER_ACCOUNT_ROLE,
        "tenant-a:7f3",
        "https://sts.internal",
    )
    glacier = document(type="Glacier", s3=None, glacier={"vaults": ["v1"]})
    assert parse_policy(glacier).store.workload_identity is not None


@pytest.mark.parametrize(
    ("store", "field", "words"),
    [
        ({"roleArn": "arn:aws:s3:::bucket"}, "spec.store.roleArn", "not an IAM role ARN"),
        ({"roleArn": "uploads-janitor"}, "spec.store.roleArn", "not an IAM role ARN"),
        ({"roleArn": None}, "spec.store.roleArn", "is required with serviceAccountRef"),
        (
            {"credentialsSecretRef": {"name": "creds"}},
            "spec.store.serviceAccountRef",
            "not both",
        ),
        (
            {"serviceAccountRef": None, "credentialsSecretRef": {"name": "creds"}},
            "spec.store.roleArn",
            "only with spec.store.serviceAccountRef",
        ),
        (
            {"serviceAccountRef": None, "roleArn": None, "assumeRole": {"roleArn": ROLE}},
            "spec.store.assumeRole",
            "only with spec.store.serviceAccountRef",
        ),
        ({"serviceAccountRef": {"name": "Janitor"}}, "spec.store.serviceAccountRef.name", ""),
        ({"serviceAccountRef": {}}, "spec.store.serviceAccountRef.name", "is required"),
        (
            {"serviceAccountRef": {"name": "j", "audience": "two words"}},
            "spec.store.serviceAccountRef.audience",
            "no spaces",
        ),
        ({"assumeRole": {}}, "spec.store.assumeRole.roleArn", "is required"),
        (
            {"assumeRole": {"roleArn": "arn:aws:iam::1:role/x"}},
            "spec.store.assumeRole.roleArn",
            "not an IAM role ARN",
        ),
        (
            {"assumeRole": {"roleArn": ROLE, "externalId": "x"}},
            "spec.store.assumeRole.externalId",
            "2 to 1224",
        ),
        (
            {"assumeRole": {"roleArn": ROLE, "sessionName": "x"}},
            "spec.store.assumeRole.sessionName",
            "unknown field",
        ),
        (
            {
                "type": "LILT",
                "s3": None,
                "lilt": {"inventoryPath": "/srv/lilt/team-a/inv"},
            },
            "spec.store.serviceAccountRef",
            "S3 and Glacier",
        ),
    ],
)
def test_a_bad_identity_is_refused_naming_the_field(
    store: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(document(**store))
    assert caught.value.field == field
    assert words in caught.value.message


def test_the_session_name_names_the_policy_within_sts_limits() -> None:
    policy = parse_policy(document())
    assert session_name(policy) == "mpu-janitor@team-a.uploads"
    long = copy.deepcopy(document())
    long["metadata"]["name"] = "n" * 200
    assert len(session_name(parse_policy(long))) == 64


# -- the exchange against a real STS ------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws(moto: MotoServer) -> Iterator[RecordingProxy]:
    """moto behind a recording proxy; the test's bucket holds one incomplete upload."""
    with RecordingProxy(moto.url) as proxy:
        admin = boto3.client(
            "s3",
            endpoint_url=moto.url,
            region_name="us-east-1",
            aws_access_key_id="admin",
            aws_secret_access_key="admin",
        )
        if BUCKET not in [b["Name"] for b in admin.list_buckets()["Buckets"]]:
            admin.create_bucket(Bucket=BUCKET)
        admin.create_multipart_upload(Bucket=BUCKET, Key="stale/object.bin")
        yield proxy


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


class Tokens:
    """Stands in for the TokenRequest (the e2e tests use the API server's): a distinct
    JWT-shaped token per call, or a failure."""

    def __init__(self) -> None:
        self.issued: list[str] = []
        self.failure: Exception | None = None

    def __call__(self) -> str:
        if self.failure is not None:
            raise self.failure
        token = f"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.signature-{len(self.issued):04d}"
        self.issued.append(token)
        return token


def exchange_for(
    policy: Policy, proxy: RecordingProxy, tokens: Tokens
) -> tuple[WebIdentityExchange, Policy]:
    s3 = policy.store.s3
    assert s3 is not None and policy.store.workload_identity is not None
    exchange = WebIdentityExchange(
        policy.store.workload_identity,
        token=tokens,
        region=s3.region,
        sts_endpoint=proxy.url,
        session_name=session_name(policy),
    )
    return exchange, policy


def s3_policy(proxy: RecordingProxy, **store: Any) -> Policy:
    doc = document(**store)
    doc["spec"]["store"]["s3"]["endpoint"] = proxy.url
    return parse_policy(doc)


def listed_keys(store: Any) -> list[str]:
    return [u.key for page in store.list_uploads(BUCKET, ()) for u in page.uploads]


def test_the_token_goes_to_sts_and_sts_credentials_sign_the_store_requests(
    aws: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator's own identity is in its environment: it must never sign anything.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATORAMBIENT1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-ambient-secret")
    tokens = Tokens()
    exchange, policy = exchange_for(s3_policy(aws), aws, tokens)
    credentials = renewing_credentials(exchange)
    store = open_store(policy.store, StoreCredentials(provider=credentials))
    try:
        assert "stale/object.bin" in listed_keys(store)
    finally:
        store.close()

    [call] = aws.sts_calls()
    assert call.form["Action"] == "AssumeRoleWithWebIdentity"
    assert call.form["WebIdentityToken"] == tokens.issued[0]
    assert call.form["RoleArn"] == ROLE
    assert call.form["RoleSessionName"] == "mpu-janitor@team-a.uploads"
    assert call.form["DurationSeconds"] == str(SESSION_SECONDS)
    assert call.signing_key is None  # unsigned: nothing of the operator's identity
    issued = credentials.get_frozen_credentials().access_key
    keys = {r.signing_key for r in aws.store_requests()}
    assert keys == {issued}, keys
    assert all("AKIAOPERATORAMBIENT1" not in str(r.headers) for r in aws.requests)
    # The token and the issued secrets are scrubbed wherever they would be logged.
    frozen = credentials.get_frozen_credentials()
    for value in (tokens.issued[0], frozen.secret_key, frozen.token):
        assert scrub(f"leak {value} here") == "leak [REDACTED] here"


def test_a_cross_account_role_is_assumed_with_the_first_roles_credentials(
    aws: RecordingProxy,
) -> None:
    tokens = Tokens()
    policy = s3_policy(aws, assumeRole={"roleArn": OTHER_ACCOUNT_ROLE, "externalId": "ext-7f3"})
    exchange, _ = exchange_for(policy, aws, tokens)
    credentials = renewing_credentials(exchange)
    store = open_store(policy.store, StoreCredentials(provider=credentials))
    try:
        listed_keys(store)
    finally:
        store.close()
    web, chained = aws.sts_calls()
    assert web.form["Action"] == "AssumeRoleWithWebIdentity" and web.signing_key is None
    assert chained.form["Action"] == "AssumeRole"
    assert (chained.form["RoleArn"], chained.form["ExternalId"]) == (OTHER_ACCOUNT_ROLE, "ext-7f3")
    # AssumeRole was signed with the web identity's key; the store with the chained role's.
    first_key = chained.signing_key
    assert first_key is not None and first_key.startswith("ASIA")
    final_key = credentials.get_frozen_credentials().access_key
    assert final_key != first_key
    assert {r.signing_key for r in aws.store_requests()} == {final_key}


def test_credentials_are_renewed_before_they_expire_mid_sweep(aws: RecordingProxy) -> None:
    tokens, clock = Tokens(), Clock()
    exchange, policy = exchange_for(s3_policy(aws), aws, tokens)
    credentials = renewing_credentials(exchange, clock)
    store = open_store(policy.store, StoreCredentials(provider=credentials))
    keys = []
    try:
        # Each listing is one request; the clock is moved for it, then back (STS's expiry
        # times are real times).
        for offset in (0, SESSION_SECONDS - 14 * 60, SESSION_SECONDS - 5 * 60):
            clock.offset = timedelta(seconds=offset)  # 60, 14 (advisory), 5 (mandatory) min
            listed_keys(store)
            clock.offset = timedelta(0)
            keys.append(credentials.get_frozen_credentials().access_key)
    finally:
        store.close()
    assert len(set(keys)) == 3
    assert len(tokens.issued) == 3  # a fresh ServiceAccount token for every exchange
    web_calls = aws.sts_calls("AssumeRoleWithWebIdentity")
    assert [c.form["WebIdentityToken"] for c in web_calls] == tokens.issued
    assert [r.signing_key for r in aws.store_requests()] == keys
    assert exchange.exchanges == 3


def test_a_failed_renewal_fails_the_store_call_naming_the_field(aws: RecordingProxy) -> None:
    tokens, clock = Tokens(), Clock()
    exchange, policy = exchange_for(s3_policy(aws), aws, tokens)
    credentials = renewing_credentials(exchange, clock)
    store = open_store(policy.store, StoreCredentials(provider=credentials))
    try:
        listed_keys(store)
        tokens.failure = WorkloadIdentityFailed(
            "ServiceAccount team-a/janitor not found (spec.store.serviceAccountRef)"
        )
        clock.offset = timedelta(seconds=SESSION_SECONDS - 60)  # 1 minute left: must renew
        before = len(aws.store_requests())
        with pytest.raises(StoreError) as caught:
            listed_keys(store)
    finally:
        store.close()
    assert "spec.store.serviceAccountRef" in str(caught.value)
    assert len(aws.store_requests()) == before  # nothing sent with credentials about to end


def test_sts_unreachable_names_the_role_field() -> None:
    tokens = Tokens()
    policy = parse_policy(document())
    assert policy.store.workload_identity is not None
    exchange = WebIdentityExchange(
        policy.store.workload_identity,
        token=tokens,
        region="us-east-1",
        sts_endpoint="http://127.0.0.1:9",  # discard port: nothing listens
        session_name=session_name(policy),
    )
    with pytest.raises(WorkloadIdentityFailed) as caught:
        exchange.fetch()
    assert "(spec.store.roleArn)" in str(caught.value)
    assert caught.value.reason == "CredentialsUnreadable"  # tried again soon


class RefusingSts(http.server.BaseHTTPRequestHandler):
    """An STS that refuses every exchange, as AWS does when the role's trust policy does not
    accept the token (the wire format of AWS's query-protocol errors)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = (
            b"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>"
            b"<Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message>"
            b"</Error><RequestId>1</RequestId></ErrorResponse>"
        )
        self.send_response(403)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def test_sts_refusing_the_token_is_access_denied_naming_the_role() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingSts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        policy = parse_policy(document())
        assert policy.store.workload_identity is not None
        exchange = WebIdentityExchange(
            policy.store.workload_identity,
            token=Tokens(),
            region="us-east-1",
            sts_endpoint=f"http://127.0.0.1:{server.server_address[1]}",
            session_name=session_name(policy),
        )
        with pytest.raises(WorkloadIdentityFailed) as caught:
            exchange.fetch()
    finally:
        server.shutdown()
        server.server_close()
    assert caught.value.reason == "AccessDenied"
    assert "refused AssumeRoleWithWebIdentity (spec.store.roleArn): AccessDenied" in str(
        caught.value
    )


# -- load_credentials: any namespace, the policy's own ServiceAccount -----------------------------


class TokenKube:
    """The KubeClient calls load_credentials makes; records the TokenRequests."""

    def __init__(self, answer: Exception | None = None) -> None:
        self.requests: list[tuple[str, str, str, int]] = []
        self.answer = answer

    async def create_service_account_token(
        self, namespace: str, name: str, *, audience: str, seconds: int = 600
    ) -> str:
        self.requests.append((namespace, name, audience, seconds))
        if self.answer is not None:
            raise self.answer
        return f"eyJhbGciOiJSUzI1NiJ9.eyJ9.kube-{len(self.requests)}"

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any]:
        raise NotFound(404, "no Secret in this test")


async def test_a_workload_identity_needs_no_ambient_namespace(aws: RecordingProxy) -> None:
    kube = TokenKube()
    policy = s3_policy(aws, serviceAccountRef={"name": "janitor", "audience": "sts.test"})
    credentials = await load_credentials(
        kube,  # type: ignore[arg-type]
        policy,
        ambient=False,
        sts_endpoint=aws.url,
    )
    assert credentials is not None and credentials.provider is not None
    assert credentials.access_key_id is None  # never a Secret's, never the default chain
    assert kube.requests == [("team-a", "janitor", "sts.test", 600)]
    [call] = aws.sts_calls()
    assert call.form["WebIdentityToken"] == "eyJhbGciOiJSUzI1NiJ9.eyJ9.kube-1"
    # A renewal from a sweep thread asks the event loop for a new token.
    renewed = await asyncio.get_running_loop().run_in_executor(
        None, lambda: credentials.provider._refresh_using()
    )
    assert renewed["access_key"] != credentials.provider.get_frozen_credentials().access_key
    assert len(kube.requests) == 2


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (NotFound(404, "not found"), "ServiceAccount team-a/janitor not found"),
        (Forbidden(403, "forbidden"), "create on serviceaccounts/token"),
    ],
)
async def test_token_request_problems_name_the_service_account(
    answer: Exception, words: str
) -> None:
    kube = TokenKube(answer)
    with pytest.raises(CredentialsNotFound) as caught:
        await load_credentials(kube, parse_policy(document()), sts_endpoint="http://127.0.0.1:9")  # type: ignore[arg-type]
    assert caught.value.reason == "CredentialsNotFound"
    assert words in str(caught.value)
    assert "(spec.store.serviceAccountRef)" in str(caught.value)


def test_expired_secrets_leave_the_scrub_list() -> None:
    """Renewals add a token and keys every hour: expired ones stop being scanned for."""
    now = [0.0]
    secrets = KnownSecrets(clock=lambda: now[0])
    secrets.add("permanent-secret-value")
    secrets.add("token-of-the-first-hour", ttl=600)
    assert secrets.replace("a token-of-the-first-hour b") == "a [REDACTED] b"
    now[0] = 601.0
    assert secrets.replace("a token-of-the-first-hour b") == "a token-of-the-first-hour b"
    assert secrets.replace("permanent-secret-value") == "[REDACTED]"
    assert len(secrets) == 2  # the permanent value, as given and in base64
    secrets.add("both-ways-value", ttl=10)
    secrets.add("both-ways-value")  # also a Secret's value: kept for good
    now[0] = 10_000.0
    assert secrets.replace("both-ways-value") == "[REDACTED]"


def test_an_exchange_remembers_its_token_and_keys_for_their_lifetime(
    aws: RecordingProxy,
) -> None:
    tokens = Tokens()
    exchange, _ = exchange_for(s3_policy(aws), aws, tokens)
    metadata = exchange.fetch()
    for value in (tokens.issued[0], metadata["secret_key"], metadata["token"]):
        assert known_secrets._values[value] is not None  # an expiring entry, not for good
        assert scrub(value) == "[REDACTED]"
    known_secrets.discard(tokens.issued[0], metadata["secret_key"], metadata["token"])
