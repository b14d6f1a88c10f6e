"""A lighter signed-request path for the sweep's two hot S3 calls, ListParts and
AbortMultipartUpload.

botocore spends about half of a request's client CPU outside the HTTP exchange: events,
parameter validation, model serialisation, endpoint-rule resolution on every call, response
model parsing. This path keeps botocore for what it is good at and skips the rest:

- the bucket's endpoint (path or virtual-hosted style, as the profile says) is resolved by the
  client's own endpoint rules, once per bucket;
- credentials are the client's (refreshable ones are frozen per request), signing is
  botocore's ``S3SigV4Auth`` (it canonicalises hostile keys), the HTTP session, pool, TLS
  verification and CA bundle are the client's;
- the ListParts XML is read with the stdlib's C parser.

Safe by construction: only the clean answers are handled here (ListParts 200, Abort 204/200,
404 with a code that says the upload is gone). Every other outcome (another status, a body
that does not parse, a cut answer, a connection error or timeout) returns ``None`` and the
caller sends the same call through botocore, which keeps every retry and error rule. Every
attempt is reported to the request observer as botocore's attempts are.

``ENABLED`` (or ``MPU_JANITOR_FAST_REQUESTS=0`` in the environment) switches the path off.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any

import botocore.auth
import botocore.awsrequest
import botocore.utils

from mpu_janitor.stores.aws import MAX_RETRIES, attempt_code, parse_store_timestamp
from mpu_janitor.stores.base import RequestObserver

log = logging.getLogger(__name__)

ENABLED = os.environ.get("MPU_JANITOR_FAST_REQUESTS", "1") != "0"

_GONE_STATUS = 404
_KEPT_HEADERS = ("date", "content-length", "x-amz-request-id", "x-amz-id-2")
# A 4xx answer that botocore's standard retry mode would retry: the abort may have been
# applied by the attempt that got it (as for no answer or a 5xx).
_RETRIED_CODES = {
    "RequestTimeout",
    "RequestTimeoutException",
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestThrottled",
    "PriorRequestNotComplete",
}


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a bucket's requests go and how they are signed."""

    base: str  # scheme://authority/path, the key's path is appended
    region: str


@dataclass(frozen=True, slots=True)
class Answer:
    """A clean answer, or why there was none (``None`` from a call means "use botocore")."""

    status: int
    headers: dict[str, str]
    body: bytes


class Fallback(Exception):
    """No clean answer: send the call through botocore. ``maybe_applied``: the attempt may
    have reached the store and been applied (no answer, a cut answer, 5xx, a retried 4xx)."""

    def __init__(self, reason: str, maybe_applied: bool) -> None:
        super().__init__(reason)
        self.maybe_applied = maybe_applied


class FastS3:
    """ListParts and AbortMultipartUpload on general-purpose buckets, beside one client."""

    def __init__(self, client: Any, observer: RequestObserver) -> None:
        self.client = client
        self.observer = observer
        self._routes: dict[str, _Route | None] = {}
        self._lock = threading.Lock()
        self._user_agent: str | None = None
        try:
            self._credentials = client._request_signer._credentials
            self._session = client._endpoint.http_session
            self._user_agent = client._user_agent_creator.to_string()
        except AttributeError:  # another botocore's internals: botocore only
            self._credentials = None

    # -- routes ---------------------------------------------------------------------------

    def route(self, bucket: str) -> _Route | None:
        """The bucket's route from the client's endpoint rules (once per bucket); None when
        this path does not serve it (no credentials, not plain SigV4 for ``s3``, unknown
        botocore internals): botocore then sends every call."""
        if not ENABLED or self._credentials is None:
            return None
        try:
            return self._routes[bucket]
        except KeyError:
            pass
        with self._lock:
            if bucket not in self._routes:
                self._routes[bucket] = self._resolve(bucket)
            return self._routes[bucket]

    def _resolve(self, bucket: str) -> _Route | None:
        client = self.client
        try:
            model = client.meta.service_model.operation_model("ListParts")
            context: dict[str, Any] = {
                "client_region": client.meta.region_name,
                "client_config": client.meta.config,
                "has_streaming_input": False,
                "auth_type": model.resolved_auth_type,
            }
            url, headers, _ = client._resolve_endpoint_ruleset(
                model, {"Bucket": bucket, "Key": "k", "UploadId": "u"}, context
            )
        except Exception:  # any doubt: botocore sends the calls
            log.debug("no fast route for bucket %r", bucket, exc_info=True)
            return None
        signing = context.get("signing") or {}
        if (
            headers
            or context.get("auth_type") not in ("v4", "s3v4", None)
            or signing.get("signing_name", "s3") != "s3"
            or not url
        ):
            return None
        return _Route(str(url), str(signing.get("region") or client.meta.region_name))

    # -- requests -------------------------------------------------------------------------

    def _send(
        self,
        operation: str,
        method: str,
        route: _Route,
        key: str,
        query: list[tuple[str, str]],
        headers: dict[str, str],
    ) -> Answer:
        url = _join(route.base, "/" + botocore.utils.percent_encode(key, safe="/~"))
        url += "?" + botocore.utils.percent_encode_sequence(query)
        all_headers = dict(headers)
        if self._user_agent:
            all_headers["User-Agent"] = self._user_agent
        all_headers["amz-sdk-invocation-id"] = str(uuid.uuid4())
        all_headers["amz-sdk-request"] = f"attempt=1; max={MAX_RETRIES + 1}"
        request = botocore.awsrequest.AWSRequest(
            method=method, url=url, headers=all_headers, data=b""
        )
        request.context["client_config"] = self.client.meta.config
        credentials = self._credentials.get_frozen_credentials()
        botocore.auth.S3SigV4Auth(credentials, "s3", route.region).add_auth(request)
        try:
            response = self._session.send(request.prepare())
            body = response.content
        except Exception as error:  # no answer: botocore decides
            self._observe(operation, attempt_code(None, error))
            raise Fallback(f"{operation}: {type(error).__name__}", maybe_applied=True) from error
        status = int(response.status_code)
        # The headers the callers read (the Date is the store's clock), lowercased as botocore's.
        answer_headers = {
            name: value
            for name in _KEPT_HEADERS
            if (value := response.headers.get(name)) is not None
        }
        length = answer_headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != len(body):
            self._observe(operation, "IncompleteRead")
            raise Fallback(f"{operation}: answer cut short", maybe_applied=True)
        self._observe(operation, str(status))
        return Answer(status, answer_headers, body)

    def _observe(self, operation: str, code: str) -> None:
        try:
            self.observer(operation, code)
        except Exception:  # a broken metrics callback must never break a store call
            log.exception("request observer failed")

    def list_parts(
        self, params: dict[str, Any], gone_codes: frozenset[str]
    ) -> dict[str, Any] | None:
        """One ListParts page in botocore's response shape (Parts, IsTruncated,
        NextPartNumberMarker, ResponseMetadata), ``None`` when botocore must send it (or
        raises ``Gone`` with the store's code when the upload is gone)."""
        route = self.route(params["Bucket"])
        if route is None:
            return None
        query = [("uploadId", params["UploadId"]), ("max-parts", str(params["MaxParts"]))]
        if params.get("PartNumberMarker"):
            query.append(("part-number-marker", str(params["PartNumberMarker"])))
        try:
            answer = self._send("ListParts", "GET", route, params["Key"], query, _headers(params))
        except Fallback:
            return None
        if answer.status == 200:
            return parse_list_parts(answer)
        code = error_code(answer.body) if answer.status == _GONE_STATUS else None
        if code is not None and code in gone_codes:
            raise Gone(code)
        return None

    def abort(self, params: dict[str, Any]) -> bool:
        """Abort one upload: True when the store said so (204/200). Raises ``Gone`` when it
        answered NoSuchUpload to this one attempt, ``Fallback`` for anything else."""
        route = self.route(params["Bucket"])
        if route is None:
            raise Fallback("no fast route", maybe_applied=False)
        query = [("uploadId", params["UploadId"])]
        answer = self._send(
            "AbortMultipartUpload", "DELETE", route, params["Key"], query, _headers(params)
        )
        if answer.status in (200, 204):
            return True
        code = error_code(answer.body)
        if answer.status == _GONE_STATUS and code == "NoSuchUpload":
            raise Gone(code)
        retried = answer.status >= 500 or answer.status in (408, 429) or code in _RETRIED_CODES
        raise Fallback(f"AbortMultipartUpload answered {answer.status}", maybe_applied=retried)


class Gone(Exception):
    """The store answered that the upload does not exist (its code in ``args[0]``)."""


def _headers(params: dict[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    if params.get("ExpectedBucketOwner"):
        headers["x-amz-expected-bucket-owner"] = str(params["ExpectedBucketOwner"])
    if params.get("RequestPayer"):
        headers["x-amz-request-payer"] = str(params["RequestPayer"])
    return headers


def _join(base: str, path: str) -> str:
    """botocore's join of an endpoint and a request path (``prepare_request_dict``)."""
    scheme, _, rest = base.partition("://")
    authority, slash, base_path = rest.partition("/")
    base_path = slash + base_path
    if base_path.endswith("/"):
        base_path = base_path[:-1]
    return f"{scheme}://{authority}{base_path}{path}"


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def error_code(body: bytes) -> str | None:
    """The ``Code`` of an S3 XML error body, None if it has none or does not parse."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    for child in root:
        if _local(child.tag) == "Code":
            return (child.text or "").strip() or None
    return None


# S3's root element, and moto's.
_LIST_PARTS_ROOTS = {"ListPartsResult", "ListPartsResponse"}


class Unparsed(Exception):
    """A ListParts body this path does not read: botocore reads it."""


def parse_list_parts(answer: Answer) -> dict[str, Any] | None:
    """A ListParts 200 body as botocore would parse it, the fields the sweep reads; ``None``
    when it is not a ListPartsResult this reader understands."""
    try:
        root = ElementTree.fromstring(answer.body)
    except ElementTree.ParseError:
        return None
    if _local(root.tag) not in _LIST_PARTS_ROOTS:
        return None
    page: dict[str, Any] = {"Parts": []}
    try:
        for child in root:
            name = _local(child.tag)
            text = (child.text or "").strip()
            if name == "IsTruncated":
                if text.lower() not in ("true", "false"):
                    return None
                page["IsTruncated"] = text.lower() == "true"
            elif name == "NextPartNumberMarker" and text:
                page["NextPartNumberMarker"] = int(text)
            elif name == "Part":
                page["Parts"].append(_part(child))
    except (ValueError, Unparsed):
        return None
    page["ResponseMetadata"] = {"HTTPStatusCode": answer.status, "HTTPHeaders": answer.headers}
    return page


def _part(element: ElementTree.Element) -> dict[str, Any]:
    fields = {_local(child.tag): (child.text or "").strip() for child in element}
    try:
        return {
            "PartNumber": int(fields["PartNumber"]),
            "Size": int(fields["Size"]),
            "LastModified": parse_store_timestamp(fields["LastModified"]),
        }
    except KeyError as missing:
        raise Unparsed(f"a Part without {missing}") from missing
