"""The store's clock comes from the response's Date header, and from nowhere else."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mpu_janitor.stores.aws import server_time


def response(headers: dict[str, str]) -> dict[str, object]:
    return {"ResponseMetadata": {"HTTPHeaders": headers}}


def test_the_date_header_is_the_clock() -> None:
    got = server_time(response({"date": "Wed, 01 Jan 2031 10:00:00 GMT"}), "S3")
    assert got == datetime(2031, 1, 1, 10, 0, tzinfo=UTC)
    # An HTTP date is GMT: one without its zone is read as UTC, never in the local zone.
    zoneless = server_time(response({"date": "Wed, 01 Jan 2031 10:00:00"}), "S3")
    assert zoneless == datetime(2031, 1, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "headers", [{}, {"date": ""}, {"date": "yesterday"}, {"date": "Wed, 99 Jan 2031 10:00:00 GMT"}]
)
def test_no_usable_date_means_no_clock_never_ours(headers: dict[str, str]) -> None:
    assert server_time(response(headers), "S3") is None
    assert server_time({}, "Glacier") is None
