"""The one small protocol every store family implements, and the errors the engine understands.

A store lists incomplete uploads page by page (with the store's own clock), measures one
upload from its parts listing, and aborts one upload. It knows nothing of Kubernetes, of
policies beyond its own target, or of Prometheus: request outcomes go to an observer callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

# (operation, code) -> None; code is an HTTP status or an error code such as "Timeout".
RequestObserver = Callable[[str, str], None]

T = TypeVar("T")


def ignore_requests(operation: str, code: str) -> None:
    """The default observer."""


class Pace(Protocol):
    """How a store sends one request on the engine's behalf: the engine waits for a rate
    token, retries the request itself when the store throttles (so a throttled page is
    retried, never the whole listing), and raises ``Cancelled`` before a request when the
    sweep is being stopped. Stores send every page of a listing through it, one request per
    call; ``finish=True`` marks a request that must go out even during a stop (verifying an
    abort already sent)."""

    def __call__(self, request: Callable[[], T], *, finish: bool = False) -> T: ...


def unpaced(request: Callable[[], T], *, finish: bool = False) -> T:
    """The Pace of a caller with no rate limit (tests, one-off calls): send it now."""
    return request()


@dataclass(frozen=True, slots=True)
class StoreCredentials:
    """Explicit credentials from a Secret. None of a store's fields: the default AWS chain."""

    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    api_key: str | None = None  # LILT
    # Renewing AWS credentials (botocore RefreshableCredentials: workload identity); when set,
    # the client uses them and nothing else (no key fields, never the default chain).
    provider: Any = None
    ca_bundle: str | None = None  # PEM CAs the endpoint's certificate is verified with

    def __repr__(self) -> str:  # never leak secret values into logs or tracebacks
        return "StoreCredentials(<redacted>)"


@dataclass(frozen=True, slots=True)
class Upload:
    """One incomplete multipart upload. ``container`` is the bucket or vault."""

    container: str
    key: str
    upload_id: str
    initiated: datetime


@dataclass(frozen=True, slots=True)
class UploadPage:
    """One page of a listing. ``server_time`` is the store's clock (the response Date header);
    None when the response carried none: the engine then judges no age (never on our clock)."""

    uploads: Sequence[Upload]
    server_time: datetime | None
    # Where this page sits in the store's listing, opaque to the engine: a store that can prove
    # aborts gone by listing again (``BulkVerifier``) is handed it back with each upload.
    position: object = None


@dataclass(frozen=True, slots=True)
class PartsSummary:
    """What an upload holds: bytes = sum of the part sizes; ``newest_part`` decides activity."""

    size_bytes: int
    part_count: int
    newest_part: datetime | None
    server_time: datetime | None  # the response's Date; None: the quiet period is not judged


class StoreError(Exception):
    """A store call that failed. ``reason`` is a condition reason such as ``AccessDenied``."""

    reason = "StoreError"

    def __init__(self, message: str, *, container: str | None = None) -> None:
        super().__init__(message)
        self.container = container


class AccessDenied(StoreError):
    reason = "AccessDenied"


class StoreUnreachable(StoreError):
    reason = "StoreUnreachable"


class ContainerNotFound(StoreError):
    """The bucket or vault does not exist."""

    reason = "BucketNotFound"


class Throttled(StoreError):
    """The store asked us to slow down (503 SlowDown, LimitExceeded, 429). ``retry_after`` is
    the wait the store asked for, if it said (LILT's quota: 60 s)."""

    reason = "Throttled"

    def __init__(
        self, message: str, *, container: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, container=container)
        self.retry_after = retry_after


class InvalidTarget(StoreError):
    """The store rejected the request shape itself (bad bucket name, bad region, ...)."""

    reason = "InvalidSpec"


class UploadGone(Exception):
    """NoSuchUpload: the upload is not (or no longer) there."""


class UploadReplaced(Exception):
    """412 on a conditional abort: the key's upload is not the one we measured."""


class AbortRefused(Exception):
    """The store declined to send an abort that could destroy more than the upload (an object
    at the key on stores where an abort may delete it). Not a failure: the upload is skipped,
    counted as protected and reported under ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ListingProof:
    """What one verifying listing proved: the ids it proves gone, and how many uploads it
    listed (its cost, which sets how large the engine lets the next batch grow)."""

    gone: frozenset[str]
    listed: int


class BulkVerifier(Protocol):
    """A store whose listing is consistent enough to prove many aborts gone at once.

    ``proven_gone`` lists the range of the container that the given uploads were listed in
    (each with the ``position`` of its page) and returns the ids of those the listing proves
    gone (and the number of uploads it listed): a listing that would have shown the upload had
    it still existed, and did not. Every upload it cannot vouch for (outside the range it
    listed, a listing that may be partial, a store or bucket where a listing proves nothing) is
    left out, and the engine verifies it one by one with its parts listing. Each page request
    goes through ``pace``."""

    def proven_gone(
        self,
        container: str,
        uploads: Sequence[tuple[Upload, object]],
        pace: Pace = unpaced,
    ) -> ListingProof: ...


class Store(Protocol):
    """A store target: the buckets or vaults one policy covers, behind one set of credentials."""

    @property
    def kind(self) -> str:
        """The store label for metrics and status: S3, Glacier, LILT."""
        ...

    @property
    def target_id(self) -> str:
        """Identifies the store endpoint and account, for the per-target sweep lock."""
        ...

    def containers(self) -> list[str]:
        """The buckets or vaults to sweep (resolving a bucket pattern if there is one)."""
        ...

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        """Incomplete uploads of one container, page by page, each page one request sent
        through ``pace``. ``prefixes`` is a hint: the store may return uploads outside them
        (the engine filters), never fewer."""
        ...

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        """All pages of the parts listing, each page one request sent through ``pace``.
        Raises UploadGone."""
        ...

    def abort(self, upload: Upload) -> None:
        """Abort once. Raises UploadGone (already gone) or UploadReplaced (412)."""
        ...

    def forget(self, upload: Upload) -> None:
        """Called once an upload is verified gone (LILT prunes its inventory; others do nothing)."""
        ...

    def close(self) -> None: ...
