"""A big sweep on a real MinIO while the control plane under the operator fails: the API server
or etcd restarts mid-sweep, and the active replica of two peered operators stops mid-sweep.
Each test ends with the store exactly as the policy says, nothing else touched, the status
totals equal to what was freed, and the operator still sweeping (never silent)."""

from __future__ import annotations

import contextlib
import itertools
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.controlplane import ControlPlane, wait_for
from tests.support.counting_proxy import CountingProxy, SeenRequest
from tests.support.minio import MinioServer
from tests.support.operator import (
    Operator,
    add_peering,
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
FAILOVER_RPS = 100  # the failover policy's requestsPerSecond


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


@dataclass
class Failover:
    """Two or more peered operators sweeping one policy through a proxy that records who sent
    each request (every replica has its own User-Agent app id)."""

    plane: ControlPlane
    namespace: str
    bucket: str
    tmp_path: Path
    proxy: CountingProxy
    eligible: dict[str, int]  # key: size, under tmp/
    eligible_ids: set[tuple[str, str]]
    kept: set[tuple[str, str]]  # under keep/: never touched

    @property
    def truth(self) -> int:
        return sum(self.eligible.values())

    def replica(self, stack: ExitStack, name: str, priority: int) -> Operator:
        env = {"MPU_JANITOR_PROGRESS_SECONDS": str(CHECKPOINT_SECONDS), "AWS_SDK_UA_APP_ID": name}
        return stack.enter_context(
            running_operator(
                self.plane.kubeconfig,
                [self.namespace],
                self.tmp_path,
                peering="janitors",
                priority=priority,
                extra_env=env,
            )
        )

    def aborts_by(self, name: str) -> int:
        return sum(1 for r in self.proxy.requests if r.is_abort and f"app/{name}" in r.agent)

    def peers(self) -> int:
        found = self.plane.kubectl_json("get", "kopfpeering", "janitors", "-n", self.namespace)
        return len(found.get("status") or {})

    def two_replicas_sweeping(self, stack: ExitStack) -> Operator:
        """replica-b (priority 100) and replica-a (200) in the peering, the policy applied,
        and replica-a well into its sweep: replica-a is returned."""
        self.replica(stack, "replica-b", 100)
        first = self.replica(stack, "replica-a", 200)
        wait_for(lambda: self.peers() == 2, timeout=30, what="both replicas in the peering")
        spec = {
            "match": {"olderThan": "2s", "quietPeriod": "0s", "prefixes": ["tmp/"]},
            "limits": {"requestsPerSecond": FAILOVER_RPS, "concurrency": 2},
        }
        apply(self.plane, policy("shared", self.namespace, self.proxy.url, self.bucket, **spec))
        wait_for(lambda: self.aborts_by("replica-a") >= 200, timeout=90, what="replica-a sweeping")
        return first

    def sweep_done(self, s3: Any) -> None:
        wait_for(
            lambda: (
                finished_sweeps(self.plane, self.namespace, "shared")
                and not open_under(s3, self.bucket, "tmp/")
            ),
            timeout=240,
            what="the sweep to complete",
        )


def failover(
    plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> Failover:
    apply_crds(plane)
    add_peering(plane, namespace, "janitors")
    add_secret(plane, namespace, minio)
    eligible = sized("tmp/", 1200)
    kept = make_sized_uploads(s3, bucket, sized("keep/", 100))
    eligible_ids = make_sized_uploads(s3, bucket, eligible)
    time.sleep(AGE)
    proxy = CountingProxy(minio.endpoint).start()
    return Failover(plane, namespace, bucket, tmp_path, proxy, eligible, eligible_ids, kept)


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
    run = failover(plane, namespace, minio, s3, bucket, tmp_path)
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            first = run.two_replicas_sweeping(stack)
            assert first.terminate() == 0, first.output()[-3000:]
            wait_for(
                lambda: run.aborts_by("replica-b") >= 300,
                timeout=120,
                what="replica-b taking over the sweep",
            )
            run.replica(stack, "replica-c", 300)  # a higher priority joins mid-sweep
            wait_for(
                lambda: run.aborts_by("replica-c") > 0, timeout=90, what="replica-c taking over"
            )
            run.sweep_done(s3)
            with contextlib.suppress(AssertionError):  # what they reach is asserted below
                wait_for(
                    lambda: (
                        totals(plane, namespace, "shared").get("abortedUploads")
                        == len(run.eligible)
                    ),
                    timeout=30,
                    what="the totals to reach every aborted upload",
                )
            final = totals(plane, namespace, "shared")
    finally:
        run.proxy.stop()
    requests = run.proxy.requests
    turns = runs(requests)
    aborts = [r for r in requests if r.is_abort]
    aborted_ids = [r.upload_id for r in aborts]
    counts = {name: run.aborts_by(name) for name in ("replica-a", "replica-b", "replica-c")}
    t0 = requests[0].received
    print(
        f"\npeering failover: {len(run.eligible)} eligible + {len(run.kept)} kept uploads; "
        f"aborts by replica {counts}; turns at the store (sender, first request, last answer; "
        f"s) {len(turns)} {[(n, round(b - t0, 1), round(e - t0, 1)) for n, b, e in turns[:8]]}; "
        f"truth {run.truth} bytes, status {final}; {time.monotonic() - started:.0f}s"
    )
    assert open_uploads_all(s3, bucket) == run.kept
    # One sweeper at a time: one run of requests per turn, each over before the next begins.
    assert [name for name, _, _ in turns] == ["replica-a", "replica-b", "replica-c"], turns
    for (_, _, ended), (_, began, _) in itertools.pairwise(turns):
        assert ended < began, turns
    # Each upload aborted exactly once, and the totals say exactly what was freed.
    assert sorted(aborted_ids) == sorted(upload for _, upload in run.eligible_ids)
    assert all(r.status == 204 for r in aborts)
    assert final["freedBytes"] == run.truth


def test_sigkill_of_the_active_replica_hands_the_sweep_to_the_standby(
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    """The active replica is killed with SIGKILL mid-sweep: no clean-up, no goodbye in the
    peering, no last status write. The standby waits out the dead peer's lifetime in the
    peering and takes the sweep over. The store sees one sender at a time and ends exactly as
    the policy says; the totals lose at most what the killed replica freed since its last
    checkpoint (answered aborts waiting for a verifying listing included)."""
    plane = control_plane
    run = failover(plane, namespace, minio, s3, bucket, tmp_path)
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            first = run.two_replicas_sweeping(stack)
            first.kill()
            killed_at = time.monotonic()
            wait_for(
                lambda: run.aborts_by("replica-b") > 0,
                timeout=150,  # the dead peer's lifetime in the peering (Kopf: 60 s), and more
                what="replica-b taking the sweep over",
            )
            takeover = time.monotonic() - killed_at
            run.sweep_done(s3)
            with contextlib.suppress(AssertionError):  # what they reach is asserted below
                wait_for(
                    lambda: totals(plane, namespace, "shared").get("freedBytes", 0) >= run.truth,
                    timeout=10,
                    what="the totals to reach every freed byte",
                )
            final = totals(plane, namespace, "shared")
    finally:
        run.proxy.stop()
    turns = runs(run.proxy.requests)
    counts = {name: run.aborts_by(name) for name in ("replica-a", "replica-b")}
    print(
        f"\nSIGKILL failover: {len(run.eligible)} eligible + {len(run.kept)} kept uploads; "
        f"aborts by replica {counts}; the standby took over {takeover:.1f}s after the kill; "
        f"turns {[n for n, _, _ in turns]}; truth {run.truth} bytes, status {final}; "
        f"{time.monotonic() - started:.0f}s"
    )
    assert open_uploads_all(s3, bucket) == run.kept
    assert [name for name, _, _ in turns] == ["replica-a", "replica-b"], turns
    for (_, _, ended), (_, began, _) in itertools.pairwise(turns):
        assert ended < began, turns
    # Each upload aborted once: the standby lists what is left, so it never aborts again an
    # upload the killed replica's abort removed (an abort cut by the kill may be sent again).
    done = [r.upload_id for r in run.proxy.requests if r.is_abort and r.status == 204]
    assert sorted(done) == sorted(upload for _, upload in run.eligible_ids)
    # Never an upload counted twice; at most a checkpoint's worth lost: FAILOVER_RPS requests
    # a second for a checkpoint's time.
    assert final["freedBytes"] <= run.truth and final["abortedUploads"] <= len(run.eligible)
    per_checkpoint = int(FAILOVER_RPS * CHECKPOINT_SECONDS * max(run.eligible.values()))
    assert run.truth - final["freedBytes"] <= per_checkpoint, (run.truth, final)
