"""Amazon S3 and S3-compatible stores (MinIO, Ceph RGW, Scality, Tencent COS, generic) via botocore.

Provider differences come from ``profiles.yaml``; this module reads flags, never provider names.
Directory buckets (names ending ``--x-s3``) get ``IfMatchInitiatedTime`` on abort.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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
    ListingProof,
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
from mpu_janitor.stores.s3_fast import Fallback, FastS3, Gone
from mpu_janitor.stores.streamed_listing import ListingSpill, installed, stream_listing_handler

PAGE_SIZE = 1000
# Truncated listing pages in a row that list no upload before the listing is called stuck.
MAX_EMPTY_PAGES = 1000
MAX_PART_NUMBER = 10000  # S3's highest part number: a parts listing past it is stuck

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


CUT_ANSWER_RETRIES = 4


def read_whole(call: Any, params: dict[str, Any]) -> Any:
    """A read (listing page) asked again when its answer was cut short (stores/aws.py
    ``refuse_cut_answers``; botocore does not retry those itself). Reads only: an abort whose
    answer was cut goes to the engine, which verifies it."""
    for attempt in range(CUT_ANSWER_RETRIES + 1):
        try:
            return call(**params)
        except botocore.exceptions.IncompleteReadError:
            if attempt == CUT_ANSWER_RETRIES:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


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


_LISTINGS = itertools.count()


@dataclass(frozen=True, slots=True)
class _Position:
    """Where a listing page sits: its prefix, the markers it was asked from (None: the top),
    the node that answered it (``x-amz-id-2``) and its Date."""

    listing: int  # one pass over one prefix of a container
    page: int  # its place in that pass
    prefix: str
    marker: tuple[str, str] | None
    node: str | None
    server_time: datetime | None


@dataclass(frozen=True, slots=True)
class _Listed:
    uploads: list[Upload]
    server_time: datetime | None
    position: _Position
    truncated: bool


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
        # ListParts and AbortMultipartUpload without botocore's per-call machinery; any
        # answer it does not handle is sent again through the client (stores/s3_fast.py).
        self.fast = FastS3(self.client, observer)
        self._gone_codes = frozenset({*_GONE_CODES, *self.profile.list_parts_gone_codes})

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
        """Every page is one ListMultipartUploads request sent through ``pace``; the position
        lives in markers here, so a throttled page is retried alone. No ``Delimiter`` is ever
        sent (Ceph drops the uploads under a prefix when asked for one)."""
        for prefix in self._listing_prefixes(prefixes):
            for listed in self._pages(container, prefix, pace):
                yield UploadPage(listed.uploads, listed.server_time, listed.position)

    def _listing_prefixes(self, prefixes: Sequence[str]) -> list[str]:
        if self.profile.prefix_is_exact_key or not prefixes:
            return [""]
        return minimal_prefixes(prefixes)

    def _pages(
        self,
        bucket: str,
        prefix: str,
        pace: Pace,
        start: tuple[str, str] | None = None,
    ) -> Iterator[_Listed]:
        """The pages of one prefix's listing from ``start`` (the markers of a page listed
        before, or the top), each with the position a later listing can start from."""
        directory = is_directory_bucket(bucket) and self.profile.directory_buckets
        params = self._common(bucket)
        params.update(MaxUploads=PAGE_SIZE, EncodingType="url")
        if prefix:
            params["Prefix"] = prefix
        marker = start  # (key marker, upload-id marker) of the next page
        markers_seen: set[tuple[str, str]] = set()
        # The uploads already yielded for the newest key: a store whose KeyMarker is inclusive
        # (Ceph) may list them again on the next page.
        tail_key: str | None = None
        tail_ids: set[str] = set()
        empty_pages = 0
        listing = next(_LISTINGS)
        for number in itertools.count():
            request = dict(params)
            if marker is not None:
                request["KeyMarker"] = marker[0]
                if marker[1]:
                    request["UploadIdMarker"] = marker[1]
            with ListingSpill() as spill:
                page = pace(functools.partial(self._send_listing, request, bucket, spill))
                items = spill.uploads() if spill.used else iter(page.get("Uploads") or [])
                decode_keys, decode_markers = self._encoded(page)
                now = server_time(page, "S3")
                node = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-id-2")
                truncated = bool(page.get("IsTruncated"))
                position = _Position(listing, number, prefix, marker, node, now)
                last: dict[str, Any] | None = None
                fresh: list[Upload] = []
                listed_any = False
                for item in items:
                    last = item
                    key = self._decoded(item["Key"], decode_keys, bucket)
                    if key != tail_key:
                        tail_key, tail_ids = key, set()
                    elif item["UploadId"] in tail_ids:
                        continue
                    tail_ids.add(item["UploadId"])
                    fresh.append(
                        Upload(bucket, key, item["UploadId"], item["Initiated"].astimezone(UTC))
                    )
                    if len(fresh) >= PAGE_SIZE:  # one answer of a whole bucket (MinIO)
                        yield _Listed(fresh, now, position, True)
                        fresh, listed_any = [], True
                listed_any = listed_any or bool(fresh)
                yield _Listed(fresh, now, position, truncated)
            if not truncated:
                return  # Next markers without truncation (Ceph) mean nothing
            empty_pages = 0 if listed_any else empty_pages + 1
            marker = self._next_marker(page, last, directory, decode_keys, decode_markers, bucket)
            if marker is None:
                stuck = "a truncated page without a next marker"
            elif marker in markers_seen:
                stuck = f"a page pointing back to markers already listed {marker!r}"
            elif empty_pages > MAX_EMPTY_PAGES:
                stuck = f"{empty_pages} truncated pages in a row without an upload"
            else:
                stuck = ""
            if stuck or marker is None:
                raise StoreError(
                    f"ListMultipartUploads on bucket {bucket!r} made no progress: {stuck}",
                    container=bucket,
                )
            markers_seen.add(marker)

    # -- proving many aborts gone with one listing (profiles.yaml listing_proves_gone) ---------

    def proven_gone(
        self,
        container: str,
        uploads: Sequence[tuple[Upload, object]],
        pace: Pace = unpaced,
    ) -> ListingProof:
        """The ids among ``uploads`` that a fresh listing proves gone (see ``BulkVerifier``).
        Only where the profile says a listing can prove it, never on directory buckets (their
        listing is unsorted, with an opaque marker); an upload without a position of ours is
        never vouched for."""
        rule = self.profile.listing_proves_gone
        if rule == "never" or (is_directory_bucket(container) and self.profile.directory_buckets):
            return ListingProof(frozenset(), 0)
        by_listing: dict[tuple[int, str], list[tuple[Upload, _Position]]] = {}
        for upload, position in uploads:
            if (
                isinstance(position, _Position)
                and upload.container == container
                and upload.key.startswith(position.prefix)
            ):
                key = (position.listing, position.prefix)
                by_listing.setdefault(key, []).append((upload, position))
        gone: set[str] = set()
        listed = 0
        for (_, prefix), group in by_listing.items():
            if rule == "consistent":
                proof = self._gone_in_range(container, prefix, group, pace)
            else:
                proof = self._gone_from_node_table(container, prefix, group, pace)
            gone |= proof.gone
            listed += proof.listed
        return ListingProof(frozenset(gone), listed)

    def _gone_in_range(
        self, bucket: str, prefix: str, group: list[tuple[Upload, _Position]], pace: Pace
    ) -> ListingProof:
        """A consistent, key-sorted listing: list again from the earliest page the uploads came
        from (its own markers: the store's order, not ours) until past the last of their keys;
        an upload in that range and not listed is gone."""
        start = min((position for _, position in group), key=lambda p: p.page).marker
        last_key = max(upload.key for upload, _ in group)
        asked = {upload.upload_id for upload, _ in group}
        still: set[str] = set()  # of those asked about: memory bounded by the batch
        listed = 0
        for page in self._pages(bucket, prefix, pace, start):
            listed += len(page.uploads)
            still.update(upload.upload_id for upload in page.uploads if upload.upload_id in asked)
            if not page.truncated or (page.uploads and page.uploads[-1].key > last_key):
                break  # every key up to last_key was listed (_pages raises if it is stuck)
        return ListingProof(frozenset(asked - still), listed)

    def _gone_from_node_table(
        self, bucket: str, prefix: str, group: list[tuple[Upload, _Position]], pace: Pace
    ) -> ListingProof:
        """MinIO's bucket-wide listing is the answering node's in-memory table of the uploads
        begun through it. Absence proves an upload gone only when every page of the new
        listing comes from the node that listed the upload (``x-amz-id-2``) and that table
        still holds an upload begun before the upload's own listing (a restart empties it)."""
        asked = {upload.upload_id for upload, _ in group}
        still: set[str] = set()  # of those asked about: memory bounded by the batch
        listed = 0
        nodes: set[str | None] = set()
        earliest: datetime | None = None
        for page in self._pages(bucket, prefix, pace):
            nodes.add(page.position.node)
            listed += len(page.uploads)
            for upload in page.uploads:
                if upload.upload_id in asked:
                    still.add(upload.upload_id)
                if earliest is None or upload.initiated < earliest:
                    earliest = upload.initiated
        if len(nodes) != 1 or None in nodes or earliest is None:
            return ListingProof(frozenset(), listed)
        (node,) = nodes
        gone = {
            upload.upload_id
            for upload, position in group
            if upload.upload_id not in still
            and position.node == node
            and position.server_time is not None
            and earliest < position.server_time
        }
        return ListingProof(frozenset(gone), listed)

    def _next_marker(
        self,
        page: dict[str, Any],
        last: dict[str, Any] | None,
        directory: bool,
        decode_keys: bool,
        decode_markers: bool,
        bucket: str,
    ) -> tuple[str, str] | None:
        """Where the next page starts: after the last upload listed (what AWS's Next markers
        say too, but decoded the same way as the keys), or the Next markers of a page without
        uploads. Directory buckets have an opaque key marker and no upload-id marker."""
        next_key = page.get("NextKeyMarker") or ""
        if directory:
            return (self._decoded(next_key, decode_markers, bucket), "") if next_key else None
        if last is not None:  # the last upload of the answer
            return self._decoded(last["Key"], decode_keys, bucket), str(last["UploadId"])
        if not next_key:
            return None
        next_id = str(page.get("NextUploadIdMarker") or "")
        return self._decoded(next_key, decode_markers, bucket), next_id

    def _encoded(self, page: dict[str, Any]) -> tuple[bool, bool]:
        """Whether this page's keys, and its markers, are URL-encoded. AWS and MinIO encode
        both and say so (``EncodingType=url`` in the answer; a store that ignores the request
        sends raw keys and says nothing); a store with ``url_encoding: keys_only`` (Ceph)
        always encodes ``Key``, sends the markers raw, and never says so."""
        if self.profile.url_encoding == "keys_only":
            return True, False
        echoed = str(page.get("EncodingType", "")).lower() == "url"
        return echoed, echoed

    @staticmethod
    def _decoded(value: str, encoded: bool, bucket: str) -> str:
        if not encoded:
            return value
        try:
            return urllib.parse.unquote_plus(value, errors="strict")
        except UnicodeDecodeError as error:
            raise StoreError(
                f"ListMultipartUploads on bucket {bucket!r} answered a key that is not "
                f"URL-encoded UTF-8: {value!r}",
                container=bucket,
            ) from error

    def _send_listing(
        self, params: dict[str, Any], bucket: str, spill: ListingSpill
    ) -> dict[str, Any]:
        """One ListMultipartUploads request whose uploads are streamed into ``spill``
        (stores/streamed_listing.py): memory stays flat however many one answer holds."""
        self.client.meta.events.register(
            "before-send.s3.ListMultipartUploads",
            stream_listing_handler(self.client),
            unique_id="mpu-janitor-streamed-listing",
        )
        with installed(spill):
            return self._send(self.client.list_multipart_uploads, params, bucket)

    @staticmethod
    def _send(call: Any, params: dict[str, Any], container: str) -> dict[str, Any]:
        """One request, its failure in the engine's vocabulary (so ``pace`` sees Throttled)."""
        try:
            response: dict[str, Any] = read_whole(call, params)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            raise translate_error(error, container) from error
        return response

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        """Every page is one ListParts request sent through ``pace``, resumed from the last
        part number seen, so a throttled page is retried alone."""
        params = self._common(upload.container)
        params.update(Key=upload.key, UploadId=upload.upload_id, MaxParts=PAGE_SIZE)
        size = count = 0
        newest: datetime | None = None
        now: datetime | None = None
        marker = 0
        while True:
            request = dict(params)
            if marker:
                request["PartNumberMarker"] = marker
            page = pace(functools.partial(self._list_parts_page, request, upload.container))
            now = server_time(page, "S3")
            parts = page.get("Parts", [])
            for part in parts:
                if int(part["PartNumber"]) <= marker:
                    continue  # listed on an earlier page already
                size += int(part["Size"])
                count += 1
                modified = part["LastModified"].astimezone(UTC)
                if newest is None or modified > newest:
                    newest = modified
            if not page.get("IsTruncated"):
                break
            following = int(page.get("NextPartNumberMarker") or 0)
            if parts:
                following = max(following, max(int(part["PartNumber"]) for part in parts))
            if following <= marker or following > MAX_PART_NUMBER:
                raise StoreError(
                    f"ListParts of {upload.key!r} in bucket {upload.container!r} made no "
                    f"progress: a truncated page after part {marker} whose next part-number "
                    f"marker is {page.get('NextPartNumberMarker')!r}",
                    container=upload.container,
                )
            marker = following
        return PartsSummary(size, count, newest, now)  # no Date: no clock, never ours

    def _list_parts_page(self, params: dict[str, Any], container: str) -> dict[str, Any]:
        if not is_directory_bucket(container):
            try:
                page = self.fast.list_parts(params, self._gone_codes)
            except Gone as gone:
                raise UploadGone(f"{gone.args[0]}: upload {params['UploadId']!r} is gone") from gone
            if page is not None:
                return page
        try:
            response: dict[str, Any] = read_whole(self.client.list_parts, params)
        except botocore.exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in self.profile.list_parts_gone_codes:
                # This store's way of saying "no such upload" (Ceph: 404 NoSuchKey).
                raise UploadGone(f"{code}: upload {params['UploadId']!r} is gone") from error
            raise translate_error(error, container) from error
        except botocore.exceptions.BotoCoreError as error:
            raise translate_error(error, container) from error
        return response

    def abort(self, upload: Upload) -> None:
        params = self._common(upload.container)
        if self.object_rule != "Always":
            self._check_object_at_key(upload, params)
        if is_directory_bucket(upload.container) and self.profile.directory_buckets:
            params["IfMatchInitiatedTime"] = upload.initiated
        params.update(Key=upload.key, UploadId=upload.upload_id)
        sent_before = False
        if not is_directory_bucket(upload.container):
            try:
                if self.fast.abort(params):
                    return
            except Gone as gone:
                raise UploadGone(f"{gone.args[0]}: upload {upload.upload_id!r}") from gone
            except Fallback as fallback:
                # Sent again through botocore, as its own retry would. If the first attempt
                # may have been applied, NoSuchUpload now is ours, like a retried call's.
                sent_before = fallback.maybe_applied
        try:
            self.client.abort_multipart_upload(**params)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            translated = translate_error(error, upload.container)
            if isinstance(translated, UploadGone) and (sent_before or _retried(error)):
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
