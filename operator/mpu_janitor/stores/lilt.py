"""LILT uploads: cancels abandoned multipart uploads that the uploader recorded in an inventory.

Why an inventory. LILT has no call that lists incomplete multipart uploads. ``GET /v2/upload``
lists pending uploads as ``{id, filename, status, created_at}``: no multipart ``uploadId`` and
no S3 key, and cancelling needs both (``DELETE /v2/upload/s3/multipart/{uploadId}?s3Key=``).
Both exist only in the response of the initiate call (``POST /v2/upload/s3/multipart`` returns
``{uploadId, key}``), so the uploader records them right then with :func:`record_upload`, and
the sweep reads them back. The inventory is a JSON Lines file
(``spec.store.lilt.inventoryPath``), one upload a line::

    {"uploadId": "...", "key": "uploads/42/file.zip", "initiated": "2025-01-31T12:00:00.000Z",
     "filename": "file.zip", "size": 734003200}

``filename`` and ``size`` are optional. Writers append under an exclusive ``flock`` on
``<inventory>.lock`` (a separate file, because pruning replaces the inventory itself) and fsync
each line. The sweep reads without the lock: appends and the atomic replacement never show it
a half-written file, and an unterminated last line is a write in progress, skipped. Verified
uploads are pruned by rewriting the file to a temporary one and renaming it over, under the
lock, in batches (:meth:`LiltStore.forget`, flushed on :meth:`LiltStore.close`). An uploader
that completes an upload should call :func:`forget_upload`; if it does not, a later sweep's
cancel gets a 404 ("already gone", never counted as freed) and prunes the record then.

The file must be visible to the uploader and to the janitor alike: the same host for the CLI,
a volume shared with the uploader (ReadWriteMany, a filesystem with working ``flock``, e.g.
NFSv4) for the operator, with both processes in a group that may write it.

Clock. Ages are judged on LILT's clock: every page of the listing carries the Date header of
``GET /v2/upload?ids=0``, an authenticated request that matches no upload (cheap, and it
proves the API key before any cancel). Only if LILT sends no Date header is the local clock
used, with a warning. ``initiated`` is what the uploader recorded: pass the Date header of the
initiate response to be on LILT's clock (the default is the uploader's own clock).

Size. LILT has no parts listing, so what an upload holds cannot be measured: ``measure``
reports the record's ``size`` (declared by the uploader at initiation: the whole file, an
upper bound of the parts stored), 0 when absent, and ``newest_part`` None, so the quiet period
cannot see parts arriving: ``olderThan`` must be longer than an upload can take.

Verification. With no parts listing to check, ``measure`` of an upload this store has
cancelled repeats the cancel: a 404 proves LILT no longer knows the upload (UploadGone); a 200
means it still accepted a cancel, so the upload is reported present and the engine aborts
again (a bounded number of times) and then counts it failed. This relies on LILT answering 404
for an unknown or cancelled upload id, as its S3 backend does (``NoSuchUpload``); were it to
answer 200 to every repeat, those uploads would show as failed, never as freed. Measuring an
upload we have not cancelled sends nothing.

Auth. HTTP Basic with the API key as user and password (``LILT_API_KEY`` from the credentials
Secret, else the environment), never the ``key`` query parameter that LILT also accepts: it
collides with the S3 key. Redirects are not followed (they would carry the credentials away).

Throttling. LILT allows 4,000 requests a minute and asks for a 60-second wait past it: a 429
raises Throttled and the engine slows the sweep down.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import fcntl
import json
import logging
import os
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import urllib3

from mpu_janitor import __version__
from mpu_janitor.policy import MAX_CONCURRENCY, LiltTarget
from mpu_janitor.stores.base import (
    AccessDenied,
    ContainerNotFound,
    InvalidTarget,
    Pace,
    PartsSummary,
    RequestObserver,
    StoreCredentials,
    StoreError,
    StoreUnreachable,
    Throttled,
    Upload,
    UploadGone,
    UploadPage,
    unpaced,
)

log = logging.getLogger(__name__)

CONTAINER = "lilt"  # one inventory, one "container" in metrics and status
PAGE_SIZE = 1000  # inventory records per listing page
FORGET_BATCH = 100  # prune the inventory once this many uploads are verified gone...
FORGET_MAX_DELAY = 5.0  # ...or this many seconds after the first one, whichever comes first
SIZE_CACHE_PAGES = 8  # recent listing pages whose sizes measure() can look up without a scan
API_KEY_ENV = "LILT_API_KEY"
QUOTA_MESSAGE = "LILT quota of 4000 requests a minute exceeded: LILT asks for a 60 s wait"
QUOTA_WAIT_SECONDS = 60.0


# --------------------------------------------------------------------------------------------
# The inventory file


@dataclass(frozen=True, slots=True)
class InventoryRecord:
    upload_id: str
    key: str
    initiated: datetime
    filename: str | None = None
    size: int | None = None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _load(raw: bytes) -> dict[str, Any] | None:
    """One line as a JSON object, or None (a torn or foreign line)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_record(raw: bytes) -> InventoryRecord | None:
    """One inventory line, or None when it is not a usable upload record."""
    data = _load(raw)
    if data is None:
        return None
    upload_id, key, initiated = data.get("uploadId"), data.get("key"), data.get("initiated")
    if not isinstance(upload_id, str) or not upload_id or not isinstance(key, str) or not key:
        return None
    if not isinstance(initiated, str):
        return None
    try:
        moment = datetime.fromisoformat(initiated)
    except ValueError:
        return None
    if moment.tzinfo is None:  # an age needs a zone; never guess one
        return None
    size = data.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        size = None
    filename = data.get("filename")
    return InventoryRecord(
        upload_id,
        key,
        moment.astimezone(UTC),
        filename if isinstance(filename, str) else None,
        size,
    )


@contextlib.contextmanager
def _inventory_lock(path: str) -> Iterator[None]:
    """The writers' lock: ``flock`` on ``<path>.lock``, which is never replaced (the inventory
    is, when pruned, so a lock on it would not exclude a writer holding the old file)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def record_upload(
    path: str | os.PathLike[str],
    upload_id: str,
    key: str,
    initiated: datetime | None = None,
    filename: str | None = None,
    size: int | None = None,
) -> None:
    """Record a LILT multipart upload right after initiating it (for the uploader to call).

    ``upload_id`` and ``key`` are the initiate response's ``uploadId`` and ``key``;
    ``initiated`` (timezone-aware) is best taken from that response's Date header, and
    defaults to now on this machine's clock; ``size`` is the file size declared at initiation.
    Safe to call from many threads and processes at once; the record is on disk on return."""
    if not upload_id or not key:
        raise ValueError("upload_id and key are required (the initiate response's uploadId, key)")
    moment = initiated if initiated is not None else datetime.now(UTC)
    if moment.tzinfo is None:
        raise ValueError("initiated must be timezone-aware")
    if size is not None and size < 0:
        raise ValueError("size must not be negative")
    record: dict[str, Any] = {"uploadId": upload_id, "key": key, "initiated": _rfc3339(moment)}
    if filename is not None:
        record["filename"] = filename
    if size is not None:
        record["size"] = int(size)
    line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    target = os.fspath(path)
    with _inventory_lock(target):
        created = not os.path.exists(target)
        fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o660)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                # A writer died mid-line: start on a fresh line rather than glue onto its debris.
                line = b"\n" + line
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(os.path.dirname(os.path.abspath(target)))


def prune_uploads(path: str | os.PathLike[str], upload_ids: Set[str]) -> int:
    """Remove the records of ``upload_ids`` (every copy), atomically, under the writers' lock.
    Lines that are not JSON (debris of a writer killed mid-line) go too. Returns how many
    records were removed."""
    target = os.fspath(path)
    if not upload_ids:
        return 0
    directory = os.path.dirname(os.path.abspath(target))
    with _inventory_lock(target):
        try:
            source = open(target, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            return 0
        removed = debris = 0
        fd, temp = tempfile.mkstemp(prefix=".inventory-", suffix=".tmp", dir=directory)
        try:
            with source, os.fdopen(fd, "wb") as out:
                mode = stat.S_IMODE(os.fstat(source.fileno()).st_mode)
                for raw in source:
                    data = _load(raw)
                    if data is None:
                        debris += 1
                        continue
                    if data.get("uploadId") in upload_ids:
                        removed += 1
                        continue
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                out.flush()
                os.fsync(out.fileno())
            if removed == 0 and debris == 0:
                os.unlink(temp)
                return 0
            os.chmod(temp, mode)  # mkstemp makes 0600: keep the uploader able to write
            os.replace(temp, target)
            _fsync_dir(directory)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
    if debris:
        log.warning("%s: dropped %d unreadable line(s) while pruning", target, debris)
    return removed


def forget_upload(path: str | os.PathLike[str], upload_id: str) -> bool:
    """Remove one upload's record, e.g. once the uploader has completed it."""
    return prune_uploads(path, {upload_id}) > 0


# --------------------------------------------------------------------------------------------
# The store


def _failure_code(error: BaseException | None) -> str:
    """The observer's code for a request that got no answer."""
    # urllib3 makes NewConnectionError a ConnectTimeoutError for compatibility: a refused
    # connection is not a timeout.
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        return "ConnectionError"
    if isinstance(error, urllib3.exceptions.TimeoutError):
        return "Timeout"
    return "ConnectionError"


class LiltStore:
    """The uploads of one LILT account recorded in one inventory file."""

    kind = "LILT"

    def __init__(
        self,
        target: LiltTarget,
        credentials: StoreCredentials | None,
        observer: RequestObserver,
        *,
        read_timeout: float = 30.0,
    ) -> None:
        self.target = target
        self._observer = observer
        self._endpoint = target.endpoint.rstrip("/")
        api_key = (credentials.api_key if credentials is not None else None) or os.environ.get(
            API_KEY_ENV
        )
        self._headers: dict[str, str] | None = None
        if api_key:
            self._headers = urllib3.util.make_headers(basic_auth=f"{api_key}:{api_key}")
            self._headers.update(
                {"Accept": "application/json", "User-Agent": f"mpu-janitor/{__version__}"}
            )
        self._http = urllib3.PoolManager(
            maxsize=MAX_CONCURRENCY,  # one connection per sweep worker at most
            timeout=urllib3.Timeout(connect=5.0, read=read_timeout),
            # Retry only what never reached LILT (connecting). A cancel whose answer was lost may
            # have been done: a blind retry would see 404 and call our own work "already gone".
            retries=urllib3.Retry(
                total=2,
                connect=2,
                read=0,
                status=0,
                redirect=0,
                other=0,
                backoff_factor=0.2,
                raise_on_status=False,
                raise_on_redirect=False,
            ),
        )
        self._lock = threading.Lock()
        self._sizes: collections.deque[dict[str, int | None]] = collections.deque(
            maxlen=SIZE_CACHE_PAGES
        )
        self._cancelled: set[str] = set()  # cancelled by us, not yet verified
        self._gone: set[str] = set()  # known gone: verified, or 404 on our first cancel
        self._pending: set[str] = set()  # verified gone, not yet pruned from the file
        self._pending_since = 0.0
        self._clock: tuple[datetime, float] | None = None  # (LILT's time, our monotonic then)
        self._warned_no_date = False
        self._endpoint_confirmed = False  # LILT answered 200 to our listing call here

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def target_id(self) -> str:
        return f"lilt:{self._endpoint}:{os.path.abspath(self.target.inventory_path or '-')}"

    def _inventory(self) -> str:
        if not self.target.inventory_path:
            raise InvalidTarget(
                "spec.store.lilt.inventoryPath: is required: LILT cannot list incomplete "
                "uploads, the sweep reads the inventory the uploader writes with record_upload()",
                container=CONTAINER,
            )
        return self.target.inventory_path

    def _observe(self, operation: str, code: str) -> None:
        try:
            self._observer(operation, code)
        except Exception:  # a broken metrics callback must never break a store call
            log.exception("request observer failed")

    def _request(
        self, method: str, operation: str, path: str, query: dict[str, str]
    ) -> urllib3.BaseHTTPResponse:
        if self._headers is None:
            raise AccessDenied(
                f"no LILT API key: set {API_KEY_ENV} in the credentials Secret or the environment",
                container=CONTAINER,
            )
        url = f"{self._endpoint}{path}?{urllib.parse.urlencode(query)}"
        try:
            response = self._http.request(method, url, headers=self._headers, redirect=False)
        except urllib3.exceptions.MaxRetryError as error:
            self._observe(operation, _failure_code(error.reason))
            raise StoreUnreachable(
                f"LILT at {self._endpoint}: {error.reason}", container=CONTAINER
            ) from error
        except urllib3.exceptions.HTTPError as error:
            self._observe(operation, _failure_code(error))
            raise StoreUnreachable(
                f"LILT at {self._endpoint}: {error}", container=CONTAINER
            ) from error
        self._observe(operation, str(response.status))
        self._note_clock(response)
        return response

    def _note_clock(self, response: urllib3.BaseHTTPResponse) -> datetime | None:
        date = response.headers.get("Date")
        if not date:
            return None
        try:
            moment = email.utils.parsedate_to_datetime(date).astimezone(UTC)
        except (TypeError, ValueError):
            return None
        with self._lock:
            self._clock = (moment, time.monotonic())
        return moment

    def _now(self) -> datetime:
        """LILT's clock as last seen, advanced by our monotonic clock since; else our clock."""
        with self._lock:
            clock = self._clock
        if clock is None:
            return datetime.now(UTC)
        seen, at = clock
        return seen + timedelta(seconds=time.monotonic() - at)

    @staticmethod
    def _message(response: urllib3.BaseHTTPResponse) -> str:
        try:
            body = json.loads(response.data or b"null")
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return str(body["message"])
        return response.data[:200].decode("utf-8", "replace").strip() or response.reason or ""

    def _error(self, response: urllib3.BaseHTTPResponse) -> StoreError:
        status, message = response.status, self._message(response)
        if status in (401, 403):
            return AccessDenied(
                f"LILT rejected the API key ({status}): {message}", container=CONTAINER
            )
        if status == 429:
            retry_after = response.headers.get("Retry-After")
            hint = f" (Retry-After: {retry_after})" if retry_after else ""
            return Throttled(
                f"{QUOTA_MESSAGE}{hint}: {message}",
                container=CONTAINER,
                retry_after=_seconds(retry_after) or QUOTA_WAIT_SECONDS,
            )
        if status in (502, 503, 504):
            return StoreUnreachable(f"LILT answered {status}: {message}", container=CONTAINER)
        if 300 <= status < 400:
            return StoreError(
                f"LILT redirected ({status}) to {response.headers.get('Location')}; "
                "not followed (it would carry the credentials)",
                container=CONTAINER,
            )
        return StoreError(f"LILT answered {status}: {message}", container=CONTAINER)

    def _server_time(self) -> datetime:
        """LILT's clock, from the Date header of a request that matches no upload."""
        response = self._request("GET", "ListUploads", "/v2/upload", {"ids": "0"})
        if response.status in (401, 403, 429):
            raise self._error(response)
        if response.status == 200:
            self._endpoint_confirmed = True
        else:
            log.warning(
                "LILT at %s answered %d to GET /v2/upload: is spec.store.lilt.endpoint right?",
                self._endpoint,
                response.status,
            )
        # Any answer still carries LILT's Date, which is all this request is for.
        moment = self._note_clock(response)
        if moment is None:
            if not self._warned_no_date:
                log.warning(
                    "LILT at %s sent no Date header: judging ages on the local clock",
                    self._endpoint,
                )
                self._warned_no_date = True
            return datetime.now(UTC)
        return moment

    def _cancel(self, upload: Upload) -> None:
        path = f"/v2/upload/s3/multipart/{urllib.parse.quote(upload.upload_id, safe='')}"
        response = self._request("DELETE", "CancelMultipartUpload", path, {"s3Key": upload.key})
        if response.status == 404:
            raise UploadGone(
                f"LILT does not know upload {upload.upload_id}: {self._message(response)}"
            )
        if not 200 <= response.status < 300:
            raise self._error(response)
        try:
            body = json.loads(response.data or b"{}")
        except ValueError:
            body = {}
        if isinstance(body, dict) and body.get("success") is False:
            raise StoreError(
                f"LILT did not cancel upload {upload.upload_id}: {body.get('message')}",
                container=CONTAINER,
            )

    # -- the Store protocol ----------------------------------------------------------------------

    def containers(self) -> list[str]:
        return [CONTAINER]

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        """The inventory, streamed in pages of 1,000 records, each page timed by LILT's clock."""
        if container != CONTAINER:
            raise ContainerNotFound(
                f"a LILT store has one container, {CONTAINER!r}", container=container
            )
        path = self._inventory()
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ContainerNotFound(
                f"inventory directory {directory} does not exist (is the shared volume mounted?)",
                container=CONTAINER,
            )
        try:
            source = open(path, "rb")  # noqa: SIM115 (closed by the with below)
        except FileNotFoundError:
            # Nothing recorded yet: a fresh uploader, not an error.
            yield UploadPage([], self._server_time())
            return
        except PermissionError as error:
            raise AccessDenied(
                f"cannot read the inventory {path}: {error}", container=CONTAINER
            ) from error
        with source:
            batch: list[InventoryRecord] = []
            pages = 0
            for number, raw in enumerate(source, 1):
                if not raw.endswith(b"\n"):
                    continue  # the last line, still being written
                record = parse_record(raw)
                if record is None:
                    if raw.strip():
                        log.warning("%s:%d: not an upload record, skipped", path, number)
                    continue
                batch.append(record)
                if len(batch) == PAGE_SIZE:
                    yield self._page(batch)
                    pages += 1
                    batch = []
            if batch or not pages:
                yield self._page(batch)

    def _page(self, records: list[InventoryRecord]) -> UploadPage:
        now = self._server_time()
        with self._lock:
            self._sizes.append({r.upload_id: r.size for r in records})
        return UploadPage(
            [Upload(CONTAINER, r.key, r.upload_id, r.initiated) for r in records], now
        )

    def _recorded_size(self, upload: Upload) -> int | None:
        """The size recorded for an upload; UploadGone once its record has left the inventory
        (pruned after verification, or forgotten by the uploader on completion)."""
        with self._lock:
            for page in reversed(self._sizes):
                if upload.upload_id in page:
                    return page[upload.upload_id]
        path = self._inventory()
        try:
            with open(path, "rb") as source:
                for raw in source:
                    if raw.endswith(b"\n"):
                        record = parse_record(raw)
                        if record is not None and record.upload_id == upload.upload_id:
                            return record.size
        except FileNotFoundError:
            pass
        raise UploadGone(f"upload {upload.upload_id} is no longer in the inventory")

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        """The recorded size (LILT has no parts listing). For an upload we cancelled, the cancel
        is repeated to verify it: 404 raises UploadGone (see the module docstring)."""
        with self._lock:
            gone = upload.upload_id in self._gone
            cancelled = upload.upload_id in self._cancelled
        if gone:
            raise UploadGone(f"upload {upload.upload_id} was verified gone in this sweep")
        if cancelled:
            self._cancel(upload)  # raises UploadGone on 404: verified
            log.info(
                "LILT accepted a repeated cancel of %s: reported as still present", upload.upload_id
            )
        size = self._recorded_size(upload)
        return PartsSummary(
            size_bytes=size or 0, part_count=0, newest_part=None, server_time=self._now()
        )

    def abort(self, upload: Upload) -> None:
        try:
            self._cancel(upload)
        except UploadGone:
            # LILT does not know this upload (completed, cancelled elsewhere): its record can
            # never drive a cancel, so it goes. Only once LILT answered our listing call at this
            # endpoint, so that a misconfigured endpoint's 404s never empty the inventory.
            if self._endpoint_confirmed:
                self._queue_prune(upload)
            raise
        with self._lock:
            self._cancelled.add(upload.upload_id)

    def forget(self, upload: Upload) -> None:
        """Queue the record for pruning; the file is rewritten in batches (see FORGET_BATCH)."""
        self._queue_prune(upload)

    def _queue_prune(self, upload: Upload) -> None:
        with self._lock:
            self._cancelled.discard(upload.upload_id)
            self._gone.add(upload.upload_id)
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.add(upload.upload_id)
            due = (
                len(self._pending) >= FORGET_BATCH
                or time.monotonic() - self._pending_since >= FORGET_MAX_DELAY
            )
        if due:
            self.flush()

    def flush(self) -> int:
        """Prune the uploads verified gone so far from the inventory. Returns records removed."""
        with self._lock:
            batch, self._pending = self._pending, set()
        if not batch:
            return 0
        try:
            return prune_uploads(self._inventory(), batch)
        except BaseException:
            with self._lock:
                self._pending |= batch  # try again on the next flush
            raise

    def close(self) -> None:
        """Prune what is still queued, then drop the connections. A prune that fails (a
        read-only volume, say) is logged, not raised: the sweep's result stands, and the next
        sweep's cancels get 404 for those records and prune them again."""
        try:
            self.flush()
        except OSError:
            log.warning(
                "could not prune the LILT inventory %s", self.target.inventory_path, exc_info=True
            )
        finally:
            self._http.clear()


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (its HTTP-date form is treated as absent)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None
