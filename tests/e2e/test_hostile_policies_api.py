"""The hostile-policy corpus (tests/support/hostile_policies.py) through a real kube-apiserver:
each spec is either rejected by the CRD's schema, naming the field, or, when the schema
accepts it, refused by the policy model naming the field (the operator's InvalidSpec). The
operator itself is run for a few of the accepted ones."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mpu_janitor.policy import PolicyError, parse_spec
from tests.e2e.test_operator_e2e import ready, running_operator
from tests.support.controlplane import REPO_ROOT, ControlPlane, wait_for
from tests.support.hostile_policies import CORPUS, Hostile

pytestmark = pytest.mark.e2e

CRD_NAME = "uploadlifecyclepolicies.mpu-janitor.dev"
API_CORPUS = [entry for entry in CORPUS if entry.for_api_server]


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    control_plane.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    yield control_plane


@pytest.fixture(scope="module")
def outcomes(crd: ControlPlane) -> dict[str, tuple[bool, str]]:
    """Each API entry created with a server-side dry run and strict field validation:
    (accepted, the stored spec as JSON or the server's message)."""
    namespace = "hostile-corpus"
    crd.create_namespace(namespace)
    found: dict[str, tuple[bool, str]] = {}
    for entry in API_CORPUS:
        result = crd.kubectl(
            "create",
            "-n",
            namespace,
            "-f",
            "-",
            "--dry-run=server",
            "--validate=strict",
            "-o",
            "json",
            input=entry.json_text(),
            check=False,
        )
        if result.returncode == 0:
            found[entry.id] = (True, json.dumps(json.loads(result.stdout)["spec"]))
        else:
            found[entry.id] = (False, result.stderr)
    crd.kubectl("delete", "namespace", namespace, "--wait=false")
    return found


def test_most_of_the_corpus_reaches_the_api_server() -> None:
    assert len(API_CORPUS) >= 60


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.id) for e in API_CORPUS])
def test_rejected_by_the_schema_or_refused_by_the_model(
    outcomes: dict[str, tuple[bool, str]], entry: Hostile
) -> None:
    accepted, text = outcomes[entry.id]
    if not accepted:
        assert entry.field in text, text[:1000]
        assert "invalid" in text or "strict decoding error" in text, text[:1000]
        return
    # What the server stores (with its defaults) is what the operator parses.
    with pytest.raises(PolicyError) as caught:
        parse_spec(json.loads(text), name=entry.id, namespace="hostile-corpus")
    assert caught.value.field == entry.field, str(caught.value)


def test_what_the_server_accepts_is_what_the_model_alone_can_judge(
    outcomes: dict[str, tuple[bool, str]],
) -> None:
    """The schema rejects everything it can express; the model judges the rest (port range,
    IPv6 syntax, UTF-8 byte lengths, NUL in paths, vendor rules). Listed so a schema change
    that lets more through is seen."""
    accepted = sorted(entry_id for entry_id, (ok, _) in outcomes.items() if ok)
    assert accepted == sorted(
        [
            "endpoint-port-range",
            "endpoint-bad-ipv6",
            "prefix-1200-bytes",
            "inventory-nul",
            "cos-without-endpoint",
            "minio-without-endpoint",
            "scality-without-endpoint",
            "cos-bucket-host",
            "cos-default-region",
            "cos-as-generic",
            "scality-expected-owner",
            "minio-request-payer",
            "cos-expected-owner",
        ]
    )


OPERATOR_CASES = ["cos-without-endpoint", "cos-default-region", "endpoint-port-range"]


def test_the_operator_reports_invalid_spec_naming_the_field(
    crd: ControlPlane, make_namespace: Callable[[str], str], tmp_path: Path
) -> None:
    namespace = make_namespace("hostile")
    entries = {entry.id: entry for entry in API_CORPUS}
    with running_operator(crd.kubeconfig, [namespace], tmp_path):
        for case in OPERATOR_CASES:
            document: dict[str, Any] = json.loads(entries[case].json_text())
            document["metadata"] = {"name": case, "namespace": namespace}
            crd.kubectl("create", "-f", "-", input=json.dumps(document))
        for case in OPERATOR_CASES:

            def condition_of(name: str = case) -> dict[str, Any]:
                return ready(crd, namespace, name)

            condition = wait_for(condition_of, timeout=60, what=f"the Ready condition of {case}")
            assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
            assert condition["message"].startswith(entries[case].field + ": "), condition
