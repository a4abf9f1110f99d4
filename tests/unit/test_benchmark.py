"""Synthetic forget benchmark: determinism, schema, MC invariants, splits, images and error messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mip_core.benchmark import (
    BENCH_SCHEMA_VERSION,
    FORGET_PCTS,
    Benchmark,
    BenchmarkError,
    BenchmarkImageError,
    BenchmarkSchemaError,
    Item,
    Manifest,
    corpus_for_tokenizer,
    forget_size,
    load_benchmark,
    make_benchmark,
)
from mip_core.benchmark import content as C


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench150(tmp_path_factory: pytest.TempPathFactory) -> Benchmark:
    """The default-size benchmark, written once for the whole module (the costliest fixture, ~1 s)."""
    root = tmp_path_factory.mktemp("b150") / "bench"
    make_benchmark(root, 150, seed=0)
    return load_benchmark(root)


@pytest.fixture(scope="module")
def bench20(tmp_path_factory: pytest.TempPathFactory) -> Benchmark:
    root = tmp_path_factory.mktemp("b20") / "bench"
    make_benchmark(root, 20, seed=7)
    return load_benchmark(root)


def test_same_seed_same_bytes_other_seed_other_content(tmp_path: Path) -> None:
    m1 = make_benchmark(tmp_path / "a", 10, seed=3)
    m2 = make_benchmark(tmp_path / "b", 10, seed=3)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert m1 == m2 and set(m1.files) | {"manifest.json"} == set(fa)
    m3 = make_benchmark(tmp_path / "c", 10, seed=4)
    assert m3.content_sha256 != m1.content_sha256
    assert _files(tmp_path / "c")["items.parquet"] != fa["items.parquet"]
    assert _files(tmp_path / "c")["images/p0000.png"] != fa["images/p0000.png"]


def test_profiles_are_stable_when_n_grows(tmp_path: Path) -> None:
    """Profile i does not change with n, so small test sets are prefixes of larger ones."""
    for n in (8, 12):
        make_benchmark(tmp_path / f"n{n}", n, seed=1)
    small, big = load_benchmark(tmp_path / "n8"), load_benchmark(tmp_path / "n12")
    for ps, pb in zip(small.profiles, big.profiles[:8], strict=True):
        assert (ps.name, ps.facts, ps.image) == (pb.name, pb.facts, pb.image)
        assert (small.root / ps.image).read_bytes() == (big.root / pb.image).read_bytes()


def test_tables_schema_metadata_and_manifest(bench20: Benchmark) -> None:
    root = bench20.root
    items_schema = pq.read_schema(root / "items.parquet")
    assert items_schema.metadata[b"mip.schema"] == BENCH_SCHEMA_VERSION.encode()
    assert items_schema.names == [
        "item_id", "profile_id", "kind", "fact", "modality",
        "question", "answer", "options", "answer_index", "image",
    ]  # fmt: skip
    assert items_schema.field("options").type == pa.list_(pa.string())
    prof_schema = pq.read_schema(root / "profiles.parquet")
    assert prof_schema.metadata[b"mip.schema"] == BENCH_SCHEMA_VERSION.encode()
    assert prof_schema.names[:4] == ["profile_id", "name", "image", "forget_rank"]
    text = (root / "manifest.json").read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert doc["schema"] == BENCH_SCHEMA_VERSION and doc["n_profiles"] == 20 and doc["image_size"] == 32
    assert doc["counts"]["items"] == len(bench20.items) and doc["counts"]["images"] == 20 * 7 + 40
    assert Manifest.from_json(text) == bench20.manifest
    bench20.verify()


def test_every_item_is_a_valid_mc_item(bench150: Benchmark) -> None:
    names = {p.name for p in bench150.profiles}
    assert len(names) == 150
    for it in bench150.items:
        assert len(it.options) == 4 and len(set(it.options)) == 4
        assert it.options.count(it.answer) == 1 and it.options[it.answer_index] == it.answer
        assert 1 <= len(it.answer.split()) <= 3 and "<" not in it.question
        pool = names if it.fact == "name" else C.FACT_POOLS.get(it.fact)
        if pool is not None:
            assert set(it.options) <= set(pool)
    with pytest.raises(BenchmarkError, match="options"):
        Item("x", None, "utility", "shape", "text", "q?", "a", ("a", "a", "b", "c"), 0, None)


def test_item_structure_and_test_twins(bench20: Benchmark) -> None:
    by_id = {it.item_id: it for it in bench20.items}
    assert len(by_id) == len(bench20.items)
    qa_templates = {t for ts in C.QA_TEMPLATES.values() for t in ts}
    for p in bench20.profiles:
        mine = [it for it in bench20.items if it.profile_id == p.profile_id]
        assert sorted((it.kind, it.modality) for it in mine).count(("qa", "multimodal")) == 6
        assert sum(1 for it in mine if it.kind == "qa" and it.modality == "text") == 5
        assert not any(it.fact == "name" and it.modality == "text" for it in mine)
        for it in mine:
            assert (p.name in it.question) == (it.modality == "text")
            expected = p.name if it.fact == "name" else p.facts[it.fact]
            assert it.answer == expected
            if it.kind == "test":
                twin = by_id[it.item_id.replace("-test", "-qa")]
                assert set(twin.options) == set(it.options) and twin.answer == it.answer
                assert it.question.replace(p.name, "{name}") not in qa_templates
            elif it.modality == "multimodal":
                assert it.image == p.image


def test_splits_nested_and_disjoint(bench20: Benchmark) -> None:
    assert [len(bench20.forget_profile_ids(p)) for p in FORGET_PCTS] == [1, 2, 3]
    f5, f10, f15 = (bench20.forget_profile_ids(p) for p in FORGET_PCTS)
    assert f5 < f10 < f15
    qa_ids = {it.item_id for it in bench20.items if it.kind == "qa"}
    for pct in FORGET_PCTS:
        forget = {it.item_id for it in bench20.split_items("forget", forget_pct=pct)}
        retain = {it.item_id for it in bench20.split_items("retain", forget_pct=pct)}
        assert forget and retain and not forget & retain and forget | retain == qa_ids
        test = bench20.split_items("test", forget_pct=pct)
        assert {it.profile_id for it in test} == bench20.forget_profile_ids(pct) and {
            it.kind for it in test
        } == {"test"}
    train = bench20.split_items("train")
    assert {it.kind for it in train} == {"qa", "utility"} and len(train) == len(qa_ids) + 80
    assert {it.modality for it in bench20.split_items("utility", modality="text")} == {"text"}


def test_split_sizes_n150(bench150: Benchmark) -> None:
    sizes = {p: len(bench150.forget_profile_ids(p)) for p in FORGET_PCTS}
    assert (
        sizes
        == bench150.manifest.forget_sizes
        == {p: forget_size(150, p) for p in FORGET_PCTS}
        == {5: 8, 10: 15, 15: 22}
    )
    assert len(bench150.split_items("forget", modality="multimodal")) == 8 * 6
    assert len(bench150.split_items("forget", modality="text")) == 8 * 5
    assert len(bench150.split_items("retain", forget_pct=15)) == (150 - 22) * 11
    assert len(bench150.split_items("test", forget_pct=10)) == 15 * 11
    assert len(bench150.split_items("utility")) == 2 * 75
    assert len(bench150.split_items("train")) == 150 * 11 + 150
    assert [forget_size(n, 5) for n in (4, 10, 20, 30, 100)] == [1, 1, 1, 2, 5]


def test_images_distinct_and_transforms_mild(bench150: Benchmark) -> None:
    """Backgrounds make people separable; test transforms change pixels but keep the nearest person."""
    orig = np.stack([np.asarray(bench150.load_image(p.image), dtype=np.float32) for p in bench150.profiles])
    assert orig.shape == (150, 32, 32, 3)
    flat = orig.reshape(150, -1)
    closest = min(np.abs(flat[i + 1 :] - flat[i]).mean(-1).min() for i in range(149))
    assert closest > 15.0  # mean abs difference per channel value, out of 255
    test_mm = [it for it in bench150.items if it.kind == "test" and it.modality == "multimodal"]
    index = {p.profile_id: i for i, p in enumerate(bench150.profiles)}
    hits = 0
    for it in test_mm:
        img = bench150.load_image(it)
        assert (
            img.size == (32, 32) and img.mode == "RGB" and it.image != bench150.profile(it.profile_id).image
        )
        t = np.asarray(img, dtype=np.float32).reshape(-1)
        d = np.abs(flat - t).mean(-1)
        assert d[index[it.profile_id]] > 2.0
        hits += int(d.argmin() == index[it.profile_id])
    assert hits / len(test_mm) > 0.85  # raw-pixel nearest neighbour; a trained model does better


def test_bad_schema_versions(tmp_path: Path) -> None:
    root = tmp_path / "b"
    make_benchmark(root, 8, seed=0)
    with pytest.raises(BenchmarkSchemaError, match=r"mip benchmark make --out"):
        load_benchmark(tmp_path / "missing")
    table = pq.read_table(root / "items.parquet")
    pq.write_table(table.replace_schema_metadata({"mip.schema": "mip-bench/0"}), root / "items.parquet")
    with pytest.raises(BenchmarkSchemaError, match=r"'mip-bench/0'.*'mip-bench/1'.*mip benchmark make"):
        load_benchmark(root)
    doc = json.loads((root / "manifest.json").read_text())
    doc["schema"] = "mip-bench/0"
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BenchmarkSchemaError, match=r"'mip-bench/0'.*'mip-bench/1'.*mip benchmark make"):
        load_benchmark(root)


def test_corrupted_and_missing_images(tmp_path: Path) -> None:
    root = tmp_path / "b"
    make_benchmark(root, 8, seed=0)
    (root / "images/p0001.png").write_bytes(b"not a png")
    bench = load_benchmark(root)  # images are lazy: loading still works
    item = next(it for it in bench.items if it.image == "images/p0001.png")
    with pytest.raises(BenchmarkImageError, match=r"images/p0001\.png.*p0001-name-mm-qa"):
        bench.load_image(item)
    with pytest.raises(BenchmarkImageError, match=r"images/p0001\.png.*p0001-name-mm-qa"):
        bench.load_image("images/p0001.png")
    doc = json.loads((root / "manifest.json").read_text())  # same garbage, but a matching checksum
    doc["files"]["images/p0001.png"] = __import__("hashlib").sha256(b"not a png").hexdigest()
    (root / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BenchmarkImageError, match=r"images/p0001\.png.*cannot be decoded"):
        load_benchmark(root).load_image(item)
    (root / "images/p0002.png").unlink()
    with pytest.raises(BenchmarkImageError, match=r"images/p0002\.png.*p0002-name-mm-qa.*cannot be read"):
        bench.load_image("images/p0002.png")


def test_bad_arguments_name_field_and_allowed_values(bench20: Benchmark, tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match=r"split='dev'.*forget.*retain"):
        bench20.split_items("dev")
    with pytest.raises(BenchmarkError, match=r"forget_pct=7.*\[5, 10, 15\]"):
        bench20.split_items("forget", forget_pct=7)
    with pytest.raises(BenchmarkError, match=r"modality='image'.*multimodal"):
        bench20.split_items("forget", modality="image")
    with pytest.raises(BenchmarkError, match=r"n_profiles=3"):
        make_benchmark(tmp_path / "x", 3, seed=0)


def test_output_dir_rules(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BenchmarkError, match="not empty"):
        make_benchmark(foreign, 8, seed=0)
    assert (foreign / "notes.txt").read_text() == "mine"
    root = tmp_path / "b"
    make_benchmark(root, 8, seed=0)
    make_benchmark(root, 9, seed=1)  # overwriting a benchmark is allowed
    assert load_benchmark(root).manifest.seed == 1 and len(list((root / "images").iterdir())) == 9 * 7 + 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "foreign"]  # no temp dirs left


def test_tokenizer_corpus_covers_benchmark(bench20: Benchmark) -> None:
    corpus = corpus_for_tokenizer()
    assert corpus == corpus_for_tokenizer()

    def words(texts: list[str]) -> set[str]:
        return {w for t in texts for w in re.findall(r"[\w']+|[^\w\s]", t)}

    assert words(bench20.text_corpus()) <= words(corpus)
    assert len(C.FIRST_NAMES) * len(C.LAST_NAMES) >= 500
    assert all(len(pool) >= 20 for pool in C.FACT_POOLS.values())


def test_no_heavy_imports() -> None:
    code = (
        "import sys, mip_core.benchmark; print([m for m in ('torch', 'prefect', 'ray') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_training_without_some_people_leaves_out_exactly_their_items(bench20):
    from mip_core.errors import InputError
    from mip_core.training import training_items

    everyone = training_items(bench20)
    gone = sorted(bench20.forget_profile_ids(10))
    kept = training_items(bench20, gone)
    assert {it.profile_id for it in kept} & set(gone) == set()
    assert len(kept) == len(everyone) - sum(it.profile_id in gone for it in everyone) < len(everyone)
    assert any(it.profile_id is None for it in kept)  # the general-knowledge items stay
    with pytest.raises(InputError, match="exclude_profiles names 1 people .* e.g. \\['nobody'\\]"):
        training_items(bench20, ["nobody"])
