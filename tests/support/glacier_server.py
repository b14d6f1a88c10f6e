"""A local Amazon S3 Glacier endpoint for the Glacier store's tests (no Glacier server exists
to run locally, and moto does not model multipart uploads of vaults).

It speaks the documented REST JSON wire format of the three calls the janitor uses, so the
real boto3 client signs, sends and parses every request:

* ``GET /{account}/vaults/{vault}/multipart-uploads?limit=&marker=``: ``limit`` 1-1000 (default
  50), an opaque ``marker``, results in no particular order (sorted by a hash of the id).
* ``GET /{account}/vaults/{vault}/multipart-uploads/{id}?limit=&marker=``: parts with
  ``RangeInBytes`` and ``SHA256TreeHash``, paged the same way.
* ``DELETE /{account}/vaults/{vault}/multipart-uploads/{id}``: 204; a repeat within
  ``abort_grace`` answers 204 again (Glacier's "idempotent for a short time"), later 404.

Every request must carry ``x-amz-glacier-version: 2012-06-01`` and a valid AWS Signature V4
for the server's key pair (checked by recomputing it, as AWS does, including the 15-minute
clock-skew limit). Errors are JSON bodies ``{"code", "message", "type"}`` with the
``x-amzn-ErrorType`` header. Every response carries a ``Date`` header from the server's own
clock, which tests can set apart from the local clock with :attr:`FakeGlacier.clock_offset`.
Test switches: :meth:`FakeGlacier.throttle` (LimitExceededException for the next N requests)
and :meth:`FakeGlacier.hang` (no answer for a while).
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
    part_sizes: list[int]
    aborted_at: datetime | None = None

    @property
    def size(self) -> int:
        return sum(self.part_sizes)


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
    throttle_code: str = "LimitExceededException"
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
        sizes = [part_size] * parts
        if parts and last_part_size is not None:
            sizes[-1] = last_part_size
        upload_id = secrets.token_urlsafe(69)[:92]  # Glacier ids are long opaque strings
        moment = self.now() - age
        created = moment.replace(microsecond=moment.microsecond // 1000 * 1000)  # ms on the wire
        with self._lock:
            self._state.vaults.setdefault(vault, {})[upload_id] = FakeUpload(
                upload_id, vault, description, created, part_size, sizes
            )
        return upload_id

    def uploads(self, vault: str) -> list[FakeUpload]:
        """The uploads still in progress (not aborted) in a vault."""
        with self._lock:
            return [u for u in self._state.vaults.get(vault, {}).values() if u.aborted_at is None]

    def has_upload(self, vault: str, upload_id: str) -> bool:
        return any(u.upload_id == upload_id for u in self.uploads(vault))

    # -- switches --------------------------------------------------------------------------------

    def throttle(self, count: int, code: str = "LimitExceededException") -> None:
        """Answer the next ``count`` requests with a throttling error (HTTP 400, as Glacier)."""
        with self._lock:
            self._state.throttle_left = count
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
        if abs(signed_at - self.now()) > MAX_SKEW:
            raise GlacierError(
                403,
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is now earlier than "
                f"{(self.now() - MAX_SKEW).strftime('%Y%m%dT%H%M%SZ')}",
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

    @staticmethod
    def _limit(query: dict[str, list[str]]) -> int:
        text = query.get("limit", ["50"])[0]
        if not text.isdigit() or not 1 <= int(text) <= 1000:
            raise GlacierError(
                400, "InvalidParameterValueException", f"Invalid limit: {text} (1 to 1000)"
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
        if upload is None or upload.aborted_at is not None:
            raise GlacierError(
                404, "ResourceNotFoundException", f"The upload ID was not found: {upload_id}"
            )
        return upload

    def _list_uploads(self, vault: str, limit: int, marker: str | None) -> dict[str, Any]:
        with self._lock:
            live = sorted(
                (self._order(u.upload_id), u)
                for u in self._vault(vault).values()
                if u.aborted_at is None
            )
        after = _unb64(marker).get("after", "") if marker else ""
        rest = [u for order, u in live if order > after]
        page = rest[:limit]
        next_marker = (
            _b64({"after": self._order(page[-1].upload_id)}) if len(rest) > limit else None
        )
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
            upload = self._live(vault, upload_id)
            sizes = list(upload.part_sizes)
        start = int(_unb64(marker).get("index", 0)) if marker else 0
        page = list(range(start, min(start + limit, len(sizes))))
        parts = []
        for index in page:
            first = index * upload.part_size
            parts.append(
                {
                    "RangeInBytes": f"{first}-{first + sizes[index] - 1}",
                    "SHA256TreeHash": hashlib.sha256(f"{upload_id}/{index}".encode()).hexdigest(),
                }
            )
        end = start + len(page)
        return {
            "ArchiveDescription": upload.description,
            "CreationDate": _iso(upload.created),
            "Marker": _b64({"index": end}) if end < len(sizes) else None,
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
            if upload.aborted_at is None:
                upload.aborted_at = self.now()
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
