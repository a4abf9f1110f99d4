"""fsspec access to local paths and object stores, with the S3 endpoint taken from configuration.

Production points ``MIP_S3_ENDPOINT_URL`` (or the standard ``AWS_ENDPOINT_URL``) at MinIO or leaves it unset for
AWS; credentials come from the usual AWS variables or profiles. Nothing here hard-codes a host or a bucket.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


def is_remote(uri: str) -> bool:
    """True for ``s3://``, ``gs://``, ... ; False for plain paths and ``file://``."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return protocol not in ("file", "local")


def s3_max_attempts() -> int:
    """Attempts per S3 call (first try included) before an error reaches the caller: ``$MIP_S3_MAX_ATTEMPTS``,
    default 5 (about 10 s of backoff against a dead endpoint; Prefect's step retries cover longer outages)."""
    raw = os.environ.get("MIP_S3_MAX_ATTEMPTS", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MIP_S3_MAX_ATTEMPTS={raw!r} must be a positive integer")
    return int(raw)


def storage_options(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """Options for ``fsspec`` on ``uri``: for S3, the endpoint (argument, then environment) and path-style URLs.

    ``region_name`` is deliberately not passed: bucket creation would then send a location constraint that
    S3-compatible servers reject; set ``AWS_DEFAULT_REGION`` instead.
    """
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    endpoint = endpoint_url or os.environ.get("MIP_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    # botocore's "standard" retry mode: exponential backoff with jitter on throttling, 5xx and connection errors
    options: dict[str, Any] = {"config_kwargs": {"s3": {"addressing_style": "path"},
                                                 "retries": {"mode": "standard", "max_attempts": s3_max_attempts()}}}
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem serving ``uri`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, endpoint_url))
    return fs, path
