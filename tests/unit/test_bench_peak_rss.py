"""The memory bench reads the CLI's own peak RSS, never its parent's."""

from __future__ import annotations

import os

from bench.bench_minio_memory import run_measured

BALLAST_MIB = 256


def test_a_child_peak_is_its_own_not_the_bench_that_spawned_it() -> None:
    """``ru_maxrss`` from ``wait4`` keeps the parent's high-water mark across ``posix_spawn``
    and ``exec``: a bench that had just seeded 40,000 uploads reported its own 120 MiB as the
    CLI's peak. The figure used is the child's ``VmHWM``."""
    ballast = bytearray(BALLAST_MIB * 1024 * 1024)
    for offset in range(0, len(ballast), 4096):  # touched: resident in the parent
        ballast[offset] = 1
    child = run_measured(["--help"], dict(os.environ))
    assert os.waitstatus_to_exitcode(child.status) == 0, child.stderr
    assert "sweep" in child.stdout
    assert 5 < child.peak_mib < BALLAST_MIB / 2, (
        f"peak {child.peak_mib:.0f} MiB (ru_maxrss says {child.usage.ru_maxrss / 1024:.0f} MiB)"
    )
    del ballast
