"""botocore plumbing shared by the S3 and Glacier stores: one client per credential set that
reports every HTTP attempt to the request observer, and the store's clock from a response.

Clients come from botocore's own session, not boto3's: boto3 adds resources and the S3
transfer manager (``upload_file`` and friends), which no store uses, and importing boto3 and
its transfer manager cost every CLI run about 0.1 s of start-up. The credential chain, the
configuration and the client are botocore's either way."""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import re
import tempfile
import weakref
from datetime import UTC, datetime
from typing import Any

import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.loaders
import botocore.session
import botocore.utils

from mpu_janitor import __version__
from mpu_janitor.policy import MAX_CONCURRENCY
from mpu_janitor.stores.base import (
    AccessDenied,
    RequestObserver,
    StoreCredentials,
    StoreError,
    StoreUnreachable,
)

log = logging.getLogger(__name__)

# botocore's ``retries.max_attempts`` counts retries, not tries: 4 jittered retries after the
# first attempt, 5 HTTP requests at most per call before the engine hears of the failure (and
# slows the whole sweep down if it was throttling).
MAX_RETRIES = 4

CONNECTION_ERRORS = (
    botocore.exceptions.IncompleteReadError,  # an answer cut short (refuse_cut_answers)
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ProxyConnectionError,
    botocore.exceptions.HTTPClientError,
)


def client_config(
    region: str, *, read_timeout: float = 30.0, **extra: Any
) -> botocore.config.Config:
    """Explicit retries, short timeouts, a pool as large as any policy's concurrency."""
    return botocore.config.Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": MAX_RETRIES},
        connect_timeout=5,
        read_timeout=read_timeout,
        # Never fewer connections than a sweep's workers (pools fill lazily: no cost unused).
        max_pool_connections=MAX_CONCURRENCY,
        user_agent_extra=f"mpu-janitor/{__version__}",
        **extra,
    )


_LOADER = botocore.loaders.create_loader()


def make_client(
    service: str,
    *,
    region: str,
    endpoint: str | None,
    credentials: StoreCredentials | None,
    observer: RequestObserver,
    config: botocore.config.Config,
) -> Any:
    """A thread-safe client shared by a sweep's workers. Without explicit keys: botocore's default
    chain (environment, IRSA web identity, Pod Identity, profile, instance metadata)."""
    if credentials is not None and credentials.provider is not None:
        session = isolated_session(credentials.provider)
    else:
        session = botocore.session.Session()  # the default chain (or the keys given below)
    keys: dict[str, Any] = {}
    if credentials is not None and credentials.provider is None and credentials.access_key_id:
        keys = {
            "aws_access_key_id": credentials.access_key_id,
            "aws_secret_access_key": credentials.secret_access_key,
            "aws_session_token": credentials.session_token,
        }
    # One loader for the process: its cache keeps the parsed service models, which a fresh
    # session would read and parse again (80 ms of CPU and ~12 MB for each store opened).
    session.register_component("data_loader", _LOADER)
    # Timestamps without a zone are UTC (botocore would read them in the operator's local
    # zone: at UTC+9 every upload would look 9 hours older than it is).
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_store_timestamp
    )
    ca_file = private_ca_file(credentials.ca_bundle) if credentials is not None else None
    client = session.create_client(
        service,
        region_name=region,
        endpoint_url=endpoint,
        config=config,
        **keys,
        **({"verify": ca_file} if ca_file else {}),
    )
    if ca_file is not None:
        _remove_with(client, ca_file)

    def on_answer(response_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            refuse_cut_answers(response_dict, **kwargs)
        except botocore.exceptions.IncompleteReadError:
            # raised before botocore's response-received: count the cut attempt here
            operation_model = kwargs.get("operation_model")
            try:
                observer(getattr(operation_model, "name", "Unknown"), "IncompleteRead")
            except Exception:  # a broken metrics callback must never break a store call
                log.exception("request observer failed")
            raise

    client.meta.events.register(f"before-parse.{service}", on_answer)
    if service == "s3":
        client.meta.events.register("before-parse.s3", lowercase_xml_booleans)

    # ``response-received`` fires once per HTTP attempt, retries included, so throttled
    # attempts that boto3 retried still show in store_requests_total (``after-call`` fires
    # once per API call, after the retries, and would hide them).
    def on_response(
        response_dict: dict[str, Any] | None = None,
        exception: Exception | None = None,
        **kwargs: Any,
    ) -> None:
        operation = str(kwargs.get("event_name", "")).rsplit(".", 1)[-1]
        try:
            observer(operation, attempt_code(response_dict, exception))
        except Exception:  # a broken metrics callback must never break a store call
            log.exception("request observer failed")

    client.meta.events.register(f"response-received.{service}", on_response)
    return client


def isolated_session(credentials: botocore.credentials.Credentials | None) -> Any:
    """A botocore session whose only credentials are ``credentials`` (None: unsigned use
    only): the default chain (environment, IRSA, instance metadata) is never consulted."""
    providers = [_Given(credentials)] if credentials is not None else []
    session = botocore.session.Session()
    session.register_component(
        "credential_provider", botocore.credentials.CredentialResolver(providers)
    )
    return session


class _Given(botocore.credentials.CredentialProvider):  # type: ignore[misc]
    METHOD = "mpu-janitor"

    def __init__(self, credentials: botocore.credentials.Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> botocore.credentials.Credentials:
        return self._credentials


def private_ca_file(pem: str | None) -> str | None:
    """A policy's CA bundle as a file only this process can read (botocore's ``verify`` wants
    a path, read again for every new connection); None without a bundle."""
    if not pem:
        return None
    descriptor, path = tempfile.mkstemp(prefix="mpu-janitor-ca-", suffix=".pem")
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:  # mkstemp: mode 0600
        handle.write(pem)
    return path


def _remove_with(client: Any, path: str) -> None:
    """Remove ``path`` when the client is closed (or collected, or at exit at the latest)."""
    remove = weakref.finalize(client, _unlink, path)
    close = client.close

    def close_and_remove() -> None:
        try:
            close()
        finally:
            remove()

    client.close = close_and_remove


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def refuse_cut_answers(
    response_dict: dict[str, Any] | None = None, operation_model: Any = None, **_: Any
) -> None:
    """botocore reads answers without enforcing Content-Length, and parses an empty body as
    an empty result: a ListParts or listing answer cut right after its headers would read as
    "no parts" or "no more uploads". An answer shorter (or longer) than it said is a
    connection failure, never a short count."""
    if not response_dict or (operation_model and operation_model.http.get("method") == "HEAD"):
        return
    body = response_dict.get("body")
    length = (response_dict.get("headers") or {}).get("content-length")
    if not isinstance(body, bytes) or length is None or not str(length).isdigit():
        return
    if len(body) != int(length):
        raise botocore.exceptions.IncompleteReadError(
            actual_bytes=len(body), expected_bytes=int(length)
        )


def parse_store_timestamp(value: Any) -> datetime:
    """botocore's timestamp parser, with UTC for a time that carries no zone (Tencent COS
    documents zone-less ``2017-01-18T16:04:17`` and ``Wed Jan 18 16:04:17 2017`` forms)."""
    moment: datetime | None = None
    if isinstance(value, str) and "T" in value:
        # The ISO 8601 form the stores answer, parsed 400 times faster than by botocore's
        # general parser (dateutil), which every listed upload and part went through.
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
    if moment is None:
        moment = botocore.utils.parse_timestamp(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


_XML_BOOLEAN = re.compile(
    rb"<(IsTruncated|IsLatest|BucketKeyEnabled)>\s*(TRUE|True|FALSE|False)\s*</\1>"
)


def lowercase_xml_booleans(response_dict: dict[str, Any] | None = None, **_: Any) -> None:
    """Tencent COS documents ``<IsTruncated>TRUE</IsTruncated>``; botocore reads only
    ``true`` as true, so a listing would silently end after its first page."""
    if not response_dict:
        return
    body = response_dict.get("body")
    if isinstance(body, bytes) and b"<IsTruncated>" in body:
        response_dict["body"] = _XML_BOOLEAN.sub(
            lambda m: b"<%s>%s</%s>" % (m[1], m[2].lower(), m[1]), body
        )


def attempt_code(response_dict: dict[str, Any] | None, exception: Exception | None) -> str:
    """The ``code`` label of one HTTP attempt: its status, or the kind of failure."""
    if response_dict is not None:
        return str(response_dict.get("status_code", ""))
    if isinstance(
        exception, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError
    ):
        return "Timeout"
    return type(exception).__name__ if exception is not None else "Unknown"


def server_time(response: dict[str, Any], service: str) -> datetime | None:
    """The store's clock, from the response's Date header: ages are judged on it, never on
    ours (a skewed node clock must never make an upload look older than it is). None when the
    response has no usable Date: the engine then judges no age at all (it skips and says why).
    An HTTP date is GMT; one without a zone is read as UTC, never in the local zone."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        # AWS always sends Date; only a broken proxy or store would strip it.
        log.warning("%s response without a Date header: no age is judged", service)
        return None
    try:
        moment = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        log.warning("unparseable Date header from %s: %r: no age is judged", service, date)
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def translate_transport_error(error: Exception, container: str | None) -> Exception:
    """A botocore failure that is not an error response (no credentials, no connection) in the
    engine's vocabulary; anything else is returned unchanged."""
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return AccessDenied(f"no AWS credentials found: {error}", container=container)
    if isinstance(error, CONNECTION_ERRORS):
        return StoreUnreachable(str(error), container=container)
    if isinstance(error, botocore.exceptions.BotoCoreError):
        return StoreError(str(error), container=container)
    return error
