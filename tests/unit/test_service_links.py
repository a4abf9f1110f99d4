"""`mip report --serve`: the batch reports, and nothing else of the store, over HTTP on 127.0.0.1."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from mip_core.errors import InputError
from mip_core.service.links import link_ttl_s, report_link, report_server
from mip_core.service.requests import ForgetRequest
from mip_core.service.store import ServiceStore


def test_the_report_server_serves_reports_and_nothing_else(tmp_path, monkeypatch):
    store = ServiceStore(str(tmp_path))
    store.write_text(store.batch_key("b1", "report.html"), "<html>figures</html>")
    store.submit(ForgetRequest(request_id="r1", target_model="m", subjects=["p1"], requester="t", reason="privacy"))
    server = report_server(store, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MIP_REPORT_URL", base)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        link = report_link(store, "b1")
        assert link.url == f"{base}/batches/b1/report.html" and link.expires_at is None
        with urllib.request.urlopen(link.url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/html")
            assert response.read() == b"<html>figures</html>"
        for private in ("/requests/pending/r1.json", "/batches/b1/../../requests/pending/r1.json",
                        "/batches/b1/manifest.json", "/batches/nope/report.html"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(base + private, timeout=10)
            assert caught.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_a_bad_link_ttl_names_the_variable_and_the_range(monkeypatch):
    monkeypatch.setenv("MIP_REPORT_LINK_TTL_S", "999999999")
    with pytest.raises(InputError, match="MIP_REPORT_LINK_TTL_S=.*from 1 to 604800"):
        link_ttl_s()
