"""Attribution artifacts on disk: versioned Arrow schemas and tower-partitioned Parquet datasets (fsspec).

Why this shape (docs/method.md sections 4 and 7 #10): path scores are stored sparse, one row per kept neuron,
never as dense ``[items x layers x d_mlp]`` tensors, and every artifact carries its schema version
(``mip.schema``) so a reader refuses data it does not understand instead of misreading it. Tasks pass
:class:`ArtifactRef` values, not data. The layout, the manifest and the overwrite rule are documented in
``docs/results.md``.

A dataset at ``uri`` (a local path or ``s3://bucket/prefix``) is a directory, partitioned by tower (hive)::

    uri/_manifest.json                     # written last: the commit record (schema, run_id, files, sha256)
    uri/tower=language/part-00000.parquet  # every part holds the full schema, ``tower`` column included
    uri/tower=vision/part-00000.parquet

so ``pyarrow.dataset.dataset(uri, partitioning="hive")`` (or any hive-aware reader) reads the same rows, and
one part file read alone is self-describing.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from mip_core.errors import ArtifactError, InputError, MipError, SchemaMismatchError
from mip_core.path_graph import PathGraph
from mip_core.schemas import (  # re-exported: readers of the artifacts use them with the I/O
    DATASET_FORMAT, ITEM_PATHS, ITEM_PATHS_V1, MANIFEST_FILE, PATH_GRAPH, PATH_GRAPH_V1, SCHEMA_KEY, SCHEMAS,
)
from mip_core.storage import filesystem, is_remote, storage_options
from mip_core.types import TOWERS, ItemPath, PathNode, Tower

PARTITION_COLUMN = "tower"
DEFAULT_MAX_ROWS_PER_FILE = 1_000_000
_PART_RE = re.compile(r"(?:tower=[^/]+/)?part-\d{5}\.parquet")
_COMPRESSION = "zstd"

_SORT_KEYS: dict[str, list[tuple[str, str]]] = {
    # item paths: a unique key per row (an item repeats no (layer, rank)), so the order is total
    ITEM_PATHS: [("tower", "ascending"), ("layer", "ascending"), ("neuron", "ascending"),
                 ("item_id", "ascending"), ("request_id", "ascending"), ("rank", "ascending")],
    # path graph: the PathGraph order (mip_core.path_graph), unique per (tower, layer, neuron)
    PATH_GRAPH: [("tower", "ascending"), ("layer", "ascending"), ("score_sum", "descending"),
                 ("neuron", "ascending")],
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """What tasks pass between each other instead of data: where a dataset is, its schema and size."""

    uri: str
    schema: str
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "schema": self.schema, "n_rows": self.n_rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactRef:
        """Inverse of :meth:`to_dict`; rejects missing keys and wrong types (refs cross processes)."""
        try:
            uri, schema, n_rows = data["uri"], data["schema"], data["n_rows"]
        except (KeyError, TypeError):
            raise InputError(f"an ArtifactRef needs keys 'uri', 'schema', 'n_rows'; got {data!r}") from None
        if not isinstance(uri, str) or not isinstance(schema, str) or type(n_rows) is not int or n_rows < 0:
            raise InputError(
                f"invalid ArtifactRef {dict(data)!r}: uri and schema are strings, n_rows an int >= 0"
            )
        return cls(uri=uri, schema=schema, n_rows=n_rows)


@dataclass(frozen=True, slots=True)
class DatasetFile:
    """One part file of a dataset, relative to the dataset root."""

    path: str
    n_rows: int
    sha256: str


@dataclass(frozen=True, slots=True)
class DatasetManifest:
    """Contents of ``_manifest.json``. Written after every part, so its presence marks a complete write."""

    schema: str
    run_id: str
    n_rows: int
    files: tuple[DatasetFile, ...]
    partitioning: tuple[str, ...] = (PARTITION_COLUMN,)
    format: str = DATASET_FORMAT

    def to_json(self) -> str:
        data = {
            "format": self.format,
            "schema": self.schema,
            "run_id": self.run_id,
            "n_rows": self.n_rows,
            "partitioning": {"flavor": "hive", "columns": list(self.partitioning)},
            "files": [{"path": f.path, "n_rows": f.n_rows, "sha256": f.sha256} for f in self.files],
        }
        return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str) -> DatasetManifest:
        try:
            data = json.loads(text)
            fmt = data["format"]
            if fmt != DATASET_FORMAT:
                raise SchemaMismatchError(
                    f"{source} has dataset format {fmt!r} but this code reads {DATASET_FORMAT!r}; "
                    "rewrite the dataset with the current mip_core (rerun the step that produced it)"
                )
            files = tuple(
                DatasetFile(str(f["path"]), int(f["n_rows"]), str(f["sha256"])) for f in data["files"]
            )
            bad = [f.path for f in files if not _PART_RE.fullmatch(f.path)]
            if bad:
                raise ValueError(f"part paths {bad} are not of the form [tower=T/]part-NNNNN.parquet")
            return cls(
                schema=str(data["schema"]),
                run_id=str(data["run_id"]),
                n_rows=int(data["n_rows"]),
                files=files,
                partitioning=tuple(data["partitioning"]["columns"]),
                format=fmt,
            )
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, MipError):
                raise
            raise ArtifactError(
                f"{source} is not a valid dataset manifest ({exc!r}); rerun the step that wrote the dataset"
            ) from None


# ----------------------------------------------------------------------------------------------------------
# item paths


def item_paths_table(paths: Sequence[ItemPath], *, run_id: str) -> pa.Table:
    """Long-format :data:`ITEM_PATHS_V1` table of ``paths`` (one row per node), sorted deterministically.

    Raises:
        InputError: an unknown tower, an ``(item_id, tower, request_id)`` given twice, or a ``(layer, rank)``
            repeated within one path; any of these could not be read back unambiguously.
    """
    _check_run_id(run_id)
    seen: set[tuple[str, str, str | None]] = set()
    cols: dict[str, list[Any]] = {name: [] for name in ITEM_PATHS_V1.names}
    for path in paths:
        _check_tower(path.tower, f"item {path.item_id!r}")
        key = (path.tower, path.item_id, path.request_id)
        if key in seen:
            raise InputError(
                f"item {path.item_id!r} (tower {path.tower!r}, request {path.request_id!r}) is given twice; "
                "pass each item's path once"
            )
        seen.add(key)
        if len({(n.layer, n.rank) for n in path.nodes}) != len(path.nodes):
            raise InputError(
                f"item {path.item_id!r} ({path.tower}) repeats a (layer, rank) in its path nodes"
            )
        for node in path.nodes:
            cols["item_id"].append(path.item_id)
            cols["request_id"].append(path.request_id)
            cols["tower"].append(path.tower)
            cols["layer"].append(node.layer)
            cols["rank"].append(node.rank)
            cols["neuron"].append(node.neuron)
            cols["score"].append(node.score)
    cols["run_id"] = [run_id] * len(cols["item_id"])
    return _sorted(pa.Table.from_pydict(cols, schema=ITEM_PATHS_V1), _SORT_KEYS[ITEM_PATHS])


def item_paths_from_table(table: pa.Table) -> list[ItemPath]:
    """Rebuild :class:`ItemPath` values from an :data:`ITEM_PATHS_V1` table.

    Returns:
        one path per ``(tower, item_id, request_id)``, sorted by that key (``None`` request last); nodes
        sorted by ``(layer, rank)``. Items with no nodes have no rows, so they do not come back.
    """
    _check_columns(table.schema, ITEM_PATHS_V1, "item paths table")
    cols = table.select(["item_id", "request_id", "tower", "layer", "rank", "neuron", "score"]).to_pydict()
    groups: dict[tuple[str, str, str | None], list[PathNode]] = {}
    for item_id, request_id, tower, layer, rank, neuron, score in zip(*cols.values(), strict=True):
        groups.setdefault((tower, item_id, request_id), []).append(PathNode(layer, rank, neuron, score))

    def order(key: tuple[str, str, str | None]) -> tuple[str, str, bool, str]:
        return key[0], key[1], key[2] is None, key[2] or ""

    paths = []
    for key in sorted(groups, key=order):
        tower, item_id, request_id = key
        nodes = tuple(sorted(groups[key], key=lambda n: (n.layer, n.rank)))
        if len({(n.layer, n.rank) for n in nodes}) != len(nodes):
            raise InputError(
                f"item {item_id!r} ({tower}, request {request_id!r}) repeats a (layer, rank): it is in "
                "more than one of the datasets read together; read each shard once"
            )
        paths.append(ItemPath(item_id=item_id, request_id=request_id, tower=cast(Tower, tower), nodes=nodes))
    return paths


def write_item_paths(
    paths: Sequence[ItemPath],
    uri: str,
    *,
    run_id: str,
    endpoint_url: str | None = None,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
) -> ArtifactRef:
    """Write per-item paths as an ``item_paths/1`` dataset at ``uri``, replacing any dataset already there.

    Args:
        paths: the attribution engine's output; scores are stored as float32.
        uri: local directory or ``s3://bucket/prefix``; the S3 endpoint comes from ``endpoint_url``, else
            ``MIP_S3_ENDPOINT_URL``/``AWS_ENDPOINT_URL``.
        run_id: written in every row and in the manifest (run identity is data, never a file name).
    Returns:
        a reference to the dataset (``n_rows`` = number of path nodes).
    """
    table = item_paths_table(paths, run_id=run_id)
    return write_dataset(
        table, uri, run_id=run_id, endpoint_url=endpoint_url, max_rows_per_file=max_rows_per_file
    )


def read_item_paths_table(uris: str | Sequence[str], endpoint_url: str | None = None) -> pa.Table:
    """Rows of one or more ``item_paths/1`` datasets (e.g. one per shard), concatenated in ``uris`` order."""
    uri_list = [uris] if isinstance(uris, str) else list(uris)
    tables = [read_dataset(uri, ITEM_PATHS, endpoint_url=endpoint_url)[0] for uri in uri_list]
    if not tables:
        return ITEM_PATHS_V1.empty_table()
    return pa.concat_tables(tables)


def read_item_paths(uris: str | Sequence[str], endpoint_url: str | None = None) -> list[ItemPath]:
    """``item_paths/1`` datasets back as :class:`ItemPath` values (see :func:`item_paths_from_table`)."""
    return item_paths_from_table(read_item_paths_table(uris, endpoint_url))


# ----------------------------------------------------------------------------------------------------------
# path graph


def write_path_graph(
    graph: PathGraph,
    uri: str,
    *,
    endpoint_url: str | None = None,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
) -> ArtifactRef:
    """Write a reduced path graph as a ``path_graph/1`` dataset at ``uri`` (replacing any dataset there)."""
    return write_dataset(
        graph.to_table(),
        uri,
        run_id=graph.run_id,
        endpoint_url=endpoint_url,
        max_rows_per_file=max_rows_per_file,
    )


def read_path_graph(uri: str, endpoint_url: str | None = None) -> PathGraph:
    """Read a ``path_graph/1`` dataset; the run id comes from the manifest (so empty graphs keep theirs)."""

    table, manifest = read_dataset(uri, PATH_GRAPH, endpoint_url=endpoint_url)
    return PathGraph.from_table(table, run_id=manifest.run_id)


# ----------------------------------------------------------------------------------------------------------
# generic partitioned datasets


def write_dataset(
    table: pa.Table,
    uri: str,
    *,
    run_id: str,
    endpoint_url: str | None = None,
    max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
) -> ArtifactRef:
    """Write ``table`` (a :data:`SCHEMAS` schema, named by its ``mip.schema``) as a tower-partitioned dataset.

    Overwrite rule: an existing dataset at ``uri`` is replaced. Its manifest is deleted first, then its parts,
    then the new parts are written and the new manifest last, so an interrupted write leaves no manifest and
    readers refuse the location instead of mixing old and new parts. A location holding anything that is not a
    dataset part refuses the write (nothing is deleted). An empty table gives one zero-row part at the root,
    which keeps the schema visible to any Parquet reader.

    Raises:
        ArtifactError: the location holds foreign files, or the store (endpoint, bucket) cannot be reached.
    """
    _check_run_id(run_id)
    if type(max_rows_per_file) is not int or max_rows_per_file < 1:
        raise InputError(f"max_rows_per_file must be an int >= 1, got {max_rows_per_file!r}")
    name = _schema_name(table.schema, "table to write")
    expected = SCHEMAS.get(name)
    if expected is None:
        raise SchemaMismatchError(f"cannot write schema {name!r}: this code writes only {sorted(SCHEMAS)}")
    _check_columns(table.schema, expected, f"table for {name!r}")
    table = table.cast(expected)  # restores exact field nullability and metadata
    bad = sorted(set(table.column(PARTITION_COLUMN).to_pylist()) - set(TOWERS))
    if bad:
        raise InputError(f"unknown tower(s) {bad} in {name!r} table; towers are {list(TOWERS)}")
    other_runs = sorted(set(table.column("run_id").to_pylist()) - {run_id})
    if other_runs:
        raise InputError(f"{name!r} table has rows of run(s) {other_runs}, but is written as run {run_id!r}")
    table = _sorted(table, _SORT_KEYS[name])

    fs, root = filesystem(uri, endpoint_url)
    root = root.rstrip("/")
    with _storage_errors(uri, endpoint_url):
        _clear_dataset(fs, root, uri)
        files = [_write_part(fs, root, rel, part) for rel, part in _parts(table, max_rows_per_file)]
        manifest = DatasetManifest(schema=name, run_id=run_id, n_rows=table.num_rows, files=tuple(files))
        fs.pipe_file(f"{root}/{MANIFEST_FILE}", manifest.to_json().encode("utf-8"))
        fs.invalidate_cache(root)
    return ArtifactRef(uri=_public_uri(fs, root, uri), schema=name, n_rows=table.num_rows)


def read_manifest(uri: str, endpoint_url: str | None = None) -> DatasetManifest:
    """The manifest of the dataset at ``uri``, without reading its parts (cheap: one small object)."""
    fs, root = filesystem(uri, endpoint_url)
    with _storage_errors(uri, endpoint_url):
        return _read_manifest(fs, root.rstrip("/"), uri)


def read_dataset(
    uri: str, schema: str, *, endpoint_url: str | None = None
) -> tuple[pa.Table, DatasetManifest]:
    """All rows of the dataset at ``uri``, checked against ``schema`` (e.g. ``"item_paths/1"``).

    Checks, in order: the manifest's schema name, each part's sha256 (a modified or half-overwritten part is
    refused), each part's ``mip.schema`` metadata and columns, and the total row count.

    Raises:
        SchemaMismatchError: the manifest or a part has another schema than ``schema``.
        ArtifactError: no dataset at ``uri``, an incomplete or modified one, or an unreachable store.
    """
    expected = SCHEMAS.get(schema)
    if expected is None:
        raise InputError(f"unknown schema {schema!r}; known: {sorted(SCHEMAS)}")
    fs, root = filesystem(uri, endpoint_url)
    root = root.rstrip("/")
    with _storage_errors(uri, endpoint_url):
        manifest = _read_manifest(fs, root, uri)
        if manifest.schema != schema:
            raise _mismatch(f"dataset {uri}", manifest.schema, schema)
        tables = []
        for entry in manifest.files:
            part_uri = f"{uri.rstrip('/')}/{entry.path}"
            try:
                data = fs.cat_file(f"{root}/{entry.path}")
            except FileNotFoundError:
                raise ArtifactError(
                    f"{part_uri} is listed in {MANIFEST_FILE} but missing (the dataset was modified); "
                    "rerun the step that wrote the dataset"
                ) from None
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ArtifactError(
                    f"{part_uri} differs from the sha256 in {MANIFEST_FILE} (modified, or overwritten by "
                    "another writer); rerun the step that wrote the dataset"
                )
            part = pq.read_table(pa.BufferReader(data))
            found = _schema_name(part.schema, part_uri)
            if found != schema:
                raise _mismatch(part_uri, found, schema)
            _check_columns(part.schema, expected, part_uri)
            tables.append(part.cast(expected))
    table = pa.concat_tables(tables) if tables else expected.empty_table()
    if table.num_rows != manifest.n_rows:
        raise ArtifactError(
            f"dataset {uri} has {table.num_rows} rows but its manifest says {manifest.n_rows}; rewrite it"
        )
    return table, manifest


# ----------------------------------------------------------------------------------------------------------
# helpers


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not run_id:
        raise InputError(f"run_id must be a non-empty string, got {run_id!r}")


def _check_tower(tower: str, what: str) -> None:
    if tower not in TOWERS:
        raise InputError(f"{what} has tower {tower!r}; towers are {list(TOWERS)}")


def _sorted(table: pa.Table, keys: list[tuple[str, str]]) -> pa.Table:
    """Stable sort (Arrow's sort_indices is stable), so identical input gives identical bytes on disk."""
    return table.take(pc.sort_indices(table, sort_keys=keys))  # nulls last


def _schema_name(schema: pa.Schema, where: str) -> str:
    meta = schema.metadata or {}
    raw = meta.get(SCHEMA_KEY.encode())
    if raw is None:
        raise SchemaMismatchError(
            f"{where} has no {SCHEMA_KEY!r} metadata, so it was not written by mip_core.parquet_io; "
            "write it with mip_core.parquet_io (e.g. write_item_paths / write_path_graph)"
        )
    return str(raw.decode("utf-8", errors="replace"))


def _mismatch(where: str, found: str, expected: str) -> SchemaMismatchError:
    return SchemaMismatchError(
        f"{where} has schema {found!r} but this reader expects {expected!r}; read it with the matching "
        "reader, or rerun the step that produced it with the current mip_core to rewrite it"
    )


def _check_columns(found: pa.Schema, expected: pa.Schema, where: str) -> None:
    if not found.equals(expected, check_metadata=False):
        # a cast can fix nullability flags only; names and types must match exactly
        same = found.names == expected.names and all(
            a.type.equals(b.type) for a, b in zip(found, expected, strict=True)
        )
        if not same:
            name = (expected.metadata or {}).get(SCHEMA_KEY.encode(), b"?").decode()
            raise SchemaMismatchError(
                f"{where} has columns {[f'{f.name}: {f.type}' for f in found]} but {name!r} is "
                f"{[f'{f.name}: {f.type}' for f in expected]}; rewrite it with the current mip_core"
            )


def _parts(table: pa.Table, max_rows: int) -> Iterator[tuple[str, pa.Table]]:
    """``(relative path, rows)`` per part: per tower (sorted), chunks of at most ``max_rows`` rows."""
    if table.num_rows == 0:
        yield "part-00000.parquet", table
        return
    towers = table.column(PARTITION_COLUMN)
    for tower in sorted(set(towers.to_pylist())):
        rows = table.filter(pc.equal(towers, tower))
        for i, start in enumerate(range(0, rows.num_rows, max_rows)):
            yield f"{PARTITION_COLUMN}={tower}/part-{i:05d}.parquet", rows.slice(start, max_rows)


def parquet_bytes(table: pa.Table, compression: str = _COMPRESSION) -> bytes:
    """``table`` as the bytes of one Parquet file: written by one atomic put, hashed before it is stored."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue().to_pybytes()


def _write_part(fs: AbstractFileSystem, root: str, rel: str, table: pa.Table) -> DatasetFile:
    data = parquet_bytes(table)
    path = f"{root}/{rel}"
    if _is_local(fs):  # only locally: s3fs.makedirs would silently create a missing bucket
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    return DatasetFile(path=rel, n_rows=table.num_rows, sha256=hashlib.sha256(data).hexdigest())


def _clear_dataset(fs: AbstractFileSystem, root: str, uri: str) -> None:
    """Delete the dataset at ``root`` (manifest first), refusing if anything else lives there."""
    fs.invalidate_cache(root)
    if _is_local(fs) and fs.isfile(root):
        raise ArtifactError(f"{uri} is a file, not a dataset directory; choose another location")
    existing = sorted(fs.find(root))
    rels = [p[len(root) + 1 :] for p in existing]
    foreign = [r for r in rels if r != MANIFEST_FILE and not _PART_RE.fullmatch(r)]
    if foreign:
        raise ArtifactError(
            f"refusing to overwrite {uri}: it holds files that are not part of a mip dataset "
            f"({foreign[:3]}{' ...' if len(foreign) > 3 else ''}); choose an empty location or remove them"
        )
    if not rels:
        return
    if MANIFEST_FILE in rels:
        fs.rm_file(f"{root}/{MANIFEST_FILE}")
    parts = [f"{root}/{r}" for r in rels if r != MANIFEST_FILE]
    if parts:
        fs.rm(parts)
    if _is_local(fs):
        for sub in {r.split("/", 1)[0] for r in rels if "/" in r}:
            if fs.isdir(f"{root}/{sub}") and not fs.ls(f"{root}/{sub}"):
                fs.rmdir(f"{root}/{sub}")
    fs.invalidate_cache(root)


def _read_manifest(fs: AbstractFileSystem, root: str, uri: str) -> DatasetManifest:
    path = f"{root}/{MANIFEST_FILE}"
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        if is_remote(uri) and not _bucket_exists(fs, root):
            raise  # _storage_errors turns it into the bucket message
        fs.invalidate_cache(root)
        if fs.exists(root) and fs.find(root):
            raise ArtifactError(
                f"{uri} has no {MANIFEST_FILE}: its write did not finish, or it was not written by mip_core; "
                "rerun the step that writes it"
            ) from None
        raise ArtifactError(
            f"no dataset at {uri} (nothing there); check the URI and the run that should write it"
        )
    return DatasetManifest.from_json(text, source=f"{uri.rstrip('/')}/{MANIFEST_FILE}")


def _is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _public_uri(fs: AbstractFileSystem, root: str, uri: str) -> str:
    """Absolute local path, or ``protocol://root``: a ref must resolve from any working directory."""
    return root if _is_local(fs) else f"{uri.split('://', 1)[0]}://{root}"


def _bucket_exists(fs: AbstractFileSystem, root: str) -> bool:
    try:
        fs.invalidate_cache(root.split("/", 1)[0])
        return bool(fs.exists(root.split("/", 1)[0]))
    except Exception:  # noqa: BLE001 - only deciding which message to show
        return True


def _is_store_error(exc: BaseException) -> bool:
    """Errors of the S3 client stack, detected without importing botocore (loaded only if s3fs was used)."""
    botocore = sys.modules.get("botocore.exceptions")
    return (botocore is not None and isinstance(exc, botocore.BotoCoreError)) or isinstance(
        exc, ConnectionError
    )


@contextmanager
def _storage_errors(uri: str, endpoint_url: str | None) -> Iterator[None]:
    """Turn store failures (missing bucket, unreachable endpoint, no access) into messages naming the fix."""
    remote = is_remote(uri)
    endpoint = storage_options(uri, endpoint_url).get("endpoint_url") or "the default AWS endpoint"
    where = f" at {endpoint}" if remote else ""
    try:
        yield
    except MipError:
        raise
    except FileNotFoundError as exc:
        fs, root = filesystem(uri, endpoint_url)
        if remote and not _bucket_exists(fs, root):
            raise ArtifactError(
                f"{uri}: bucket {root.split('/', 1)[0]!r} does not exist{where} ({exc}); create the bucket, "
                "or fix the URI or the endpoint (endpoint_url / MIP_S3_ENDPOINT_URL)"
            ) from exc
        raise ArtifactError(f"{uri}: not found ({exc}); check the URI") from exc
    except PermissionError as exc:
        raise ArtifactError(f"{uri}: access denied{where} ({exc}); check the credentials") from exc
    except Exception as exc:
        if _is_store_error(exc):
            raise ArtifactError(
                f"cannot reach the object store for {uri}{where} ({exc}); set endpoint_url or "
                "MIP_S3_ENDPOINT_URL to a running S3/MinIO endpoint and check the AWS credentials"
            ) from exc
        raise
