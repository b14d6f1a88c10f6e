"""The adaptive concurrency of a sweep (pacing.ConcurrencyLimit), driven by reported answer
times: no wall clock, every step deterministic."""

from __future__ import annotations

import threading

import pytest

from mpu_janitor.pacing import (
    BASELINE_WINDOW,
    START_CONCURRENCY,
    Cancelled,
    ConcurrencyLimit,
    Pacer,
)
from mpu_janitor.stores.base import Throttled

RTT = 0.1


def answers(limit: ConcurrencyLimit, latency: float, count: int) -> None:
    for _ in range(count):
        limit.observed(latency)


def test_it_starts_at_sixteen_or_the_cap_if_lower() -> None:
    assert ConcurrencyLimit(64).current == START_CONCURRENCY == 16
    assert ConcurrencyLimit(4).current == 4
    with pytest.raises(ValueError):
        ConcurrencyLimit(0)


def test_it_grows_to_the_cap_while_latency_holds_and_never_past_it() -> None:
    limit = ConcurrencyLimit(64)
    answers(limit, RTT, 16)  # one round trip of answers at the start
    assert limit.current == 32  # slow start: doubled
    answers(limit, RTT, 32)
    assert limit.current == 64
    answers(limit, RTT, 1000)
    assert limit.current == 64 and limit.decreases == 0


def test_rising_latency_backs_off_once_per_round_trip() -> None:
    limit = ConcurrencyLimit(64)
    answers(limit, RTT, 48)
    assert limit.current == 64
    # The store slows down (queueing): the recent latency passes twice the floor.
    answers(limit, 4 * RTT, 10)
    assert limit.current == int(64 * 0.8) == 51
    assert limit.decreases == 1  # not once per slow answer
    answers(limit, 4 * RTT, 51)  # another round trip still slow: one more step down
    assert limit.decreases == 2 and limit.current == int(64 * 0.8 * 0.8)
    assert not limit.slow_start


def test_rising_latency_never_takes_it_below_the_start_but_throttling_does() -> None:
    limit = ConcurrencyLimit(64)
    answers(limit, RTT, 100)
    answers(limit, 10 * RTT, 250)  # within the floor's two windows: still "slower than unloaded"
    assert limit.floor == RTT
    assert limit.current == START_CONCURRENCY  # what latency gave, latency takes back
    limit.throttled()
    assert limit.current == START_CONCURRENCY // 2
    limit = ConcurrencyLimit(4)
    answers(limit, 10 * RTT, 100)
    assert limit.current == 4


def test_after_backing_off_it_grows_by_one_per_round_trip() -> None:
    limit = ConcurrencyLimit(64)
    answers(limit, RTT, 20)
    answers(limit, 4 * RTT, 5)
    backed_off = limit.current
    answers(limit, RTT, 40)  # the recent average settles back near the floor
    settled = limit.limit
    answers(limit, RTT, int(settled))  # one round trip of answers
    assert int(limit.limit) == int(settled) + 1
    assert limit.current > backed_off - 1 and limit.current < 64


def test_throttling_halves_it_and_it_never_drops_below_one() -> None:
    limit = ConcurrencyLimit(32)
    answers(limit, RTT, 16)
    assert limit.current == 32
    limit.throttled()
    assert limit.current == 16
    for _ in range(20):
        answers(limit, RTT, limit.current)
        limit.throttled()
        answers(limit, 50 * RTT, limit.current)
    assert limit.current >= 1
    limit = ConcurrencyLimit(1, start=1)
    answers(limit, RTT, 1)
    limit.throttled()
    assert limit.current == 1


def test_the_floor_follows_a_slower_path_within_two_windows() -> None:
    limit = ConcurrencyLimit(64)
    answers(limit, RTT, BASELINE_WINDOW)
    # The path to the store now takes three times as long, for good (not load).
    answers(limit, 3 * RTT, 2 * BASELINE_WINDOW)
    assert limit.floor == 3 * RTT
    decreases, before = limit.decreases, limit.current
    answers(limit, 3 * RTT, 500)
    assert limit.decreases == decreases  # steady again: it grows back, one per round trip
    assert limit.current >= before + 500 // 64


def test_slots_are_held_up_to_the_limit() -> None:
    limit = ConcurrencyLimit(2, start=2)
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire()
    limit.release()
    assert limit.try_acquire()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        limit.acquire(cancel, poll=0.01)


def test_the_pacer_reports_answer_times_and_throttling_to_it() -> None:
    ticks = iter(x * 0.05 for x in range(1000))
    pacer = Pacer(10_000, clock=lambda: next(ticks))
    limit = ConcurrencyLimit(64)
    pacer.concurrency = limit
    waits: list[float] = []
    pacer.sleep = lambda seconds, cancellable=True: waits.append(seconds)  # type: ignore[method-assign]
    assert pacer.send(lambda: "ok") == "ok"
    assert limit.recent is not None and limit.current == 17
    pacer.send(lambda: "listing", timed=False)
    assert limit.current == 17  # listings do not steer it
    answers_left = [Throttled("SlowDown"), "ok"]

    def throttled_once() -> str:
        answer = answers_left.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    pacer.send(throttled_once)
    assert not limit.slow_start and len(waits) == 1
