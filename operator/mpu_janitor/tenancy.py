"""What the installer lets tenants' policies use: the operator's own (ambient) credentials
only in listed namespaces, endpoints only past the allow-list (and never a metadata address
unless allowed), and scrubbing of credential-like text before it reaches logs, status or Events.

No Kopf, no Prometheus, no store code: the scheduler asks, the CLI and the operator configure.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from mpu_janitor.policy import ENDPOINT_PATTERN, Policy, endpoint_host

SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

# Instance metadata services (AWS IMDS, GCP, Azure, OpenStack: 169.254.169.254; ECS task
# credentials 169.254.170.2; AWS IMDS over IPv6 fd00:ec2::254) and the rest of link-local.
METADATA_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("fe80::/10"),
)

ERROR_TEXT_LIMIT = 300  # characters of a store's error text copied into status or Events


def operator_namespace(
    environ: dict[str, str] | None = None, namespace_file: str = SERVICE_ACCOUNT_NAMESPACE_FILE
) -> str | None:
    """The namespace the operator runs in: POD_NAMESPACE (the chart sets it from the downward
    API), else the ServiceAccount's namespace file; None when neither is there."""
    env = os.environ if environ is None else environ
    namespace = (env.get("POD_NAMESPACE") or "").strip()
    if namespace:
        return namespace
    try:
        with open(namespace_file, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def parse_namespaces(values: Iterable[str]) -> frozenset[str]:
    """``a,b`` and repeated flags alike; empty items are dropped."""
    return frozenset(item.strip() for value in values for item in value.split(",") if item.strip())


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a URL host spells literally, in any form an HTTP client would accept
    (``169.254.169.254``, ``2852039166``, ``0xa9.0xfe.0xa9.0xfe``, ``[fd00:ec2::254]``;
    ``[::ffff:a.b.c.d]`` is a.b.c.d); None for a host name (names are not resolved)."""
    host = host.strip().lower().removesuffix(".")
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            address = ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return None
        mapped = address.ipv4_mapped or address.sixtofour
        return mapped if mapped is not None else address
    if re.fullmatch(r"[0-9a-fx.]+", host) and not host.startswith("."):
        try:  # inet_aton takes the decimal, octal and hex forms resolvers accept
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def metadata_address(host: str) -> bool:
    """Whether a URL host is literally a link-local or metadata address, in any spelling."""
    address = literal_address(host)
    return address is not None and any(address in network for network in METADATA_NETWORKS)


def _canonical_host(host: str) -> str:
    address = literal_address(host)
    return str(address) if address is not None else host.strip().lower().removesuffix(".")


def _host_port(url: str) -> tuple[str, int]:
    """The canonical host and the port (the scheme's default when absent) of a URL."""
    authority = url.strip().partition("//")[2].partition("/")[0].rpartition("@")[2]
    if authority.startswith("["):
        host, _, rest = authority.partition("]")
        host, port = host + "]", rest.removeprefix(":")
    else:
        host, _, port = authority.partition(":")
    default = 443 if url.lower().startswith("https") else 80
    return _canonical_host(host), int(port) if port.isdigit() else default


# The API server's in-cluster names (any cluster domain after kubernetes.default.svc.).
_API_SERVER_NAME = re.compile(r"kubernetes(\.default(\.svc(\..+)?)?)?")


@dataclass(frozen=True)
class Tenancy:
    """The installer's rules. ``ambient_namespaces``: where a policy without a Secret may use
    the operator's own identity (empty: nowhere). ``allowed_endpoints``: when given, every
    endpoint must match one of these regular expressions (the whole URL); metadata addresses
    and the API server's own address are refused unless one of them matches.
    ``sts_endpoint``: where workload identity's tokens are exchanged (None: AWS STS in the
    target's region). ``api_servers``: the ``host:port`` of every API server the operator
    logged in to (:meth:`note_api_server`)."""

    ambient_namespaces: frozenset[str] = frozenset()
    allowed_endpoints: tuple[re.Pattern[str], ...] = ()
    sts_endpoint: str | None = None
    api_servers: set[tuple[str, int]] = field(default_factory=set, compare=False, hash=False)

    @classmethod
    def from_flags(
        cls,
        ambient_namespaces: Iterable[str],
        allowed_endpoints: Iterable[str],
        sts_endpoint: str | None = None,
    ) -> Tenancy:
        patterns = []
        for expression in allowed_endpoints:
            try:
                patterns.append(re.compile(expression))
            except re.error as error:
                raise ValueError(
                    f"--allowed-endpoints {expression!r} is not a regular expression: {error}"
                ) from None
        if sts_endpoint is not None and not re.fullmatch(ENDPOINT_PATTERN, sts_endpoint):
            raise ValueError(f"--sts-endpoint {sts_endpoint!r} is not an http(s) URL")
        return cls(frozenset(ambient_namespaces), tuple(patterns), sts_endpoint)

    def ambient_allowed(self, namespace: str) -> bool:
        return namespace in self.ambient_namespaces

    def note_api_server(self, server: str) -> None:
        """The API server Kopf (and our client) logged in to: refused as a store endpoint."""
        self.api_servers.add(_host_port(server))

    def api_server_refusal(
        self, endpoint: str, environ: Mapping[str, str] | None = None
    ) -> str | None:
        """Why ``endpoint`` is the API server's own address: its in-cluster names
        (kubernetes.default.svc...), the in-cluster Service address (KUBERNETES_SERVICE_HOST,
        any port), or an address the operator logged in to (that host and port)."""
        env = os.environ if environ is None else environ
        host, port = _host_port(endpoint)
        service = (env.get("KUBERNETES_SERVICE_HOST") or "").strip()
        if (
            _API_SERVER_NAME.fullmatch(host)
            or (service and host == _canonical_host(service))
            or (host, port) in self.api_servers
        ):
            return (
                f"{endpoint} is the Kubernetes API server's own address: refused unless the "
                "operator's --allowed-endpoints lists it (store credentials are never sent "
                "to it)"
            )
        return None

    def endpoint_refusal(self, endpoint: str) -> str | None:
        """Why the operator will not dial ``endpoint``, or None when it may."""
        if self.allowed_endpoints:
            if any(pattern.fullmatch(endpoint) for pattern in self.allowed_endpoints):
                return None
            return (
                f"{endpoint} is not allowed by the operator's --allowed-endpoints "
                f"({', '.join(p.pattern for p in self.allowed_endpoints)})"
            )
        if metadata_address(endpoint_host(endpoint)):
            return (
                f"{endpoint} is a link-local or instance-metadata address: refused unless "
                "the operator's --allowed-endpoints lists it"
            )
        return self.api_server_refusal(endpoint)

    def check_endpoints(self, policy: Policy) -> tuple[str, str] | None:
        """(field, why) for the first endpoint of a policy the operator refuses to dial."""
        store = policy.store
        candidates = (
            ("spec.store.s3.endpoint", store.s3.endpoint if store.s3 else None),
            ("spec.store.glacier.endpoint", store.glacier.endpoint if store.glacier else None),
            ("spec.store.lilt.endpoint", store.lilt.endpoint if store.lilt else None),
        )
        for where, endpoint in candidates:
            if endpoint is None:
                continue
            refusal = self.endpoint_refusal(endpoint)
            if refusal is not None:
                return where, refusal
        return None


# -- scrubbing secrets ---------------------------------------------------------------------------

REDACTED = "[REDACTED]"

# A value's opening: after ``:`` or ``=``, maybe a bytes repr's b and a quote.
_OPEN = r"['\"]?\s*[:=]\s*b?['\"]?"
_PATTERNS = (
    # Session tokens in headers, canonical requests, query strings and dict reprs.
    re.compile(rf"(?i)(x-amz-security-token{_OPEN}|x-amz-security-token%3d)[^\s'\",;&}}]+"),
    # SigV4: the access key in the credential scope and the signature itself.
    re.compile(r"(?i)((?:x-amz-)?credential\s*[=:]\s*)[^\s'\",;&}]+"),
    re.compile(rf"(?i)((?:x-amz-)?signature{_OPEN})[0-9a-f]{{16,}}"),
    re.compile(r"(?i)(signature:\s*\n?)[0-9a-f]{64}"),
    # HTTP auth headers (Basic carries the LILT key), and SigV2 "AWS AKID:sig".
    re.compile(rf"(?i)(authorization{_OPEN})(?:basic|bearer|aws4?-[\w-]+|aws)\s[^'\"\n}}]+"),
    re.compile(
        rf"(?i)((?:aws_)?(?:secret_access_key|session_token|api_key|apikey|password){_OPEN})"
        r"[^\s'\",;&}]+"
    ),
)


class KnownSecrets:
    """Secret values seen by this process (the credentials Secret's, the CLI's environment,
    workload identity's tokens and temporary credentials): they are replaced wherever they
    appear, whatever surrounds them. A value added with ``ttl`` (seconds) is dropped once it
    has expired, so renewing credentials do not make every log line scan a growing list."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._values: dict[str, float | None] = {}  # value -> deadline (None: for good)
        self._clock = clock
        self._lock = threading.Lock()

    def add(self, *values: str | None, ttl: float | None = None) -> None:
        deadline = None if ttl is None else self._clock() + ttl
        # Each value as given and base64-encoded, the way a Secret's data holds it.
        spellings = [
            spelling
            for value in values
            if value and len(value) >= 6
            for spelling in (value, base64.b64encode(value.encode()).decode())
        ]
        with self._lock:
            for value in spellings:
                current = self._values.get(value, 0.0)
                if current is None or deadline is None:
                    self._values[value] = None
                else:
                    self._values[value] = max(current, deadline)

    def discard(self, *values: str | None) -> None:
        with self._lock:
            for value in values:
                self._values.pop(value or "", None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def replace(self, text: str) -> str:
        now = self._clock()
        with self._lock:
            expired = [v for v, deadline in self._values.items() if deadline and deadline < now]
            for value in expired:
                del self._values[value]
            values = sorted(self._values, key=len, reverse=True)
        for value in values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


known_secrets = KnownSecrets()


def remember_environment_secrets(environ: dict[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    known_secrets.add(
        *(
            env.get(name)
            for name in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN",
                "LILT_API_KEY",
            )
        )
    )


def scrub(text: str, limit: int | None = None) -> str:
    """Text with anything credential-like replaced; at most ``limit`` characters."""
    text = known_secrets.replace(text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class RedactingFilter(logging.Filter):
    """A handler filter: the record's message (and traceback) is rendered and scrubbed."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Scrub every record the root logger's handlers emit (botocore's debug output too)."""
    root = logger or logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
