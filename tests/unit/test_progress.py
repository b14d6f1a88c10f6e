"""The CLI's live progress line as a person at a terminal sees it: a pseudo-terminal shows the
counts move while a single listing page is still being worked through, and the line is gone
when the report is printed; anything that is not a terminal gets no progress at all."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import termios
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from mpu_janitor.policy import parse_policy
from mpu_janitor.progress import Progress, Snapshot, progress_line
from mpu_janitor.stores.base import Pace, PartsSummary, Upload, unpaced
from mpu_janitor.sweep import SweepResult, run_sweep
from tests.support.fake_store import FakeStore

H = timedelta(hours=1)
KIB = 1024


def policy(mode: str = "Abort") -> Any:
    return parse_policy({
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "store": {"type": "S3", "s3": {"buckets": ["bucket"]}},
            "match": {"olderThan": "1d", "quietPeriod": "1h"},
            "limits": {"requestsPerSecond": 10000, "concurrency": 4},
            "mode": mode,
        },
    })  # fmt: skip


class Terminal:
    """A pseudo-terminal of a given width; what was written to it, as a person would see it."""

    def __init__(self, columns: int = 120) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        attributes = termios.tcgetattr(slave)
        attributes[1] &= ~termios.ONLCR  # keep \n as written
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        self.stream = os.fdopen(slave, "w", encoding="utf-8")
        self.output = ""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            if not chunk:
                return
            with self._changed:
                self.output += chunk.decode()
                self._changed.notify_all()

    def line(self) -> str:
        """The line the cursor is on, after carriage returns and clear-to-end-of-line."""
        last = self.output.split("\n")[-1]
        return last.split("\r")[-1].replace("\x1b[K", "")

    def wait_for(self, seen: Callable[[str], bool], what: str) -> str:
        with self._changed:
            if not self._changed.wait_for(lambda: seen(self.line()), timeout=30):
                pytest.fail(f"the terminal never showed {what}; it shows {self.line()!r}")
            return self.line()

    def close(self) -> None:
        self.stream.close()
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    screen = Terminal()
    yield screen
    screen.close()


class GatedStore(FakeStore):
    """Measuring stops after `open_for` uploads until the test opens the gate."""

    def __init__(self, open_for: int) -> None:
        super().__init__()
        self.open_for = open_for
        self.gate = threading.Event()
        self.measured: list[str] = []  # in order of first measurement (a verify measures again)
        self.pages_listed = 0

    def list_uploads(self, *args: Any, **kwargs: Any) -> Any:
        for page in super().list_uploads(*args, **kwargs):
            self.pages_listed += 1
            yield page

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        with self.lock:
            if upload.upload_id not in self.measured:
                self.measured.append(upload.upload_id)
            wait = self.measured.index(upload.upload_id) >= self.open_for
        if wait:
            self.gate.wait(timeout=60)
        return super().measure(upload, pace)


def test_counts_move_while_one_page_is_worked_through(terminal: Terminal) -> None:
    store = GatedStore(open_for=20)
    for index in range(300):
        store.add(f"k{index:04}", age=48 * H, parts=[64 * KIB])
    progress = Progress(terminal.stream, interval=0.05)
    done = threading.Event()
    result: list[SweepResult] = []

    def sweep() -> None:
        result.append(run_sweep(policy(), store, progress=progress))
        done.set()

    worker = threading.Thread(target=sweep)
    worker.start()
    try:
        # The store answered with one page of 300 uploads; the sweep is stuck inside it.
        line = terminal.wait_for(lambda text: "20 aborted" in text, "20 uploads aborted")
        assert store.pages_listed == 1 and not done.is_set()
        assert line.startswith("20 measured, 20 aborted, 1.2 MiB freed, ")
        assert "uploads/s" in line and line.endswith("listing")
    finally:
        store.gate.set()
        worker.join(timeout=60)
    assert done.is_set()
    final = terminal.wait_for(lambda text: text.startswith("300/300"), "the last count")
    assert final.startswith("300/300 measured, 300 aborted, 18.8 MiB freed, "), final
    progress.finish()
    terminal.wait_for(lambda text: text == "", "the line cleared for the report")
    assert terminal.output.endswith("\r\x1b[K")
    assert result[0].total("aborted") == 300


def test_time_left_once_the_listing_is_complete(terminal: Terminal) -> None:
    """The listing is done and a few uploads are still being measured: the total is known."""
    store = FakeStore()
    for index in range(50):
        store.add(f"k{index:04}", age=48 * H)
    last = threading.Event()
    measure = store.measure

    def slow_last(upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        if upload.key >= "k0046":  # the last four wait until the test has seen the line
            last.wait(timeout=60)
        return measure(upload, pace)

    store.measure = slow_last  # type: ignore[method-assign]
    progress = Progress(terminal.stream, interval=0.05)
    worker = threading.Thread(
        target=run_sweep, args=(policy(), store), kwargs={"progress": progress}
    )
    worker.start()
    try:
        line = terminal.wait_for(lambda text: text.startswith("46/50 measured"), "46/50")
        assert line.endswith(" left"), line
    finally:
        last.set()
        worker.join(timeout=60)
    progress.finish()


def test_dry_run_shows_what_would_be_aborted(terminal: Terminal) -> None:
    store = FakeStore()
    for index in range(5):
        store.add(f"k{index}", age=48 * H)
    progress = Progress(terminal.stream, interval=0.05)
    run_sweep(policy("DryRun"), store, progress=progress)
    line = terminal.wait_for(lambda text: text.startswith("5/5"), "the dry run's last line")
    assert line.startswith("5/5 measured, 5 eligible (dry run), "), line
    progress.finish()


def test_the_line_never_wraps_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    screen = Terminal(columns=30)
    try:
        store = FakeStore()
        store.add("k", age=48 * H)
        progress = Progress(screen.stream, interval=0.05)
        run_sweep(policy(), store, progress=progress)
        line = screen.wait_for(lambda text: text.startswith("1/1"), "the line")
        assert len(line) < 30
        progress.finish()
    finally:
        screen.close()


def test_a_terminal_that_reports_no_width_gets_a_whole_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    screen = Terminal(columns=0)
    try:
        store = FakeStore()
        store.add("k", age=48 * H)
        progress = Progress(screen.stream, interval=0.05)
        run_sweep(policy(), store, progress=progress)
        line = screen.wait_for(lambda text: text.startswith("1/1"), "the line")
        assert line.startswith("1/1 measured, 1 aborted, 100 B freed, "), line
        progress.finish()
    finally:
        screen.close()


def test_nothing_but_the_report_when_not_a_terminal() -> None:
    store = FakeStore()
    for index in range(30):
        store.add(f"k{index}", age=48 * H)
    stream = io.StringIO()
    progress = Progress(stream, interval=0.01)
    run_sweep(policy(), store, progress=progress)
    progress.finish()
    assert stream.getvalue() == ""


def test_the_line_reads_naturally() -> None:
    base = Snapshot(
        scanned=3000, measured=1500, eligible=1400, aborted=1200, failed=0,
        freed_bytes=15 * 1024**2, listings_done=True, dry_run=False,
    )  # fmt: skip
    assert progress_line(base, 10.0) == (
        "1500/3000 measured, 1200 aborted, 15.0 MiB freed, 150 uploads/s, 10s left"
    )
    listing = Snapshot(**{**base.__dict__, "listings_done": False, "failed": 2})
    assert progress_line(listing, 100.0) == (
        "1500 measured, 1200 aborted, 15.0 MiB freed, 2 failed, 15 uploads/s, listing"
    )
    slow = Snapshot(**{**base.__dict__, "measured": 3, "scanned": 4000})
    assert progress_line(slow, 1200.0).endswith("0.0 uploads/s, 444h06m left")
