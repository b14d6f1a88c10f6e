"""Store families behind one protocol; ``open_store`` is the factory (one line per family)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpu_janitor.stores.base import (
    InvalidTarget,
    RequestObserver,
    Store,
    StoreCredentials,
    ignore_requests,
)

if TYPE_CHECKING:
    from mpu_janitor.policy import StoreSpec


class UnusableTarget(InvalidTarget):
    """The store's client refused the target while being built (a value it cannot use): the
    policy is invalid as written. ``field`` is the store section (``spec.store.s3``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def open_store(
    spec: StoreSpec,
    credentials: StoreCredentials | None = None,
    observer: RequestObserver = ignore_requests,
) -> Store:
    """A connected store for one policy's target. Cheap: no request is sent until used.
    Raises UnusableTarget for anything the client refuses while being built."""
    section = f"spec.store.{spec.type.value.lower()}"
    try:
        if spec.s3 is not None:
            from mpu_janitor.stores.s3 import S3Store

            return S3Store(spec.s3, credentials, observer)
        if spec.glacier is not None:
            from mpu_janitor.stores.glacier import GlacierStore

            return GlacierStore(spec.glacier, credentials, observer)
        if spec.lilt is not None:
            from mpu_janitor.stores.lilt import LiltStore

            return LiltStore(spec.lilt, credentials, observer)
    except ValueError as error:
        # botocore's InvalidRegionError and invalid-endpoint errors are ValueErrors; nothing
        # has been sent yet, so this is the policy's value, not the store's state.
        raise UnusableTarget(section, str(error) or type(error).__name__) from error
    raise UnusableTarget(section, f"no store section for type {spec.type.value}")
