"""The operator's handlers against kmock (an emulated Kubernetes API) and a real MinIO."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest
import yaml

from mpu_janitor.handlers import OperatorConfig, operator_kwargs
from tests.integration.helpers import make_upload, open_uploads
from tests.support.minio import MinioServer

pytestmark = pytest.mark.integration

POLICIES = "mpu-janitor.dev/v1alpha1/uploadlifecyclepolicies"
NS = "team-a"


def policy_body(name: str, endpoint: str, bucket: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "store": {
            "type": "S3",
            "s3": {"endpoint": endpoint, "profile": "MinIO", "buckets": [bucket]},
            "credentialsSecretRef": {"name": "minio-creds"},
        },
        "match": {"olderThan": "2s", "quietPeriod": "0s"},
        "schedule": {"interval": "1h"},
        "limits": {"requestsPerSecond": 1000},
    }
    body.update(spec)
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1},
        "spec": body,
    }


def secret(minio: MinioServer) -> dict[str, Any]:
    def b64(value: str) -> str:
        return base64.b64encode(value.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "minio-creds", "namespace": NS},
        "data": {
            "AWS_ACCESS_KEY_ID": b64(minio.access_key),
            "AWS_SECRET_ACCESS_KEY": b64(minio.secret_key),
        },
    }


async def eventually(check: Callable[[], Any], limit: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f}s waiting for {what or check}")
        await asyncio.sleep(0.2)


def status_of(emulator: Any, name: str) -> dict[str, Any]:
    try:
        obj = emulator.objects[POLICIES, NS, name]
    except KeyError:
        return {}
    return dict(obj.get("status") or {}) if obj is not None else {}


def ready(status: dict[str, Any]) -> dict[str, Any]:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return dict(condition)
    return {}


@pytest.fixture()
async def operator(
    kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minio: MinioServer
) -> AsyncIterator[OperatorConfig]:
    kmock.resources[POLICIES] = {
        "kind": "UploadLifecyclePolicy",
        "singular": "uploadlifecyclepolicy",
        "shortnames": {"ulp"},
        "categories": {"mpu-janitor"},
        "verbs": {"get", "list", "watch", "patch", "update", "create", "delete"},
        "subresources": {"status"},
        "namespaced": True,
    }
    # Kopf's backbone: it waits for these core resources to be discovered.
    kmock.resources["v1/namespaces"] = {
        "kind": "Namespace",
        "namespaced": False,
        "verbs": {"get", "list", "watch"},
    }
    kmock.resources["v1/events"] = {
        "kind": "Event",
        "namespaced": True,
        "verbs": {"create", "list"},
    }
    kmock.resources["v1/secrets"] = {"kind": "Secret", "namespaced": True, "verbs": {"get"}}
    # Kopf creates Events with metadata.generateName: name them as an API server would (kmock
    # keys objects by name and would refuse every Event after the first as a conflict).
    emulator_handle = type(kmock)._handle

    async def generate_names(self: Any, request: Any) -> Any:
        metadata = request.data.get("metadata") if isinstance(request.data, dict) else None
        if request.action == kmock.action.CREATE and metadata and not metadata.get("name"):
            metadata["name"] = f"{metadata.get('generateName', '')}{uuid.uuid4().hex[:10]}"
        return await emulator_handle(self, request)

    monkeypatch.setattr(type(kmock), "_handle", generate_names)
    kmock.objects["v1/namespaces", None, NS] = {"metadata": {"name": NS}}
    kmock.objects["v1/secrets", NS, "minio-creds"] = secret(minio)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url)}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
                "current-context": "kmock",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    config = OperatorConfig(metrics_address="127.0.0.1", metrics_port=0, namespaces=(NS,))
    # The operator runs in its own thread and event loop, as in production: Kopf cancels
    # every task of its loop when it stops, which must not include the test's own tasks.
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        try:
            asyncio.run(kopf.operator(settings=settings, stop_flag=stop, **operator_kwargs(config)))
        except BaseException as error:  # surfaced by the fixture
            failure.append(error)

    thread = threading.Thread(target=run, name="operator", daemon=True)
    thread.start()
    await eventually(lambda: config.bound_port or failure, what="operator started")
    assert not failure, failure
    yield config
    stop.set()
    await asyncio.to_thread(thread.join, 60)
    assert not thread.is_alive(), "the operator did not stop within 60 s"
    assert not failure, failure


async def create(emulator: Any, body: dict[str, Any]) -> None:
    response = await emulator.post(
        f"/apis/mpu-janitor.dev/v1alpha1/namespaces/{NS}/uploadlifecyclepolicies", json=body
    )
    assert response.status in (200, 201), await response.text()


async def scrape(config: OperatorConfig) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{config.bound_port}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


async def test_policy_sweeps_and_reports(
    kmock: Any, operator: OperatorConfig, minio: MinioServer, s3: Any, bucket: str
) -> None:
    make_upload(s3, bucket, "stale-1", [1000, 24])
    make_upload(s3, bucket, "stale-2", [7])
    await asyncio.sleep(3.5)
    await create(kmock, policy_body("p1", minio.endpoint, bucket))

    status = await eventually(lambda: status_of(kmock, "p1").get("lastSweep"), what="a sweep")
    assert status["aborted"] == 2
    assert status["freedBytes"] == 1031
    full = status_of(kmock, "p1")
    assert ready(full)["status"] == "True"
    assert ready(full)["reason"] == "SweepSucceeded"
    assert full["totals"] == {"abortedUploads": 2, "freedBytes": 1031, "freed": "1.01Ki"}
    assert open_uploads(s3, bucket) == set()
    text = await scrape(operator)
    assert (
        f'mpu_janitor_freed_bytes_total{{bucket="{bucket}",namespace="{NS}",'
        f'policy="p1",store="S3"}} 1031.0'
    ) in text


def url(name: str = "") -> str:
    base = f"/apis/mpu-janitor.dev/v1alpha1/namespaces/{NS}/uploadlifecyclepolicies"
    return f"{base}/{name}" if name else base


async def patch(emulator: Any, name: str, body: dict[str, Any]) -> None:
    response = await emulator.patch(
        url(name), json=body, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert response.status == 200, await response.text()


def events_for(emulator: Any, name: str) -> list[dict[str, Any]]:
    found = []
    for key in list(emulator.objects):
        resource, namespace = str(key[0]), key[1]
        if "events" in resource and namespace == NS:
            event = emulator.objects[key]
            if event is not None and event.get("involvedObject", {}).get("name") == name:
                found.append(dict(event))
    return found


async def test_update_suspend_sweep_now_and_delete(
    kmock: Any, operator: OperatorConfig, minio: MinioServer, s3: Any, bucket: str
) -> None:
    make_upload(s3, bucket, "tmp/a", [10])
    make_upload(s3, bucket, "keep/b", [20])
    await asyncio.sleep(3.5)
    await create(
        kmock,
        policy_body(
            "p2",
            minio.endpoint,
            bucket,
            match={"olderThan": "2s", "quietPeriod": "0s", "prefixes": ["tmp/"]},
        ),
    )
    first = await eventually(lambda: status_of(kmock, "p2").get("lastSweep"), what="sweep 1")
    assert (first["aborted"], first["freedBytes"]) == (1, 10)
    assert {k for k, _ in open_uploads(s3, bucket)} == {"keep/b"}
    summary = [e for e in events_for(kmock, "p2") if e["reason"] == "SweepSucceeded"]
    assert len(summary) == 1 and "1 aborted" in summary[0]["message"]

    # A spec change takes effect at once: widen the prefixes, the next sweep runs now.
    await patch(
        kmock,
        "p2",
        {"metadata": {"generation": 2}, "spec": {"match": {"prefixes": ["tmp/", "keep/"]}}},
    )
    second = await eventually(
        lambda: (
            status_of(kmock, "p2").get("observedGeneration") == 2
            and status_of(kmock, "p2").get("lastSweep", {}).get("aborted") == 1
            and status_of(kmock, "p2")["lastSweep"]["freedBytes"] == 20
        ),
        what="sweep after the update",
    )
    assert second
    assert status_of(kmock, "p2")["totals"] == {
        "abortedUploads": 2,
        "freedBytes": 30,
        "freed": "30",
    }
    assert open_uploads(s3, bucket) == set()

    # Suspended: Ready True/Suspended (not broken, not stalled), and no sweep even on request.
    await patch(kmock, "p2", {"metadata": {"generation": 3}, "spec": {"suspend": True}})
    await eventually(
        lambda: ready(status_of(kmock, "p2")).get("reason") == "Suspended", what="Suspended"
    )
    assert ready(status_of(kmock, "p2"))["status"] == "True"
    make_upload(s3, bucket, "tmp/c", [5])
    await asyncio.sleep(3.5)
    await patch(kmock, "p2", {"metadata": {"annotations": {"mpu-janitor.dev/sweep-now": "1"}}})
    await asyncio.sleep(3)
    assert {k for k, _ in open_uploads(s3, bucket)} == {"tmp/c"}

    # Resumed, then the sweep-now annotation triggers a sweep before the 1h interval.
    await patch(kmock, "p2", {"metadata": {"generation": 4}, "spec": {"suspend": False}})
    await eventually(lambda: not open_uploads(s3, bucket), what="sweep after resume")
    await eventually(
        lambda: ready(status_of(kmock, "p2")).get("reason") == "SweepSucceeded", what="Ready again"
    )
    make_upload(s3, bucket, "tmp/d", [7])
    await asyncio.sleep(3.5)
    await patch(kmock, "p2", {"metadata": {"annotations": {"mpu-janitor.dev/sweep-now": "2"}}})
    await eventually(lambda: not open_uploads(s3, bucket), what="sweep-now")
    await eventually(
        lambda: status_of(kmock, "p2").get("handledSweepNow") == "2", what="sweep-now recorded"
    )
    text = await scrape(operator)
    assert 'policy="p2"' in text
    assert (
        f'mpu_janitor_freed_bytes_total{{bucket="{bucket}",namespace="{NS}",'
        f'policy="p2",store="S3"}} 42.0'
    ) in text

    # Deleted: its series disappear from /metrics.
    response = await kmock.delete(url("p2"))
    assert response.status == 200
    for _ in range(50):
        if 'policy="p2"' not in await scrape(operator):
            break
        await asyncio.sleep(0.2)
    assert 'policy="p2"' not in await scrape(operator)


async def test_missing_secret_does_not_stop_a_good_policy(
    kmock: Any, operator: OperatorConfig, minio: MinioServer, s3: Any, bucket: str
) -> None:
    make_upload(s3, bucket, "x", [11])
    await asyncio.sleep(3.5)
    bad = policy_body("no-secret", minio.endpoint, bucket)
    bad["spec"]["store"]["credentialsSecretRef"] = {"name": "absent"}
    bad["spec"]["mode"] = "DryRun"
    await create(kmock, bad)
    invalid = policy_body("invalid", minio.endpoint, bucket, match={"olderThan": "7 days"})
    await create(kmock, invalid)
    await create(kmock, policy_body("good", minio.endpoint, bucket))

    await eventually(
        lambda: ready(status_of(kmock, "no-secret")).get("reason") == "CredentialsNotFound",
        what="CredentialsNotFound",
    )
    condition = ready(status_of(kmock, "no-secret"))
    assert condition["status"] == "False"
    assert "team-a/absent" in condition["message"]
    await eventually(
        lambda: ready(status_of(kmock, "invalid")).get("reason") == "InvalidSpec",
        what="InvalidSpec",
    )
    assert "spec.match.olderThan" in ready(status_of(kmock, "invalid"))["message"]
    good = await eventually(lambda: status_of(kmock, "good").get("lastSweep"), what="good")
    assert good["freedBytes"] == 11
    warnings = [e for e in events_for(kmock, "no-secret") if e["type"] == "Warning"]
    assert warnings and warnings[0]["reason"] == "CredentialsNotFound"
    # Secret values never show up in status or events.
    everything = str([status_of(kmock, n) for n in ("no-secret", "good", "invalid")])
    everything += str(events_for(kmock, "good") + events_for(kmock, "no-secret"))
    assert minio.secret_key not in everything
    text = await scrape(operator)
    assert (
        f'mpu_janitor_sweep_errors_total{{namespace="{NS}",policy="no-secret",'
        f'reason="CredentialsNotFound",store="S3"}}'
    ) in text


async def test_suspending_stops_a_running_sweep_between_uploads(
    kmock: Any, operator: OperatorConfig, minio: MinioServer, s3: Any, bucket: str
) -> None:
    from tests.integration.helpers import make_uploads

    make_uploads(s3, bucket, [f"k{index:03}" for index in range(60)])
    await asyncio.sleep(3.5)
    # Three requests an upload at 6 a second: a sweep of some 30 s.
    slow = policy_body(
        "slow", minio.endpoint, bucket, limits={"requestsPerSecond": 6, "concurrency": 2}
    )
    await create(kmock, slow)
    await eventually(lambda: len(open_uploads(s3, bucket)) <= 55, what="the sweep under way")
    await patch(kmock, "slow", {"metadata": {"generation": 2}, "spec": {"suspend": True}})
    await eventually(
        lambda: ready(status_of(kmock, "slow")).get("reason") == "Suspended", what="Suspended"
    )
    await asyncio.sleep(2)  # an abort already sent may still land
    left = len(open_uploads(s3, bucket))
    await asyncio.sleep(4)
    assert len(open_uploads(s3, bucket)) == left, "the sweep went on after the suspend"
    assert 40 < left < 60  # stopped within a few uploads of the suspend, long before the end
    # What the cut-short sweep did still counts.
    totals = await eventually(lambda: status_of(kmock, "slow").get("totals"), what="totals")
    assert totals["abortedUploads"] == 60 - left
    assert ready(status_of(kmock, "slow"))["reason"] == "Suspended"
