"""The service store on a real S3 HTTP endpoint (moto): the local-folder checks, plus S3 specifics."""

from __future__ import annotations

import pytest

from mip_core.service.store import ServiceStore

from s3_server import S3Server
from unit.test_service_lease import check_exclusive_create, check_lease, check_racing_claimers
from unit.test_service_store import _model_folder, check_lifecycle, check_registry


def test_lifecycle_s3(s3_endpoint: S3Server):
    root = s3_endpoint.uri("service")
    store = ServiceStore(root, endpoint_url=s3_endpoint.endpoint_url)
    assert store.uri("requests/pending/x.json") == f"{root}/requests/pending/x.json"
    check_lifecycle(store)
    # a second client (another process: the CLI vs the nightly flow) sees the same queue, no stale listing
    other = ServiceStore(root)  # endpoint from MIP_S3_ENDPOINT_URL
    assert [(r.request_id, r.state) for r in other.list()] == [("r1", "done"), ("r2", "pending"),
                                                               ("r3", "rejected")]
    store.claim(["r2"], store.new_batch_id())
    assert [r.request_id for r in other.list("claimed")] == ["r2"] and other.list("pending") == []


def test_registry_s3_from_local_and_s3_sources(s3_endpoint: S3Server, tmp_path):
    store = ServiceStore(s3_endpoint.uri("registry"), endpoint_url=s3_endpoint.endpoint_url)
    check_registry(store, str(_model_folder(tmp_path / "src")))  # local -> S3
    # S3 -> S3: publish a batch's edited model
    v3 = store.register_model("demo", store.uri("models/demo/v0002"), dataset_uri="bench://x",
                              lineage={"batch_id": "b2"})
    assert v3 == "v0003" and store.model_info("demo")["parent_version"] == "v0001"  # v0001 was made current
    assert store.read_bytes("models/demo/v0003/sub/w.bin") == bytes(range(256)) * 10


def test_creates_missing_bucket(s3_endpoint: S3Server):
    store = ServiceStore("s3://mip-fresh-bucket/svc", endpoint_url=s3_endpoint.endpoint_url)
    assert store.list() == []
    store.write_json("batches/b1/manifest.json", {"ok": True})
    assert s3_endpoint.fs.exists("mip-fresh-bucket/svc/batches/b1/manifest.json")


def test_lease_s3(s3_endpoint: S3Server):
    """Exclusive creation is a conditional PUT (If-None-Match: *) on S3: the lease holds across processes."""
    store = ServiceStore(s3_endpoint.uri("lease"), endpoint_url=s3_endpoint.endpoint_url)
    check_exclusive_create(store)
    check_lease(store)
    check_racing_claimers(store)


def test_a_dead_endpoint_fails_clearly_and_changes_nothing(s3_endpoint: S3Server, monkeypatch):
    """No server behind the endpoint: after the client's retries, one error naming the store, the endpoint and
    the fix (not a bare botocore URL)."""
    import socket

    from mip_core.service.store import StoreUnavailable

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MIP_S3_MAX_ATTEMPTS", "2")
    store = ServiceStore("s3://mip-test/dead", endpoint_url=dead)
    with pytest.raises(StoreUnavailable, match=rf"s3://mip-test/dead is unreachable at {dead} .*retried 2 times"
                                               r".*MIP_S3_ENDPOINT_URL"):
        store.list("pending")
    with pytest.raises(StoreUnavailable, match="write_bytes"):
        store.write_json("requests/pending/x.json", {})
    monkeypatch.setenv("MIP_S3_MAX_ATTEMPTS", "zero")
    with pytest.raises(ValueError, match="MIP_S3_MAX_ATTEMPTS='zero' must be a positive integer"):
        ServiceStore("s3://mip-test/dead", endpoint_url=dead)


def test_report_link_of_an_s3_store_is_a_presigned_link_a_browser_can_open(s3_endpoint: S3Server, monkeypatch):
    """The Prefect UI cannot open s3:// URIs: the link is a presigned HTTP(S) GET, served as HTML, that expires."""
    import urllib.error
    import urllib.request

    from mip_core.service.links import report_link

    store = ServiceStore(s3_endpoint.uri("links"), endpoint_url=s3_endpoint.endpoint_url)
    store.write_text(store.batch_key("b1", "report.html"), "<html><body>the report</body></html>")
    link = report_link(store, "b1")
    assert link.url.startswith(s3_endpoint.endpoint_url) and "Signature" in link.url and link.expires_at
    with urllib.request.urlopen(link.url, timeout=10) as response:  # no credentials: only the signature
        assert response.headers["Content-Type"].startswith("text/html")
        assert response.read() == b"<html><body>the report</body></html>"
    unsigned = link.url.split("?", 1)[0]
    with pytest.raises(urllib.error.HTTPError):  # without the signature the object is not public
        urllib.request.urlopen(unsigned, timeout=10)
    monkeypatch.setenv("MIP_REPORT_LINK_TTL_S", "3600")
    import time
    from urllib.parse import parse_qs, urlsplit

    # the test server does not enforce expiry (AWS and MinIO do): check what the signature says instead
    query = parse_qs(urlsplit(report_link(store, "b1").url).query)
    if "X-Amz-Expires" in query:  # SigV4: seconds from signing
        assert query["X-Amz-Expires"] == ["3600"]
    else:  # SigV2 (what botocore signs for this endpoint): the expiry as a Unix time
        assert abs(int(query["Expires"][0]) - (time.time() + 3600)) < 60
