"""Per-item correctness and greedy answers stored with a model version, so the gate scores each published model
once.

Why: at 70B a gate that scores the starting model and the edited model every night pays for two model loads and
two evaluations. A version never changes once published, so its correctness on an item is a fact that can be
kept: the gate reads the starting version's cached scores, computes only the items it lacks (appending them), and
scores the edited model once. Publishing promotes the edited model's scores (``batches/<id>/scores/``) to the new
version (``models/<name>/<version>/scores/``), so the next batch on it evaluates one model, not two.

The gate's generation check compares the edited model's greedy answers on the kept sets with the starting model's,
so those answers are kept the same way: the starting version's come from its cache, the edited model's are
promoted with its scores.

On disk: two Parquet files per location, each with the dataset it was scored against and the dtype it was loaded
in as file metadata: ``item_scores.parquet``, schema ``item_scores/1`` (``item_id`` string, ``correct`` bool), and
``item_answers.parquet``, schema ``item_answers/1`` (``item_id`` string, ``answer`` string: the greedy answer, for
the kept sets' items only). A separate file, so caches written before answers were kept still read; lacking it,
the answers are computed. A cache scored against another dataset or dtype is not used (the items, or marginal
answers, may differ); an answers file whose metadata differs from its scores file's is ignored. Two gates on the
same starting version at once may each rewrite its cache; the later write wins and the loser's extra items are just
computed again.
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
ITEM_ANSWERS = "item_answers/1"
DATASET_KEY = "mip.dataset_uri"
DTYPE_KEY = "mip.dtype"
SCORES_DIR = "scores"
SCORES_FILE = "item_scores.parquet"
ANSWERS_FILE = "item_answers.parquet"

ITEM_SCORES_V1 = pa.schema([pa.field("item_id", pa.string(), nullable=False),
                            pa.field("correct", pa.bool_(), nullable=False)],
                           metadata={SCHEMA_KEY: ITEM_SCORES})
"""One row per item: whether the model's most likely option is the right one."""

ITEM_ANSWERS_V1 = pa.schema([pa.field("item_id", pa.string(), nullable=False),
                             pa.field("answer", pa.string(), nullable=False)],
                            metadata={SCHEMA_KEY: ITEM_ANSWERS})
"""One row per item: the model's greedy answer (the reference an edited model's answer is compared with)."""

Scorer = Callable[[str, Sequence[str], Sequence[str]], tuple[Mapping[str, bool], Mapping[str, str]]]
"""``(model_uri, item_ids, answer_ids) -> ({item_id: correct}, {answer_id: greedy answer})``, one model load for
both (either list may be empty); where the model is loaded is the scorer's business."""


@dataclass(frozen=True)
class ItemScores:
    """One model's correctness on some items of one dataset, loaded in one dtype, and its greedy answers on some."""

    dataset_uri: str
    dtype: str
    correct: Mapping[str, bool] = field(default_factory=dict)
    answers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "correct", MappingProxyType(dict(self.correct)))
        object.__setattr__(self, "answers", MappingProxyType(dict(self.answers)))

    def fits(self, dataset_uri: str, dtype: str) -> bool:
        return (self.dataset_uri, self.dtype) == (dataset_uri, dtype)

    def missing(self, item_ids: Iterable[str]) -> list[str]:
        """``item_ids`` without a score, in order, each once."""
        return [i for i in dict.fromkeys(item_ids) if i not in self.correct]

    def missing_answers(self, item_ids: Iterable[str]) -> list[str]:
        """``item_ids`` without a greedy answer, in order, each once."""
        return [i for i in dict.fromkeys(item_ids) if i not in self.answers]

    def merged(self, new: Mapping[str, bool], answers: Mapping[str, str] | None = None) -> ItemScores:
        return ItemScores(self.dataset_uri, self.dtype, {**self.correct, **new}, {**self.answers, **(answers or {})})

    def only(self, item_ids: Iterable[str], answer_ids: Iterable[str]) -> ItemScores:
        """These scores restricted to ``item_ids`` and answers to ``answer_ids`` (each must be there)."""
        return ItemScores(self.dataset_uri, self.dtype, {i: self.correct[i] for i in item_ids},
                          {i: self.answers[i] for i in answer_ids})


def version_scores_key(store: ServiceStore, name: str, version: str) -> str:
    return f"{store.model_key(name, version)}/{SCORES_DIR}"


def batch_scores_key(store: ServiceStore, batch_id: str) -> str:
    return store.batch_key(batch_id, SCORES_DIR)


def _meta(scores: ItemScores, schema: str) -> dict[str, str]:
    return {SCHEMA_KEY: schema, DATASET_KEY: scores.dataset_uri, DTYPE_KEY: scores.dtype}


def scores_table(scores: ItemScores) -> pa.Table:
    """The ``item_scores/1`` table of ``scores``, sorted by item id (same scores, same bytes)."""
    ids = sorted(scores.correct)
    return pa.table({"item_id": ids, "correct": [bool(scores.correct[i]) for i in ids]},
                    schema=ITEM_SCORES_V1.with_metadata(_meta(scores, ITEM_SCORES)))


def answers_table(scores: ItemScores) -> pa.Table:
    """The ``item_answers/1`` table of ``scores``' answers, sorted by item id (same answers, same bytes)."""
    ids = sorted(scores.answers)
    return pa.table({"item_id": ids, "answer": [str(scores.answers[i]) for i in ids]},
                    schema=ITEM_ANSWERS_V1.with_metadata(_meta(scores, ITEM_ANSWERS)))


def _checked_meta(table: pa.Table, where: str, name: str, schema: pa.Schema) -> dict[str, str]:
    """``table``'s metadata, once its schema version, columns and metadata keys are those of ``name``."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    found = meta.get(SCHEMA_KEY)
    if found != name:
        raise SchemaMismatchError(f"{where} has schema {found!r} but this reader expects {name!r}; delete "
                                  "it (the gate recomputes the scores) or read it with the matching release")
    if not table.schema.equals(schema, check_metadata=False):
        raise SchemaMismatchError(f"{where} has columns {[f'{f.name}: {f.type}' for f in table.schema]} but "
                                  f"{name!r} is {', '.join(f'{f.name}: {f.type}' for f in schema)}; delete it to "
                                  "recompute")
    if DATASET_KEY not in meta or DTYPE_KEY not in meta:
        raise SchemaMismatchError(f"{where} lacks the {DATASET_KEY!r}/{DTYPE_KEY!r} metadata; delete it to "
                                  "recompute")
    return meta


def scores_from_table(table: pa.Table, where: str) -> ItemScores:
    """Inverse of :func:`scores_table`; refuses another schema version or other columns, naming both."""
    meta = _checked_meta(table, where, ITEM_SCORES, ITEM_SCORES_V1)
    ids, correct = table.column("item_id").to_pylist(), table.column("correct").to_pylist()
    return ItemScores(meta[DATASET_KEY], meta[DTYPE_KEY], dict(zip(ids, correct, strict=True)))


def answers_from_table(table: pa.Table, where: str) -> ItemScores:
    """Inverse of :func:`answers_table` (no correctness); refuses another schema version or other columns."""
    meta = _checked_meta(table, where, ITEM_ANSWERS, ITEM_ANSWERS_V1)
    ids, answers = table.column("item_id").to_pylist(), table.column("answer").to_pylist()
    return ItemScores(meta[DATASET_KEY], meta[DTYPE_KEY], answers=dict(zip(ids, answers, strict=True)))


def write_scores(store: ServiceStore, key: str, scores: ItemScores) -> str:
    """Write ``scores`` at ``key/item_answers.parquet`` then ``key/item_scores.parquet`` (each one atomic write);
    returns the scores file's URI. A crash between the two leaves the answers ahead: read, they are only more."""
    store.write_bytes(f"{key}/{ANSWERS_FILE}", parquet_bytes(answers_table(scores), "zstd"))
    return store.write_bytes(f"{key}/{SCORES_FILE}", parquet_bytes(scores_table(scores), "zstd"))


def _read_table(store: ServiceStore, file_key: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(store.read_bytes(file_key)))
    except pa.ArrowInvalid as exc:
        raise ArtifactError(f"{store.uri(file_key)} is not a Parquet file ({exc}); delete it to recompute") from None


def read_scores(store: ServiceStore, key: str) -> ItemScores | None:
    """The scores at ``key`` with their answers (none when no answers file fits them), or None when nothing was
    stored there."""
    file_key, answers_key = f"{key}/{SCORES_FILE}", f"{key}/{ANSWERS_FILE}"
    if not store.exists(file_key):
        return None
    scores = scores_from_table(_read_table(store, file_key), store.uri(file_key))
    if not store.exists(answers_key):
        return scores
    answers = answers_from_table(_read_table(store, answers_key), store.uri(answers_key))
    return scores.merged({}, answers.answers) if answers.fits(scores.dataset_uri, scores.dtype) else scores


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
                score: Scorer, answer_ids: Sequence[str] = (), log: Callable[[str], object] = print
                ) -> tuple[ItemScores, ItemScores]:
    """``(before, after)``: correctness on ``item_ids`` and greedy answers on ``answer_ids`` (the kept sets', for the
    generation check). The starting version's come from its cache (computing and appending only the items it
    lacks), the edited model's are computed once (one load for both) and written to ``batches/<id>/scores/``.
    """
    ids, said = list(dict.fromkeys(item_ids)), list(dict.fromkeys(answer_ids))
    base = version_scores(store, m, m.base_version, m.base_uri, ids, said, dtype=dtype, score=score, log=log,
                          what="the starting model")
    after = ItemScores(m.scores_key, dtype, *_checked(score(edited_uri, ids, said), ids, said, edited_uri))
    write_scores(store, batch_scores_key(store, m.batch_id), after)
    return base, after


def version_scores(store: ServiceStore, m: BatchManifest, version: str, uri: str, item_ids: Sequence[str],
                   answer_ids: Sequence[str], *, dtype: str, score: Scorer, log: Callable[[str], object] = print,
                   what: str = "the model") -> ItemScores:
    """A published ``version``'s correctness on ``item_ids`` and greedy answers on ``answer_ids``, from its cache;
    the items it lacks are scored (one load of ``uri``) and appended to the cache. The starting version's for the
    gate, and the registered model's for the floors that hold against it."""
    ids, said = list(dict.fromkeys(item_ids)), list(dict.fromkeys(answer_ids))
    key = version_scores_key(store, m.target_model, version)
    cached = read_scores(store, key)
    if cached is not None and not cached.fits(m.scores_key, dtype):
        log(f"gate: cached scores of {m.target_model} {version} are for {cached.dataset_uri} in "
            f"{cached.dtype}, not {m.scores_key} in {dtype}; recomputing them")
        cached = None
    scores = ItemScores(m.scores_key, dtype) if cached is None else cached
    missing, unsaid = scores.missing(ids), scores.missing_answers(said)
    log(f"gate: {len(ids) - len(missing)} of {len(ids)} items and {len(said) - len(unsaid)} of {len(said)} answers "
        f"of {what} {version} are cached")
    if missing or unsaid:
        scores = scores.merged(*_checked(score(uri, missing, unsaid), missing, unsaid, uri))
        write_scores(store, key, scores)
    return scores.only(ids, said)


def forgotten_level(store: ServiceStore, batch_of: Mapping[str, str]) -> dict[str, bool]:
    """Each item's correctness right after the edit that forgot it (``batch_of``: item id -> that batch), read
    from the batch's scores of its edited model (the published version's); items whose batch kept no scores are
    left out.

    Why: the gate's relapse check compares earlier-forgotten people with this level, not with the version the edit
    starts from. Against the starting version, each edit may let them rise a little, every rise under the
    tolerance, and over nights they come back in steps none of which was held back."""
    out: dict[str, bool] = {}
    for batch in dict.fromkeys(batch_of.values()):
        scores = read_scores(store, batch_scores_key(store, batch))
        if scores is not None:
            out.update({i: scores.correct[i] for i, b in batch_of.items() if b == batch and i in scores.correct})
    return out


def _checked(got: tuple[Mapping[str, bool], Mapping[str, str]], wanted: Sequence[str], answer_ids: Sequence[str],
             model_uri: str) -> tuple[dict[str, bool], dict[str, str]]:
    """A scorer's result, refused unless it scores and answers exactly the items asked for."""
    correct, answers = got
    for what, have, asked in (("scores", correct, wanted), ("answers", answers, answer_ids)):
        if set(have) != set(asked):
            raise ArtifactError(f"scoring {model_uri} returned {what} of items {sorted(set(have) ^ set(asked))[:5]} "
                                f"more or less than the {len(asked)} asked for")
    return {i: bool(correct[i]) for i in wanted}, {i: str(answers[i]) for i in answer_ids}


__all__ = ["ANSWERS_FILE", "ITEM_ANSWERS", "ITEM_ANSWERS_V1", "ITEM_SCORES", "ITEM_SCORES_V1", "ItemScores", "Scorer",
           "answers_from_table", "answers_table", "batch_scores_key", "forgotten_level", "gate_scores",
           "promote_scores", "read_scores", "scores_from_table", "scores_table", "version_scores",
           "version_scores_key", "write_scores"]
