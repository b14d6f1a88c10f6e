"""Store credentials for a policy: its Secret (same namespace only), its own workload identity
(a ServiceAccount token of its namespace exchanged with STS), or the operator's own AWS identity
in the namespaces the installer lists (ambient credentials); and the private CA its endpoint is
verified with (caBundleSecretRef).

Secret values never reach logs, events or status: errors name the Secret and the missing
key, never a value; StoreCredentials redacts itself in repr().
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
import ssl
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.utils
from botocore import UNSIGNED

from mpu_janitor.kube import Forbidden, KubeClient, KubeError, NotFound
from mpu_janitor.policy import Policy, StoreType, WorkloadIdentity
from mpu_janitor.stores.aws import isolated_session
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.tenancy import known_secrets, scrub

ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN = "AWS_SESSION_TOKEN"
LILT_API_KEY = "LILT_API_KEY"


# Workload identity: the ServiceAccount token only has to outlive the STS call (600 s is the
# shortest the API server issues); STS sessions last an hour (AssumeRole's default, and the
# longest a role chain allows), renewed by botocore 15 minutes before they end.
TOKEN_SECONDS = 600
SESSION_SECONDS = 3600
TOKEN_WAIT_SECONDS = 60.0  # a sweep thread's wait for the event loop's TokenRequest
STS_RETRIES = 4
REMEMBER_AFTER_EXPIRY = 3600  # seconds a token or key is still scrubbed after it expired


class CredentialsNotFound(Exception):
    reason = "CredentialsNotFound"


class WorkloadIdentityFailed(CredentialsNotFound):
    """No token for the ServiceAccount (CredentialsNotFound), STS refused to exchange it
    (AccessDenied), or STS could not be reached (CredentialsUnreadable: tried again soon)."""

    def __init__(self, message: str, reason: str = "CredentialsNotFound") -> None:
        super().__init__(message)
        self.reason = reason


class CABundleNotFound(CredentialsNotFound):
    """The Secret or key of spec.store.caBundleSecretRef is missing or holds no CA."""


def credentials_from_secret(policy: Policy, secret: Mapping[str, Any]) -> StoreCredentials:
    ref = policy.store.credentials_secret_ref
    name = ref.name if ref else "?"
    values: dict[str, str] = {}
    for key, encoded in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(encoded).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsNotFound(
                f"Secret {policy.namespace}/{name}: key {key} is not valid base64 UTF-8"
            ) from None
    values.update({k: v.strip() for k, v in (secret.get("stringData") or {}).items()})
    # Wherever a value turns up (an echoing store's error, a debug log), it is replaced.
    known_secrets.add(
        *(values.get(k) for k in (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, LILT_API_KEY))
    )
    if policy.store.type is StoreType.LILT:
        required: tuple[str, ...] = (LILT_API_KEY,)
    else:
        required = (ACCESS_KEY, SECRET_KEY)
    missing = [key for key in required if not values.get(key)]
    if missing:
        raise CredentialsNotFound(
            f"Secret {policy.namespace}/{name} has no {' or '.join(missing)} "
            f"(spec.store.credentialsSecretRef)"
        )
    return StoreCredentials(
        access_key_id=values.get(ACCESS_KEY),
        secret_access_key=values.get(SECRET_KEY),
        session_token=values.get(SESSION_TOKEN) or None,
        api_key=values.get(LILT_API_KEY),
    )


async def load_credentials(
    client: KubeClient,
    policy: Policy,
    *,
    ambient: bool = False,
    sts_endpoint: str | None = None,
) -> StoreCredentials | None:
    """The policy's credentials and CA bundle, each read in its own namespace only.

    A Secret (credentialsSecretRef); or workload identity (serviceAccountRef: allowed in every
    namespace, it is the tenant's own); or, without either, None (the operator's own AWS
    identity: IRSA, Pod Identity, environment) only when ``ambient`` (the installer listed the
    policy's namespace), otherwise CredentialsNotFound. A LILT key never comes from the
    operator's environment: a LILT policy always needs its Secret."""
    ca_bundle = await load_ca_bundle(client, policy)
    if policy.store.workload_identity is not None:
        provider = await workload_credentials(client, policy, sts_endpoint=sts_endpoint)
        return StoreCredentials(provider=provider, ca_bundle=ca_bundle)
    credentials = await _secret_or_ambient(client, policy, ambient=ambient)
    if ca_bundle is None:
        return credentials
    if credentials is None:
        return StoreCredentials(ca_bundle=ca_bundle)
    return dataclasses.replace(credentials, ca_bundle=ca_bundle)


async def _secret_or_ambient(
    client: KubeClient, policy: Policy, *, ambient: bool
) -> StoreCredentials | None:
    ref = policy.store.credentials_secret_ref
    if ref is None:
        rule = f"{policy.namespace}/{policy.name}"
        if policy.store.type is StoreType.LILT:
            raise CredentialsNotFound(
                f"policy {rule} names no Secret: the operator sends LILT only the "
                f"{LILT_API_KEY} of the Secret named by spec.store.credentialsSecretRef, never "
                "its own environment's"
            )
        if not ambient:
            raise CredentialsNotFound(
                f"policy {rule} names no Secret (spec.store.credentialsSecretRef) and no "
                "ServiceAccount (spec.store.serviceAccountRef), and the "
                f"operator's own credentials are not for namespace {policy.namespace}: the "
                "installer lists the namespaces that may use them with "
                "--ambient-credentials-namespaces (chart value credentials.ambientNamespaces)"
            )
        return None
    secret = await _read_secret(client, policy, ref.name, "spec.store.credentialsSecretRef")
    return credentials_from_secret(policy, secret)


async def _read_secret(
    client: KubeClient,
    policy: Policy,
    name: str,
    field: str,
    error: type[CredentialsNotFound] = CredentialsNotFound,
) -> Mapping[str, Any]:
    try:
        return await client.get_secret(policy.namespace, name)
    except NotFound:
        raise error(f"Secret {policy.namespace}/{name} not found ({field})") from None
    except Forbidden:
        raise error(
            f"the operator may not read Secret {policy.namespace}/{name}: check its RBAC ({field})"
        ) from None


# -- private CA ----------------------------------------------------------------------------------


async def load_ca_bundle(client: KubeClient, policy: Policy) -> str | None:
    """The PEM CA bundle of spec.store.caBundleSecretRef, checked to load; None without one."""
    ref = policy.store.ca_bundle_ref
    if ref is None:
        return None
    field = "spec.store.caBundleSecretRef"
    secret = await _read_secret(client, policy, ref.name, field, CABundleNotFound)
    where = f"Secret {policy.namespace}/{ref.name}"
    raw: str | None = (secret.get("stringData") or {}).get(ref.key)
    if raw is None and ref.key in (secret.get("data") or {}):
        try:
            raw = base64.b64decode(secret["data"][ref.key]).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CABundleNotFound(
                f"{where}: key {ref.key} is not valid base64 UTF-8 ({field}.key)"
            ) from None
    if not raw or not raw.strip():
        raise CABundleNotFound(f"{where} has no key {ref.key} ({field}.key)")
    try:
        ssl.create_default_context(cadata=raw)
        if "-----BEGIN CERTIFICATE-----" not in raw:
            raise ValueError("no PEM certificate")
    except (ssl.SSLError, ValueError):
        raise CABundleNotFound(
            f"{where}: key {ref.key} holds no PEM CA certificate ({field}.key)"
        ) from None
    return raw


# -- workload identity ---------------------------------------------------------------------------


def session_name(policy: Policy) -> str:
    """The STS RoleSessionName, so CloudTrail names the policy: [\\w+=,.@-], at most 64."""
    return re.sub(r"[^\w+=,.@-]", "-", f"mpu-janitor@{policy.namespace}.{policy.name}")[:64]


class WebIdentityExchange:
    """Fresh AWS credentials for one policy, blocking (botocore calls :meth:`refresh` from the
    sweep's threads): a new ServiceAccount token from ``token``, STS
    AssumeRoleWithWebIdentity (unsigned: nothing of the operator's own identity is used),
    then AssumeRole for a role in another account when the policy names one."""

    def __init__(
        self,
        identity: WorkloadIdentity,
        *,
        token: Callable[[], str],
        region: str,
        sts_endpoint: str | None,
        session_name: str,
    ) -> None:
        self.identity = identity
        self.token = token
        self.region = region
        self.sts_endpoint = sts_endpoint
        self.session_name = session_name
        self.exchanges = 0
        self._lock = threading.Lock()

    def _sts(self, credentials: botocore.credentials.Credentials | None) -> Any:
        config = botocore.config.Config(
            region_name=self.region,
            retries={"mode": "standard", "max_attempts": STS_RETRIES},
            connect_timeout=5,
            read_timeout=30,
            **({} if credentials is not None else {"signature_version": UNSIGNED}),
        )
        session = isolated_session(credentials)
        return session.create_client("sts", endpoint_url=self.sts_endpoint, config=config)

    def _call(self, operation: str, field: str, call: Callable[[], Any]) -> dict[str, Any]:
        where = self.sts_endpoint or f"AWS STS ({self.region})"
        try:
            answer: dict[str, Any] = call()
        except botocore.exceptions.ClientError as error:
            details = error.response.get("Error", {})
            raise WorkloadIdentityFailed(
                f"{where} refused {operation} ({field}): {details.get('Code', '?')}: "
                f"{scrub(str(details.get('Message', '')), 300)}",
                "AccessDenied",
            ) from None
        except botocore.exceptions.BotoCoreError as error:
            raise WorkloadIdentityFailed(
                f"{operation} at {where} failed ({field}): {scrub(str(error), 300)}",
                "CredentialsUnreadable",
            ) from None
        return dict(answer["Credentials"])

    def fetch(self) -> dict[str, str]:
        """One exchange: botocore's credential metadata. Raises WorkloadIdentityFailed."""
        identity = self.identity
        token = self.token()
        # Scrubbed from every log line while they can be used (and a while after).
        known_secrets.add(token, ttl=TOKEN_SECONDS + REMEMBER_AFTER_EXPIRY)
        issued = self._call(
            "AssumeRoleWithWebIdentity",
            "spec.store.roleArn",
            lambda: self._sts(None).assume_role_with_web_identity(
                RoleArn=identity.role_arn,
                RoleSessionName=self.session_name,
                WebIdentityToken=token,
                DurationSeconds=SESSION_SECONDS,
            ),
        )
        lifetime = SESSION_SECONDS + REMEMBER_AFTER_EXPIRY
        known_secrets.add(issued["SecretAccessKey"], issued["SessionToken"], ttl=lifetime)
        if identity.assume_role_arn is not None:
            chained = botocore.credentials.Credentials(
                issued["AccessKeyId"], issued["SecretAccessKey"], issued["SessionToken"]
            )
            extra = {"ExternalId": identity.external_id} if identity.external_id else {}
            issued = self._call(
                "AssumeRole",
                "spec.store.assumeRole.roleArn",
                lambda: self._sts(chained).assume_role(
                    RoleArn=identity.assume_role_arn,
                    RoleSessionName=self.session_name,
                    DurationSeconds=SESSION_SECONDS,
                    **extra,
                ),
            )
            known_secrets.add(issued["SecretAccessKey"], issued["SessionToken"], ttl=lifetime)
        with self._lock:
            self.exchanges += 1
        expiry = issued["Expiration"]
        return {
            "access_key": issued["AccessKeyId"],
            "secret_key": issued["SecretAccessKey"],
            "token": issued["SessionToken"],
            "expiry_time": expiry.isoformat() if hasattr(expiry, "isoformat") else str(expiry),
        }

    def refresh(self) -> dict[str, str]:
        """:meth:`fetch` in botocore's vocabulary: a failed renewal is a credential error of
        the store call that needed it (the sweep reports it), never an unknown exception."""
        try:
            return self.fetch()
        except WorkloadIdentityFailed as error:
            raise botocore.exceptions.CredentialRetrievalError(
                provider="workload identity", error_msg=str(error)
            ) from None


def renewing_credentials(
    exchange: WebIdentityExchange, clock: Callable[[], datetime] | None = None
) -> botocore.credentials.Credentials:
    """The first exchange's credentials, renewed by the same exchange once a call finds them
    within 15 minutes of their end (by the first call to get there; the others go on with the
    current ones), or within 10 minutes (every call waits for the renewal). ``clock``: the
    time those are judged by (tests)."""
    metadata = exchange.fetch()
    return botocore.credentials.RefreshableCredentials(
        metadata["access_key"],
        metadata["secret_key"],
        metadata["token"],
        botocore.utils.parse_timestamp(metadata["expiry_time"]),
        exchange.refresh,
        "mpu-janitor-web-identity",
        **({"time_fetcher": clock} if clock is not None else {}),
    )


async def request_token(client: KubeClient, policy: Policy) -> str:
    identity = policy.store.workload_identity
    assert identity is not None
    account = f"{policy.namespace}/{identity.service_account}"
    field = "spec.store.serviceAccountRef"
    try:
        return await client.create_service_account_token(
            policy.namespace,
            identity.service_account,
            audience=identity.audience,
            seconds=TOKEN_SECONDS,
        )
    except NotFound:
        raise WorkloadIdentityFailed(f"ServiceAccount {account} not found ({field})") from None
    except Forbidden:
        raise WorkloadIdentityFailed(
            f"the operator may not request a token for ServiceAccount {account}: its RBAC "
            f"needs create on serviceaccounts/token ({field})"
        ) from None
    except KubeError as error:
        raise WorkloadIdentityFailed(
            f"TokenRequest for ServiceAccount {account} failed ({field}): {error}"
        ) from None


async def workload_credentials(
    client: KubeClient, policy: Policy, *, sts_endpoint: str | None
) -> botocore.credentials.Credentials:
    """The policy's workload identity as renewing credentials. The first exchange happens
    here (its failure is the policy's WorkloadIdentityFailed); renewals run in the sweep's
    threads and ask this event loop for each new token."""
    identity = policy.store.workload_identity
    assert identity is not None
    loop = asyncio.get_running_loop()
    target = policy.store.s3 or policy.store.glacier
    assert target is not None

    def token() -> str:
        future = asyncio.run_coroutine_threadsafe(request_token(client, policy), loop)
        return future.result(timeout=TOKEN_WAIT_SECONDS)

    exchange = WebIdentityExchange(
        identity,
        token=token,
        region=target.region,
        sts_endpoint=sts_endpoint,
        session_name=session_name(policy),
    )
    return await loop.run_in_executor(None, renewing_credentials, exchange)
