"""Workload identity end to end: the operator, installed by the chart (its RBAC is the only
permission it has), requests a token for a tenant's ServiceAccount from the real API server
(TokenRequest), exchanges it with a real STS (moto's server, over HTTP, behind a recording
proxy) and sweeps the tenant's bucket (moto's S3, behind the same proxy) with exactly the
credentials STS issued: never with its own. The same run shows the API server's own address
refused as a store endpoint, and missing or unlisted ServiceAccounts named in the status."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.e2e.test_operator_e2e import REPO, apply, events, ready, running_operator, status
from tests.support.controlplane import ControlPlane, wait_for
from tests.support.recording_proxy import MotoServer, RecordingProxy

BUCKET = "tenant-uploads"
ROLE = "arn:aws:iam::111122223333:role/tenant-a-janitor"
AMBIENT_KEY = "AKIAOPERATORAMBIENT7"


def policy(name: str, namespace: str, endpoint: str, **store: Any) -> dict[str, Any]:
    spec_store: dict[str, Any] = {
        "type": "S3",
        "s3": {"endpoint": endpoint, "profile": "Generic", "buckets": [BUCKET]},
        "serviceAccountRef": {"name": "uploads-janitor"},
        "roleArn": ROLE,
        **store,
    }
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "store": spec_store,
            "match": {"olderThan": "2s", "quietPeriod": "0s"},
            "schedule": {"interval": "1h"},
        },
    }


def jwt_parts(token: str) -> tuple[dict[str, Any], bytes, bytes]:
    header, payload, signature = token.split(".")

    def decode(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    return json.loads(decode(payload)), f"{header}.{payload}".encode(), decode(signature)


def test_a_tenant_service_account_token_reaches_sts_and_its_credentials_sweep(
    control_plane: ControlPlane, make_namespace: Callable[[str], str], tmp_path: Path
) -> None:
    plane = control_plane
    plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    team = make_namespace("tenant")
    release_ns = make_namespace("janitor")
    plane.helm(
        "install",
        "janitor",
        str(REPO / "charts" / "mpu-janitor"),
        "-n",
        release_ns,
        "--set",
        f"watchNamespaces={{{team}}}",
        "--set",
        "credentials.workloadIdentityServiceAccounts={uploads-janitor,never-created}",
        "--skip-crds",
    )
    accounts = plane.kubectl_json("get", "serviceaccounts", "-n", release_ns)["items"]
    account = next(a["metadata"]["name"] for a in accounts if a["metadata"]["name"] != "default")
    kubeconfig = plane.service_account_kubeconfig(release_ns, account, create=False)
    plane.kubectl("create", "serviceaccount", "uploads-janitor", "-n", team)
    plane.kubectl("create", "serviceaccount", "not-listed", "-n", team)

    def can_i(*args: str) -> str:
        result = plane.kubectl(
            "auth", "can-i", *args, "-n", team, kubeconfig=kubeconfig, check=False
        )
        return str(result.stdout.strip())

    # The chart's rule names only the listed ServiceAccounts, and allows nothing else on them.
    assert can_i("create", "serviceaccounts/uploads-janitor", "--subresource=token") == "yes"
    assert can_i("create", "serviceaccounts/not-listed", "--subresource=token") == "no"
    assert can_i("get", "serviceaccounts") == "no"
    assert can_i("list", "serviceaccounts") == "no"

    with MotoServer() as moto, RecordingProxy(moto.url) as aws:
        admin = boto3.client(
            "s3",
            endpoint_url=moto.url,
            region_name="us-east-1",
            aws_access_key_id="admin",
            aws_secret_access_key="admin",
        )
        admin.create_bucket(Bucket=BUCKET)
        upload = admin.create_multipart_upload(Bucket=BUCKET, Key="stale/video.mp4")
        admin.upload_part(
            Bucket=BUCKET, Key="stale/video.mp4", UploadId=upload["UploadId"], PartNumber=1,
            Body=b"x" * 321,
        )  # fmt: skip
        environment = {
            # The operator's own identity: a tenant's policy must never be signed with it.
            "AWS_ACCESS_KEY_ID": AMBIENT_KEY,
            "AWS_SECRET_ACCESS_KEY": "operator-ambient-secret-7",
            "AWS_ENDPOINT_URL_STS": aws.url,  # --sts-endpoint's default
        }
        with running_operator(kubeconfig, [team], tmp_path, extra_env=environment) as operator:
            apply(plane, policy("identity", team, aws.url))
            for name, account in (("no-account", "never-created"), ("unlisted", "not-listed")):
                apply(plane, policy(name, team, aws.url, serviceAccountRef={"name": account}))
            apply(plane, policy("apiserver", team, plane.server))
            wait_for(
                lambda: (
                    status(plane, team, "identity").get("lastSweep")
                    and ready(plane, team, "no-account").get("status") == "False"
                    and ready(plane, team, "unlisted").get("status") == "False"
                    and ready(plane, team, "apiserver").get("status") == "False"
                ),
                timeout=90,
                what="a sweep with workload identity and two refusals",
            )
            output = operator.output()

        swept = status(plane, team, "identity")
        assert ready(plane, team, "identity")["status"] == "True", swept
        assert swept["lastSweep"]["freedBytes"] == 321
        assert admin.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []

        # The token STS received is one the API server issued for the tenant's ServiceAccount.
        [exchange] = aws.sts_calls()
        assert exchange.form["Action"] == "AssumeRoleWithWebIdentity"
        assert exchange.form["RoleArn"] == ROLE
        assert exchange.signing_key is None
        token = exchange.form["WebIdentityToken"]
        claims, signed, signature = jwt_parts(token)
        assert claims["sub"] == f"system:serviceaccount:{team}:uploads-janitor"
        assert claims["aud"] == ["sts.amazonaws.com"]
        assert claims["iss"] == plane.server
        assert claims["exp"] - claims["iat"] == 600
        public_key = serialization.load_pem_public_key(plane.sa_pub.read_bytes())
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())

        # Every store request was signed with the key STS issued, and nothing with ours.
        issued = exchange.issued_key
        assert issued is not None and issued.startswith("ASIA")
        store_requests = [r for r in aws.store_requests() if r.headers.get("Authorization")]
        operator_requests = [r for r in store_requests if r.signing_key != "admin"]
        assert operator_requests, "the operator sent nothing to the store"
        assert {r.signing_key for r in operator_requests} == {issued}
        assert any(r.method == "DELETE" for r in operator_requests)  # the abort
        assert all(AMBIENT_KEY not in str(r.headers) for r in aws.requests)
        secret_key = re.search(rb"<SecretAccessKey>([^<]+)<", exchange.answer)
        session_token = re.search(rb"<SessionToken>([^<]+)<", exchange.answer)
        assert secret_key is not None and session_token is not None
        shown = output + json.dumps(swept) + json.dumps(events(plane, team, "identity"))
        for value in (token, secret_key.group(1).decode(), session_token.group(1).decode()):
            assert value not in shown  # never in logs, status or Events

    missing = ready(plane, team, "no-account")
    assert missing["reason"] == "CredentialsNotFound"
    assert f"ServiceAccount {team}/never-created not found" in missing["message"]
    # A ServiceAccount the installer did not list: the API server refuses the token.
    unlisted = ready(plane, team, "unlisted")
    assert unlisted["reason"] == "CredentialsNotFound"
    assert f"may not request a token for ServiceAccount {team}/not-listed" in unlisted["message"]
    for condition in (missing, unlisted):
        assert "(spec.store.serviceAccountRef)" in condition["message"]
    refused = ready(plane, team, "apiserver")
    assert refused["reason"] == "InvalidSpec"
    assert refused["message"].startswith("spec.store.s3.endpoint:")
    assert "Kubernetes API server" in refused["message"]
    plane.helm("uninstall", "janitor", "-n", release_ns)
