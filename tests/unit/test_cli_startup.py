"""What the CLI imports to start: a ``sweep`` never pays for the operator's web stack."""

from __future__ import annotations

import subprocess
import sys

from mpu_janitor import cli, metrics_access


def test_the_parser_offers_every_metrics_auth_mode() -> None:
    assert cli.METRICS_AUTH_MODES == metrics_access.AUTH_MODES


def test_importing_the_cli_imports_no_web_or_kubernetes_stack() -> None:
    heavy = ("aiohttp", "kopf", "kubernetes_asyncio", "prometheus_client", "boto3")
    probe = (
        f"import sys, mpu_janitor.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""


def test_a_store_client_is_built_without_boto3_or_its_transfer_manager() -> None:
    """The stores need botocore only: boto3 and s3transfer were about 0.1 s of every run."""
    probe = (
        "import sys\n"
        "from mpu_janitor.stores.aws import client_config, make_client\n"
        "from mpu_janitor.stores.base import StoreCredentials\n"
        "for service in ('s3', 'glacier', 'sts'):\n"
        "    make_client(service, region='us-east-1', endpoint='http://127.0.0.1:9',\n"
        "        credentials=StoreCredentials('AKIDEXAMPLE', 'secret'),\n"
        "        observer=lambda *_: None, config=client_config('us-east-1'))\n"
        "print(','.join(m for m in ('boto3', 's3transfer') if m in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
