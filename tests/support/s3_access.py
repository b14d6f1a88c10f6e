"""How tests reach a real S3 server (MinIO, Ceph RGW) directly, not through mpu-janitor: the
environment a CLI subprocess needs for the standard AWS chain, and a path-style boto3 client."""

from __future__ import annotations

from typing import Any

import boto3
import botocore.config


def path_style_client(
    endpoint: str, access_key: str, secret_key: str, *, verify: str | None = None, **config: Any
) -> Any:
    """A boto3 S3 client addressing buckets path-style, checksums only where required (what
    every store here accepts); ``config`` adds or overrides botocore Config settings."""
    settings: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "max_pool_connections": 32,
        **config,
    }
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=botocore.config.Config(**settings),
        **({"verify": verify} if verify is not None else {}),
    )


class S3Access:
    """For a server object with ``endpoint``, ``access_key`` and ``secret_key``."""

    endpoint: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """Environment for a CLI subprocess using the standard AWS credential chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config: Any) -> Any:
        return path_style_client(self.endpoint, self.access_key, self.secret_key, **config)
