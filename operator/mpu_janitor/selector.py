"""Kubernetes label selectors as ``kubectl -l`` takes them, for sharding policies between
operator releases (``mpu-janitor operator --selector``).

The API server filters the operator's watch with the selector; this module checks it first, so
a typo fails at start with a message naming the flag instead of an endless 400 from the watch,
and matches a policy's labels, so an object outside the shard is never scheduled even if one
reaches the operator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_OPERATOR = re.compile(r"^\s*(!?)\s*([^\s!=<>()]+)\s*(==|!=|=|<|>|\bnotin\b|\bin\b)?\s*(.*?)\s*$")
_INTEGER = re.compile(r"^-?[0-9]+$")


class SelectorError(ValueError):
    """A selector the API server would refuse: the message says which part and why."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!", "<", ">"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "exists":
            return value is not None
        if self.operator == "!":
            return value is None
        if self.operator in ("=", "in"):
            return value is not None and value in self.values
        if self.operator in ("!=", "notin"):
            return value is None or value not in self.values
        # "<" and ">": the label must be an integer (as the API server compares them).
        if value is None or not _INTEGER.match(value):
            return False
        bound = int(self.values[0])
        return int(value) < bound if self.operator == "<" else int(value) > bound

    def __str__(self) -> str:
        if self.operator == "exists":
            return self.key
        if self.operator == "!":
            return f"!{self.key}"
        if self.operator in ("in", "notin"):
            return f"{self.key} {self.operator} ({','.join(self.values)})"
        return f"{self.key}{self.operator}{self.values[0]}"


@dataclass(frozen=True)
class LabelSelector:
    """Requirements joined by "and", as in ``shard=a,tier in (gold,silver),!legacy``."""

    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(requirement.matches(labels) for requirement in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(requirement) for requirement in self.requirements)


def parse_selector(text: str) -> LabelSelector:
    """Parse a label selector; SelectorError says what is wrong with which requirement."""
    if not text.strip():
        raise SelectorError("is empty: leave it out to serve every policy")
    return LabelSelector(tuple(_requirement(part) for part in _split(text)))


def _split(text: str) -> list[str]:
    """The requirements: commas split them, except inside ``in (...)`` value lists."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"{text!r} has a ')' without its '('")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise SelectorError(f"{text!r} has a '(' without its ')'")
    parts.append(current)
    for part in parts:
        if not part.strip():
            raise SelectorError(f"{text!r} has an empty requirement (two commas, or one at an end)")
    return parts


def _requirement(part: str) -> Requirement:
    found = _OPERATOR.match(part)
    if found is None:
        raise SelectorError(f"{part.strip()!r} is not a requirement (key, key=value, ...)")
    negated, key, operator, rest = found.groups()
    _check_key(key, part)
    if negated:
        if operator or rest:
            raise SelectorError(f"{part.strip()!r}: '!' takes a key alone, as in '!{key}'")
        return Requirement(key, "!")
    if operator is None:
        if rest:
            raise SelectorError(
                f"{part.strip()!r}: expected =, ==, !=, in (...) or notin (...) after {key!r}"
            )
        return Requirement(key, "exists")
    if operator in ("in", "notin"):
        if not (rest.startswith("(") and rest.endswith(")")):
            raise SelectorError(f"{part.strip()!r}: {operator} takes a list in parentheses")
        values = tuple(value.strip() for value in rest[1:-1].split(","))
        if values == ("",):
            raise SelectorError(f"{part.strip()!r}: {operator} needs at least one value")
        for value in values:
            _check_value(value, part)
        return Requirement(key, operator, values)
    if operator in ("<", ">"):
        if not _INTEGER.match(rest):
            raise SelectorError(f"{part.strip()!r}: {operator} compares with an integer")
        return Requirement(key, operator, (rest,))
    _check_value(rest, part)
    return Requirement(key, "=" if operator == "==" else operator, (rest,))


def _check_key(key: str, part: str) -> None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _PREFIX.match(prefix)):
        raise SelectorError(
            f"{part.strip()!r}: the key's prefix {prefix!r} must be a DNS subdomain "
            "(lower case letters, digits, '-' and '.', at most 253 characters)"
        )
    if not _NAME.match(name):
        raise SelectorError(
            f"{part.strip()!r}: the key {name!r} must be 1 to 63 letters, digits, '-', '_' "
            "or '.', starting and ending with a letter or digit"
        )


def _check_value(value: str, part: str) -> None:
    if value and not _NAME.match(value):
        raise SelectorError(
            f"{part.strip()!r}: the value {value!r} must be at most 63 letters, digits, '-', "
            "'_' or '.', starting and ending with a letter or digit"
        )
