"""Opening a store is cheap: an operator opens one per sweep (1,000 policies on a 60 s interval
open 17 a second), so botocore's service models are read and parsed once per process, not once
per store."""

from __future__ import annotations

import botocore.loaders
import pytest

from mpu_janitor.stores.aws import client_config, make_client
from mpu_janitor.stores.base import StoreCredentials


def open_client(service: str = "s3") -> object:
    return make_client(
        service,
        region="us-east-1",
        endpoint="http://127.0.0.1:9",
        credentials=StoreCredentials("key", "secret"),
        observer=lambda operation, code: None,
        config=client_config("us-east-1"),
    )


def test_a_second_store_reads_no_model_file_again(monkeypatch: pytest.MonkeyPatch) -> None:
    open_client()  # the first store of the process may read the models
    reads: list[str] = []
    original = botocore.loaders.JSONFileLoader.load_file

    def counting(self: botocore.loaders.JSONFileLoader, file_path: str) -> object:
        reads.append(file_path)
        return original(self, file_path)

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", counting)
    first = open_client()
    second = open_client()
    assert reads == []
    # Still separate clients: each store keeps its own credentials and event hooks.
    assert first is not second
    assert first.meta.events is not second.meta.events  # type: ignore[attr-defined]
