"""Request pacing for one sweep: a thread-safe token bucket that slows down when the store
throttles (503 SlowDown, LimitExceeded, 429) and ramps back up as calls succeed."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable


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

    def succeeded(self) -> None:
        if self.rate < self.configured_rate:
            with self._lock:
                self.rate = min(self.configured_rate, self.rate + self.configured_rate / 20)

    def throttled(self, attempt: int, retry_after: float | None = None) -> None:
        """Halve the rate and sleep a jittered exponential backoff, or as long as the store
        asked (cancellable)."""
        with self._lock:
            self.rate = max(self.floor, self.rate / 2)
            self._tokens = 0.0
            self.throttle_events += 1
        backoff = min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)
        self.sleep(max(backoff, retry_after or 0.0))

    def sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise Cancelled()
