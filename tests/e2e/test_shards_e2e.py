"""Two operator shards (``--selector``) against a real kube-apiserver and a real MinIO: each
serves exactly the policies its selector matches, with its own peering object; a policy in
neither shard is never touched, and a policy relabelled from one shard to the other moves
over (swept by the new shard, forgotten by the old)."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_operator_e2e import (
    AGE,
    REPO,
    Operator,
    add_secret,
    apply,
    events,
    policy,
    status,
)
from tests.integration.helpers import make_upload, open_uploads
from tests.support.controlplane import ControlPlane, wait_for, write_kubeconfig
from tests.support.minio import MinioServer
from tests.support.operator import running_operator
from tests.support.toxiproxy import Toxiproxy


@contextmanager
def shard(kubeconfig: Path, tmp: Path, selector: str, peering: str) -> Iterator[Operator]:
    extra = ["--all-namespaces", "--selector", selector]
    with running_operator(kubeconfig, [], tmp, peering=peering, extra_args=extra) as operator:
        yield operator


def identity(operator: Operator) -> str:
    found = re.search(r"identity (\S+), policies matching", operator.output())
    assert found, operator.output()[-2000:]
    return found.group(1)


def served(operator: Operator) -> set[str]:
    """The policies an operator publishes series for (namespace/name)."""
    pattern = r'mpu_janitor_policy_interval_seconds\{namespace="([^"]+)",policy="([^"]+)"'
    return {f"{ns}/{name}" for ns, name in re.findall(pattern, operator.metrics())}


def sweepers(plane: ControlPlane, namespace: str, name: str) -> list[str]:
    """The reporting instance of every sweep Event of a policy, oldest first."""
    found = [
        e
        for e in events(plane, namespace, name)
        if e["reason"] in ("SweepSucceeded", "SweepFailed", "SweepPartiallyFailed")
    ]
    found.sort(key=lambda e: e["metadata"]["creationTimestamp"])
    return [str(e["reportingInstance"]) for e in found]


@pytest.fixture()
def peerings(control_plane: ControlPlane) -> Iterator[tuple[str, str]]:
    control_plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/uploadlifecyclepolicies.mpu-janitor.dev",
        "crd/clusterkopfpeerings.kopf.dev",
    )
    suffix = secrets.token_hex(3)
    names = (f"janitor-a-{suffix}", f"janitor-b-{suffix}")
    for name in names:
        apply(
            control_plane,
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}},
        )
    yield names
    for name in names:
        control_plane.kubectl("delete", "clusterkopfpeering", name, "--ignore-not-found")


def test_two_shards_split_the_policies_and_a_relabelled_policy_moves(
    control_plane: ControlPlane,
    make_namespace: Any,
    peerings: tuple[str, str],
    minio: MinioServer,
    s3: Any,
    tmp_path: Path,
) -> None:
    plane = control_plane
    label = f"shard-{secrets.token_hex(2)}"  # no other test's policy carries it
    namespaces = [make_namespace("shard"), make_namespace("shard")]
    policies = {  # namespace/name -> shard label value (None: no label, no shard)
        f"{namespaces[0]}/a1": "a",
        f"{namespaces[1]}/a2": "a",
        f"{namespaces[0]}/b1": "b",
        f"{namespaces[1]}/b2": "b",
        f"{namespaces[0]}/nobody": None,
        f"{namespaces[1]}/other": "c",
    }
    buckets = {}
    for namespace in namespaces:
        add_secret(plane, namespace, minio)
    for number, key in enumerate(policies):
        buckets[key] = f"shard-{secrets.token_hex(4)}-{number}"
        s3.create_bucket(Bucket=buckets[key])
        make_upload(s3, buckets[key], "tmp/x.bin", [100 + number])
    time.sleep(AGE)

    with (
        shard(plane.kubeconfig, tmp_path, f"{label}=a", peerings[0]) as shard_a,
        shard(plane.kubeconfig, tmp_path, f"{label} in (b)", peerings[1]) as shard_b,
    ):
        owner = {"a": identity(shard_a), "b": identity(shard_b)}
        for key, value in policies.items():
            namespace, name = key.split("/")
            document = policy(name, namespace, minio.endpoint, buckets[key])
            if value is not None:
                document["metadata"]["labels"] = {label: value}
            apply(plane, document)

        mine = {k for k, v in policies.items() if v in ("a", "b")}
        wait_for(
            lambda: all(not open_uploads(s3, buckets[k]) for k in mine),
            timeout=90,
            what="the sharded policies swept",
        )
        for key in mine:
            namespace, name = key.split("/")
            wait_for(lambda n=namespace, p=name: sweepers(plane, n, p), timeout=30, what=key)
            # Swept once, by its own shard only.
            assert sweepers(plane, namespace, name) == [owner[policies[key]]], key
            assert status(plane, namespace, name)["lastSweep"]["aborted"] == 1
        assert served(shard_a) == {k for k, v in policies.items() if v == "a"}
        assert served(shard_b) == {k for k, v in policies.items() if v == "b"}
        for key in set(policies) - mine:  # in no shard: never listed, never written
            namespace, name = key.split("/")
            assert len(open_uploads(s3, buckets[key])) == 1
            assert status(plane, namespace, name) == {}
            assert sweepers(plane, namespace, name) == []

        # Relabel a2 into shard b: b sweeps it (its first look at it), a forgets it.
        moved = f"{namespaces[1]}/a2"
        make_upload(s3, buckets[moved], "tmp/y.bin", [7])
        time.sleep(AGE)
        plane.kubectl("label", "ulp", "a2", "-n", namespaces[1], f"{label}=b", "--overwrite")
        wait_for(
            lambda: moved in served(shard_b) and moved not in served(shard_a),
            timeout=30,
            what="a2 moved from shard a to shard b",
        )
        wait_for(lambda: not open_uploads(s3, buckets[moved]), timeout=60, what="a2 swept by b")
        wait_for(
            lambda: len(sweepers(plane, namespaces[1], "a2")) == 2, timeout=30, what="a2 event"
        )
        assert sweepers(plane, namespaces[1], "a2") == [owner["a"], owner["b"]]
        assert status(plane, namespaces[1], "a2")["totals"]["abortedUploads"] == 2

        # The old shard no longer acts on it: a sweep request reaches only shard b.
        make_upload(s3, buckets[moved], "tmp/z.bin", [9])
        time.sleep(AGE)
        plane.kubectl("annotate", "ulp", "a2", "-n", namespaces[1], "mpu-janitor.dev/sweep-now=1")
        wait_for(lambda: not open_uploads(s3, buckets[moved]), timeout=60, what="sweep-now")
        wait_for(
            lambda: len(sweepers(plane, namespaces[1], "a2")) == 3, timeout=30, what="3rd event"
        )
        assert sweepers(plane, namespaces[1], "a2") == [owner["a"], owner["b"], owner["b"]]
        assert served(shard_a) == {f"{namespaces[0]}/a1"}
        assert 'policy="a2"' not in shard_a.metrics()


@pytest.mark.parametrize("outage", ["partition", "apiserver-restart"])
def test_a_policy_relabelled_while_the_watch_is_broken_moves_when_it_is_back(
    outage: str,
    control_plane: ControlPlane,
    make_namespace: Any,
    peerings: tuple[str, str],
    minio: MinioServer,
    s3: Any,
    tmp_path: Path,
) -> None:
    """The shard's connection to the API server breaks (a network partition, or the API server
    restarted); meanwhile one policy is relabelled into the shard, one out of it, and one is
    deleted. Once the shard reaches the API server again it sweeps the one that came in and
    forgets the two that went, without a restart of the operator."""
    plane = control_plane
    label = f"shard-{secrets.token_hex(2)}"
    namespace = make_namespace("relabel")
    add_secret(plane, namespace, minio)
    buckets = {
        name: f"relabel-{secrets.token_hex(4)}" for name in ("joining", "leaving", "deleted")
    }
    for bucket in buckets.values():
        s3.create_bucket(Bucket=bucket)
        make_upload(s3, bucket, "tmp/x.bin", [100])
    time.sleep(AGE)
    toxiproxy = Toxiproxy().start()
    try:
        link = toxiproxy.proxy("apiserver", f"127.0.0.1:{plane.apiserver_port}")
        kubeconfig = write_kubeconfig(
            tmp_path / "through-proxy.kubeconfig",
            server=f"https://{link.listen}",
            token=plane.admin_token,
            user="admin",
            ca_file=plane.ca_file,
        )
        with shard(kubeconfig, tmp_path, f"{label}=a", peerings[0]) as operator:
            for name, value in (("joining", "b"), ("leaving", "a"), ("deleted", "a")):
                document = policy(name, namespace, minio.endpoint, buckets[name])
                document["metadata"]["labels"] = {label: value}
                apply(plane, document)
            wait_for(
                lambda: (
                    not (
                        open_uploads(s3, buckets["leaving"]) or open_uploads(s3, buckets["deleted"])
                    )
                ),
                timeout=60,
                what="the shard's own policies swept",
            )
            assert served(operator) == {f"{namespace}/leaving", f"{namespace}/deleted"}

            link.set_enabled(False)  # every connection closed, new ones refused
            if outage == "apiserver-restart":
                plane.restart_apiserver()
            relabel = ("label", "ulp", "-n", namespace, "--overwrite")
            plane.kubectl(*relabel, "joining", f"{label}=a")
            plane.kubectl(*relabel, "leaving", f"{label}=b")
            plane.kubectl("delete", "ulp", "deleted", "-n", namespace)
            make_upload(s3, buckets["leaving"], "tmp/y.bin", [7])
            time.sleep(AGE)
            link.set_enabled(True)

            wait_for(
                lambda: not open_uploads(s3, buckets["joining"]),
                timeout=120,
                what="the policy relabelled into the shard swept",
            )
            wait_for(
                lambda: served(operator) == {f"{namespace}/joining"},
                timeout=60,
                what=f"the shard to serve only joining (serves {served(operator)})",
            )
            # The policy that left is no longer the shard's: a sweep request for it, sent
            # before one for the shard's own policy, is not answered by this shard.
            plane.kubectl(
                "annotate", "ulp", "leaving", "-n", namespace, "mpu-janitor.dev/sweep-now=1"
            )
            make_upload(s3, buckets["joining"], "tmp/z.bin", [9])
            time.sleep(AGE)
            plane.kubectl(
                "annotate", "ulp", "joining", "-n", namespace, "mpu-janitor.dev/sweep-now=1"
            )
            wait_for(
                lambda: status(plane, namespace, "joining").get("handledSweepNow") == "1",
                timeout=60,
                what="the sweep request for joining answered",
            )
            assert not open_uploads(s3, buckets["joining"])
            assert len(open_uploads(s3, buckets["leaving"])) == 1
            assert "handledSweepNow" not in status(plane, namespace, "leaving")
    finally:
        toxiproxy.stop()
