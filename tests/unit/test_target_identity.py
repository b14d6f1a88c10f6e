"""One bucket or vault, one lock: target identity is normalised before the engine locks it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest

from mpu_janitor.policy import parse_policy
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import Pace, StoreCredentials, UploadPage, unpaced
from mpu_janitor.sweep import TargetLocks, run_sweep
from tests.support.fake_store import FakeStore

KEYS = StoreCredentials(access_key_id="AKIDEXAMPLE", secret_access_key="secret")


def policy_doc(store: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "store": store,
            "match": {"olderThan": "1d", "quietPeriod": "0s"},
            "limits": {"requestsPerSecond": 10000, "concurrency": 2},
        },
    }


def s3(endpoint: str | None = None, region: str = "us-east-1") -> dict[str, Any]:
    target: dict[str, Any] = {"buckets": ["media"], "region": region}
    if endpoint is not None:
        target["endpoint"] = endpoint
    return {"type": "S3", "s3": target}


def glacier(account: str = "-", region: str = "us-east-1", endpoint: str | None = None) -> Any:
    target: dict[str, Any] = {"vaults": ["media"], "region": region, "accountId": account}
    if endpoint is not None:
        target["endpoint"] = endpoint
    return {"type": "Glacier", "glacier": target}


def target_id(store: dict[str, Any]) -> str:
    opened = open_store(parse_policy(policy_doc(store)).store, KEYS)
    try:
        return opened.target_id
    finally:
        opened.close()


ONE_S3_TARGET = [
    s3("http://minio.storage:9000"),
    s3("http://MINIO.Storage:9000/"),
    s3("http://minio.storage:9000/", region="eu-west-1"),
]
ONE_DEFAULT_PORT_TARGET = [
    s3("https://ceph.example.com"),
    s3("https://ceph.example.com:443"),
    s3("https://Ceph.Example.COM:443/"),
]
ONE_AWS_BUCKET = [
    s3(None, region="us-east-1"),
    s3(None, region="eu-central-1"),
    s3("https://s3.eu-central-1.amazonaws.com"),
    s3("https://S3.amazonaws.com/"),
]
ONE_VAULT = [
    glacier("-"),
    glacier("111122223333"),
    glacier("-", region="US-EAST-1"),
    glacier("111122223333", endpoint="https://glacier.us-east-1.amazonaws.com/"),
]


@pytest.mark.parametrize(
    "spellings", [ONE_S3_TARGET, ONE_DEFAULT_PORT_TARGET, ONE_AWS_BUCKET, ONE_VAULT]
)
def test_spellings_of_one_target_have_one_identity(spellings: list[dict[str, Any]]) -> None:
    assert len({target_id(store) for store in spellings}) == 1


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (s3("http://minio.storage:9000"), s3("http://minio.storage:9001")),
        (s3("http://minio.storage:9000"), s3("http://other.storage:9000")),
        (s3("http://minio.storage"), s3("http://minio.storage:8080")),
        (s3(None), s3("http://minio.storage:9000")),
        (glacier(region="us-east-1"), glacier(region="eu-west-1")),
    ],
)
def test_different_targets_keep_different_identities(
    one: dict[str, Any], other: dict[str, Any]
) -> None:
    assert target_id(one) != target_id(other)


def test_two_policies_never_sweep_one_vault_at_once_whatever_the_spelling() -> None:
    locks = TargetLocks()
    active = 0
    overlap: list[int] = []
    guard = threading.Lock()

    class SlowStore(FakeStore):
        def list_uploads(
            self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
        ) -> Iterator[UploadPage]:
            nonlocal active
            with guard:
                active += 1
                overlap.append(active)
            time.sleep(0.3)
            yield from super().list_uploads(container, prefixes, pace)
            with guard:
                active -= 1

    pairs = [(glacier("-"), glacier("111122223333")), (s3(None), s3(None, region="eu-west-1"))]
    for one, other in pairs:
        stores = [SlowStore(target_id=target_id(one)), SlowStore(target_id=target_id(other))]
        for store in stores:
            store.add("k", age=timedelta(days=2), container="media")
        threads = [
            threading.Thread(
                target=run_sweep,
                args=(parse_policy(policy_doc(s3())), store),
                kwargs={"locks": locks},
            )
            for store in stores
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert overlap and max(overlap) == 1


def test_endpoint_normal_form() -> None:
    from mpu_janitor.stores.identity import normal_endpoint

    assert normal_endpoint("HTTP://Minio.Storage:80/") == "http://minio.storage"
    assert normal_endpoint("https://minio.storage:443") == "https://minio.storage"
    assert normal_endpoint("https://minio.storage:9000//") == "https://minio.storage:9000"
    assert normal_endpoint("http://[::1]:9000/") == "http://[::1]:9000"
    assert normal_endpoint("http://minio.storage./gateway/") == "http://minio.storage/gateway"
