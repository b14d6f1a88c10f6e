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
