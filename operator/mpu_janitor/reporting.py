"""Writing one policy's status: patches merge while one is in flight, and a failed patch is
retried (its content carried into the next), so nothing the operator learnt is lost to a
brief API outage. The writer keeps the policy's desired status (``mirror``): what the
scheduler computes the next status from, whether or not the last patch arrived yet."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

log = logging.getLogger(__name__)

RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # then every 30 s until it works


class StatusApi(Protocol):
    async def patch_policy_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> Any: ...


class Gone(Exception):
    """Raised by a StatusApi when the policy no longer exists (stop writing)."""


class StatusWriter:
    def __init__(
        self,
        api: StatusApi,
        namespace: str,
        name: str,
        mirror: Mapping[str, Any] | None = None,
        *,
        is_gone: type[BaseException] | tuple[type[BaseException], ...] = Gone,
    ) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self.mirror: dict[str, Any] = dict(mirror or {})
        self.pending: dict[str, Any] = {}
        self.is_gone = is_gone
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.retry_delays = RETRY_DELAYS

    @property
    def busy(self) -> bool:
        return bool(self.pending) or (self.task is not None and not self.task.done())

    def write(self, patch: Mapping[str, Any]) -> asyncio.Task[None] | None:
        """Merge a status patch (top-level keys; None removes one) and make sure it is sent.
        Returns the writer task when a new one had to be started."""
        if self.closed:
            return None
        for key, value in patch.items():
            if value is None:
                self.mirror.pop(key, None)
            else:
                self.mirror[key] = value
            self.pending[key] = value
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self._send(), name=f"status-{self.namespace}-{self.name}"
            )
            return self.task
        return None

    def adopt(self, status: Mapping[str, Any]) -> None:
        """Take a status written by someone else (a peer that swept before a failover)."""
        if not self.busy:
            self.mirror = dict(status)

    def close(self) -> None:
        self.closed = True
        self.pending.clear()

    async def _send(self) -> None:
        failures = 0
        while self.pending and not self.closed:
            sending = dict(self.pending)
            try:
                await self.api.patch_policy_status(self.namespace, self.name, sending)
            except asyncio.CancelledError:
                raise
            except self.is_gone:
                log.info("policy %s/%s is gone; status not written", self.namespace, self.name)
                self.close()
                return
            except Exception as error:  # any failure: keep it pending and try again
                delay = self.retry_delays[min(failures, len(self.retry_delays) - 1)]
                failures += 1
                log.warning(
                    "could not patch the status of %s/%s (%s); retrying in %.0fs",
                    self.namespace,
                    self.name,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            for key, value in sending.items():
                # Keep what was merged meanwhile; drop what was sent as it is.
                if key in self.pending and self.pending[key] == value:
                    del self.pending[key]
