"""A small async Kubernetes API client for what Kopf does not do for us from a scheduler:
patching a policy's status and reading a Secret. It authenticates with the same
``kopf.ConnectionInfo`` that Kopf logs in with, and logs in again after a 401 (rotated
ServiceAccount tokens)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json as json_module
import os
import ssl
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from mpu_janitor.policy import API_GROUP, API_VERSION

PLURAL = "uploadlifecyclepolicies"

Login = Callable[[], Awaitable[kopf.ConnectionInfo | None]]


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Forbidden(KubeError):
    pass


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=(info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data)
        if info.ca_data
        else None,
    )
    certificate = info.certificate_path
    key = info.private_key_path
    if info.certificate_data and info.private_key_data:
        # ssl wants files for client certificates: private temp files, removed once read.
        certificate = _temp_file(info.certificate_data)
        key = _temp_file(info.private_key_data)
        try:
            context.load_cert_chain(certificate, key)
        finally:
            for path in (certificate, key):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        return context
    if certificate and key:
        context.load_cert_chain(str(certificate), str(key))
    return context


def _temp_file(data: str | bytes) -> str:
    raw = data if isinstance(data, bytes) else data.encode()
    handle = tempfile.NamedTemporaryFile(prefix="mpu-janitor-", delete=False)  # noqa: SIM115
    with handle:
        handle.write(raw)
    return handle.name


THROTTLE_ATTEMPTS = 6


def _retry_after(header: str | None, attempt: int) -> float:
    backoff: float = min(30.0, 0.5 * 2.0**attempt)
    try:
        return min(30.0, max(0.0, float(header))) if header else backoff
    except ValueError:
        return backoff


class KubeClient:
    def __init__(self, login: Login) -> None:
        self._login = login
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()

    async def _connect(self, *, fresh: bool) -> tuple[aiohttp.ClientSession, str]:
        async with self._lock:
            if fresh or self._session is None or self._info is None:
                info = await self._login()
                if info is None:
                    raise KubeError(0, "no Kubernetes credentials (kubeconfig or ServiceAccount)")
                if self._session is not None:
                    await self._session.close()
                headers = {"Accept": "application/json"}
                if info.token:
                    headers["Authorization"] = f"Bearer {info.token}"
                elif info.username and info.password:
                    pair = f"{info.username}:{info.password}".encode()
                    headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
                self._session = aiohttp.ClientSession(
                    headers=headers,
                    connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=16),
                    timeout=aiohttp.ClientTimeout(total=30),
                )
                self._info = info
            return self._session, self._info.server.rstrip("/")

    async def request(
        self, method: str, path: str, *, json: Any = None, content_type: str | None = None
    ) -> Any:
        relogged = login_again = False
        for attempt in range(THROTTLE_ATTEMPTS):
            session, server = await self._connect(fresh=login_again)
            login_again = False
            headers = {"Content-Type": content_type} if content_type else {}
            async with session.request(method, server + path, json=json, headers=headers) as rsp:
                if rsp.status == 401 and not relogged:
                    relogged = login_again = True  # a rotated token: log in once more
                    continue
                if rsp.status == 429 and attempt < THROTTLE_ATTEMPTS - 1:
                    # API Priority and Fairness asks us to wait: honour Retry-After.
                    await asyncio.sleep(_retry_after(rsp.headers.get("Retry-After"), attempt))
                    continue
                text = await rsp.text()
                try:
                    body = json_module.loads(text) if text else None
                except ValueError:
                    body = {"message": text[:500]}
                if rsp.status >= 400:
                    message = (body or {}).get("message", "") if isinstance(body, dict) else ""
                    kind = {404: NotFound, 403: Forbidden}.get(rsp.status, KubeError)
                    raise kind(rsp.status, message or rsp.reason or "")
                return body
        raise KubeError(429, "the API server kept asking us to wait (429)")

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any]:
        body: Mapping[str, Any] = await self.request(
            "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"
        )
        return body

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> Any:
        path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        return await self.request(
            "PATCH", path, json={"status": status}, content_type="application/merge-patch+json"
        )

    async def create_event(
        self, obj: Mapping[str, Any], event_type: str, reason: str, message: str, *, instance: str
    ) -> None:
        """A core v1 Event about a policy (what ``kubectl describe`` and ``get events`` show)."""
        metadata = obj.get("metadata") or {}
        namespace = metadata.get("namespace") or "default"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                # Named like client-go's recorder names them: <object>.<unique hex>.
                "name": f"{metadata.get('name', 'policy')}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", f"{API_GROUP}/{API_VERSION}"),
                "kind": obj.get("kind", "UploadLifecyclePolicy"),
                "name": metadata.get("name"),
                "namespace": namespace,
                "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "mpu-janitor"},
            "reportingComponent": f"{API_GROUP}/operator",
            "reportingInstance": instance[:128],
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", json=event)

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
        if self._session is not None:
            await self._session.close()
            self._session = None
