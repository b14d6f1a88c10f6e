"""Secret values appear nowhere in `mpu-janitor -v` output (botocore's debug logging included),
against the real MinIO: distinctive values are planted and the whole output is searched."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tests.integration.helpers import make_upload, open_uploads, policy_doc, run_cli, write_policy
from tests.support.minio import MinioServer

SESSION_TOKEN = "IQoJb3JpZ2luX2VjPLANTEDsessionTOKEN0123456789abcdef"
LILT_KEY = "lilt-PLANTED-api-key-5f0e1d"
SIGNATURE = re.compile(r"(?i)signature[=:]\s*[0-9a-f]{64}")


def leaks(text: str, *secrets: str) -> list[str]:
    found = [s for s in secrets if s in text]
    found += SIGNATURE.findall(text)
    return found


def test_a_verbose_cli_sweep_prints_no_secret(
    minio: MinioServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    make_upload(s3, bucket, "tmp/a", [10])
    time.sleep(1.5)
    doc = policy_doc(minio.endpoint, [bucket], match={"olderThan": "1s"})
    path = write_policy(tmp_path, doc)
    env = {**minio.env(), "LILT_API_KEY": LILT_KEY}

    done = run_cli("-v", "sweep", "-f", str(path), env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert open_uploads(s3, bucket) == set()  # the sweep really ran, signed requests and all
    assert "botocore" in done.stderr and "Authorization" in done.stderr  # debug output is on
    assert leaks(output, minio.access_key, minio.secret_key, LILT_KEY) == []

    # With a session token (MinIO refuses the made-up token, after botocore logged the request).
    with_token = run_cli(
        "-v", "sweep", "-f", str(path), env={**env, "AWS_SESSION_TOKEN": SESSION_TOKEN}
    )
    output = with_token.stdout + with_token.stderr
    assert "X-Amz-Security-Token" in output or "x-amz-security-token" in output.lower()
    assert leaks(output, minio.access_key, minio.secret_key, SESSION_TOKEN, LILT_KEY) == []
