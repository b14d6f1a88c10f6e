"""Per-namespace fairness: caps on how many sweeps of one namespace's policies run at once
(``--namespace-max-concurrent-sweeps``) and on the store requests a second all of them send
together (``--namespace-max-requests-per-second``), so one tenant's many policies can neither
take every sweep slot nor hammer a store the tenants share.

No Kopf, no Prometheus: the scheduler asks for a namespace's slot and wraps each sweep's
store, so every request the engine sends through its ``Pace`` (listing pages, parts listings,
aborts) also takes a token from the namespace's shared bucket.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from mpu_janitor.pacing import SharedRate
from mpu_janitor.stores.base import Pace, PartsSummary, Store, Upload, UploadPage, unpaced

T = TypeVar("T")


@dataclass(frozen=True)
class FairnessLimits:
    """0 means no cap (the operator-wide ``max_parallel_sweeps`` and each policy's own
    ``spec.limits.requestsPerSecond`` still apply)."""

    namespace_max_concurrent_sweeps: int = 0
    namespace_max_requests_per_second: float = 0.0

    def __post_init__(self) -> None:
        if self.namespace_max_concurrent_sweeps < 0:
            raise ValueError(
                "--namespace-max-concurrent-sweeps must be 0 (no cap) or more, not "
                f"{self.namespace_max_concurrent_sweeps}"
            )
        if self.namespace_max_requests_per_second < 0:
            raise ValueError(
                "--namespace-max-requests-per-second must be 0 (no cap) or more, not "
                f"{self.namespace_max_requests_per_second}"
            )


class NamespaceCaps:
    """The slots and shared request buckets of each namespace, made on first use."""

    def __init__(
        self,
        limits: FairnessLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float, threading.Event | None], None] | None = None,
    ) -> None:
        self.limits = limits or FairnessLimits()
        self._clock, self._sleep = clock, sleep
        self._guard = threading.Lock()
        self._slots: dict[str, threading.Semaphore] = {}
        self._rates: dict[str, SharedRate] = {}

    def acquire_slot(self, namespace: str, cancel: threading.Event) -> bool:
        """Wait for one of the namespace's sweep slots (True), or for ``cancel`` (False).
        Call :meth:`release_slot` once the sweep ends."""
        slots = self._slot(namespace)
        if slots is None:
            return True
        while not slots.acquire(timeout=0.2):
            if cancel.is_set():
                return False
        return True

    def release_slot(self, namespace: str) -> None:
        slots = self._slot(namespace)
        if slots is not None:
            slots.release()

    def paced(self, store: Store, namespace: str, cancel: threading.Event) -> Store:
        """``store`` whose every request also waits for the namespace's shared rate."""
        limit = self.limits.namespace_max_requests_per_second
        if limit <= 0:
            return store
        with self._guard:
            rate = self._rates.get(namespace)
            if rate is None:
                rate = self._rates[namespace] = SharedRate(
                    limit, clock=self._clock, sleep=self._sleep
                )
        return NamespacePacedStore(store, rate, cancel)

    def _slot(self, namespace: str) -> threading.Semaphore | None:
        cap = self.limits.namespace_max_concurrent_sweeps
        if cap <= 0:
            return None
        with self._guard:
            slots = self._slots.get(namespace)
            if slots is None:
                slots = self._slots[namespace] = threading.Semaphore(cap)
            return slots


class NamespacePacedStore:
    """A store whose requests take a token from a shared bucket first. The engine's own
    ``Pace`` still paces, retries and cancels each request; a retried request takes another
    token (it is another request to the store)."""

    def __init__(self, store: Store, rate: SharedRate, cancel: threading.Event) -> None:
        self._store, self._rate, self._cancel = store, rate, cancel

    @property
    def kind(self) -> str:
        return self._store.kind

    @property
    def target_id(self) -> str:
        return self._store.target_id

    def containers(self) -> list[str]:
        self._rate.acquire(self._cancel)
        return self._store.containers()

    def list_uploads(
        self, container: str, prefixes: Sequence[str], pace: Pace = unpaced
    ) -> Iterator[UploadPage]:
        return self._store.list_uploads(container, prefixes, self._wrap(pace))

    def measure(self, upload: Upload, pace: Pace = unpaced) -> PartsSummary:
        return self._store.measure(upload, self._wrap(pace))

    def abort(self, upload: Upload) -> None:
        self._rate.acquire(self._cancel)
        self._store.abort(upload)

    def forget(self, upload: Upload) -> None:
        self._store.forget(upload)

    def close(self) -> None:
        self._store.close()

    def __getattr__(self, name: str) -> Any:
        """What else the store can do, paced the same way: ``proven_gone`` (one listing proving
        many aborts gone) only where the store has it, so a store without stays without."""
        if name == "proven_gone":
            inner = getattr(self._store, name)  # AttributeError: the store has none

            def proven_gone(container: str, uploads: Any, pace: Pace = unpaced) -> Any:
                return inner(container, uploads, self._wrap(pace))

            return proven_gone
        raise AttributeError(name)

    def _wrap(self, pace: Pace) -> Pace:
        rate, cancel = self._rate, self._cancel

        class Shared:
            def __call__(self, request: Callable[[], T], *, finish: bool = False) -> T:
                def one() -> T:
                    # A request that must finish during a stop waits for its token anyway.
                    rate.acquire(None if finish else cancel)
                    return request()

                return pace(one, finish=finish)

        return Shared()
