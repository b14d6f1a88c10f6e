"""The LILT Store: cancels the uploads recorded in an inventory (see the package docstring)."""

from __future__ import annotations

import collections
import email.utils
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

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
from mpu_janitor.stores.lilt.inventory import InventoryRecord, parse_record, prune_uploads

log = logging.getLogger(__name__)

CONTAINER = "lilt"  # one inventory, one "container" in metrics and status
PAGE_SIZE = 1000  # inventory records per listing page
FORGET_BATCH = 100  # prune the inventory once this many uploads are verified gone...
FORGET_MAX_DELAY = 5.0  # ...or this many seconds after the first one, whichever comes first
SIZE_CACHE_PAGES = 8  # recent listing pages whose sizes measure() can look up without a scan
API_KEY_ENV = "LILT_API_KEY"
QUOTA_MESSAGE = "LILT quota of 4000 requests a minute exceeded: LILT asks for a 60 s wait"
QUOTA_WAIT_SECONDS = 60.0


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
