"""The command line reads no Kubernetes object: a policy's Secret, ServiceAccount and CA
references are the operator's. The CLI says so, naming each field it does not use, and what
it uses instead, then sweeps with the standard AWS chain."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import last_json, make_upload, policy_doc, run_cli, write_policy
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

AGE = 3.5  # older than the helper's olderThan: 2s on MinIO's 1 s Date clock

CLUSTER_FIELDS = {
    "credentialsSecretRef": {"credentialsSecretRef": {"name": "minio-creds"}},
    "serviceAccountRef": {
        "serviceAccountRef": {"name": "uploader"},
        "roleArn": "arn:aws:iam::111122223333:role/janitor",
    },
    "caBundleSecretRef": {"caBundleSecretRef": {"name": "store-ca"}},
}


@pytest.mark.parametrize("field", sorted(CLUSTER_FIELDS))
def test_cli_names_the_cluster_fields_it_does_not_use(
    field: str, minio: MinioServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    make_upload(s3, bucket, "tmp/a", [10, 20])
    time.sleep(AGE)
    doc = policy_doc(minio.endpoint, [bucket])
    doc["spec"]["store"].update(CLUSTER_FIELDS[field])
    path = write_policy(tmp_path, doc)

    for command in (("list",), ("sweep", "--dry-run"), ("sweep",)):
        result = run_cli(*command, "-f", str(path), "--output", "json", env=minio.env())
        assert result.returncode == 0, result.stderr
        notes = [line for line in result.stderr.splitlines() if f"spec.store.{field}" in line]
        assert len(notes) == 1, result.stderr
        assert "not used by the command line" in notes[0]
        if field == "caBundleSecretRef":
            assert "AWS_CA_BUNDLE" in notes[0]
        else:
            assert "standard AWS chain" in notes[0]
    assert last_json(result.stdout)["freedBytes"] == 30


def test_cli_says_nothing_of_fields_a_policy_does_not_set(
    minio: MinioServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    path = write_policy(tmp_path, policy_doc(minio.endpoint, [bucket]))
    result = run_cli("sweep", "-f", str(path), "--output", "json", env=minio.env())
    assert result.returncode == 0, result.stderr
    assert "not used by the command line" not in result.stderr
