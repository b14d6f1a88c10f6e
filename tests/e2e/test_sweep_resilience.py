"""A big sweep on a real MinIO while the control plane under the operator fails: the API server
or etcd restarts mid-sweep, and the active replica of two peered operators stops mid-sweep.
Each test ends with the store exactly as the policy says, nothing else touched, the status
totals equal to what was freed, and the operator still sweeping (never silent)."""

from __future__ import annotations

import contextlib
import itertools
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.controlplane import ControlPlane, wait_for
from tests.support.counting_proxy import CountingProxy, SeenRequest
from tests.support.minio import MinioServer
from tests.support.operator import (
    REPO,
    add_secret,
    apply,
    apply_crds,
    make_sized_uploads,
    open_under,
    policy,
    ready,
    running_operator,
    status,
)

AGE = 3.5  # seconds: older than the policies' olderThan of 2s on MinIO's 1 s Date clock
CHECKPOINT_SECONDS = 1.0
DOWN_SECONDS = 5.0  # how long the restarted component stays stopped


def sized(prefix: str, count: int) -> dict[str, int]:
    return {f"{prefix}{i:05d}": 64 + i % 64 for i in range(count)}


def totals(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return dict(status(plane, namespace, name).get("totals") or {})


def finished_sweeps(plane: ControlPlane, namespace: str, name: str) -> str | None:
    """The start time of the last finished sweep (None before the first one ends)."""
    last = status(plane, namespace, name).get("lastSweep") or {}
    return str(last["startTime"]) if last.get("completionTime") else None


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_a_control_plane_restart_mid_sweep_loses_nothing(
    component: str,
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    """Restart the API server (or etcd) while the operator sweeps 3,000 uploads: every
    eligible upload is aborted, the protected ones stay, the totals equal the freed bytes, and
    the policy is swept again on its schedule afterwards."""
    plane = control_plane
    apply_crds(plane)
    add_secret(plane, namespace, minio)
    eligible = sized("tmp/", 3000)
    started = time.monotonic()
    kept = make_sized_uploads(s3, bucket, sized("keep/", 100))
    make_sized_uploads(s3, bucket, eligible)
    made_seconds = time.monotonic() - started
    truth = sum(eligible.values())
    time.sleep(AGE)
    rps = 200
    spec = {
        "match": {"olderThan": "2s", "quietPeriod": "0s", "prefixes": ["tmp/"]},
        "limits": {"requestsPerSecond": rps, "concurrency": 2},
        "schedule": {"interval": "10s"},
    }
    env = {"MPU_JANITOR_PROGRESS_SECONDS": str(CHECKPOINT_SECONDS)}
    with running_operator(plane.kubeconfig, [namespace], tmp_path, extra_env=env) as operator:
        swept_from = time.monotonic()
        apply(plane, policy("big", namespace, minio.endpoint, bucket, **spec))
        wait_for(
            lambda: totals(plane, namespace, "big").get("freedBytes", 0) > 0,
            timeout=60,
            what="the first checkpoint of the sweep",
        )
        restart = plane.restart_apiserver if component == "kube-apiserver" else plane.restart_etcd
        restarted_at = time.monotonic()
        back_after = restart(down=DOWN_SECONDS)  # several checkpoints fall in the outage
        left_at_restart = len(open_under(s3, bucket, "tmp/"))
        wait_for(
            lambda: finished_sweeps(plane, namespace, "big"),
            timeout=240,
            what="the sweep to complete after the restart",
        )
        swept_seconds = time.monotonic() - swept_from
        first = finished_sweeps(plane, namespace, "big")
        after_first = totals(plane, namespace, "big")
        left = open_uploads_all(s3, bucket)

        # Still sweeping on schedule: new uploads go at the next scheduled sweep, no request.
        late = sized("tmp/late-", 20)
        make_sized_uploads(s3, bucket, late)
        time.sleep(AGE)
        wait_for(
            lambda: (
                not open_under(s3, bucket, "tmp/")
                and finished_sweeps(plane, namespace, "big") != first
                and totals(plane, namespace, "big").get("abortedUploads")
                == len(eligible) + len(late)
            ),
            timeout=60,
            what="a scheduled sweep after the restart",
        )
        final = totals(plane, namespace, "big")
        # And it still follows the policy's changes (its watch came back).
        plane.kubectl(
            "patch",
            "ulp",
            "big",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"spec": {"limits": {"requestsPerSecond": 201}}}',
        )
        wait_for(
            lambda: (
                ready(plane, namespace, "big").get("observedGeneration") == 2
                and ready(plane, namespace, "big").get("reason") == "SweepSucceeded"
            ),
            timeout=60,
            what="the spec change swept",
        )
        condition = ready(plane, namespace, "big")
        assert operator.healthy()
        failed_patches = operator.output().count("could not patch the status")
    print(
        f"\n{component} restart mid-sweep: {len(eligible)} eligible + {len(kept)} kept uploads "
        f"(made in {made_seconds:.0f}s); restarted {restarted_at - swept_from:.1f}s into the "
        f"sweep, down {DOWN_SECONDS:.0f}s, ready {back_after:.1f}s after its start, "
        f"{left_at_restart} left then; {failed_patches} status patches failed and were retried; "
        f"sweep done in "
        f"{swept_seconds:.0f}s; truth {truth} bytes, status {after_first.get('freedBytes')} "
        f"(lost {truth - after_first.get('freedBytes', 0)})"
    )
    assert left_at_restart > 0, "the sweep ended before the restart was over"
    assert left == kept  # every eligible upload gone, every other one untouched
    assert after_first["abortedUploads"] == len(eligible)
    assert after_first["freedBytes"] == truth
    assert final["freedBytes"] == truth + sum(late.values())
    assert (condition["status"], condition["reason"]) == ("True", "SweepSucceeded")


def open_uploads_all(s3: Any, bucket: str) -> set[tuple[str, str]]:
    return open_under(s3, bucket, "")


def runs(requests: list[SeenRequest]) -> list[tuple[str, float, float]]:
    """The requests in arrival order, grouped into runs of one sender: (sender, first arrival,
    last answer). One sweeper at a time means one run per turn, never overlapping in time."""
    grouped: list[tuple[str, float, float]] = []
    for seen in sorted(requests, key=lambda r: r.received):
        sender = next((p[4:] for p in seen.agent.split() if p.startswith("app/")), "?")
        answered = seen.answered if seen.answered is not None else float("inf")
        if grouped and grouped[-1][0] == sender:
            name, first, last = grouped[-1]
            grouped[-1] = (name, first, max(last, answered))
        else:
            grouped.append((sender, seen.received, answered))
    return grouped


def test_peering_failover_mid_sweep_keeps_one_sweeper(
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    """Two peered operators; the active one gets SIGTERM mid-sweep, the standby takes over,
    then a third with a higher priority joins mid-sweep and takes over in turn. The store sees
    one sender at a time (a proxy records every request and who sent it), each upload is
    aborted exactly once, and the totals equal the freed bytes."""
    plane = control_plane
    apply_crds(plane)
    plane.kubectl(
        "apply",
        "--server-side",
        "-f",
        str(REPO / "charts" / "mpu-janitor" / "crds" / "kopf-peerings.yaml"),
    )
    plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev"
    )
    apply(
        plane,
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": "janitors", "namespace": namespace},
        },
    )
    add_secret(plane, namespace, minio)
    eligible = sized("tmp/", 1200)
    kept = make_sized_uploads(s3, bucket, sized("keep/", 100))
    eligible_ids = make_sized_uploads(s3, bucket, eligible)
    truth = sum(eligible.values())
    time.sleep(AGE)
    proxy = CountingProxy(minio.endpoint).start()

    def replica(stack: ExitStack, name: str, priority: int) -> Any:
        env = {"MPU_JANITOR_PROGRESS_SECONDS": str(CHECKPOINT_SECONDS), "AWS_SDK_UA_APP_ID": name}
        return stack.enter_context(
            running_operator(
                plane.kubeconfig,
                [namespace],
                tmp_path,
                peering="janitors",
                priority=priority,
                extra_env=env,
            )
        )

    def aborts_by(name: str) -> int:
        return sum(1 for r in proxy.requests if r.is_abort and f"app/{name}" in r.agent)

    def peers() -> int:
        found = plane.kubectl_json("get", "kopfpeering", "janitors", "-n", namespace)
        return len(found.get("status") or {})

    spec = {
        "match": {"olderThan": "2s", "quietPeriod": "0s", "prefixes": ["tmp/"]},
        "limits": {"requestsPerSecond": 100, "concurrency": 2},
    }
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            replica(stack, "replica-b", 100)
            first = replica(stack, "replica-a", 200)
            wait_for(lambda: peers() == 2, timeout=30, what="both replicas in the peering")
            apply(plane, policy("shared", namespace, proxy.url, bucket, **spec))
            wait_for(lambda: aborts_by("replica-a") >= 200, timeout=90, what="replica-a sweeping")
            assert first.terminate() == 0, first.output()[-3000:]
            wait_for(
                lambda: aborts_by("replica-b") >= 300,
                timeout=120,
                what="replica-b taking over the sweep",
            )
            replica(stack, "replica-c", 300)  # a higher priority joins mid-sweep
            wait_for(lambda: aborts_by("replica-c") > 0, timeout=90, what="replica-c taking over")
            wait_for(
                lambda: (
                    finished_sweeps(plane, namespace, "shared")
                    and not open_under(s3, bucket, "tmp/")
                ),
                timeout=240,
                what="the sweep to complete",
            )
            with contextlib.suppress(AssertionError):  # what they reach is asserted below
                wait_for(
                    lambda: (
                        totals(plane, namespace, "shared").get("abortedUploads") == len(eligible)
                    ),
                    timeout=30,
                    what="the totals to reach every aborted upload",
                )
            final = totals(plane, namespace, "shared")
    finally:
        proxy.stop()
    requests = proxy.requests
    turns = runs(requests)
    aborts = [r for r in requests if r.is_abort]
    aborted_ids = [r.upload_id for r in aborts]
    counts = {name: aborts_by(name) for name in ("replica-a", "replica-b", "replica-c")}
    t0 = requests[0].received
    print(
        f"\npeering failover: {len(eligible)} eligible + {len(kept)} kept uploads; aborts by "
        f"replica {counts}; turns at the store (sender, first request, last answer; s) "
        f"{len(turns)} {[(n, round(b - t0, 1), round(e - t0, 1)) for n, b, e in turns[:8]]}; "
        f"truth {truth} bytes, status {final}; {time.monotonic() - started:.0f}s"
    )
    assert open_uploads_all(s3, bucket) == kept
    # One sweeper at a time: one run of requests per turn, each over before the next begins.
    assert [name for name, _, _ in turns] == ["replica-a", "replica-b", "replica-c"], turns
    for (_, _, ended), (_, began, _) in itertools.pairwise(turns):
        assert ended < began, turns
    # Each upload aborted exactly once, and the totals say exactly what was freed.
    assert sorted(aborted_ids) == sorted(upload for _, upload in eligible_ids)
    assert all(r.status == 204 for r in aborts)
    assert final["freedBytes"] == truth
