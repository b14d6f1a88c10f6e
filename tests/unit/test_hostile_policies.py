"""Hostile policies (tests/support/hostile_policies.py) are refused, naming the field: by the
policy model, and by ``mpu-janitor sweep -f`` as a user runs it (exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpu_janitor.cli import load_policy_file
from mpu_janitor.policy import PolicyError
from tests.support.hostile_policies import CORPUS, Hostile

# A hang guard only: a refusal is immediate, and no entry may reach the network.
HANG_GUARD_SECONDS = 60


def test_the_corpus_is_large_and_covers_every_spec_field() -> None:
    assert len(CORPUS) >= 60
    assert len({entry.id for entry in CORPUS}) == len(CORPUS)
    named = {entry.field.split("[")[0] for entry in CORPUS}
    every_field = {
        "spec.store.type",
        "spec.store.s3.endpoint",
        "spec.store.s3.region",
        "spec.store.s3.profile",
        "spec.store.s3.buckets",
        "spec.store.s3.bucketPattern",
        "spec.store.s3.expectedBucketOwner",
        "spec.store.s3.requestPayer",
        "spec.store.glacier.vaults",
        "spec.store.glacier.region",
        "spec.store.glacier.accountId",
        "spec.store.lilt.endpoint",
        "spec.store.lilt.inventoryPath",
        "spec.store.credentialsSecretRef.name",
        "spec.match.olderThan",
        "spec.match.prefixes",
        "spec.match.excludeKeyGlobs",
        "spec.match.quietPeriod",
        "spec.schedule.interval",
        "spec.mode",
        "spec.limits.maxAbortsPerSweep",
        "spec.limits.requestsPerSecond",
        "spec.limits.concurrency",
        "spec.suspend",
    }
    assert every_field <= named, every_field - named


def write(entry: Hostile, directory: Path) -> Path:
    path = directory / f"{entry.id}.yaml"
    path.write_text(entry.yaml_text(), encoding="utf-8", errors="surrogatepass")
    return path


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.id) for e in CORPUS])
def test_the_model_refuses_naming_the_field(entry: Hostile, tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_file(str(write(entry, tmp_path)))
    assert caught.value.field == entry.field, str(caught.value)
    assert len(str(caught.value)) < 1000  # a message, never a dump of the hostile value


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.id) for e in CORPUS])
def test_the_cli_exits_2_naming_the_field(entry: Hostile, tmp_path: Path) -> None:
    path = write(entry, tmp_path)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "hostile", "AWS_SECRET_ACCESS_KEY": "hostile"}
    result = subprocess.run(
        [sys.executable, "-m", "mpu_janitor.cli", "sweep", "-f", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_GUARD_SECONDS,
        check=False,
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: invalid policy: {entry.field}:"), result.stderr[:500]
    assert result.stdout == ""
