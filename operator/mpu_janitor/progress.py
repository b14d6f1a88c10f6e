"""The command line's live progress line: uploads measured and aborted, bytes freed, the rate
and the time left, redrawn on a terminal by a timer from the sweep's shared result.

The sweep engine calls a Progress with its SweepResult when it starts and after each listing
page; the counts in that result change as worker threads measure and abort uploads, so a timer
redraws the line every REDRAW_SECONDS whatever the page size (MinIO lists a bucket in one page).
On anything but a terminal nothing is written: piped and redirected output stays clean.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from mpu_janitor.sweep import SweepResult

REDRAW_SECONDS = 0.5
CLEAR_TO_END = "\x1b[K"


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass(frozen=True)
class Snapshot:
    """The counts of a running sweep at one moment."""

    scanned: int  # uploads listed in scope so far
    measured: int  # uploads whose parts were listed (or found gone)
    eligible: int
    aborted: int
    failed: int
    freed_bytes: int
    listings_done: bool  # every listing begun so far has completed: `scanned` is the total
    dry_run: bool

    @classmethod
    def of(cls, result: SweepResult) -> Snapshot:
        # Worker threads add buckets and counts while this reads them: copy, and retry the
        # rare read that meets a resize of the bucket table.
        for _ in range(10):
            try:
                buckets = list(result.buckets.values())
                break
            except RuntimeError:
                continue
        else:
            buckets = []
        return cls(
            scanned=sum(b.scanned for b in buckets),
            measured=sum(b.incomplete_uploads + b.already_gone for b in buckets),
            eligible=sum(b.eligible for b in buckets),
            aborted=sum(b.aborted for b in buckets),
            failed=sum(b.failed for b in buckets),
            freed_bytes=sum(b.freed_bytes for b in buckets),
            listings_done=bool(buckets) and all(b.listed for b in buckets),
            dry_run=result.dry_run,
        )


def progress_line(snapshot: Snapshot, elapsed_seconds: float) -> str:
    """One line: what a person watching the sweep wants to know, most important first."""
    total = f"/{snapshot.scanned}" if snapshot.listings_done else ""
    parts = [f"{snapshot.measured}{total} measured"]
    if snapshot.dry_run:
        parts.append(f"{snapshot.eligible} eligible (dry run)")
    else:
        parts.append(f"{snapshot.aborted} aborted")
        parts.append(f"{format_bytes(snapshot.freed_bytes)} freed")
    if snapshot.failed:
        parts.append(f"{snapshot.failed} failed")
    rate = snapshot.measured / elapsed_seconds if elapsed_seconds > 0 else 0.0
    parts.append(f"{rate:.0f} uploads/s" if rate >= 10 else f"{rate:.1f} uploads/s")
    if not snapshot.listings_done:
        parts.append("listing")
    elif rate > 0:
        left = max(0, snapshot.scanned - snapshot.measured) / rate
        parts.append(f"{format_duration(left)} left")
    return ", ".join(parts)


class Progress:
    """A one-line progress display on a terminal, redrawn by a timer; silent otherwise.

    Call it with the sweep's result (the engine does), and ``finish`` it once the sweep is over:
    that stops the timer and clears the line, so the report that follows starts clean.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = REDRAW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.interval = interval
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._result: SweepResult | None = None
        self._stopped = threading.Event()
        self._timer: threading.Thread | None = None

    def __call__(self, result: SweepResult) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._result = result
            if self._timer is None and not self._stopped.is_set():
                self._timer = threading.Thread(
                    target=self._redraw_until_finished, name="mpu-janitor-progress", daemon=True
                )
                self._timer.start()
        self.draw()

    def _redraw_until_finished(self) -> None:
        while not self._stopped.wait(self.interval):
            self.draw()

    def draw(self) -> None:
        with self._lock:
            if self._result is None or self._stopped.is_set():
                return
            line = progress_line(Snapshot.of(self._result), self._clock() - self._started)
            # A line longer than the terminal would wrap, and \r would then redraw only its tail.
            line = line[: max(10, self._columns() - 1)]
            self.stream.write(f"\r{line}{CLEAR_TO_END}")
            self.stream.flush()

    def _columns(self) -> int:
        """The terminal's width: COLUMNS, else what the terminal says, else 80 (a terminal that
        reports no size, such as a pseudo-terminal nobody sized, says 0)."""
        try:
            columns = int(os.environ.get("COLUMNS", "0"))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError):
                columns = 0
        return columns if columns > 0 else 80

    def finish(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._stopped.set()
            timer = self._timer
        if timer is not None:
            timer.join()
        self.stream.write(f"\r{CLEAR_TO_END}")
        self.stream.flush()
