"""The operator's own sweep scheduler over the policies Kopf shows it.

Kopf only feeds this scheduler (policy seen, policy changed, policy deleted); no per-object
timer or daemon runs, so Kopf puts no finalizer on policies and deleting a policy or its
namespace never hangs when the operator is down or uninstalled. Sweeps run in a bounded
thread pool, so one slow store never delays another policy or the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mpu_janitor.credentials import CredentialsNotFound, load_credentials
from mpu_janitor.fairness import NamespaceCaps
from mpu_janitor.kube import KubeClient, NotFound
from mpu_janitor.metrics import MetricsState
from mpu_janitor.pacing import Cancelled
from mpu_janitor.policy import DEFAULT_LILT_INVENTORY_DIR, Policy, PolicyError, parse_spec
from mpu_janitor.reporting import StatusWriter
from mpu_janitor.schedule import Schedule
from mpu_janitor.status import (
    SUSPENDED,
    SWEEPING,
    find_condition,
    problem_status,
    progress_status,
    sweep_message,
    sweep_status,
)
from mpu_janitor.stores import open_store
from mpu_janitor.stores.base import Store, StoreCredentials, StoreError
from mpu_janitor.sweep import NOTICE_REASONS, SweepResult, TargetLocks, run_sweep
from mpu_janitor.tenancy import ERROR_TEXT_LIMIT, Tenancy, scrub

log = logging.getLogger(__name__)

SWEEP_NOW_ANNOTATION = "mpu-janitor.dev/sweep-now"
STANDBY_RECHECK_SECONDS = 5.0  # a standby replica's look at the peering object
# A replica that finds itself the active one waits this long before its first sweep: the one it
# replaces (outranked, or stopping) sees that within a recheck and stops between uploads.
HANDOVER_SECONDS = 2 * STANDBY_RECHECK_SECONDS
JITTER = 0.1  # +-10% of the interval, so policies created together drift apart
RETRY_AFTER_PROBLEM = timedelta(minutes=1)  # credentials missing: look again soon
PROGRESS_SECONDS = 30.0  # a running sweep's counts reach the status at most this often
# What the scheduler acts on in a policy's metadata (with its spec): a new version that
# changes none of these (its status only) is no news to the replica that wrote that status.
NEWS_FIELDS = ("uid", "generation", "labels", "annotations", "deletionTimestamp")
THREADS = 256  # sweep threads; at most max_parallel_sweeps of them hold a slot (sweep)

# (body, type, reason, message): posts a Kubernetes Event about a policy.
PostEvent = Callable[[Mapping[str, Any], str, str, str], Awaitable[None]]
# Is this replica the one that sweeps (peering)? Asked before each sweep.
IsActive = Callable[[], Awaitable[bool]]


async def always_active() -> bool:
    return True


class SweepFailed(Exception):
    """A sweep could not run: ``reason`` is the Ready reason it earns."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class PolicyEntry:
    namespace: str
    name: str
    body: dict[str, Any]
    writer: StatusWriter
    generation: int | None = None
    policy: Policy | None = None
    error: PolicyError | None = None
    schedule: Schedule = field(default_factory=Schedule)  # when the next sweep is due
    task: asyncio.Task[None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    handled_sweep_now: str | None = None  # the newest request accepted (done, running or due)
    request_for_next: str | None = None  # a request the next sweep answers
    deleted: bool = False
    last_progress: float = 0.0
    seen: float = 0.0  # monotonic time of the last event about it (upsert)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def due(self) -> float | None:
        """Monotonic time of the next sweep; None: not scheduled."""
        return self.schedule.due

    @property
    def status(self) -> dict[str, Any]:
        """The status as the operator last decided it (written or still being written)."""
        return self.writer.mirror

    @property
    def store_label(self) -> str:
        if self.policy is not None:
            return self.policy.store.type.value
        store = (self.body.get("spec") or {}).get("store")
        kind = store.get("type") if isinstance(store, Mapping) else None
        return str(kind) if isinstance(kind, str) and kind else "Unknown"

    @property
    def sweeping(self) -> bool:
        return self.task is not None and not self.task.done()


def jittered(interval: timedelta) -> float:
    seconds = interval.total_seconds()
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


class SlotLocks(TargetLocks):
    """The target locks of one sweep: while it waits for a target another sweep holds, it
    gives its sweep slot back, so policies on other targets never wait behind it."""

    def __init__(
        self,
        shared: TargetLocks,
        slots: threading.Semaphore,
        parked: Callable[[int], None] = lambda change: None,
    ) -> None:
        super().__init__()
        self._guard, self._locks = shared._guard, shared._locks
        self.slots = slots
        self.parked = parked  # +1 while waiting for a target, -1 after

    @contextlib.contextmanager
    def hold(self, key: str, cancel: threading.Event) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(blocking=False):
            self.slots.release()
            self.parked(1)
            try:
                while not lock.acquire(timeout=0.2):
                    if cancel.is_set():
                        raise Cancelled()
            finally:
                self.parked(-1)
                # The caller gives the slot back when the sweep ends, in any case.
                self.slots.acquire()
        try:
            yield
        finally:
            lock.release()


class Scheduler:
    def __init__(
        self,
        kube: KubeClient,
        metrics: MetricsState,
        post_event: PostEvent,
        *,
        max_parallel_sweeps: int = 8,
        is_active: IsActive = always_active,
        peered: bool = False,  # replicas take turns (peering): hand over between them
        locks: TargetLocks | None = None,
        lilt_inventory_dir: str = DEFAULT_LILT_INVENTORY_DIR,
        progress_seconds: float | None = None,
        tenancy: Tenancy | None = None,
        fairness: NamespaceCaps | None = None,
    ) -> None:
        self.tenancy = tenancy or Tenancy()
        self.fairness = fairness or NamespaceCaps()  # per-namespace sweep and request caps
        self.progress_seconds = PROGRESS_SECONDS if progress_seconds is None else progress_seconds
        self.lilt_inventory_dir = os.path.realpath(lilt_inventory_dir)
        self.kube = kube
        self.metrics = metrics
        self.post_event = post_event
        self.is_active = is_active
        self.active = False  # did the last look at the peering say we sweep?
        self.peered = peered
        self._active_since: float | None = None  # first look of the current active spell
        self._looked = 0.0
        self.locks = locks or TargetLocks()
        self.slots = threading.Semaphore(max_parallel_sweeps)
        # Sweeps started at once: those in a slot, as many ready to take one, and those parked
        # on a busy target. The other due sweeps wait here, holding no thread.
        self.max_started = 2 * max_parallel_sweeps
        self._parked = 0  # sweeps waiting for a target another sweep holds
        self._parked_guard = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="sweeps")
        self.entries: dict[tuple[str, str], PolicyEntry] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self.last_tick = time.monotonic()

    # -- feeding from Kopf ---------------------------------------------------------------------

    def upsert(self, body: Mapping[str, Any], *, initial: bool = False) -> None:
        """A policy was listed, created or changed."""
        metadata = body.get("metadata") or {}
        key = (str(metadata.get("namespace")), str(metadata.get("name")))
        entry = self.entries.get(key)
        fresh = entry is None
        seen_status = dict(body.get("status") or {})
        if entry is None:
            writer = StatusWriter(self.kube, key[0], key[1], seen_status, is_gone=NotFound)
            entry = self.entries[key] = PolicyEntry(key[0], key[1], dict(body), writer)
            entry.handled_sweep_now = seen_status.get("handledSweepNow")
        elif not self.active and not entry.sweeping:
            # A standby replica follows what the active one writes, so after a failover it
            # continues from the newest totals and handled requests, not from its start.
            entry.writer.adopt(seen_status)
            handled = seen_status.get("handledSweepNow")
            if handled is not None and entry.request_for_next is None:
                entry.handled_sweep_now = handled
        entry.seen = time.monotonic()
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
            entry.handled_sweep_now = entry.request_for_next = request
            entry.schedule.request_now(time.monotonic())
        self._wakeup.set()

    def is_news(self, body: Mapping[str, Any]) -> bool:
        """Does a policy's new version differ from the one we hold in anything but its status
        (spec, generation, labels, annotations, deletion)? Unknown policies are news."""
        metadata = body.get("metadata") or {}
        entry = self.entries.get((str(metadata.get("namespace")), str(metadata.get("name"))))
        if entry is None:
            return True
        held = entry.body.get("metadata") or {}
        return any(metadata.get(key) != held.get(key) for key in NEWS_FIELDS) or body.get(
            "spec"
        ) != entry.body.get("spec")

    def remove(self, namespace: str, name: str) -> None:
        """A policy was deleted: stop its sweep between uploads and drop its metrics."""
        entry = self.entries.pop((namespace, name), None)
        if entry is not None:
            entry.deleted = True
            entry.cancel.set()
            entry.writer.close()
        self.metrics.forget((namespace, name))

    def prune(self, present: set[tuple[str, str]], listed_since: float) -> list[tuple[str, str]]:
        """Forget the policies a fresh listing (asked for at monotonic ``listed_since``) no
        longer shows: deleted, or relabelled out of this shard, while the watch was away (a
        watch that starts over lists what exists, and says nothing of what went). A policy
        seen since the listing was asked for is kept: the listing may predate it."""
        gone = [
            key
            for key, entry in self.entries.items()
            if key not in present and entry.seen < listed_since
        ]
        for key in gone:
            log.info("policy %s/%s is no longer listed: forgetting it", *key)
            self.remove(*key)
        return gone

    def _reparse(self, entry: PolicyEntry, *, resumed: bool) -> None:
        body = entry.body
        # A changed spec takes effect at once: stop the running sweep between uploads.
        if entry.sweeping:
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
            entry.policy, entry.error = None, error
            entry.schedule.park()
            log.warning("policy %s/%s is invalid: %s", entry.namespace, entry.name, error)
            self.metrics.register_invalid(entry.key, entry.store_label)
            self.metrics.count_error(entry.key, entry.store_label, "InvalidSpec")
            self._set_ready(entry, False, "InvalidSpec", str(error))
            return
        entry.policy, entry.error = policy, None
        self.metrics.register_policy(policy)
        if policy.suspend:
            entry.schedule.park()
            self._set_ready(
                entry, True, SUSPENDED, "sweeps are suspended (spec.suspend): nothing is aborted"
            )
            return
        entry.schedule.request_now(time.monotonic())
        observed = entry.status.get("observedGeneration")
        if resumed and observed == entry.generation:
            # An operator restart resumes the schedule it published instead of sweeping
            # every policy at once, and keeps the condition it published.
            ready = find_condition(entry.status) or {}
            self.metrics.set_ready(
                entry.key,
                entry.store_label,
                str(ready.get("status", "Unknown")),
                str(ready.get("reason", SWEEPING)),
            )
            upcoming = _parse_time(entry.status.get("nextSweepTime"))
            if upcoming is not None:
                wait = (upcoming - datetime.now(UTC)).total_seconds()
                entry.schedule.resume(time.monotonic(), min(wait, jittered(policy.interval)))
            return
        self._set_ready(
            entry, None, SWEEPING, f"generation {entry.generation} is about to be swept"
        )

    def _check_operator_limits(self, policy: Policy) -> None:
        """What a policy may ask of this operator: endpoints the installer allows (never a
        metadata address unless allowed), and a LILT inventory only under its own namespace's
        directory of the one the operator was given, so no policy can make the operator rewrite
        another tenant's inventory or any other file."""
        refused = self.tenancy.check_endpoints(policy)
        if refused is not None:
            raise PolicyError(*refused)
        lilt = policy.store.lilt
        if lilt is not None:
            own = os.path.join(self.lilt_inventory_dir, policy.namespace)
            path = os.path.realpath(lilt.inventory_path)
            if path == own or os.path.commonpath([path, own]) != own:
                raise PolicyError(
                    "spec.store.lilt.inventoryPath",
                    f"{lilt.inventory_path!r} must be under {own}/ (the operator's "
                    "--lilt-inventory-dir, then the policy's namespace; symlinks resolved)",
                )

    # -- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="mpu-janitor-scheduler")

    async def stop(self) -> None:
        # The flag, not only the cancellation, ends the loop: on Python 3.11 asyncio.wait_for
        # swallows a cancellation that arrives as its inner wait completes (a sweep setting
        # the wakeup just as we stop), and the loop would go on forever.
        self._stopping = True
        for entry in self.entries.values():
            entry.cancel.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            self._wakeup.set()
            await asyncio.wait({self._loop_task}, timeout=5)  # the loop waits 5 s at most
        running = [e.task for e in self.entries.values() if e.task and not e.task.done()]
        if running:
            await asyncio.wait(running, timeout=30)
        if self._side_tasks:
            await asyncio.wait(self._side_tasks, timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                timeout = await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop outlives anything: a dropped connection, a bug
                log.exception("scheduler tick failed; trying again")
                timeout = STANDBY_RECHECK_SECONDS
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)

    async def _tick(self) -> float:
        if self._stopping:
            return 0.05  # no new sweep once stopping
        self.last_tick = time.monotonic()
        now = time.monotonic()
        due = [e for e in self.entries.values() if e.schedule.is_due(now) and not e.sweeping]
        running = [e for e in self.entries.values() if e.sweeping]
        standby = False
        # New, changed and requested sweeps first, then the most overdue; at most max_started
        # at once (the others wait here, holding no thread).
        due.sort(key=lambda e: (not e.schedule.urgent, e.schedule.at or 0.0))
        due, capped = self._within_namespace_caps(due, running)
        started = len(running) - self._parked
        held = due[max(0, self.max_started - started) :] + capped
        del due[len(due) - len(held) + len(capped) :]
        if due or (running and now - self._looked >= STANDBY_RECHECK_SECONDS):
            if await self._look() is False:
                self._yield(running)
            if due and self.active:
                for entry in due:
                    entry.schedule.start()
                    entry.cancel = threading.Event()
                    entry.task = asyncio.create_task(
                        self._sweep(entry), name=f"sweep-{entry.namespace}-{entry.name}"
                    )
            elif due:
                standby = True  # another replica sweeps; ask again in a while
        if held:  # the end of a sweep (or a parked one) wakes the loop
            return STANDBY_RECHECK_SECONDS
        waits = [e.due - now for e in self.entries.values() if e.due is not None and not e.sweeping]
        # At least one look a recheck while sweeping: a peer that outranks us stops our sweeps.
        return (
            STANDBY_RECHECK_SECONDS
            if standby
            else max(0.05, min([STANDBY_RECHECK_SECONDS, *waits]))
        )

    async def _look(self) -> bool | None:
        """Ask the peering whether this replica sweeps: True, False (a peer outranks us) or
        None (cannot tell). ``self.active`` says whether to start sweeps: only after a handover
        period of being the active replica."""
        self._looked = now = time.monotonic()
        try:
            answer = await self.is_active()
        except Exception as error:
            log.warning("cannot tell whether this replica sweeps (%s); not sweeping", error)
            self.active = False
            return None
        if not answer:
            self._active_since = None
        elif self._active_since is None:
            self._active_since = now
        handover = HANDOVER_SECONDS if self.peered else 0.0
        self.active = answer and now - (self._active_since or now) >= handover
        return answer

    def _yield(self, running: list[PolicyEntry]) -> None:
        """A peer outranks us: stop our sweeps between uploads, so only one replica sweeps;
        they stay due for when this replica is the active one again."""
        for entry in running:
            if not entry.cancel.is_set():
                log.info("a peer outranks this replica: stopping the sweep of %s/%s", *entry.key)
                entry.cancel.set()
                entry.schedule.request_now(time.monotonic())

    def _within_namespace_caps(
        self, due: list[PolicyEntry], running: list[PolicyEntry]
    ) -> tuple[list[PolicyEntry], list[PolicyEntry]]:
        """``due`` split into the sweeps their namespace's cap lets start now, and those that
        wait here for one of their namespace's sweeps to end (holding no thread or slot, so
        another namespace's policy is not queued behind them)."""
        cap = self.fairness.limits.namespace_max_concurrent_sweeps
        if cap <= 0:
            return due, []
        busy = Counter(entry.namespace for entry in running)
        now_due, capped = [], []
        for entry in due:
            if busy[entry.namespace] < cap:
                busy[entry.namespace] += 1
                now_due.append(entry)
            else:
                capped.append(entry)
        return now_due, capped

    def _park(self, change: int, loop: asyncio.AbstractEventLoop) -> None:
        """A sweep starts (+1) or stops (-1) waiting for a busy target: while it waits, another
        due sweep may start (any thread)."""
        with self._parked_guard:
            self._parked += change
        if change > 0:
            loop.call_soon_threadsafe(self._wakeup.set)

    async def _sweep(self, entry: PolicyEntry) -> None:
        policy = entry.policy
        request, entry.request_for_next = entry.request_for_next, None
        try:
            if policy is not None and not policy.suspend:
                await self._sweep_once(entry, policy, request)
        except Exception as error:  # one policy's trouble never stops the scheduler or the others
            log.exception("sweep of %s/%s failed unexpectedly", *entry.key)
            if policy is not None:
                self._failed(
                    entry, policy, request, "InternalError", f"{type(error).__name__}: {error}"
                )
        finally:
            entry.schedule.end()
            self._wakeup.set()

    async def _sweep_once(self, entry: PolicyEntry, policy: Policy, request: str | None) -> None:
        try:
            credentials = await load_credentials(
                self.kube,
                policy,
                ambient=self.tenancy.ambient_allowed(policy.namespace),
                sts_endpoint=self.tenancy.sts_endpoint,
            )
        except CredentialsNotFound as error:
            self._failed(entry, policy, request, error.reason, str(error), announce=False)
            return
        except Exception as error:
            message = f"reading the Secret failed: {error}"
            self._failed(entry, policy, request, "CredentialsUnreadable", message, announce=False)
            return
        base_totals = dict(entry.status.get("totals") or {})
        try:
            result = await self._run_sweep(entry, policy, credentials, base_totals)
        except SweepFailed as failed:
            self._failed(entry, policy, request, failed.reason, str(failed), announce=False)
            return
        if entry.deleted:
            return
        # Store error texts reach status and Events short and without credential-like text.
        result.issues[:] = [
            dataclasses.replace(issue, message=scrub(issue.message, ERROR_TEXT_LIMIT))
            for issue in result.issues
        ]
        self.metrics.record_sweep(result)
        handled = {"handledSweepNow": request} if request is not None else {}
        if result.cancelled or entry.policy is not policy:
            # Suspended, changed or shutting down mid-sweep (or just as it ended): keep the
            # count of what was done; the condition is the new state's, never this sweep's.
            self._write(entry, {**progress_status(base_totals, result), **handled})
            return
        next_due = self._reschedule(entry, policy.interval)
        previous = find_condition(entry.status) or {}
        status = sweep_status(
            entry.status,
            result,
            generation=entry.generation,
            next_sweep=next_due,
            base_totals=base_totals,
            note=policy.store_expiry_note(),
        )
        self._write(entry, {**status, **handled})
        self.metrics.set_ready(
            entry.key, entry.store_label, "True" if result.ok else "False", result.reason
        )
        changed = (previous.get("status"), previous.get("reason")) != (
            "True" if result.ok else "False",
            result.reason,
        )
        await self._announce_sweep(entry, result, changed)

    async def _run_sweep(
        self,
        entry: PolicyEntry,
        policy: Policy,
        credentials: StoreCredentials | None,
        base_totals: Mapping[str, Any],
    ) -> SweepResult:
        loop = asyncio.get_running_loop()
        observer = self.metrics.request_observer(policy.key, policy.store.type.value)
        cancel = entry.cancel
        entry.last_progress = time.monotonic()

        guard = threading.Lock()

        def progress(result: SweepResult) -> None:
            # Called by the engine's threads after every upload; one checkpoint an interval.
            with guard:
                now = time.monotonic()
                if result.finished is not None or now - entry.last_progress < self.progress_seconds:
                    return
                entry.last_progress = now
                try:
                    self.metrics.cover(policy.key, policy.store.type.value, list(result.buckets))
                    checkpoint = progress_status(base_totals, result)
                except RuntimeError:  # a bucket was added while we read: next time
                    return
                loop.call_soon_threadsafe(self._checkpoint, entry, policy, checkpoint)

        def blocking() -> SweepResult:
            # The namespace's slot first: sweeps queued behind their own namespace's cap hold
            # none of the operator-wide slots, which other namespaces' policies then get.
            if not self.fairness.acquire_slot(policy.namespace, cancel):
                return _cancelled(policy)
            try:
                return in_slot()
            finally:
                self.fairness.release_slot(policy.namespace)

        def in_slot() -> SweepResult:
            while not self.slots.acquire(timeout=0.2):  # wait for a sweep slot
                if cancel.is_set():
                    return _cancelled(policy)
            try:
                store = self.fairness.paced(
                    _open(policy, credentials, observer), policy.namespace, cancel
                )
                try:
                    locks = SlotLocks(
                        self.locks, self.slots, lambda change: self._park(change, loop)
                    )
                    # Aborts are proven (and so reach a checkpoint) within half a checkpoint
                    # interval: a killed operator loses at most about one interval of them.
                    return run_sweep(
                        policy,
                        store,
                        cancel=cancel,
                        progress=progress,
                        locks=locks,
                        verify_within=self.progress_seconds / 2,
                    )
                finally:
                    store.close()
            finally:
                self.slots.release()

        return await loop.run_in_executor(self.pool, functools.partial(blocking))

    def _checkpoint(self, entry: PolicyEntry, policy: Policy, checkpoint: dict[str, Any]) -> None:
        if not entry.deleted and entry.policy is policy:  # FIFO: always before the result
            self._write(entry, checkpoint)

    def _reschedule(self, entry: PolicyEntry, after: timedelta) -> datetime:
        now = time.monotonic()
        due = entry.schedule.finish(now, jittered(after))  # sooner if asked for meanwhile
        return datetime.now(UTC) + timedelta(seconds=max(0.0, due - now))

    # -- reporting ---------------------------------------------------------------------------------

    def _write(self, entry: PolicyEntry, patch: Mapping[str, Any]) -> None:
        if entry.deleted:
            return
        task = entry.writer.write(_scrubbed(patch))
        if task is not None:
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        async def run() -> None:
            await coroutine

        task = asyncio.get_running_loop().create_task(run())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _event(self, entry: PolicyEntry, kind: str, reason: str, message: str) -> None:
        if entry.deleted:
            return
        try:
            await self.post_event(entry.body, kind, reason, scrub(message))
        except Exception as error:  # an Event is news, not state: never worth a crash
            log.warning("could not post a %s event for %s/%s: %s", reason, *entry.key, error)

    def _set_ready(
        self,
        entry: PolicyEntry,
        ready: bool | None,
        reason: str,
        message: str,
        *,
        announce_change: bool = True,
    ) -> None:
        """A condition set outside a sweep's result: status now, an Event if Ready changed."""
        previous = find_condition(entry.status) or {}
        next_due = None
        if entry.due is not None:
            next_due = datetime.now(UTC) + timedelta(seconds=entry.due - time.monotonic())
        status = problem_status(
            entry.status,
            reason=reason,
            message=message,
            generation=entry.generation,
            next_sweep=next_due,
            ready=ready,
        )
        self._write(entry, status)
        value = str(status["conditions"][0]["status"])
        self.metrics.set_ready(entry.key, entry.store_label, value, reason)
        if (previous.get("status"), previous.get("reason"), previous.get("message")) != (
            value,
            reason,
            message[:1024],
        ) and (announce_change and reason != SWEEPING):
            kind = "Warning" if ready is False else "Normal"
            self._spawn(self._event(entry, kind, reason, message))

    def _failed(
        self,
        entry: PolicyEntry,
        policy: Policy,
        request: str | None,
        reason: str,
        message: str,
        *,
        announce: bool = True,
    ) -> None:
        """A sweep that could not run or broke off: Ready=False, a metric, a Warning (for a
        problem before the sweep, only when it is news: a missing Secret is not re-announced
        at every retry), and another try later."""
        if entry.deleted:
            return
        self.metrics.count_error(policy.key, policy.store.type.value, reason)
        if entry.policy is not policy:
            if request is not None:
                self._write(entry, {"handledSweepNow": request})
            return  # changed meanwhile: the new spec's state stands
        self._reschedule(entry, RETRY_AFTER_PROBLEM)
        if request is not None:
            self._write(entry, {"handledSweepNow": request})
        if announce:
            self._spawn(self._event(entry, "Warning", reason, message))
        self._set_ready(entry, False, reason, message, announce_change=not announce)

    async def _announce_sweep(self, entry: PolicyEntry, result: SweepResult, changed: bool) -> None:
        """Events on change, never a heartbeat: a sweep that aborted something or changed
        Ready gets one; a failed sweep gets a Warning; failures by reason follow."""
        if result.ok:
            if changed or result.total("aborted"):
                await self._event(entry, "Normal", result.reason, sweep_message(result))
        else:
            await self._event(entry, "Warning", result.reason, sweep_message(result))
        by_reason: dict[str, list[str]] = {}
        for issue in result.issues:
            by_reason.setdefault(issue.reason, []).append(issue.message)
        for reason, messages in by_reason.items():
            count = result.errors_by_reason.get(reason, len(messages))
            what = "upload(s) protected" if reason in NOTICE_REASONS else "failure(s)"
            await self._event(entry, "Warning", reason, f"{count} {what}, first: {messages[0]}")


def _open(
    policy: Policy, credentials: StoreCredentials | None, observer: Callable[[str, str], None]
) -> Store:
    """The policy's store, or SweepFailed naming why it cannot be opened."""
    try:
        return open_store(policy.store, credentials, observer)
    except StoreError as error:
        text = scrub(str(error), ERROR_TEXT_LIMIT)
        raise SweepFailed(error.reason, f"the store cannot be opened: {text}") from error
    except ValueError as error:  # botocore's InvalidRegionError and friends: a bad spec
        raise SweepFailed(
            "InvalidSpec", f"spec.store: the store cannot be opened: {error}"
        ) from error


def _scrubbed(value: Any) -> Any:
    """A status patch with every string scrubbed of credential-like text."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item) for item in value]
    return value


def _cancelled(policy: Policy) -> SweepResult:
    now = datetime.now(UTC)
    return SweepResult(
        policy.namespace,
        policy.name,
        policy.store.type.value,
        policy.dry_run,
        now,
        now,
        cancelled=True,
    )


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
