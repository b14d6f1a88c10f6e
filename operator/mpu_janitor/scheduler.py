"""The operator's own sweep scheduler over the policies Kopf shows it.

Kopf only feeds this scheduler (policy seen, policy changed, policy deleted); no per-object
timer or daemon runs, so Kopf puts no finalizer on policies and deleting a policy or its
namespace never hangs when the operator is down or uninstalled. Sweeps run in a bounded
thread pool, so one slow store never delays another policy or the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mpu_janitor.credentials import CredentialsNotFound, load_credentials
from mpu_janitor.kube import KubeClient, KubeError, NotFound
from mpu_janitor.metrics import MetricsState
from mpu_janitor.policy import DEFAULT_LILT_INVENTORY_DIR, Policy, PolicyError, parse_spec
from mpu_janitor.status import problem_status, sweep_message, sweep_status
from mpu_janitor.stores import UnusableTarget, open_store
from mpu_janitor.stores.base import StoreCredentials
from mpu_janitor.sweep import NOTICE_REASONS, SweepResult, TargetLocks, run_sweep

log = logging.getLogger(__name__)

SWEEP_NOW_ANNOTATION = "mpu-janitor.dev/sweep-now"
STANDBY_RECHECK_SECONDS = 5.0  # a standby replica's look at the peering object
JITTER = 0.1  # +-10% of the interval, so policies created together drift apart
RETRY_AFTER_PROBLEM = timedelta(minutes=1)  # credentials missing: look again soon

# (body, type, reason, message): posts a Kubernetes Event about a policy.
PostEvent = Callable[[Mapping[str, Any], str, str, str], Awaitable[None]]
# Is this replica the one that sweeps (peering)? Asked before each sweep.
IsActive = Callable[[], Awaitable[bool]]


async def always_active() -> bool:
    return True


@dataclass
class PolicyEntry:
    namespace: str
    name: str
    body: dict[str, Any]
    generation: int | None = None
    policy: Policy | None = None
    error: PolicyError | None = None
    due: float | None = None  # monotonic time of the next sweep; None: not scheduled
    task: asyncio.Task[None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    status: dict[str, Any] = field(default_factory=dict)
    handled_sweep_now: str | None = None
    deleted: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def jittered(interval: timedelta) -> float:
    seconds = interval.total_seconds()
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


class Scheduler:
    def __init__(
        self,
        kube: KubeClient,
        metrics: MetricsState,
        post_event: PostEvent,
        *,
        max_parallel_sweeps: int = 8,
        is_active: IsActive = always_active,
        locks: TargetLocks | None = None,
        lilt_inventory_dir: str = DEFAULT_LILT_INVENTORY_DIR,
    ) -> None:
        self.lilt_inventory_dir = os.path.realpath(lilt_inventory_dir)
        self.kube = kube
        self.metrics = metrics
        self.post_event = post_event
        self.is_active = is_active
        self.locks = locks or TargetLocks()
        self.pool = ThreadPoolExecutor(max_workers=max_parallel_sweeps, thread_name_prefix="sweeps")
        self.entries: dict[tuple[str, str], PolicyEntry] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self.last_tick = time.monotonic()

    # -- feeding from Kopf ---------------------------------------------------------------------

    def upsert(self, body: Mapping[str, Any], *, initial: bool = False) -> None:
        """A policy was listed, created or changed."""
        metadata = body.get("metadata") or {}
        key = (str(metadata.get("namespace")), str(metadata.get("name")))
        entry = self.entries.get(key)
        fresh = entry is None
        if entry is None:
            entry = self.entries[key] = PolicyEntry(key[0], key[1], dict(body))
            entry.status = dict(body.get("status") or {})
            entry.handled_sweep_now = entry.status.get("handledSweepNow")
        entry.body = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
        generation = metadata.get("generation")
        if fresh or generation != entry.generation:
            entry.generation = generation if isinstance(generation, int) else None
            self._reparse(entry, resumed=fresh and initial)
        annotations = metadata.get("annotations") or {}
        request = annotations.get(SWEEP_NOW_ANNOTATION)
        policy = entry.policy
        if request and request != entry.handled_sweep_now and policy and not policy.suspend:
            log.info("sweep requested for %s/%s by annotation", *key)
            entry.handled_sweep_now = request
            entry.due = time.monotonic()
        self._wakeup.set()

    def remove(self, namespace: str, name: str) -> None:
        """A policy was deleted: stop its sweep between uploads and drop its metrics."""
        entry = self.entries.pop((namespace, name), None)
        if entry is not None:
            entry.deleted = True
            entry.cancel.set()
        self.metrics.forget((namespace, name))

    def _reparse(self, entry: PolicyEntry, *, resumed: bool) -> None:
        body = entry.body
        # A changed spec takes effect at once: stop the running sweep between uploads.
        if entry.task is not None and not entry.task.done():
            entry.cancel.set()
        try:
            policy = parse_spec(
                body.get("spec"),
                name=entry.name,
                namespace=entry.namespace,
                generation=entry.generation,
            )
            self._check_operator_limits(policy)
        except PolicyError as error:
            entry.policy, entry.error, entry.due = None, error, None
            log.warning("policy %s/%s is invalid: %s", entry.namespace, entry.name, error)
            self._report_problem(entry, "InvalidSpec", str(error))
            return
        entry.policy, entry.error = policy, None
        self.metrics.register_policy(policy)
        if policy.suspend:
            entry.due = None
            self._report_problem(entry, "Suspended", "sweeps are suspended (spec.suspend)")
            return
        entry.due = time.monotonic()
        if resumed:
            # An operator restart resumes the schedule it published instead of sweeping
            # every policy at once.
            upcoming = _parse_time(entry.status.get("nextSweepTime"))
            observed = entry.status.get("observedGeneration")
            if upcoming is not None and observed == entry.generation:
                wait = (upcoming - datetime.now(UTC)).total_seconds()
                entry.due = time.monotonic() + max(0.0, min(wait, jittered(policy.interval)))

    def _check_operator_limits(self, policy: Policy) -> None:
        """What a policy may ask of this operator: a LILT inventory only under the directory the
        operator was given, so no policy can make the operator rewrite any other file."""
        lilt = policy.store.lilt
        if lilt is not None:
            path = os.path.realpath(lilt.inventory_path)
            if os.path.commonpath([path, self.lilt_inventory_dir]) != self.lilt_inventory_dir:
                raise PolicyError(
                    "spec.store.lilt.inventoryPath",
                    f"{lilt.inventory_path!r} must be under {self.lilt_inventory_dir} "
                    "(the operator's --lilt-inventory-dir)",
                )

    # -- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="mpu-janitor-scheduler")

    async def stop(self) -> None:
        for entry in self.entries.values():
            entry.cancel.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        running = [e.task for e in self.entries.values() if e.task and not e.task.done()]
        if running:
            await asyncio.wait(running, timeout=30)
        if self._side_tasks:
            await asyncio.wait(self._side_tasks, timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            self.last_tick = time.monotonic()
            now = time.monotonic()
            due = [
                e
                for e in self.entries.values()
                if e.due is not None and e.due <= now and (e.task is None or e.task.done())
            ]
            standby = False
            if due:
                if await self.is_active():
                    for entry in due:
                        entry.due = None
                        entry.cancel = threading.Event()
                        entry.task = asyncio.create_task(
                            self._sweep(entry), name=f"sweep-{entry.namespace}-{entry.name}"
                        )
                else:
                    standby = True  # another replica sweeps; ask again in a while
            waits = [e.due - now for e in self.entries.values() if e.due is not None]
            timeout = STANDBY_RECHECK_SECONDS if standby else max(0.05, min([5.0, *waits]))
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)

    async def _sweep(self, entry: PolicyEntry) -> None:
        try:
            await self._sweep_once(entry)
        except Exception:  # one policy's trouble never stops the scheduler or the others
            log.exception("sweep of %s/%s failed unexpectedly", *entry.key)
            if entry.policy is not None and not entry.deleted:
                self._reschedule(entry, RETRY_AFTER_PROBLEM)
        finally:
            self._wakeup.set()

    async def _sweep_once(self, entry: PolicyEntry) -> None:
        policy = entry.policy
        if policy is None or policy.suspend:
            return
        try:
            credentials = await load_credentials(self.kube, policy)
        except CredentialsNotFound as error:
            self.metrics.count_error(policy.key, policy.store.type.value, error.reason)
            self._reschedule(entry, RETRY_AFTER_PROBLEM)
            await self._problem(entry, error.reason, str(error))
            return
        except KubeError as error:
            self._reschedule(entry, RETRY_AFTER_PROBLEM)
            log.warning("reading credentials of %s/%s failed: %s", *entry.key, error)
            return
        try:
            result = await self._run_sweep(entry, policy, credentials)
        except UnusableTarget as error:  # the store's client refused a value of the spec
            entry.policy, entry.due = None, None
            entry.error = PolicyError(error.field, error.message)
            await self._problem(entry, "InvalidSpec", str(error))
            return
        if entry.deleted:
            return
        if result.cancelled:
            # Suspended, changed or shutting down mid-sweep: keep the count of what was done;
            # the policy's condition is the new state's (a changed spec sweeps again at once).
            self.metrics.record_sweep(result)
            await self._after_cancel(entry, result)
            return
        self.metrics.record_sweep(result)
        next_due = self._reschedule(entry, policy.interval)
        await self._report_sweep(entry, result, next_due)

    async def _run_sweep(
        self, entry: PolicyEntry, policy: Policy, credentials: StoreCredentials | None
    ) -> SweepResult:
        loop = asyncio.get_running_loop()
        observer = self.metrics.request_observer(policy.key, policy.store.type.value)

        def blocking() -> SweepResult:
            store = open_store(policy.store, credentials, observer)
            try:
                return run_sweep(policy, store, cancel=entry.cancel, locks=self.locks)
            finally:
                store.close()

        return await loop.run_in_executor(self.pool, functools.partial(blocking))

    def _reschedule(self, entry: PolicyEntry, after: timedelta) -> datetime:
        delay = jittered(after)
        if entry.due is None:  # a sweep-now or spec change may have set an earlier time
            entry.due = time.monotonic() + delay
        return datetime.now(UTC) + timedelta(seconds=max(0.0, entry.due - time.monotonic()))

    # -- reporting ---------------------------------------------------------------------------------

    async def _report_sweep(
        self, entry: PolicyEntry, result: SweepResult, next_due: datetime
    ) -> None:
        status = sweep_status(
            entry.status, result, generation=entry.generation, next_sweep=next_due
        )
        status["handledSweepNow"] = entry.handled_sweep_now
        await self._patch_status(entry, status)
        kind = "Normal" if result.ok else "Warning"
        await self.post_event(entry.body, kind, result.reason, sweep_message(result))
        by_reason: dict[str, list[str]] = {}
        for issue in result.issues:
            by_reason.setdefault(issue.reason, []).append(issue.message)
        for reason, messages in by_reason.items():
            count = result.errors_by_reason.get(reason, len(messages))
            what = "upload(s) protected" if reason in NOTICE_REASONS else "failure(s)"
            await self.post_event(
                entry.body, "Warning", reason, f"{count} {what}, first: {messages[0]}"
            )

    async def _after_cancel(self, entry: PolicyEntry, result: SweepResult) -> None:
        totals = sweep_status(entry.status, result, generation=entry.generation, next_sweep=None)[
            "totals"
        ]
        entry.status["totals"] = totals
        await self._patch_status(entry, {"totals": totals})

    async def _problem(self, entry: PolicyEntry, reason: str, message: str) -> None:
        next_due = None
        if entry.due is not None:
            next_due = datetime.now(UTC) + timedelta(seconds=entry.due - time.monotonic())
        status = problem_status(
            entry.status,
            reason=reason,
            message=message,
            generation=entry.generation,
            next_sweep=next_due,
        )
        await self._patch_status(entry, status)
        await self.post_event(
            entry.body, "Warning" if reason != "Suspended" else "Normal", reason, message
        )

    def _report_problem(self, entry: PolicyEntry, reason: str, message: str) -> None:
        task = asyncio.get_running_loop().create_task(self._problem(entry, reason, message))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _patch_status(self, entry: PolicyEntry, status: dict[str, Any]) -> None:
        if entry.deleted:
            return
        try:
            await self.kube.patch_policy_status(entry.namespace, entry.name, status)
        except NotFound:
            log.info("policy %s/%s is gone; status not written", *entry.key)
            return
        except (TimeoutError, KubeError, OSError) as error:
            log.warning("could not patch the status of %s/%s: %s", *entry.key, error)
            return
        entry.status.update({k: v for k, v in status.items() if v is not None})


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
