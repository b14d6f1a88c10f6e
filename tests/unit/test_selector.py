"""Sharding by label selector: the selector is checked at start (an error naming the flag),
passed to Kopf's watch, and a policy outside it is never scheduled."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from mpu_janitor import cli, handlers
from mpu_janitor.handlers import OperatorConfig, apply_selector
from mpu_janitor.selector import SelectorError, parse_selector


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("shard=a", {"shard": "a"}, True),
        ("shard=a", {"shard": "b"}, False),
        ("shard=a", {}, False),
        ("shard==a", {"shard": "a"}, True),
        ("shard!=a", {}, True),
        ("shard!=a", {"shard": "a"}, False),
        ("shard in (a, b)", {"shard": "b"}, True),
        ("shard in (a,b)", {"shard": "c"}, False),
        ("shard notin (a,b)", {"shard": "c"}, True),
        ("shard notin (a,b)", {}, True),
        ("shard", {"shard": ""}, True),
        ("!shard", {"shard": ""}, False),
        ("!shard", {"other": "x"}, True),
        ("team=x,shard in (a,b)", {"team": "x", "shard": "a"}, True),
        ("team=x,shard in (a,b)", {"team": "y", "shard": "a"}, False),
        ("example.com/shard=a", {"example.com/shard": "a"}, True),
        ("n>3", {"n": "4"}, True),
        ("n>3", {"n": "three"}, False),
        ("n<3", {"n": "2"}, True),
    ],
)
def test_selector_matches_like_the_api_server(
    text: str, labels: dict[str, str], expected: bool
) -> None:
    assert parse_selector(text).matches(labels) is expected


def test_selector_round_trips_to_the_api_servers_syntax() -> None:
    text = "team=x,shard in (a,b),!legacy,tier,n>2,zone!=z1"
    assert str(parse_selector(text)) == text
    assert str(parse_selector(" shard == a ,  tier  in ( gold , silver ) ")) == (
        "shard=a,tier in (gold,silver)"
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("shard=a,", "empty requirement"),
        ("shard=a,,b=c", "empty requirement"),
        ("shard in (a,b", "'(' without"),
        ("shard in a,b)", "')' without"),
        ("shard in a", "parentheses"),
        ("shard in ()", "at least one value"),
        ("shard=a b", "the value 'a b'"),
        ("shard=-a", "the value '-a'"),
        ("-shard=a", "the key '-shard'"),
        ("Example.com/shard=a", "prefix 'Example.com'"),
        ("/shard=a", "prefix ''"),
        ("!shard=a", "'!' takes a key alone"),
        ("shard a", "expected =, ==, !=, in"),
        ("n>x", "integer"),
        ("a" * 64 + "=b", "1 to 63"),
    ],
)
def test_bad_selectors_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(SelectorError, match=None) as raised:
        parse_selector(text)
    assert says in str(raised.value)


def test_operator_flag_refuses_a_bad_selector_naming_the_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(handlers, "run_operator", lambda **kwargs: started.append(kwargs) or 0)
    with pytest.raises(SystemExit) as exited:
        cli.main(["operator", "--standalone", "--selector", "shard in (a,b"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --selector" in error and "'(' without its ')'" in error
    assert started == []


def test_operator_flag_passes_the_parsed_selector(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(handlers, "run_operator", lambda **kwargs: started.append(kwargs) or 0)
    assert cli.main(["operator", "--standalone", "--selector", "shard = a"]) == 0
    assert str(started[0]["selector"]) == "shard=a"
    assert cli.main(["operator", "--standalone"]) == 0
    assert started[1]["selector"] is None


def test_the_watch_of_policies_carries_the_selector_and_nothing_else_does() -> None:
    settings = kopf.OperatorSettings()
    apply_selector(settings, OperatorConfig(selector=parse_selector("shard=a")))
    policies = kopf.Resource("mpu-janitor.dev", "v1alpha1", "uploadlifecyclepolicies")
    peerings = kopf.Resource("kopf.dev", "v1", "clusterkopfpeerings")
    namespaces = kopf.Resource("", "v1", "namespaces")
    assert list(settings.watching.label_selectors.collect(policies)) == ["shard=a"]
    assert list(settings.watching.label_selectors.collect(peerings)) == []
    assert list(settings.watching.label_selectors.collect(namespaces)) == []

    unsharded = kopf.OperatorSettings()
    apply_selector(unsharded, OperatorConfig())
    assert list(unsharded.watching.label_selectors.collect(policies)) == []


class FakeScheduler:
    def __init__(self) -> None:
        self.upserted: list[str] = []
        self.removed: list[str] = []

    def upsert(self, body: Any, *, initial: bool = False) -> None:
        self.upserted.append(body["metadata"]["name"])

    def remove(self, namespace: str, name: str) -> None:
        self.removed.append(name)


def policy_body(name: str, labels: dict[str, str]) -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "mpu-janitor.dev/v1alpha1",
            "kind": "UploadLifecyclePolicy",
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {},
        }
    )


async def test_a_policy_outside_the_selector_is_dropped_not_scheduled() -> None:
    scheduler = FakeScheduler()
    memo = kopf.Memo(scheduler=scheduler, config=OperatorConfig(selector=parse_selector("shard=a")))
    await handlers.on_policy_event(type=None, body=policy_body("mine", {"shard": "a"}), memo=memo)
    # Relabelled to another shard: the watch sends the last state (as DELETED, or MODIFIED
    # from a watch without the selector): either way the policy leaves this shard.
    await handlers.on_policy_event(
        type="MODIFIED", body=policy_body("mine", {"shard": "b"}), memo=memo
    )
    await handlers.on_policy_event(type="ADDED", body=policy_body("theirs", {}), memo=memo)
    assert scheduler.upserted == ["mine"]
    assert scheduler.removed == ["mine", "theirs"]
