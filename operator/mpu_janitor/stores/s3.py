"""Amazon S3 and S3-compatible stores (MinIO, Ceph RGW, Scality, Tencent COS, generic) via boto3.

Provider differences come from ``profiles.yaml``; this module reads flags, never provider names.
Directory buckets (names ending ``--x-s3``) get ``IfMatchInitiatedTime`` on abort.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import botocore.exceptions

from mpu_janitor.policy import S3Target
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
    Throttled,
    Upload,
    UploadGone,
    UploadPage,
    UploadReplaced,
    unpaced,
)
from mpu_janitor.stores.profiles import S3Profile, profile

PAGE_SIZE = 1000

_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestThrottled",
    "ServiceUnavailable",
    "503",
    "429",
}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "AccountProblem",
}
_GONE_CODES = {"NoSuchUpload"}
_REPLACED_CODES = {"PreconditionFailed", "412"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_BAD_TARGET_CODES = {
    "InvalidBucketName",
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "301",
    "400",
}


def is_directory_bucket(bucket: str) -> bool:
    return bucket.endswith("--x-s3")


def minimal_prefixes(prefixes: Sequence[str]) -> list[str]:
    """Drop prefixes covered by shorter ones: overlapping prefixes never list an upload twice.
    In sorted order every string between a prefix and one it covers starts with it too, so
    the only kept prefix that can cover the next one is the last kept: linear, not quadratic."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes)):
        if not kept or not prefix.startswith(kept[-1]):
            kept.append(prefix)
    return kept


def translate_error(error: Exception, container: str | None) -> Exception:
    """Map a botocore exception to the engine's vocabulary (see stores/base.py)."""
    if isinstance(error, botocore.exceptions.ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = f"{code or status}: {info.get('Message') or error}"
        if code in _GONE_CODES:
            return UploadGone(message)
        if code in _REPLACED_CODES or status == "412":
            return UploadReplaced(message)
        if code in _THROTTLE_CODES or status in ("503", "429"):
            return Throttled(message, container=container)
        if code in _DENIED_CODES or status == "403":
            return AccessDenied(message, container=container)
        if code in _NO_BUCKET_CODES:
            return ContainerNotFound(
                f"bucket {container!r} does not exist ({message})", container=container
            )
        if code in _BAD_TARGET_CODES or status in _BAD_TARGET_CODES:
            return InvalidTarget(message, container=container)
        return StoreError(message, container=container)
    return translate_transport_error(error, container)


class S3Store:
    """The buckets of one S3 target, behind one client."""

    kind = "S3"

    def __init__(
        self, target: S3Target, credentials: StoreCredentials | None, observer: RequestObserver
    ) -> None:
        self.target = target
        self.profile: S3Profile = profile(target.profile)
        checksums = "when_supported" if self.profile.aws_checksums else "when_required"
        self.client = make_client(
            "s3",
            region=target.region,
            endpoint=target.endpoint,
            credentials=credentials,
            observer=observer,
            config=client_config(
                target.region,
                s3={"addressing_style": self.profile.addressing_style},
                request_checksum_calculation=checksums,
                response_checksum_validation=checksums,
            ),
        )

    @property
    def target_id(self) -> str:
        return f"s3:{self.target.endpoint or 'aws:' + self.target.region}"

    def _common(self, bucket: str) -> dict[str, Any]:
        """Parameters every call on this bucket carries."""
        params: dict[str, Any] = {"Bucket": bucket}
        if self.target.expected_bucket_owner:
            params["ExpectedBucketOwner"] = self.target.expected_bucket_owner
        if self.target.request_payer and not is_directory_bucket(bucket):
            params["RequestPayer"] = self.target.request_payer.lower()
        return params

    def containers(self) -> list[str]:
        if self.target.buckets:
            return list(self.target.buckets)
        try:
            response = self.client.list_buckets()
        except Exception as error:
            raise translate_error(error, None) from error
        pattern = self.target.bucket_pattern or ""
        return sorted(
            b["Name"]
            for b in response.get("Buckets", [])
            if fnmatch.fnmatchcase(b["Name"], pattern)
        )

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        if self.profile.prefix_is_exact_key or not prefixes:
            listing_prefixes = [""]
        else:
            listing_prefixes = minimal_prefixes(prefixes)
        paginator = self.client.get_paginator("list_multipart_uploads")
        for prefix in listing_prefixes:
            params = self._common(container)
            if prefix:
                params["Prefix"] = prefix
            pages = paginator.paginate(**params, PaginationConfig={"PageSize": PAGE_SIZE})
            try:
                for page in pages:
                    uploads = [
                        Upload(
                            container,
                            item["Key"],
                            item["UploadId"],
                            item["Initiated"].astimezone(UTC),
                        )
                        for item in page.get("Uploads", [])
                    ]
                    yield UploadPage(uploads, server_time(page, "S3"))
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                raise translate_error(error, container) from error

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        paginator = self.client.get_paginator("list_parts")
        size = count = 0
        newest: datetime | None = None
        now: datetime | None = None
        try:
            for page in paginator.paginate(
                **self._common(upload.container),
                Key=upload.key,
                UploadId=upload.upload_id,
                PaginationConfig={"PageSize": PAGE_SIZE},
            ):
                now = server_time(page, "S3")
                for part in page.get("Parts", []):
                    size += int(part["Size"])
                    count += 1
                    modified = part["LastModified"].astimezone(UTC)
                    if newest is None or modified > newest:
                        newest = modified
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            raise translate_error(error, upload.container) from error
        return PartsSummary(size, count, newest, now or datetime.now(UTC))

    def abort(self, upload: Upload) -> None:
        params = self._common(upload.container)
        if is_directory_bucket(upload.container) and self.profile.directory_buckets:
            params["IfMatchInitiatedTime"] = upload.initiated
        try:
            self.client.abort_multipart_upload(**params, Key=upload.key, UploadId=upload.upload_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            raise translate_error(error, upload.container) from error

    def forget(self, upload: Upload) -> None:
        """S3 keeps no inventory of ours."""

    def close(self) -> None:
        self.client.close()
