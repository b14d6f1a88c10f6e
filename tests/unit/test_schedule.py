"""The schedule state machine, transition by transition (times are plain numbers)."""

from __future__ import annotations

from mpu_janitor.schedule import Schedule, State


def test_a_new_schedule_is_parked_until_asked() -> None:
    schedule = Schedule()
    assert schedule.state is State.PARKED and schedule.due is None
    assert not schedule.is_due(1e9)
    schedule.request_now(10.0)
    assert schedule.is_due(10.0) and schedule.due == 10.0


def test_a_finished_sweep_waits_its_interval() -> None:
    schedule = Schedule()
    schedule.request_now(0.0)
    schedule.start()
    assert schedule.state is State.RUNNING and schedule.due is None
    assert not schedule.is_due(5.0)  # never due while it runs
    assert schedule.finish(now=5.0, delay=60.0) == 65.0
    schedule.end()
    assert not schedule.is_due(64.0) and schedule.is_due(65.0)


def test_a_request_during_a_sweep_is_due_when_it_ends() -> None:
    schedule = Schedule()
    schedule.start()
    schedule.request_now(3.0)
    assert not schedule.is_due(3.0)  # the running sweep goes on
    assert schedule.finish(now=5.0, delay=60.0) == 3.0
    assert schedule.is_due(5.0)


def test_a_stopped_sweep_is_due_again_only_when_asked() -> None:
    asked = Schedule()
    asked.start()
    asked.request_now(2.0)  # a new spec, or a peer's turn: stopped to sweep again
    asked.end()
    assert asked.is_due(2.0)
    stopped = Schedule()
    stopped.start()
    stopped.end()  # cancelled with nothing asked for (stopping)
    assert stopped.state is State.PARKED and not stopped.is_due(1e9)


def test_park_wins_over_a_running_sweep_and_its_end() -> None:
    schedule = Schedule()
    schedule.start()
    schedule.park()  # suspended (or made invalid) mid-sweep
    schedule.finish(now=5.0, delay=60.0)
    schedule.end()
    assert schedule.state is State.PARKED and schedule.due is None


def test_resume_never_schedules_in_the_past() -> None:
    schedule = Schedule()
    schedule.resume(now=100.0, wait=-30.0)
    assert schedule.due == 100.0 and schedule.is_due(100.0)
    schedule.resume(now=100.0, wait=30.0)
    assert not schedule.is_due(129.0) and schedule.is_due(130.0)
