"""Fixtures for the e2e tests: one real control plane (etcd, kube-apiserver,
kube-controller-manager) per test session, plus kubectl/helm and namespace helpers."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.controlplane import CONTROL_PLANE_BINARIES, ControlPlane, ensure_binaries

E2E_DIR = Path(__file__).resolve().parent

# Set by the session fixture so a failing test's report carries the components' logs.
_active: list[ControlPlane] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build missing binaries before any test starts, outside the per-test timeout: a cold
    # kube build takes far longer than a test may. A missing binary is an error, never a skip.
    if any("control_plane" in getattr(item, "fixturenames", ()) for item in session.items):
        ensure_binaries(CONTROL_PLANE_BINARIES)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.failed and _active:
        report.sections.append(("control plane logs", _active[0].logs(lines=30)))
    return report


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    plane = ControlPlane()
    plane.start()
    print(
        f"\nkube-apiserver ready {plane.apiserver_ready_seconds:.1f}s after start ({plane.server})"
    )
    _active.append(plane)
    try:
        yield plane
    finally:
        _active.remove(plane)
        plane.stop()


@pytest.fixture
def make_namespace(control_plane: ControlPlane) -> Iterator[Callable[[str], str]]:
    """Create uniquely named namespaces (``prefix-xxxxxx``); deleted after the test."""
    created: list[str] = []

    def make(prefix: str = "e2e") -> str:
        name = f"{prefix}-{secrets.token_hex(3)}"
        control_plane.create_namespace(name)
        created.append(name)
        return name

    yield make
    for name in created:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture
def namespace(make_namespace: Callable[[str], str]) -> str:
    return make_namespace("e2e")
