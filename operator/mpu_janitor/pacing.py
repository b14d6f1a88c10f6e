"""Request pacing for one sweep: a thread-safe token bucket that slows down when the store
throttles (503 SlowDown, LimitExceeded, 429) and ramps back up as calls succeed, and the one
way every store request of a sweep goes out (``Pacer.send``, the engine's ``Pace``)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mpu_janitor.stores.base import Throttled

log = logging.getLogger(__name__)

T = TypeVar("T")

THROTTLE_RETRIES = 6  # per request, on top of the store client's own retries
MAX_RETRY_AFTER_SECONDS = 300.0  # a store asking for more is not believed (a bug or an attack)
MAX_BACKOFF_SECONDS = 30.0
# A request that must finish during a stop (verifying an abort already sent) is retried with
# waits of at most this: a stop is prompt even when the store asks for minutes.
STOPPING_WAIT_SECONDS = 5.0


class Cancelled(Exception):
    """The sweep was asked to stop (policy deleted, suspended, operator stopping)."""


# Adaptive concurrency (ConcurrencyLimit): a sweep starts at this many uploads at once (or the
# policy's cap, if lower) and grows while the store's answers come as fast as they did unloaded.
START_CONCURRENCY = 16
LATENCY_TOLERANCE = 2.0  # answers this many times slower than the unloaded floor: back off
LATENCY_SLACK_SECONDS = 0.002  # ... and slower by more than this (noise at sub-ms floors)
BASELINE_WINDOW = 200  # answers per window of the unloaded-floor estimate
SMOOTHING = 0.2  # weight of the newest answer in the recent latency
DECREASE_FACTOR = 0.8  # on rising latency
THROTTLE_FACTOR = 0.5  # on throttling


class ConcurrencyLimit:
    """How many uploads a sweep works on at once, adapted within ``[1, cap]`` like a TCP
    congestion window: the store's answer times are the signal.

    The floor is the fastest answer of the last one or two windows of ``BASELINE_WINDOW``
    answers (what the store takes unloaded; it follows a change of network path within two
    windows). While the recent latency (a moving average) stays within ``LATENCY_TOLERANCE``
    times the floor, the limit grows: by one per answer at first (doubling every round trip,
    "slow start"), and by one per ``limit`` answers (one per round trip) once it has backed off.
    When the recent latency rises past that, the limit shrinks by ``DECREASE_FACTOR``, but not
    below the start: latency is a noisy signal (a loaded client's own CPU delays its answers,
    and at a sub-millisecond round trip that is all it measures), so it only takes back what it
    gave. When the store throttles, the limit halves (``THROTTLE_FACTOR``), down to one. Either
    at most once per ``limit`` answers, so one slow round trip counts once. No wall clock is
    read here: the caller reports each answer's latency (``observed``) and each throttling
    (``throttled``)."""

    def __init__(self, cap: int, start: int = START_CONCURRENCY) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self.start = min(cap, max(1, start))
        self.limit = float(self.start)
        self.slow_start = True
        self.recent: float | None = None
        self._window_min: float | None = None
        self._previous_min: float | None = None
        self._window_count = 0
        self._since_decrease = cap  # answers since the last decrease: none yet
        self.in_use = 0
        self._cond = threading.Condition()
        self.decreases = 0
        self.peak = int(self.limit)

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    @property
    def floor(self) -> float | None:
        """The unloaded answer time: the fastest of the last one or two windows."""
        known = [m for m in (self._window_min, self._previous_min) if m is not None]
        return min(known) if known else None

    def try_acquire(self) -> bool:
        with self._cond:
            if self.in_use >= self.current:
                return False
            self.in_use += 1
            return True

    def acquire(self, cancel: threading.Event | None = None, *, poll: float = 0.2) -> None:
        """Wait for a slot; raises Cancelled if ``cancel`` is set meanwhile."""
        with self._cond:
            while self.in_use >= self.current:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                self._cond.wait(poll)
            self.in_use += 1

    def release(self) -> None:
        with self._cond:
            self.in_use -= 1
            self._cond.notify()

    def observed(self, latency: float) -> None:
        """One answer (not a throttling) that took ``latency`` seconds."""
        with self._cond:
            if self._window_min is None or latency < self._window_min:
                self._window_min = latency
            self._window_count += 1
            if self._window_count >= BASELINE_WINDOW:
                self._previous_min, self._window_min, self._window_count = (
                    self._window_min,
                    None,
                    0,
                )
            self.recent = (
                latency
                if self.recent is None
                else SMOOTHING * latency + (1 - SMOOTHING) * self.recent
            )
            self._since_decrease += 1
            before = self.current
            floor = self.floor
            assert floor is not None
            rising = self.recent > floor * LATENCY_TOLERANCE + LATENCY_SLACK_SECONDS
            if rising:
                self._decrease(DECREASE_FACTOR, self.start)
            elif self.slow_start:
                self.limit = min(float(self.cap), self.limit + 1.0)
            else:
                self.limit = min(float(self.cap), self.limit + 1.0 / self.limit)
            self.peak = max(self.peak, self.current)
            if self.current > before:
                self._cond.notify(self.current - before)  # the new slots' waiters, no more

    def throttled(self) -> None:
        """The store asked us to slow down."""
        with self._cond:
            self._decrease(THROTTLE_FACTOR, 1)

    def _decrease(self, factor: float, lowest: int) -> None:
        self.slow_start = False
        if self._since_decrease < self.current:
            return  # once per round trip of answers
        lower = max(float(lowest), self.limit * factor)
        if lower < self.limit:  # already at its lowest: nothing to count
            self.limit = lower
            self._since_decrease = 0
            self.decreases += 1


class Pacer:
    """Token bucket at ``rate`` requests per second, shared by a sweep's worker threads.

    On throttling the rate halves (down to ``floor``) and callers back off with jitter; each
    success adds back a twentieth of the configured rate (additive increase)."""

    def __init__(
        self,
        rate: float,
        *,
        cancel: threading.Event | None = None,
        floor: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.configured_rate = rate
        self.rate = rate
        self.floor = min(floor, rate)
        self.cancel = cancel or threading.Event()
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = min(rate, 1.0)
        self._last = clock()
        self.throttle_events = 0
        self.concurrency: ConcurrencyLimit | None = None  # told of every answer's latency

    def acquire(self, *, cancellable: bool = True) -> None:
        """Wait for one request slot; raises Cancelled if the sweep is stopped meanwhile
        (unless ``cancellable`` is False: the call that proves an abort always goes out)."""
        while True:
            if cancellable and self.cancel.is_set():
                raise Cancelled()
            with self._lock:
                now = self._clock()
                burst = max(1.0, self.rate)  # at most one second of burst
                self._tokens = min(burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                wait = (1.0 - self._tokens) / self.rate
            if cancellable:
                self.cancel.wait(min(wait, 1.0))
            else:
                time.sleep(min(wait, 1.0))

    def send(self, request: Callable[[], T], *, finish: bool = False, timed: bool = True) -> T:
        """Send one store request: wait for a token, retry it alone when the store throttles
        (backing off, honouring the wait the store asked for up to 300 s), and raise
        ``Cancelled`` before sending when the sweep is being stopped. ``finish``: the request
        goes out and is retried even during a stop (the parts listing that verifies an abort
        already sent, so what it freed is counted). ``timed``: the answer's latency is a sample
        for the adaptive concurrency (not for listings, whose size sets their time)."""
        for attempt in range(THROTTLE_RETRIES + 1):
            self.acquire(cancellable=not finish)
            started = self._clock()
            try:
                value = request()
            except Throttled as error:
                if self.concurrency is not None:
                    self.concurrency.throttled()
                if attempt == THROTTLE_RETRIES:
                    raise
                log.info("throttled by the store; slowing down (attempt %d)", attempt + 1)
                self.throttled(
                    attempt,
                    error.retry_after,
                    cancellable=not finish,
                    cap=STOPPING_WAIT_SECONDS if finish and self.cancel.is_set() else None,
                )
                continue
            if timed and self.concurrency is not None:
                self.concurrency.observed(self._clock() - started)
            self.succeeded()
            return value
        raise AssertionError("unreachable")

    def succeeded(self) -> None:
        if self.rate < self.configured_rate:
            with self._lock:
                self.rate = min(self.configured_rate, self.rate + self.configured_rate / 20)

    def throttled(
        self,
        attempt: int,
        retry_after: float | None = None,
        *,
        cancellable: bool = True,
        cap: float | None = None,
    ) -> None:
        """Halve the rate and sleep a jittered exponential backoff, or as long as the store
        asked (at most ``MAX_RETRY_AFTER_SECONDS``, or ``cap`` if given)."""
        with self._lock:
            self.rate = max(self.floor, self.rate / 2)
            self._tokens = 0.0
            self.throttle_events += 1
        backoff = min(MAX_BACKOFF_SECONDS, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
        asked = min(MAX_RETRY_AFTER_SECONDS, max(0.0, retry_after or 0.0))
        wait = max(backoff, asked)
        self.sleep(wait if cap is None else min(wait, cap), cancellable=cancellable)

    def sleep(self, seconds: float, *, cancellable: bool = True) -> None:
        """Wait; a stop order ends a cancellable wait with ``Cancelled``."""
        if not cancellable:
            time.sleep(seconds)
        elif self.cancel.wait(seconds):
            raise Cancelled()


class SharedRate:
    """A token bucket shared by several sweeps (one namespace's, ``--namespace-max-requests-
    per-second``): between them, at most ``rate`` requests a second, with at most one second
    of burst. Each request takes one token, its retries too. Thread-safe; ``clock`` and
    ``sleep`` can be replaced (tests count requests against a virtual clock)."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float, threading.Event | None], None] | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"a shared request rate must be above 0, not {rate}")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep or _wait
        self._lock = threading.Lock()
        self._tokens = min(rate, 1.0)
        self._last = clock()

    def acquire(self, cancel: threading.Event | None = None) -> None:
        """Wait for one token; raises Cancelled when ``cancel`` is set first (None: the
        request must go out, as a verification of an abort already sent)."""
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            with self._lock:
                now = self._clock()
                burst = max(1.0, self.rate)
                self._tokens = min(burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0 - 1e-9:  # not a wait shorter than the clock's step
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                wait = (1.0 - self._tokens) / self.rate
            self._sleep(min(wait, 1.0), cancel)


def _wait(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    else:
        cancel.wait(seconds)
