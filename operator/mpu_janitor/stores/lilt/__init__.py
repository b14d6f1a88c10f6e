"""LILT uploads: cancels abandoned multipart uploads that the uploader recorded in an inventory.

Why an inventory. LILT has no call that lists incomplete multipart uploads. ``GET /v2/upload``
lists pending uploads as ``{id, filename, status, created_at}``: no multipart ``uploadId`` and
no S3 key, and cancelling needs both (``DELETE /v2/upload/s3/multipart/{uploadId}?s3Key=``).
Both exist only in the response of the initiate call (``POST /v2/upload/s3/multipart`` returns
``{uploadId, key}``), so the uploader records them right then with :func:`record_upload`, and
the sweep reads them back. The inventory is a JSON Lines file
(``spec.store.lilt.inventoryPath``), one upload a line::

    {"uploadId": "...", "key": "uploads/42/file.zip", "initiated": "2025-01-31T12:00:00.000Z",
     "filename": "file.zip", "size": 734003200}

``filename`` and ``size`` are optional. Writers append under an exclusive ``flock`` on
``<inventory>.lock`` (a separate file, because pruning replaces the inventory itself) and fsync
each line. The sweep reads without the lock: appends and the atomic replacement never show it
a half-written file, and an unterminated last line is a write in progress, skipped. Verified
uploads are pruned by rewriting the file to a temporary one and renaming it over, under the
lock, in batches (:meth:`LiltStore.forget`, flushed on :meth:`LiltStore.close`). An uploader
that completes an upload should call :func:`forget_upload`; if it does not, a later sweep's
cancel gets a 404 ("already gone", never counted as freed) and prunes the record then.

The file must be visible to the uploader and to the janitor alike: the same host for the CLI,
a volume shared with the uploader (ReadWriteMany, a filesystem with working ``flock``, e.g.
NFSv4) for the operator, with both processes in a group that may write it.

Clock. Ages are judged on LILT's clock: every page of the listing carries the Date header of
``GET /v2/upload?ids=0``, an authenticated request that matches no upload (cheap, and it
proves the API key before any cancel). Only if LILT sends no Date header is the local clock
used, with a warning. ``initiated`` is what the uploader recorded: pass the Date header of the
initiate response to be on LILT's clock (the default is the uploader's own clock).

Size. LILT has no parts listing, so what an upload holds cannot be measured: ``measure``
reports the record's ``size`` (declared by the uploader at initiation: the whole file, an
upper bound of the parts stored), 0 when absent, and ``newest_part`` None, so the quiet period
cannot see parts arriving: ``olderThan`` must be longer than an upload can take.

Verification. With no parts listing to check, ``measure`` of an upload this store has
cancelled repeats the cancel: a 404 proves LILT no longer knows the upload (UploadGone); a 200
means it still accepted a cancel, so the upload is reported present and the engine aborts
again (a bounded number of times) and then counts it failed. This relies on LILT answering 404
for an unknown or cancelled upload id, as its S3 backend does (``NoSuchUpload``); were it to
answer 200 to every repeat, those uploads would show as failed, never as freed. Measuring an
upload we have not cancelled sends nothing.

Auth. HTTP Basic with the API key as user and password (``LILT_API_KEY`` from the credentials
Secret, else the environment), never the ``key`` query parameter that LILT also accepts: it
collides with the S3 key. Redirects are not followed (they would carry the credentials away).

Throttling. LILT allows 4,000 requests a minute and asks for a 60-second wait past it: a 429
raises Throttled and the engine slows the sweep down.
"""

from mpu_janitor.stores.lilt.api import CONTAINER, CancelAnswer, LiltApi
from mpu_janitor.stores.lilt.inventory import (
    InventoryError,
    InventoryLocked,
    InventoryRecord,
    forget_upload,
    parse_record,
    prune_uploads,
    record_part,
    record_upload,
    unresolved_path,
    update_inventory,
)
from mpu_janitor.stores.lilt.store import (
    API_KEY_ENV,
    MAX_CANCEL_SWEEPS,
    CancelRefused,
    CancelUnresolved,
    CancelUnverified,
    LiltStore,
    UnrecordedUploads,
    UploadNotFound,
)

__all__ = [
    "API_KEY_ENV",
    "CONTAINER",
    "MAX_CANCEL_SWEEPS",
    "CancelAnswer",
    "CancelRefused",
    "CancelUnresolved",
    "CancelUnverified",
    "InventoryError",
    "InventoryLocked",
    "InventoryRecord",
    "LiltApi",
    "LiltStore",
    "UnrecordedUploads",
    "UploadNotFound",
    "forget_upload",
    "parse_record",
    "prune_uploads",
    "record_part",
    "record_upload",
    "unresolved_path",
    "update_inventory",
]
