"""Exclusion globs on real MinIO keys, through the CLI as a user runs it: literal [ ] * ? in
keys are protected by bracketed globs, ** crosses directories, and a key stored in decomposed
Unicode is protected by a glob written composed (and the reverse)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    last_json,
    make_upload,
    open_uploads,
    policy_doc,
    run_cli,
    write_policy,
)
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

AGE = 3.5  # older than the policy's olderThan of 2s on MinIO's 1 s Date clock

COMPOSED, DECOMPOSED = "caf\u00e9", "cafe\u0301"

# glob -> (keys it protects, similar keys it does not)
CASES = {
    "backup[[]*[]]/*": (["backup[1]/part", "backup[2024-01]/x"], ["backup1/part"]),
    "star[*]/*": (["star*/a"], ["starX/a"]),
    "why[?].bin": (["why?.bin"], ["whyX.bin"]),
    "deep/**.keep": (["deep/a/b/c.keep"], ["deep/a/b/c.kept"]),
    f"{COMPOSED}/*": ([f"{DECOMPOSED}/x", f"{COMPOSED}/x"], ["cafe/x"]),
    f"{DECOMPOSED}-y/*": ([f"{COMPOSED}-y/z"], ["cafe-y/z"]),
}


def test_excluded_keys_survive_a_sweep(
    minio: MinioServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    protected = {key for keys, _ in CASES.values() for key in keys}
    exposed = {key for _, keys in CASES.values() for key in keys}
    uploads = {key: make_upload(s3, bucket, key, [10]) for key in protected | exposed}
    listed = {key for key, _ in open_uploads(s3, bucket)}
    assert f"{DECOMPOSED}/x" in listed  # MinIO keeps the decomposed form as written
    time.sleep(AGE)
    doc = policy_doc(minio.endpoint, [bucket], match={"excludeKeyGlobs": list(CASES)})

    done = run_cli(
        "sweep", "-f", str(write_policy(tmp_path, doc)), "--output", "json", env=minio.env()
    )

    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert summary["aborted"] == len(exposed)
    assert open_uploads(s3, bucket) == {(key, uploads[key]) for key in protected}
