"""/metrics with ``--metrics-auth=kubernetes`` against the real API server: the operator's
HTTPS endpoint (a generated certificate) runs in this process with the chart's ServiceAccount
token, so the TokenReviews and SubjectAccessReviews it sends are authorised by the chart's RBAC.
A ServiceAccount bound through ``metrics.auth.readers`` gets 200, one without the permission
403, no or a bad token 401."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from kubernetes_asyncio.client import Configuration

from mpu_janitor.handlers import OperatorConfig, start_http
from mpu_janitor.kube import KubeClient
from mpu_janitor.login import Login
from mpu_janitor.metrics import MetricsState
from tests.e2e.test_helm_install import chart  # noqa: F401
from tests.e2e.test_tenancy_rbac_api import Row, documented, granted
from tests.support.controlplane import ControlPlane
from tests.support.tls import make_server_tls

pytestmark = pytest.mark.e2e

REVIEW_ROWS: list[Row] = [
    ("subjectaccessreviews.authorization.k8s.io", "[]", "[]", "[create]"),
    ("tokenreviews.authentication.k8s.io", "[]", "[]", "[create]"),
]


class Ticking:
    last_tick = float("inf")


def token(plane: ControlPlane, namespace: str, account: str) -> str:
    return plane.kubectl("create", "token", account, "-n", namespace).stdout.strip()


def client_as(plane: ControlPlane, bearer: str) -> KubeClient:
    @asynccontextmanager
    async def login() -> AsyncIterator[Login]:
        yield Login(
            Configuration(
                host=plane.server,
                api_key={"BearerToken": f"Bearer {bearer}"},
                ssl_ca_cert=str(plane.ca_file),
            )
        )

    return KubeClient(login)


async def test_scrapes_are_authorised_by_the_api_server(
    chart: Path,  # noqa: F811
    control_plane: ControlPlane,
    make_namespace: Callable[[str], str],
    tmp_path: Path,
) -> None:
    plane = control_plane
    release_ns, monitoring, team = (
        make_namespace("metrics-op"),
        make_namespace("monitoring"),
        make_namespace("team"),
    )
    release = "guarded"
    operator_account = f"{release}-mpu-janitor"
    plane.kubectl("create", "serviceaccount", "prometheus", "-n", monitoring)
    plane.kubectl("create", "serviceaccount", "curious", "-n", team)
    plane.helm(
        "install",
        release,
        str(chart),
        "-n",
        release_ns,
        "--set=metrics.tls.secretName=metrics-tls",
        "--set=metrics.auth.mode=kubernetes",
        "--set=metrics.auth.readers[0].kind=ServiceAccount",
        "--set=metrics.auth.readers[0].name=prometheus",
        f"--set=metrics.auth.readers[0].namespace={monitoring}",
    )
    tls = make_server_tls(tmp_path)
    config = OperatorConfig(
        metrics_address="127.0.0.1",
        metrics_port=0,
        metrics_tls_cert=str(tls.cert_file),
        metrics_tls_key=str(tls.key_file),
        metrics_auth="kubernetes",
    )
    kube = client_as(plane, token(plane, release_ns, operator_account))
    runner = await start_http(config, MetricsState(), Ticking(), kube)  # type: ignore[arg-type]
    context = ssl.create_default_context(cafile=str(tls.ca_file))
    url = f"https://127.0.0.1:{config.bound_port}"

    async def scrape(bearer: str | None, path: str = "/metrics") -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(url + path, ssl=context, headers=headers) as response,
        ):
            return response.status, await response.text()

    try:
        status, text = await scrape(token(plane, monitoring, "prometheus"))
        assert status == 200 and "mpu_janitor_build_info" in text, text
        status, text = await scrape(token(plane, team, "curious"))
        assert status == 403 and "mpu_janitor" not in text, text
        assert f"system:serviceaccount:{team}:curious" in text
        status, text = await scrape(None)
        assert status == 401 and "mpu_janitor" not in text
        status, text = await scrape("not-a-token")
        assert status == 401 and "mpu_janitor" not in text
        assert (await scrape(None, "/healthz"))[0] == 200
        # The operator's reviews run on the chart's RBAC: exactly two rows more than without.
        baseline = plane.service_account_kubeconfig(team, "nobody")
        operator = plane.service_account_kubeconfig(release_ns, operator_account, create=False)
        assert granted(plane, operator, team, baseline) == sorted(
            [*documented("cluster-wide"), *REVIEW_ROWS]
        )
    finally:
        await runner.cleanup()
        await kube.close()
        plane.helm("uninstall", release, "-n", release_ns, "--ignore-not-found")


async def test_without_the_review_rbac_no_scrape_is_let_through(
    control_plane: ControlPlane, make_namespace: Callable[[str], str], tmp_path: Path
) -> None:
    """An operator whose ServiceAccount may not create reviews answers 503, never metrics."""
    plane = control_plane
    namespace = make_namespace("bare-op")
    plane.kubectl("create", "serviceaccount", "bare", "-n", namespace)
    plane.kubectl("create", "serviceaccount", "admin-ish", "-n", namespace)
    plane.kubectl(
        "create",
        "clusterrolebinding",
        f"{namespace}-reader",
        "--clusterrole=cluster-admin",
        f"--serviceaccount={namespace}:admin-ish",
    )
    tls = make_server_tls(tmp_path)
    config = OperatorConfig(
        metrics_address="127.0.0.1",
        metrics_port=0,
        metrics_tls_cert=str(tls.cert_file),
        metrics_tls_key=str(tls.key_file),
        metrics_auth="kubernetes",
    )
    kube = client_as(plane, token(plane, namespace, "bare"))
    runner = await start_http(config, MetricsState(), Ticking(), kube)  # type: ignore[arg-type]
    context = ssl.create_default_context(cafile=str(tls.ca_file))
    try:
        headers = {"Authorization": f"Bearer {token(plane, namespace, 'admin-ish')}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"https://127.0.0.1:{config.bound_port}/metrics", ssl=context, headers=headers
            ) as response,
        ):
            assert response.status == 503
            assert "mpu_janitor" not in await response.text()
    finally:
        await runner.cleanup()
        await kube.close()
        plane.kubectl("delete", "clusterrolebinding", f"{namespace}-reader")
