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
    AbortRefused,
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
    UploadReplaced,
    unpaced,
)
from mpu_janitor.stores.identity import s3_target_id
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
# 400s that say the connection was too slow, not that the request was wrong: botocore's
# standard retry mode already retries RequestTimeout; after the retries the store is
# unreachable (a transient condition), never a bad spec.
_SLOW_NETWORK_CODES = {"RequestTimeout", "RequestTimeoutException", "UserNetworkTooSlow"}
# Tencent COS refuses path-style requests on its default domains.
_PATH_STYLE_REFUSED_CODES = {"PathStyleDomainForbidden"}
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


def _retried(error: Exception) -> bool:
    """Whether botocore sent this call more than once before the answer we got."""
    if not isinstance(error, botocore.exceptions.ClientError):
        return False
    return int(error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0) > 0


def translate_error(error: Exception, container: str | None) -> Exception:
    """Map a botocore exception to the engine's vocabulary (see stores/base.py)."""
    if isinstance(error, botocore.exceptions.ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code", ""))
        status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        message = f"{code or status}: {info.get('Message') or error}"
        if code in _GONE_CODES:
            return UploadGone(message)
        if code in _SLOW_NETWORK_CODES:
            return StoreUnreachable(message, container=container)
        if code in _PATH_STYLE_REFUSED_CODES:
            return InvalidTarget(
                f"{message} (the endpoint refuses path-style requests: use profile TencentCOS, "
                "which addresses buckets virtual-hosted style)",
                container=container,
            )
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
        self.object_rule = target.abort_when_key_has_object or self.profile.default_object_rule
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
        return s3_target_id(self.target.endpoint)

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
        if self.object_rule != "Always":
            self._check_object_at_key(upload, params)
        if is_directory_bucket(upload.container) and self.profile.directory_buckets:
            params["IfMatchInitiatedTime"] = upload.initiated
        try:
            self.client.abort_multipart_upload(**params, Key=upload.key, UploadId=upload.upload_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            translated = translate_error(error, upload.container)
            if isinstance(translated, UploadGone) and _retried(error):
                # An earlier attempt of this very call got no usable answer (connection
                # dropped, timeout, 5xx) and botocore retried it: NoSuchUpload now most
                # likely means that attempt aborted it. It is ours; the engine's verifying
                # parts listing decides whether it is gone.
                return
            raise translated from error

    def _check_object_at_key(self, upload: Upload, params: dict[str, Any]) -> None:
        """Refuse the abort if an object at the key could be deleted with it (see
        profiles.yaml ``abort_may_delete_object``). Any answer but "no object" (403, 5xx,
        no connection) refuses too: safety that can't be proven is not assumed."""
        try:
            head = self.client.head_object(**params, Key=upload.key)
        except botocore.exceptions.ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return
            raise AbortRefused(
                "ObjectCheckFailed",
                f"{upload.key}: not aborted: HeadObject on the key answered {status} "
                f"({error.response.get('Error', {}).get('Code', '')}), so whether the abort "
                "would delete an object there is unknown",
            ) from error
        except botocore.exceptions.BotoCoreError as error:
            raise translate_error(error, upload.container) from error
        written = head["LastModified"].astimezone(UTC)
        initiated = upload.initiated.replace(microsecond=0)  # LastModified has whole seconds
        if self.object_rule == "IfObjectOlder" and written < initiated:
            return
        raise AbortRefused(
            "ObjectAtKey",
            f"{upload.key}: not aborted: an object written {written:%Y-%m-%dT%H:%M:%SZ} is at "
            f"the key (upload initiated {upload.initiated:%Y-%m-%dT%H:%M:%SZ}) and an abort on "
            f"profile {self.profile.name} may delete it (abortWhenKeyHasObject: "
            f"{self.object_rule})",
        )

    def forget(self, upload: Upload) -> None:
        """S3 keeps no inventory of ours."""

    def close(self) -> None:
        self.client.close()
