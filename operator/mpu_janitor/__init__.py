"""mpu-janitor: aborts stale incomplete multipart uploads and proves the bytes are freed."""

__version__ = "0.1.0"
