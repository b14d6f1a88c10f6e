"""When a policy's next sweep is due: a small state machine the scheduler drives through named
transitions. Pure: the caller passes the time (monotonic seconds); no clock, no asyncio.

States:

- ``PARKED``: not scheduled (invalid or suspended, or a sweep stopped that nothing asked to
  repeat). Only a transition below makes it due again.
- ``WAITING``: due at ``at``.
- ``RUNNING``: a sweep runs; ``at`` is set when another one was asked for meanwhile (a request,
  a new spec, a peer's turn), and that sweep follows this one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    PARKED = "parked"
    WAITING = "waiting"
    RUNNING = "running"


@dataclass
class Schedule:
    state: State = State.PARKED
    at: float | None = None
    urgent: bool = False  # asked for (new, changed, requested): before the periodic sweeps

    @property
    def due(self) -> float | None:
        """When the next sweep is due (running: the one asked for meanwhile), or None."""
        return None if self.state is State.PARKED else self.at

    def is_due(self, now: float) -> bool:
        return self.state is State.WAITING and self.at is not None and self.at <= now

    def park(self) -> None:
        """Invalid or suspended: no sweep until the spec changes (a running one is stopped)."""
        self.state, self.at, self.urgent = State.PARKED, None, False

    def request_now(self, now: float) -> None:
        """Sweep as soon as possible: a sweep-now request, a new spec, this replica's turn
        ending mid-sweep. While a sweep runs, the next one follows it. It goes before the
        periodic sweeps due."""
        self.urgent = True
        if self.state is State.RUNNING:
            self.at = now if self.at is None else min(self.at, now)
        else:
            self.state, self.at = State.WAITING, now

    def resume(self, now: float, wait: float) -> None:
        """After an operator restart: the schedule it published, ``wait`` seconds from now."""
        self.state, self.at, self.urgent = State.WAITING, now + max(0.0, wait), False

    def start(self) -> None:
        """A sweep starts: nothing is due until it ends, unless asked for meanwhile."""
        self.state, self.at, self.urgent = State.RUNNING, None, False

    def finish(self, now: float, delay: float) -> float:
        """A sweep ended (done or failed) for the spec it ran with: the next one after
        ``delay``, or sooner when one was asked for meanwhile. Returns when it is due."""
        if self.state is State.PARKED:
            return now + delay  # parked meanwhile: stays parked; the time is only nominal
        if self.at is None:
            self.at, self.urgent = now + delay, False  # the periodic sweep
        self.state = State.WAITING
        return self.at

    def end(self) -> None:
        """A sweep task ended, finished or not (cancelled, its spec changed, stopping): what
        was asked for meanwhile is due; if nothing was, and ``finish`` was not called, it is
        parked until something asks."""
        if self.state is State.RUNNING:
            self.state = State.WAITING if self.at is not None else State.PARKED
