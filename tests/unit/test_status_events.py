"""Every sweep's status patch comes back to the operator as a watch event: the replica that
wrote it skips it (no handler runs), anything else about a policy still reaches the scheduler."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf

from mpu_janitor.handlers import is_news
from mpu_janitor.metrics import MetricsState
from mpu_janitor.scheduler import Scheduler
from mpu_janitor.tenancy import Tenancy
from tests.unit.test_fairness import S3


class Kube:
    async def patch_policy_status(self, *_: Any) -> None:
        pass


async def post(*_: Any) -> None:
    pass


def policy() -> dict[str, Any]:
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {
            "name": "p",
            "namespace": "ns",
            "uid": "u-1",
            "generation": 1,
            "resourceVersion": "10",
            "labels": {"shard": "a"},
            "annotations": {},
        },
        "spec": copy.deepcopy(S3),
    }


def news(sched: Scheduler, body: dict[str, Any], type: str | None = "MODIFIED") -> bool:
    memo = kopf.Memo(scheduler=sched)
    return is_news(type=type, body=kopf.Body(body), memo=memo)  # type: ignore[arg-type]


async def test_a_status_only_change_is_no_news_to_the_active_replica() -> None:
    tenancy = Tenancy(ambient_namespaces=frozenset({"ns"}))
    sched = Scheduler(Kube(), MetricsState(), post, tenancy=tenancy)  # type: ignore[arg-type]
    sched.upsert(policy(), initial=True)
    sched.active = True
    written = policy()
    written["metadata"]["resourceVersion"] = "11"
    written["metadata"]["managedFields"] = [{"manager": "mpu-janitor"}]
    written["status"] = {"lastSweep": {"aborted": 3}}
    assert not news(sched, written)

    # Whatever the scheduler acts on is news.
    for change in (
        lambda b: b["metadata"].update(generation=2),
        lambda b: b["spec"].update(suspend=True),
        lambda b: b["metadata"]["labels"].update(shard="b"),
        lambda b: b["metadata"]["annotations"].update({"mpu-janitor.dev/sweep-now": "1"}),
        lambda b: b["metadata"].update(deletionTimestamp="2026-11-22T00:00:00Z"),
        lambda b: b["metadata"].update(uid="u-2"),
    ):
        changed = copy.deepcopy(written)
        change(changed)
        assert news(sched, changed)
    # Listings, deletions and policies the scheduler does not hold always are.
    assert news(sched, written, type=None) and news(sched, written, type="DELETED")
    stranger = copy.deepcopy(written)
    stranger["metadata"]["name"] = "q"
    assert news(sched, stranger)


async def test_a_standby_replica_follows_every_status_its_peer_writes() -> None:
    tenancy = Tenancy(ambient_namespaces=frozenset({"ns"}))
    sched = Scheduler(Kube(), MetricsState(), post, tenancy=tenancy)  # type: ignore[arg-type]
    sched.upsert(policy(), initial=True)
    sched.active = False
    await asyncio.sleep(0.05)  # the first status write (Ready) is sent: the writer is idle
    assert not sched.entries[("ns", "p")].writer.busy
    written = policy()
    written["status"] = {"totals": {"abortedUploads": 5}}
    assert news(sched, written)
    sched.upsert(written)
    assert sched.entries[("ns", "p")].status["totals"] == {"abortedUploads": 5}
