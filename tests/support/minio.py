"""A real MinIO server on 127.0.0.1 (built from the Go module proxy) for integration tests."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Self

from tests.support.controlplane import ManagedProcess, ensure_binaries, free_port, wait_for
from tests.support.s3_access import S3Access

ROOT_USER = "janitor-admin"


class MinioServer(S3Access):
    """One MinIO process with its own data directory, stopped by PID."""

    def __init__(self) -> None:
        self.binary = ensure_binaries(["minio"])["minio"]
        self.workdir = Path(tempfile.mkdtemp(prefix="mpu-janitor-minio-"))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = ROOT_USER
        self.secret_key = secrets.token_hex(16)
        self.process: ManagedProcess | None = None

    def start(self) -> Self:
        env = dict(os.environ)
        env.update(
            MINIO_ROOT_USER=self.access_key,
            MINIO_ROOT_PASSWORD=self.secret_key,
            MINIO_BROWSER="off",
            MINIO_UPDATE="off",
            MINIO_CI_CD="1",
        )
        data = self.workdir / "data"
        data.mkdir()
        self.process = ManagedProcess(
            "minio",
            [
                str(self.binary),
                "server",
                str(data),
                "--address",
                f"127.0.0.1:{self.port}",
                "--console-address",
                f"127.0.0.1:{free_port()}",
                *self.extra_args(),
                "--quiet",
            ],
            self.workdir / "minio.log",
            env,
        )
        wait_for(self._ready, timeout=60, what=f"MinIO ready at {self.endpoint}")
        return self

    def extra_args(self) -> list[str]:
        """More `minio server` arguments (a subclass's, e.g. --certs-dir)."""
        return []

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.running():
            raise RuntimeError(f"MinIO exited:\n{self.process.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
