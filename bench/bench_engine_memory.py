"""The sweep engine's memory and CPU per upload, on a lean in-memory store (no network).

DESIGN section 3 says the sweep streams the listing: memory must not grow with the number of
uploads. This runs ``run_sweep`` (DryRun and Abort) and ``inventory`` over N synthetic uploads
for several N and prints, per run:

* peak traced memory (tracemalloc, in a separate run: tracing slows Python down),
* peak RSS growth over the RSS before the run (Linux VmHWM, reset through clear_refs),
* uploads/second (wall) and CPU microseconds per upload (all threads),
* whether the result's counts and bytes are exactly what the store holds,

and the ratio of the peak at the largest N to the peak at the smallest N (flat: about 1).
Each measurement runs in a fresh interpreter so one run's peak never hides another's.

    PYTHONPATH=.:operator python bench/bench_engine_memory.py
    PYTHONPATH=.:operator python bench/bench_engine_memory.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.streaming_store import StreamingStore

from mpu_janitor.policy import Limits, Policy, parse_policy
from mpu_janitor.sweep import inventory, run_sweep

REPO = Path(__file__).resolve().parent.parent
MODES = ("DryRun", "Abort", "inventory")
DEFAULT_SIZES = (10_000, 100_000, 300_000)
UNPACED = 1e9  # requests/s: far above what the engine can do, so the pacer never waits


def make_policy(mode: str, count: int, *, concurrency: int, rate: float) -> Policy:
    """The policy every run uses: old = 1 day, quiet = 5 minutes, abort budget >= N."""
    doc = {
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "store": {"type": "S3", "s3": {"buckets": ["bench"]}},
            "match": {"olderThan": "1d", "quietPeriod": "5m", "prefixes": ["tmp/"]},
            "mode": "DryRun" if mode == "DryRun" else "Abort",
        },
    }
    policy = parse_policy(doc)
    # Built directly: the CRD caps requestsPerSecond at 10,000, which would measure the pacer.
    limits = Limits(
        max_aborts_per_sweep=max(count, 1), requests_per_second=rate, concurrency=concurrency
    )
    return replace(policy, limits=limits)


# ------------------------------------------------------------------------------------------------
# Process memory (Linux /proc; None elsewhere).


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# One run (in this process).


@dataclass
class Run:
    mode: str
    uploads: int
    traced: bool
    seconds: float
    cpu_seconds: float
    peak_traced_bytes: int | None
    retained_traced_bytes: int | None  # still allocated at the end (the result included)
    rss_before_kib: int | None
    peak_rss_growth_kib: int | None
    correct: bool
    detail: str
    store_calls: int
    max_pending_aborts: int

    @property
    def uploads_per_second(self) -> float:
        return self.uploads / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_upload(self) -> float:
        return 1e6 * self.cpu_seconds / self.uploads if self.uploads else 0.0


def run_one(
    mode: str,
    count: int,
    *,
    trace: bool = False,
    concurrency: int = 16,
    rate: float = UNPACED,
    page_size: int = 1000,
) -> Run:
    """One sweep (``DryRun``/``Abort``) or one full ``inventory`` over ``count`` uploads."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    store = StreamingStore(count, page_size=page_size)
    expected = store.expected()
    policy = make_policy(mode, count, concurrency=concurrency, rate=rate)
    gc.collect()
    rss_before = _status_kib("VmRSS")
    rss_reset = reset_peak_rss()
    if trace:
        tracemalloc.start()
        tracemalloc.reset_peak()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    got: tuple[int, ...]
    want: tuple[int, ...]
    if mode == "inventory":
        seen = eligible = eligible_bytes = active = total_bytes = 0
        for item in inventory(policy, store):
            seen += 1
            total_bytes += item.size_bytes
            active += item.active
            if item.eligible:
                eligible += 1
                eligible_bytes += item.size_bytes
        got = (seen, eligible, eligible_bytes, active, total_bytes, 0)
        want = (
            expected.scanned,
            expected.eligible,
            expected.eligible_bytes,
            expected.skipped_active,
            expected.incomplete_bytes,
            0,
        )
    else:
        result = run_sweep(policy, store)
        summary = result.summary()
        freed = summary["freedBytes"]
        got = (
            summary["scanned"],
            summary["eligible"],
            summary["eligibleBytes"],
            summary["skippedActive"],
            summary["incompleteBytes"],
            summary["failed"],
            summary["aborted"],
            freed,
        )
        aborted = 0 if mode == "DryRun" else expected.eligible
        want = (
            expected.scanned,
            expected.eligible,
            expected.eligible_bytes,
            expected.skipped_active,
            expected.incomplete_bytes,
            0,
            aborted,
            0 if mode == "DryRun" else expected.eligible_bytes,
        )
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    peak_traced = retained = None
    if trace:
        retained, peak_traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    peak_rss = _status_kib("VmHWM") if rss_reset else None
    growth = None
    if peak_rss is not None and rss_before is not None:
        growth = max(0, peak_rss - rss_before)
    return Run(
        mode=mode,
        uploads=count,
        traced=trace,
        seconds=wall,
        cpu_seconds=cpu,
        peak_traced_bytes=peak_traced,
        retained_traced_bytes=retained,
        rss_before_kib=rss_before,
        peak_rss_growth_kib=growth,
        correct=got == want and store.pending_aborts == 0,
        detail=f"got {got} want {want} pending aborts {store.pending_aborts}",
        store_calls=store.pages + store.measures + store.aborts,
        max_pending_aborts=store.max_pending_aborts,
    )


# ------------------------------------------------------------------------------------------------
# The driver: each run in a fresh interpreter.


def run_child(mode: str, count: int, *, trace: bool, concurrency: int, rate: float) -> Run:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "operator"), *filter(None, [env.get("PYTHONPATH")])]
    )
    command = [
        sys.executable,
        "-m",
        "bench.bench_engine_memory",
        "--child",
        f"{mode}:{count}",
        "--concurrency",
        str(concurrency),
        "--rate",
        repr(rate),
    ]
    if trace:
        command.append("--trace")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(**data)


def mib(value: float | None, unit: float) -> str:
    return "-" if value is None else f"{value / unit:8.2f}"


def print_table(rows: list[tuple[Run, Run | None]]) -> None:
    header = (
        f"{'mode':<10}{'uploads':>10}{'uploads/s':>11}{'CPU us/upl':>11}"
        f"{'peak RSS +MiB':>14}{'traced MiB':>11}{'traced B/upl':>13}{'retained KiB':>13}"
        f"{'calls':>11}  ok"
    )
    print(header)
    print("-" * len(header))
    for plain, traced in rows:
        peak = traced.peak_traced_bytes if traced else None
        retained = traced.retained_traced_bytes if traced else None
        per_upload = f"{peak / plain.uploads:13.2f}" if peak is not None else f"{'-':>13}"
        kept = f"{retained / 1024:13.1f}" if retained is not None else f"{'-':>13}"
        ok = plain.correct and (traced is None or traced.correct)
        print(
            f"{plain.mode:<10}{plain.uploads:>10,}{plain.uploads_per_second:>11,.0f}"
            f"{plain.cpu_us_per_upload:>11.1f}"
            f"{mib(plain.peak_rss_growth_kib, 1024):>14}{mib(peak, 1 << 20):>11}"
            f"{per_upload}{kept}{plain.store_calls:>11,}  {'yes' if ok else 'NO'}"
        )
        if not ok:
            print(f"    {plain.detail}")


def print_flatness(rows: list[tuple[Run, Run | None]]) -> None:
    print("\nflatness: peak at the largest N / peak at the smallest N (1.00 = flat)")
    for mode in MODES:
        mine = sorted((r for r in rows if r[0].mode == mode), key=lambda r: r[0].uploads)
        if len(mine) < 2:
            continue
        (small, small_t), (large, large_t) = mine[0], mine[-1]
        growth = large.uploads / small.uploads
        parts = [f"{mode:<10} N x{growth:,.0f}:"]
        if small_t and large_t and small_t.peak_traced_bytes and large_t.peak_traced_bytes:
            ratio = large_t.peak_traced_bytes / small_t.peak_traced_bytes
            parts.append(f"traced x{ratio:.2f}")
        if small.peak_rss_growth_kib is not None and large.peak_rss_growth_kib is not None:
            base = max(small.peak_rss_growth_kib, 1)
            parts.append(
                f"RSS growth x{large.peak_rss_growth_kib / base:.2f} "
                f"({small.peak_rss_growth_kib / 1024:.1f} -> "
                f"{large.peak_rss_growth_kib / 1024:.1f} MiB)"
            )
        print("  " + "  ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in DEFAULT_SIZES),
        help="comma-separated upload counts (default %(default)s)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="DryRun, Abort, inventory (default: all)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="spec.limits.concurrency")
    parser.add_argument(
        "--rate", type=float, default=UNPACED, help="requests/s for the pacer (default: unpaced)"
    )
    parser.add_argument("--no-trace", action="store_true", help="skip the tracemalloc runs")
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        mode, count = args.child.split(":")
        run = run_one(
            mode, int(count), trace=args.trace, concurrency=args.concurrency, rate=args.rate
        )
        print(json.dumps(asdict(run)))
        return 0

    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    print(
        f"engine benchmark: sizes {sizes}, modes {modes}, concurrency {args.concurrency}, "
        f"rate {'unpaced' if args.rate >= UNPACED else args.rate}, Python "
        f"{sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    rows: list[tuple[Run, Run | None]] = []
    started = time.perf_counter()
    for mode in modes:
        for count in sizes:
            plain = run_child(
                mode, count, trace=False, concurrency=args.concurrency, rate=args.rate
            )
            traced = None
            if not args.no_trace:
                traced = run_child(
                    mode, count, trace=True, concurrency=args.concurrency, rate=args.rate
                )
            rows.append((plain, traced))
            print(
                f"  {mode} {count:,}: {plain.seconds:.1f}s"
                + (f" (+{traced.seconds:.1f}s traced)" if traced else ""),
                file=sys.stderr,
                flush=True,
            )
    print()
    print_table(rows)
    print_flatness(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0 if all(p.correct and (t is None or t.correct) for p, t in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
