"""A version's per-item scores, stored with it: the Parquet cache round-trips and refuses other schemas, and the
gate computes only what the cache lacks (shown by planted values surviving and by a starting model that is not
there at all), scores the edited model once, and publishing promotes its scores to the new version. The kept sets'
greedy answers (the generation check's reference) are cached beside the scores the same way."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mip_core.benchmark import load_benchmark, make_benchmark
from mip_core.errors import InputError, ModelLoadError, SchemaMismatchError
from mip_core.modeling import load_model, save_model
from mip_core.parquet_io import SCHEMA_KEY
from mip_core.service.batch import BatchManifest
from mip_core.service.gate import by_set, correct_by_id, greedy_by_id
from mip_core.service.scores import (ANSWERS_FILE, ITEM_ANSWERS, ITEM_SCORES, SCORES_FILE, ItemScores,
                                     batch_scores_key, gate_scores, promote_scores, read_scores, version_scores_key,
                                     write_scores)
from mip_core.service.store import ServiceStore


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """A store with a registered starting model, an edited model beside it, a benchmark and the gate's items."""
    root = tmp_path_factory.mktemp("scores")
    make_benchmark(root / "bench", 4, seed=0, n_utility=4)
    bench = load_benchmark(root / "bench")
    for name, arch in (("base", "qwen2_5_vl"), ("edited", "qwen2_vl")):
        save_model(*tiny_models[arch], str(root / name))
    store = ServiceStore(str(root / "store"))
    store.register_model("tiny", str(root / "base"), dataset_uri=str(root / "bench"))
    ids = [it.item_id for it in bench.items if it.kind != "test"][:8]
    world = {"root": root, "store": store, "bench": bench, "bench_uri": str(root / "bench"), "ids": ids,
             "base": store.uri(store.model_key("tiny", "v0001")), "edited": str(root / "edited"), "loaded": {}}
    world["truth"] = {uri: dict(in_process(world)(uri, ids, ())[0]) for uri in (world["base"], world["edited"])}
    return world


def manifest(world, batch_id: str, base_uri: str | None = None) -> BatchManifest:
    return BatchManifest(batch_id=batch_id, target_model="tiny", base_version="v0001",
                         base_uri=base_uri or world["base"], dataset_uri=world["bench_uri"], requests=("r",),
                         rejected={}, forget=((world["ids"][0], "r"),), items_of={"r": (world["ids"][0],)},
                         edit_retain=(), eval_retain=tuple(world["ids"][1:]), eval_utility=())


def in_process(world):
    """The scorer the actor runs, here in this process: load the model by URI (once per URI: loads are the slow
    part), score the items and answer ``answer_ids``."""
    def score(uri: str, ids, answer_ids):
        if uri not in world["loaded"]:
            world["loaded"][uri] = load_model(uri)
        loaded = world["loaded"][uri]
        return (correct_by_id(loaded.model, loaded.processor, world["bench"], ids),
                greedy_by_id(loaded.model, loaded.processor, world["bench"], answer_ids))
    return score


def truth(world, uri: str) -> dict[str, bool]:
    return world["truth"][uri]


def fresh(world, tmp_path) -> ServiceStore:
    """A store of its own (each test changes caches) with the same starting model registered as v0001; the
    manifests point at the world's copy of its files."""
    store = ServiceStore(str(tmp_path / "store"))
    store.register_model("tiny", world["base"], dataset_uri=world["bench_uri"])
    return store


def test_scores_round_trip_as_versioned_parquet(tmp_path):
    store = ServiceStore(str(tmp_path))
    scores = ItemScores("s3://bucket/bench", "auto", {"b": False, "a": True})
    uri = write_scores(store, "models/m/v0001/scores", scores)
    assert read_scores(store, "models/m/v0001/scores") == scores
    table = pq.read_table(uri)  # any Parquet reader: schema, columns and the dataset in the metadata
    meta = table.schema.metadata
    assert meta[SCHEMA_KEY.encode()] == ITEM_SCORES.encode() and meta[b"mip.dataset_uri"] == b"s3://bucket/bench"
    assert table.column("item_id").to_pylist() == ["a", "b"] and table.schema.field("correct").type == pa.bool_()
    first = open(uri, "rb").read()
    write_scores(store, "models/m/v0001/scores", ItemScores("s3://bucket/bench", "auto", {"a": True, "b": False}))
    assert open(uri, "rb").read() == first  # same scores, same bytes
    assert read_scores(store, "models/m/v0002/scores") is None


def test_another_schema_version_or_columns_are_refused_by_name(tmp_path):
    store = ServiceStore(str(tmp_path))
    path = tmp_path / "scores" / SCORES_FILE
    path.parent.mkdir()
    meta = {SCHEMA_KEY: "item_scores/2", "mip.dataset_uri": "/d", "mip.dtype": "auto"}
    pq.write_table(pa.table({"item_id": ["a"], "correct": [True]}).replace_schema_metadata(meta), path)
    with pytest.raises(SchemaMismatchError, match=r"schema 'item_scores/2' but this reader expects 'item_scores/1'"):
        read_scores(store, "scores")
    ints = pa.table({"item_id": ["a"], "correct": [1]})
    pq.write_table(ints.replace_schema_metadata({**meta, SCHEMA_KEY: ITEM_SCORES}), path)
    with pytest.raises(SchemaMismatchError, match=r"columns \['item_id: string', 'correct: int64'\]"):
        read_scores(store, "scores")


def test_the_gate_computes_only_what_the_cache_lacks(world, tmp_path):
    store = fresh(world, tmp_path)
    ids, base_truth, edited_truth = world["ids"], truth(world, world["base"]), truth(world, world["edited"])
    planted = {i: not base_truth[i] for i in ids[:5]}  # wrong on purpose: recomputing would undo them
    write_scores(store, version_scores_key(store, "tiny", "v0001"), ItemScores(world["bench_uri"], "auto", planted))
    before, after = gate_scores(store, manifest(world, "b1"), ids, world["edited"], dtype="auto",
                                score=in_process(world), log=lambda _: None)
    assert before.correct == {**base_truth, **planted}  # cached items as stored, the missing ones computed
    assert after.correct == edited_truth
    cache = read_scores(store, version_scores_key(store, "tiny", "v0001"))
    assert dict(cache.correct) == {**base_truth, **planted}  # the computed items were appended
    assert dict(read_scores(store, batch_scores_key(store, "b1")).correct) == edited_truth

    # every item cached: the starting model is not needed at all (its URI does not exist) and the cache is not
    # rewritten
    cache_file = os.path.join(store.uri(version_scores_key(store, "tiny", "v0001")), SCORES_FILE)
    stat, content = os.stat(cache_file).st_mtime_ns, open(cache_file, "rb").read()
    with pytest.raises(ModelLoadError):
        in_process(world)(str(tmp_path / "no-model"), ids[:1], ())
    before2, after2 = gate_scores(store, manifest(world, "b2", base_uri=str(tmp_path / "no-model")), ids,
                                  world["edited"], dtype="auto", score=in_process(world), log=lambda _: None)
    assert (before2, after2) == (before, after)
    assert os.stat(cache_file).st_mtime_ns == stat and open(cache_file, "rb").read() == content


def test_a_cache_for_another_dataset_or_dtype_is_recomputed(world, tmp_path):
    store = fresh(world, tmp_path)
    ids, base_truth = world["ids"][:4], truth(world, world["base"])
    for dataset, dtype in (("/elsewhere", "auto"), (world["bench_uri"], "bfloat16")):
        stale = ItemScores(dataset, dtype, {i: not base_truth[i] for i in ids})
        write_scores(store, version_scores_key(store, "tiny", "v0001"), stale)
        before, _ = gate_scores(store, manifest(world, "b1"), ids, world["edited"], dtype="auto",
                                score=in_process(world), log=lambda _: None)
        assert before.correct == {i: base_truth[i] for i in ids}
        cache = read_scores(store, version_scores_key(store, "tiny", "v0001"))
        assert (cache.dataset_uri, cache.dtype) == (world["bench_uri"], "auto")


def test_publishing_promotes_the_edited_scores_to_the_new_version(world, tmp_path):
    store = fresh(world, tmp_path)
    ids, edited_truth = world["ids"], truth(world, world["edited"])
    assert promote_scores(store, "b1", "tiny", "v0001") is None  # no scores yet: nothing to promote
    gate_scores(store, manifest(world, "b1"), ids, world["edited"], dtype="auto", score=in_process(world),
                log=lambda _: None)
    version = store.register_model("tiny", world["edited"], dataset_uri=world["bench_uri"])
    with pytest.raises(InputError, match="no version 'v0009'"):
        promote_scores(store, "b1", "tiny", "v0009")
    uri = promote_scores(store, "b1", "tiny", version)
    assert uri == os.path.join(store.uri(version_scores_key(store, "tiny", version)), SCORES_FILE)
    assert dict(read_scores(store, version_scores_key(store, "tiny", version)).correct) == edited_truth
    # the next batch starts from the new version: its starting model need not be loaded
    m = manifest(world, "b2", base_uri=str(tmp_path / "no-model"))
    m = BatchManifest(**{**m.__dict__, "base_version": version})
    before, _ = gate_scores(store, m, ids, world["edited"], dtype="auto", score=in_process(world),
                            log=lambda _: None)
    assert before.correct == edited_truth


def test_scores_regroup_per_set_and_unknown_ids_are_named(world):
    sets = {"forget": [world["bench"].items[0]], "retain": [world["bench"].items[1]]}
    flat = {world["bench"].items[0].item_id: True, world["bench"].items[1].item_id: False}
    assert by_set(sets, flat) == {"forget": {world["bench"].items[0].item_id: True},
                                  "retain": {world["bench"].items[1].item_id: False}}
    in_process(world)(world["base"], world["ids"][:1], ())
    loaded = world["loaded"][world["base"]]
    with pytest.raises(InputError, match=r"item ids \['nope'\]"):
        correct_by_id(loaded.model, loaded.processor, world["bench"], ["nope"])
    with pytest.raises(InputError, match=r"item ids \['nope'\]"):
        greedy_by_id(loaded.model, loaded.processor, world["bench"], ["nope"])


def test_the_kept_sets_answers_are_cached_and_promoted_beside_the_scores(world, tmp_path):
    """A cache written before answers were kept (no answers file) still reads; the starting model answers only
    what is missing, on the same load as its missing scores; the edited model's answers are promoted with its
    scores, so the next gate answers nothing on the starting model."""
    store = fresh(world, tmp_path)
    ids, kept = world["ids"], world["ids"][1:5]
    base_truth = truth(world, world["base"])
    write_scores(store, version_scores_key(store, "tiny", "v0001"), ItemScores(world["bench_uri"], "auto", base_truth))
    (tmp_path / "store" / "models" / "tiny" / "v0001" / "scores" / ANSWERS_FILE).unlink()  # an older cache
    asked: list[tuple[str, list[str], list[str]]] = []

    def recorded(uri, wanted, answer_ids):
        asked.append((uri, list(wanted), list(answer_ids)))
        return in_process(world)(uri, wanted, answer_ids)

    before, after = gate_scores(store, manifest(world, "b1"), ids, world["edited"], dtype="auto", score=recorded,
                                answer_ids=kept, log=lambda _: None)
    assert asked == [(world["base"], [], kept), (world["edited"], ids, kept)]  # one call (one load) per model
    assert before.correct == base_truth and list(before.answers) == kept and list(after.answers) == kept
    cache = read_scores(store, version_scores_key(store, "tiny", "v0001"))
    assert cache.answers == before.answers and all(isinstance(a, str) for a in cache.answers.values())
    table = pq.read_table(tmp_path / "store" / "models" / "tiny" / "v0001" / "scores" / ANSWERS_FILE)
    assert table.schema.metadata[SCHEMA_KEY.encode()] == ITEM_ANSWERS.encode()
    assert table.column_names == ["item_id", "answer"]

    version = store.register_model("tiny", world["edited"], dataset_uri=world["bench_uri"])
    promote_scores(store, "b1", "tiny", version)
    asked.clear()
    m = BatchManifest(**{**manifest(world, "b2", base_uri=str(tmp_path / "no-model")).__dict__,
                         "base_version": version})
    before2, _ = gate_scores(store, m, ids, world["edited"], dtype="auto", score=recorded, answer_ids=kept,
                             log=lambda _: None)
    assert [uri for uri, _, _ in asked] == [world["edited"]] and before2.answers == after.answers


def test_answers_for_another_dataset_are_ignored_and_another_answers_schema_is_refused(tmp_path):
    store = ServiceStore(str(tmp_path))
    write_scores(store, "scores", ItemScores("/d", "auto", {"a": True}, {"a": "Paris"}))
    assert read_scores(store, "scores").answers == {"a": "Paris"}
    answers = pq.read_table(tmp_path / "scores" / ANSWERS_FILE)
    meta = {k.decode(): v.decode() for k, v in answers.schema.metadata.items()}
    pq.write_table(answers.replace_schema_metadata({**meta, "mip.dataset_uri": "/elsewhere"}),
                   tmp_path / "scores" / ANSWERS_FILE)
    assert read_scores(store, "scores") == ItemScores("/d", "auto", {"a": True})  # its answers are computed again
    pq.write_table(answers.replace_schema_metadata({**meta, SCHEMA_KEY: "item_answers/2"}),
                   tmp_path / "scores" / ANSWERS_FILE)
    with pytest.raises(SchemaMismatchError, match=r"schema 'item_answers/2' but this reader expects 'item_answers/1'"):
        read_scores(store, "scores")
