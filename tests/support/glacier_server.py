"""A local Amazon S3 Glacier endpoint for the Glacier store's tests (no Glacier server exists
to run locally, and moto does not model multipart uploads of vaults).

It speaks the documented REST JSON wire format of the three calls the janitor uses, so the
real boto3 client signs, sends and parses every request:

* ``GET /{account}/vaults/{vault}/multipart-uploads?limit=&marker=``: ``limit`` 1-50 (default
  50, the AWS reference since 2018), a ``marker`` naming the upload the next page begins at
  (as AWS's do), results in no particular order (sorted by a hash of the id).
* ``GET /{account}/vaults/{vault}/multipart-uploads/{id}?limit=&marker=``: parts with
  ``RangeInBytes`` and ``SHA256TreeHash``, sorted by range (as documented), paged the same way;
  the marker names the range start of the part the next page begins at.
* ``DELETE /{account}/vaults/{vault}/multipart-uploads/{id}``: 204; a repeat within
  ``abort_grace`` answers 204 again (Glacier's "idempotent for a short time"), later 404.

Every request must carry ``x-amz-glacier-version: 2012-06-01`` and a valid AWS Signature V4
for the server's key pair (checked by recomputing it, as AWS does, including the 15-minute
clock-skew limit). Errors are JSON bodies ``{"code", "message", "type"}`` with the
``x-amzn-ErrorType`` header. Every response carries a ``Date`` header from the server's own
clock, which tests can set apart from the local clock with :attr:`FakeGlacier.clock_offset`.

Variants, for behaviour AWS leaves undocumented or that only shows under load (attributes of
:class:`FakeGlacier`, set by the test):

* ``page_limit``: ``"reject"`` answers a ``limit`` above 50 with
  ``InvalidParameterValueException``; ``"cap"`` silently serves at most 50.
* ``stale_markers``: ``"resume"`` continues a listing whose marker names an upload that is gone
  at the position it had; ``"404"`` answers ``ResourceNotFoundException``.
* ``cycle_markers``: every marker after the first one is answered with the first one again
  (A -> B -> A ...), in both listings.
* ``part_markers``: ``"range"`` (the default) or ``"position"``: the marker is the index of
  the next part in the sorted list, so a part landing below it mid-listing shifts the list and
  one part is listed twice.
* ``abort_lag``: List Parts keeps answering for an aborted upload for this many requests.
* ``completed_error``: what aborting (or listing the parts of) a completed upload answers.
* ``parts_page_hook``: called before each List Parts page (upload id, page number from 1);
  ``request_hook``: before each request (method, path), may raise :class:`GlacierError`.
* ``request_budget``: past this many requests everything is refused (a looping client fails
  instead of hanging the suite).
* :meth:`FakeGlacier.throttle` (``ThrottlingException`` for N requests, optionally after M
  answered ones) and :meth:`FakeGlacier.hang` (no answer for a while).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.support.fake_http import FakeHTTPService

GLACIER_VERSION = "2012-06-01"
MAX_SKEW = timedelta(minutes=15)
MAX_LIMIT = 50  # ListMultipartUploads and ListParts: 1-50 (the AWS reference since 2018)
MiB = 1024 * 1024

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<signed>[^,]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)
_PATH_RE = re.compile(
    r"^/(?P<account>[^/]+)/vaults/(?P<vault>[^/]+)/multipart-uploads(?:/(?P<upload>[^/]+))?$"
)


class GlacierError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class FakeUpload:
    upload_id: str
    vault: str
    description: str | None
    created: datetime
    part_size: int
    parts: dict[int, tuple[int, int]]  # part index -> (size, generation of its tree hash)
    aborted_at: datetime | None = None
    completed: bool = False
    lag_left: int = 0  # List Parts answers still served after the abort

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.parts.values())

    @property
    def part_sizes(self) -> list[int]:
        return [self.parts[index][0] for index in sorted(self.parts)]

    @property
    def in_progress(self) -> bool:
        return self.aborted_at is None and not self.completed


@dataclass(frozen=True)
class Received:
    """One request as the server saw it (after its checks)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int


@dataclass
class _State:
    vaults: dict[str, dict[str, FakeUpload]] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    throttle_left: int = 0
    throttle_after: int = 0
    throttle_code: str = "ThrottlingException"
    first_markers: dict[tuple[str, str | None], str] = field(default_factory=dict)
    parts_pages: dict[str, int] = field(default_factory=dict)
    hang_left: int = 0
    hang_seconds: float = 0.0


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _unb64(token: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError) as error:
        raise GlacierError(400, "InvalidParameterValueException", "Invalid marker") from error
    if not isinstance(value, dict):
        raise GlacierError(400, "InvalidParameterValueException", "Invalid marker")
    return value


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )


class FakeGlacier(FakeHTTPService):
    """A Glacier endpoint on 127.0.0.1 (a free port); use as a context manager."""

    thread_name = "fake-glacier"

    def __init__(
        self,
        *,
        access_key: str = "AKIAFAKEGLACIER00001",
        secret_key: str = "fake-glacier-secret",
        region: str = "us-east-1",
        account_id: str = "111122223333",
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.account_id = account_id
        super().__init__()
        self.abort_grace = timedelta(seconds=60)
        self.max_skew = MAX_SKEW
        # Variants (see the module docstring).
        self.page_limit = "reject"
        self.stale_markers = "resume"
        self.cycle_markers = False
        self.part_markers = "range"
        self.abort_lag = 0
        self.completed_error: tuple[int, str] = (404, "ResourceNotFoundException")
        self.parts_page_hook: Callable[[str, int], None] | None = None
        # Called with (method, path) before each signed request is served; may raise
        # GlacierError to answer with it.
        self.request_hook: Callable[[str, str], None] | None = None
        # A safety net for tests of listings that might never end: past this many requests,
        # every request is refused (so a looping client fails instead of hanging the suite).
        self.request_budget: int | None = None
        self._state = _State()
        self._lock = threading.Lock()

    # -- fixtures --------------------------------------------------------------------------------

    def create_vault(self, name: str) -> None:
        with self._lock:
            self._state.vaults.setdefault(name, {})

    def add_upload(
        self,
        vault: str,
        description: str | None = None,
        *,
        age: timedelta = timedelta(0),
        part_size: int = MiB,
        parts: int = 0,
        last_part_size: int | None = None,
    ) -> str:
        """An incomplete upload created ``age`` ago on the server's clock, holding ``parts``
        parts of ``part_size`` bytes (the last one ``last_part_size`` bytes if given)."""
        sizes = {index: (part_size, 0) for index in range(parts)}
        if parts and last_part_size is not None:
            sizes[parts - 1] = (last_part_size, 0)
        upload_id = secrets.token_urlsafe(69)[:92]  # Glacier ids are long opaque strings
        moment = self.now() - age
        created = moment.replace(microsecond=moment.microsecond // 1000 * 1000)  # ms on the wire
        with self._lock:
            self._state.vaults.setdefault(vault, {})[upload_id] = FakeUpload(
                upload_id, vault, description, created, part_size, sizes
            )
        return upload_id

    def add_part(self, vault: str, upload_id: str, index: int, size: int | None = None) -> None:
        """Upload part ``index`` (its range starts at ``index * part_size``); uploading it
        again replaces it (a new tree hash)."""
        with self._lock:
            upload = self._state.vaults[vault][upload_id]
            generation = upload.parts[index][1] + 1 if index in upload.parts else 0
            upload.parts[index] = (upload.part_size if size is None else size, generation)

    def complete(self, vault: str, upload_id: str) -> None:
        """The uploader completed the upload: it becomes an archive, no longer listed."""
        with self._lock:
            self._state.vaults[vault][upload_id].completed = True

    def remove(self, vault: str, upload_id: str) -> None:
        """The upload vanishes without trace (AWS removing an upload idle for 24 hours)."""
        with self._lock:
            del self._state.vaults[vault][upload_id]

    def uploads(self, vault: str) -> list[FakeUpload]:
        """The uploads still in progress (not aborted, not completed) in a vault."""
        with self._lock:
            return [u for u in self._state.vaults.get(vault, {}).values() if u.in_progress]

    def has_upload(self, vault: str, upload_id: str) -> bool:
        return any(u.upload_id == upload_id for u in self.uploads(vault))

    # -- switches --------------------------------------------------------------------------------

    def throttle(self, count: int, code: str = "ThrottlingException", *, after: int = 0) -> None:
        """Answer ``count`` requests with ``code`` (HTTP 400, as Glacier), once ``after`` more
        requests have been answered normally."""
        with self._lock:
            self._state.throttle_left = count
            self._state.throttle_after = after
            self._state.throttle_code = code

    def hang(self, count: int, seconds: float) -> None:
        """Sit ``seconds`` on each of the next ``count`` requests before answering."""
        with self._lock:
            self._state.hang_left = count
            self._state.hang_seconds = seconds

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._state.requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._state.requests.clear()

    # -- request handling (called by the handler threads) ----------------------------------------

    def _record(self, received: Received) -> None:
        with self._lock:
            self._state.requests.append(received)

    def _take_hang(self) -> float:
        with self._lock:
            if self._state.hang_left > 0:
                self._state.hang_left -= 1
                return self._state.hang_seconds
        return 0.0

    def _take_throttle(self) -> str | None:
        with self._lock:
            if self._state.throttle_after > 0:
                self._state.throttle_after -= 1
                return None
            if self._state.throttle_left > 0:
                self._state.throttle_left -= 1
                return self._state.throttle_code
        return None

    def check_signature(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> None:
        """Recompute the request's Signature V4 the way AWS does; raise what AWS would."""
        auth = headers.get("authorization")
        if not auth:
            raise GlacierError(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        match = _AUTH_RE.match(auth)
        if match is None:
            raise GlacierError(
                403,
                "IncompleteSignatureException",
                f"Authorization header requires AWS4-HMAC-SHA256: {auth[:40]}",
            )
        if match["key"] != self.access_key:
            raise GlacierError(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        if match["service"] != "glacier" or match["region"] != self.region:
            raise GlacierError(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region and service "
                f"({self.region}/glacier)",
            )
        amz_date = headers.get("x-amz-date", "")
        try:
            signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError as error:
            raise GlacierError(
                403, "IncompleteSignatureException", "x-amz-date is missing or malformed"
            ) from error
        if abs(signed_at - self.now()) > self.max_skew:
            raise GlacierError(
                403,
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is now earlier than "
                f"{(self.now() - self.max_skew).strftime('%Y%m%dT%H%M%SZ')}",
            )
        signed = match["signed"].split(";")
        request = AWSRequest(
            method=method,
            url=f"http://{headers.get('host', '')}{raw_path}",
            headers={name: headers.get(name, "") for name in signed},
            data=body,
        )
        request.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(self.access_key, self.secret_key), "glacier", self.region)
        expected = signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request
        )
        if not hmac.compare_digest(expected, match["signature"]):
            raise GlacierError(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        """One request: checks, then the operation. Returns (status, JSON body or None)."""
        delay = self._take_hang()
        if delay:
            time.sleep(delay)
        if headers.get("x-amz-glacier-version") != GLACIER_VERSION:
            raise GlacierError(
                400,
                "MissingParameterValueException",
                f"Required header x-amz-glacier-version: {GLACIER_VERSION}",
            )
        self.check_signature(method, raw_path, headers, body)
        with self._lock:
            if self.request_budget is not None:
                if self.request_budget <= 0:
                    raise GlacierError(400, "RequestBudgetExhausted", "test request budget spent")
                self.request_budget -= 1
        if self.request_hook is not None:
            self.request_hook(method, urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path))
        code = self._take_throttle()
        if code is not None:
            raise GlacierError(400, code, "Too many requests; slow down.")
        split = urllib.parse.urlsplit(raw_path)
        match = _PATH_RE.match(urllib.parse.unquote(split.path))
        if match is None:
            raise GlacierError(404, "ResourceNotFoundException", f"No such resource {split.path}")
        if match["account"] not in ("-", self.account_id):
            raise GlacierError(
                403, "AccessDeniedException", f"Access denied to account {match['account']}"
            )
        query = urllib.parse.parse_qs(split.query)
        vault, upload_id = match["vault"], match["upload"]
        limit = self._limit(query)
        marker = query.get("marker", [None])[0]
        if method == "GET" and upload_id is None:
            return 200, self._list_uploads(vault, limit, marker)
        if method == "GET":
            return 200, self._list_parts(vault, upload_id, limit, marker)
        if method == "DELETE" and upload_id is not None:
            self._abort(vault, upload_id)
            return 204, None
        raise GlacierError(400, "InvalidParameterValueException", f"{method} not supported here")

    def _limit(self, query: dict[str, list[str]]) -> int:
        text = query.get("limit", [str(MAX_LIMIT)])[0]
        if text.isdigit() and int(text) > MAX_LIMIT and self.page_limit == "cap":
            return MAX_LIMIT
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise GlacierError(
                400,
                "InvalidParameterValueException",
                f"Invalid limit: {text} (1 to {MAX_LIMIT})",
            )
        return int(text)

    def _vault(self, vault: str) -> dict[str, FakeUpload]:
        uploads = self._state.vaults.get(vault)
        if uploads is None:
            raise GlacierError(
                404, "ResourceNotFoundException", f"Vault not found for ARN: {self._arn(vault)}"
            )
        return uploads

    def _arn(self, vault: str) -> str:
        return f"arn:aws:glacier:{self.region}:{self.account_id}:vaults/{vault}"

    @staticmethod
    def _order(upload_id: str) -> str:
        # Glacier promises no order: list by a hash of the id, neither by time nor by name.
        return hashlib.sha256(upload_id.encode()).hexdigest() + upload_id

    def _live(self, vault: str, upload_id: str) -> FakeUpload:
        upload = self._vault(vault).get(upload_id)
        if upload is not None and upload.aborted_at is not None and upload.lag_left > 0:
            upload.lag_left -= 1  # the abort has not reached every replica yet
            return upload
        if upload is not None and upload.completed:
            status, code = self.completed_error
            raise GlacierError(status, code, f"The upload was completed: {upload_id}")
        if upload is None or not upload.in_progress:
            raise GlacierError(
                404, "ResourceNotFoundException", f"The upload ID was not found: {upload_id}"
            )
        return upload

    def _next_marker(
        self, listing: tuple[str, str | None], asked: str | None, real: str | None
    ) -> str | None:
        """The marker to answer: the real one, or in the cycling variant the first one again."""
        if real is None:
            return None
        first = self._state.first_markers.setdefault(listing, real)
        if self.cycle_markers and asked is not None and asked != first:
            return first
        return real

    def _list_uploads(self, vault: str, limit: int, marker: str | None) -> dict[str, Any]:
        with self._lock:
            uploads = self._vault(vault)
            live = sorted((self._order(u.upload_id), u) for u in uploads.values() if u.in_progress)
            begin = ""
            if marker:
                begin_id = str(_unb64(marker).get("upload", ""))
                if self.stale_markers == "404" and not (
                    begin_id in uploads and uploads[begin_id].in_progress
                ):
                    raise GlacierError(
                        404,
                        "ResourceNotFoundException",
                        f"The upload ID was not found: {begin_id}",
                    )
                begin = self._order(begin_id)
            rest = [u for order, u in live if order >= begin]
            page = rest[:limit]
            real = _b64({"upload": rest[limit].upload_id}) if len(rest) > limit else None
            next_marker = self._next_marker((vault, None), marker, real)
        return {
            "Marker": next_marker,
            "UploadsList": [
                {
                    "ArchiveDescription": u.description,
                    "CreationDate": _iso(u.created),
                    "MultipartUploadId": u.upload_id,
                    "PartSizeInBytes": u.part_size,
                    "VaultARN": self._arn(vault),
                }
                for u in page
            ],
        }

    def _list_parts(
        self, vault: str, upload_id: str, limit: int, marker: str | None
    ) -> dict[str, Any]:
        with self._lock:
            self._state.parts_pages[upload_id] = self._state.parts_pages.get(upload_id, 0) + 1
            page_number = self._state.parts_pages[upload_id]
        if self.parts_page_hook is not None:
            self.parts_page_hook(upload_id, page_number)
        with self._lock:
            upload = self._live(vault, upload_id)
            ordered = sorted(upload.parts.items())  # sorted by range
            position = 0
            if marker:
                where = _unb64(marker)
                if self.part_markers == "position":
                    position = int(where.get("index", 0))
                else:
                    start = int(where.get("start", 0))
                    position = next(
                        (n for n, (i, _) in enumerate(ordered) if i * upload.part_size >= start),
                        len(ordered),
                    )
            page = ordered[position : position + limit]
            end = position + len(page)
            real = None
            if end < len(ordered):
                real = _b64(
                    {"index": end}
                    if self.part_markers == "position"
                    else {"start": ordered[end][0] * upload.part_size}
                )
            next_marker = self._next_marker((vault, upload_id), marker, real)
        parts = []
        for index, (size, generation) in page:
            first = index * upload.part_size
            parts.append(
                {
                    "RangeInBytes": f"{first}-{first + size - 1}",
                    "SHA256TreeHash": hashlib.sha256(
                        f"{upload_id}/{index}/{generation}".encode()
                    ).hexdigest(),
                }
            )
        return {
            "ArchiveDescription": upload.description,
            "CreationDate": _iso(upload.created),
            "Marker": next_marker,
            "MultipartUploadId": upload_id,
            "PartSizeInBytes": upload.part_size,
            "Parts": parts,
            "VaultARN": self._arn(vault),
        }

    def _abort(self, vault: str, upload_id: str) -> None:
        with self._lock:
            upload = self._vault(vault).get(upload_id)
            if upload is None:
                raise GlacierError(
                    404, "ResourceNotFoundException", f"The upload ID was not found: {upload_id}"
                )
            if upload.completed:
                status, code = self.completed_error
                raise GlacierError(status, code, f"The upload was completed: {upload_id}")
            if upload.aborted_at is None:
                upload.aborted_at = self.now()
                upload.lag_left = self.abort_lag
            elif self.now() - upload.aborted_at > self.abort_grace:
                raise GlacierError(
                    404, "ResourceNotFoundException", f"The upload ID was not found: {upload_id}"
                )


class _Handler(BaseHTTPRequestHandler):
    fake: FakeGlacier
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: pytest shows failures, not every request."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header of every response comes from the server's clock, not the local one.
        return email.utils.format_datetime(self.fake.now().replace(microsecond=0), usegmt=True)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            status, payload = self.fake.handle(self.command, self.path, headers, body)
            extra: dict[str, str] = {}
        except GlacierError as error:
            status = error.status
            payload = {
                "code": error.code,
                "message": error.message,
                "type": "Client" if status < 500 else "Server",
            }
            extra = {
                "x-amzn-ErrorType": f"{error.code}:http://internal.amazon.com/coral/"
                "com.amazon.glacier.v2012_06_01/"
            }
        split = urllib.parse.urlsplit(self.path)
        self.fake._record(
            Received(
                self.command,
                urllib.parse.unquote(split.path),
                urllib.parse.parse_qs(split.query),
                headers,
                status,
            )
        )
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("x-amzn-RequestId", secrets.token_urlsafe(32))
        for name, value in extra.items():
            self.send_header(name, value)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = _serve
    do_DELETE = _serve
    do_POST = _serve
    do_PUT = _serve


FakeGlacier.handler = _Handler
