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
STALLED = "Stalled"

# Every reason the operator can set on Ready (documented in the CRD and the chart README).
# Sweep outcomes: SweepSucceeded, PartialFailure, Throttled, or the one reason of a sweep that
# listed nothing (AccessDenied, StoreUnreachable, BucketNotFound, InvalidSpec, ...).
# Before a sweep: Sweeping (Unknown: first sight or a new spec), Suspended (True),
# InvalidSpec, CredentialsNotFound, CredentialsUnreadable, InternalError (False).
SWEEPING = "Sweeping"
SUSPENDED = "Suspended"
# Only a change of spec or Secret can help these: Stalled=True, so kstatus readers (Flux,
# Argo CD, kpt) report a failure instead of "in progress" forever.
STALLED_REASONS = frozenset({"InvalidSpec", "CredentialsNotFound", "AccessDenied"})


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(
    previous: Mapping[str, Any] | None,
    *,
    ready: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime | None = None,
    kind: str = READY,
) -> dict[str, Any]:
    """The Ready condition (``ready`` None: Unknown); its transition time is kept while its
    status does not change."""
    status = "Unknown" if ready is None else "True" if ready else "False"
    old = find_condition(previous, kind)
    moment = rfc3339(now or datetime.now(UTC))
    transition = (
        old.get("lastTransitionTime", moment) if old and old.get("status") == status else moment
    )
    condition: dict[str, Any] = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:1024],
        "lastTransitionTime": transition,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def find_condition(status: Mapping[str, Any] | None, kind: str = READY) -> dict[str, Any] | None:
    for condition in (status or {}).get("conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return dict(condition)
    return None


def conditions(
    previous: Mapping[str, Any] | None,
    *,
    ready: bool | None,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Ready, plus Stalled=True when only a change of spec or Secret can help."""
    out = [
        ready_condition(
            previous, ready=ready, reason=reason, message=message, generation=generation
        )
    ]
    if ready is False and reason in STALLED_REASONS:
        out.append(
            ready_condition(
                previous,
                ready=True,
                reason=reason,
                message=message,
                generation=generation,
                kind=STALLED,
            )
        )
    return out


def quantity(count: int) -> str:
    """Bytes as a person reads them in ``kubectl get`` (a Kubernetes binary-SI quantity):
    at most three significant digits, ``0``, ``512``, ``1.5Ki``, ``15Mi``, ``1.46Gi``."""
    value = float(count)
    for suffix in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if value < 1024 or suffix == "Pi":
            if not suffix:
                return str(count)
            digits = max(0, 3 - len(str(int(value))))  # three significant digits
            text = f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"
            return text + suffix
        value /= 1024
    raise AssertionError("unreachable")


def add_totals(base: Mapping[str, Any] | None, result: SweepResult) -> dict[str, Any]:
    """The running totals: those before the sweep plus what the sweep did so far. Computed
    from the start-of-sweep totals, so a lost patch is made good by the next one."""
    totals = dict(base or {})
    freed = int(totals.get("freedBytes", 0)) + result.freed_bytes
    return {
        "abortedUploads": int(totals.get("abortedUploads", 0)) + result.total("aborted"),
        "freedBytes": freed,
        "freed": quantity(freed),
    }


def progress_status(base_totals: Mapping[str, Any] | None, result: SweepResult) -> dict[str, Any]:
    """A running sweep's checkpoint: lastSweep without completionTime, totals so far."""
    return {"lastSweep": last_sweep(result), "totals": add_totals(base_totals, result)}


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
    base_totals: Mapping[str, Any] | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """The status patch after a sweep (totals accumulate across sweeps; ``base_totals``:
    the totals when the sweep started, default the previous status's; ``note``: what the
    Ready message must add, e.g. the policy's own warning)."""
    if base_totals is None:
        base_totals = (previous or {}).get("totals")
    message = sweep_message(result) + (f"; note: {note}" if note else "")
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions(
            previous,
            ready=result.ok,
            reason=result.reason,
            message=message,
            generation=generation,
        ),
        "lastSweep": last_sweep(result),
        "totals": add_totals(base_totals, result),
        "nextSweepTime": rfc3339(next_sweep) if next_sweep else None,
    }
    if result.ok and result.finished is not None:
        status["lastSuccessfulSweepTime"] = rfc3339(result.finished)
    return status


def problem_status(
    previous: Mapping[str, Any] | None,
    *,
    reason: str,
    message: str,
    generation: int | None,
    next_sweep: datetime | None = None,
    ready: bool | None = False,
) -> dict[str, Any]:
    """The status patch for a policy that could not sweep (InvalidSpec, CredentialsNotFound
    ...), is suspended (``ready`` True) or is about to sweep a new spec (``ready`` None);
    lastSweep and totals are left as they were."""
    return {
        "observedGeneration": generation,
        "conditions": conditions(
            previous, ready=ready, reason=reason, message=message, generation=generation
        ),
        "nextSweepTime": rfc3339(next_sweep) if next_sweep else None,
    }
