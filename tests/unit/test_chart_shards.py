"""Shards as chart releases: operator.selector reaches the operator, and two releases in one
cluster never share a peering object (each would pause the other's shard)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_chart import CHART, NAMESPACE, helm, parsed_args, render


def render_release(tmp_path: Path, release: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    result = helm(
        "template", release, str(CHART), "--namespace", NAMESPACE, values=values, tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_selector_value_reaches_the_operator(tmp_path: Path) -> None:
    assert parsed_args(render(tmp_path)).selector is None
    args = parsed_args(render(tmp_path, {"operator": {"selector": "shard in (a, b),!legacy"}}))
    assert str(args.selector) == "shard in (a,b),!legacy"


def test_two_shard_releases_have_their_own_peering(tmp_path: Path) -> None:
    names: list[str] = []
    for release, shard in (("janitor-a", "a"), ("janitor-b", "b")):
        values = {
            "replicaCount": 2,
            "peering": {"enabled": True},
            "operator": {"selector": f"mpu-janitor.dev/shard={shard}"},
        }
        objects = render_release(tmp_path, release, values)
        args = parsed_args(objects)
        assert str(args.selector) == f"mpu-janitor.dev/shard={shard}"
        (peering,) = [o for o in objects if o["kind"] == "ClusterKopfPeering"]
        assert peering["metadata"]["name"] == args.peering  # the object the operator joins
        names.append(f"ClusterKopfPeering/{args.peering}")
        # Cluster-scoped objects must not collide between the releases either.
        names += [
            f"{o['kind']}/{o['metadata']['name']}"
            for o in objects
            if o["kind"] in ("ClusterRole", "ClusterRoleBinding")
        ]
    assert len(set(names)) == len(names), names


def test_schema_refuses_a_selector_that_is_not_a_string(tmp_path: Path) -> None:
    result = helm(
        "template",
        "janitor",
        str(CHART),
        values={"operator": {"selector": {"shard": "a"}}},
        tmp_path=tmp_path,
    )
    assert result.returncode != 0 and "selector" in result.stderr
