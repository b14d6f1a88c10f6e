"""open_store: whatever a store's client refuses while being built is an invalid policy that
names the store section (exit 2 in the CLI, InvalidSpec in the operator), never a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpu_janitor.metrics import MetricsState
from mpu_janitor.policy import parse_policy
from mpu_janitor.scheduler import Scheduler
from mpu_janitor.stores import UnusableTarget, open_store
from mpu_janitor.stores.base import InvalidTarget
from mpu_janitor.tenancy import Tenancy

MINIO = {
    "apiVersion": "mpu-janitor.dev/v1alpha1",
    "kind": "UploadLifecyclePolicy",
    "metadata": {"name": "p"},
    "spec": {
        "store": {
            "type": "S3",
            "s3": {"endpoint": "http://127.0.0.1:9", "profile": "MinIO", "buckets": ["b-1"]},
        },
        "match": {"olderThan": "1d"},
    },
}


def test_a_client_refusal_becomes_an_invalid_target_naming_the_section(monkeypatch: Any) -> None:
    from mpu_janitor.stores import s3

    def refuse(*_: Any, **__: Any) -> None:
        raise ValueError("Invalid endpoint: http://a..b")

    monkeypatch.setattr(s3.S3Store, "__init__", refuse)
    with pytest.raises(UnusableTarget) as caught:
        open_store(parse_policy(MINIO).store)
    assert isinstance(caught.value, InvalidTarget) and caught.value.reason == "InvalidSpec"
    assert caught.value.field == "spec.store.s3"
    assert str(caught.value) == "spec.store.s3: Invalid endpoint: http://a..b"


def test_the_cli_exits_2_when_the_client_refuses(tmp_path: Path) -> None:
    """A sitecustomize makes botocore refuse every endpoint, as it refuses ones it cannot use."""
    (tmp_path / "sitecustomize.py").write_text(
        "import botocore.client\n"
        "def refuse(*a, **k):\n"
        "    raise ValueError('Invalid endpoint: refused by the test')\n"
        "botocore.client.ClientCreator.create_client = refuse\n"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(MINIO))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "mpu_janitor.cli", "sweep", "-f", str(policy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr == (
        "error: invalid policy: spec.store.s3: Invalid endpoint: refused by the test\n"
    )


class RecordingKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        self.patches.append(dict(status))


async def test_the_operator_reports_invalid_spec_when_the_client_refuses(
    monkeypatch: Any,
) -> None:
    """Not a crash: Ready=False and Stalled with InvalidSpec, naming the section."""
    from mpu_janitor.stores import s3

    def refuse(*_: Any, **__: Any) -> None:
        raise ValueError("Invalid endpoint: http://a..b")

    monkeypatch.setattr(s3.S3Store, "__init__", refuse)
    kube = RecordingKube()
    events: list[tuple[str, str]] = []

    async def post(obj: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        events.append((reason, message))

    ambient = Tenancy(ambient_namespaces=frozenset({"ns"}))
    sched = Scheduler(kube, MetricsState(), post, tenancy=ambient)  # type: ignore[arg-type]
    document = {**MINIO, "metadata": {"name": "p", "namespace": "ns", "generation": 1}}
    sched.upsert(document)
    entry = sched.entries[("ns", "p")]
    assert entry.policy is not None
    await sched._sweep_once(entry, entry.policy, None)
    await sched.stop()
    conditions = {c["type"]: c for p in kube.patches for c in p.get("conditions", [])}
    ready = conditions["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.store.s3: Invalid endpoint: http://a..b" in ready["message"]
    assert conditions["Stalled"]["status"] == "True"
    assert [reason for reason, _ in events] == ["InvalidSpec"]
