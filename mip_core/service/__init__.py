"""The nightly unlearning service's library side: request schema, state store, request resolution.

Pure library (no Prefect or Ray): the flows in ``flows/`` and tasks in ``tasks/`` call these.
"""

from __future__ import annotations

from .requests import (
    STATES,
    ForgetItem,
    ForgetRequest,
    RequestRecord,
    RequestState,
    parse_request,
    request_json_schema,
)
from .resolve import ResolvedBatch, resolve_requests, retain_items
from .store import ServiceStore

__all__ = [
    "STATES",
    "ForgetItem",
    "ForgetRequest",
    "RequestRecord",
    "RequestState",
    "ResolvedBatch",
    "ServiceStore",
    "parse_request",
    "request_json_schema",
    "resolve_requests",
    "retain_items",
]
