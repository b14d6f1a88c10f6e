"""mpu-janitor: finds stale incomplete multipart uploads, aborts them, and proves the bytes are freed."""

__version__ = "0.1.0"
