"""`mpu-janitor sweep` on a real MinIO as a person at a terminal sees it (a pseudo-terminal):
the progress line moves while MinIO's single listing page is worked through, and is cleared
before the report; with pipes there is no progress at all."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import make_uploads, open_uploads, policy_doc, run_cli, write_policy
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

AGE = 3.5  # seconds that make an upload "old" for olderThan: 2s (Date has 1 s resolution)
UPLOADS = 40


def run_on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run the installed console script with stdout and stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    script = Path(sys.executable).parent / "mpu-janitor"
    process = subprocess.Popen(
        [str(script), *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        # A pseudo-terminal nobody sized (it reports 0 columns), as under `script` or in CI.
        env={**{k: v for k, v in os.environ.items() if k != "COLUMNS"}, **env},
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the process has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return process.wait(timeout=120), b"".join(chunks).decode()


def drawn_lines(output: str) -> list[str]:
    """Every state of the progress line, in order (each redraw starts with a carriage return)."""
    return [part.replace("\x1b[K", "") for part in output.split("\r")[1:]]


def test_progress_moves_during_one_listing_page(
    minio: MinioServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    make_uploads(s3, bucket, [f"tmp/{index:03}" for index in range(UPLOADS)])
    time.sleep(AGE)
    # Slow enough (a few store requests per upload at 20 a second) for a person to watch.
    doc = policy_doc(minio.endpoint, [bucket], limits={"requestsPerSecond": 20, "concurrency": 2})
    path = write_policy(tmp_path, doc)

    code, output = run_on_a_terminal("sweep", "-f", str(path), env=minio.env())
    assert code == 0, output
    lines = drawn_lines(output)
    counts = [
        int(match.group(1))
        for line in lines
        if (match := re.match(r"(\d+) measured, \d+ aborted, .* listing$", line))
    ]
    # MinIO answered with one page: the line still moved through it, several times.
    assert len({c for c in counts if 0 < c < UPLOADS}) >= 3, lines
    assert any(
        line.startswith(f"{UPLOADS}/{UPLOADS} measured, {UPLOADS} aborted") for line in lines
    )
    # The line is cleared, then the report is printed as usual.
    report = output.split("\r\x1b[K")[-1]
    assert report.lstrip("\r\n").startswith("BUCKET"), report
    assert f"{UPLOADS} aborted" in report
    assert not open_uploads(s3, bucket)


def test_no_progress_through_pipes(
    minio: MinioServer, s3: Any, bucket: str, tmp_path: Path
) -> None:
    make_uploads(s3, bucket, [f"tmp/{index:03}" for index in range(5)])
    time.sleep(AGE)
    path = write_policy(tmp_path, policy_doc(minio.endpoint, [bucket]))
    result = run_cli("sweep", "-f", str(path), env=minio.env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "\r" not in result.stdout and "\x1b" not in result.stdout
    assert result.stdout.startswith("BUCKET")
