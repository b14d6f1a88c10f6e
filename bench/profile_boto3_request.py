"""Where boto3's CPU goes in the sweep's hot calls (ListParts and AbortMultipartUpload).

Seeds a bucket of N uploads on a local MinIO (no added latency), then sends ListParts and
AbortMultipartUpload for each, one at a time: first unprofiled (CPU per request as it is), then
under cProfile with a CPU clock, to split a request's CPU into the HTTP exchange (urllib3 and
http.client, under botocore's ``URLLib3Session.send``), SigV4 signing (``add_auth``),
response parsing (``parsers.parse``) and the rest of botocore (events, validation,
serialisation, endpoint rules). cProfile inflates code made of many small calls, so read the
shares as rough. Then the same two calls through the store's lighter request path
(stores/s3_fast.py: botocore's signer, endpoint and HTTP session, no per-call machinery),
unprofiled: CPU per request on each path.

    PYTHONPATH=.:operator python bench/profile_boto3_request.py --uploads 300
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bench.bench_side_by_side import Bench

from mpu_janitor.stores import open_store, s3_fast
from mpu_janitor.stores.base import StoreCredentials, Upload
from tests.integration.helpers import policy_doc, to_policy


def hot_calls(s3: Any, bucket: str, uploads: list[tuple[str, str]]) -> float:
    """CPU seconds for ListParts then abort on each upload, serially."""
    started = time.process_time()
    for key, upload in uploads:
        s3.list_parts(Bucket=bucket, Key=key, UploadId=upload)
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
    return time.process_time() - started


def store_calls(store: Any, bucket: str, uploads: list[tuple[str, str]]) -> float:
    """CPU seconds for the store's own ListParts (measure) then abort on each upload."""
    started = time.process_time()
    for key, upload_id in uploads:
        upload = Upload(bucket, key, upload_id, datetime.now(UTC))
        store.measure(upload)
        store.abort(upload)
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=300, help="per half (default %(default)s)")
    args = parser.parse_args(argv)
    with Bench() as bench:
        bucket = bench.seed("profile", 4 * args.uploads)
        s3 = bench.minio.client()
        found = [
            (u["Key"], u["UploadId"])
            for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket)
            for u in page.get("Uploads", [])
        ]
        s3.list_parts(Bucket=bucket, Key=found[0][0], UploadId=found[0][1])  # warm the client
        plain = hot_calls(s3, bucket, found[: args.uploads])
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        hot_calls(s3, bucket, found[args.uploads : 2 * args.uploads])
        profile.disable()
        doc = policy_doc(bench.minio.endpoint, [bucket])
        keys = StoreCredentials(bench.minio.access_key, bench.minio.secret_key)
        per_path = {}
        for label, enabled, part in (
            ("store, botocore only", False, found[2 * args.uploads : 3 * args.uploads]),
            ("store, lighter path", True, found[3 * args.uploads :]),
        ):
            s3_fast.ENABLED = enabled
            store = open_store(to_policy(doc).store, keys)
            try:
                per_path[label] = store_calls(store, bucket, part)
            finally:
                store.close()
    stats: dict[Any, Any] = pstats.Stats(profile).stats

    def cumulative(match: Callable[[str, str], bool]) -> float:
        return sum(v[3] for (path, _, name), v in stats.items() if match(path, name))

    total = cumulative(lambda path, name: name == "_api_call")
    send = cumulative(lambda p, n: p.endswith("botocore/httpsession.py") and n == "send")
    sign = cumulative(lambda p, n: p.endswith("botocore/auth.py") and n == "add_auth")
    parse = cumulative(lambda p, n: p.endswith("botocore/parsers.py") and n == "parse")
    requests = 2 * args.uploads
    print(f"CPU per request, unprofiled: {1e3 * plain / requests:.2f} ms ({requests} requests)")
    print("shares of a request's CPU under cProfile:")
    for label, part in (
        ("HTTP exchange (urllib3, http.client)", send),
        ("SigV4 signing", sign),
        ("response parsing", parse),
        ("rest of botocore", total - send - sign - parse),
    ):
        print(f"  {label:<38}{100 * part / total:>4.0f} %")
    print("CPU per request through the store (ListParts and abort, unprofiled):")
    for label, seconds in per_path.items():
        print(f"  {label:<38}{1e3 * seconds / requests:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
