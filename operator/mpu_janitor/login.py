"""Logging in to the Kubernetes API with kubernetes_asyncio's own loaders, for Kopf and for
:class:`mpu_janitor.kube.KubeClient` alike.

In a Pod: the ServiceAccount (its token file is read again when the kubelet rotates it).
Elsewhere: the kubeconfig (``KUBECONFIG``, a list of files, or ``~/.kube/config``) with its
current context or the one asked for, and every way of logging in the library knows:
tokens, client certificates, exec plugins (cloud CLIs, OIDC helpers), auth providers.

The loader writes certificate and key *data* from a kubeconfig to temporary files, because
Python's ``ssl`` only loads files. Those files live only while :func:`logged_in` is open:
long enough to build an SSL context from them, then they are removed (never left behind).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import kube_config as kube_config_module

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# One login at a time per event loop: the loader's temporary files are shared (it keeps one
# file per content), so one login must not remove them while another still needs them.
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class Login:
    """What a loader gave: the client configuration (valid inside :func:`logged_in`), the
    namespace of the context (or the Pod's), and when an exec plugin's token expires."""

    configuration: Configuration
    namespace: str | None = None
    expiration: datetime.datetime | None = None
    source: str = ""


class NoCredentials(Exception):
    """Neither in a Pod nor given a usable kubeconfig."""


def _lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _locks.get(loop)
    if lock is None:
        lock = _locks[loop] = asyncio.Lock()
    return lock


def _pod_namespace() -> str | None:
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    return None


def _kubeconfig_files() -> str:
    """KUBECONFIG as it is now (not when the library was imported), else ~/.kube/config."""
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


async def _load(context: str | None) -> Login:
    configuration = Configuration()
    if context is None:
        try:
            kube_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except kube_config.ConfigException:
            pass  # not in a Pod: the kubeconfig
        else:
            return Login(configuration, _pod_namespace(), source="in-cluster ServiceAccount")
    files = _kubeconfig_files()
    try:
        loader = await kube_config.load_kube_config(
            config_file=files,
            context=context,
            client_configuration=configuration,
            persist_config=False,  # never write to the user's kubeconfig
        )
    except (kube_config.ConfigException, OSError) as error:
        where = "no ServiceAccount (not in a Pod) and " if context is None else ""
        raise NoCredentials(
            f"cannot log in to Kubernetes: {where}kubeconfig {files}"
            f"{f' context {context!r}' if context else ''}: {error}"
        ) from error
    current: Any = loader.current_context
    current = current if isinstance(current, dict) else {}
    namespace = (current.get("context") or {}).get("namespace")
    expiry = getattr(loader, "exec_plugin_expiry", None)
    return Login(
        configuration,
        namespace=namespace,
        expiration=expiry if isinstance(expiry, datetime.datetime) else None,
        source=f"kubeconfig {files} context {current.get('name', '?')}",
    )


@asynccontextmanager
async def logged_in(context: str | None = None) -> AsyncIterator[Login]:
    """Log in (in-cluster first unless a ``context`` is named, then the kubeconfig) and hold
    the login's files until the block ends; build SSL contexts (an ``ApiClient``) inside."""
    async with _lock():
        try:
            yield await _load(context)
        finally:
            # The loader's certificate/key/CA files: removed, and forgotten by its cache.
            kube_config_module._cleanup_temp_files()


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


async def connection_info(login: Login) -> kopf.ConnectionInfo:
    """The same login for Kopf: certificates in memory, the token as the loader made it."""
    configuration = login.configuration
    header = await configuration.get_api_key_with_prefix("BearerToken")
    scheme, _, token = (header or "").partition(" ")
    if not token:  # a bare token without its scheme
        scheme, token = "Bearer", scheme
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_data=_read(configuration.ssl_ca_cert),
        insecure=not configuration.verify_ssl,
        scheme=scheme if token else None,
        token=token or None,
        username=configuration.username or None,
        password=configuration.password or None,
        certificate_data=_read(configuration.cert_file),
        private_key_data=_read(configuration.key_file),
        default_namespace=login.namespace,
        proxy_url=configuration.proxy or None,
        expiration=login.expiration,
    )


async def kopf_login(context: str | None = None) -> kopf.ConnectionInfo:
    async with logged_in(context) as login:
        log.info("logging in to %s with the %s", login.configuration.host, login.source)
        return await connection_info(login)
