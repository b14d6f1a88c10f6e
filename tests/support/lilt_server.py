"""A local LILT upload API for the LILT store's tests (LILT offers no local server).

It implements the documented wire format of the calls around a multipart upload:

* ``POST /v2/upload/s3/multipart``: JSON ``{filename, type, metadata}`` → ``{uploadId, key}``.
* ``GET /v2/upload?ids=&statuses=``: pending uploads as ``{id, filename, status, created_at}``
  (no multipart id, no S3 key, as the published client's models say).
* ``DELETE /v2/upload/s3/multipart/{uploadId}?s3Key=``: 200 ``{success, message}``; 404
  ``{message}`` for an unknown, already cancelled or mismatched upload (S3's NoSuchUpload).

Every call requires HTTP Basic auth with the API key as user and password (401 otherwise).
Any ``key`` query parameter is refused with 400: in the documented examples it carries the API
key and the S3 key both, and a client that sends it is doing something wrong. Responses carry
a Date header from the server's clock (:attr:`FakeLilt.clock_offset`; :attr:`FakeLilt.send_date`
False leaves it out). Every request is recorded (:attr:`FakeLilt.requests`), raw query included.

Query strings are decoded as RFC 3986 percent-encoding (``%20`` is a space, ``+`` is a plus),
the encoding LILT's generated client uses: a key sent with ``+`` for its spaces names another
upload.

LILT documents only the 200 ``{success: true}`` answer of a cancel and a generic error; what it
answers in every other case is unknown. Each open behaviour is a switch, so the store's tests
can run under every plausible answer:

* :attr:`FakeLilt.first_cancel`: the answer to a cancel of a pending upload. ``"200"`` cancels
  it; ``"200-false"`` (``200 {success: false}``), ``"404"`` (the upload is not visible to this
  key), ``"400"`` and ``"500"`` leave it pending.
* :attr:`FakeLilt.repeat_cancel`: the answer to a cancel of an upload already cancelled:
  ``"404"`` (S3's NoSuchUpload), ``"200"`` (an idempotent cancel), ``"200-false"``, ``"400"``,
  ``"500"``.
* :meth:`FakeLilt.throttle` answers the next N requests with the quota answer,
  :attr:`FakeLilt.quota_status`: ``429`` with ``Retry-After: 60`` (the default), or ``403`` or
  ``503`` with quota wording and no Retry-After.
"""

from __future__ import annotations

import base64
import email.utils
import itertools
import json
import secrets
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.fake_http import FakeHTTPService

_CANCEL_PREFIX = "/v2/upload/s3/multipart/"
CANCEL_ANSWERS = ("200", "200-false", "404", "400", "500")
QUOTA_STATUSES = (429, 403, 503)


@dataclass
class FakeLiltUpload:
    upload_id: str
    key: str
    numeric_id: int
    filename: str
    size: int | None
    created: datetime
    cancelled: bool = False


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int
    raw_query: str = ""


class FakeLilt(FakeHTTPService):
    """The LILT upload API on 127.0.0.1 (a free port); use as a context manager."""

    thread_name = "fake-lilt"

    def __init__(self, api_key: str = "lilt-test-api-key") -> None:
        self.api_key = api_key
        super().__init__()
        self.send_date = True
        self.first_cancel = "200"  # see CANCEL_ANSWERS
        self.repeat_cancel = "404"  # S3 semantics; "200" models an idempotent cancel
        self.quota_status = 429
        self._uploads: dict[str, FakeLiltUpload] = {}
        self._ids = itertools.count(1)
        self._throttle_left = 0
        self._requests: list[Received] = []
        self._lock = threading.Lock()

    # -- fixtures and switches -------------------------------------------------------------------

    def initiate(
        self, filename: str, size: int | None = None, *, age: timedelta = timedelta(0)
    ) -> tuple[str, str]:
        """What ``POST /v2/upload/s3/multipart`` does: returns (uploadId, key). ``age``
        backdates the upload's ``created_at``."""
        with self._lock:
            numeric = next(self._ids)
            upload_id = secrets.token_urlsafe(48)
            key = f"uploads/{numeric}/{secrets.token_hex(8)}/{filename}"
            self._uploads[upload_id] = FakeLiltUpload(
                upload_id, key, numeric, filename, size, self.now() - age
            )
        return upload_id, key

    def complete(self, upload_id: str) -> None:
        """The uploader completed the upload: LILT no longer knows it as a multipart upload."""
        with self._lock:
            del self._uploads[upload_id]

    def is_pending(self, upload_id: str) -> bool:
        with self._lock:
            upload = self._uploads.get(upload_id)
            return upload is not None and not upload.cancelled

    def throttle(self, count: int) -> None:
        with self._lock:
            self._throttle_left = count

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- request handling ------------------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        split = urllib.parse.urlsplit(raw_path)
        path = urllib.parse.unquote(split.path)
        query = parse_query(split.query)
        if "key" in query:
            return 400, {"message": "the key query parameter is not accepted here"}, {}
        if not self._authorized(headers.get("authorization", "")):
            return 401, {"message": "Unauthorized"}, {"WWW-Authenticate": 'Basic realm="LILT"'}
        with self._lock:
            if self._throttle_left > 0:
                self._throttle_left -= 1
                if self.quota_status == 429:
                    return 429, {"message": "Too many requests"}, {"Retry-After": "60"}
                return (
                    self.quota_status,
                    {"message": "API quota exceeded: 4000 requests per minute"},
                    {},
                )
        if method == "POST" and path.rstrip("/") == "/v2/upload/s3/multipart":
            return self._initiate(body)
        if method == "GET" and path.rstrip("/") == "/v2/upload":
            ids = [part for value in query.get("ids", []) for part in value.split(",") if part]
            if not all(part.isdigit() and int(part) > 0 for part in ids):
                return 400, {"message": "ids must be positive integers"}, {}
            return 200, self._pending(query), {}
        if method == "DELETE" and path.startswith(_CANCEL_PREFIX):
            return self._cancel(path[len(_CANCEL_PREFIX) :], query)
        return 404, {"message": f"no route for {method} {path}"}, {}

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(token).decode().partition(":")
        except ValueError:
            return False
        return user == self.api_key and password == self.api_key

    def _initiate(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        try:
            request = json.loads(body)
            filename = str(request["filename"])
        except (ValueError, KeyError, TypeError):
            return 400, {"message": "filename is required"}, {}
        size = (request.get("metadata") or {}).get("size")
        upload_id, key = self.initiate(filename, size if isinstance(size, int) else None)
        return 200, {"uploadId": upload_id, "key": key}, {}

    def _pending(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        wanted = {part for value in query.get("ids", []) for part in value.split(",") if part}
        with self._lock:
            uploads = [u for u in self._uploads.values() if not u.cancelled]
        return [
            {
                "id": u.numeric_id,
                "filename": u.filename,
                "status": "pending",
                "created_at": u.created.isoformat(),
            }
            for u in uploads
            if not wanted or str(u.numeric_id) in wanted
        ]

    def _cancel(
        self, upload_id: str, query: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        s3_key = query.get("s3Key", [""])[0]
        if not s3_key:
            return 400, {"message": "s3Key is required"}, {}
        with self._lock:
            upload = self._uploads.get(upload_id)
            if upload is None or upload.key != s3_key:
                return _cancel_answer("404")
            if upload.cancelled:
                return _cancel_answer(self.repeat_cancel)
            answer = self.first_cancel
            if answer == "200":
                upload.cancelled = True
        return _cancel_answer(answer)

    def _record(self, received: Received) -> None:
        with self._lock:
            self._requests.append(received)


def parse_query(raw: str) -> dict[str, list[str]]:
    """RFC 3986 query decoding: ``+`` stays a plus (``parse_qs`` would make it a space)."""
    return urllib.parse.parse_qs(raw.replace("+", "%2B"), keep_blank_values=True)


def _cancel_answer(answer: str) -> tuple[int, Any, dict[str, str]]:
    if answer == "200":
        return 200, {"success": True, "message": "Multipart upload cancelled successfully"}, {}
    if answer == "200-false":
        return 200, {"success": False, "message": "Multipart upload could not be cancelled"}, {}
    if answer == "404":
        return 404, {"message": "The specified upload does not exist."}, {}
    if answer == "400":
        return 400, {"message": "Bad request"}, {}
    if answer == "500":
        return 500, {"message": "Internal server error."}, {}
    raise ValueError(f"unknown cancel answer {answer!r}: one of {CANCEL_ANSWERS}")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeLilt
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, payload, extra = self.fake.handle(self.command, self.path, headers, body)
        split = urllib.parse.urlsplit(self.path)
        self.fake._record(
            Received(
                self.command,
                urllib.parse.unquote(split.path),
                parse_query(split.query),
                headers,
                status,
                split.query,
            )
        )
        data = json.dumps(payload).encode()
        # send_response_only: the Date header is ours to send (server clock) or to leave out.
        self.send_response_only(status)
        self.send_header("Server", "fake-lilt")
        if self.fake.send_date:
            self.send_header(
                "Date",
                email.utils.format_datetime(self.fake.now().replace(microsecond=0), usegmt=True),
            )
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _serve
    do_POST = _serve
    do_DELETE = _serve
    do_PUT = _serve


FakeLilt.handler = _Handler
