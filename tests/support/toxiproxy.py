"""The real toxiproxy server (built by scripts/build-binaries.sh) on 127.0.0.1, driven through
its HTTP API with the standard library.

A :class:`Toxiproxy` is one server process on free ports, stopped by its PID. Each
:meth:`Toxiproxy.proxy` is one TCP proxy in front of an upstream (MinIO): toxics added to it
(latency, reset_peer, limit_data, timeout, slow_close, ...) act on the bytes between the client
and the upstream, at the TCP level, with no knowledge of HTTP.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.controlplane import ManagedProcess, ensure_binaries, free_port, wait_for


class ToxiproxyError(RuntimeError):
    """The API answered with an error status (the message carries its body)."""


class Toxiproxy:
    """One toxiproxy server; :meth:`start` returns once its API answers."""

    def __init__(self) -> None:
        self.binary = ensure_binaries(["toxiproxy"])["toxiproxy"]
        self.workdir = Path(tempfile.mkdtemp(prefix="mpu-janitor-toxiproxy-"))
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.process: ManagedProcess | None = None

    def start(self, seed: int = 8) -> Toxiproxy:
        self.process = ManagedProcess(
            "toxiproxy",
            [
                str(self.binary),
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-seed",
                str(seed),
            ],
            self.workdir / "toxiproxy.log",
            {"PATH": "/usr/bin:/bin"},
        )
        wait_for(self._ready, timeout=30, interval=0.1, what=f"toxiproxy API at {self.api}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if not self.process.running():
            raise RuntimeError(f"toxiproxy exited:\n{self.process.log_tail()}")
        try:
            return bool(self.request("GET", "/version"))
        except OSError:
            return False

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.api + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data else {},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            raise ToxiproxyError(
                f"{method} {path}: {error.code} {error.read().decode(errors='replace')}"
            ) from error
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def proxy(self, name: str, upstream: str) -> Proxy:
        """A new proxy on a free 127.0.0.1 port forwarding to ``upstream`` (host:port)."""
        listen = f"127.0.0.1:{free_port()}"
        self.request(
            "POST",
            "/proxies",
            {"name": name, "listen": listen, "upstream": upstream, "enabled": True},
        )
        return Proxy(self, name, listen)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Proxy:
    """One proxy of a :class:`Toxiproxy`; ``endpoint`` is its HTTP URL for an S3 client."""

    def __init__(self, server: Toxiproxy, name: str, listen: str) -> None:
        self.server = server
        self.name = name
        self.listen = listen
        self.endpoint = f"http://{listen}"

    def add_toxic(
        self,
        name: str,
        kind: str,
        *,
        stream: str = "downstream",
        toxicity: float = 1.0,
        **attributes: Any,
    ) -> dict[str, Any]:
        """Add a toxic: ``kind`` is toxiproxy's type (latency, reset_peer, limit_data, ...);
        ``stream`` downstream acts on the responses, upstream on the requests."""
        toxic: dict[str, Any] = self.server.request(
            "POST",
            f"/proxies/{self.name}/toxics",
            {
                "name": name,
                "type": kind,
                "stream": stream,
                "toxicity": toxicity,
                "attributes": attributes,
            },
        )
        return toxic

    def toxics(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.server.request("GET", f"/proxies/{self.name}/toxics")
        return found

    def remove_toxic(self, name: str) -> None:
        self.server.request("DELETE", f"/proxies/{self.name}/toxics/{name}")

    def clear_toxics(self) -> None:
        for toxic in self.toxics():
            self.remove_toxic(toxic["name"])

    def set_enabled(self, enabled: bool) -> None:
        """Disabled: every connection is closed and new ones are refused."""
        self.server.request("POST", f"/proxies/{self.name}", {"enabled": enabled})
