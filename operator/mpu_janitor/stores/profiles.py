"""S3 provider profiles (quirks as data, from profiles.yaml beside this file)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

import yaml


@dataclass(frozen=True)
class S3Profile:
    name: str
    addressing_style: str
    prefix_is_exact_key: bool
    aws_checksums: bool
    directory_buckets: bool
    bucket_suffix_regex: str | None = None
    self_expiry: str | None = None
    self_expiry_seconds: int | None = None  # the age at which the store aborts uploads itself
    abort_may_delete_object: bool = False
    unknown_abort_answers_204: bool = False

    @property
    def default_object_rule(self) -> str:
        """spec.store.s3.abortWhenKeyHasObject when the policy does not say."""
        return "Never" if self.abort_may_delete_object else "Always"

    # Policy rules (read by mpu_janitor/policy.py; see the header of profiles.yaml).
    requires_endpoint: bool = False
    endpoint_domains: tuple[str, ...] = ()
    endpoint_host: str | None = None
    endpoint_example: str | None = None
    no_expected_bucket_owner: str | None = None
    no_request_payer: str | None = None

    # Listing quirks (read by stores/s3.py; see the header of profiles.yaml).
    url_encoding: str = "echoed"
    list_parts_gone_codes: tuple[str, ...] = ()
    listing_proves_gone: str = "never"

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoint_domains", tuple(self.endpoint_domains))
        if self.url_encoding not in ("echoed", "keys_only"):
            raise ValueError(f"profile {self.name}: url_encoding {self.url_encoding!r}")
        object.__setattr__(self, "list_parts_gone_codes", tuple(self.list_parts_gone_codes))
        if self.listing_proves_gone not in ("never", "consistent", "node_table"):
            raise ValueError(
                f"profile {self.name}: listing_proves_gone {self.listing_proves_gone!r}"
            )

    def bucket_name_problem(self, bucket: str) -> str | None:
        """Why this provider would reject the bucket name, or None."""
        if self.bucket_suffix_regex and not re.search(self.bucket_suffix_regex, bucket):
            return (
                f"{bucket!r} does not match {self.bucket_suffix_regex!r} required by {self.name} "
                "(Tencent COS bucket names end with the APPID, e.g. uploads-1250000000)"
            )
        return None


@functools.cache
def load_profiles() -> dict[str, S3Profile]:
    text = resources.files("mpu_janitor.stores").joinpath("profiles.yaml").read_text("utf-8")
    return {name: S3Profile(name=name, **flags) for name, flags in yaml.safe_load(text).items()}


def profile(name: str) -> S3Profile:
    return load_profiles()[name]
