"""Per-item correctness stored with a model version, so the gate scores each published model once.

Why: at 70B a gate that scores the starting model and the edited model every night pays for two model loads and
two evaluations. A version never changes once published, so its correctness on an item is a fact that can be
kept: the gate reads the starting version's cached scores, computes only the items it lacks (appending them), and
scores the edited model once. Publishing promotes the edited model's scores (``batches/<id>/scores/``) to the new
version (``models/<name>/<version>/scores/``), so the next batch on it evaluates one model, not two.

On disk: one Parquet file per location, schema ``item_scores/1`` (``item_id`` string, ``correct`` bool), with the
dataset it was scored against and the dtype it was loaded in as file metadata. A cache scored against another
dataset or dtype is not used (the items, or marginal answers, may differ). Two gates on the same starting version
at once may each rewrite its cache; the later write wins and the loser's extra items are just computed again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import pyarrow as pa
import pyarrow.parquet as pq

from mip_core.errors import ArtifactError, InputError, SchemaMismatchError
from mip_core.parquet_io import SCHEMA_KEY, parquet_bytes
from mip_core.service.batch import BatchManifest
from mip_core.service.store import ServiceStore

ITEM_SCORES = "item_scores/1"
DATASET_KEY = "mip.dataset_uri"
DTYPE_KEY = "mip.dtype"
SCORES_DIR = "scores"
SCORES_FILE = "item_scores.parquet"

ITEM_SCORES_V1 = pa.schema([pa.field("item_id", pa.string(), nullable=False),
                            pa.field("correct", pa.bool_(), nullable=False)],
                           metadata={SCHEMA_KEY: ITEM_SCORES})
"""One row per item: whether the model's most likely option is the right one."""

Scorer = Callable[[str, Sequence[str]], Mapping[str, bool]]
"""``(model_uri, item_ids) -> {item_id: correct}``: where the model is loaded is the scorer's business."""


@dataclass(frozen=True)
class ItemScores:
    """One model's correctness on some items of one dataset, loaded in one dtype."""

    dataset_uri: str
    dtype: str
    correct: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "correct", MappingProxyType(dict(self.correct)))

    def fits(self, dataset_uri: str, dtype: str) -> bool:
        return (self.dataset_uri, self.dtype) == (dataset_uri, dtype)

    def missing(self, item_ids: Iterable[str]) -> list[str]:
        """``item_ids`` without a score, in order, each once."""
        return [i for i in dict.fromkeys(item_ids) if i not in self.correct]

    def merged(self, new: Mapping[str, bool]) -> ItemScores:
        return ItemScores(self.dataset_uri, self.dtype, {**self.correct, **new})


def version_scores_key(store: ServiceStore, name: str, version: str) -> str:
    return f"{store.model_key(name, version)}/{SCORES_DIR}"


def batch_scores_key(store: ServiceStore, batch_id: str) -> str:
    return store.batch_key(batch_id, SCORES_DIR)


def scores_table(scores: ItemScores) -> pa.Table:
    """The ``item_scores/1`` table of ``scores``, sorted by item id (same scores, same bytes)."""
    ids = sorted(scores.correct)
    meta = {SCHEMA_KEY: ITEM_SCORES, DATASET_KEY: scores.dataset_uri, DTYPE_KEY: scores.dtype}
    return pa.table({"item_id": ids, "correct": [bool(scores.correct[i]) for i in ids]},
                    schema=ITEM_SCORES_V1.with_metadata(meta))


def scores_from_table(table: pa.Table, where: str) -> ItemScores:
    """Inverse of :func:`scores_table`; refuses another schema version or other columns, naming both."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    found = meta.get(SCHEMA_KEY)
    if found != ITEM_SCORES:
        raise SchemaMismatchError(f"{where} has schema {found!r} but this reader expects {ITEM_SCORES!r}; delete "
                                  "it (the gate recomputes the scores) or read it with the matching release")
    if not table.schema.equals(ITEM_SCORES_V1, check_metadata=False):
        raise SchemaMismatchError(f"{where} has columns {[f'{f.name}: {f.type}' for f in table.schema]} but "
                                  f"{ITEM_SCORES!r} is item_id: string, correct: bool; delete it to recompute")
    if DATASET_KEY not in meta or DTYPE_KEY not in meta:
        raise SchemaMismatchError(f"{where} lacks the {DATASET_KEY!r}/{DTYPE_KEY!r} metadata; delete it to "
                                  "recompute")
    ids, correct = table.column("item_id").to_pylist(), table.column("correct").to_pylist()
    return ItemScores(meta[DATASET_KEY], meta[DTYPE_KEY], dict(zip(ids, correct, strict=True)))


def write_scores(store: ServiceStore, key: str, scores: ItemScores) -> str:
    """Write ``scores`` at ``key/item_scores.parquet`` (one atomic write); returns its URI."""
    return store.write_bytes(f"{key}/{SCORES_FILE}", parquet_bytes(scores_table(scores), "zstd"))


def read_scores(store: ServiceStore, key: str) -> ItemScores | None:
    """The scores at ``key``, or None when nothing was stored there."""
    file_key = f"{key}/{SCORES_FILE}"
    if not store.exists(file_key):
        return None
    data = store.read_bytes(file_key)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise ArtifactError(f"{store.uri(file_key)} is not a Parquet file ({exc}); delete it to recompute") from None
    return scores_from_table(table, store.uri(file_key))


def promote_scores(store: ServiceStore, batch_id: str, model_name: str, version: str) -> str | None:
    """Make batch ``batch_id``'s edited-model scores the cached scores of the ``version`` it was published as.

    Call after the model files are registered. Idempotent (a rerun rewrites the same file). Returns the URI
    written, or None when the batch has no scores (the next gate then computes them: slower, never wrong).
    """
    scores = read_scores(store, batch_scores_key(store, batch_id))
    if scores is None:
        return None
    if version not in store.versions(model_name):
        raise InputError(f"model {model_name!r} has no version {version!r} to give batch {batch_id}'s scores to; "
                         "register the model first")
    return write_scores(store, version_scores_key(store, model_name, version), scores)


def gate_scores(store: ServiceStore, m: BatchManifest, item_ids: Sequence[str], edited_uri: str, *, dtype: str,
                score: Scorer, log: Callable[[str], object] = print) -> tuple[dict[str, bool], dict[str, bool]]:
    """``(before, after)`` correctness on ``item_ids``: the starting version's from its cache (computing and
    appending only the items it lacks), the edited model's computed once and written to ``batches/<id>/scores/``.
    """
    ids = list(dict.fromkeys(item_ids))
    base_key = version_scores_key(store, m.target_model, m.base_version)
    cached = read_scores(store, base_key)
    if cached is not None and not cached.fits(m.scores_key, dtype):
        log(f"gate: cached scores of {m.target_model} {m.base_version} are for {cached.dataset_uri} in "
            f"{cached.dtype}, not {m.scores_key} in {dtype}; recomputing them")
        cached = None
    base = ItemScores(m.scores_key, dtype) if cached is None else cached
    missing = base.missing(ids)
    log(f"gate: {len(ids) - len(missing)} of {len(ids)} items of the starting model {m.base_version} are cached")
    if missing:
        base = base.merged(_checked(score(m.base_uri, missing), missing, m.base_uri))
        write_scores(store, base_key, base)
    after = _checked(score(edited_uri, ids), ids, edited_uri)
    write_scores(store, batch_scores_key(store, m.batch_id), ItemScores(m.scores_key, dtype, after))
    return {i: base.correct[i] for i in ids}, after


def _checked(got: Mapping[str, bool], wanted: Sequence[str], model_uri: str) -> dict[str, bool]:
    """A scorer's answer, refused unless it scores exactly the items asked for."""
    if set(got) != set(wanted):
        raise ArtifactError(f"scoring {model_uri} returned items {sorted(set(got) ^ set(wanted))[:5]} more or less "
                            f"than the {len(wanted)} asked for")
    return {i: bool(got[i]) for i in wanted}


__all__ = ["ITEM_SCORES", "ITEM_SCORES_V1", "ItemScores", "Scorer", "batch_scores_key", "gate_scores",
           "promote_scores", "read_scores", "scores_from_table", "scores_table", "version_scores_key",
           "write_scores"]
