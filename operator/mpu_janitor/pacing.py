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

    def send(self, request: Callable[[], T], *, finish: bool = False) -> T:
        """Send one store request: wait for a token, retry it alone when the store throttles
        (backing off, honouring the wait the store asked for up to 300 s), and raise
        ``Cancelled`` before sending when the sweep is being stopped. ``finish``: the request
        goes out and is retried even during a stop (the parts listing that verifies an abort
        already sent, so what it freed is counted)."""
        for attempt in range(THROTTLE_RETRIES + 1):
            self.acquire(cancellable=not finish)
            try:
                value = request()
            except Throttled as error:
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
