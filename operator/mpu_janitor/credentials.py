"""Store credentials for a policy: its Secret (same namespace only), or the operator's own
AWS identity in the namespaces the installer lists (ambient credentials).

Secret values never reach logs, events or status: errors name the Secret and the missing
key, never a value; StoreCredentials redacts itself in repr().
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from mpu_janitor.kube import Forbidden, KubeClient, NotFound
from mpu_janitor.policy import Policy, StoreType
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.tenancy import known_secrets

ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN = "AWS_SESSION_TOKEN"
LILT_API_KEY = "LILT_API_KEY"


class CredentialsNotFound(Exception):
    reason = "CredentialsNotFound"


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
    client: KubeClient, policy: Policy, *, ambient: bool = False
) -> StoreCredentials | None:
    """The policy's Secret, read in its own namespace. Without one: None (the operator's own
    AWS identity: IRSA, Pod Identity, environment) only when ``ambient`` (the installer listed
    the policy's namespace); otherwise CredentialsNotFound. A LILT key never comes from the
    operator's environment: a LILT policy always needs its Secret."""
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
                f"policy {rule} names no Secret (spec.store.credentialsSecretRef), and the "
                f"operator's own credentials are not for namespace {policy.namespace}: the "
                "installer lists the namespaces that may use them with "
                "--ambient-credentials-namespaces (chart value credentials.ambientNamespaces)"
            )
        return None
    try:
        secret = await client.get_secret(policy.namespace, ref.name)
    except NotFound:
        raise CredentialsNotFound(
            f"Secret {policy.namespace}/{ref.name} not found (spec.store.credentialsSecretRef)"
        ) from None
    except Forbidden:
        raise CredentialsNotFound(
            f"the operator may not read Secret {policy.namespace}/{ref.name}: check its RBAC "
            "(spec.store.credentialsSecretRef)"
        ) from None
    return credentials_from_secret(policy, secret)
