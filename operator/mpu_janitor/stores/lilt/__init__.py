"""LILT uploads: cancels abandoned multipart uploads that the uploader recorded in an inventory.

Modules: ``inventory`` (the JSON Lines file), ``api`` (the HTTP client), ``store`` (the Store).

What LILT documents. ``DELETE /v2/upload/s3/multipart/{uploadId}?s3Key=`` cancels, answering
200 ``{success, message}`` ("Upload cancellation confirmation") or a generic error
``{message}``; ``GET /v2/upload`` lists pending uploads as ``{id, filename, status,
created_at}``; auth is HTTP Basic with the API key as user and password; the quota is 4,000
requests a minute, then a 60 s wait. Nothing else: not what a cancel of an unknown or
already cancelled upload answers, nor the quota's status code.

Why an inventory. The pending-uploads listing carries no multipart ``uploadId`` and no S3 key,
and cancelling needs both. They exist only in the initiate response (``POST
/v2/upload/s3/multipart`` returns ``{uploadId, key}``), so the uploader records them right then
with :func:`record_upload` (or ``mpu-janitor lilt-record``). The inventory
(``spec.store.lilt.inventoryPath``) is a regular file, one JSON object a line::

    {"uploadId": "...", "key": "uploads/42/file.zip", "initiated": "2025-01-31T12:00:00.000Z",
     "filename": "file.zip", "size": 734003200}
    {"uploadId": "...", "partAt": "2025-01-31T12:05:00.000Z"}

``filename`` (as sent to initiate) and ``size`` (declared at initiation) are optional; part
lines (:func:`record_part`, ``lilt-record --part-time``) are optional too. Writers append under
an exclusive ``flock`` on ``<inventory>.lock`` (waiting at most 30 s, and stopping when
cancelled), fsync each line, and refuse anything but a regular file (a FIFO would block). The
sweep reads without the lock: appends and the atomic replacement never show it a half-written
file, and an unterminated last line is a write in progress, skipped. The sweep rewrites the
file (to a temporary one renamed over it, under the lock, in batches) to prune, to count
unsettled cancels in a record (``attempts``, ``lastOutcome``, ``cancelAccepted``) and to move
given-up records to ``<inventory>.unresolved``. An uploader that completes an upload should
call :func:`forget_upload`.

The file must be visible to the uploader and to the janitor alike: the same host for the CLI,
a volume shared with the uploader (ReadWriteMany, a filesystem with working ``flock``, e.g.
NFSv4) for the operator, with both processes in a group that may write it.

Requests. One ``GET /v2/upload`` (no parameters) per listing, through the engine's pace: its
Date is LILT's clock for ages, its answer proves the endpoint and the key (anything but 200
with a list fails the listing, so a wrong endpoint never drives cancels), and its items are
compared with the inventory: pending uploads older than 15 minutes that no record accounts for
(same filename, ``initiated`` within an hour of ``created_at``; records without a filename
are matched by count) are reported as ``UnrecordedUploads``. Every cancel's Date keeps the
clock. Query values are percent-encoded as LILT's client does (``%20`` for a space).

Every cancel answer, and what the sweep does (nothing is counted freed without LILT's
documented confirmation, nothing twice, and no upload is cancelled forever):

* first cancel 200 (``success`` not false): LILT confirmed. Verified by repeating the cancel
  (a request that finishes even during a stop). The repeat is the very request LILT has just
  accepted, so any answer about the upload (404, another 4xx, 200 either way) can only come
  from its new state: the cancel took effect, counted freed once, record pruned. A 5xx says
  nothing: ``CancelUnverified`` (failed, not counted), the record notes ``cancelAccepted``,
  and a later sweep's answer about the upload counts it then, once.
* ``200 {success: false}`` or a 4xx (not 404): ``CancelRefused``; 500: ``StoreError``. Failed,
  the record's ``attempts`` grows.
* 404: LILT does not know the upload for this key (completed and not forgotten, cancelled
  elsewhere, or initiated under another user's key: the listing is per user). Counted
  already gone (never freed), reported as ``UploadNotFound``, and the record moved to
  ``<inventory>.unresolved`` for a person with the right key, at once (retrying with the same
  key cannot help). Only after this store's ``GET /v2/upload`` succeeded: before that, 404s
  never move records.
* After ``MAX_CANCEL_SWEEPS`` (3) unsettled sweeps a record is given up: moved to the
  unresolved file, reported as ``CancelUnresolved``; no more cancels are sent.
* An inventory the sweep cannot write (checked at the start of the listing: the lock taken,
  the file opened for writing) gets no cancel at all, and once a rewrite fails during a sweep
  no further cancel is sent in it (``InventoryNotUpdated``): a record counted freed but not
  pruned would be cancelled again next sweep, and a LILT that confirms repeated cancels would
  have it counted twice. Listing and DryRun go on.
* 429, and 403 or 503 with quota wording: Throttled, 60 s (or Retry-After, at most 300 s); the
  engine retries that one request. 401/403 otherwise: AccessDenied. 502-504 and no answer:
  StoreUnreachable (no attempt counted: an outage must not give records up).

Size. LILT has no parts listing, so what an upload holds cannot be measured: ``measure``
reports the record's ``size``, declared by the uploader at initiation (the whole file, an
upper bound of the parts stored), 0 when absent. Status and metrics say these are declared.

Activity. ``newest_part`` is the newest recorded part time; without part lines it is None and
the quiet period cannot apply: then only ``olderThan`` protects an upload in progress, so it
must be longer than an upload can take.

Auth. HTTP Basic with the API key (``LILT_API_KEY`` from the credentials Secret, else the
environment), never the ``key`` query parameter: it collides with the S3 key. Redirects are not
followed (they would carry the credentials away).
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
