"""The Kopf face of the operator: thin handlers that feed the scheduler, plus the HTTP
endpoint for ``/metrics`` and ``/healthz``. ``mpu-janitor operator`` runs :func:`run_operator`.

Only an event handler watches policies (no timers, daemons or change handlers), so Kopf
never puts a finalizer on them: deleting a policy or its namespace never waits for us.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
from aiohttp import web
from prometheus_client.exposition import choose_encoder

from mpu_janitor.fairness import FairnessLimits, NamespaceCaps
from mpu_janitor.kube import KubeClient
from mpu_janitor.login import NoCredentials, kopf_login, logged_in
from mpu_janitor.metrics import MetricsState, new_registry
from mpu_janitor.metrics_access import MetricsAuthorizer, ReloadingCertificate
from mpu_janitor.policy import API_GROUP, API_VERSION, DEFAULT_LILT_INVENTORY_DIR
from mpu_janitor.scheduler import PROGRESS_SECONDS, Scheduler
from mpu_janitor.selector import LabelSelector
from mpu_janitor.tenancy import Tenancy, install_redaction

log = logging.getLogger(__name__)

PLURAL = "uploadlifecyclepolicies"
HEALTHY_TICK_SECONDS = 60.0
RESYNC_QUIET_SECONDS = 2.0  # a watch's listing is over when it sent nothing for this long
RESYNC_SECONDS = 600.0  # and a listing of our own at least this often
RESYNC_RETRY_SECONDS = 10.0  # after a listing failed


@dataclass
class OperatorConfig:
    metrics_address: str = "0.0.0.0"
    metrics_port: int = 8080  # 0: pick a free port (tests read OperatorConfig.bound_port)
    peering: str | None = None
    namespaces: tuple[str, ...] = ()
    identity: str = field(
        default_factory=lambda: f"mpu-janitor@{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
    )
    priority: int = field(default_factory=lambda: random.randint(1, 1_000_000))
    bound_port: int | None = None
    lilt_inventory_dir: str = DEFAULT_LILT_INVENTORY_DIR
    progress_seconds: float = PROGRESS_SECONDS  # a running sweep's status checkpoints
    tenancy: Tenancy = field(default_factory=Tenancy)  # ambient credentials, endpoints
    kube_context: str | None = None  # a kubeconfig context (default: in-cluster, then current)
    fairness: FairnessLimits = field(default_factory=FairnessLimits)  # per-namespace caps
    metrics_tls_cert: str | None = None  # HTTPS for /metrics and /healthz when both are set
    metrics_tls_key: str | None = None
    metrics_auth: str = "none"  # "kubernetes": TokenReview + SubjectAccessReview per scraper
    selector: LabelSelector | None = None  # this shard's policies (None: every policy)


# -- Kubernetes credentials shared by Kopf and our own status client -------------------------


@kopf.on.login(errors=kopf.ErrorsMode.PERMANENT)
async def on_login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """In a Pod: the ServiceAccount; elsewhere: the kubeconfig (exec plugins included)."""
    config: OperatorConfig = memo.get("config") or OperatorConfig()
    try:
        info = await kopf_login(config.kube_context)
    except NoCredentials as error:
        raise kopf.PermanentError(str(error)) from error
    config.tenancy.note_api_server(info.server)  # never a store endpoint
    return info


# -- lifecycle ---------------------------------------------------------------------------------


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Kopf builds every event's "essence" (a deep copy of the whole object) for change
    handlers and daemons to diff against; the operator has neither (only an event handler),
    so nothing is built: that copy was a good part of Kopf's cost per event, and every
    sweep's status patch comes back as one. (A change handler added later needs Kopf's own
    storage back.)"""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})


@kopf.on.startup()
async def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: OperatorConfig = memo.get("config") or OperatorConfig()
    memo["config"] = config
    # Our names under our own API group, not Kopf's defaults.
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = NoDiffBase(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    # We post our own one-per-sweep Events; handler log lines stay in the log.
    settings.posting.level = logging.ERROR
    settings.posting.reporting_component = f"{API_GROUP}/operator"
    settings.posting.reporting_instance = config.identity[:128]
    settings.posting.event_name_prefix = "mpu-janitor-"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.peering.priority = config.priority
    apply_selector(settings, config)

    kube = KubeClient(lambda: logged_in(config.kube_context))
    metrics = MetricsState()
    # Kopf posts our Events (queued, retried) with the context of a policy handler, kept here
    # by the first one: the scheduler's tasks run outside Kopf's handlers, where kopf.event
    # has no queue to put an Event on. (Per-object memos are shallow copies: they share it.)
    handler_context: list[contextvars.Context] = []
    memo["handler_context"] = handler_context

    async def post_event(
        body: Mapping[str, Any], event_type: str, reason: str, message: str
    ) -> None:
        if not handler_context:
            log.warning("could not post a %s event: no policy handled yet", reason)
            return
        policy = kopf.Body(cast(kopf.RawBody, dict(body)))
        handler_context[0].run(kopf.event, policy, type=event_type, reason=reason, message=message)

    scheduler = Scheduler(
        kube,
        metrics,
        post_event,
        is_active=lambda: is_active_peer(kube, config),
        peered=config.peering is not None,
        lilt_inventory_dir=config.lilt_inventory_dir,
        progress_seconds=config.progress_seconds,
        tenancy=config.tenancy,
        fairness=NamespaceCaps(config.fairness),
    )
    memo["kube"], memo["metrics"], memo["scheduler"] = kube, metrics, scheduler
    memo["resync"] = resync = Resync(kube, scheduler, config)
    memo["http"] = await start_http(config, metrics, scheduler, kube)
    scheduler.start()
    resync.start()
    log.info(
        "mpu-janitor started: metrics on %s:%s, identity %s, policies %s",
        config.metrics_address,
        config.bound_port,
        config.identity,
        f"matching {config.selector}" if config.selector else "all",
    )


def apply_selector(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """A shard watches only its policies: the API server filters the list and the watch (a
    policy relabelled out of the selector arrives as DELETED), so the operator never holds the
    other shards' policies. Peerings and namespaces are watched unfiltered."""
    if config.selector is not None:
        settings.watching.label_selectors[API_GROUP, PLURAL] = str(config.selector)


class Resync:
    """Forgets the policies that went while the watch was away.

    When Kopf's watch cannot continue where it broke off (the API server restarted, or the
    outage outlived the API server's event history), it lists the policies again and
    carries on: every listed policy reaches us again (event type None), but a policy deleted
    or relabelled out of this shard meanwhile sends nothing, and would be swept on as if it
    were still ours. So after every listing (when its events stop for a moment), and every
    ``RESYNC_SECONDS`` in any case, the operator lists the names of its policies itself
    (metadata only, the shard's selector applied by the API server) and forgets the others.
    """

    def __init__(self, kube: KubeClient, scheduler: Scheduler, config: OperatorConfig) -> None:
        self.kube, self.scheduler, self.config = kube, scheduler, config
        self._listed_at = 0.0  # the last listed event (monotonic)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    @property
    def possible(self) -> bool:
        """Namespace patterns (Kopf's globs) cannot be listed by name: no resync there."""
        return not any(set(ns) & set("*?[]!") for ns in self.config.namespaces)

    def listed(self) -> None:
        """A policy arrived from a watch's listing (Kopf's event type None)."""
        self._listed_at = time.monotonic()
        self._wakeup.set()

    def start(self) -> None:
        if self.possible:
            self._task = asyncio.create_task(self._run(), name="mpu-janitor-resync")
        else:
            log.warning(
                "namespace patterns: policies deleted during an outage are forgotten "
                "only when the operator restarts"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=RESYNC_SECONDS)
            # A listing is over once its events stop for a moment.
            while (left := self._listed_at + RESYNC_QUIET_SECONDS - time.monotonic()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=left)
            self._wakeup.clear()
            try:
                await self.once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the API server still away: again soon
                log.warning("could not list the policies to resync (%s); retrying", error)
                self._listed_at = time.monotonic() + RESYNC_RETRY_SECONDS - RESYNC_QUIET_SECONDS
                self._wakeup.set()

    async def once(self) -> list[tuple[str, str]]:
        since = time.monotonic()
        selector = str(self.config.selector) if self.config.selector is not None else None
        present: set[tuple[str, str]] = set()
        for namespace in self.config.namespaces or (None,):
            present |= await self.kube.list_policy_names(namespace, selector)
        self.runs += 1
        return self.scheduler.prune(present, since)


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    resync: Resync | None = memo.get("resync")
    if resync is not None:
        await resync.stop()
    scheduler: Scheduler | None = memo.get("scheduler")
    if scheduler is not None:
        await scheduler.stop()
    runner: web.AppRunner | None = memo.get("http")
    if runner is not None:
        await runner.cleanup()
    kube: KubeClient | None = memo.get("kube")
    if kube is not None:
        await kube.close()


# -- policies ----------------------------------------------------------------------------------


def is_news(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> bool:
    """Does this event tell the scheduler anything? Not when only the status changed (every
    sweep's status patch comes back as such an event) and this replica is the one that
    sweeps (it wrote that status); a standby replica follows every status its peer writes."""
    scheduler: Scheduler | None = memo.get("scheduler")
    if type != "MODIFIED" or scheduler is None or not scheduler.active:
        return True
    return scheduler.is_news(body)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL, when=is_news)
async def on_policy_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    scheduler: Scheduler = memo["scheduler"]
    handler_context: list[contextvars.Context] | None = memo.get("handler_context")
    if handler_context is not None and not handler_context:
        handler_context.append(contextvars.copy_context())  # for the scheduler's Events
    config: OperatorConfig = memo["config"]
    name, namespace = str(body.metadata.name), str(body.metadata.namespace)
    outside = config.selector is not None and not config.selector.matches(body.metadata.labels)
    if type == "DELETED" or body.metadata.get("deletionTimestamp") or outside:
        # Deleted, being deleted (another controller's finalizer may hold it), or relabelled
        # into another shard: stop now.
        scheduler.remove(namespace, name)
    else:
        scheduler.upsert(dict(body), initial=type is None)
    if type is None and (resync := memo.get("resync")) is not None:
        resync.listed()  # a watch (re)listed the policies: forget those it no longer shows


# -- peering: the scheduler sweeps only in the replica Kopf keeps active -----------------------


async def is_active_peer(kube: KubeClient, config: OperatorConfig) -> bool:
    """True unless a live peer outranks us (Kopf pauses on equal priorities too). Raises when
    the peering cannot be read: that is no sign of a peer (a running sweep goes on)."""
    if config.peering is None:
        return True
    namespace = config.namespaces[0] if config.namespaces else None
    body = await kube.get_peering(config.peering, namespace)
    now = time.time()
    for identity, info in ((body or {}).get("status") or {}).items():
        if identity == config.identity or not isinstance(info, dict):
            continue
        if _peer_alive(info, now) and int(info.get("priority", 0)) >= config.priority:
            return False
    return True


def _peer_alive(info: Mapping[str, Any], now: float) -> bool:
    from datetime import datetime

    try:
        seen = datetime.fromisoformat(str(info.get("lastseen")).replace("Z", "+00:00"))
    except ValueError:
        return False
    if seen.tzinfo is None:
        from datetime import UTC

        seen = seen.replace(tzinfo=UTC)
    return now - seen.timestamp() <= float(info.get("lifetime", 60))


# -- HTTP: /metrics and /healthz -----------------------------------------------------------------


async def start_http(
    config: OperatorConfig,
    metrics: MetricsState,
    scheduler: Scheduler,
    kube: KubeClient | None = None,
) -> web.AppRunner:
    registry = new_registry(metrics)
    middlewares = []
    if config.metrics_auth == "kubernetes":
        if kube is None:
            raise ValueError("--metrics-auth=kubernetes needs a Kubernetes client")
        middlewares.append(MetricsAuthorizer(kube).middleware())
    tls = None
    if config.metrics_tls_cert and config.metrics_tls_key:
        tls = ReloadingCertificate(config.metrics_tls_cert, config.metrics_tls_key)

    async def metrics_view(request: web.Request) -> web.Response:
        # OpenMetrics when the scraper asks for it (Prometheus does), text format otherwise.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        payload = await asyncio.to_thread(encoder, registry)
        return web.Response(body=payload, headers={"Content-Type": content_type})

    async def health_view(_: web.Request) -> web.Response:
        stale = time.monotonic() - scheduler.last_tick
        if stale > HEALTHY_TICK_SECONDS:
            return web.Response(status=503, text=f"scheduler stalled for {stale:.0f}s\n")
        return web.Response(text="ok\n")

    app = web.Application(middlewares=middlewares)
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", health_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(
        runner,
        config.metrics_address,
        config.metrics_port,
        ssl_context=tls.context if tls is not None else None,
    )
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    config.bound_port = sockets[0].getsockname()[1] if sockets else config.metrics_port
    return runner


# -- entry point -----------------------------------------------------------------------------------


def operator_kwargs(config: OperatorConfig) -> dict[str, Any]:
    """Arguments for ``kopf.operator`` matching a config (also used by the tests)."""
    kwargs: dict[str, Any] = {
        "memo": kopf.Memo(config=config),
        "identity": config.identity,
        "priority": config.priority,
    }
    if config.namespaces:
        kwargs["namespaces"] = list(config.namespaces)
    else:
        kwargs["clusterwide"] = True
    if config.peering:
        kwargs["peering_name"] = config.peering
    else:
        kwargs["standalone"] = True
    return kwargs


def configure_logging(*, verbose: bool, log_format: str = "text") -> None:
    """``text``: one line per record; ``json``: Kopf's JSON records (one object a line, with
    the policy's namespace and name under ``object``) for log pipelines."""
    if log_format == "json":
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON, log_refkey="object")
        logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    else:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,
        )
    # kubernetes_asyncio logs every response body at debug: Secrets included, with their
    # values in base64 and often in plain text (kubectl's last-applied annotation).
    for noisy in ("botocore", "urllib3", "aiohttp.access", "kubernetes_asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_redaction()  # secret values and signatures never reach a log line


def run_operator(
    *,
    namespaces: Collection[str],
    metrics_address: str,
    metrics_port: int,
    peering: str | None,
    verbose: bool,
    lilt_inventory_dir: str = DEFAULT_LILT_INVENTORY_DIR,
    log_format: str = "text",
    tenancy: Tenancy | None = None,
    kube_context: str | None = None,
    fairness: FairnessLimits | None = None,
    metrics_tls_cert: str | None = None,
    metrics_tls_key: str | None = None,
    metrics_auth: str = "none",
    selector: LabelSelector | None = None,
) -> int:
    configure_logging(verbose=verbose, log_format=log_format)
    config = OperatorConfig(
        selector=selector,
        metrics_tls_cert=metrics_tls_cert,
        metrics_tls_key=metrics_tls_key,
        metrics_auth=metrics_auth,
        tenancy=tenancy or Tenancy(),
        fairness=fairness or FairnessLimits(),
        metrics_address=metrics_address,
        metrics_port=metrics_port,
        peering=peering,
        namespaces=tuple(namespaces),
        lilt_inventory_dir=lilt_inventory_dir,
        kube_context=kube_context,
    )
    if os.environ.get("MPU_JANITOR_PRIORITY"):
        config.priority = int(os.environ["MPU_JANITOR_PRIORITY"])
    if os.environ.get("MPU_JANITOR_PROGRESS_SECONDS"):
        config.progress_seconds = float(os.environ["MPU_JANITOR_PROGRESS_SECONDS"])
    asyncio.run(kopf.operator(**operator_kwargs(config)))
    return 0
