"""The lifecycle shared by the HTTP-level fakes (Glacier, LILT): a threaded server on a free
127.0.0.1 port, a context manager, its URL, and a server clock tests can set apart."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any, ClassVar, Self


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can take a second: skip it.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])


class FakeHTTPService:
    """Subclasses set ``handler`` (a BaseHTTPRequestHandler whose ``fake`` is the service)."""

    handler: ClassVar[type[BaseHTTPRequestHandler]]
    thread_name: ClassVar[str] = "fake-http"

    def __init__(self) -> None:
        self.clock_offset = timedelta(0)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Self:
        handler: Any = type("Handler", (self.handler,), {"fake": self})
        self._server = LoopbackServer(("127.0.0.1", 0), handler)
        threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True, name=self.thread_name
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

    def now(self) -> datetime:
        """The server's clock (the Date header it sends)."""
        return datetime.now(UTC) + self.clock_offset
