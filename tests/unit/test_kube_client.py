"""The operator's Kubernetes client (kubernetes_asyncio under the KubeClient facade) against a
small HTTP server: it waits when the API server answers 429 (API Priority and Fairness), logs
in again after a 401, sends status as a merge patch, turns every failure into a KubeError,
and leaves no client key on disk."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from kubernetes_asyncio.client import Configuration

from mpu_janitor.kube import THROTTLE_ATTEMPTS, Forbidden, KubeClient, KubeError, NotFound
from mpu_janitor.login import Login, connection_info, logged_in

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(
    routes: dict[tuple[str, str], Handler], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class Logins:
    """A login that hands out the given tokens in turn (the last one from then on)."""

    def __init__(self, server: str, *tokens: str, expiration: datetime | None = None) -> None:
        self.server, self.tokens, self.expiration = server, tokens, expiration
        self.used: list[str] = []

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Login]:
        first = not self.used
        token = self.tokens[min(len(self.used), len(self.tokens) - 1)]
        self.used.append(token)
        yield Login(
            Configuration(host=self.server, api_key={"BearerToken": f"Bearer {token}"}),
            expiration=self.expiration if first else None,
        )


def status_body(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "message": message}  # fmt: skip


SECRET = "/api/v1/namespaces/ns/secrets/s"
A_SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "data": {"K": "dg=="}}


async def test_429_is_waited_out_for_as_long_as_retry_after_says() -> None:
    seen: list[float] = []

    async def secret(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        if len(seen) < 3:
            return web.json_response(
                status_body(429, "too many requests"), status=429, headers={"Retry-After": "1"}
            )
        return web.json_response(A_SECRET)

    async with serving({("GET", SECRET): secret}) as server:
        client = KubeClient(Logins(server, "t"))
        try:
            secret_body = await client.get_secret("ns", "s")
        finally:
            await client.close()
    assert secret_body["data"] == {"K": "dg=="}
    assert len(seen) == 3
    # Retry-After: 1 was honoured before each retry (the server asked for a second).
    assert min(b - a for a, b in itertools.pairwise(seen)) >= 0.9


async def test_429_waits_are_capped_and_bounded() -> None:
    calls: list[str] = []
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    async def secret(request: web.Request) -> web.Response:
        calls.append(request.method)
        return web.json_response(
            status_body(429, "too many requests"), status=429, headers={"Retry-After": "3600"}
        )

    async with serving({("GET", SECRET): secret}) as server:
        client = KubeClient(Logins(server, "t"), sleep=record)
        try:
            with pytest.raises(KubeError) as caught:
                await client.get_secret("ns", "s")
        finally:
            await client.close()
    assert caught.value.status == 429
    assert len(calls) == THROTTLE_ATTEMPTS  # gave up after a bounded number of tries
    assert waits and max(waits) == 30.0  # an hour's Retry-After is not honoured to the letter


async def test_401_logs_in_again_once() -> None:
    seen: list[str] = []

    async def secret(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != "Bearer rotated":
            return web.json_response(status_body(401, "Unauthorized"), status=401)
        return web.json_response(A_SECRET)

    async with serving({("GET", SECRET): secret}) as server:
        logins = Logins(server, "expired", "rotated")
        client = KubeClient(logins)
        try:
            assert (await client.get_secret("ns", "s"))["data"] == {"K": "dg=="}
            assert (await client.get_secret("ns", "s"))["data"] == {"K": "dg=="}
        finally:
            await client.close()
    assert logins.used == ["expired", "rotated"]  # one more login, not one per call
    assert seen == ["Bearer expired", "Bearer rotated", "Bearer rotated"]


async def test_a_token_about_to_expire_is_replaced_before_the_server_refuses_it() -> None:
    seen: list[str] = []

    async def secret(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response(A_SECRET)

    async with serving({("GET", SECRET): secret}) as server:
        # An exec plugin's token that expires in 5 s: inside the margin, so replaced at once.
        soon = datetime.now(UTC) + timedelta(seconds=5)
        logins = Logins(server, "expiring", "renewed", expiration=soon)
        client = KubeClient(logins)
        try:
            for _ in range(3):
                await client.get_secret("ns", "s")
        finally:
            await client.close()
    assert seen == ["Bearer expiring", "Bearer renewed", "Bearer renewed"]
    assert logins.used == ["expiring", "renewed"]


async def test_401_with_fresh_credentials_is_an_error_not_a_loop() -> None:
    async def secret(request: web.Request) -> web.Response:
        return web.json_response(status_body(401, "Unauthorized"), status=401)

    async with serving({("GET", SECRET): secret}) as server:
        logins = Logins(server, "wrong")
        client = KubeClient(logins)
        try:
            with pytest.raises(KubeError) as caught:
                await client.get_secret("ns", "s")
        finally:
            await client.close()
    assert caught.value.status == 401
    assert len(logins.used) == 2


async def test_status_is_a_merge_patch_of_the_status_subresource() -> None:
    received: list[tuple[str, Any]] = []
    path = "/apis/mpu-janitor.dev/v1alpha1/namespaces/team/uploadlifecyclepolicies/p/status"

    async def patch(request: web.Request) -> web.Response:
        received.append((request.content_type, await request.json()))
        return web.json_response({"metadata": {"name": "p"}, "status": {"aborted": 1}})

    async with serving({("PATCH", path): patch}) as server:
        client = KubeClient(Logins(server, "t"))
        try:
            answer = await client.patch_policy_status(
                "team", "p", {"aborted": 1, "conditions": [{"type": "Ready"}], "gone": None}
            )
        finally:
            await client.close()
    assert answer["status"] == {"aborted": 1}
    assert received == [
        (
            "application/merge-patch+json",
            {"status": {"aborted": 1, "conditions": [{"type": "Ready"}], "gone": None}},
        )
    ]


async def test_peering_objects_cluster_wide_and_namespaced() -> None:
    async def cluster(request: web.Request) -> web.Response:
        return web.json_response({"status": {"a": {"priority": 1}}})

    async def namespaced(request: web.Request) -> web.Response:
        return web.json_response({"status": {"b": {"priority": 2}}})

    routes: dict[tuple[str, str], Handler] = {
        ("GET", "/apis/kopf.dev/v1/clusterkopfpeerings/peers"): cluster,
        ("GET", "/apis/kopf.dev/v1/namespaces/ops/kopfpeerings/peers"): namespaced,
    }
    async with serving(routes) as server:
        client = KubeClient(Logins(server, "t"))
        try:
            assert (await client.get_peering("peers"))["status"] == {"a": {"priority": 1}}
            assert (await client.get_peering("peers", "ops"))["status"] == {"b": {"priority": 2}}
        finally:
            await client.close()


async def test_failures_are_kube_errors_with_the_servers_message() -> None:
    async def missing(request: web.Request) -> web.Response:
        return web.json_response(status_body(404, 'secrets "s" not found'), status=404)

    async def denied(request: web.Request) -> web.Response:
        return web.json_response(status_body(403, "cannot get secrets"), status=403)

    async def broken(request: web.Request) -> web.Response:
        return web.json_response(status_body(500, "etcdserver: request timed out"), status=500)

    routes: dict[tuple[str, str], Handler] = {
        ("GET", SECRET): missing,
        ("GET", "/api/v1/namespaces/ns/secrets/denied"): denied,
        ("GET", "/api/v1/namespaces/ns/secrets/broken"): broken,
    }
    async with serving(routes) as server:
        client = KubeClient(Logins(server, "t"))
        try:
            with pytest.raises(NotFound, match='secrets "s" not found'):
                await client.get_secret("ns", "s")
            with pytest.raises(Forbidden, match="cannot get secrets"):
                await client.get_secret("ns", "denied")
            with pytest.raises(KubeError, match="etcdserver") as caught:
                await client.get_secret("ns", "broken")
            assert caught.value.status == 500
        finally:
            await client.close()


async def test_an_unreachable_api_server_is_a_kube_error() -> None:
    async with serving({}) as server:
        pass  # the port is free again: nothing listens there now
    client = KubeClient(Logins(server, "t"))
    try:
        with pytest.raises(KubeError) as caught:
            await client.get_secret("ns", "s")
    finally:
        await client.close()
    assert caught.value.status == 0


async def test_request_by_path_for_calls_without_a_method() -> None:
    async def review(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({**body, "status": {"authenticated": True}}, status=201)

    path = "/apis/authentication.k8s.io/v1/tokenreviews"
    async with serving({("POST", path): review}) as server:
        client = KubeClient(Logins(server, "t"))
        try:
            answer = await client.request("POST", path, json={"spec": {"token": "x"}})
        finally:
            await client.close()
    assert answer == {"spec": {"token": "x"}, "status": {"authenticated": True}}


# -- a client certificate from kubeconfig data: used, and never left on disk ---------------------


def openssl_cert(directory: Path, name: str, *extra: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
         "-keyout", str(key), "-out", str(cert), "-days", "1", *extra],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


async def test_client_key_data_is_used_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_key, server_cert = openssl_cert(
        tmp_path, "server", "-addext", "subjectAltName=IP:127.0.0.1"
    )
    client_key, client_cert = openssl_cert(tmp_path, "janitor-client")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cafile=str(client_cert))
    context.verify_mode = ssl.CERT_REQUIRED
    peers: list[Any] = []

    async def secret(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peercert"))
        return web.json_response(A_SECRET)

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    async with serving({("GET", SECRET): secret}, ssl_context=context) as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": server,
                                "certificate-authority-data": b64(server_cert),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "u",
                            "user": {
                                "client-certificate-data": b64(client_cert),
                                "client-key-data": b64(client_key),
                            },
                        }
                    ],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        client = KubeClient(lambda: logged_in("c"))
        try:
            assert (await client.get_secret("ns", "s"))["data"] == {"K": "dg=="}
            assert os.listdir(scratch) == []  # nothing on disk while the client is in use
            # Kopf's login from the same kubeconfig: certificates in memory, no files either.
            async with logged_in("c") as login:
                info = await connection_info(login)
            assert info.private_key_data == client_key.read_bytes()
            assert info.certificate_path is None and info.private_key_path is None
            assert os.listdir(scratch) == []
        finally:
            await client.close()
    subject = dict(item for rdn in peers[0]["subject"] for item in rdn)
    assert subject["commonName"] == "janitor-client"  # the key from the kubeconfig was used
    assert os.listdir(scratch) == []


async def test_concurrent_calls_share_one_login() -> None:
    agents: set[str] = set()

    async def secret(request: web.Request) -> web.Response:
        agents.add(request.headers.get("User-Agent", ""))
        await asyncio.sleep(0.05)
        return web.json_response(A_SECRET)

    async with serving({("GET", SECRET): secret}) as server:
        logins = Logins(server, "t")
        client = KubeClient(logins)
        try:
            results = await asyncio.gather(*(client.get_secret("ns", "s") for _ in range(8)))
        finally:
            await client.close()
    assert all(json.dumps(r["data"]) == '{"K": "dg=="}' for r in results)
    assert logins.used == ["t"]
    assert agents == {"mpu-janitor/0.1.0"}  # the API server's audit log says who called
