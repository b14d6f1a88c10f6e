"""The operator's own listing after a watch starts over: policies deleted or relabelled out of
the shard while the watch was away are forgotten (their sweeps stopped), the others kept."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from mpu_janitor.handlers import OperatorConfig, Resync
from mpu_janitor.metrics import MetricsState
from mpu_janitor.scheduler import Scheduler
from mpu_janitor.selector import parse_selector
from mpu_janitor.tenancy import Tenancy
from tests.unit.test_fairness import policy_body


class ListingKube:
    """What the API server lists now, and how the operator asked for it."""

    def __init__(self, present: set[tuple[str, str]]) -> None:
        self.present = present
        self.asked: list[tuple[str | None, str | None]] = []
        self.patches: list[Any] = []

    async def list_policy_names(
        self, namespace: str | None = None, label_selector: str | None = None
    ) -> set[tuple[str, str]]:
        self.asked.append((namespace, label_selector))
        return {key for key in self.present if namespace is None or key[0] == namespace}

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        self.patches.append((name, status))


async def post(*_: Any) -> None:
    pass


def scheduler_with(kube: ListingKube, *keys: tuple[str, str]) -> Scheduler:
    tenancy = Tenancy(ambient_namespaces=frozenset({"a", "b"}))
    sched = Scheduler(kube, MetricsState(), post, tenancy=tenancy)  # type: ignore[arg-type]
    for namespace, name in keys:
        sched.upsert(policy_body(namespace, name), initial=True)
    return sched


async def test_policies_no_longer_listed_are_forgotten_and_their_sweeps_stopped() -> None:
    kube = ListingKube({("a", "stays"), ("b", "joined")})
    sched = scheduler_with(kube, ("a", "stays"), ("a", "left"), ("b", "deleted"))
    left = sched.entries[("a", "left")]
    config = OperatorConfig(selector=parse_selector("shard=one"))
    gone = await Resync(kube, sched, config).once()  # type: ignore[arg-type]
    assert sorted(gone) == [("a", "left"), ("b", "deleted")]
    assert set(sched.entries) == {("a", "stays")}
    assert left.deleted and left.cancel.is_set()  # a running sweep stops between uploads
    assert kube.asked == [(None, "shard=one")]  # the API server applies the shard's selector


async def test_a_policy_seen_after_the_listing_was_asked_for_is_kept() -> None:
    kube = ListingKube(set())
    sched = scheduler_with(kube, ("a", "old"))
    asked = time.monotonic()
    sched.upsert(policy_body("a", "new"))  # created while the listing was on its way
    assert sched.prune(set(), asked) == [("a", "old")]
    assert set(sched.entries) == {("a", "new")}


async def test_a_namespaced_operator_lists_each_of_its_namespaces() -> None:
    kube = ListingKube({("a", "p"), ("b", "q")})
    sched = scheduler_with(kube, ("a", "p"), ("b", "q"))
    config = OperatorConfig(namespaces=("a", "b"))
    assert await Resync(kube, sched, config).once() == []  # type: ignore[arg-type]
    assert sorted(kube.asked) == [("a", None), ("b", None)]
    assert set(sched.entries) == {("a", "p"), ("b", "q")}


def test_namespace_patterns_cannot_be_listed_by_name() -> None:
    sched_config = OperatorConfig(namespaces=("team-*",))
    assert not Resync(None, None, sched_config).possible  # type: ignore[arg-type]
    assert Resync(None, None, OperatorConfig(namespaces=("team-a",))).possible  # type: ignore[arg-type]
