"""Shared helpers for the integration tier: make uploads, write policies, run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from mpu_janitor.policy import Policy, parse_policy


def make_upload(
    s3: Any, bucket: str, key: str, part_sizes: list[int] | tuple[int, ...] = ()
) -> str:
    upload_id: str = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    for number, size in enumerate(part_sizes, start=1):
        s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=b"x" * size
        )
    return upload_id


def make_uploads(s3: Any, bucket: str, keys: list[str], workers: int = 16) -> list[str]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda key: make_upload(s3, bucket, key), keys))


def open_uploads(s3: Any, bucket: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        found.update((u["Key"], u["UploadId"]) for u in page.get("Uploads", []))
    return found


def policy_doc(
    endpoint: str, buckets: list[str], *, profile: str = "MinIO", **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "store": {
            "type": "S3",
            "s3": {"endpoint": endpoint, "profile": profile, "buckets": buckets},
        },
        "match": {"olderThan": "2s", "quietPeriod": "0s"},
        "limits": {"requestsPerSecond": 2000, "concurrency": 8},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": "test", "namespace": "default"},
        "spec": body,
    }


def to_policy(doc: dict[str, Any]) -> Policy:
    return parse_policy(doc)


def write_policy(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    # The installed console script, as a user runs it.
    script = Path(sys.executable).parent / "mpu-janitor"
    return subprocess.run(
        [str(script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def last_json(stdout: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return value
