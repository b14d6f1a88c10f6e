"""A namespace's request cap wraps the store: the wrapper must keep what the store can do,
such as proving many aborts gone with one listing (stores.base BulkVerifier)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from mpu_janitor.fairness import FairnessLimits, NamespaceCaps
from mpu_janitor.stores.base import Pace, unpaced


class Verifying:
    kind = "S3"
    target_id = "s3:test"

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def proven_gone(self, container: str, uploads: Sequence[Any], pace: Pace = unpaced) -> Any:
        self.asked.append((container, len(uploads)))
        return pace(lambda: "proof")


class Plain:
    kind = "LILT"
    target_id = "lilt:test"


def test_a_capped_store_still_proves_aborts_in_bulk_and_spends_its_tokens() -> None:
    caps = NamespaceCaps(FairnessLimits(namespace_max_requests_per_second=1000))
    inner = Verifying()
    store: Any = caps.paced(inner, "team", threading.Event())  # type: ignore[arg-type]
    assert callable(getattr(store, "proven_gone", None))
    assert store.proven_gone("bucket", [1, 2, 3]) == "proof"
    assert inner.asked == [("bucket", 3)]


def test_a_capped_store_without_bulk_proof_does_not_pretend_to_have_it() -> None:
    caps = NamespaceCaps(FairnessLimits(namespace_max_requests_per_second=1000))
    store: Any = caps.paced(Plain(), "team", threading.Event())  # type: ignore[arg-type]
    assert getattr(store, "proven_gone", None) is None
