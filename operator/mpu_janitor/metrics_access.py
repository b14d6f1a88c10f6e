"""Who may read ``/metrics``: optional HTTPS (``--metrics-tls-cert``/``--metrics-tls-key``,
re-read when the files change, as a cert-manager renewal does), and with
``--metrics-auth=kubernetes`` every scrape's bearer token checked with a TokenReview and its
user allowed by a SubjectAccessReview (verb ``get`` on the non-resource URL ``/metrics``),
the way kube-rbac-proxy and controller-runtime's metrics filter do. Answers are cached briefly
by a hash of the token. ``/healthz`` stays open (the kubelet's probes carry no token).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger(__name__)

AUTH_MODES = ("none", "kubernetes")
METRICS_PATH = "/metrics"
OPEN_PATHS = frozenset({"/healthz"})
ALLOWED_TTL_SECONDS = 60.0  # a scrape allowed: not asked again for a minute
DENIED_TTL_SECONDS = 10.0  # a token refused: asked again soon (a new RoleBinding takes effect)
CACHE_ENTRIES = 1024
RELOAD_CHECK_SECONDS = 10.0


class Reviewer(Protocol):
    """The two API calls, as ``mpu_janitor.kube.KubeClient`` makes them."""

    async def review_token(self, token: str) -> Mapping[str, Any]: ...

    async def review_access(
        self,
        *,
        user: str,
        groups: Sequence[str],
        uid: str,
        extra: Mapping[str, Sequence[str]],
        path: str,
        verb: str,
    ) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Verdict:
    status: int  # 200, 401, 403
    reason: str


class MetricsAuthorizer:
    """TokenReview, then SubjectAccessReview; 401 without a valid token, 403 when the user
    may not ``get`` the path. The API server's own failures are 503 and never cached."""

    def __init__(
        self,
        reviewer: Reviewer,
        *,
        clock: Callable[[], float] = time.monotonic,
        allowed_ttl: float = ALLOWED_TTL_SECONDS,
        denied_ttl: float = DENIED_TTL_SECONDS,
    ) -> None:
        self.reviewer = reviewer
        self._clock = clock
        self._allowed_ttl, self._denied_ttl = allowed_ttl, denied_ttl
        self._cache: OrderedDict[tuple[str, str], tuple[float, Verdict]] = OrderedDict()
        self.reviews = 0  # TokenReviews sent (the tests count them)

    async def check(self, authorization: str | None, path: str) -> Verdict:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Verdict(401, "a bearer token is required")
        key = (hashlib.sha256(token.encode()).hexdigest(), path)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = await self._review(token, path)
        ttl = self._allowed_ttl if verdict.status == 200 else self._denied_ttl
        self._cache[key] = (now + ttl, verdict)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return verdict

    async def _review(self, token: str, path: str) -> Verdict:
        self.reviews += 1
        reviewed = await self.reviewer.review_token(token)
        if not reviewed.get("authenticated"):
            return Verdict(401, "the token is not valid")
        user = reviewed.get("user") or {}
        name = str(user.get("username") or "")
        access = await self.reviewer.review_access(
            user=name,
            groups=list(user.get("groups") or []),
            uid=str(user.get("uid") or ""),
            extra={k: list(v) for k, v in (user.get("extra") or {}).items()},
            path=path,
            verb="get",
        )
        if access.get("allowed") and not access.get("denied"):
            return Verdict(200, "allowed")
        return Verdict(403, f'{name} may not get "{path}"')

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def authorize(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            if request.path in OPEN_PATHS:
                return await handler(request)
            try:
                verdict = await self.check(request.headers.get("Authorization"), request.path)
            except Exception as error:  # the API server is unreachable or refused the review
                log.warning("cannot authorize a scrape of %s: %s", request.path, error)
                return web.Response(status=503, text="authorization is unavailable\n")
            if verdict.status == 401:
                return web.Response(
                    status=401,
                    text=f"Unauthorized: {verdict.reason}\n",
                    headers={"WWW-Authenticate": 'Bearer realm="mpu-janitor metrics"'},
                )
            if verdict.status != 200:
                return web.Response(status=verdict.status, text=f"Forbidden: {verdict.reason}\n")
            return await handler(request)

        return authorize


class ReloadingCertificate:
    """A server TLS context whose certificate and key are read again, for new connections,
    once the files change (checked at most every ``RELOAD_CHECK_SECONDS``, at a handshake)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._lock = threading.Lock()
        self._stamp = self._files_stamp()
        self._checked = time.monotonic()
        self.current = self._load()
        self.context = self.current
        self.context.sni_callback = self._on_hello

    def _files_stamp(self) -> tuple[float, float]:
        return (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def refresh(self, *, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < RELOAD_CHECK_SECONDS:
                return
            self._checked = now
            try:
                stamp = self._files_stamp()
                if stamp == self._stamp and not force:
                    return
                fresh = self._load()
            except (OSError, ssl.SSLError) as error:  # half-written: keep serving the old one
                log.warning("cannot reload the metrics certificate: %s", error)
                return
            self._stamp, self.current = stamp, fresh
            log.info("reloaded the metrics certificate from %s", self.cert_file)

    def _on_hello(self, connection: Any, server_name: str | None, _: ssl.SSLContext) -> None:
        self.refresh()
        if self.current is not self.context:
            connection.context = self.current


def tls_options(cert_file: str | None, key_file: str | None, auth: str) -> None:
    """Raises ValueError naming the flag when the metrics options do not fit together."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("--metrics-tls-cert and --metrics-tls-key go together: give both")
    if auth not in AUTH_MODES:
        raise ValueError(f"--metrics-auth must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
    if auth == "kubernetes" and not cert_file:
        raise ValueError(
            "--metrics-auth=kubernetes needs --metrics-tls-cert and --metrics-tls-key: "
            "scrapers' tokens are never accepted over plain HTTP"
        )
    for flag, path in (("--metrics-tls-cert", cert_file), ("--metrics-tls-key", key_file)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
