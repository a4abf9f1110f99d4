"""Parquet datasets of item paths and path graphs on a local directory: layout, round trips, schema checks."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mip_core.errors import InputError, MipError
from mip_core.path_graph import GraphNode, PathGraph, reduce_paths
from mip_core.parquet_io import (
    ITEM_PATHS_V1,
    MANIFEST_FILE,
    PATH_GRAPH_V1,
    ArtifactError,
    ArtifactRef,
    SchemaMismatchError,
    item_paths_table,
    read_dataset,
    read_item_paths,
    read_item_paths_table,
    read_manifest,
    read_path_graph,
    write_dataset,
    write_item_paths,
    write_path_graph,
)
from mip_core.types import ItemPath
from path_builders import item_path


_path = item_path


PATHS = [
    _path("q2", "req-b", "language", [(5, 0.5), (9, 0.25)], [(1, 2.0), (3, 1.0)]),
    _path("q1", "req-a", "language", [(9, 0.75), (4, 0.125)], [(3, 1.5), (2, 0.5)]),
    _path("q1", "req-a", "vision", [(0, 3.0), (7, 1.0)]),
    _path("q3", None, "vision", [(7, 0.5), (2, 0.25)]),
]


def _canonical(paths: list[ItemPath]) -> list[ItemPath]:
    return sorted(paths, key=lambda p: (p.tower, p.item_id, p.request_id is None, p.request_id or ""))


def test_item_paths_round_trip(tmp_path):
    ref = write_item_paths(PATHS, str(tmp_path / "ip"), run_id="run-1")
    assert ref == ArtifactRef(uri=str(tmp_path / "ip"), schema="item_paths/1", n_rows=12)
    assert read_item_paths(ref.uri) == _canonical(PATHS)
    table = read_item_paths_table(ref.uri)
    assert table.schema.equals(ITEM_PATHS_V1, check_metadata=True)
    assert set(table.column("run_id").to_pylist()) == {"run-1"}


def test_layout_partitions_and_manifest(tmp_path):
    root = tmp_path / "ip"
    write_item_paths(PATHS, str(root), run_id="run-1")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        MANIFEST_FILE,
        "tower=language/part-00000.parquet",
        "tower=vision/part-00000.parquet",
    ]
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    assert (manifest["schema"], manifest["run_id"], manifest["n_rows"]) == ("item_paths/1", "run-1", 12)
    assert [(f["path"], f["n_rows"]) for f in manifest["files"]] == [
        ("tower=language/part-00000.parquet", 8),
        ("tower=vision/part-00000.parquet", 4),
    ]
    assert read_manifest(str(root)).n_rows == 12
    # one part read alone by a plain Parquet reader is self-describing
    part = pq.read_table(root / "tower=vision" / "part-00000.parquet")
    assert part.schema.metadata[b"mip.schema"] == b"item_paths/1"
    assert set(part.column("tower").to_pylist()) == {"vision"} and part.num_rows == 4


def test_pyarrow_dataset_hive_reads_same_rows_and_filters(tmp_path):
    root = str(tmp_path / "ip")
    write_item_paths(PATHS, root, run_id="run-1")
    ours = read_item_paths_table(root)
    dataset = ds.dataset(root, partitioning="hive")
    assert dataset.schema.field("tower").type == pa.string()
    theirs = dataset.to_table().select(ITEM_PATHS_V1.names).cast(ITEM_PATHS_V1)
    order = [(c, "ascending") for c in ("tower", "item_id", "layer", "rank")]
    assert theirs.sort_by(order).equals(ours.sort_by(order))
    vision = dataset.to_table(filter=ds.field("tower") == "vision")
    assert vision.num_rows == 4 and set(vision.column("tower").to_pylist()) == {"vision"}
    assert sorted(set(vision.column("item_id").to_pylist())) == ["q1", "q3"]


def test_duckdb_and_polars_read_the_datasets(tmp_path):
    """Other Parquet readers see the same rows, with ``tower`` recovered from the hive partition."""
    import duckdb
    import polars as pl

    root = tmp_path / "ip"
    write_item_paths(PATHS, str(root), run_id="run-1")
    ours = read_item_paths_table(str(root))
    expected = sorted(zip(ours.column("tower").to_pylist(), ours.column("item_id").to_pylist(),
                          ours.column("layer").to_pylist(), ours.column("neuron").to_pylist()))
    rows = duckdb.sql(f"SELECT tower, item_id, layer, neuron FROM read_parquet('{root}/*/*.parquet', "
                      "hive_partitioning = true) ORDER BY ALL").fetchall()
    assert rows == expected
    frame = pl.read_parquet(f"{root}/**/*.parquet", hive_partitioning=True)
    assert sorted(frame.select("tower", "item_id", "layer", "neuron").iter_rows()) == expected
    graph = reduce_paths(PATHS, run_id="run-1")
    write_path_graph(graph, str(tmp_path / "g"))
    support = duckdb.sql(f"SELECT sum(support) FROM read_parquet('{tmp_path}/g/*/*.parquet', "
                         "hive_partitioning = true) WHERE tower = 'vision'").fetchall()[0][0]
    assert support == sum(n.support for n in graph.nodes if n.tower == "vision")


def test_path_graph_round_trip_and_hive(tmp_path):
    graph = reduce_paths(PATHS, run_id="run-1")
    ref = write_path_graph(graph, str(tmp_path / "g"))
    assert ref.schema == "path_graph/1" and ref.n_rows == len(graph)
    back = read_path_graph(ref.uri)
    assert back == graph
    table = ds.dataset(ref.uri, partitioning="hive").to_table(filter=ds.field("tower") == "language")
    assert table.num_rows == sum(1 for n in graph.nodes if n.tower == "language")
    assert pq.read_table(tmp_path / "g" / "tower=language" / "part-00000.parquet").schema.equals(
        PATH_GRAPH_V1
    )


def test_artifact_ref_dict_round_trip():
    ref = ArtifactRef(uri="s3://b/run/ip", schema="item_paths/1", n_rows=3)
    assert ArtifactRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    with pytest.raises(InputError, match="n_rows"):
        ArtifactRef.from_dict({"uri": "x", "schema": "item_paths/1"})
    with pytest.raises(InputError):
        ArtifactRef.from_dict({"uri": "x", "schema": "item_paths/1", "n_rows": -1})


def test_wrong_schema_is_rejected(tmp_path):
    ip, g = str(tmp_path / "ip"), str(tmp_path / "g")
    write_item_paths(PATHS, ip, run_id="r")
    write_path_graph(reduce_paths(PATHS, run_id="r"), g)
    with pytest.raises(SchemaMismatchError, match=r"'item_paths/1'.*expects 'path_graph/1'") as err:
        read_path_graph(ip)
    assert isinstance(err.value, MipError) and "rerun" in str(err.value)
    with pytest.raises(SchemaMismatchError, match=r"'path_graph/1'.*expects 'item_paths/1'"):
        read_item_paths(g)


def test_wrong_schema_in_a_part_file_is_rejected(tmp_path):
    """The manifest says item_paths/1 but a part (consistently hashed) claims another schema version."""
    root = tmp_path / "ip"
    write_item_paths(PATHS, str(root), run_id="r")
    part = root / "tower=vision" / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({"mip.schema": "item_paths/0"}), part)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    for f in manifest["files"]:
        f["sha256"] = hashlib.sha256((root / f["path"]).read_bytes()).hexdigest()
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SchemaMismatchError, match=r"'item_paths/0'.*expects 'item_paths/1'"):
        read_item_paths(str(root))


def test_modified_part_and_missing_manifest_are_refused(tmp_path):
    root = tmp_path / "ip"
    write_item_paths(PATHS, str(root), run_id="r")
    part = root / "tower=vision" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).slice(0, 1), part)
    with pytest.raises(ArtifactError, match="sha256"):
        read_item_paths(str(root))
    (root / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="did not finish"):
        read_item_paths(str(root))
    with pytest.raises(ArtifactError, match="no dataset at"):
        read_item_paths(str(tmp_path / "nothing"))


def test_empty_round_trip(tmp_path):
    root = str(tmp_path / "ip")
    ref = write_item_paths([], root, run_id="r")
    assert ref.n_rows == 0 and read_manifest(root).n_rows == 0
    assert read_item_paths(root) == []
    assert read_item_paths_table(root).schema.equals(ITEM_PATHS_V1)
    assert ds.dataset(root, partitioning="hive").to_table(filter=ds.field("tower") == "vision").num_rows == 0
    empty = PathGraph(run_id="r")
    write_path_graph(empty, str(tmp_path / "g"))
    assert read_path_graph(str(tmp_path / "g")) == empty
    # items without nodes have no rows: they write fine and do not come back
    assert write_item_paths([ItemPath("q", None, "language", ())], root, run_id="r").n_rows == 0


def test_overwrite_replaces_the_dataset(tmp_path):
    root = tmp_path / "ip"
    write_item_paths(PATHS, str(root), run_id="old")
    only_language = [p for p in PATHS if p.tower == "language"]
    ref = write_item_paths(only_language, str(root), run_id="new")
    assert not (root / "tower=vision").exists()  # old parts of the dataset are gone
    assert read_item_paths(ref.uri) == _canonical(only_language)
    assert read_manifest(ref.uri).run_id == "new"


def test_overwrite_refuses_foreign_files(tmp_path):
    root = tmp_path / "ip"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        write_item_paths(PATHS, str(root), run_id="r")
    assert (root / "notes.txt").read_text() == "mine" and not (root / MANIFEST_FILE).exists()


def test_deterministic_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_item_paths(PATHS, str(a), run_id="r")
    write_item_paths(list(reversed(PATHS)), str(b), run_id="r")  # input order does not matter
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    write_path_graph(reduce_paths(PATHS, run_id="r"), str(a / "g"))
    write_path_graph(reduce_paths(list(reversed(PATHS)), run_id="r"), str(b / "g"))
    assert (a / "g" / MANIFEST_FILE).read_bytes() == (b / "g" / MANIFEST_FILE).read_bytes()


def test_rows_are_sorted(tmp_path):
    table = item_paths_table(PATHS, run_id="r")
    keys = list(
        zip(
            *(table.column(c).to_pylist() for c in ("tower", "layer", "neuron", "item_id", "rank")),
            strict=True,
        )
    )
    assert keys == sorted(keys)


def test_split_into_several_parts(tmp_path):
    root = tmp_path / "ip"
    write_item_paths(PATHS, str(root), run_id="r", max_rows_per_file=3)
    assert sorted(p.name for p in (root / "tower=language").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert read_item_paths(str(root)) == _canonical(PATHS)
    assert ds.dataset(str(root), partitioning="hive").count_rows() == 12


def test_several_datasets_read_together(tmp_path):
    write_item_paths(PATHS[:2], str(tmp_path / "s0"), run_id="r")
    write_item_paths(PATHS[2:], str(tmp_path / "s1"), run_id="r")
    assert read_item_paths([str(tmp_path / "s0"), str(tmp_path / "s1")]) == _canonical(PATHS)


def test_invalid_input_is_rejected(tmp_path):
    with pytest.raises(InputError, match="given twice"):
        write_item_paths([PATHS[0], PATHS[0]], str(tmp_path / "x"), run_id="r")
    with pytest.raises(InputError, match="tower"):
        write_item_paths([_path("q", None, "audio", [(1, 1.0)])], str(tmp_path / "x"), run_id="r")
    with pytest.raises(InputError, match="run_id"):
        write_item_paths(PATHS, str(tmp_path / "x"), run_id="")
    with pytest.raises(InputError, match="written as run 'other'"):
        write_dataset(item_paths_table(PATHS, run_id="r"), str(tmp_path / "x"), run_id="other")
    bad = pa.table({"x": [1]}, schema=pa.schema([("x", pa.int64())], metadata={"mip.schema": "edit_plan/9"}))
    with pytest.raises(SchemaMismatchError, match="edit_plan/9"):
        write_dataset(bad, str(tmp_path / "x"), run_id="r")
    with pytest.raises(InputError, match="unknown schema"):
        read_dataset(str(tmp_path / "x"), "nope/1")
    assert not (tmp_path / "x").exists()


def test_graph_node_table_types(tmp_path):
    graph = PathGraph(run_id="r", nodes=(GraphNode("vision", 2, 70000, 3, 1e-3, 5e-4, ("b", "a")),))
    write_path_graph(graph, str(tmp_path / "g"))
    table, manifest = read_dataset(str(tmp_path / "g"), "path_graph/1")
    assert table.to_pylist() == [
        {
            "run_id": "r",
            "tower": "vision",
            "layer": 2,
            "neuron": 70000,
            "support": 3,
            "score_sum": 1e-3,
            "score_max": graph.nodes[0].score_max,
            "request_ids": ["a", "b"],
        }
    ]
    assert manifest.schema == "path_graph/1"


def test_overlapping_datasets_and_missing_parts_are_refused(tmp_path):
    write_item_paths(PATHS, str(tmp_path / "s0"), run_id="r")
    write_item_paths(PATHS[:1], str(tmp_path / "s1"), run_id="r")
    with pytest.raises(InputError, match="read each shard once"):
        read_item_paths([str(tmp_path / "s0"), str(tmp_path / "s1")])
    (tmp_path / "s0" / "tower=vision" / "part-00000.parquet").unlink()
    with pytest.raises(ArtifactError, match="listed in _manifest.json but missing"):
        read_item_paths(str(tmp_path / "s0"))
