"""Fixtures of the reliability tier: the real MinIO of the session (tests/conftest.py) behind
an HTTP fault layer or behind the real toxiproxy, and a report of what every run did."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fault_proxy import FaultProxy
from tests.support.minio import MinioServer
from tests.support.toxiproxy import Proxy, Toxiproxy


@pytest.fixture()
def fault_proxy(minio: MinioServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(minio.endpoint, fraction=0.10, seed=20261122).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def toxiproxy_server() -> Iterator[Toxiproxy]:
    server = Toxiproxy().start()
    yield server
    server.stop()


@pytest.fixture()
def toxic_proxy(
    toxiproxy_server: Toxiproxy, minio: MinioServer, request: pytest.FixtureRequest
) -> Iterator[Proxy]:
    name = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:60]
    proxy = toxiproxy_server.proxy(name, f"127.0.0.1:{minio.port}")
    yield proxy
    toxiproxy_server.request("DELETE", f"/proxies/{proxy.name}")


@pytest.fixture()
def report(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """What a run did (fault counts, sweep summaries): printed, and appended as one JSON line
    to $MPU_JANITOR_RELIABILITY_REPORT when set."""
    data: dict[str, Any] = {"test": request.node.nodeid}
    yield data
    line = json.dumps(data, sort_keys=True)
    print(line)
    path = os.environ.get("MPU_JANITOR_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
