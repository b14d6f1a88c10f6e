"""An S3 endpoint on 127.0.0.1 that answers the multipart calls the janitor sends the way a
given vendor documents (or is known) to answer them, so the real boto3 client sends and parses
every response. Used for vendor behaviour no real server here reproduces: Scality CloudServer
(204 to an unknown abort unless its location sets ``legacyAwsBehavior``; abort deleting the
object at the key on some builds) and Tencent COS (``TRUE``/``FALSE`` booleans, zone-less
times, its path-style refusal).

Calls: ``GET /{bucket}?uploads``, ``GET|DELETE /{bucket}/{key}?uploadId=``, ``HEAD
/{bucket}/{key}``. Path-style only; signatures are not checked (the S3 store's signing is
proven against MinIO and Ceph).
"""

from __future__ import annotations

import email.utils
import secrets
import threading
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal
from xml.sax.saxutils import escape

from tests.support.fake_http import FakeHTTPService

TimeFormat = Literal["iso", "iso-naive", "ctime"]
AbortDeletesObject = Literal["never", "any-object", "same-upload"]


@dataclass
class VendorUpload:
    key: str
    upload_id: str
    initiated: datetime
    part_sizes: list[int]
    parts_modified: datetime


@dataclass
class VendorObject:
    last_modified: datetime
    upload_id: str | None = None  # the multipart upload that created it, if any


@dataclass
class _Failure:
    operation: str
    status: int
    code: str
    left: int


@dataclass
class VendorBehaviour:
    """The switches: each is one documented (or observed) vendor behaviour."""

    # Scality without legacyAwsBehavior (and MinIO): 204 to aborting an unknown upload id.
    unknown_abort_status: int = 404
    # Scality builds between PR #5691 and #5849 delete the data of ANY object at the key on
    # abort ("any-object"); current builds delete it when it was created by the aborted upload
    # whose overview key was left behind ("same-upload", PR #6268's case).
    abort_deletes_object: AbortDeletesObject = "never"
    uppercase_booleans: bool = False  # COS documents IsTruncated as TRUE / FALSE
    time_format: TimeFormat = "iso"
    max_page: int = 1000
    head_status: int | None = None  # force HeadObject's answer (e.g. 403)
    # The abort takes effect, then the answer is a 500 (a response lost on the way back):
    # botocore retries, and the retry finds the upload gone.
    abort_answer_lost: bool = False
    send_date: bool = True  # a proxy that strips the Date header
    # The next N answers of this operation are cut right after their headers (a connection
    # closed mid-answer): the Content-Length promises a body that never comes.
    cut_after_headers: dict[str, int] = field(default_factory=dict)


class VendorS3(FakeHTTPService):
    thread_name = "fake-vendor-s3"

    def __init__(self, behaviour: VendorBehaviour | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour or VendorBehaviour()
        self.lock = threading.Lock()
        self.buckets: dict[str, list[VendorUpload]] = {}
        self.objects: dict[tuple[str, str], VendorObject] = {}
        self.requests: list[tuple[str, str]] = []  # (operation, status)
        self._failures: list[_Failure] = []

    # -- test set-up -------------------------------------------------------------------------

    def create_bucket(self, bucket: str) -> None:
        self.buckets.setdefault(bucket, [])

    def add_upload(
        self, bucket: str, key: str, *, age: timedelta, part_sizes: list[int] | None = None
    ) -> VendorUpload:
        initiated = (self.now() - age).replace(microsecond=0)
        upload = VendorUpload(key, secrets.token_hex(8), initiated, part_sizes or [1024], initiated)
        with self.lock:
            self.buckets[bucket].append(upload)
            self.buckets[bucket].sort(key=lambda u: (u.key, u.initiated, u.upload_id))
        return upload

    def put_object(
        self, bucket: str, key: str, *, age: timedelta, upload_id: str | None = None
    ) -> None:
        moment = (self.now() - age).replace(microsecond=0)
        self.objects[(bucket, key)] = VendorObject(moment, upload_id)

    def fail_next(self, operation: str, status: int, code: str, count: int = 1) -> None:
        """The next ``count`` calls of ``operation`` answer this error."""
        self._failures.append(_Failure(operation, status, code, count))

    def open_uploads(self, bucket: str) -> set[str]:
        return {u.upload_id for u in self.buckets[bucket]}

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.requests if op == operation)

    # -- wire format -------------------------------------------------------------------------

    def time(self, moment: datetime) -> str:
        fmt = self.behaviour.time_format
        if fmt == "ctime":  # COS's older format: "Wed Jan 18 16:04:17 2017", no zone
            return moment.astimezone(UTC).strftime("%a %b %d %H:%M:%S %Y")
        if fmt == "iso-naive":
            return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000")
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def boolean(self, value: bool) -> str:
        text = "true" if value else "false"
        return text.upper() if self.behaviour.uppercase_booleans else text

    def take_failure(self, operation: str) -> _Failure | None:
        with self.lock:
            for failure in self._failures:
                if failure.operation == operation and failure.left > 0:
                    failure.left -= 1
                    return failure
        return None


def _error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message><RequestId>fake</RequestId></Error>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    fake: VendorS3
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    # -- plumbing ------------------------------------------------------------------------------

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parsed = urllib.parse.urlsplit(self.path)
        bucket, _, key = parsed.path.lstrip("/").partition("/")
        query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        return urllib.parse.unquote(bucket), urllib.parse.unquote(key), query

    def _send(self, operation: str, status: int, body: bytes = b"", **headers: str) -> None:
        self.fake.requests.append((operation, str(status)))
        self.send_response_only(status)  # send_response would add a Date of its own
        if self.fake.behaviour.send_date:
            self.send_header("Date", email.utils.format_datetime(self.fake.now(), usegmt=True))
        self.send_header("Content-Length", str(len(body)))
        if body:
            self.send_header("Content-Type", "application/xml")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        cuts = self.fake.behaviour.cut_after_headers
        if body and cuts.get(operation, 0) > 0:
            cuts[operation] -= 1
            self.close_connection = True
            return
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _failed(self, operation: str) -> bool:
        failure = self.fake.take_failure(operation)
        if failure is None:
            return False
        body = b"" if self.command == "HEAD" else _error(failure.code, failure.code)
        self._send(operation, failure.status, body)
        return True

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    # -- calls ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._drain()
        bucket, key, query = self._target()
        if "uploads" in query and not key:
            self._list_uploads(bucket, query)
        elif "uploadId" in query and key:
            self._list_parts(bucket, key, query["uploadId"][0], query)
        else:
            self._send("Unsupported", 501, _error("NotImplemented", self.path))

    def do_HEAD(self) -> None:
        bucket, key, _ = self._target()
        if self._failed("HeadObject"):
            return
        forced = self.fake.behaviour.head_status
        if forced is not None:
            self._send("HeadObject", forced)
            return
        found = self.fake.objects.get((bucket, key))
        if found is None:
            self._send("HeadObject", 404)
            return
        self._send(
            "HeadObject",
            200,
            Last_Modified=email.utils.format_datetime(found.last_modified, usegmt=True),
            ETag='"0"',
        )

    def do_DELETE(self) -> None:
        self._drain()
        bucket, key, query = self._target()
        upload_id = query.get("uploadId", [""])[0]
        if self._failed("AbortMultipartUpload"):
            return
        fake = self.fake
        with fake.lock:
            uploads = fake.buckets.get(bucket, [])
            found = next((u for u in uploads if u.upload_id == upload_id and u.key == key), None)
            if found is None:
                status = fake.behaviour.unknown_abort_status
                body = _error("NoSuchUpload", "no such upload") if status == 404 else b""
                self._send("AbortMultipartUpload", status, body)
                return
            uploads.remove(found)
            existing = fake.objects.get((bucket, key))
            mode = fake.behaviour.abort_deletes_object
            if existing is not None and (
                mode == "any-object" or (mode == "same-upload" and existing.upload_id == upload_id)
            ):
                del fake.objects[(bucket, key)]
            if fake.behaviour.abort_answer_lost:
                fake.behaviour.abort_answer_lost = False
                self._send("AbortMultipartUpload", 500, _error("InternalError", "lost"))
                return
        self._send("AbortMultipartUpload", 204)

    def _list_uploads(self, bucket: str, query: dict[str, list[str]]) -> None:
        if self._failed("ListMultipartUploads"):
            return
        fake = self.fake
        if bucket not in fake.buckets:
            self._send("ListMultipartUploads", 404, _error("NoSuchBucket", bucket))
            return
        prefix = query.get("prefix", [""])[0]
        key_marker = query.get("key-marker", [""])[0]
        id_marker = query.get("upload-id-marker", [""])[0]
        limit = min(int(query.get("max-uploads", ["1000"])[0]), fake.behaviour.max_page)
        encode = query.get("encoding-type", [""])[0] == "url"
        with fake.lock:
            rows = [u for u in fake.buckets[bucket] if u.key.startswith(prefix)]
        if key_marker:
            rows = [
                u
                for u in rows
                if u.key > key_marker
                or (u.key == key_marker and id_marker and u.upload_id > id_marker)
            ]
        page, rest = rows[:limit], rows[limit:]

        def text(value: str) -> str:
            return escape(urllib.parse.quote(value, safe="/") if encode else value)

        items = "".join(
            f"<Upload><Key>{text(u.key)}</Key><UploadId>{u.upload_id}</UploadId>"
            f"<Initiated>{fake.time(u.initiated)}</Initiated>"
            "<StorageClass>STANDARD</StorageClass></Upload>"
            for u in page
        )
        truncated = bool(rest)
        markers = (
            f"<NextKeyMarker>{text(page[-1].key)}</NextKeyMarker>"
            f"<NextUploadIdMarker>{page[-1].upload_id}</NextUploadIdMarker>"
            if truncated
            else ""
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListMultipartUploadsResult>'
            f"<Bucket>{escape(bucket)}</Bucket><KeyMarker>{text(key_marker)}</KeyMarker>"
            f"<UploadIdMarker>{escape(id_marker)}</UploadIdMarker>{markers}"
            f"{'<EncodingType>url</EncodingType>' if encode else ''}"
            f"<MaxUploads>{limit}</MaxUploads><IsTruncated>{fake.boolean(truncated)}</IsTruncated>"
            f"{items}</ListMultipartUploadsResult>"
        )
        self._send("ListMultipartUploads", 200, body.encode())

    def _list_parts(
        self, bucket: str, key: str, upload_id: str, query: dict[str, list[str]]
    ) -> None:
        if self._failed("ListParts"):
            return
        fake = self.fake
        with fake.lock:
            found = next(
                (u for u in fake.buckets.get(bucket, []) if u.upload_id == upload_id), None
            )
        if found is None:
            self._send("ListParts", 404, _error("NoSuchUpload", "no such upload"))
            return
        marker = int(query.get("part-number-marker", ["0"])[0] or 0)
        limit = min(int(query.get("max-parts", ["1000"])[0]), fake.behaviour.max_page)
        numbered = [(n, s) for n, s in enumerate(found.part_sizes, start=1) if n > marker]
        page, rest = numbered[:limit], numbered[limit:]
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber>"
            f"<LastModified>{fake.time(found.parts_modified)}</LastModified>"
            f'<ETag>"{n}"</ETag><Size>{s}</Size></Part>'
            for n, s in page
        )
        next_marker = f"<NextPartNumberMarker>{page[-1][0]}</NextPartNumberMarker>" if rest else ""
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListPartsResult>'
            f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key>"
            f"<UploadId>{upload_id}</UploadId><PartNumberMarker>{marker}</PartNumberMarker>"
            f"{next_marker}<MaxParts>{limit}</MaxParts>"
            f"<IsTruncated>{fake.boolean(bool(rest))}</IsTruncated>{parts}</ListPartsResult>"
        )
        self._send("ListParts", 200, body.encode())


VendorS3.handler = _Handler
