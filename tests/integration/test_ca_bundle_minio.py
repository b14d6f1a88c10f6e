"""spec.store.caBundleSecretRef against a real TLS endpoint: MinIO serving a certificate from a
CA made in the test. Trusted with the policy's bundle; refused without it, with another CA's,
and by the system's trust store. The bundle's temp file is private and gone once the store is
closed."""

from __future__ import annotations

import base64
import ipaddress
import stat
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mpu_janitor.credentials import CABundleNotFound, load_credentials
from mpu_janitor.kube import NotFound
from mpu_janitor.policy import Policy, parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import StoreError
from tests.support.minio import MinioServer


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("minio.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class TlsMinio(MinioServer):
    """MinIO serving HTTPS with a certificate of ``ca`` (its --certs-dir)."""

    def __init__(self, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> None:
        super().__init__()
        self.endpoint = f"https://127.0.0.1:{self.port}"
        self.ca_file = self.workdir / "ca.crt"
        self.ca_file.write_text(pem(ca))
        certs = self.workdir / "certs"
        certs.mkdir()
        cert_pem, key_pem = server_certificate(ca_key, ca)
        (certs / "public.crt").write_bytes(cert_pem)
        (certs / "private.key").write_bytes(key_pem)
        self.certs = certs

    def extra_args(self) -> list[str]:
        return ["--certs-dir", str(self.certs)]

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.running():
            raise RuntimeError(f"MinIO exited:\n{self.process.log_tail()}")
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def client(self, **config: Any) -> Any:
        return super().client(verify=str(self.ca_file), retries={"max_attempts": 0}, **config)


@pytest.fixture(scope="module")
def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return make_ca("mpu-janitor test CA")


@pytest.fixture(scope="module")
def tls_minio(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> Iterator[TlsMinio]:
    server = TlsMinio(*ca).start()
    client = server.client()
    client.create_bucket(Bucket="private-ca")
    client.create_multipart_upload(Bucket="private-ca", Key="behind/private-ca.bin")
    yield server
    server.stop()


class SecretsKube:
    def __init__(self, secrets: dict[str, Mapping[str, Any]]) -> None:
        self.secrets = secrets
        self.reads: list[str] = []

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any]:
        self.reads.append(f"{namespace}/{name}")
        if name not in self.secrets:
            raise NotFound(404, "not found")
        return self.secrets[name]


def policy(endpoint: str, ca_ref: dict[str, str] | None = None) -> Policy:
    store: dict[str, Any] = {
        "type": "S3",
        "s3": {"endpoint": endpoint, "profile": "MinIO", "buckets": ["private-ca"]},
        "credentialsSecretRef": {"name": "minio-creds"},
    }
    if ca_ref is not None:
        store["caBundleSecretRef"] = ca_ref
    return parse_policy(
        {
            "metadata": {"name": "tls", "namespace": "team-a"},
            "spec": {"store": store, "match": {"olderThan": "1d"}},
        }
    )


def encoded(**values: str) -> dict[str, Any]:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}


def kube_for(minio: TlsMinio, **ca_secrets: Mapping[str, Any]) -> SecretsKube:
    creds = encoded(AWS_ACCESS_KEY_ID=minio.access_key, AWS_SECRET_ACCESS_KEY=minio.secret_key)
    return SecretsKube({"minio-creds": creds, **ca_secrets})


def temp_ca_files() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("mpu-janitor-ca-*")}


async def test_the_policys_ca_bundle_makes_the_endpoint_trusted(
    tls_minio: TlsMinio, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
) -> None:
    kube = kube_for(tls_minio, **{"private-ca": encoded(**{"ca.crt": pem(ca[1])})})
    chosen = policy(tls_minio.endpoint, {"name": "private-ca"})
    credentials = await load_credentials(kube, chosen)  # type: ignore[arg-type]
    assert credentials is not None and credentials.ca_bundle == pem(ca[1])
    assert kube.reads == ["team-a/private-ca", "team-a/minio-creds"]
    before = temp_ca_files()
    store = open_store(chosen.store, credentials)
    created = temp_ca_files() - before
    assert len(created) == 1
    path = Path(tempfile.gettempdir()) / created.pop()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    try:
        keys = [u.key for page in store.list_uploads("private-ca", ()) for u in page.uploads]
    finally:
        store.close()
    assert keys == ["behind/private-ca.bin"]
    assert not path.exists()  # removed with the client


async def test_without_the_bundle_or_with_another_ca_the_endpoint_is_refused(
    tls_minio: TlsMinio,
) -> None:
    _, stranger = make_ca("some other CA")
    kube = kube_for(tls_minio, other=encoded(**{"bundle.pem": pem(stranger)}))
    for chosen in (
        policy(tls_minio.endpoint),  # the system's trust store
        policy(tls_minio.endpoint, {"name": "other", "key": "bundle.pem"}),
    ):
        credentials = await load_credentials(kube, chosen)  # type: ignore[arg-type]
        store = open_store(chosen.store, credentials)
        try:
            with pytest.raises(StoreError) as caught:
                list(store.list_uploads("private-ca", ()))
        finally:
            store.close()
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


@pytest.mark.parametrize(
    ("secrets", "ref", "words"),
    [
        ({}, {"name": "missing"}, "Secret team-a/missing not found (spec.store.caBundleSecretRef)"),
        (
            {"ca": encoded(other="x")},
            {"name": "ca"},
            "has no key ca.crt (spec.store.caBundleSecretRef.key)",
        ),
        (
            {"ca": encoded(**{"ca.crt": "not a certificate"})},
            {"name": "ca"},
            "holds no PEM CA certificate (spec.store.caBundleSecretRef.key)",
        ),
    ],
)
async def test_a_bad_bundle_secret_names_the_field(
    secrets: dict[str, Mapping[str, Any]], ref: dict[str, str], words: str
) -> None:
    kube = SecretsKube(secrets)
    with pytest.raises(CABundleNotFound) as caught:
        await load_credentials(kube, policy("https://127.0.0.1:9", ref))  # type: ignore[arg-type]
    assert words in str(caught.value)
    assert caught.value.reason == "CredentialsNotFound"
