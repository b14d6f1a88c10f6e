"""The HTTP client of LILT's uploads API: the two documented calls the sweep sends.

* ``GET /v2/upload`` (no parameters): the pending uploads, ``[{id, filename, status,
  created_at}]``. Its answer proves the endpoint and the API key, and its Date is LILT's clock.
* ``DELETE /v2/upload/s3/multipart/{uploadId}?s3Key=``: cancel; documented answers are
  200 ``{success, message}`` and a generic error ``{message}``. Every answer is handed back as
  a :class:`CancelAnswer` for the store to judge; only the key, the quota and the network
  raise here.

Auth is HTTP Basic with the API key as user and password (never the ``key`` query parameter,
which collides with the S3 key); redirects are not followed (they would carry the
credentials). Query values are percent-encoded as LILT's generated client does (RFC 3986:
a space is ``%20``, ``/`` stays). Every answer's Date header keeps LILT's clock
(:meth:`LiltApi.now`).

Quota: 4,000 requests a minute, then a 60 s wait. A 429, and a 403 or 503 whose message
speaks of a quota or rate limit, raise Throttled asking for that wait (or the Retry-After,
capped at 5 minutes).
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import urllib3

from mpu_janitor import __version__
from mpu_janitor.stores.base import (
    AccessDenied,
    RequestObserver,
    StoreError,
    StoreUnreachable,
    Throttled,
)

log = logging.getLogger(__name__)

CONTAINER = "lilt"  # one inventory, one "container" in metrics and status
QUOTA_MESSAGE = "LILT quota of 4000 requests a minute exceeded: LILT asks for a 60 s wait"
QUOTA_WAIT_SECONDS = 60.0
MAX_RETRY_AFTER_SECONDS = 300.0
_QUOTA_WORDING = re.compile(
    r"quota|rate.?limit|too many requests|requests? per minute|limit exceeded", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class CancelAnswer:
    """LILT's answer to a cancel: ``status`` and, for a 200, its ``success`` field."""

    status: int
    success: bool | None
    message: str

    @property
    def confirmed(self) -> bool:
        """The documented confirmation: 2xx, and ``success`` not false."""
        return 200 <= self.status < 300 and self.success is not False

    @property
    def refused(self) -> bool:
        """LILT answered about the request or the upload and did not cancel:
        ``200 {success: false}`` or a 4xx other than 404 (and the key and quota answers,
        which raise)."""
        return (200 <= self.status < 300 and self.success is False) or (
            400 <= self.status < 500 and self.status != 404
        )

    @property
    def not_found(self) -> bool:
        return self.status == 404

    def describe(self) -> str:
        if 200 <= self.status < 300:
            return f"200 {{success: {str(self.success).lower()}}}: {self.message}"
        return f"{self.status}: {self.message}"


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """One item of ``GET /v2/upload``."""

    id: object
    filename: str | None
    status: str | None
    created_at: datetime | None


def quote_query(query: dict[str, str]) -> str:
    """``k=v&...`` percent-encoded as LILT's generated client does (``quote``, ``/`` kept)."""
    return "&".join(
        f"{urllib.parse.quote(name, safe='')}={urllib.parse.quote(value, safe='/')}"
        for name, value in query.items()
    )


def _failure_code(error: BaseException | None) -> str:
    """The observer's code for a request that got no answer."""
    # urllib3 makes NewConnectionError a ConnectTimeoutError for compatibility: a refused
    # connection is not a timeout.
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        return "ConnectionError"
    if isinstance(error, urllib3.exceptions.TimeoutError):
        return "Timeout"
    return "ConnectionError"


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (its HTTP-date form is treated as absent)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None


class LiltApi:
    """One LILT account at one endpoint; thread-safe."""

    def __init__(
        self,
        endpoint: str,
        api_key: str | None,
        observer: RequestObserver,
        *,
        pool_size: int,
        read_timeout: float = 30.0,
        key_hint: str = "",
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._observer = observer
        self._key_hint = key_hint
        self._headers: dict[str, str] | None = None
        if api_key:
            self._headers = urllib3.util.make_headers(basic_auth=f"{api_key}:{api_key}")
            self._headers.update(
                {"Accept": "application/json", "User-Agent": f"mpu-janitor/{__version__}"}
            )
        self._http = urllib3.PoolManager(
            maxsize=pool_size,
            timeout=urllib3.Timeout(connect=5.0, read=read_timeout),
            # Retry only what never reached LILT (connecting). A cancel whose answer was lost may
            # have been done: a blind retry would see 404 and call our own work "not found".
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
        self._clock: tuple[datetime, float] | None = None  # (LILT's time, our monotonic then)
        self._warned_no_date = False
        self.endpoint_confirmed = False  # GET /v2/upload answered 200 with a list here

    # -- the clock ---------------------------------------------------------------------------

    def _note_clock(self, response: urllib3.BaseHTTPResponse) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        try:
            moment = email.utils.parsedate_to_datetime(date).astimezone(UTC)
        except (TypeError, ValueError):
            return
        with self._lock:
            self._clock = (moment, time.monotonic())

    def store_clock(self) -> datetime | None:
        """LILT's clock as last seen, advanced by our monotonic clock since; None when LILT
        sent no usable Date header (the engine then judges no age: never the local clock)."""
        with self._lock:
            clock = self._clock
            warn = clock is None and not self._warned_no_date
            self._warned_no_date = self._warned_no_date or warn
        if clock is None:
            if warn:
                log.warning(
                    "LILT at %s sent no Date header: ages are not judged without its clock",
                    self.endpoint,
                )
            return None
        seen, at = clock
        return seen + timedelta(seconds=time.monotonic() - at)

    def now(self) -> datetime:
        """For bookkeeping in the inventory (attempt times): LILT's clock, else ours."""
        return self.store_clock() or datetime.now(UTC)

    # -- requests ------------------------------------------------------------------------------

    def _observe(self, operation: str, code: str) -> None:
        try:
            self._observer(operation, code)
        except Exception:  # a broken metrics callback must never break a store call
            log.exception("request observer failed")

    def _request(
        self, method: str, operation: str, path: str, query: dict[str, str]
    ) -> urllib3.BaseHTTPResponse:
        if self._headers is None:
            raise AccessDenied(f"no LILT API key: {self._key_hint}", container=CONTAINER)
        url = f"{self.endpoint}{path}"
        if query:
            url += f"?{quote_query(query)}"
        try:
            response = self._http.request(method, url, headers=self._headers, redirect=False)
        except urllib3.exceptions.MaxRetryError as error:
            self._observe(operation, _failure_code(error.reason))
            raise StoreUnreachable(
                f"LILT at {self.endpoint}: {error.reason}", container=CONTAINER
            ) from error
        except urllib3.exceptions.HTTPError as error:
            self._observe(operation, _failure_code(error))
            raise StoreUnreachable(
                f"LILT at {self.endpoint}: {error}", container=CONTAINER
            ) from error
        self._observe(operation, str(response.status))
        self._note_clock(response)
        self._raise_for_key_and_quota(response)
        return response

    @staticmethod
    def _body(response: urllib3.BaseHTTPResponse) -> Any:
        try:
            return json.loads(response.data or b"null")
        except ValueError:
            return None

    def _message(self, response: urllib3.BaseHTTPResponse) -> str:
        body = self._body(response)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return str(body["message"])
        return response.data[:200].decode("utf-8", "replace").strip() or response.reason or ""

    def _raise_for_key_and_quota(self, response: urllib3.BaseHTTPResponse) -> None:
        status = response.status
        if status not in (401, 403, 429, 503) and not 300 <= status < 400:
            return
        message = self._message(response)
        if status == 429 or (status in (403, 503) and _QUOTA_WORDING.search(message)):
            retry_after = response.headers.get("Retry-After")
            hint = f" (Retry-After: {retry_after})" if retry_after else ""
            wait = min(_seconds(retry_after) or QUOTA_WAIT_SECONDS, MAX_RETRY_AFTER_SECONDS)
            raise Throttled(
                f"{QUOTA_MESSAGE}{hint}: {status} {message}",
                container=CONTAINER,
                retry_after=wait,
            )
        if status in (401, 403):
            raise AccessDenied(
                f"LILT rejected the API key ({status}): {message}", container=CONTAINER
            )
        if status == 503:
            raise StoreUnreachable(f"LILT answered 503: {message}", container=CONTAINER)
        raise StoreError(
            f"LILT redirected ({status}) to {response.headers.get('Location')}; "
            "not followed (it would carry the credentials)",
            container=CONTAINER,
        )

    # -- the two calls ---------------------------------------------------------------------

    def pending(self) -> list[PendingUpload]:
        """``GET /v2/upload``: LILT's pending uploads for this key. Anything but 200 with a
        list raises (a wrong endpoint must never drive cancels)."""
        response = self._request("GET", "ListUploads", "/v2/upload", {})
        body = self._body(response)
        if response.status != 200 or not isinstance(body, list):
            message = self._message(response)
            text = (
                f"LILT at {self.endpoint} answered {response.status} to GET /v2/upload "
                f"({message[:200]}): is spec.store.lilt.endpoint right?"
            )
            if response.status in (502, 504):
                raise StoreUnreachable(text, container=CONTAINER)
            raise StoreError(text, container=CONTAINER)
        self.endpoint_confirmed = True
        items = []
        for item in body:
            if not isinstance(item, dict):
                continue
            filename, status = item.get("filename"), item.get("status")
            created = item.get("created_at")
            moment = None
            if isinstance(created, str):
                try:
                    moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
                except ValueError:
                    moment = None
            items.append(
                PendingUpload(
                    item.get("id"),
                    filename if isinstance(filename, str) else None,
                    status if isinstance(status, str) else None,
                    moment.astimezone(UTC) if moment and moment.tzinfo else None,
                )
            )
        return items

    def cancel(self, upload_id: str, key: str) -> CancelAnswer:
        """``DELETE /v2/upload/s3/multipart/{uploadId}?s3Key=``: LILT's answer, whatever it
        is. Raises AccessDenied, Throttled or StoreUnreachable (no answer at all)."""
        path = f"/v2/upload/s3/multipart/{urllib.parse.quote(upload_id, safe='')}"
        response = self._request("DELETE", "CancelMultipartUpload", path, {"s3Key": key})
        if response.status in (502, 504):  # a gateway's answer, not LILT's: an outage
            raise StoreUnreachable(
                f"LILT answered {response.status}: {self._message(response)}", container=CONTAINER
            )
        success = None
        if 200 <= response.status < 300:
            body = self._body(response)
            if isinstance(body, dict) and isinstance(body.get("success"), bool):
                success = bool(body["success"])
        return CancelAnswer(response.status, success, self._message(response))

    def close(self) -> None:
        self._http.clear()
