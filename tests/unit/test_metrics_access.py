"""/metrics over HTTPS (a generated certificate, re-read when it is renewed) and the scrape
authorisation's answers and cache. The real TokenReview and SubjectAccessReview are proven
against kube-apiserver in tests/e2e/test_metrics_auth_api.py."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from mpu_janitor import metrics_access
from mpu_janitor.cli import build_parser
from mpu_janitor.handlers import OperatorConfig, start_http
from mpu_janitor.metrics import MetricsState
from mpu_janitor.metrics_access import MetricsAuthorizer, tls_options
from tests.support.tls import ServerTLS, make_server_tls


class Ticking:
    last_tick = float("inf")  # /healthz: never stalled


class Reviews:
    """Answers TokenReviews from a table of tokens and access from a set of allowed users."""

    def __init__(self) -> None:
        self.users = {"prometheus-token": "system:serviceaccount:monitoring:prometheus"}
        self.users["stranger-token"] = "system:serviceaccount:team-a:stranger"
        self.allowed = {"system:serviceaccount:monitoring:prometheus"}
        self.asked: list[tuple[str, str, str]] = []
        self.broken = False

    async def review_token(self, token: str) -> Mapping[str, Any]:
        if self.broken:
            raise OSError("connection refused")
        user = self.users.get(token)
        if user is None:
            return {"authenticated": False, "error": "invalid bearer token"}
        return {"authenticated": True, "user": {"username": user, "groups": ["a"], "uid": "u"}}

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
        self.asked.append((user, path, verb))
        return {"allowed": user in self.allowed}


def client_context(tls: ServerTLS) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls.ca_file))


async def served_serial(port: int, tls: ServerTLS) -> int:
    """The serial number of the certificate a new connection is shown."""
    import asyncio

    context = client_context(tls)
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
async def https(tmp_path: Path) -> AsyncIterator[tuple[OperatorConfig, ServerTLS]]:
    tls = make_server_tls(tmp_path / "tls")
    config = OperatorConfig(
        metrics_address="127.0.0.1",
        metrics_port=0,
        metrics_tls_cert=str(tls.cert_file),
        metrics_tls_key=str(tls.key_file),
    )
    runner = await start_http(config, MetricsState(), Ticking())  # type: ignore[arg-type]
    try:
        yield config, tls
    finally:
        await runner.cleanup()


async def test_metrics_are_served_over_https_with_the_given_certificate(
    https: tuple[OperatorConfig, ServerTLS],
) -> None:
    config, tls = https
    url = f"https://127.0.0.1:{config.bound_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics", ssl=client_context(tls)) as response:
            assert response.status == 200
            assert "mpu_janitor_build_info" in await response.text()
        async with session.get(f"{url}/healthz", ssl=client_context(tls)) as response:
            assert response.status == 200
        # Plain HTTP on the same port gets no metrics.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{config.bound_port}/metrics") as response:
                await response.text()
    assert await served_serial(config.bound_port or 0, tls) == tls.serial


async def test_a_renewed_certificate_is_served_to_new_connections(
    https: tuple[OperatorConfig, ServerTLS],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, tls = https
    monkeypatch.setattr(metrics_access, "RELOAD_CHECK_SECONDS", 0.0)
    renewed = make_server_tls(tmp_path / "renewed")
    # The renewal replaces the files (as the kubelet updates a Secret volume), CA included.
    shutil.copy(renewed.cert_file, tls.cert_file)
    shutil.copy(renewed.key_file, tls.key_file)
    assert await served_serial(config.bound_port or 0, renewed) == renewed.serial


async def test_scrapes_are_authorised_by_token_and_access_review(tmp_path: Path) -> None:
    now = [0.0]
    reviews = Reviews()
    authorizer = MetricsAuthorizer(reviews, clock=lambda: now[0])
    check = authorizer.check
    assert (await check(None, "/metrics")).status == 401
    assert (await check("Basic dXNlcjpwdw==", "/metrics")).status == 401
    assert (await check("Bearer not-a-token", "/metrics")).status == 401
    assert (await check("Bearer stranger-token", "/metrics")).status == 403
    assert (await check("Bearer prometheus-token", "/metrics")).status == 200
    assert reviews.asked[-1] == ("system:serviceaccount:monitoring:prometheus", "/metrics", "get")
    # Answers are cached briefly: Prometheus scraping every 15 s is not a review each time.
    sent = authorizer.reviews
    for _ in range(5):
        assert (await check("Bearer prometheus-token", "/metrics")).status == 200
        assert (await check("Bearer stranger-token", "/metrics")).status == 403
    assert authorizer.reviews == sent
    # A refusal is asked again soon (a RoleBinding just made takes effect); an allowed scrape
    # is asked again after a minute (a RoleBinding removed takes effect).
    reviews.allowed.add("system:serviceaccount:team-a:stranger")
    now[0] += metrics_access.DENIED_TTL_SECONDS + 1
    assert (await check("Bearer stranger-token", "/metrics")).status == 200
    reviews.allowed.clear()
    assert (await check("Bearer prometheus-token", "/metrics")).status == 200  # cached
    now[0] += metrics_access.ALLOWED_TTL_SECONDS
    assert (await check("Bearer prometheus-token", "/metrics")).status == 403


async def test_the_server_answers_401_403_200_and_keeps_healthz_open(
    tmp_path: Path,
) -> None:
    tls = make_server_tls(tmp_path / "tls")
    reviews = Reviews()
    config = OperatorConfig(
        metrics_address="127.0.0.1",
        metrics_port=0,
        metrics_tls_cert=str(tls.cert_file),
        metrics_tls_key=str(tls.key_file),
        metrics_auth="kubernetes",
    )
    runner = await start_http(config, MetricsState(), Ticking(), reviews)  # type: ignore[arg-type]
    url = f"https://127.0.0.1:{config.bound_port}"
    context = client_context(tls)

    async def get(path: str, token: str | None = None) -> tuple[int, str, Mapping[str, str]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + path, ssl=context, headers=headers) as response,
        ):
            return response.status, await response.text(), response.headers

    try:
        status, text, headers = await get("/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert "mpu_janitor" not in text
        status, text, _ = await get("/metrics", "stranger-token")
        assert status == 403 and "mpu_janitor" not in text
        status, text, _ = await get("/metrics", "prometheus-token")
        assert status == 200 and "mpu_janitor_build_info" in text
        assert (await get("/healthz"))[0] == 200  # the kubelet's probes carry no token
        reviews.broken = True
        status, text, _ = await get("/metrics", "another-token")
        assert status == 503 and "mpu_janitor" not in text
    finally:
        await runner.cleanup()


def test_metrics_flags_are_checked_and_named(tmp_path: Path) -> None:
    tls = make_server_tls(tmp_path)
    with pytest.raises(ValueError, match="--metrics-tls-key"):
        tls_options(str(tls.cert_file), None, "none")
    with pytest.raises(ValueError, match="--metrics-auth=kubernetes needs --metrics-tls-cert"):
        tls_options(None, None, "kubernetes")
    with pytest.raises(ValueError, match="--metrics-tls-cert /nowhere"):
        tls_options("/nowhere", str(tls.key_file), "kubernetes")
    tls_options(str(tls.cert_file), str(tls.key_file), "kubernetes")
    args = build_parser().parse_args(
        ["operator", "--metrics-auth=kubernetes", f"--metrics-tls-cert={tls.cert_file}"]
    )
    assert args.metrics_auth == "kubernetes" and args.metrics_tls_key is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--metrics-auth=basic"])


def test_the_operator_refuses_tokens_over_plain_http(capsys: pytest.CaptureFixture[str]) -> None:
    from mpu_janitor.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["operator", "--standalone", "--metrics-auth=kubernetes"])
    assert exit_info.value.code == 2
    assert "--metrics-auth=kubernetes needs --metrics-tls-cert" in capsys.readouterr().err
