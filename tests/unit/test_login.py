"""Logging in through kubernetes_asyncio's loaders: kubeconfig contexts, exec plugins, and a
clear error when there is nothing to log in with."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpu_janitor.login import NoCredentials, kopf_login

EXEC_API = "client.authentication.k8s.io/v1"


def exec_plugin(directory: Path, token: str, *, expires: str | None = None) -> Path:
    """A plugin as cloud CLIs ship them: prints an ExecCredential, counts its runs."""
    status: dict[str, Any] = {"token": token}
    if expires:
        status["expirationTimestamp"] = expires
    credential = {"apiVersion": EXEC_API, "kind": "ExecCredential", "status": status}
    script = directory / f"plugin-{token}"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"runs = open({str(directory / 'runs')!r}, 'a')\n"
        "runs.write(os.environ['KUBERNETES_EXEC_INFO'] + '\\n')\n"
        f"sys.stdout.write({json.dumps(credential)!r})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def kubeconfig(directory: Path, users: dict[str, dict[str, Any]], current: str) -> Path:
    path = directory / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": name, "user": user} for name, user in users.items()],
                "contexts": [
                    {"name": name, "context": {"cluster": "c", "user": name, "namespace": name}}
                    for name in users
                ],
                "current-context": current,
            }
        )
    )
    return path


async def test_an_exec_plugin_gives_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = exec_plugin(tmp_path, "from-plugin", expires="2099-01-01T00:00:00Z")
    path = kubeconfig(
        tmp_path, {"laptop": {"exec": {"apiVersion": EXEC_API, "command": str(plugin)}}}, "laptop"
    )
    monkeypatch.setenv("KUBECONFIG", str(path))  # read at login, not at import
    info = await kopf_login()
    assert (info.scheme, info.token) == ("Bearer", "from-plugin")
    assert info.server == "http://127.0.0.1:1"
    assert info.default_namespace == "laptop"
    assert info.expiration is not None and info.expiration.year == 2099  # Kopf logs in again
    runs = (tmp_path / "runs").read_text().splitlines()
    assert len(runs) == 1 and json.loads(runs[0])["kind"] == "ExecCredential"


async def test_a_named_context_wins_over_the_current_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = exec_plugin(tmp_path, "chosen")
    path = kubeconfig(
        tmp_path,
        {
            "current": {"token": "not-this-one"},
            "chosen": {"exec": {"apiVersion": EXEC_API, "command": str(plugin)}},
        },
        "current",
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert (await kopf_login()).token == "not-this-one"
    assert (await kopf_login("chosen")).token == "chosen"


async def test_nothing_to_log_in_with_names_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(NoCredentials, match="missing"):
        await kopf_login()
    path = kubeconfig(tmp_path, {"only": {"token": "t"}}, "only")
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(NoCredentials, match="'nope'"):
        await kopf_login("nope")


async def test_a_failing_exec_plugin_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "broken"
    script.write_text("#!/bin/sh\necho 'please run: cloud login' >&2\nexit 1\n")
    script.chmod(0o755)
    path = kubeconfig(
        tmp_path, {"u": {"exec": {"apiVersion": EXEC_API, "command": str(script)}}}, "u"
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(NoCredentials, match="please run: cloud login"):
        await kopf_login()
