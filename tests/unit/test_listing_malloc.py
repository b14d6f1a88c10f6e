"""Large transient buffers of a listing (the in-memory spill, a verifying batch's sets) give
their memory back once freed, in whichever thread they were made: glibc's dynamic mmap
threshold would otherwise keep each worker's high-water mark (a MinIO sweep's RSS grew with
the bucket). Measured in a fresh process, by the kernel's count of its resident memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import threading
    import mpu_janitor.stores.streamed_listing  # noqa: F401

    def rss_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    def listing_like(rounds, kept):
        for _ in range(rounds):
            big = bytearray(1024 * 1024)  # a spill's in-memory part, freed
            del big
            buffers = [bytearray(256 * 1024) for _ in range(40)]  # transient, 10 MiB
            kept.append(bytearray(1024))  # a small long-lived block after them
            del buffers

    kept = []
    before = rss_kib()
    # Four workers alive together (each with its own malloc arena), each sending a listing.
    gate = threading.Barrier(4)

    def worker():
        gate.wait()
        listing_like(2, kept)
        gate.wait()

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(rss_kib() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_transient_listing_buffers_are_returned_to_the_system() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc")
    env = {**os.environ}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    grown_kib = int(out.stdout.strip())
    # Eight listings of 10 MiB transients in four threads: kept, RSS grows by about 40 MiB.
    assert grown_kib < 8 * 1024, f"resident memory grew by {grown_kib} KiB"
