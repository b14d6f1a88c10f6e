"""ListMultipartUploads answers parsed as a stream (stores/streamed_listing.py): every upload
read exactly as botocore would, the rest of the document kept, memory flat in the number of
uploads, and a cut answer refused."""

from __future__ import annotations

import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from mpu_janitor.stores.streamed_listing import ListingSpill, parse_into

NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def document(count: int, *, truncated: str = "false") -> bytes:
    uploads = "".join(
        f"<Upload><Key>tmp%2F{index:07d}%26%3C.bin</Key><UploadId>id-{index}&amp;x</UploadId>"
        "<Initiator><ID>i</ID><DisplayName>d</DisplayName></Initiator>"
        "<Owner><ID>o</ID><DisplayName>d</DisplayName></Owner><StorageClass>STANDARD"
        f"</StorageClass><Initiated>2026-11-22T07:00:{index % 60:02d}.123Z</Initiated></Upload>"
        for index in range(count)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ListMultipartUploadsResult xmlns="{NS}">'
        f"<Bucket>b</Bucket><NextKeyMarker>k&amp;m</NextKeyMarker><IsTruncated>{truncated}"
        f"</IsTruncated>{uploads}<EncodingType>url</EncodingType></ListMultipartUploadsResult>"
    ).encode()


def chunked(body: bytes, size: int) -> Iterator[bytes]:
    return (body[i : i + size] for i in range(0, len(body), size))


def test_every_upload_is_spilled_and_the_rest_of_the_document_kept() -> None:
    with ListingSpill() as spill:
        spill.reset()
        rest = parse_into(chunked(document(3, truncated="TRUE"), 7), spill)
        uploads = list(spill.uploads())
    assert [u["Key"] for u in uploads] == [f"tmp%2F{i:07d}%26%3C.bin" for i in range(3)]
    assert [u["UploadId"] for u in uploads] == ["id-0&x", "id-1&x", "id-2&x"]
    assert uploads[2]["Initiated"] == datetime(2026, 11, 22, 7, 0, 2, 123000, tzinfo=UTC)
    root = ET.fromstring(rest)
    fields = {child.tag.rsplit("}", 1)[-1]: child.text for child in root}
    assert fields == {
        "Bucket": "b",
        "NextKeyMarker": "k&m",
        "IsTruncated": "TRUE",
        "EncodingType": "url",
    }


def test_a_retried_request_starts_its_spill_afresh() -> None:
    with ListingSpill() as spill:
        spill.reset()
        parse_into(chunked(document(5), 100), spill)
        spill.reset()
        parse_into(chunked(document(2), 100), spill)
        assert spill.count == 2 and len(list(spill.uploads())) == 2


def test_an_answer_cut_short_is_an_error_not_a_short_listing() -> None:
    body = document(10)
    with ListingSpill() as spill, pytest.raises(ET.ParseError):
        spill.reset()
        parse_into(chunked(body[: len(body) // 2], 64), spill)


def test_parsing_memory_does_not_grow_with_the_uploads_in_one_answer() -> None:
    def peak(count: int) -> int:
        body = document(count)
        with ListingSpill() as spill:
            spill.reset()
            tracemalloc.start()
            try:
                parse_into(chunked(body, 65536), spill)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    small, large = peak(2_000), peak(40_000)
    # The spill keeps its first 4 MiB in memory (about 100 bytes per upload here), then moves
    # to a temporary file: twenty times the uploads, well under twice the peak.
    assert large < 2 * small + 5 * 1024 * 1024
    assert large < 40_000 * 400  # botocore's whole parse: about 2,900 bytes per upload
