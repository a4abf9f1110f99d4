"""The versioned Arrow schemas of the attribution artifacts (per-item paths, the reduced path graph).

They live apart from the Parquet I/O (:mod:`mip_core.parquet_io`) so the in-memory path graph
(:mod:`mip_core.path_graph`) can build its table without importing the reader that returns it.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_KEY = "mip.schema"
"""Schema-metadata key (and manifest field) holding an artifact's ``name/version``."""
ITEM_PATHS = "item_paths/1"
PATH_GRAPH = "path_graph/1"
DATASET_FORMAT = "mip-dataset/1"
"""Version of the directory layout and of ``_manifest.json`` itself (independent of the table schemas)."""
MANIFEST_FILE = "_manifest.json"
"""The leading ``_`` makes pyarrow.dataset, Spark and DuckDB skip it when they list the parts."""

ITEM_PATHS_V1 = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string(), nullable=True),
        # Plain string, not dictionary: hive partition values are discovered as strings, so a dictionary
        # column would not unify with the partition field (the directory name stores the tower anyway).
        pa.field("tower", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ],
    metadata={SCHEMA_KEY: ITEM_PATHS},
)
"""One row per kept neuron of one item's path (``rank`` 0 = the layer's top neuron for that item)."""

PATH_GRAPH_V1 = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("tower", pa.string(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("support", pa.int32(), nullable=False),
        pa.field("score_sum", pa.float64(), nullable=False),
        pa.field("score_max", pa.float32(), nullable=False),
        pa.field("request_ids", pa.list_(pa.field("item", pa.string(), nullable=False)), nullable=False),
    ],
    metadata={SCHEMA_KEY: PATH_GRAPH},
)
"""One row per neuron of the reduced path graph; ``request_ids`` = sorted distinct contributing requests."""

SCHEMAS: dict[str, pa.Schema] = {ITEM_PATHS: ITEM_PATHS_V1, PATH_GRAPH: PATH_GRAPH_V1}
