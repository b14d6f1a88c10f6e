"""Workload identity on the Glacier store: the credentials a real STS (moto's server) issued
for the policy's role are the ones the vault requests are signed with. The Glacier endpoint is
the HTTP-level fake, which recomputes every SigV4 signature for the key pair it is given: here
the pair STS issued, so a request signed with anything else (the operator's own environment's
keys) is refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from mpu_janitor.credentials import WebIdentityExchange, renewing_credentials
from mpu_janitor.policy import GlacierTarget, WorkloadIdentity
from mpu_janitor.stores.base import AccessDenied, StoreCredentials, StoreError
from mpu_janitor.stores.glacier import GlacierStore
from tests.support.glacier_server import FakeGlacier
from tests.support.recording_proxy import MotoServer, RecordingProxy

VAULT = "tenant-vault"
ROLE = "arn:aws:iam::111122223333:role/vault-janitor"


@pytest.fixture()
def sts() -> Iterator[RecordingProxy]:
    with MotoServer() as moto, RecordingProxy(moto.url) as proxy:
        yield proxy


def test_glacier_requests_are_signed_with_the_credentials_sts_issued(
    sts: RecordingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATORAMBIENT2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-ambient-secret-2")
    exchange = WebIdentityExchange(
        WorkloadIdentity("vault-janitor", ROLE),
        token=lambda: "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ2In0.glacier-test-token",
        region="us-east-1",
        sts_endpoint=sts.url,
        session_name="mpu-janitor@team-b.vaults",
    )
    credentials = renewing_credentials(exchange)
    issued = credentials.get_frozen_credentials()
    [call] = sts.sts_calls("AssumeRoleWithWebIdentity")
    assert call.issued_key == issued.access_key

    with FakeGlacier(access_key=issued.access_key, secret_key=issued.secret_key) as glacier:
        glacier.create_vault(VAULT)
        upload_id = glacier.add_upload(VAULT, age=timedelta(days=3), parts=1)
        target = GlacierTarget(glacier.url, glacier.region, "-", (VAULT,))

        store = GlacierStore(target, StoreCredentials(provider=credentials), lambda *_: None)
        try:
            listed = [u.upload_id for page in store.list_uploads(VAULT, ()) for u in page.uploads]
        finally:
            store.close()
        assert listed == [upload_id]

        # Control: the operator's own identity (the default chain) is refused by the same
        # endpoint, so the listing above was signed with STS's credentials.
        ambient = GlacierStore(target, None, lambda *_: None)
        try:
            with pytest.raises((AccessDenied, StoreError)):
                list(ambient.list_uploads(VAULT, ()))
        finally:
            ambient.close()
