"""A lean in-memory Store for benchmarks: N uploads made up page by page, never all held.

Every upload is a pure function of its index (key, id, age, parts), so the store keeps no
per-upload state beyond the uploads aborted and not yet verified (bounded by the sweep's
in-flight window). Its own memory therefore stays flat in N, and whatever grows with N in a
benchmark belongs to the engine.

Upload ``i`` (0-based), on a fixed store clock:

* ``i % 10 == 0``: young (initiated 1 hour ago): in scope, not eligible
* ``i % 10 == 1``: old but active (newest part 1 minute ago): skipped
* otherwise: old and quiet: eligible
* parts: ``1 + i % 3`` parts of ``part_size`` bytes each
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mpu_janitor.stores.base import Pace, PartsSummary, Upload, UploadGone, UploadPage, unpaced

SERVER_NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
OLD = timedelta(days=2)
YOUNG = timedelta(hours=1)
RECENT_PART = timedelta(minutes=1)


def _parts(index: int) -> int:
    return 1 + index % 3


@dataclass(frozen=True)
class Expected:
    """What a sweep of the whole store must report (computed, not stored)."""

    scanned: int
    eligible: int
    eligible_bytes: int
    skipped_active: int
    incomplete_bytes: int


class StreamingStore:
    """A Store (stores/base.py) over ``count`` synthetic uploads in one container."""

    kind = "S3"
    target_id = "bench:streaming"

    def __init__(
        self,
        count: int,
        *,
        page_size: int = 1000,
        part_size: int = 1024,
        container: str = "bench",
    ) -> None:
        self.count = count
        self.page_size = page_size
        self.part_size = part_size
        self.container = container
        self._lock = threading.Lock()
        self._aborted: set[str] = set()  # aborted, verification listing not seen yet
        self.max_pending_aborts = 0
        self.pages = 0
        self.listed = 0
        self.measures = 0
        self.aborts = 0

    # -- the synthetic data ------------------------------------------------------------------

    @staticmethod
    def _index(upload: Upload) -> int:
        return int(upload.upload_id[1:])

    def _upload(self, index: int) -> Upload:
        age = YOUNG if index % 10 == 0 else OLD
        return Upload(
            self.container,
            f"tmp/{index // 1000:06d}/{index:09d}.bin",
            f"u{index}",
            SERVER_NOW - age - timedelta(seconds=index % 997),
        )

    def expected(self) -> Expected:
        """The counts and bytes a full sweep of this store must report."""
        n = self.count
        young = (n + 9) // 10
        active = (n + 8) // 10
        eligible = n - young - active
        total_bytes = sum(_parts(i) for i in range(n)) * self.part_size
        eligible_bytes = sum(_parts(i) for i in range(n) if i % 10 not in (0, 1)) * self.part_size
        return Expected(n, eligible, eligible_bytes, active, total_bytes)

    # -- the Store protocol ---------------------------------------------------------------------

    def containers(self) -> list[str]:
        return [self.container]

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        if container != self.container:
            return
        for start in range(0, self.count, self.page_size):
            stop = min(start + self.page_size, self.count)
            uploads = [self._upload(i) for i in range(start, stop)]
            with self._lock:
                self.pages += 1
                self.listed += len(uploads)
            yield UploadPage(uploads, SERVER_NOW)

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        index = self._index(upload)
        with self._lock:
            self.measures += 1
            if upload.upload_id in self._aborted:
                self._aborted.discard(upload.upload_id)
                raise UploadGone(upload.key)
        newest = upload.initiated + timedelta(seconds=1)
        if index % 10 == 1:
            newest = SERVER_NOW - RECENT_PART
        parts = _parts(index)
        return PartsSummary(parts * self.part_size, parts, newest, SERVER_NOW)

    def abort(self, upload: Upload) -> None:
        with self._lock:
            self.aborts += 1
            self._aborted.add(upload.upload_id)
            self.max_pending_aborts = max(self.max_pending_aborts, len(self._aborted))

    def forget(self, upload: Upload) -> None:
        with self._lock:
            self._aborted.discard(upload.upload_id)

    def close(self) -> None:
        pass

    @property
    def pending_aborts(self) -> int:
        with self._lock:
            return len(self._aborted)
