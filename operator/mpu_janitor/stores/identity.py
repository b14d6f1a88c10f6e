"""Store target identity: one bucket or vault has one lock key, whatever the spelling of its
endpoint, region or account (DESIGN section 3: two policies never sweep one target at once).

What is normalised, and why each choice errs towards one lock (two spellings that might be
one target share a lock; the cost of a shared lock is only that two sweeps take turns):
- an endpoint: scheme and host lower-cased, a trailing dot of the host, the default port
  (80 for http, 443 for https), user info, query, fragment and trailing slashes dropped;
- AWS S3 (no endpoint, or an ``s3…amazonaws.com`` endpoint): bucket names are global, so the
  target is "AWS S3" whatever ``region`` says;
- Glacier: a vault is named by its region and name only. The account is left out: ``-`` means
  "the account of the credentials", which only AWS can resolve (an STS call per sweep, and
  credentials that may lack the permission), and two accounts each with a vault of one name in
  one region merely take turns.
DNS aliases of one host (``minio.storage`` and ``minio.storage.svc.cluster.local``) and
addresses are not resolved: spell one endpoint the same way in every policy.
"""

from __future__ import annotations

import re
import urllib.parse

DEFAULT_PORTS = {"http": 80, "https": 443}

# s3.amazonaws.com, s3.eu-west-1.amazonaws.com, s3-eu-west-1…, s3.dualstack.…, s3-fips.…
_AWS_S3_HOST = re.compile(r"^s3([.-][a-z0-9.-]+)?\.amazonaws\.com(\.cn)?$")
# glacier.us-east-1.amazonaws.com, glacier-fips.us-east-1.amazonaws.com
_AWS_GLACIER_HOST = re.compile(r"^glacier(-fips)?\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")


def normal_endpoint(endpoint: str) -> str:
    """The one spelling of an endpoint URL used for identity (never for requests)."""
    parts = urllib.parse.urlsplit(endpoint.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")  # urlsplit lower-cases the host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # not a number: keep the text, it identifies something at least
        port = None
        host = parts.netloc.rpartition("@")[2].lower()
    if port is not None and port != DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    path = re.sub(r"/+", "/", parts.path).rstrip("/")
    return f"{scheme}://{host}{path}"


def _host(endpoint: str) -> str:
    return (urllib.parse.urlsplit(endpoint.strip()).hostname or "").rstrip(".")


def s3_target_id(endpoint: str | None) -> str:
    """Bucket names are global on AWS S3: one identity for every region and regional endpoint."""
    if endpoint is None or _AWS_S3_HOST.match(_host(endpoint)):
        return "s3:aws"
    return f"s3:{normal_endpoint(endpoint)}"


def glacier_target_id(endpoint: str | None, region: str) -> str:
    """A vault is its region (or non-AWS endpoint) and name; the account is left out."""
    if endpoint is not None:
        aws = _AWS_GLACIER_HOST.match(_host(endpoint))
        if aws is None:
            return f"glacier:{normal_endpoint(endpoint)}"
        region = aws.group(2)
    return f"glacier:aws:{region.strip().lower()}"
