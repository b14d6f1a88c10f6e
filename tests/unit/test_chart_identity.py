"""The chart's workload-identity values: the token permission (any ServiceAccount, only the
listed ones, or none) in both RBAC modes, and the STS endpoint handed to the operator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.unit.test_chart import FULLNAME, only, parsed_args, render, render_error

TOKEN_RESOURCE = ["serviceaccounts/token"]


def token_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rules if r["resources"] == TOKEN_RESOURCE]


def test_tokens_for_any_service_account_by_default(tmp_path: Path) -> None:
    role = only(render(tmp_path), "ClusterRole", FULLNAME)
    assert token_rules(role["rules"]) == [
        {"apiGroups": [""], "resources": TOKEN_RESOURCE, "verbs": ["create"]}
    ]
    assert parsed_args(render(tmp_path)).sts_endpoint is None


def test_listed_service_accounts_only(tmp_path: Path) -> None:
    values = {"credentials": {"workloadIdentityServiceAccounts": ["uploads-janitor", "j2"]}}
    role = only(render(tmp_path, values), "ClusterRole", FULLNAME)
    assert token_rules(role["rules"]) == [
        {
            "apiGroups": [""],
            "resources": TOKEN_RESOURCE,
            "verbs": ["create"],
            "resourceNames": ["uploads-janitor", "j2"],
        }
    ]
    namespaced = render(tmp_path, {**values, "watchNamespaces": ["media"]})
    role = only(namespaced, "Role", FULLNAME)
    assert token_rules(role["rules"])[0]["resourceNames"] == ["uploads-janitor", "j2"]


def test_no_token_permission_when_workload_identity_is_off(tmp_path: Path) -> None:
    values: dict[str, Any] = {"credentials": {"workloadIdentityServiceAccounts": []}}
    assert token_rules(only(render(tmp_path, values), "ClusterRole", FULLNAME)["rules"]) == []
    values["watchNamespaces"] = ["media"]
    assert token_rules(only(render(tmp_path, values), "Role", FULLNAME)["rules"]) == []


def test_sts_endpoint_value(tmp_path: Path) -> None:
    values = {"credentials": {"stsEndpoint": "https://sts.eu-west-1.amazonaws.com"}}
    args = parsed_args(render(tmp_path, values))
    assert args.sts_endpoint == "https://sts.eu-west-1.amazonaws.com"
    error = render_error(tmp_path, {"credentials": {"stsEndpoint": "sts.example"}})
    assert "stsEndpoint" in error
