"""The operator's own Kubernetes calls (what Kopf does not do for us from a scheduler):
reading a policy's Secret, patching a policy's status, reading Kopf's peering object.

A thin facade over ``kubernetes_asyncio`` (``ApiClient``, ``CoreV1Api``,
``CustomObjectsApi``) that the rest of the operator calls, with three behaviours of its own:

- a 429 from API Priority and Fairness is waited out (``Retry-After`` honoured, capped,
  a bounded number of times) instead of failing the call;
- a 401 logs in again once (a rotated ServiceAccount token, a revoked token), and a token
  an exec plugin said expires is replaced before it does;
- every failure is a :class:`KubeError` (:class:`NotFound`, :class:`Forbidden`), also a
  connection failure (status 0), so callers handle one family of errors.

It logs in with :func:`mpu_janitor.login.logged_in` (or whatever ``login`` it is given).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import aiohttp
from kubernetes_asyncio.client import ApiClient, ApiException, CoreV1Api, CustomObjectsApi

from mpu_janitor import __version__
from mpu_janitor.login import Login
from mpu_janitor.policy import API_GROUP, API_VERSION

log = logging.getLogger(__name__)

PLURAL = "uploadlifecyclepolicies"
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
THROTTLE_ATTEMPTS = 6  # 429s waited out before a call fails
MAX_RETRY_AFTER = 30.0  # seconds: the longest a Retry-After is honoured
REQUEST_TIMEOUT = 30.0  # seconds per request
EXPIRY_MARGIN = timedelta(seconds=10)  # log in again this long before a token expires
# A list of objects' metadata only (names, labels), not their specs and statuses.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"

T = TypeVar("T")


class LoginFactory(Protocol):
    def __call__(self) -> AbstractAsyncContextManager[Login]: ...


Sleep = Callable[[float], Awaitable[None]]


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Forbidden(KubeError):
    pass


def _retry_after(header: str | None, attempt: int) -> float:
    backoff: float = min(MAX_RETRY_AFTER, 0.5 * 2.0**attempt)
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(header))) if header else backoff
    except ValueError:
        return backoff


def _error(error: ApiException) -> KubeError:
    """The API server's Status message as a KubeError of the right kind."""
    message = ""
    try:
        body = json.loads(error.body) if error.body else None
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or "")
    elif error.body:
        message = str(error.body)[:500]
    status = int(error.status or 0)
    kind = {404: NotFound, 403: Forbidden}.get(status, KubeError)
    return kind(status, message or str(error.reason or ""))


class KubeClient:
    def __init__(self, login: LoginFactory, *, sleep: Sleep = asyncio.sleep) -> None:
        self._login = login
        self._sleep = sleep
        self._api: ApiClient | None = None
        self._retired: ApiClient | None = None
        self._expiration: datetime | None = None
        self._lock = asyncio.Lock()

    def _expiring(self) -> bool:
        if self._expiration is None:
            return False
        expiration = self._expiration
        if expiration.tzinfo is None:
            expiration = expiration.replace(tzinfo=UTC)
        return datetime.now(UTC) >= expiration - EXPIRY_MARGIN

    async def _client(self, stale: ApiClient | None = None) -> ApiClient:
        """The current ApiClient; a new login when there is none or ``stale`` was refused."""
        async with self._lock:
            if self._api is None or self._api is stale or self._expiring():
                async with self._login() as login:
                    # Built inside the login: the SSL context reads the login's files now.
                    api = ApiClient(login.configuration)
                    api.user_agent = f"mpu-janitor/{__version__}"
                    self._expiration = login.expiration
                if self._retired is not None:
                    # The one before last: its requests have long finished.
                    await self._retired.close()
                self._retired, self._api = self._api, api
            return self._api

    async def _call(self, call: Callable[[ApiClient], Awaitable[T]]) -> T:
        refused: ApiClient | None = None
        relogged = False
        for attempt in range(THROTTLE_ATTEMPTS):
            api = await self._client(refused)
            refused = None
            try:
                return await call(api)
            except ApiException as error:
                if error.status == 401 and not relogged:
                    relogged, refused = True, api  # a rotated token: log in once more
                    continue
                if error.status == 429 and attempt < THROTTLE_ATTEMPTS - 1:
                    # API Priority and Fairness asks us to wait: honour Retry-After.
                    headers: Mapping[str, str] = error.headers or {}
                    wait = headers.get("Retry-After")
                    await self._sleep(_retry_after(wait, attempt))
                    continue
                raise _error(error) from None
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                raise KubeError(0, f"cannot reach the API server: {error!r}") from error
        raise KubeError(429, "the API server kept asking us to wait (429)")

    # -- the calls ----------------------------------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any]:
        """A Secret as the API returns it (``data`` values base64-encoded)."""

        async def call(api: ApiClient) -> Mapping[str, Any]:
            secret = await CoreV1Api(api).read_namespaced_secret(
                name, namespace, _request_timeout=REQUEST_TIMEOUT
            )
            body: Mapping[str, Any] = api.sanitize_for_serialization(secret)
            return body

        return await self._call(call)

    async def create_service_account_token(
        self, namespace: str, name: str, *, audience: str, seconds: int = 600
    ) -> str:
        """A short-lived token for ServiceAccount ``namespace/name`` (TokenRequest: POST
        serviceaccounts/NAME/token), valid for ``audience`` only. 600 s is the shortest the
        API server issues."""
        body = await self.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            json={
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"audiences": [audience], "expirationSeconds": seconds},
            },
        )
        token = ((body or {}).get("status") or {}).get("token")
        if not isinstance(token, str) or not token:
            raise KubeError(0, f"TokenRequest for {namespace}/{name} returned no token")
        return token

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> Any:
        """A JSON merge patch of a policy's status subresource (None removes a key)."""

        async def call(api: ApiClient) -> Any:
            return await CustomObjectsApi(api).patch_namespaced_custom_object_status(
                API_GROUP,
                API_VERSION,
                namespace,
                PLURAL,
                name,
                {"status": dict(status)},
                # A dict body would go as a JSON patch: say merge patch (the stub lacks it).
                _content_type="application/merge-patch+json",  # type: ignore[call-arg]
                _request_timeout=REQUEST_TIMEOUT,
            )

        return await self._call(call)

    async def get_peering(self, name: str, namespace: str | None = None) -> Mapping[str, Any]:
        """Kopf's peering object: ``KopfPeering`` in ``namespace``, else ``ClusterKopfPeering``."""

        async def call(api: ApiClient) -> Any:
            objects = CustomObjectsApi(api)
            if namespace:
                return await objects.get_namespaced_custom_object(
                    PEERING_GROUP,
                    PEERING_VERSION,
                    namespace,
                    "kopfpeerings",
                    name,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            return await objects.get_cluster_custom_object(
                PEERING_GROUP,
                PEERING_VERSION,
                "clusterkopfpeerings",
                name,
                _request_timeout=REQUEST_TIMEOUT,
            )

        body: Mapping[str, Any] = await self._call(call)
        return body

    async def list_policy_names(
        self, namespace: str | None = None, label_selector: str | None = None
    ) -> set[tuple[str, str]]:
        """(namespace, name) of every policy in ``namespace`` (None: every namespace) that
        ``label_selector`` matches: metadata only, in pages of 500."""
        path = f"/apis/{API_GROUP}/{API_VERSION}/{PLURAL}"
        if namespace:
            path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}"
        found: set[tuple[str, str]] = set()
        token: str | None = None
        while True:
            query = [("limit", "500")]
            if label_selector:
                query.append(("labelSelector", label_selector))
            if token:
                query.append(("continue", token))
            page = await self.request("GET", path, query=query, accept=METADATA_LIST)
            for item in (page or {}).get("items") or []:
                metadata = item.get("metadata") or {}
                found.add((str(metadata.get("namespace")), str(metadata.get("name"))))
            token = ((page or {}).get("metadata") or {}).get("continue")
            if not token:
                return found

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content_type: str | None = None,
        query: Sequence[tuple[str, str]] = (),
        accept: str = "application/json",
    ) -> Any:
        """Any other API call by path (a JSON body in, the JSON answer out), with the same
        login, 401 and 429 handling: for calls no typed method covers yet."""

        async def call(api: ApiClient) -> Any:
            headers = {"Accept": accept}
            if content_type:
                headers["Content-Type"] = content_type
            return await api.call_api(
                path,
                method.upper(),
                query_params=list(query),
                header_params=headers,
                body=json,
                response_types_map={200: "object", 201: "object", 202: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=REQUEST_TIMEOUT,
            )

        return await self._call(call)

    async def review_token(self, token: str) -> Mapping[str, Any]:
        """A TokenReview of someone else's bearer token: its ``status`` (``authenticated``,
        ``user`` with ``username``, ``uid``, ``groups``, ``extra``)."""
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        body = await self.request(
            "POST", "/apis/authentication.k8s.io/v1/tokenreviews", json=review
        )
        status: Mapping[str, Any] = (body or {}).get("status") or {}
        return status

    async def review_access(
        self,
        *,
        user: str,
        groups: Sequence[str],
        uid: str,
        extra: Mapping[str, Sequence[str]],
        path: str,
        verb: str,
    ) -> Mapping[str, Any]:
        """A SubjectAccessReview of a user's ``verb`` on a non-resource URL (``/metrics``):
        its ``status`` (``allowed``, ``denied``, ``reason``)."""
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": list(groups),
                "uid": uid,
                "extra": {key: list(values) for key, values in extra.items()},
                "nonResourceAttributes": {"path": path, "verb": verb},
            },
        }
        body = await self.request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review
        )
        status: Mapping[str, Any] = (body or {}).get("status") or {}
        return status

    async def close(self) -> None:
        async with self._lock:
            for api in (self._retired, self._api):
                if api is not None:
                    await api.close()
            self._api = self._retired = None
