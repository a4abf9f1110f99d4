"""Links to a batch's HTML report that an operator can click in the Prefect UI.

A browser refuses ``file://`` links from an ``http://`` page, and it cannot open ``s3://``. So:

- an S3 store gets a presigned HTTPS link (``GetObject`` signed with the worker's credentials, served as
  ``text/html``), valid for ``MIP_REPORT_LINK_TTL_S`` seconds (default 7 days, the longest S3's SigV4 signs);
- a local store gets an ``http://`` link to ``mip report --serve``, a read-only server on 127.0.0.1 that serves
  the batch reports and nothing else of the store (no requests, no uploads: they hold personal data).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mip_core.errors import InputError
from mip_core.service.requests import iso_utc, utc_now
from mip_core.service.store import ServiceStore

DEFAULT_TTL_S = 7 * 24 * 3600
DEFAULT_SERVE_URL = "http://127.0.0.1:8765"
_REPORT_PATH = re.compile(r"/batches/([A-Za-z0-9][A-Za-z0-9._-]*)/(report\.html|report\.md)")


@dataclass(frozen=True)
class ReportLink:
    url: str
    expires_at: str | None  # ISO 8601 UTC; None: a local link, valid while `mip report --serve` runs
    how: str  # one line for people: what the link is and how long it works


def link_ttl_s() -> int:
    raw = os.environ.get("MIP_REPORT_LINK_TTL_S", str(DEFAULT_TTL_S))
    if not raw.isdigit() or not 1 <= int(raw) <= DEFAULT_TTL_S:
        raise InputError(f"MIP_REPORT_LINK_TTL_S={raw!r}: give whole seconds from 1 to {DEFAULT_TTL_S} (7 days, "
                         "the longest a presigned S3 link can be valid)")
    return int(raw)


def serve_url() -> str:
    """Where ``mip report --serve`` listens (``MIP_REPORT_URL``, default http://127.0.0.1:8765)."""
    return os.environ.get("MIP_REPORT_URL", DEFAULT_SERVE_URL).rstrip("/")


def report_link(store: ServiceStore, batch_id: str, name: str = "report.html") -> ReportLink:
    """A clickable link to ``batches/<batch_id>/<name>``."""
    key = store.batch_key(batch_id, name)
    if store.remote:
        ttl = link_ttl_s()
        url = store.fs.url(store._path(key), expires=ttl, ResponseContentType="text/html; charset=utf-8")
        expires = iso_utc(utc_now() + timedelta(seconds=ttl))
        return ReportLink(url, expires, f"presigned S3 link, valid until {expires}")
    return ReportLink(f"{serve_url()}/{key}", None,
                      f"served by `mip report --serve --root {store.root}` while it runs")


class _ReportHandler(BaseHTTPRequestHandler):
    store: ServiceStore  # set on the subclass made by serve_reports

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        match = _REPORT_PATH.fullmatch(self.path.split("?", 1)[0])
        key = self.store.batch_key(match.group(1), match.group(2)) if match else None
        if key is None or not self.store.exists(key):
            self.send_error(HTTPStatus.NOT_FOUND, "only /batches/<batch id>/report.html (or .md) is served")
            return
        body = self.store.read_bytes(key)
        kind = "text/html" if key.endswith(".html") else "text/markdown"
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: one line per request is noise
        return


def report_server(store: ServiceStore, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server (not yet serving: call ``serve_forever``) for the store's batch reports."""
    handler = type("ReportHandler", (_ReportHandler,), {"store": store})
    return ThreadingHTTPServer((host, port), handler)


__all__ = ["ReportLink", "link_ttl_s", "report_link", "report_server", "serve_url"]
