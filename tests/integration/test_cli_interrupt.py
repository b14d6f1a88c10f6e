"""A stop order to `mpu-janitor sweep` (Ctrl-C, SIGTERM) on a real MinIO: no new abort after
the signal, aborts already sent are verified and counted, and the summary printed is the truth.

What the store really saw is counted by a small proxy between the CLI and MinIO
(tests/support/counting_proxy.py): every request with its upload id, arrival and answer time
on the test's monotonic clock. The signal's time is taken just before it is sent, so anything
the CLI did between the signal's delivery and its handler running counts against it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    last_json,
    make_upload,
    make_uploads,
    open_uploads,
    policy_doc,
    write_policy,
)
from tests.support.counting_proxy import CountingProxy
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

UPLOADS = 2000
CONCURRENCY = 64
SIGNAL_AFTER_ABORTS = 400  # mid-sweep: well after the start, well before the end
AGE = 3.5  # seconds that make an upload "old" for olderThan: 2s (1 s Date resolution)


PART = 1024  # one upload in ten holds one part of this size


def table_summary(stdout: str) -> dict[str, int]:
    """The counts of the table output's summary line."""
    line = [x for x in stdout.splitlines() if " scanned, " in x][-1]
    found = {
        word: count for count, word in re.findall(r"(\d+) (aborted|already gone|failed)", line)
    }
    freed = re.search(r"aborted, ([\d.]+) (B|KiB|MiB) freed", line)
    assert freed is not None, line
    scale = {"B": 1, "KiB": 1024, "MiB": 1024 * 1024}[freed.group(2)]
    return {
        "aborted": int(found["aborted"]),
        "alreadyGone": int(found["already gone"]),
        "failed": int(found["failed"]),
        "freedBytes": round(float(freed.group(1)) * scale),
    }


@pytest.mark.parametrize(
    ("signum", "output"),
    [(signal.SIGINT, "json"), (signal.SIGTERM, "table")],
    ids=["SIGINT-json", "SIGTERM-table"],
)
def test_a_stop_signal_sends_no_new_abort_and_prints_the_truth(
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
    signum: signal.Signals,
    output: str,
) -> None:
    keys = [f"stop/{n:05}.bin" for n in range(UPLOADS)]
    with ThreadPoolExecutor(16) as pool:
        with_parts = dict(
            zip(
                pool.map(lambda key: make_upload(s3, bucket, key, [PART]), keys[::10]),
                keys[::10],
                strict=True,
            )
        )
    ids = set(make_uploads(s3, bucket, [k for k in keys if k not in with_parts.values()], 32))
    ids |= set(with_parts)
    assert len(ids) == UPLOADS
    time.sleep(AGE)
    with CountingProxy(minio.endpoint) as proxy:
        doc = policy_doc(
            proxy.url,
            [bucket],
            limits={"concurrency": CONCURRENCY, "requestsPerSecond": 5000},
        )
        path = write_policy(tmp_path, doc)
        script = Path(sys.executable).parent / "mpu-janitor"
        cli = subprocess.Popen(
            [str(script), "sweep", "-f", str(path), "--output", output],
            env={**os.environ, **minio.env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 180  # a guard against a hang, not a measurement
            while proxy.aborts() < SIGNAL_AFTER_ABORTS:
                assert cli.poll() is None, cli.communicate()
                assert time.monotonic() < deadline, "the sweep never got going"
                time.sleep(0.002)
            signalled = time.monotonic()
            cli.send_signal(signum)
            stdout, stderr = cli.communicate(timeout=180)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        seen = proxy.requests

    # What the store saw around the signal.
    aborts_after = [r for r in seen if r.is_abort and r.received > signalled]
    started_before = {r.upload_id for r in seen if r.upload_id and r.received <= signalled}
    gone_before = {
        r.upload_id
        for r in seen
        if r.is_parts_listing and r.status == 404 and r.answered and r.answered <= signalled
    }
    in_flight = started_before - gone_before
    begun_after = {r.upload_id for r in seen if r.upload_id and r.received > signalled}
    begun_after -= started_before
    aborts = [r for r in seen if r.is_abort]
    left = {upload_id for _, upload_id in open_uploads(s3, bucket)}
    gone = ids - left
    print(
        f"\n{signum.name}: {UPLOADS} uploads, concurrency {CONCURRENCY}; aborts before the "
        f"signal {len(aborts) - len(aborts_after)}, after it {len(aborts_after)}; uploads in "
        f"flight at the signal {len(in_flight)}; uploads begun after it {len(begun_after)}; "
        f"gone from the store {len(gone)}; exit {cli.returncode}; printed {stdout[-300:]!r}"
    )
    assert cli.returncode == 130, stderr
    assert "stopping; no new abort is sent" in stderr
    if output == "json":
        summary = last_json(stdout)
        assert summary["reason"] == "SweepCancelled"
    else:
        summary = table_summary(stdout)
    # No new abort after the signal: only uploads already in flight may still be aborted,
    # and no upload is begun after it beyond the one each worker had already picked up.
    assert len(aborts_after) <= len(in_flight)
    assert {r.upload_id for r in aborts_after} <= in_flight
    assert len(aborts_after) <= CONCURRENCY
    assert len(begun_after) <= CONCURRENCY
    assert len(gone) < UPLOADS  # the signal did stop the sweep
    # Every abort sent was verified and counted; the printed counts are the store's truth.
    assert summary["aborted"] == len(gone) == len(aborts)
    assert summary["alreadyGone"] == 0 and summary["failed"] == 0
    assert summary["freedBytes"] == PART * len(gone & set(with_parts))
    # Each abort was proven: by a parts listing answering NoSuchUpload, or by a listing of the
    # bucket's uploads sent after the abort was answered (verification in bulk).
    bucket_listings = [r.received for r in seen if r.method == "GET" and r.upload_id is None]
    for upload_id in gone:
        (abort,) = (r for r in aborts if r.upload_id == upload_id and r.status == 204)
        by_parts = any(
            r.upload_id == upload_id and r.status == 404 for r in seen if r.method == "GET"
        )
        by_listing = abort.answered is not None and any(t > abort.answered for t in bucket_listings)
        assert by_parts or by_listing, upload_id
