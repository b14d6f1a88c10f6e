"""Per-namespace fairness: one tenant's many policies neither take every sweep slot nor send
more store requests a second than the namespace's cap, whatever their own limits say. The
scheduler runs for real; the sweep engine and the store are replaced by recorders."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

from mpu_janitor import scheduler as scheduler_module
from mpu_janitor.fairness import FairnessLimits, NamespaceCaps
from mpu_janitor.metrics import MetricsState
from mpu_janitor.pacing import Cancelled
from mpu_janitor.scheduler import Scheduler
from mpu_janitor.stores.base import Pace, PartsSummary, Upload, UploadPage, unpaced
from mpu_janitor.sweep import SweepResult
from mpu_janitor.tenancy import Tenancy

T = TypeVar("T")
TENANTS = Tenancy(ambient_namespaces=frozenset({"tenant-a", "tenant-b"}))
S3 = {"store": {"type": "S3", "s3": {"buckets": ["b-1"]}}, "match": {"olderThan": "1d"}}


class RecordingKube:
    """Status patches are recorded; no Secret is ever read (the tenants use ambient identity)."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []

    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        self.patches.append((name, dict(status)))


def policy_body(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mpu-janitor.dev/v1alpha1",
        "kind": "UploadLifecyclePolicy",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": S3,
    }


def make_scheduler(
    caps: NamespaceCaps, *, max_parallel_sweeps: int = 8
) -> tuple[Scheduler, RecordingKube]:
    kube = RecordingKube()

    async def post(*_: Any) -> None:
        pass

    sched = Scheduler(
        kube,  # type: ignore[arg-type]
        MetricsState(),
        post,
        max_parallel_sweeps=max_parallel_sweeps,
        tenancy=TENANTS,
        fairness=caps,
    )
    return sched, kube


def result_of(policy: Any) -> SweepResult:
    now = datetime.now(UTC)
    return SweepResult(policy.namespace, policy.name, "S3", False, now, now)


class RecordingStore:
    """A store whose every request (listing page, parts listing page, abort) is recorded
    with the time on the test's clock when it actually went out."""

    kind = "S3"

    def __init__(self, namespace: str, sent: list[tuple[str, float]], clock: Any) -> None:
        self.namespace, self.sent, self.clock = namespace, sent, clock
        self.target_id = f"fake|{namespace}"

    def _request(self) -> None:
        self.sent.append((self.namespace, self.clock()))

    def containers(self) -> list[str]:
        return ["b-1"]

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        for _ in range(20):
            pace(self._request)
            yield UploadPage([], None)

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        pace(self._request, finish=True)
        return PartsSummary(0, 0, None, None)

    def abort(self, upload: Upload) -> None:
        self._request()

    def forget(self, upload: Upload) -> None:
        pass

    def close(self) -> None:
        pass


class VirtualTime:
    """A clock that only moves when someone waits: waiting for a token advances it by the
    wait instead of sleeping, so the test counts requests against time without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def clock(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            return
        with self.lock:
            self.now += seconds


async def wait_until(condition: Callable[[], bool], rounds: int = 400) -> bool:
    for _ in range(rounds):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


async def test_twenty_policies_of_one_namespace_do_not_starve_another_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    running: dict[str, set[str]] = {"tenant-a": set(), "tenant-b": set()}
    started: list[tuple[str, str]] = []
    guard = threading.Lock()

    def sweep(policy: Any, store: Any, *, cancel: threading.Event, **_: Any) -> SweepResult:
        with guard:
            running[policy.namespace].add(policy.name)
            started.append((policy.namespace, policy.name))
        while not release.wait(0.02) and not cancel.is_set():
            pass
        with guard:
            running[policy.namespace].discard(policy.name)
        return result_of(policy)

    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    monkeypatch.setattr(scheduler_module, "open_store", lambda *_: RecordingStore("x", [], None))
    caps = NamespaceCaps(FairnessLimits(namespace_max_concurrent_sweeps=1))
    sched, _ = make_scheduler(caps, max_parallel_sweeps=2)
    for index in range(20):
        sched.upsert(policy_body("tenant-a", f"a-{index}"))
    sched.start()
    try:
        assert await wait_until(lambda: bool(running["tenant-a"]))
        sched.upsert(policy_body("tenant-b", "only"))
        b_started = await wait_until(lambda: ("tenant-b", "only") in started)
        with guard:
            a_running = len(running["tenant-a"])
        assert b_started, (
            f"tenant-b's policy never started while {a_running} of tenant-a's 20 sweeps held "
            "the operator's 2 slots"
        )
        assert a_running == 1  # tenant-a's cap; its other 19 wait without holding a slot
        release.set()
        # Once released, every policy of tenant-a still gets its sweep, one at a time.
        assert await wait_until(lambda: len(started) == 21, rounds=1000)
    finally:
        release.set()
        await sched.stop()


async def test_a_namespaces_concurrent_sweeps_share_its_request_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three sweeps of tenant-a run at once, each with its own policy rate of 100/s; together
    they send no more than tenant-a's cap of 5 requests a second (plus one second of burst),
    counted on a virtual clock. tenant-b's sweep has a bucket of its own."""
    time_ = VirtualTime()
    sent: list[tuple[str, float]] = []
    guard = threading.Lock()

    def record(namespace: str) -> None:
        with guard:
            sent.append((namespace, time_.clock()))

    class Store(RecordingStore):
        def _request(self) -> None:
            record(self.namespace)

    def engine_pace(request: Callable[[], T], *, finish: bool = False) -> T:
        return request()  # the engine's own pacer is not what is tested here

    def sweep(policy: Any, store: Any, **_: Any) -> SweepResult:
        for _page in store.list_uploads("b-1", [], engine_pace):
            pass
        upload = Upload("b-1", "k", "u", datetime.now(UTC))
        for _ in range(5):
            store.measure(upload, engine_pace)
            engine_pace(lambda: store.abort(upload))
        return result_of(policy)

    monkeypatch.setattr(scheduler_module, "run_sweep", sweep)
    monkeypatch.setattr(
        scheduler_module,
        "open_store",
        lambda store_spec, *_: Store(opened.pop(0), sent, time_.clock),
    )
    opened: list[str] = []
    caps = NamespaceCaps(
        FairnessLimits(namespace_max_requests_per_second=5),
        clock=time_.clock,
        sleep=time_.sleep,
    )
    sched, _ = make_scheduler(caps)
    for namespace, name in [
        ("tenant-a", "a-0"),
        ("tenant-a", "a-1"),
        ("tenant-a", "a-2"),
        ("tenant-b", "b-0"),
    ]:
        sched.upsert(policy_body(namespace, name))
    entries = list(sched.entries.values())
    opened.extend(entry.namespace for entry in entries)
    await asyncio.gather(*(sched._sweep(entry) for entry in entries))
    await sched.stop()

    per_sweep = 20 + 5 * 2  # listing pages, parts listings, aborts
    a_times = sorted(t for namespace, t in sent if namespace == "tenant-a")
    b_times = sorted(t for namespace, t in sent if namespace == "tenant-b")
    assert (len(a_times), len(b_times)) == (3 * per_sweep, per_sweep)  # nothing lost
    for count, at in enumerate(a_times, start=1):
        assert count <= 5 + 5 * at, f"tenant-a sent {count} requests by t={at:.2f}s (cap 5/s)"
    for count, at in enumerate(b_times, start=1):
        assert count <= 5 + 5 * at, f"tenant-b sent {count} requests by t={at:.2f}s (cap 5/s)"


def test_a_stopped_sweep_waiting_for_its_namespaces_rate_sends_nothing_more() -> None:
    """A stop order ends the wait for a shared token with Cancelled, before the request."""
    sent: list[tuple[str, float]] = []
    caps = NamespaceCaps(FairnessLimits(namespace_max_requests_per_second=0.5))
    cancel = threading.Event()
    store = caps.paced(RecordingStore("tenant-a", sent, lambda: 0.0), "tenant-a", cancel)
    pages = store.list_uploads("b-1", [])
    next(pages)  # the one token the bucket starts with
    stopper = threading.Timer(0.1, cancel.set)
    stopper.start()
    with pytest.raises(Cancelled):
        next(pages)
    stopper.join()
    assert len(sent) == 1


def test_fairness_limits_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--namespace-max-concurrent-sweeps"):
        FairnessLimits(namespace_max_concurrent_sweeps=-1)
    with pytest.raises(ValueError, match="--namespace-max-requests-per-second"):
        FairnessLimits(namespace_max_requests_per_second=-2)


def test_the_operator_refuses_a_negative_cap_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mpu_janitor.cli import main

    for flag in ("--namespace-max-concurrent-sweeps=-1", "--namespace-max-requests-per-second=-3"):
        with pytest.raises(SystemExit) as exit_info:
            main(["operator", "--standalone", flag])
        assert exit_info.value.code == 2
        assert flag.split("=")[0] in capsys.readouterr().err
