"""The active replica of two peered operators is killed with SIGKILL mid-sweep: no clean-up, no
goodbye in the peering, no last status write. The standby waits out the dead peer's lifetime in
the peering and takes the sweep over. The store sees one sender at a time, ends exactly as the
policy says, and the totals lose at most what was freed since the killed replica's last
checkpoint."""

from __future__ import annotations

import contextlib
import itertools
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.e2e.test_sweep_resilience import (
    AGE,
    CHECKPOINT_SECONDS,
    finished_sweeps,
    open_uploads_all,
    runs,
    sized,
    totals,
)
from tests.support.controlplane import ControlPlane, wait_for
from tests.support.counting_proxy import CountingProxy
from tests.support.minio import MinioServer
from tests.support.operator import (
    REPO,
    add_secret,
    apply,
    apply_crds,
    make_sized_uploads,
    open_under,
    policy,
    running_operator,
)

RPS = 100  # the policy's requestsPerSecond


def test_sigkill_of_the_active_replica_hands_the_sweep_to_the_standby(
    control_plane: ControlPlane,
    namespace: str,
    minio: MinioServer,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
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
        "limits": {"requestsPerSecond": RPS, "concurrency": 2},
    }
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            replica(stack, "replica-b", 100)
            first = replica(stack, "replica-a", 200)
            wait_for(lambda: peers() == 2, timeout=30, what="both replicas in the peering")
            apply(plane, policy("shared", namespace, proxy.url, bucket, **spec))
            wait_for(lambda: aborts_by("replica-a") >= 200, timeout=90, what="replica-a sweeping")
            first.kill()
            killed_at = time.monotonic()
            wait_for(
                lambda: aborts_by("replica-b") > 0,
                timeout=150,  # the dead peer's lifetime in the peering (Kopf: 60 s), and more
                what="replica-b taking the sweep over",
            )
            takeover = time.monotonic() - killed_at
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
                    lambda: totals(plane, namespace, "shared").get("freedBytes", 0) >= truth,
                    timeout=10,
                    what="the totals to reach every freed byte",
                )
            final = totals(plane, namespace, "shared")
    finally:
        proxy.stop()
    requests = proxy.requests
    turns = runs(requests)
    aborts = [r for r in requests if r.is_abort]
    counts = {name: aborts_by(name) for name in ("replica-a", "replica-b")}
    print(
        f"\nSIGKILL failover: {len(eligible)} eligible + {len(kept)} kept uploads; aborts by "
        f"replica {counts}; standby took over {takeover:.1f}s after the kill; turns "
        f"{[n for n, _, _ in turns]}; truth {truth} bytes, status {final}; "
        f"{time.monotonic() - started:.0f}s"
    )
    # The store: every eligible upload gone, every other one untouched.
    assert open_uploads_all(s3, bucket) == kept
    # One sweeper at a time: the killed replica's requests all end before the standby's begin.
    assert [name for name, _, _ in turns] == ["replica-a", "replica-b"], turns
    for (_, _, ended), (_, began, _) in itertools.pairwise(turns):
        assert ended < began, turns
    # Each upload aborted once: the standby lists what is left, so it never aborts again an
    # upload the killed replica's abort removed (an abort cut by the kill may be sent again).
    done = [r.upload_id for r in aborts if r.status == 204]
    assert sorted(done) == sorted(u for _, u in eligible_ids)
    # The totals never count an upload twice, and lose at most what the killed replica freed
    # since its last checkpoint: RPS requests a second for a checkpoint's time.
    assert final["freedBytes"] <= truth and final["abortedUploads"] <= len(eligible)
    per_checkpoint = int(RPS * CHECKPOINT_SECONDS * max(eligible.values()))
    assert truth - final["freedBytes"] <= per_checkpoint, (truth, final)
