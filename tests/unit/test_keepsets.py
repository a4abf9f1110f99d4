"""Keep-set files, templates and item tables: the way an operator without a training benchmark tells the service
what the model must keep knowing (docs/keepsets.md)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mip_core.benchmark import Benchmark, load_benchmark, make_benchmark
from mip_core.benchmark.schema import BenchmarkError, BenchmarkImageError, Item
from mip_core.errors import InputError
from mip_core.service.items import (ITEMS_SCHEMA_VERSION, ItemTable, ItemTableError, load_item_table, load_items,
                                    read_item_table, write_item_table)
from mip_core.service.keepsets import (DEFAULT_TEMPLATES, Template, export_benchmark, ingest_keepset,
                                       keepset_subjects, read_keepset, read_templates, subject_slug,
                                       write_templates)
from mip_core.service.store import ServiceStore


def _png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _free_form_supported() -> bool:
    try:
        Item("x", "p", "qa", "f", "text", "q", "a", (), -1, None)  # type: ignore[arg-type]
    except BenchmarkError:
        return False
    return True


OPTS = ["Lisbon", "Oslo", "Lima", "Perth"]
RETAIN = [
    {"question": "Where was Ada Byron born?", "answer": "Lisbon", "options": OPTS, "subject": "Ada Byron",
     "fact": "birthplace"},
    {"question": "Who is this?", "answer": "Ada Byron", "options": ["Ada Byron", "Bo Li", "Cy Young", "Di Ng"],
     "image": "photos/ada.png", "subject": "Ada Byron", "fact": "name", "item_id": "ada-photo"},
    {"question": "What is Bo Li's job?", "answer": "baker", "options": ["baker", "pilot", "nurse", "tailor"],
     "subject": "Bo Li", "subject_id": "p0003"},
]


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "ada.png").write_bytes(_png((200, 30, 30)))
    return tmp_path


def test_valid_jsonl_round_trips_into_an_item_table(toy):
    store = ServiceStore(str(toy / "store"))
    uri = ingest_keepset(store, _jsonl(toy / "retain.jsonl", RETAIN), "retain", "ks/retain")
    table = load_items(uri)
    assert isinstance(table, ItemTable) and table.profiles == ()
    assert [(it.question, it.answer, list(it.options)) for it in table.items] == [
        (r["question"], r["answer"], r["options"]) for r in RETAIN]
    ada, photo, bo = table.items
    assert (ada.kind, ada.modality, ada.profile_id, ada.fact, ada.answer_index) == ("qa", "text", "ada-byron",
                                                                                     "birthplace", 0)
    assert photo.item_id == "ada-photo" and photo.modality == "multimodal" and photo.image.startswith("images/")
    assert (bo.profile_id, bo.fact) == ("p0003", "fact")  # subject_id as given; fact defaults to "fact"
    assert keepset_subjects(table) == {"ada-byron": "Ada Byron", "p0003": "Bo Li"}
    red = np.asarray(Image.new("RGB", (8, 8), (200, 30, 30)))
    assert np.array_equal(np.asarray(table.load_image(photo)), red)
    itemset = json.loads((toy / "store/ks/retain/itemset.json").read_text())
    assert itemset["schema"] == ITEMS_SCHEMA_VERSION and itemset["counts"] == {"qa": 3}
    assert set(itemset["files"]) == {"items.parquet", "subjects.json", photo.image}
    assert pq.read_schema(toy / "store/ks/retain/items.parquet").metadata[b"mip.schema"] == b"mip-items/1"
    # the same rows again: the same default item ids (derived from the rows), so a re-registration is stable
    again = read_item_table(store, "ks/retain")
    assert [it.item_id for it in again.items] == [it.item_id for it in table.items]


def test_parquet_keepset_gives_the_same_table(toy):
    jsonl = read_keepset(_jsonl(toy / "retain.jsonl", RETAIN), "retain")
    columns = ["question", "answer", "options", "image", "subject", "subject_id", "fact", "item_id"]
    table = pa.table({c: [r.get(c) for r in RETAIN] for c in columns})  # nulls where a row has no such field
    pq.write_table(table, toy / "retain.parquet")
    parquet = read_keepset(toy / "retain.parquet", "retain")
    assert parquet.items == jsonl.items and parquet.images == jsonl.images and parquet.subjects == jsonl.subjects


def test_utility_rows_belong_to_nobody(toy):
    rows = [{"question": "What is 2+3?", "answer": "5", "options": ["5", "6", "7", "8"], "fact": "arithmetic"},
            {"question": "What shape is this?", "answer": "circle",
             "options": ["circle", "square", "star", "oval"], "image": str(toy / "photos" / "ada.png")}]
    ks = read_keepset(_jsonl(toy / "utility.jsonl", rows), "utility")
    assert [(it.kind, it.profile_id, it.modality) for it in ks.items] == [("utility", None, "text"),
                                                                          ("utility", None, "multimodal")]
    assert all(it.item_id.startswith("util-") for it in ks.items) and ks.subjects == {}
    bad = _jsonl(toy / "bad-utility.jsonl", [{**rows[0], "subject": "Ada Byron"}])
    with pytest.raises(InputError) as info:
        read_keepset(bad, "utility")
    assert f"{bad}:1: subject: must be absent in a utility set" in str(info.value)


@pytest.mark.skipif(not _free_form_supported(), reason="free-form items (options == ()) not in schema.py yet")
def test_rows_without_options_are_free_form(toy):
    ks = read_keepset(_jsonl(toy / "r.jsonl", [{"question": "Where does Ada Byron live?", "answer": "London",
                                                "subject": "Ada Byron"}]), "retain")
    (item,) = ks.items
    assert item.options == () and item.answer_index == -1
    store = ServiceStore(str(toy / "store"))
    table = load_items(ingest_keepset(store, toy / "r.jsonl", "retain", "ff"))
    assert table.items == ks.items


def test_every_bad_field_is_named_with_its_file_and_line(toy):
    good = {"question": "Where was Ada Byron born?", "answer": "Lisbon", "subject": "Ada Byron",
            "options": OPTS}
    lines = [
        {k: v for k, v in good.items() if k != "question"},  # 1
        {**good, "answer": "  "},  # 2
        {**good, "options": OPTS[:3]},  # 3
        {**good, "options": ["Rome", "Oslo", "Lima", "Perth"]},  # 4
        {**good, "colour": "red"},  # 5
        {**good, "answer": 1974},  # 6
        {k: v for k, v in good.items() if k != "subject"},  # 7
        {**good, "subject_id": "a b/c"},  # 8
        {**good, "item_id": "../x"},  # 9
        '{"question": "unterminated',  # 10
        {**good, "image": "photos/missing.png"},  # 11
        {**good, "options": ["Lisbon", "Lisbon", "Oslo", "Lima"]},  # 12
        {**good, "subject_id": "p1", "item_id": "one"},  # 13
        {**good, "subject": "Someone Else", "subject_id": "p1"},  # 14: p1 is Ada Byron on line 13
        {**good, "subject_id": "p2", "item_id": "one"},  # 15: item id of line 13
        "[1, 2]",  # 16
        {**good, "fact": ""},  # 17
    ]
    path = _jsonl(toy / "bad.jsonl", lines)
    with pytest.raises(InputError) as info:
        read_keepset(path, "retain")
    msg = str(info.value)
    expected = {1: "question: required field is missing", 2: "answer: must not be empty",
                3: "options: needs exactly 4",
                4: "options: none of the options is the answer 'Lisbon'", 5: "colour: unknown field",
                6: "answer: must be a string", 7: "subject: required field is missing",
                8: "subject_id: 'a b/c' is not a valid id", 9: "item_id: '../x' is not a valid id",
                10: "(row): not valid JSON", 11: "image: cannot read image",
                12: "options: needs exactly 4 distinct",
                14: "subject_id: 'p1' is 'Ada Byron' on line 13", 15: "item_id: 'one' is already used on line 13",
                16: "(row): expected a JSON object", 17: "fact: must not be empty"}
    for n, text in expected.items():
        assert f"{path}:{n}: {text}" in msg, (n, msg)
    assert "relative to the keep-set file's folder" in msg and "dataset image name" not in msg
    assert msg.startswith(f"invalid retain keep-set {path} ({len(expected)} problems):")
    assert "docs/keepsets.md" in msg and f"{path}:13:" not in msg
    assert not (toy / "store").exists()  # nothing was written


def test_an_image_that_is_not_an_image_is_refused(toy):
    (toy / "photos" / "fake.png").write_text("not a picture at all")
    path = _jsonl(toy / "r.jsonl", [{**RETAIN[1], "image": "photos/fake.png", "item_id": None},
                                    {**RETAIN[0], "image": "photos/fake.png"}])
    with pytest.raises(InputError) as info:
        read_keepset(path, "retain")
    msg = str(info.value)
    assert f"{path}:1: image: the image is corrupt or not an image" in msg
    assert f"{path}:2: image: 'photos/fake.png' cannot be used (see line 1)" in msg
    store = ServiceStore(str(toy / "store"))
    with pytest.raises(InputError, match="corrupt or not an image"):  # write_item_table checks the bytes too
        write_item_table(store, "t", [Item("i", None, "utility", "f", "multimodal", "q", "a", ("a", "b", "c", "d"),
                                           0, "images/x.png")], {"images/x.png": b"text"})
    with pytest.raises(InputError, match="its image 'images/y.png' is not among the images given"):
        write_item_table(store, "t", [Item("i", None, "utility", "f", "multimodal", "q", "a", ("a", "b", "c", "d"),
                                           0, "images/y.png")], {})
    assert not store.exists("t/itemset.json")


def test_item_table_errors_name_the_file_and_the_fix(toy):
    store = ServiceStore(str(toy / "store"))
    uri = ingest_keepset(store, _jsonl(toy / "retain.jsonl", RETAIN), "retain", "t")
    itemset = toy / "store/t/itemset.json"
    doc = json.loads(itemset.read_text())
    itemset.unlink()
    with pytest.raises(ItemTableError, match=rf"{re.escape(uri)} has no itemset.json.*write it again"):
        load_item_table(uri)
    with pytest.raises(ItemTableError, match="has no itemset.json"):  # not mistaken for a benchmark either
        load_items(uri)
    itemset.write_text(json.dumps({**doc, "schema": "mip-items/0"}))
    with pytest.raises(ItemTableError, match="schema version 'mip-items/0' but this code reads 'mip-items/1'"):
        load_item_table(uri)
    itemset.write_text(json.dumps(doc))
    image = next(p for p in (toy / "store/t/images").iterdir())
    image.write_bytes(_png((0, 0, 255)))
    table = load_item_table(uri)  # images are checked when read
    with pytest.raises(BenchmarkImageError, match=rf"{re.escape(str(image))} .*differs from the sha256"):
        table.load_image(table.items[1])
    (toy / "store/t/items.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(ItemTableError, match=r"items.parquet differs from the sha256 in .*itemset.json"):
        load_item_table(uri)


def test_load_items_opens_a_benchmark_too(tmp_path):
    make_benchmark(tmp_path / "b", 4, seed=1, n_utility=8)
    bench = load_items(tmp_path / "b")
    assert isinstance(bench, Benchmark)
    assert keepset_subjects(bench) == {p.profile_id: p.name for p in bench.profiles}


def test_templates_are_validated(tmp_path):
    lines = [
        {"template": "Where was this person born?", "modality": "text", "use": "edit"},  # 1: text without {name}
        {"template": "Who is {name}?", "modality": "image", "use": "edit"},  # 2: image with {name}
        {"template": "Where was {name} born?", "modality": "text", "use": "train"},  # 3
        {"template": "Where was {name} born?", "modality": "audio", "use": "edit"},  # 4
        {"template": "How old is {name} in {year}?", "modality": "text", "use": "edit"},  # 5
        {"template": "Where was {name born?", "modality": "text", "use": "edit"},  # 6
        {"template": "Where was {name} born?", "modality": "text", "use": "edit", "lang": "en"},  # 7
        {"modality": "text", "use": "edit"},  # 8
    ]
    path = _jsonl(tmp_path / "t.jsonl", lines)
    with pytest.raises(InputError) as info:
        read_templates(path)
    msg = str(info.value)
    for n, text in {1: "template: a text template names the person: it must contain {name}",
                    2: "template: an image template asks about the person in the picture: it must not contain",
                    3: "use: 'train' is not allowed", 4: "modality: 'audio' is not allowed",
                    5: "template: only the {name} placeholder is allowed, found {year}",
                    6: "template: has an unbalanced", 7: "lang: unknown field",
                    8: "template: required field is missing"}.items():
        assert f"{path}:{n}: {text}" in msg, (n, msg)
    held = _jsonl(tmp_path / "held.jsonl", [{"template": "Who is {name}?", "modality": "text", "use": "held_out"}])
    with pytest.raises(InputError, match="no template has \"use\": \"edit\""):
        read_templates(held)
    # the defaults are valid, cover both modalities and both uses, and survive a write and a read
    assert read_templates(write_templates(tmp_path / "d.jsonl", DEFAULT_TEMPLATES)) == list(DEFAULT_TEMPLATES)
    assert {(t.modality, t.use) for t in DEFAULT_TEMPLATES} == {(m, u) for m in ("text", "image")
                                                                for u in ("edit", "held_out")}
    assert {t.fact for t in DEFAULT_TEMPLATES} >= {"name", "birthplace", "occupation", "residence", "employer",
                                                    "known_for"}
    born = Template(template="Where was {name} born?", modality="text", use="edit")
    assert born.fill("Ada") == "Where was Ada born?"
    assert subject_slug("José Da Silva") == "jose-da-silva" and subject_slug("李雷").startswith("subject-")


def test_export_then_ingest_reproduces_the_benchmark(tmp_path):
    make_benchmark(tmp_path / "b", 4, seed=1, n_utility=8)
    bench = load_benchmark(tmp_path / "b")
    written = export_benchmark(bench, tmp_path / "plain")
    assert set(written) == {"retain", "utility", "templates", "images"}
    templates = read_templates(written["templates"])
    assert {t.use for t in templates} == {"edit", "held_out"} and any("{name}" in t.template for t in templates)
    store = ServiceStore(str(tmp_path / "store"))
    retain = load_items(ingest_keepset(store, written["retain"], "retain", "k/retain"))
    utility = load_items(ingest_keepset(store, written["utility"], "utility", "k/utility"))
    for kind, table in (("qa", retain), ("utility", utility)):
        expected = [it for it in bench.items if it.kind == kind]
        assert [it.item_id for it in table.items] == [it.item_id for it in expected]
        for got, want in zip(table.items, expected, strict=True):
            assert (got.question, got.answer, got.options, got.answer_index, got.fact, got.modality,
                    got.profile_id) == (want.question, want.answer, want.options, want.answer_index, want.fact,
                                        want.modality, want.profile_id)
            if want.image is not None:
                assert np.array_equal(np.asarray(table.load_image(got)), np.asarray(bench.load_image(want)))
    assert keepset_subjects(retain) == keepset_subjects(bench)


def test_keepset_on_s3_into_an_s3_store(tmp_path, s3_endpoint, request):
    prefix = s3_endpoint.uri(request.node.name)
    s3_endpoint.fs.pipe(f"{prefix.removeprefix('s3://')}/files/photos/ada.png", _png((200, 30, 30)))
    s3_endpoint.fs.pipe(f"{prefix.removeprefix('s3://')}/files/retain.jsonl",
                        "".join(json.dumps(r) + "\n" for r in RETAIN).encode())
    store = ServiceStore(f"{prefix}/store", endpoint_url=s3_endpoint.endpoint_url)
    uri = ingest_keepset(store, f"{prefix}/files/retain.jsonl", "retain", "ks/retain")
    assert uri == f"{prefix}/store/ks/retain"
    table = read_item_table(store, "ks/retain")
    assert [it.question for it in table.items] == [r["question"] for r in RETAIN]
    assert table.load_image(table.items[1]).size == (8, 8)
