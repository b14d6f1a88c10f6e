"""A sweep's result (or a policy's trouble) as the policy's Kubernetes status.

The status stays small: counts, never lists of uploads. The ``Ready`` condition follows the
Kubernetes API conventions: reason in CamelCase, message, lastTransitionTime that only moves
when the status value changes, and observedGeneration.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from mpu_janitor.sweep import SweepResult

READY = "Ready"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(
    previous: Mapping[str, Any] | None,
    *,
    ready: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The Ready condition; its transition time is kept while its status does not change."""
    status = "True" if ready else "False"
    old = next(
        (c for c in (previous or {}).get("conditions") or [] if c.get("type") == READY), None
    )
    moment = rfc3339(now or datetime.now(UTC))
    transition = (
        old.get("lastTransitionTime", moment) if old and old.get("status") == status else moment
    )
    condition: dict[str, Any] = {
        "type": READY,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def sweep_message(result: SweepResult) -> str:
    summary = result.summary()
    mode = "dry run: " if result.dry_run else ""
    # LILT has no parts listing: its sizes are what uploaders declared at initiation.
    declared = " (declared by the uploader, not measured)" if result.store == "LILT" else ""
    text = (
        f"{mode}{summary['scanned']} scanned, {summary['eligible']} eligible, "
        f"{summary['aborted']} aborted, {summary['freedBytes']} bytes freed{declared}, "
        f"{summary['skippedActive']} active, {summary['alreadyGone']} already gone, "
        f"{summary['failed']} failed"
    )
    if result.issues:
        first = result.issues[0]
        where = f" in {first.container}" if first.container else ""
        more = sum(result.errors_by_reason.values()) - 1
        text += f"; {first.reason}{where}: {first.message}"
        if more > 0:
            text += f" (and {more} more)"
    return text


def last_sweep(result: SweepResult) -> dict[str, Any]:
    summary = result.summary()
    keys = (
        "startTime",
        "completionTime",
        "scanned",
        "eligible",
        "eligibleBytes",
        "aborted",
        "skippedActive",
        "alreadyGone",
        "replaced",
        "protected",
        "deferred",
        "failed",
        "freedBytes",
        "remainingBytes",
    )
    return {key: summary[key] for key in keys}


def sweep_status(
    previous: Mapping[str, Any] | None,
    result: SweepResult,
    *,
    generation: int | None,
    next_sweep: datetime | None,
) -> dict[str, Any]:
    """The status patch after a sweep (totals accumulate across sweeps)."""
    totals = dict((previous or {}).get("totals") or {})
    aborted = int(totals.get("abortedUploads", 0)) + result.total("aborted")
    freed = int(totals.get("freedBytes", 0)) + result.freed_bytes
    return {
        "observedGeneration": generation,
        "conditions": [
            ready_condition(
                previous,
                ready=result.ok,
                reason=result.reason,
                message=sweep_message(result),
                generation=generation,
            )
        ],
        "lastSweep": last_sweep(result),
        "totals": {"abortedUploads": aborted, "freedBytes": freed},
        "nextSweepTime": rfc3339(next_sweep) if next_sweep else None,
    }


def problem_status(
    previous: Mapping[str, Any] | None,
    *,
    reason: str,
    message: str,
    generation: int | None,
    next_sweep: datetime | None = None,
) -> dict[str, Any]:
    """The status patch for a policy that could not sweep (InvalidSpec, CredentialsNotFound,
    Suspended ...); lastSweep and totals are left as they were."""
    return {
        "observedGeneration": generation,
        "conditions": [
            ready_condition(
                previous, ready=False, reason=reason, message=message, generation=generation
            )
        ],
        "nextSweepTime": rfc3339(next_sweep) if next_sweep else None,
    }
