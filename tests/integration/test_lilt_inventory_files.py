"""The LILT inventory is a regular file: anything else (a FIFO, a device) is refused with a clear
error instead of blocking the sweep, and waiting for the writers' lock is bounded and stops
when told to."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mpu_janitor.policy import LiltTarget
from mpu_janitor.stores.base import InvalidTarget, StoreCredentials
from mpu_janitor.stores.lilt import (
    CONTAINER,
    InventoryError,
    InventoryLocked,
    LiltStore,
    forget_upload,
    record_upload,
)
from tests.support.lilt_server import FakeLilt

pytestmark = pytest.mark.integration

GUARD = 30.0  # only so that a regression fails instead of hanging the test run


@pytest.fixture()
def lilt() -> Iterator[FakeLilt]:
    with FakeLilt() as server:
        yield server


def outcome(call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; its exception (None if it returned). A call still blocked
    after GUARD seconds is a failure."""
    caught: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as error:
            caught.append(error)
        else:
            caught.append(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(GUARD)
    assert caught, f"{call} is still blocked"
    return caught[0]


@pytest.fixture()
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "uploads.jsonl"
    os.mkfifo(path)
    yield path
    # Release any reader a regression left blocked on the FIFO.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(path) else None
    if fd is not None:
        os.close(fd)


def _has_reader(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def test_a_sweep_refuses_a_fifo_inventory(lilt: FakeLilt, fifo: Path) -> None:
    store = LiltStore(
        LiltTarget(lilt.url, str(fifo)), StoreCredentials(api_key=lilt.api_key), lambda *_: None
    )
    error = outcome(lambda: list(store.list_uploads(CONTAINER, [])))
    assert isinstance(error, InvalidTarget)
    assert "inventoryPath" in str(error) and "not a regular file" in str(error)
    assert error.reason == "InvalidSpec"


def test_a_device_inventory_is_refused(lilt: FakeLilt) -> None:
    store = LiltStore(
        LiltTarget(lilt.url, "/dev/zero"), StoreCredentials(api_key=lilt.api_key), lambda *_: None
    )
    error = outcome(lambda: list(store.list_uploads(CONTAINER, [])))
    assert isinstance(error, InvalidTarget) and "not a regular file" in str(error)


def test_writers_refuse_a_fifo(fifo: Path) -> None:
    error = outcome(lambda: record_upload(fifo, "u-1", "uploads/a"))
    assert isinstance(error, InventoryError) and "not a regular file" in str(error)
    error = outcome(lambda: forget_upload(fifo, "u-1"))
    assert isinstance(error, InventoryError)


def test_a_fifo_lock_file_is_refused(tmp_path: Path) -> None:
    inventory = tmp_path / "uploads.jsonl"
    os.mkfifo(f"{inventory}.lock")
    error = outcome(lambda: record_upload(inventory, "u-1", "uploads/a"))
    assert isinstance(error, InventoryError) and ".lock" in str(error)


@pytest.fixture()
def held_lock(tmp_path: Path) -> Iterator[Path]:
    """An inventory whose writers' lock another process holds."""
    inventory = tmp_path / "uploads.jsonl"
    fd = os.open(f"{inventory}.lock", os.O_RDWR | os.O_CREAT, 0o660)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield inventory
    os.close(fd)


def test_waiting_for_the_lock_times_out(held_lock: Path) -> None:
    error = outcome(lambda: record_upload(held_lock, "u-1", "uploads/a", lock_timeout=0.3))
    assert isinstance(error, InventoryLocked) and "lock" in str(error)
    assert not held_lock.exists()


def test_waiting_for_the_lock_stops_when_cancelled(held_lock: Path) -> None:
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    error = outcome(
        lambda: record_upload(held_lock, "u-1", "uploads/a", lock_timeout=3600, cancel=cancel)
    )
    assert isinstance(error, InventoryLocked) and "cancelled" in str(error)
    assert not held_lock.exists()


def test_the_cli_refuses_a_fifo_naming_the_option(fifo: Path) -> None:
    script = Path(sys.executable).parent / "mpu-janitor"
    done = subprocess.run(
        [str(script), "lilt-record", "--inventory", str(fifo), "--upload-id", "u", "--key", "k"],
        capture_output=True,
        text=True,
        check=False,
        timeout=GUARD,
    )
    assert done.returncode == 2
    assert "--inventory" in done.stderr and "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr
