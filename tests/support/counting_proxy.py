"""A small HTTP proxy in front of a real store that records every request it forwards (method,
upload id, when it arrived, when it was answered, the status), so a test can count what the
store really saw, e.g. the aborts that started after a signal. Requests are forwarded byte for
byte with their Host header, so SigV4 signatures made for the proxy's address stay valid."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

from tests.support.fake_http import LoopbackServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class SeenRequest:
    method: str
    upload_id: str | None
    received: float  # time.monotonic() when its headers arrived
    answered: float | None = None
    status: int | None = None

    @property
    def is_abort(self) -> bool:
        return self.method == "DELETE" and self.upload_id is not None

    @property
    def is_parts_listing(self) -> bool:
        return self.method == "GET" and self.upload_id is not None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: CountingProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        seen = SeenRequest(self.command, (query.get("uploadId") or [None])[0], time.monotonic())
        self.proxy.record(seen)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream: http.client.HTTPConnection | None = getattr(self, "_upstream", None)
        if upstream is None:
            upstream = http.client.HTTPConnection(self.proxy.upstream_host, timeout=60)
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
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream_host = urllib.parse.urlsplit(upstream).netloc
        self._lock = threading.Lock()
        self._requests: list[SeenRequest] = []
        self._aborts = 0  # kept as they arrive: polling it must not slow the proxy's threads
        self._server: LoopbackServer | None = None

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

    def start(self) -> Self:
        handler: Any = type("Handler", (_Handler,), {"proxy": self})
        self._server = LoopbackServer(("127.0.0.1", 0), handler)
        threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True, name="counting-proxy"
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"
