"""The operator's Kubernetes client against a small HTTP server: it waits when the API server
answers 429 (API Priority and Fairness) and leaves no client key on disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web

from mpu_janitor.kube import KubeClient


async def test_429_is_waited_out_not_raised() -> None:
    calls: list[str] = []

    async def secret(request: web.Request) -> web.Response:
        calls.append(request.method)
        if len(calls) < 3:
            return web.json_response(
                {"message": "too many requests"}, status=429, headers={"Retry-After": "0"}
            )
        return web.json_response({"data": {}})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/secrets/s", secret)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def login() -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token="t")

    client = KubeClient(login)
    try:
        assert await client.get_secret("ns", "s") == {"data": {}}
    finally:
        await client.close()
        await runner.cleanup()
    assert len(calls) == 3


def test_client_key_data_leaves_no_file(tmp_path: Path, monkeypatch: Any) -> None:
    import subprocess

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=t",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    from mpu_janitor.kube import _ssl_context

    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:1",
        certificate_data=cert.read_bytes(),
        private_key_data=key.read_bytes(),
        insecure=False,
    )
    assert _ssl_context(info)
    assert os.listdir(scratch) == []
