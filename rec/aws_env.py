"""The S3 endpoint and region as boto3 reads them, for clients that do not (pyarrow's).

Endpoint, in boto3's order: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the `s3` entry of
the profile's `services` section, the profile's `endpoint_url`; none of
them when `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS` (or the profile's
`ignore_configured_endpoint_urls`) is true. Region: `AWS_REGION` > `AWS_DEFAULT_REGION` >
the profile's `region` (AWS CLI v2 order; boto3 itself reads only the last two). The
profile is `AWS_PROFILE` (else `AWS_DEFAULT_PROFILE`, else "default") in `AWS_CONFIG_FILE`
(default ~/.aws/config). Credentials are not read here: the AWS SDK's chain finds them.
"""

from __future__ import annotations

import configparser
import os


def _config() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(os.path.expanduser(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")))
    return config


def _profile(config: configparser.ConfigParser) -> configparser.SectionProxy | None:
    name = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    section = name if name == "default" else f"profile {name}"
    return config[section] if config.has_section(section) else None


def s3_endpoint() -> str | None:
    """The S3 endpoint boto3 would use: env, then the profile's services section, then profile."""
    config = _config()
    profile = _profile(config)
    ignore = os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    if ignore or (
        profile is not None
        and profile.get("ignore_configured_endpoint_urls", "").lower() == "true"
        and "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS" not in os.environ
    ):
        return None
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    if profile is None:
        return None
    services = profile.get("services")
    if services:
        nested = config.get(f"services {services}", "s3", fallback="")
        # boto3's nested form: "s3 =\n  endpoint_url = http://..."
        for line in nested.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "endpoint_url" and value.strip():
                return value.strip()
    return profile.get("endpoint_url") or None


def region() -> str | None:
    """`AWS_REGION` > `AWS_DEFAULT_REGION` > the profile's region; None lets the SDK decide."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(var):
            return os.environ[var]
    profile = _profile(_config())
    return profile.get("region") if profile is not None else None


def credentials_found() -> bool:
    """Whether any credential source besides instance metadata is configured (for hints only)."""
    env = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")
    env += ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if any(os.environ.get(var) for var in env):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    return os.path.exists(os.path.expanduser(shared)) or _profile(_config()) is not None
