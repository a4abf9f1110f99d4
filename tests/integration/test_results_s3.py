"""Item paths and path graphs through a real S3 HTTP endpoint (moto): the code path used against MinIO/AWS."""

from __future__ import annotations

import socket

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mip_core.path_graph import reduce_paths
from mip_core.parquet_io import (
    MANIFEST_FILE,
    ArtifactError,
    read_item_paths,
    read_manifest,
    read_path_graph,
    write_item_paths,
    write_path_graph,
)
from mip_core.storage import filesystem
from mip_core.types import ItemPath, PathNode

from s3_server import S3Server

PATHS = [
    ItemPath(
        "q1", "req-a", "language", (PathNode(0, 0, 9, 0.75), PathNode(0, 1, 4, 0.25), PathNode(1, 0, 3, 1.5))
    ),
    ItemPath("q2", "req-b", "language", (PathNode(0, 0, 9, 0.5), PathNode(1, 0, 2, 1.0))),
    ItemPath("q1", "req-a", "vision", (PathNode(0, 0, 0, 3.0), PathNode(1, 0, 7, 1.0))),
]


def _canonical(paths: list[ItemPath]) -> list[ItemPath]:
    return sorted(paths, key=lambda p: (p.tower, p.item_id))


def test_round_trip_through_s3(s3_endpoint: S3Server):
    ip_uri, graph_uri = s3_endpoint.uri("rt", "item_paths"), s3_endpoint.uri("rt", "path_graph")
    ref = write_item_paths(PATHS, ip_uri, run_id="run-s3", endpoint_url=s3_endpoint.endpoint_url)
    assert (ref.uri, ref.n_rows) == (ip_uri, 7)
    assert read_item_paths(ref.uri, endpoint_url=s3_endpoint.endpoint_url) == _canonical(PATHS)

    graph = reduce_paths(read_item_paths(ref.uri), run_id="run-s3")  # endpoint from MIP_S3_ENDPOINT_URL
    gref = write_path_graph(graph, graph_uri)
    assert read_path_graph(gref.uri) == graph
    assert read_manifest(gref.uri).n_rows == len(graph) == 6

    keys = sorted(s3_endpoint.fs.find(f"{s3_endpoint.bucket}/rt/item_paths"))
    assert [k.split("/item_paths/", 1)[1] for k in keys] == [
        MANIFEST_FILE, "tower=language/part-00000.parquet", "tower=vision/part-00000.parquet"]  # fmt: skip


def test_pyarrow_dataset_over_s3fs(s3_endpoint: S3Server):
    uri = s3_endpoint.uri("pa", "item_paths")
    write_item_paths(PATHS, uri, run_id="r")
    fs, path = filesystem(uri, s3_endpoint.endpoint_url)
    dataset = ds.dataset(path, filesystem=fs, partitioning="hive")
    assert dataset.count_rows() == 7
    vision = dataset.to_table(filter=ds.field("tower") == "vision")
    assert vision.num_rows == 2 and set(vision.column("tower").to_pylist()) == {"vision"}
    part = pq.read_table(f"{path}/tower=language/part-00000.parquet", filesystem=fs)
    assert part.num_rows == 5 and part.schema.metadata[b"mip.schema"] == b"item_paths/1"


def test_overwrite_on_s3_leaves_neighbours_alone(s3_endpoint: S3Server):
    """Overwriting ``.../ip`` deletes its old parts, not those of ``.../ip_other`` (a shared key prefix)."""
    uri, other = s3_endpoint.uri("ow", "ip"), s3_endpoint.uri("ow", "ip_other")
    write_item_paths(PATHS, uri, run_id="old")
    write_item_paths(PATHS, other, run_id="other")
    language = [p for p in PATHS if p.tower == "language"]
    write_item_paths(language, uri, run_id="new")
    assert read_item_paths(uri) == _canonical(language)
    assert not s3_endpoint.fs.exists(f"{s3_endpoint.bucket}/ow/ip/tower=vision/part-00000.parquet")
    assert read_item_paths(other) == _canonical(PATHS)
    empty = write_item_paths([], uri, run_id="empty")
    assert empty.n_rows == 0 and read_item_paths(uri) == []


def test_missing_bucket_and_dataset_are_clear(s3_endpoint: S3Server):
    with pytest.raises(ArtifactError, match="bucket 'no-such-bucket' does not exist") as err:
        write_item_paths(PATHS, "s3://no-such-bucket/run/ip", run_id="r")
    assert s3_endpoint.endpoint_url in str(err.value)
    assert not s3_endpoint.fs.exists("no-such-bucket")  # the writer did not create it behind our back
    with pytest.raises(ArtifactError, match="bucket 'no-such-bucket' does not exist"):
        read_item_paths("s3://no-such-bucket/run/ip")
    with pytest.raises(ArtifactError, match="no dataset at"):
        read_path_graph(s3_endpoint.uri("nothing", "here"))


def test_unreachable_endpoint_is_clear(s3_endpoint: S3Server, monkeypatch):
    monkeypatch.setenv("MIP_S3_MAX_ATTEMPTS", "1")  # the store's retries with backoff would take ~13 s
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ArtifactError, match="cannot reach the object store") as err:
        read_manifest(s3_endpoint.uri("x"), endpoint_url=dead)
    assert dead in str(err.value) and "MIP_S3_ENDPOINT_URL" in str(err.value)
