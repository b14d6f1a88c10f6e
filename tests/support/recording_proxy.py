"""A real AWS API server for workload-identity tests, and a proxy that records what reached it.

:class:`MotoServer` runs moto's server (STS and S3) on a free 127.0.0.1 port in a thread.
:class:`RecordingProxy` forwards every request byte for byte (Host header included, so SigV4
signatures made for the proxy's address stay valid) and keeps a copy of each: method, path,
headers and body, so a test can read the token sent to STS and the key that signed each S3
request."""

from __future__ import annotations

import http.client
import re
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

from moto.server import ThreadedMotoServer

from tests.support.counting_proxy import HOP_BY_HOP, relay_answer
from tests.support.fake_http import FakeHTTPService

_CREDENTIAL = re.compile(r"Credential=([^/]+)/")


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0  # the upstream's answer (0: none)
    answer: bytes = b""

    @property
    def form(self) -> dict[str, str]:
        """A query-protocol call's parameters (STS): Action, RoleArn, WebIdentityToken..."""
        pairs = urllib.parse.parse_qsl(self.body.decode(errors="replace"))
        return dict(pairs)

    @property
    def issued_key(self) -> str | None:
        """The AccessKeyId an STS answer carries."""
        found = re.search(rb"<AccessKeyId>([^<]+)</AccessKeyId>", self.answer)
        return found.group(1).decode() if found else None

    @property
    def signing_key(self) -> str | None:
        """The access key id that signed the request (SigV4), None when unsigned."""
        found = _CREDENTIAL.search(self.headers.get("Authorization", ""))
        return found.group(1) if found else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: RecordingProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection(self.fake.upstream_host, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.fake.record(Recorded(self.command, self.path, dict(headers), body, 502))
            self.send_error(502)
            return
        finally:
            upstream.close()
        self.fake.record(
            Recorded(self.command, self.path, dict(headers), body, response.status, data)
        )
        relay_answer(self, response, data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class RecordingProxy(FakeHTTPService):
    thread_name = "recording-proxy"
    handler = _Handler

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream_host = urllib.parse.urlsplit(upstream).netloc
        self._lock = threading.Lock()
        self._seen: list[Recorded] = []

    def record(self, seen: Recorded) -> None:
        with self._lock:
            self._seen.append(seen)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._seen)

    def sts_calls(self, action: str | None = None) -> list[Recorded]:
        return [
            r
            for r in self.requests
            if r.method == "POST"
            and "Action" in r.form
            and (action is None or r.form["Action"] == action)
        ]

    def store_requests(self) -> list[Recorded]:
        """Everything but STS calls (the store's requests)."""
        return [r for r in self.requests if "Action" not in r.form]


class MotoServer:
    """moto's server (a real HTTP STS and S3) on a free loopback port, in a thread."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
        self.url = ""

    def __enter__(self) -> Self:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
