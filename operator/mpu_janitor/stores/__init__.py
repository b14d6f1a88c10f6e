"""Store families behind one protocol; ``open_store`` is the factory (one line per family)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpu_janitor.stores.base import RequestObserver, Store, StoreCredentials, ignore_requests

if TYPE_CHECKING:
    from mpu_janitor.policy import StoreSpec


def open_store(
    spec: StoreSpec,
    credentials: StoreCredentials | None = None,
    observer: RequestObserver = ignore_requests,
) -> Store:
    """A connected store for one policy's target. Cheap: no request is sent until used."""
    if spec.s3 is not None:
        from mpu_janitor.stores.s3 import S3Store

        return S3Store(spec.s3, credentials, observer)
    if spec.glacier is not None:
        from mpu_janitor.stores.glacier import GlacierStore

        return GlacierStore(spec.glacier, credentials, observer)
    if spec.lilt is not None:
        from mpu_janitor.stores.lilt import LiltStore

        return LiltStore(spec.lilt, credentials, observer)
    raise ValueError(f"no store section for type {spec.type.value}")
