"""An HTTP fault layer in front of a real MinIO: the store misbehaving the way S3 does.

A :class:`FaultProxy` is an aiohttp server on a free 127.0.0.1 port, in its own thread, that
forwards each request to MinIO unchanged (the Host header too, so SigV4 signatures still
verify) and, for a configurable fraction of the requests of the operations it is told to
fault, instead:

- ``slowdown``: answers 503 with S3's ``SlowDown`` XML error, MinIO never sees the request;
- ``internal``: answers 500 with S3's ``InternalError`` XML error, MinIO never sees it;
- ``drop_after``: forwards the request, lets MinIO act on it and answer, then closes the client's
  connection without a byte of the answer (a response lost on the way back: the abort happened
  but the client cannot know).

:meth:`FaultProxy.force` gives chosen requests a fault (also ``cut_body``: half the answer).

Which request gets which fault is a pure function of the seed, the request (method, path and
query) and how many times that same request was seen before, so a run is reproducible whatever
order concurrent requests arrive in. Every request is counted per operation and outcome, and
every request that reached MinIO is recorded with its key, upload id and MinIO's status.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

from tests.support.controlplane import free_port

FAULT_KINDS = ("slowdown", "internal", "drop_after")
# Only on request (force): MinIO acts and answers; the client gets the status line, the headers
# and half the body, then the connection closes (a response cut in the middle, as toxiproxy's
# limit_data does, but on a chosen request).
CUT_BODY = "cut_body"

# The operations a sweep sends: listings, parts listings, aborts.
SWEEP_OPERATIONS = frozenset({"ListMultipartUploads", "ListParts", "AbortMultipartUpload"})

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}

_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


def operation_of(method: str, path: str, query: dict[str, list[str]]) -> str:
    """The S3 operation name of a path-style request (enough for what a sweep sends)."""
    in_object = path.strip("/").count("/") >= 1
    if method == "GET" and "uploads" in query:
        return "ListMultipartUploads"
    if method == "GET" and "uploadId" in query:
        return "ListParts"
    if method == "DELETE" and "uploadId" in query:
        return "AbortMultipartUpload"
    if method == "POST" and "uploads" in query:
        return "CreateMultipartUpload"
    if method == "PUT" and "uploadId" in query:
        return "UploadPart"
    if method == "GET" and not in_object and path.strip("/"):
        return "ListObjects"
    return f"{method}{'Object' if in_object else 'Bucket'}"


@dataclass(frozen=True)
class Forwarded:
    """One request that reached MinIO."""

    operation: str
    bucket: str
    key: str
    upload_id: str | None
    status: int
    dropped: bool  # MinIO acted and answered, the client never got the answer


class FaultProxy:
    """The fault layer; ``endpoint`` is its URL for an S3 client (path-style addressing)."""

    def __init__(
        self,
        upstream: str,
        *,
        fraction: float = 0.10,
        kinds: Iterable[str] = FAULT_KINDS,
        operations: Iterable[str] = SWEEP_OPERATIONS,
        seed: int = 1,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.fraction = fraction
        self.kinds = tuple(kinds)
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        self.operations = frozenset(operations)
        self.seed = seed
        self.enabled = True
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        # [operation, key or None, kind, times left, matching requests still to let pass]
        self._forced: list[list[Any]] = []
        self.counts: Counter[tuple[str, str]] = Counter()  # (operation, outcome)
        self.forwarded: list[Forwarded] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- configuration, from the test's thread ------------------------------------------------

    def force(
        self, operation: str, kind: str, times: int, *, key: str | None = None, after: int = 0
    ) -> None:
        """After ``after`` requests of ``operation`` (on ``key``, if given) pass, the next
        ``times`` get ``kind``, whatever the fraction and even with faults off: a burst longer
        than a client's retries, or one chosen request."""
        if kind not in (*FAULT_KINDS, CUT_BODY):
            raise ValueError(f"unknown fault kind: {kind}")
        with self._lock:
            self._forced.append([operation, key, kind, times, after])

    def set_faults(self, enabled: bool) -> None:
        with self._lock:
            self.enabled = enabled

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.forwarded.clear()

    def snapshot(self) -> tuple[Counter[tuple[str, str]], list[Forwarded]]:
        with self._lock:
            return Counter(self.counts), list(self.forwarded)

    def faults_by_kind(self) -> dict[str, int]:
        with self._lock:
            return {
                kind: sum(n for (_, outcome), n in self.counts.items() if outcome == kind)
                for kind in FAULT_KINDS
            }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as error:  # reported to start()
                failure.append(error)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise RuntimeError(f"fault proxy did not start: {failure[0]!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop = None

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=120),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- one request -------------------------------------------------------------------------

    def _decide(self, operation: str, key: str, identity: str) -> str | None:
        """The fault for this request, or None: deterministic in the seed and the request."""
        with self._lock:
            for rule in self._forced:
                if rule[0] == operation and rule[1] in (None, key) and rule[3] > 0:
                    if rule[4] > 0:
                        rule[4] -= 1
                        continue
                    rule[3] -= 1
                    return str(rule[2])
            if not self.enabled or operation not in self.operations or not self.kinds:
                return None
            self._seen[identity] += 1
            occurrence = self._seen[identity]
        digest = hashlib.blake2b(
            f"{self.seed}|{occurrence}|{identity}".encode(), digest_size=8
        ).digest()
        draw = int.from_bytes(digest, "big") / 2**64
        if draw >= self.fraction:
            return None
        return self.kinds[int(draw / self.fraction * len(self.kinds)) % len(self.kinds)]

    def _count(self, operation: str, outcome: str, record: Forwarded | None = None) -> None:
        with self._lock:
            self.counts[(operation, outcome)] += 1
            if record is not None:
                self.forwarded.append(record)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path
        path, _, query_string = raw.partition("?")
        query = urllib.parse.parse_qs(query_string, keep_blank_values=True)
        operation = operation_of(request.method, path, query)
        segments = urllib.parse.unquote(path).lstrip("/").split("/", 1)
        key = segments[1] if len(segments) > 1 else ""
        fault = self._decide(operation, key, f"{request.method} {raw}")
        if fault in _ERRORS:
            self._count(operation, fault)
            status, code, message = _ERRORS[fault]
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<Resource>{path}</Resource><RequestId>fault-proxy</RequestId></Error>"
            )
            return web.Response(status=status, body=body.encode(), content_type="application/xml")

        body_bytes = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        assert self._session is not None
        async with self._session.request(
            request.method,
            yarl.URL(self.upstream + raw, encoded=True),
            headers=headers,
            data=body_bytes if body_bytes else None,
            allow_redirects=False,
        ) as upstream:
            content = await upstream.read()
            status = upstream.status
            response_headers = [
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
            ]
        record = Forwarded(
            operation=operation,
            bucket=segments[0],
            key=key,
            upload_id=(query.get("uploadId") or [None])[0],
            status=status,
            dropped=fault in ("drop_after", CUT_BODY),
        )
        self._count(operation, fault or "forwarded", record)
        if fault == "drop_after":
            # MinIO acted; the answer is lost: close the connection without a byte of it.
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError()
        if fault == CUT_BODY:
            cut = web.StreamResponse(status=status, headers=CIMultiDict(response_headers))
            cut.content_length = len(content)
            await cut.prepare(request)
            await cut.write(content[: len(content) // 2])
            await asyncio.sleep(0.05)  # let the partial answer leave before the close
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError()
        return web.Response(status=status, body=content, headers=CIMultiDict(response_headers))


def describe(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """Counts per operation, as a nested dict for messages and reports."""
    out: dict[str, dict[str, int]] = {}
    for (operation, outcome), number in sorted(counts.items()):
        out.setdefault(operation, {})[outcome] = number
    return out
