"""minimal_prefixes: overlapping prefixes never list an upload twice, in linear work."""

from __future__ import annotations

import random

from mpu_janitor.stores.s3 import minimal_prefixes


def brute_force(prefixes: list[str]) -> list[str]:
    unique = sorted(set(prefixes))
    return [p for p in unique if not any(p != q and p.startswith(q) for q in unique)]


def test_same_result_as_the_definition() -> None:
    rng = random.Random(8)
    for _ in range(300):
        prefixes = ["".join(rng.choice("ab/") for _ in range(rng.randint(0, 4))) for _ in range(12)]
        prefixes = [p for p in prefixes if p]
        assert minimal_prefixes(prefixes) == brute_force(prefixes), prefixes
    assert minimal_prefixes(["tmp/", "tmp/a/", "tmp", "x/", "x/", "tmq/"]) == ["tmp", "tmq/", "x/"]
    assert minimal_prefixes([]) == []


class Counted(str):
    """A prefix that counts the comparisons made with it."""

    calls = 0

    def startswith(self, *args: object) -> bool:  # type: ignore[override]
        Counted.calls += 1
        return super().startswith(*args)  # type: ignore[arg-type]


def test_20000_prefixes_cost_linear_work() -> None:
    """20,000 disjoint prefixes (the CRD's bound is 1,000 per policy; the CLI's files may list
    more): each is compared with one kept prefix, not with every kept one."""
    prefixes = [Counted(f"tenant-{index:05d}/") for index in range(20_000)]
    Counted.calls = 0
    kept = minimal_prefixes(prefixes)
    assert len(kept) == 20_000
    assert Counted.calls <= 20_000
