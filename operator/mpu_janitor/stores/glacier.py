"""Amazon S3 Glacier vaults: the incomplete multipart uploads of a policy's vaults, via botocore.

Vaults have no lifecycle rules. AWS says an upload idle for 24 hours may be removed by the
service itself, but "may" is no promise of when (nor that its parts stop being billed sooner):
a client-side cleaner is what makes the freeing prompt and visible. Expect ``alreadyGone``
counts: an upload listed by one sweep can be gone (removed by AWS, completed or aborted by its
uploader) by the time it is measured or aborted.

What this module builds on (Glacier API reference, version 2012-06-01, and botocore's model):

* List Multipart Uploads: ``limit`` 1-50 (since 2018; it was 1,000 before), an opaque
  ``marker`` naming the upload the next page begins at (null at the end), no guaranteed order.
  Each upload has ``MultipartUploadId``, ``CreationDate`` and an optional
  ``ArchiveDescription``, which stands in for the key (prefixes and globs match on it).
* List Parts: ``limit`` 1-50 and a ``marker`` too, sorted by range. Each part has
  ``RangeInBytes`` (``"0-1048575"``, both ends inclusive) and ``SHA256TreeHash``: the bytes an
  upload holds are the bytes its ranges cover. An upload has at most 10,000 parts.
* Abort: 204. Repeating it succeeds "for a short time", then the upload id is unknown
  (``ResourceNotFoundException``, 404), which is also what List Parts answers once it is gone:
  that is how an abort is verified. "Aborting a completed upload fails" (the code is not
  documented): a 404 is counted already gone, any other answer a failure of that upload; the
  archive is never touched either way.
* Errors: ``ThrottlingException`` is the rate signal (:class:`Throttled`, which the engine's
  pace retries with backoff); ``LimitExceededException`` is "a vault or account limit being
  exceeded", a quota that waiting does not lift (a :class:`StoreError`);
  ``InvalidParameterValueException`` and ``MissingParameterValueException`` are the store
  refusing a request this module built (a page size, a marker, a header a proxy stripped):
  a store-side fault (:class:`StoreError`), never ``InvalidSpec``, since the policy was
  validated before any request.

What AWS leaves undocumented, and how it is survived:

* Whether a ``limit`` above 50 is refused or capped: this module asks for 50.
* Whether a marker repeats or cycles: every marker of a listing is remembered (as a short
  digest) and a marker seen before ends the listing with a :class:`StoreError`; pages are
  capped too (``MAX_UPLOAD_PAGES``, ``MAX_PART_PAGES``).
* What a marker naming an upload that is gone answers: if it is a 404, the listing restarts
  from the beginning (at most ``MAX_RESTARTS`` times) and skips the uploads it already
  yielded. Those are remembered as 64-bit digests, at most ``MAX_REMEMBERED`` per listing
  (about 16 MB); past that a stale marker ends the listing with a :class:`StoreError` and the
  next sweep continues. A digest collision can only hide an upload from one sweep (the safe
  side: never an abort of something unlisted). A 404 with no marker is the vault missing.
* Parts landing during a multi-page parts listing can shift a page: a part listed twice is
  counted once (byte ranges are merged, never summed twice); a part missed is seen by the
  next measurement.
* How long List Parts keeps answering after an abort: the engine's repeated abort and
  verification rounds absorb a short lag (an abort is never counted freed before a 404).

Quiet period: Glacier parts carry no timestamp (only a range and a tree hash), so the time of
the newest part is not known. It is bounded instead, by watching: each measurement is a
fingerprint of the parts (their ranges and tree hashes), remembered per upload in an
:class:`ActivityMemory` that outlives the store object (the operator opens a store per sweep).
:meth:`GlacierStore.measure` reports as ``newest_part`` the store time at which the current
fingerprint was first seen: a part cannot have landed after that. So an upload whose parts
changed (a new part, or a part uploaded again) less than ``quietPeriod`` ago is active, and so
is an upload seen for the first time (a part may have landed a second before the first look):
it becomes eligible once it has been seen unchanged for ``quietPeriod``, i.e. at the first
sweep at least ``quietPeriod`` after the first look. After an operator restart, and on every
one-shot ``mpu-janitor sweep`` run (a new process), nothing with parts is aborted until it has
been watched that long: set ``quietPeriod: 0s`` there to judge by ``olderThan`` alone (then
choose ``olderThan`` longer than the longest upload to a vault can take). An upload without
parts is judged by age alone, as on S3. The memory is bounded (least recently seen forgotten
first); a forgotten upload looks new again, which only delays its abort. A target with more
uploads holding parts than the memory keeps (``ACTIVITY_CAPACITY``) would have every upload
forgotten between sweeps and nothing aborted under a quiet period: a warning says so.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import botocore.exceptions

from mpu_janitor.policy import GlacierTarget
from mpu_janitor.stores.aws import (
    client_config,
    make_client,
    server_time,
    translate_transport_error,
)
from mpu_janitor.stores.base import (
    AccessDenied,
    ContainerNotFound,
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
from mpu_janitor.stores.identity import glacier_target_id

log = logging.getLogger(__name__)

PAGE_SIZE = 50  # the documented maximum of both listings (1-50); AWS's default too
MAX_PARTS = 10_000  # Glacier's limit of parts per upload
MAX_PART_PAGES = MAX_PARTS  # even at one part a page, a listing longer than this cannot end
MAX_UPLOAD_PAGES = 200_000  # 10 million uploads at 50 a page: past that, assume a runaway
MAX_RESTARTS = 3  # restarts of one uploads listing after stale markers
MAX_REMEMBERED = 200_000  # upload-id digests a listing keeps to skip after a restart (16 MB)
ACTIVITY_CAPACITY = 100_000  # uploads whose last measurement is remembered (about 30 MB)

_THROTTLE_CODES = frozenset(
    {
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "Throttling",
    }
)
_QUOTA_CODES = frozenset({"LimitExceededException"})
_DENIED_CODES = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignatureException",
        "MissingAuthenticationTokenException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        # Glacier is closed to new customers: an account that never used it gets this one.
        "NoLongerSupportedException",
    }
)
_UNAVAILABLE_CODES = frozenset(
    {
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeoutException",
    }
)
_REFUSED_CODES = frozenset(
    {
        "InvalidParameterValueException",
        "MissingParameterValueException",
    }
)
_NOT_FOUND = "ResourceNotFoundException"


def parse_range(text: str) -> int:
    """The size of a part from its ``RangeInBytes``: ``"0-1048575"`` is 1,048,576 bytes."""
    first, last = parse_span(text)
    return last - first + 1


def parse_span(text: str) -> tuple[int, int]:
    """The first and last byte (inclusive) of a ``RangeInBytes``."""
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"not a byte range: {text!r}")
    try:
        first, last = int(start), int(end)
    except ValueError:
        raise ValueError(f"not a byte range: {text!r}") from None
    if first < 0 or last < first:
        raise ValueError(f"not a byte range: {text!r}")
    return first, last


def covered_bytes(spans: Sequence[tuple[int, int]]) -> int:
    """The bytes a set of inclusive spans covers, each byte once however often it is listed."""
    total = 0
    reach = -1  # the last byte counted so far
    for first, last in sorted(spans):
        if last > reach:
            total += last - max(first, reach + 1) + 1
            reach = last
    return total


def _digest(text: str, size: int = 8) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def _parse_creation_date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def translate_error(error: Exception, container: str | None, *, listing: bool) -> Exception:
    """Map a botocore exception to the engine's vocabulary (see stores/base.py).

    ``ResourceNotFoundException`` means the vault is missing when listing uploads, and the
    upload is gone when listing parts or aborting."""
    if isinstance(error, botocore.exceptions.ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = f"{code or status}: {info.get('Message') or error}"
        if code == _NOT_FOUND or (status == 404 and not code):
            if listing:
                return ContainerNotFound(
                    f"vault {container!r} not found ({message})", container=container
                )
            return UploadGone(message)
        if code in _THROTTLE_CODES or status == 429:
            return Throttled(message, container=container)
        if code in _QUOTA_CODES:
            return StoreError(
                f"a Glacier vault or account quota is exceeded ({message})", container=container
            )
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDenied(message, container=container)
        if code in _UNAVAILABLE_CODES or status >= 500:
            return StoreUnreachable(message, container=container)
        if code in _REFUSED_CODES:
            return StoreError(
                f"Glacier refused a request the janitor built (a store-side fault, or a proxy "
                f"altering requests; the policy is valid): {message}",
                container=container,
            )
        return StoreError(message, container=container)
    return translate_transport_error(error, container)


class _StaleMarker(Exception):
    """A 404 to an uploads listing that carried a marker: the upload it names is gone, or the
    vault is (a listing from the start tells which)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ActivityMemory:
    """The last parts fingerprint of each upload and the store time it was first seen, kept
    across sweeps (see the module docstring). Thread-safe; at most ``capacity`` uploads, the
    least recently measured forgotten first (which only delays an abort)."""

    def __init__(self, capacity: int = ACTIVITY_CAPACITY) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._seen: OrderedDict[bytes, tuple[bytes, datetime]] = OrderedDict()
        self._warned = False
        self._first_look_told = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def observe(self, key: bytes, fingerprint: bytes, now: datetime) -> datetime:
        """Since when (store time) the upload is known to look like ``fingerprint``: ``now``
        if it was never seen or looked different at the last measurement."""
        with self._lock:
            known = self._seen.get(key)
            if known is None and not self._first_look_told:
                self._first_look_told = True
                log.info(
                    "Glacier parts carry no time: an upload this process has not measured "
                    "before counts as active (skippedActive) until it has been seen unchanged "
                    "for quietPeriod; set quietPeriod: 0s to judge Glacier uploads by "
                    "olderThan alone"
                )
            since = known[1] if known is not None and known[0] == fingerprint else now
            self._seen[key] = (fingerprint, since)
            self._seen.move_to_end(key)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
                if not self._warned:
                    self._warned = True
                    log.warning(
                        "more than %d Glacier uploads with parts: the least recently measured "
                        "are forgotten and look active again (quietPeriod cannot be judged "
                        "for them)",
                        self.capacity,
                    )
            return since

    def forget(self, key: bytes) -> None:
        with self._lock:
            self._seen.pop(key, None)


ACTIVITY = ActivityMemory()  # shared by every Glacier store of the process


class GlacierStore:
    """The vaults of one Glacier target (one region or endpoint, one account), one client."""

    kind = "Glacier"

    def __init__(
        self,
        target: GlacierTarget,
        credentials: StoreCredentials | None,
        observer: RequestObserver,
        *,
        read_timeout: float = 30.0,
        activity: ActivityMemory = ACTIVITY,
    ) -> None:
        self.target = target
        self.activity = activity
        self.client: Any = make_client(
            "glacier",
            region=target.region,
            endpoint=target.endpoint,
            credentials=credentials,
            observer=observer,
            config=client_config(target.region, read_timeout=read_timeout),
        )

    @property
    def target_id(self) -> str:
        return glacier_target_id(self.target.endpoint, self.target.region)

    def containers(self) -> list[str]:
        return list(self.target.vaults)

    # -- listing uploads -----------------------------------------------------------------------

    def _uploads_page(self, container: str, marker: str | None) -> dict[str, Any]:
        """One List Multipart Uploads request."""
        params: dict[str, Any] = {
            "accountId": self.target.account_id,
            "vaultName": container,
            "limit": str(PAGE_SIZE),  # a string in Glacier's model
        }
        if marker:
            params["marker"] = marker
        try:
            response: dict[str, Any] = self.client.list_multipart_uploads(**params)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            translated = translate_error(error, container, listing=True)
            if marker and isinstance(translated, ContainerNotFound):
                raise _StaleMarker(translated) from error
            raise translated from error
        return response

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        """All incomplete uploads of a vault, each once; every page one request through
        ``pace`` (so a throttled page is retried alone). Glacier has no prefix filter, so
        ``prefixes`` is left to the engine. See the module docstring for markers that cycle
        or go stale."""
        marker: str | None = None
        markers_seen: set[bytes] = set()
        yielded: set[int] | None = set()  # None: too many to remember
        restarts = pages = 0
        while True:
            pages += 1
            if pages > MAX_UPLOAD_PAGES:
                raise StoreError(
                    f"listing vault {container!r} did not end after {MAX_UPLOAD_PAGES} pages",
                    container=container,
                )
            try:
                response = pace(functools.partial(self._uploads_page, container, marker))
            except _StaleMarker as stale:
                if yielded is None or restarts >= MAX_RESTARTS:
                    raise StoreError(
                        f"listing vault {container!r} lost its place (a stale marker, "
                        f"{stale.cause}); the next sweep continues",
                        container=container,
                    ) from stale.cause
                restarts += 1
                log.info(
                    "vault %s: the listing's marker went stale (%s); listing again, skipping "
                    "the %d uploads already listed",
                    container,
                    stale.cause,
                    len(yielded),
                )
                marker = None
                markers_seen.clear()
                continue
            now = server_time(response, "Glacier")
            uploads = []
            for item in response.get("UploadsList") or []:
                upload_id = item["MultipartUploadId"]
                if yielded is not None:
                    seen = int.from_bytes(_digest(upload_id))
                    if seen in yielded:
                        continue  # listed before this listing restarted (or listed twice)
                    yielded.add(seen)
                    if len(yielded) > MAX_REMEMBERED:
                        log.warning(
                            "vault %s: more than %d uploads; a stale marker will end this "
                            "listing instead of restarting it",
                            container,
                            MAX_REMEMBERED,
                        )
                        yielded = None
                created = _parse_creation_date(item.get("CreationDate"))
                if created is None:
                    # Without an initiation time the age is unknown: make it age zero, which
                    # never matches olderThan, rather than guess.
                    log.warning(
                        "upload %s in vault %s has no usable CreationDate (%r)",
                        upload_id,
                        container,
                        item.get("CreationDate"),
                    )
                    # (No clock either: the engine judges no age on this page at all.)
                    created = now or datetime.max.replace(tzinfo=UTC)
                uploads.append(
                    Upload(container, item.get("ArchiveDescription") or "", upload_id, created)
                )
            yield UploadPage(uploads, now)
            next_marker = response.get("Marker")
            if not next_marker:
                return
            digest = _digest(next_marker, 16)
            if digest in markers_seen or next_marker == marker:
                raise StoreError(
                    f"Glacier's markers listing vault {container!r} form a cycle (a marker "
                    f"came back after {len(markers_seen)} pages); the listing stops here",
                    container=container,
                )
            markers_seen.add(digest)
            marker = next_marker

    # -- measuring an upload -------------------------------------------------------------------

    def _parts_page(self, upload: Upload, marker: str | None) -> dict[str, Any]:
        """One List Parts request."""
        params: dict[str, Any] = {
            "accountId": self.target.account_id,
            "vaultName": upload.container,
            "uploadId": upload.upload_id,
            "limit": str(PAGE_SIZE),
        }
        if marker:
            params["marker"] = marker
        try:
            response: dict[str, Any] = self.client.list_parts(**params)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            translated = translate_error(error, upload.container, listing=False)
            if isinstance(translated, UploadGone):
                self.activity.forget(self._activity_key(upload))
            raise translated from error
        return response

    def _activity_key(self, upload: Upload) -> bytes:
        return _digest(f"{self.target_id}|{upload.container}|{upload.upload_id}", 16)

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        """The bytes the parts' ``RangeInBytes`` cover over every page (a part listed twice
        counted once), each page one request through ``pace``.

        ``newest_part`` is the store time since which the parts are known unchanged (see the
        module docstring): Glacier parts carry no timestamp."""
        parts: dict[int, tuple[int, str]] = {}  # first byte -> (last byte, tree hash)
        markers_seen: set[bytes] = set()
        marker: str | None = None
        now: datetime | None = None  # the store's clock at the last page (None: no Date header)
        for _ in range(MAX_PART_PAGES):
            response = pace(functools.partial(self._parts_page, upload, marker))
            now = server_time(response, "Glacier")
            for part in response.get("Parts") or []:
                try:
                    first, last = parse_span(str(part.get("RangeInBytes", "")))
                except ValueError as error:
                    raise StoreError(
                        f"upload {upload.upload_id}: {error}", container=upload.container
                    ) from error
                parts[first] = (last, str(part.get("SHA256TreeHash", "")))
            next_marker = response.get("Marker")
            if not next_marker:
                break
            digest = _digest(next_marker, 16)
            if digest in markers_seen or next_marker == marker:
                raise StoreError(
                    f"Glacier's parts markers for upload {upload.upload_id} form a cycle",
                    container=upload.container,
                )
            markers_seen.add(digest)
            marker = next_marker
        else:
            raise StoreError(
                f"the parts listing of upload {upload.upload_id} did not end after "
                f"{MAX_PART_PAGES} pages",
                container=upload.container,
            )
        size = covered_bytes([(first, last) for first, (last, _) in parts.items()])
        newest: datetime | None = None
        if not parts:
            self.activity.forget(self._activity_key(upload))
        elif now is None:
            # No store clock (a proxy stripped the Date header): nothing to time the look by.
            # A newest part is reported (no later than now, no earlier than the upload) so the
            # quiet period counts as not judged rather than as passed.
            newest = upload.initiated
        else:
            fingerprint = hashlib.blake2b(digest_size=16)
            for first, (last, tree_hash) in sorted(parts.items()):
                fingerprint.update(f"{first}-{last}:{tree_hash};".encode())
            newest = self.activity.observe(self._activity_key(upload), fingerprint.digest(), now)
        return PartsSummary(
            size_bytes=size,
            part_count=len(parts),
            newest_part=newest,
            server_time=now,
        )

    # -- aborting ------------------------------------------------------------------------------

    def abort(self, upload: Upload) -> None:
        """Abort once. An upload aborted moments ago aborts "successfully" again (Glacier's
        short idempotency window); the verification listing is what proves it gone. An upload
        completed meanwhile: a 404 is UploadGone, anything else a StoreError."""
        try:
            self.client.abort_multipart_upload(
                accountId=self.target.account_id,
                vaultName=upload.container,
                uploadId=upload.upload_id,
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            translated = translate_error(error, upload.container, listing=False)
            if isinstance(translated, UploadGone):
                self.activity.forget(self._activity_key(upload))
            raise translated from error

    def forget(self, upload: Upload) -> None:
        """Verified gone: its activity record is no longer needed."""
        self.activity.forget(self._activity_key(upload))

    def close(self) -> None:
        self.client.close()
