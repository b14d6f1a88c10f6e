"""The scheduler's decisions, with the Kubernetes client replaced by a recorder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from mpu_janitor.metrics import MetricsState
from mpu_janitor.scheduler import SWEEP_NOW_ANNOTATION, Scheduler


class RecordingKube:
    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        self.patches.append((name, dict(status)))


def body(
    name: str, spec: dict[str, Any], generation: int = 1, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "generation": generation,
            "annotations": annotations or {},
        },
        "spec": spec,
    }


S3 = {"store": {"type": "S3", "s3": {"buckets": ["b-1"]}}, "match": {"olderThan": "1d"}}


async def scheduler() -> tuple[Scheduler, RecordingKube, list[tuple[str, str]]]:
    kube = RecordingKube()
    events: list[tuple[str, str]] = []

    async def post(obj: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        events.append((reason, message))

    sched = Scheduler(kube, MetricsState(), post, lilt_inventory_dir="/srv/lilt")  # type: ignore[arg-type]
    return sched, kube, events


async def settle(sched: Scheduler) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    if sched._side_tasks:
        await asyncio.wait(sched._side_tasks)


async def test_invalid_spec_is_reported_with_the_field_and_never_scheduled() -> None:
    sched, kube, events = await scheduler()
    sched.upsert(body("bad", {**S3, "match": {"olderThan": "soon"}}))
    await settle(sched)
    entry = sched.entries[("ns", "bad")]
    assert entry.due is None and entry.policy is None
    name, status = kube.patches[-1]
    assert name == "bad"
    condition = status["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
    assert condition["message"].startswith("spec.match.olderThan:")
    assert events == [("InvalidSpec", condition["message"])]


async def test_lilt_inventory_must_be_under_the_operators_directory() -> None:
    sched, kube, _ = await scheduler()
    lilt = {"store": {"type": "LILT", "lilt": {"inventoryPath": ""}}, "match": {"olderThan": "1d"}}
    for name, path in [("escape", "/srv/lilt/../etc/passwd"), ("elsewhere", "/tmp/inv.jsonl")]:
        lilt["store"]["lilt"]["inventoryPath"] = path
        sched.upsert(body(name, lilt))
    lilt["store"]["lilt"]["inventoryPath"] = "/srv/lilt/team-a/inventory.jsonl"
    sched.upsert(body("inside", lilt))
    await settle(sched)
    assert sched.entries[("ns", "escape")].policy is None
    assert sched.entries[("ns", "elsewhere")].policy is None
    assert sched.entries[("ns", "inside")].policy is not None
    messages = {name: s["conditions"][0]["message"] for name, s in kube.patches}
    assert "spec.store.lilt.inventoryPath" in messages["escape"]
    assert "/srv/lilt" in messages["elsewhere"]


async def test_suspend_and_sweep_now() -> None:
    sched, kube, _ = await scheduler()
    sched.upsert(body("p", S3), initial=True)
    entry = sched.entries[("ns", "p")]
    assert entry.due is not None  # a new policy sweeps at once
    sched.upsert(body("p", {**S3, "suspend": True}, generation=2))
    await settle(sched)
    assert entry.due is None
    assert kube.patches[-1][1]["conditions"][0]["reason"] == "Suspended"
    # A sweep request on a suspended policy does nothing.
    sched.upsert(
        body("p", {**S3, "suspend": True}, generation=2, annotations={SWEEP_NOW_ANNOTATION: "1"})
    )
    assert entry.due is None
    # Resumed; the same request value again is not a new request, a new value is.
    sched.upsert(body("p", S3, generation=3, annotations={SWEEP_NOW_ANNOTATION: "1"}))
    entry.due = None
    sched.upsert(body("p", S3, generation=3, annotations={SWEEP_NOW_ANNOTATION: "1"}))
    assert entry.due is None
    sched.upsert(body("p", S3, generation=3, annotations={SWEEP_NOW_ANNOTATION: "2"}))
    assert entry.due is not None and entry.handled_sweep_now == "2"


async def test_a_restart_resumes_the_published_schedule() -> None:
    sched, _, _ = await scheduler()
    restarted = body("p", S3)
    restarted["status"] = {
        "observedGeneration": 1,
        "nextSweepTime": "2999-01-01T00:00:00Z",
        "handledSweepNow": "7",
    }
    restarted["metadata"]["annotations"] = {SWEEP_NOW_ANNOTATION: "7"}
    now = time.monotonic()
    sched.upsert(restarted, initial=True)
    entry = sched.entries[("ns", "p")]
    # Not swept at once (the next sweep was published for later; the request was handled),
    # and never later than one interval from now.
    assert entry.due is not None
    assert 0.9 * 3600 <= entry.due - now <= 1.1 * 3600
    assert entry.handled_sweep_now == "7"


async def test_delete_forgets_the_policy() -> None:
    sched, _, _ = await scheduler()
    sched.upsert(body("p", S3))
    sched.metrics.register_policy(sched.entries[("ns", "p")].policy)  # type: ignore[arg-type]
    entry = sched.entries[("ns", "p")]
    sched.remove("ns", "p")
    assert ("ns", "p") not in sched.entries
    assert entry.cancel.is_set() and entry.deleted
    assert not sched.metrics._policies


async def test_a_standby_replica_neither_sweeps_nor_spins() -> None:
    kube = RecordingKube()
    asked: list[float] = []

    async def never_active() -> bool:
        asked.append(time.monotonic())
        return False

    async def post(*_: Any) -> None:
        pass

    sched = Scheduler(kube, MetricsState(), post, is_active=never_active)  # type: ignore[arg-type]
    sched.upsert(body("p", S3))
    sched.start()
    await asyncio.sleep(1.0)
    await sched.stop()
    entry = sched.entries[("ns", "p")]
    assert entry.task is None  # never swept
    assert entry.due is not None  # still due, for when this replica becomes the active one
    assert len(asked) == 1  # one look, then a pause instead of a busy loop
