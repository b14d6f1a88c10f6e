"""The scheduler under more due sweeps than slots (1,000 policies on one operator): sweeps wait
in the scheduler, not as threads polling for a slot, and a policy just applied, changed or
asked to sweep goes before the overdue periodic ones."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from mpu_janitor import scheduler as scheduler_module
from mpu_janitor.metrics import MetricsState
from mpu_janitor.scheduler import Scheduler
from tests.unit.test_scheduler import AMBIENT, S3, RecordingKube, body, fake_result


async def nothing(*_: Any) -> None:
    pass


def resumed(name: str) -> dict[str, Any]:
    """A policy an operator restart finds already swept, its next sweep overdue."""
    document = body(name, S3)
    document["status"] = {"observedGeneration": 1, "nextSweepTime": "2000-01-01T00:00:00Z"}
    return document


async def until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_due_sweeps_wait_in_the_scheduler_not_in_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = threading.Event()
    running: list[str] = []

    def sweep(policy: Any, store: Any, **_: Any) -> Any:
        running.append(policy.name)
        gate.wait(10)
        return fake_result(policy)

    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    sched = Scheduler(
        RecordingKube(), MetricsState(), nothing, max_parallel_sweeps=2, tenancy=AMBIENT
    )  # type: ignore[arg-type]
    for index in range(30):
        sched.upsert(resumed(f"p{index}"), initial=True)
    sched.start()
    try:
        await until(lambda: len(running) == 2)
        await asyncio.sleep(0.5)  # the loop ticks a few times meanwhile
        started = [e for e in sched.entries.values() if e.task is not None]
        # Two sweep in their slots, two more are ready to take a slot the moment one frees;
        # the other 26 wait in the scheduler, holding no thread.
        assert len(started) == 4
        assert sum(t.name.startswith("sweeps") for t in threading.enumerate()) <= 4
        gate.set()
        await until(lambda: len(running) == 30)
    finally:
        gate.set()
        await sched.stop()


async def test_a_new_policy_goes_before_overdue_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    done: list[str] = []

    def sweep(policy: Any, store: Any, **_: Any) -> Any:
        if policy.name == "blocker":
            gate.wait(10)
        done.append(policy.name)
        return fake_result(policy)

    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    sched = Scheduler(
        RecordingKube(), MetricsState(), nothing, max_parallel_sweeps=1, tenancy=AMBIENT
    )  # type: ignore[arg-type]
    sched.upsert(body("blocker", S3))
    sched.start()
    try:
        await until(lambda: sched.entries[("ns", "blocker")].sweeping)
        for index in range(20):
            sched.upsert(resumed(f"old{index}"), initial=True)
        await asyncio.sleep(0.3)
        sched.upsert(body("new", S3))  # applied while the overdue ones wait
        await asyncio.sleep(0.3)
        gate.set()
        await until(lambda: len(done) == 22)
    finally:
        gate.set()
        await sched.stop()
    # At most two overdue sweeps were handed out before "new" (the one waiting for the slot
    # when it arrived, and one started with it as the blocker ended); the others wait for it.
    assert done[0] == "blocker"
    assert done.index("new") <= 3, done
