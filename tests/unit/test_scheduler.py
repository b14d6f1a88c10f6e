"""The scheduler's decisions, with the Kubernetes client replaced by a recorder."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from mpu_janitor import scheduler as scheduler_module
from mpu_janitor.kube import KubeError, NotFound
from mpu_janitor.metrics import MetricsState, new_registry
from mpu_janitor.scheduler import SWEEP_NOW_ANNOTATION, Scheduler
from mpu_janitor.sweep import SweepResult
from mpu_janitor.tenancy import Tenancy

# These policies use the operator's own identity: their namespace is listed for it.
AMBIENT = Tenancy(ambient_namespaces=frozenset({"ns"}))


class RecordingKube:
    """Status patches and Secrets; ``fail_patches`` makes the next patches fail like an
    API server that is briefly unreachable."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.secrets: dict[str, Mapping[str, Any]] = {}
        self.secret_error: Exception | None = None
        self.fail_patches = 0

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        if self.fail_patches:
            self.fail_patches -= 1
            raise KubeError(503, "the server is currently unable to handle the request")
        self.patches.append((name, dict(status)))

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any]:
        if self.secret_error is not None:
            raise self.secret_error
        if name not in self.secrets:
            raise NotFound(404, f'secrets "{name}" not found')
        return self.secrets[name]


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
        kinds.append(kind)

    kinds: list[str] = []

    sched = Scheduler(kube, MetricsState(), post, lilt_inventory_dir="/srv/lilt", tenancy=AMBIENT)  # type: ignore[arg-type]
    sched.event_kinds = kinds  # type: ignore[attr-defined]
    return sched, kube, events


def condition(status: Mapping[str, Any], kind: str = "Ready") -> dict[str, Any]:
    for item in status.get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return {}


def last_status(kube: RecordingKube, name: str) -> dict[str, Any]:
    """What the policy's status is after every patch so far (merge patches, in order)."""
    merged: dict[str, Any] = {}
    for patched, status in kube.patches:
        if patched == name:
            merged.update(status)
    return merged


def metrics_text(sched: Scheduler) -> str:
    return generate_latest(new_registry(sched.metrics)).decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one series of ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


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
    lilt["store"]["lilt"]["inventoryPath"] = "/srv/lilt/ns/inventory.jsonl"
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
    entry.schedule.start()  # its sweep runs
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

    sched = Scheduler(kube, MetricsState(), post, is_active=never_active, tenancy=AMBIENT)  # type: ignore[arg-type]
    sched.upsert(body("p", S3))
    sched.start()
    await asyncio.sleep(1.0)
    await sched.stop()
    entry = sched.entries[("ns", "p")]
    assert entry.task is None  # never swept
    assert entry.due is not None  # still due, for when this replica becomes the active one
    assert len(asked) == 1  # one look, then a pause instead of a busy loop


# -- every failure surfaced: status, a Warning Event and a metric -----------------------------


async def sweep_now(sched: Scheduler, name: str) -> None:
    """Run the policy's sweep the way the loop does, and wait for its reports."""
    entry = sched.entries[("ns", name)]
    await sched._sweep(entry)
    await settle(sched)


async def test_a_store_that_cannot_be_opened_is_surfaced_everywhere() -> None:
    sched, kube, events = await scheduler()
    spec = {**S3, "store": {"type": "S3", "s3": {"region": "us east 1", "buckets": ["b-1"]}}}
    sched.upsert(body("bad-region", spec))
    await sweep_now(sched, "bad-region")
    status = last_status(kube, "bad-region")
    ready = condition(status)
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "us east 1" in ready["message"]
    assert condition(status, "Stalled")["status"] == "True"
    assert ("InvalidSpec", ready["message"]) in events
    assert "Warning" in sched.event_kinds  # type: ignore[attr-defined]
    text = metrics_text(sched)
    assert (
        sample(text, "mpu_janitor_sweep_errors_total", policy="bad-region", reason="InvalidSpec")
        == 1
    )
    assert sample(text, "mpu_janitor_policy_ready", policy="bad-region", reason="InvalidSpec") == 0


async def test_an_unexpected_error_in_a_sweep_is_surfaced_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(*_: Any, **__: Any) -> SweepResult:
        raise RuntimeError("the engine tripped")

    monkeypatch.setattr(scheduler_module, "run_sweep", explode)
    sched, kube, events = await scheduler()
    sched.upsert(body("p", S3))
    await sweep_now(sched, "p")
    ready = condition(last_status(kube, "p"))
    assert (ready["status"], ready["reason"]) == ("False", "InternalError")
    assert "the engine tripped" in ready["message"]
    assert [reason for reason, _ in events][-1] == "InternalError"
    text = metrics_text(sched)
    assert sample(text, "mpu_janitor_sweep_errors_total", policy="p", reason="InternalError") == 1
    assert sched.entries[("ns", "p")].due is not None  # tried again later


async def test_a_missing_secret_is_stalled_and_announced_once() -> None:
    sched, kube, events = await scheduler()
    sched.upsert(
        body("p", {**S3, "store": {**S3["store"], "credentialsSecretRef": {"name": "gone"}}})
    )
    await sweep_now(sched, "p")
    await sweep_now(sched, "p")  # the retry a minute later finds it still missing
    status = last_status(kube, "p")
    assert condition(status)["reason"] == "CredentialsNotFound"
    assert condition(status, "Stalled")["status"] == "True"
    assert [reason for reason, _ in events].count("CredentialsNotFound") == 1
    text = metrics_text(sched)
    assert (
        sample(text, "mpu_janitor_sweep_errors_total", policy="p", reason="CredentialsNotFound")
        == 2
    )
    assert sample(text, "mpu_janitor_policy_ready", policy="p", reason="CredentialsNotFound") == 0


async def test_an_unreadable_secret_is_surfaced_not_only_logged() -> None:
    sched, kube, events = await scheduler()
    kube.secret_error = KubeError(500, "etcdserver: request timed out")
    sched.upsert(body("p", {**S3, "store": {**S3["store"], "credentialsSecretRef": {"name": "c"}}}))
    await sweep_now(sched, "p")
    ready = condition(last_status(kube, "p"))
    assert (ready["status"], ready["reason"]) == ("False", "CredentialsUnreadable")
    assert "etcdserver" in ready["message"]
    assert events and events[-1][0] == "CredentialsUnreadable"
    assert not condition(last_status(kube, "p"), "Stalled")  # transient: not stalled
    text = metrics_text(sched)
    assert (
        sample(text, "mpu_janitor_sweep_errors_total", policy="p", reason="CredentialsUnreadable")
        == 1
    )


async def test_an_invalid_policy_has_series_from_the_moment_it_is_seen() -> None:
    sched, kube, _ = await scheduler()
    sched.upsert(body("bad", {**S3, "match": {"olderThan": "soon"}}))
    text = metrics_text(sched)
    assert sample(text, "mpu_janitor_policy_ready", policy="bad", reason="InvalidSpec") == 0
    assert sample(text, "mpu_janitor_sweep_errors_total", policy="bad", reason="InvalidSpec") == 1
    await settle(sched)
    assert condition(last_status(kube, "bad"), "Stalled")["status"] == "True"


async def test_the_loop_survives_a_dropped_connection_in_the_peering_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    swept: list[str] = []

    def fake_sweep(policy: Any, store: Any, **_: Any) -> SweepResult:
        swept.append(policy.name)
        return SweepResult("ns", policy.name, "S3", False, datetime.now(UTC), datetime.now(UTC))

    monkeypatch.setattr(scheduler_module, "run_sweep", fake_sweep)
    asked: list[int] = []

    async def flaky() -> bool:
        asked.append(1)
        if len(asked) == 1:
            raise aiohttp.ServerDisconnectedError()
        return True

    sched, _, _ = await scheduler()
    sched.is_active = flaky
    monkeypatch.setattr(scheduler_module, "STANDBY_RECHECK_SECONDS", 0.05)
    sched.upsert(body("p", S3))
    sched.start()
    for _ in range(100):
        if swept:
            break
        await asyncio.sleep(0.05)
    loop_alive = sched._loop_task is not None and not sched._loop_task.done()
    await sched.stop()
    assert loop_alive and swept == ["p"]


# -- conditions, events, and nothing lost -----------------------------------------------------


def fake_result(policy: Any, freed: int = 0, **kwargs: Any) -> SweepResult:
    from mpu_janitor.sweep import BucketStats

    now = datetime.now(UTC)
    stats = BucketStats(listed=True, aborted=1 if freed else 0, freed_bytes=freed)
    return SweepResult("ns", policy.name, "S3", False, now, now, buckets={"b-1": stats}, **kwargs)


async def test_first_sight_and_each_spec_change_read_sweeping() -> None:
    sched, kube, events = await scheduler()
    sched.upsert(body("p", S3))
    await settle(sched)
    ready = condition(last_status(kube, "p"))
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "Unknown",
        "Sweeping",
        1,
    )
    sched.upsert(body("p", {**S3, "match": {"olderThan": "2d"}}, generation=2))
    await settle(sched)
    status = last_status(kube, "p")
    assert condition(status)["reason"] == "Sweeping"
    assert status["observedGeneration"] == condition(status)["observedGeneration"] == 2
    assert events == []  # Sweeping is no news


async def test_suspended_says_so_without_reading_broken() -> None:
    sched, kube, _ = await scheduler()
    sched.upsert(body("p", {**S3, "suspend": True}))
    await settle(sched)
    status = last_status(kube, "p")
    assert (condition(status)["status"], condition(status)["reason"]) == ("True", "Suspended")
    assert not condition(status, "Stalled")
    text = metrics_text(sched)
    assert sample(text, "mpu_janitor_policy_ready", policy="p", reason="Suspended") == 1


async def test_events_on_change_not_a_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    freed = [0, 0, 10, 0]
    monkeypatch.setattr(
        scheduler_module, "run_sweep", lambda policy, store, **_: fake_result(policy, freed.pop(0))
    )
    sched, kube, events = await scheduler()
    sched.upsert(body("p", S3))
    for _ in range(4):
        await sweep_now(sched, "p")
    # Ready changed on the first sweep, the third aborted something; the others are silent.
    assert [reason for reason, _ in events] == ["SweepSucceeded", "SweepSucceeded"]
    status = last_status(kube, "p")
    assert status["lastSuccessfulSweepTime"] == status["lastSweep"]["completionTime"]


async def test_a_long_sweep_checkpoints_its_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    def sweep(policy: Any, store: Any, *, progress: Any, **_: Any) -> SweepResult:
        partial = fake_result(policy, 40)
        partial.finished = None
        progress(partial)
        time.sleep(0.2)  # the checkpoint reaches the API while the sweep goes on
        seen.extend(p for _, p in kube.patches)
        return fake_result(policy, 100)

    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    monkeypatch.setattr(scheduler_module, "PROGRESS_SECONDS", 0.0)
    sched, kube, _ = await scheduler()
    sched.upsert(body("p", S3))
    await sweep_now(sched, "p")
    checkpoints = [p for p in seen if "lastSweep" in p]
    assert checkpoints and checkpoints[0]["totals"] == {
        "abortedUploads": 1,
        "freedBytes": 40,
        "freed": "40",
    }
    assert checkpoints[0]["lastSweep"]["completionTime"] is None
    assert last_status(kube, "p")["totals"] == {
        "abortedUploads": 1,
        "freedBytes": 100,
        "freed": "100",
    }


async def test_a_failed_status_patch_is_retried_and_its_totals_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    freed = [100, 50]
    monkeypatch.setattr(
        scheduler_module, "run_sweep", lambda policy, store, **_: fake_result(policy, freed.pop(0))
    )
    sched, kube, _ = await scheduler()
    sched.upsert(body("p", S3))
    await settle(sched)
    sched.entries[("ns", "p")].writer.retry_delays = (0.01,)
    kube.fail_patches = 2
    await sweep_now(sched, "p")
    assert last_status(kube, "p")["totals"] == {
        "abortedUploads": 1,
        "freedBytes": 100,
        "freed": "100",
    }
    await sweep_now(sched, "p")
    assert last_status(kube, "p")["totals"] == {
        "abortedUploads": 2,
        "freedBytes": 150,
        "freed": "150",
    }


async def test_a_standby_adopts_the_status_its_peer_writes() -> None:
    sched, _, _ = await scheduler()
    first = body("p", S3)
    first["status"] = {"observedGeneration": 1, "totals": {"abortedUploads": 1, "freedBytes": 9}}
    sched.upsert(first, initial=True)
    peer = body("p", S3)
    peer["status"] = {
        "observedGeneration": 1,
        "totals": {"abortedUploads": 7, "freedBytes": 700},
        "handledSweepNow": "5",
    }
    sched.upsert(peer)
    entry = sched.entries[("ns", "p")]
    assert entry.status["totals"] == {"abortedUploads": 7, "freedBytes": 700}
    assert entry.handled_sweep_now == "5"


async def test_sweep_now_is_recorded_even_when_its_sweep_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(*_: Any, **__: Any) -> SweepResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(scheduler_module, "run_sweep", explode)
    sched, kube, _ = await scheduler()
    sched.upsert(body("p", S3, annotations={SWEEP_NOW_ANNOTATION: "1"}))
    await sweep_now(sched, "p")
    assert last_status(kube, "p")["handledSweepNow"] == "1"


async def test_a_second_request_during_a_sweep_gets_its_own_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    started: list[str] = []

    def sweep(policy: Any, store: Any, **_: Any) -> SweepResult:
        started.append(policy.name)
        release.wait(10)
        return fake_result(policy)

    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    sched, kube, _ = await scheduler()
    sched.upsert(body("p", S3, annotations={SWEEP_NOW_ANNOTATION: "1"}))
    entry = sched.entries[("ns", "p")]
    entry.request_for_next = "1"
    entry.task = asyncio.create_task(sched._sweep(entry))
    for _ in range(500):
        if started:
            break
        await asyncio.sleep(0.01)
    sched.upsert(body("p", S3, annotations={SWEEP_NOW_ANNOTATION: "2"}))
    release.set()
    await entry.task
    await settle(sched)
    # The first sweep answers request 1 only; request 2 is still due.
    assert last_status(kube, "p")["handledSweepNow"] == "1"
    assert entry.due is not None and entry.due <= time.monotonic()
    await sweep_now(sched, "p")
    assert last_status(kube, "p")["handledSweepNow"] == "2"


async def test_a_suspend_racing_the_end_of_a_sweep_stays_suspended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder: list[Scheduler] = []

    def sweep(policy: Any, store: Any, **_: Any) -> SweepResult:
        # The suspend arrives while the last upload is being aborted: too late to cancel.
        sched = holder[0]
        future = asyncio.run_coroutine_threadsafe(suspend(sched), loop)
        future.result()
        return fake_result(policy, 10)

    async def suspend(sched: Scheduler) -> None:
        sched.upsert(body("p", {**S3, "suspend": True}, generation=2))

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    sched, kube, _ = await scheduler()
    holder.append(sched)
    sched.upsert(body("p", S3))
    await sweep_now(sched, "p")
    status = last_status(kube, "p")
    assert condition(status)["reason"] == "Suspended"
    assert status["totals"]["freedBytes"] == 10  # what it did still counts


async def test_a_policy_waiting_for_a_busy_target_holds_no_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    done: list[str] = []

    def sweep(policy: Any, store: Any, *, cancel: Any, locks: Any, **_: Any) -> SweepResult:
        bucket = policy.store.s3.buckets[0]
        with locks.hold(f"target|{bucket}", cancel):
            done.append(policy.name)
        return fake_result(policy)

    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    kube = RecordingKube()

    async def post(*_: Any) -> None:
        pass

    sched = Scheduler(kube, MetricsState(), post, max_parallel_sweeps=2, tenancy=AMBIENT)  # type: ignore[arg-type]
    shared = {"store": {"type": "S3", "s3": {"buckets": ["shared"]}}, "match": {"olderThan": "1d"}}
    other = {"store": {"type": "S3", "s3": {"buckets": ["other"]}}, "match": {"olderThan": "1d"}}
    busy = threading.Event()
    with sched.locks.hold("target|shared", busy):  # another sweep holds the shared bucket
        for index in range(4):
            sched.upsert(body(f"shared-{index}", shared))
        sched.upsert(body("elsewhere", other))
        sched.start()
        for _ in range(200):
            if "elsewhere" in done:
                break
            await asyncio.sleep(0.02)
        assert done == ["elsewhere"]
    for _ in range(200):
        if len(done) == 5:
            break
        await asyncio.sleep(0.02)
    await sched.stop()
    assert sorted(done) == ["elsewhere", "shared-0", "shared-1", "shared-2", "shared-3"]


async def test_stop_ends_the_loop_even_when_a_wakeup_races_the_cancellation() -> None:
    """On Python 3.11, asyncio.wait_for swallows a cancellation that arrives as its inner wait
    completes: a sweep setting the wakeup just as the operator stops must not keep the loop
    (and the stop) going forever."""
    kube = RecordingKube()

    async def post(*_: Any) -> None:
        pass

    for _ in range(20):
        sched = Scheduler(kube, MetricsState(), post)  # type: ignore[arg-type]
        sched.start()
        await asyncio.sleep(0.01)  # the loop waits for its wakeup
        sched._wakeup.set()  # the inner wait completes...
        stopping = asyncio.ensure_future(sched.stop())  # ...as the cancellation arrives
        done, _ = await asyncio.wait({stopping}, timeout=15)
        assert done, "stop() never returned: the scheduler loop outlived its cancellation"
