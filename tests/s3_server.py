"""A real S3 HTTP endpoint for tests: moto's threaded server on 127.0.0.1, a free port, in-memory data.

Why moto: no MinIO, SeaweedFS or Garage server installs from the package registries this project can reach;
moto's server speaks the S3 protocol over HTTP, so s3fs and pyarrow exercise the same code path as against MinIO
or AWS.

Use the context manager anywhere, or the session-scoped ``s3_endpoint`` fixture (import it into a test module
or a ``conftest.py``: ``from tests.s3_server import s3_endpoint  # noqa: F401``)::

    def test_x(s3_endpoint):
        uri = s3_endpoint.uri("run", "item_paths")       # s3://<bucket>/run/item_paths
        write_item_paths(paths, uri, run_id="r", endpoint_url=s3_endpoint.endpoint_url)

While the server runs, ``MIP_S3_ENDPOINT_URL`` points at it and the AWS variables hold dummy credentials, so
code that takes its endpoint from configuration works unchanged; all of them are restored afterwards. Data
lives in memory for the lifetime of the server: give each test its own prefix
(``s3_endpoint.uri(request.node.name)``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["S3Server", "moto_s3_server", "s3_endpoint"]

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_CLEARED = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


@dataclass(frozen=True)
class S3Server:
    """A running server: its endpoint, one bucket created on it, and an s3fs filesystem bound to it."""

    endpoint_url: str
    bucket: str
    fs: Any  # s3fs.S3FileSystem

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts joined by '/'>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])


@contextmanager
def moto_s3_server(bucket: str = "mip-test") -> Iterator[S3Server]:
    """Start moto on ``127.0.0.1:<free port>``, create ``bucket``, yield; always stop it and restore env."""
    import s3fs
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in (*_ENV, *_CLEARED, "MIP_S3_ENDPOINT_URL")}
    werkzeug = logging.getLogger("werkzeug")
    saved_level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()  # the real port; port=0 asked the OS for a free one
        endpoint = f"http://{host}:{port}"
        os.environ.update(_ENV)
        for key in _CLEARED:
            os.environ.pop(key, None)
        os.environ["MIP_S3_ENDPOINT_URL"] = endpoint
        # Path-style addressing, and no region_name in client_kwargs: with it, bucket creation sends a
        # location constraint the server rejects. skip_instance_cache: never reuse one bound to an old server.
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            config_kwargs={"s3": {"addressing_style": "path"}},
            skip_instance_cache=True,
        )
        fs.mkdir(bucket)
        yield S3Server(endpoint_url=endpoint, bucket=bucket, fs=fs)
    finally:
        server.stop()
        werkzeug.setLevel(saved_level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Server]:
    """A moto S3 server with bucket ``mip-test``, shared by the session: give each test its own prefix."""
    with moto_s3_server() as server:
        yield server
