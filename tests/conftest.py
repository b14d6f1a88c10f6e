"""Fixtures shared by the integration and e2e tiers: a real MinIO for the session, a fresh
bucket per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.ceph import CephCluster
from tests.support.minio import MinioServer

_bucket_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def minio() -> Iterator[MinioServer]:
    server = MinioServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """A fresh single-node Ceph (mon, memstore OSD, radosgw) for the session, stopped by PID."""
    cluster = CephCluster().start()
    print(f"\nCeph RGW ready {cluster.started_seconds:.1f}s after start ({cluster.endpoint})")
    yield cluster
    cluster.stop()


@pytest.fixture()
def s3(minio: MinioServer) -> Any:
    return minio.client()


@pytest.fixture()
def bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    name = f"t{next(_bucket_numbers)}-{request.node.name.lower().replace('_', '-')}"[:60]
    name = "".join(ch for ch in name if ch.isalnum() or ch == "-").strip("-")
    s3.create_bucket(Bucket=name)
    return name
