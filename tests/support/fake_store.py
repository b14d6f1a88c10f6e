"""An in-memory Store for engine unit tests: scripted clocks, failures and slow aborts."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from mpu_janitor.stores.base import (
    Pace,
    PartsSummary,
    Throttled,
    Upload,
    UploadGone,
    UploadPage,
    UploadReplaced,
    unpaced,
)

SERVER_NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@dataclass
class FakeUpload:
    upload: Upload
    part_sizes: list[int]
    newest_part: datetime | None
    aborts_needed: int = 1  # aborts before the parts listing stops showing it
    replaced: bool = False


@dataclass
class FakeStore:
    kind: str = "S3"
    target_id: str = "fake:1"
    page_size: int = 1000
    server_now: datetime = SERVER_NOW
    uploads: dict[str, FakeUpload] = field(default_factory=dict)
    throttle_next: int = 0  # the next N parts listings or aborts raise Throttled
    throttle_pages: int = 0  # the next N listing page requests raise Throttled
    throttle_retry_after: float | None = None  # what a throttled answer asks us to wait
    repeat_boundary: bool = False  # inclusive markers: a page repeats the previous page's last
    no_date: bool = False  # responses without a Date header: the store's clock is unknown
    page_requests: int = 0
    calls: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    yielded: int = 0
    forgotten: list[str] = field(default_factory=list)

    def add(
        self,
        key: str,
        *,
        age: timedelta,
        parts: Sequence[int] = (100,),
        last_part_age: timedelta | None = None,
        container: str = "bucket",
        aborts_needed: int = 1,
    ) -> Upload:
        upload = Upload(container, key, f"id-{len(self.uploads)}", self.server_now - age)
        newest = self.server_now - (last_part_age if last_part_age is not None else age)
        self.uploads[upload.upload_id] = FakeUpload(
            upload, list(parts), newest if parts else None, aborts_needed
        )
        return upload

    @property
    def clock(self) -> datetime | None:
        return None if self.no_date else self.server_now

    def _throttle(self) -> None:
        with self.lock:
            if self.throttle_next > 0:
                self.throttle_next -= 1
                raise Throttled("SlowDown", retry_after=self.throttle_retry_after)

    def containers(self) -> list[str]:
        return sorted({u.upload.container for u in self.uploads.values()}) or ["bucket"]

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        """Each page is one request sent through ``pace``; the position (the marker) is kept
        here, so a throttled page is retried alone."""
        items = [u.upload for u in list(self.uploads.values()) if u.upload.container == container]
        start = 0
        while start < len(items):
            first = start - 1 if self.repeat_boundary and start > 0 else start

            def request(first: int = first, start: int = start) -> list[Upload]:
                with self.lock:
                    self.page_requests += 1
                    if self.throttle_pages > 0:
                        self.throttle_pages -= 1
                        raise Throttled("SlowDown", retry_after=self.throttle_retry_after)
                return items[first : start + self.page_size]

            page = pace(request)
            with self.lock:
                self.yielded += len(page)
            yield UploadPage(page, self.clock)
            start += self.page_size

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        return pace(lambda: self._parts(upload))

    def _parts(self, upload: Upload) -> PartsSummary:
        self._throttle()
        with self.lock:
            self.calls.append(("measure", upload.key))
            entry = self.uploads.get(upload.upload_id)
        if entry is None:
            raise UploadGone(upload.key)
        return PartsSummary(
            sum(entry.part_sizes), len(entry.part_sizes), entry.newest_part, self.clock
        )

    def abort(self, upload: Upload) -> None:
        self._throttle()
        with self.lock:
            self.calls.append(("abort", upload.key))
            entry = self.uploads.get(upload.upload_id)
            if entry is None:
                raise UploadGone(upload.key)
            if entry.replaced:
                raise UploadReplaced(upload.key)
            entry.aborts_needed -= 1
            if entry.aborts_needed <= 0:
                del self.uploads[upload.upload_id]

    def forget(self, upload: Upload) -> None:
        self.forgotten.append(upload.key)

    def close(self) -> None:
        pass
