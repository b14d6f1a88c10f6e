"""Amazon S3 Glacier vaults: the incomplete multipart uploads of a policy's vaults, via boto3.

Vaults have no lifecycle rules, so a client-side cleaner is the only way to free the parts of
an abandoned upload. What this module builds on (Glacier API reference, version 2012-06-01):

* List Multipart Uploads: ``limit`` up to 1,000, an opaque ``marker`` (null at the end), no
  guaranteed order. Each upload has ``MultipartUploadId``, ``CreationDate`` and an optional
  ``ArchiveDescription``, which stands in for the key (prefixes and globs match on it).
* List Parts: pages of ``limit``/``marker`` too. Each part has ``RangeInBytes``
  (``"0-1048575"``, both ends inclusive): the bytes an upload holds are the sum of the spans.
* Abort: 204. Repeating it succeeds "for a short time", then the upload id is unknown
  (``ResourceNotFoundException``, 404), which is also what List Parts answers once it is gone:
  that is how an abort is verified.
* Throttling is ``LimitExceededException`` or ``ThrottlingException`` (HTTP 400). boto3's
  standard retry mode retries it (and 5xx, timeouts) a few times; what is left is raised as
  :class:`Throttled` so the engine slows the sweep down instead of failing it.

Quiet period: Glacier parts carry no timestamp (only a range and a tree hash), so the store
cannot tell when the last part arrived. :meth:`GlacierStore.measure` reports
``newest_part=None`` rather than inventing a time. The only time left to judge activity by is
the upload's ``CreationDate`` (its ``initiated``): an upload is at most as quiet as it is old,
which ``olderThan`` already covers whenever it is the longer of the two. An upload that has
been receiving parts for longer than ``olderThan`` cannot be told apart from an abandoned one:
choose ``olderThan`` longer than the longest upload to a vault can take.
"""

from __future__ import annotations

import logging
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
from mpu_janitor.stores.identity import glacier_target_id

log = logging.getLogger(__name__)

PAGE_SIZE = 1000  # the most Glacier returns in one page (its default is 50)

_THROTTLE_CODES = frozenset(
    {
        "LimitExceededException",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "Throttling",
    }
)
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
_BAD_REQUEST_CODES = frozenset(
    {
        "InvalidParameterValueException",
        "MissingParameterValueException",
    }
)
_NOT_FOUND = "ResourceNotFoundException"


def parse_range(text: str) -> int:
    """The size of a part from its ``RangeInBytes``: ``"0-1048575"`` is 1,048,576 bytes."""
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"not a byte range: {text!r}")
    first, last = int(start), int(end)
    if first < 0 or last < first:
        raise ValueError(f"not a byte range: {text!r}")
    return last - first + 1


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
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDenied(message, container=container)
        if code in _UNAVAILABLE_CODES or status >= 500:
            return StoreUnreachable(message, container=container)
        if code in _BAD_REQUEST_CODES:
            return InvalidTarget(message, container=container)
        return StoreError(message, container=container)
    return translate_transport_error(error, container)


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
    ) -> None:
        self.target = target
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

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        """All incomplete uploads of a vault; Glacier has no prefix filter, so ``prefixes`` is
        left to the engine."""
        marker: str | None = None
        while True:
            params: dict[str, Any] = {
                "accountId": self.target.account_id,
                "vaultName": container,
                "limit": str(PAGE_SIZE),  # a string in Glacier's model
            }
            if marker:
                params["marker"] = marker
            try:
                response = self.client.list_multipart_uploads(**params)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                raise translate_error(error, container, listing=True) from error
            now = server_time(response, "Glacier")
            uploads = []
            for item in response.get("UploadsList") or []:
                created = _parse_creation_date(item.get("CreationDate"))
                if created is None:
                    # Without an initiation time the age is unknown: make it age zero, which
                    # never matches olderThan, rather than guess.
                    log.warning(
                        "upload %s in vault %s has no usable CreationDate (%r)",
                        item.get("MultipartUploadId"),
                        container,
                        item.get("CreationDate"),
                    )
                    # (No clock either: the engine judges no age on this page at all.)
                    created = now or datetime.max.replace(tzinfo=UTC)
                uploads.append(
                    Upload(
                        container,
                        item.get("ArchiveDescription") or "",
                        item["MultipartUploadId"],
                        created,
                    )
                )
            yield UploadPage(uploads, now)
            next_marker = response.get("Marker")
            if not next_marker:
                return
            if next_marker == marker:
                raise StoreError(
                    f"Glacier returned the same marker twice listing {container!r}",
                    container=container,
                )
            marker = next_marker

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        """Bytes held = the sum of the parts' ``RangeInBytes`` spans over every page.

        ``newest_part`` is always None: Glacier parts carry no timestamp (see the module
        docstring for how the quiet period is judged instead)."""
        size = count = 0
        marker: str | None = None
        now: datetime | None = None
        while True:
            params: dict[str, Any] = {
                "accountId": self.target.account_id,
                "vaultName": upload.container,
                "uploadId": upload.upload_id,
                "limit": str(PAGE_SIZE),
            }
            if marker:
                params["marker"] = marker
            try:
                response = self.client.list_parts(**params)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                raise translate_error(error, upload.container, listing=False) from error
            now = server_time(response, "Glacier")
            for part in response.get("Parts") or []:
                try:
                    size += parse_range(str(part.get("RangeInBytes", "")))
                except ValueError as error:
                    raise StoreError(
                        f"upload {upload.upload_id}: {error}", container=upload.container
                    ) from error
                count += 1
            next_marker = response.get("Marker")
            if not next_marker:
                break
            if next_marker == marker:
                raise StoreError(
                    f"Glacier returned the same parts marker twice for upload {upload.upload_id}",
                    container=upload.container,
                )
            marker = next_marker
        return PartsSummary(size_bytes=size, part_count=count, newest_part=None, server_time=now)

    def abort(self, upload: Upload) -> None:
        """Abort once. An upload aborted moments ago aborts "successfully" again (Glacier's
        short idempotency window); the verification listing is what proves it gone."""
        try:
            self.client.abort_multipart_upload(
                accountId=self.target.account_id,
                vaultName=upload.container,
                uploadId=upload.upload_id,
            )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            raise translate_error(error, upload.container, listing=False) from error

    def forget(self, upload: Upload) -> None:
        """Glacier keeps no inventory of ours."""

    def close(self) -> None:
        self.client.close()
