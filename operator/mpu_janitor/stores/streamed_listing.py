"""ListMultipartUploads answers read as a stream, so a listing's memory stays flat however many
uploads one answer holds (MinIO answers a whole bucket in one, ignoring max-uploads).

botocore reads a whole answer into memory and parses it into dictionaries (about 2.9 KB per
upload). For a ListMultipartUploads sent while a ``ListingSpill`` is installed on the calling
thread, a ``before-send`` handler sends the request itself with the body left on the socket,
reads it at once through an incremental XML parser (the store may cut a slow reader: MinIO's
write deadline is 30 s), writes each upload as a compact record to the spill (in memory up to
``SPILL_IN_MEMORY_BYTES``, then an unlinked temporary file), and hands botocore an answer
holding the rest of the document (IsTruncated, the markers, EncodingType). botocore still signs,
retries, raises the errors and reports the attempt; the caller reads the uploads back from the
spill a page at a time.
"""

from __future__ import annotations

import ctypes
import struct
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import botocore.awsrequest
import botocore.exceptions
import urllib3.exceptions

from mpu_janitor.stores.aws import parse_store_timestamp

SPILL_IN_MEMORY_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
_RECORD = struct.Struct("<III")
_LOCAL = threading.local()

# glibc's malloc serves a request above M_MMAP_THRESHOLD (128 KiB) with its own mapping, returned
# to the system when freed, but raises the threshold to the size of every such block freed (up to
# 32 MiB). After the first large transient buffer of a listing (the in-memory spill, the sets of
# a verifying batch) every later one is carved from the arena of the thread that asked, which
# gives memory back only from its top: each worker that sends a verifying listing keeps that
# listing's high-water mark, and a MinIO sweep's RSS grew with the bucket (measured in
# bench/README.md). Setting the threshold explicitly turns that adjustment off.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at its default (no dynamic raise); False where the C library
    is not glibc or refuses."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library already loaded
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


pin_mmap_threshold()


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class ListingSpill:
    """The uploads of one listing answer, as compact records outside Python objects."""

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=SPILL_IN_MEMORY_BYTES)  # noqa: SIM115
        self.count = 0
        self.used = False  # an answer was streamed into it (not a stubbed or cached one)

    def reset(self) -> None:
        """A new attempt of the request: forget what an earlier one wrote."""
        self._file.seek(0)
        self._file.truncate()
        self.count = 0
        self.used = True

    def add(self, key: str, upload_id: str, initiated: str) -> None:
        fields = [key.encode("utf-8"), upload_id.encode("utf-8"), initiated.encode("utf-8")]
        self._file.write(_RECORD.pack(*(len(f) for f in fields)) + b"".join(fields))
        self.count += 1

    def uploads(self) -> Iterator[dict[str, Any]]:
        """The uploads in answer order, as botocore would have parsed them."""
        self._file.seek(0)
        for _ in range(self.count):
            lengths = _RECORD.unpack(self._file.read(_RECORD.size))
            key, upload_id, initiated = (self._file.read(n).decode("utf-8") for n in lengths)
            yield {
                "Key": key,
                "UploadId": upload_id,
                "Initiated": parse_store_timestamp(initiated),
            }

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ListingSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class installed:
    """Stream the ListMultipartUploads answers of this thread into ``spill`` meanwhile."""

    def __init__(self, spill: ListingSpill) -> None:
        self.spill = spill

    def __enter__(self) -> ListingSpill:
        _LOCAL.spill = self.spill
        return self.spill

    def __exit__(self, *exc: object) -> None:
        _LOCAL.spill = None


def parse_into(chunks: Iterator[bytes], spill: ListingSpill) -> bytes:
    """Parse a ListMultipartUploadsResult incrementally: each ``Upload`` goes to ``spill`` and is
    dropped from the tree at once; the document without them is returned, serialized."""
    parser: Any = ET.XMLPullParser(events=("start", "end"))
    root: ET.Element | None = None
    depth = 0

    def drain() -> None:
        nonlocal root, depth
        for event, element in parser.read_events():
            assert isinstance(element, ET.Element)
            if event == "start":
                depth += 1
                if root is None:
                    root = element
                continue
            depth -= 1
            if depth == 1 and _local_name(element.tag) == "Upload":
                fields = {_local_name(child.tag): child.text or "" for child in element}
                spill.add(fields.get("Key", ""), fields.get("UploadId", ""), fields["Initiated"])
                assert root is not None
                root.remove(element)

    for chunk in chunks:
        parser.feed(chunk)
        drain()
    parser.close()
    drain()
    if root is None:
        raise ET.ParseError("no element found")
    return ET.tostring(root)


class _Body:
    """The raw body botocore reads (``AWSResponse.content`` joins ``raw.stream()``)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, *_: Any, **__: Any) -> Iterator[bytes]:
        yield self.data


def stream_listing_handler(client: Any) -> Any:
    """The ``before-send.s3.ListMultipartUploads`` handler for ``client``: None (botocore sends
    as usual) unless a spill is installed on this thread."""
    # The client's own HTTP session: its connection pool, TLS settings, proxies and timeouts.
    http_session = client._endpoint.http_session

    def handler(request: Any = None, **_: Any) -> Any:
        spill: ListingSpill | None = getattr(_LOCAL, "spill", None)
        if spill is None or request is None:
            return None
        spill.reset()
        request.stream_output = True
        response = http_session.send(request)
        if response.status_code >= 300:
            return response  # an error: small, read and parsed by botocore as usual
        raw = response.raw
        expected = response.headers.get("content-length")
        received = 0

        def chunks() -> Iterator[bytes]:
            nonlocal received
            for chunk in raw.stream(READ_CHUNK_BYTES):
                received += len(chunk)
                yield chunk

        try:
            rest = parse_into(chunks(), spill)
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as error:
            raw.close()  # never back to the pool with an answer half read
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url) from error
        except ET.ParseError as error:
            raw.close()
            raise botocore.exceptions.IncompleteReadError(
                actual_bytes=received, expected_bytes=int(expected or 0)
            ) from error
        raw.release_conn()  # read to its end: the connection serves the next request
        if expected is not None and str(expected).isdigit() and int(expected) != received:
            raise botocore.exceptions.IncompleteReadError(
                actual_bytes=received, expected_bytes=int(expected)
            )
        headers = botocore.awsrequest.HeadersDict(dict(response.headers.items()))
        headers["content-length"] = str(len(rest))
        return botocore.awsrequest.AWSResponse(
            request.url, response.status_code, headers, _Body(rest)
        )

    return handler
