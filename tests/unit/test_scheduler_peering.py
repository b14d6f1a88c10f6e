"""Peering and the scheduler: one sweeper at a time. A replica outranked mid-sweep stops its
sweep between uploads (and keeps the policy due for when it is the active one again); a replica
that just became the active one waits a handover period before its first sweep, so the one it
replaces has stopped; a peering object it cannot read never stops a running sweep."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from mpu_janitor import scheduler as scheduler_module
from mpu_janitor.metrics import MetricsState
from mpu_janitor.scheduler import Scheduler
from mpu_janitor.sweep import SweepResult
from tests.unit.test_scheduler import AMBIENT, S3, RecordingKube, body, fake_result, last_status


class Peering:
    """What the peering object says: active, outranked, or unreadable (raises)."""

    def __init__(self, answer: bool | Exception = True) -> None:
        self.answer = answer
        self.looks: list[float] = []

    async def __call__(self) -> bool:
        self.looks.append(time.monotonic())
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class SlowSweep:
    """A sweep of many uploads: one every 10 ms until cancelled or released."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.cancelled = 0
        self.release = threading.Event()

    def __call__(self, policy: Any, store: Any, *, cancel: Any, **_: Any) -> SweepResult:
        self.started.append(time.monotonic())
        aborted = 0
        while not cancel.is_set() and not self.release.is_set():
            time.sleep(0.01)
            aborted += 1
        result = fake_result(policy, aborted, cancelled=cancel.is_set())
        self.cancelled += cancel.is_set()
        return result


def make(peering: Peering, *, peered: bool = False) -> tuple[Scheduler, RecordingKube]:
    kube = RecordingKube()

    async def post(obj: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        pass

    sched = Scheduler(
        kube,  # type: ignore[arg-type]
        MetricsState(),
        post,
        is_active=peering,
        tenancy=AMBIENT,
        peered=peered,
    )
    return sched, kube


async def until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


@pytest.fixture(autouse=True)
def quick_rechecks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "STANDBY_RECHECK_SECONDS", 0.05)


async def test_an_outranked_replica_stops_its_sweep_and_keeps_the_policy_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sweep = SlowSweep()
    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    peering = Peering(True)
    sched, kube = make(peering)
    sched.upsert(body("p", S3))
    sched.start()
    try:
        await until(lambda: sweep.started)
        peering.answer = False  # a peer with a higher priority joined
        await until(lambda: sweep.cancelled == 1)
        entry = sched.entries[("ns", "p")]
        await until(lambda: not entry.sweeping)
        await asyncio.sleep(0.2)
        assert len(sweep.started) == 1  # no new sweep while outranked
        assert entry.due is not None  # still due, for when this replica is active again
        # What it did before it stopped still counts.
        assert last_status(kube, "p")["totals"]["freedBytes"] > 0
        sweep.release.set()
        peering.answer = True  # the peer went away
        await until(lambda: len(sweep.started) == 2)
    finally:
        await sched.stop()


async def test_a_replica_that_becomes_active_waits_a_handover_before_sweeping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sweep = SlowSweep()
    sweep.release.set()
    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    monkeypatch.setattr(scheduler_module, "HANDOVER_SECONDS", 0.5)
    peering = Peering(True)
    sched, _ = make(peering, peered=True)
    sched.upsert(body("p", S3))
    sched.start()
    try:
        await until(lambda: sweep.started)
    finally:
        await sched.stop()
    # The first look said "active"; the sweep waited the handover from that look on.
    assert sweep.started[0] - peering.looks[0] >= 0.5
    assert len(peering.looks) >= 2  # and it looked again before it swept


async def test_an_unreadable_peering_never_stops_a_running_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sweep = SlowSweep()
    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    peering = Peering(True)
    sched, kube = make(peering)
    sched.upsert(body("p", S3))
    sched.start()
    try:
        await until(lambda: sweep.started)
        peering.answer = ConnectionResetError("the API server restarts")
        await asyncio.sleep(0.3)  # several rechecks
        sweep.release.set()
        entry = sched.entries[("ns", "p")]
        await until(lambda: not entry.sweeping)
    finally:
        await sched.stop()
    assert sweep.cancelled == 0
    assert last_status(kube, "p")["lastSweep"]["completionTime"]
