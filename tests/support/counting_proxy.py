"""A small HTTP proxy in front of a real store that records every request it forwards (method,
upload id, when it arrived, when it was answered, the status, the User-Agent), so a test can
count what the store really saw, e.g. the aborts that started after a signal, and who sent
them. Requests are forwarded byte for byte with their Host header, so SigV4 signatures made for
the proxy's address stay valid."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.fake_http import FakeHTTPService

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class SeenRequest:
    method: str
    upload_id: str | None
    received: float  # time.monotonic() when its headers arrived
    answered: float | None = None
    status: int | None = None
    agent: str = ""  # the User-Agent header (botocore adds app/<AWS_SDK_UA_APP_ID>)

    @property
    def is_abort(self) -> bool:
        return self.method == "DELETE" and self.upload_id is not None

    @property
    def is_parts_listing(self) -> bool:
        return self.method == "GET" and self.upload_id is not None


def relay_answer(
    handler: BaseHTTPRequestHandler, response: http.client.HTTPResponse, data: bytes
) -> None:
    """Send an upstream's answer on: its status, its end-to-end headers, its body (read whole,
    so the length is known)."""
    handler.send_response_only(response.status, response.reason)
    for name, value in response.getheaders():
        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
            handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: CountingProxy  # set by FakeHTTPService.start

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        seen = SeenRequest(self.command, (query.get("uploadId") or [None])[0], time.monotonic())
        seen.agent = self.headers.get("User-Agent", "")
        self.fake.record(seen)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream: http.client.HTTPConnection | None = getattr(self, "_upstream", None)
        if upstream is None:
            upstream = http.client.HTTPConnection(self.fake.upstream_host, timeout=60)
            self._upstream = upstream
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            upstream.close()
            self._upstream = None
            seen.answered, seen.status = time.monotonic(), 502
            self.send_error(502)
            return
        seen.answered, seen.status = time.monotonic(), response.status
        relay_answer(self, response, data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class CountingProxy(FakeHTTPService):
    """Started, stopped and addressed like the HTTP fakes (tests/support/fake_http.py)."""

    thread_name = "counting-proxy"

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream_host = urllib.parse.urlsplit(upstream).netloc
        self._lock = threading.Lock()
        self._requests: list[SeenRequest] = []
        self._aborts = 0  # kept as they arrive: polling it must not slow the proxy's threads

    def record(self, seen: SeenRequest) -> None:
        with self._lock:
            self._requests.append(seen)
            self._aborts += seen.is_abort

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._requests)

    def aborts(self) -> int:
        with self._lock:
            return self._aborts


CountingProxy.handler = _Handler
