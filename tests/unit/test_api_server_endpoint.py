"""The Kubernetes API server is never a store endpoint (unless the installer allows it): its
in-cluster names, the in-cluster Service address and the address the operator logged in to
are refused before any request, so no store credential is ever sent to it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mpu_janitor.tenancy import Tenancy
from tests.unit.test_tenancy import body, ready, s3, scheduler, secret, server, settled

__all__ = ["server"]  # the recording HTTP server fixture

SERVICE_HOST = "10.96.0.1"


@pytest.fixture(autouse=True)
def in_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", SERVICE_HOST)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://kubernetes",
        "https://kubernetes.default:443",
        "https://kubernetes.default.svc",
        "http://kubernetes.default.svc.cluster.local:6443/",
        "https://KUBERNETES.DEFAULT.SVC.corp.example.",
        "https://10.96.0.1",
        "https://10.96.0.1:443/bucket",
        "http://10.96.0.1:9000",  # the Service's address, on any port
        "https://0x0a.0x60.0.1",  # the same address spelt in hex
        "https://174063617",  # and as one number
        "https://[::ffff:10.96.0.1]",
    ],
)
def test_the_in_cluster_api_server_is_refused(endpoint: str) -> None:
    refusal = Tenancy().endpoint_refusal(endpoint)
    assert refusal is not None and "Kubernetes API server" in refusal
    assert "--allowed-endpoints" in refusal


def test_the_address_the_operator_logged_in_to_is_refused_on_that_port_only() -> None:
    tenancy = Tenancy()
    tenancy.note_api_server("https://127.0.0.1:6443")
    tenancy.note_api_server("https://api.cluster.example")  # :443 by default
    for refused in (
        "https://127.0.0.1:6443",
        "http://127.0.0.1:6443/b",
        "https://[::ffff:127.0.0.1]:6443",
        "https://api.cluster.example",
        "https://API.cluster.example:443/",
    ):
        assert tenancy.endpoint_refusal(refused) is not None, refused
    for allowed in (
        "http://127.0.0.1:9000",
        "https://api.cluster.example:9000",
        "https://kubernetes-minio.storage:9000",
        "https://s3.eu-west-1.amazonaws.com",
        "https://10.96.0.10",
    ):
        assert tenancy.endpoint_refusal(allowed) is None, allowed


def test_the_allow_list_can_let_the_api_server_through() -> None:
    tenancy = Tenancy.from_flags([], [r"https://kubernetes\.default\.svc(:443)?"])
    assert tenancy.endpoint_refusal("https://kubernetes.default.svc") is None
    assert tenancy.endpoint_refusal("https://10.96.0.1") is not None  # not listed


def test_outside_a_cluster_nothing_but_the_login_address_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert Tenancy().endpoint_refusal("https://10.96.0.1") is None


def test_the_sts_endpoint_flag_must_be_a_url() -> None:
    assert Tenancy.from_flags([], [], "https://sts.internal:8443").sts_endpoint == (
        "https://sts.internal:8443"
    )
    with pytest.raises(ValueError, match="--sts-endpoint"):
        Tenancy.from_flags([], [], "sts.internal")


async def test_a_policy_naming_the_api_server_gets_no_request_and_no_credential(
    server: tuple[str, list[Any]],
) -> None:
    url, seen = server
    tenancy = Tenancy(ambient_namespaces=frozenset({"ns"}))
    tenancy.note_api_server(url.replace("http://", "https://"))  # as the login reported it
    sched, kube = scheduler(tenancy)
    kube.secrets["ns", "creds"] = secret(AWS_ACCESS_KEY_ID="AKIA1", AWS_SECRET_ACCESS_KEY="s" * 20)
    sched.upsert(body("apiserver", "ns", s3(url, secret="creds")))
    sched.upsert(body("apiserver-ambient", "ns", s3(url)))
    sched.upsert(body("service", "ns", s3("https://kubernetes.default.svc", secret="creds")))
    conditions = await settled(sched, kube, "apiserver", "apiserver-ambient", "service")
    for condition in conditions.values():
        assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
        assert condition["message"].startswith("spec.store.s3.endpoint:")
        assert "Kubernetes API server" in condition["message"]
    assert seen == []
    await asyncio.sleep(0)
    assert ready(kube, "apiserver")["reason"] == "InvalidSpec"
