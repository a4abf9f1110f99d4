"""Forget request schema: what is accepted, what is rejected and how the rejection reads; resolution."""

from __future__ import annotations

import json
from datetime import timezone
from pathlib import Path

import pytest

from mip_core.errors import InputError
from mip_core.service.requests import (
    SCHEMA_FILE,
    ForgetRequest,
    parse_request,
    request_json_schema,
    schema_text,
)

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"target_model": "demo", "subjects": ["p0003"], "requester": "dpo@example.org", "reason": "privacy"}


def _bad(**changes) -> str:
    data = {**GOOD, **changes}
    data = {k: v for k, v in data.items() if v is not ...}
    with pytest.raises(InputError) as info:
        parse_request(json.dumps(data))
    return str(info.value)


def test_good_request_gets_defaults():
    req = parse_request(json.dumps(GOOD))
    assert req.request_id.startswith("req-") and len(req.request_id) == 16
    assert req.created_at.tzinfo is not None and req.created_at.utcoffset() == timezone.utc.utcoffset(None)
    assert (req.subjects, req.items, req.note) == (["p0003"], [], None)
    other = parse_request(json.dumps(GOOD))
    assert other.request_id != req.request_id


def test_items_only_request():
    req = parse_request(json.dumps({**GOOD, "subjects": [], "request_id": "r.1_a-B",
                                    "items": [{"item_id": "p0001-name-mm-qa"},
                                              {"question": "Where was X born?", "answer": "Lisbon"}]}))
    assert req.request_id == "r.1_a-B" and req.items[1].answer == "Lisbon"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"requester": ...}, "requester: required field is missing"),
        ({"target_model": ...}, "target_model: required field is missing"),
        ({"reason": "because"}, "reason: Input should be 'privacy'"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"request_id": "../etc/passwd"}, "request_id: '../etc/passwd' is not a valid id"),
        ({"request_id": "a/b"}, "no '/'"),
        ({"target_model": "m o"}, "target_model: 'm o' is not a valid id"),
        ({"subjects": []}, "(request): the forget set is empty: give `subjects` (entity ids) or `items`"),
        ({"subjects": ["p1", "p2", "p1"]}, "duplicate subjects ['p1']"),
        ({"subjects": ["p/1"]}, "subjects[0]: 'p/1' is not a valid id"),
        ({"items": [{"answer": "Lisbon"}]}, "items[0]: give `item_id` or `question`"),
        ({"items": [{"item_id": "x", "extra": 1}]}, "items[0].extra: unknown field"),
        ({"requester": "   "}, "requester: String should have at least 1 character"),
        ({"created_at": "2026-01-01T00:00:00"}, "created_at: Input should have timezone info"),
        ({"subjects": [f"p{i}" for i in range(1001)]}, "subjects: List should have at most 1000 items"),
    ],
)
def test_bad_requests_name_the_field(changes, expected):
    message = _bad(**changes)
    assert expected in message
    assert "fix these fields" in message and SCHEMA_FILE in message


def test_every_problem_is_listed_at_once():
    message = _bad(requester=..., reason="x", request_id="a/b", extra=1)
    assert "4 problems" in message
    for field in ("requester:", "reason:", "request_id:", "extra:"):
        assert f"\n  {field}" in message


@pytest.mark.parametrize(("text", "expected"), [
    ('{"target_model": "demo",\n "subjects": [}', "not valid JSON at line 2, column 15"),
    ("", "not valid JSON at line 1, column 1"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_bad_json(text, expected):
    with pytest.raises(InputError, match="invalid forget request") as info:
        parse_request(text)
    assert expected in str(info.value)


def test_committed_schema_is_current():
    committed = (ROOT / SCHEMA_FILE).read_text()
    assert committed == schema_text(), "regenerate: mip schema request > schemas/forget_request.schema.json"
    schema = json.loads(committed)
    assert schema == json.loads(json.dumps(request_json_schema()))
    assert set(schema["required"]) == {"target_model", "requester", "reason"}
    assert schema["additionalProperties"] is False
    assert schema["properties"]["request_id"]["pattern"] == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def test_record_round_trip():
    from mip_core.service.requests import RequestRecord

    record = RequestRecord(request=ForgetRequest.model_validate(GOOD), metrics={"forget_acc": 0.1})
    again = RequestRecord.model_validate_json(record.model_dump_json())
    assert again == record and again.state == "pending" and again.request_id == record.request.request_id


# ---- resolution against a benchmark ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from mip_core.benchmark import load_benchmark, make_benchmark

    out = tmp_path_factory.mktemp("svc") / "bench"
    make_benchmark(out, 6, 0, image_size=16, n_utility=4)
    return load_benchmark(out)


def _req(rid: str, **kw) -> ForgetRequest:
    return ForgetRequest.model_validate({**GOOD, "request_id": rid, "subjects": [], **kw})


def test_resolve_subjects_and_rejections(bench):
    from mip_core.service.resolve import resolve_requests

    qa1 = [it for it in bench.items if it.profile_id == "p0001" and it.kind == "qa"]
    text_item = next(it for it in bench.items if it.profile_id == "p0002" and it.kind == "qa"
                     and it.modality == "text")
    utility = next(it for it in bench.items if it.kind == "utility")
    requests = [
        _req("a", subjects=["p0001"]),
        _req("bad", subjects=["p0001", "p9999"]),
        _req("b", subjects=["p0001"], items=[{"question": "  " + text_item.question.upper() + " "}]),
        _req("unknown-item", items=[{"item_id": "nope"}]),
        _req("unknown-q", items=[{"question": "What is the airspeed of a swallow?"}]),
        _req("util", items=[{"item_id": utility.item_id}]),
    ]
    out = resolve_requests(requests, bench)
    assert out.accepted == ("a", "b")
    assert set(out.rejected) == {"bad", "unknown-item", "unknown-q", "util"}
    assert "unknown subjects ['p9999']" in out.rejected["bad"] and "p0000, p0001" in out.rejected["bad"]
    assert "item_id 'nope' is not in the dataset" in out.rejected["unknown-item"]
    assert "not in the dataset" in out.rejected["unknown-q"]
    assert "general ability" in out.rejected["util"]
    # first request wins a shared item; b keeps only what a did not take; no item twice
    assert [(it.item_id, rid) for it, rid in out.forget] == [
        *((it.item_id, "a") for it in qa1), (text_item.item_id, "b")]
    assert out.items_of == {"a": tuple(it.item_id for it in qa1),
                            "b": tuple(sorted([*(it.item_id for it in qa1), text_item.item_id],
                                              key=[it.item_id for it in bench.items].index))}
    assert len(out.request_of) == len(out.forget) and out.forget_profiles == {"p0001", "p0002"}
    assert all(it.kind == "qa" for it in out.items)  # test paraphrases stay held out for the gate
    assert resolve_requests(list(reversed(requests)), bench).forget[0][1] == "b"


def test_resolve_ambiguous_question_needs_image(bench):
    from mip_core.service.resolve import resolve_requests

    mm = next(it for it in bench.items
              if it.kind == "qa" and it.modality == "multimodal" and it.fact == "name")
    shared = [it for it in bench.items if it.kind == "qa" and it.question == mm.question]
    assert len(shared) > 1  # the premise: multimodal questions are shared across profiles
    by_image = {"question": mm.question, "image": f"bench/{mm.image}"}  # a dataset image name (not a file here)
    out = resolve_requests([_req("amb", items=[{"question": mm.question}]), _req("img", items=[by_image])],
                           bench)
    assert "add `image` or `answer`" in out.rejected["amb"]
    assert [it.item_id for it in out.items] == [mm.item_id]


def test_retain_items_sample(bench):
    from mip_core.service.resolve import retain_items

    everything = retain_items(bench, {"p0001"}, None, 0)
    assert everything and all(it.profile_id not in (None, "p0001") and it.kind == "qa" for it in everything)
    a, b = retain_items(bench, ["p0001"], 5, 3), retain_items(bench, ["p0001"], 5, 3)
    assert a == b and len(a) == 5 and set(a) <= set(everything)
    order = [it.item_id for it in everything]
    assert [it.item_id for it in a] == sorted((it.item_id for it in a), key=order.index)
    assert retain_items(bench, ["p0001"], 5, 4) != a


def test_the_edit_can_hold_against_more_people_than_the_gate_scores_and_never_the_same_items():
    from mip_core.service.resolve import kept_split, seeded_sample

    pool = [f"i{k:02d}" for k in range(40)]
    held, scored = kept_split(pool, 5, None, 7)  # as before: 10 drawn, alternately to each
    both = seeded_sample(pool, 10, 7)
    assert (held, scored) == (both[0::2], both[1::2])
    held, scored = kept_split(pool, 5, 30, 7)
    assert len(scored) == 5 and len(held) == 30 and not set(held) & set(scored)
    assert scored == seeded_sample(pool, 5, 7)  # the gate's sample does not depend on the edit's size
    assert held == sorted(held) and kept_split(pool, 5, 100, 7)[0] == [i for i in pool if i not in scored]


def test_the_earlier_sample_spreads_over_people_so_each_is_judged_on_several_of_their_items():
    from mip_core.service.resolve import seeded_sample, seeded_sample_by

    pool = [(f"{person}{k:02d}", person) for person, n in (("a", 2), ("b", 11), ("c", 11)) for k in range(n)]
    picked = seeded_sample_by(pool, lambda p: p[1], 12, 3)
    counts = {person: sum(1 for _, p in picked if p == person) for person in "abc"}
    assert counts == {"a": 2, "b": 5, "c": 5}  # a gives what it lacks to the others
    assert picked == [p for p in pool if p in picked] and len(set(picked)) == 12  # pool order, no repeats
    assert seeded_sample_by(pool, lambda p: p[1], 12, 3) == picked and seeded_sample_by(pool, lambda p: p[1], 12, 4)
    assert sorted(sum(1 for _, p in seeded_sample_by(pool, lambda p: p[1], 10, s) if p != "a") for s in range(5)
                  ) == [8] * 5
    assert seeded_sample_by(pool, lambda p: p[1], None, 0) == pool == seeded_sample_by(pool, lambda p: p[1], 99, 0)
    with pytest.raises(ValueError, match="limit=-1"):
        seeded_sample_by(pool, lambda p: p[1], -1, 0)
    assert seeded_sample(pool, 12, 3) != picked  # what it replaced


# ---- what the lineage forgot -------------------------------------------------------------------------------


def test_the_next_batch_keeps_earlier_forgotten_people_out_of_its_kept_sets_and_rechecks_them(bench, tmp_path):
    """Night 1 forgets p0001 (request a, done) and fails p0002 (request b); night 2 plans on the published
    version: p0001 leaves both kept samples (an edit told to keep them would train them back), p0002 stays,
    and a sample of p0001's forget items becomes the gate's ``earlier`` set."""
    from mip_core.service.batch import BatchManifest, plan_batch
    from mip_core.service.forgotten import asked_elsewhere, forgotten_before, registered_version
    from mip_core.service.store import ServiceStore

    store = ServiceStore(str(tmp_path / "store"))
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "tiny"}')
    dataset = str(bench.root)
    v1 = store.register_model("demo", str(source), dataset_uri=dataset)
    common = {"target_model": "demo", "base_uri": "/m", "dataset_uri": dataset, "bench": bench}
    for rid, subject in (("a", "p0001"), ("b", "p0002"), ("c", "p0003")):
        store.submit(_req(rid, subjects=[subject]))
    store.claim(["a", "b"], "b1")
    night1 = plan_batch("b1", [store.get("a"), store.get("b")], base_version=v1, **common)
    store.write_text(store.batch_key("b1", "manifest.json"), night1.to_json())
    store.finish("a", "done", model_version="v0002")
    store.finish("b", "failed", reason="its own forgetting rate was too low")
    v2 = store.register_model("demo", str(source), dataset_uri=dataset,
                              lineage={"batch_id": "b1", "requests": ["a", "b"]})

    assert forgotten_before(store, "demo", v1).requests == ()
    # the gate's floors since registration hold against v1: v2 was published by an edit, v1 registered
    assert (registered_version(store, "demo", v1), registered_version(store, "demo", v2)) == (v1, v1)
    forgotten = forgotten_before(store, "demo", v2)
    assert [r.request_id for r in forgotten.requests] == ["a"] and forgotten.batches == ["b1"]
    first_forgotten = {i for i, rid in night1.forget if rid == "a"}
    assert {i for i, _, _ in forgotten.items} == first_forgotten

    store.claim(["c"], "b2")
    by_id = {it.item_id: it for it in bench.items}

    def kept_people(m: BatchManifest) -> set[str]:
        return {by_id[i].profile_id for i in (*m.edit_retain, *m.eval_retain)} - {None}

    night2 = plan_batch("b2", [store.get("c")], base_version=v2, earlier_limit=4,
                        forgotten=[(i, rid) for i, rid, _ in forgotten.items], **common)
    unaware = plan_batch("b2", [store.get("c")], base_version=v2, **common)
    assert "p0001" in kept_people(unaware)  # the behaviour before: forgotten people were to be kept
    assert "p0001" not in kept_people(night2) and "p0002" in kept_people(night2)
    assert len(night2.eval_earlier) == 4 and {i for i, _ in night2.eval_earlier} <= first_forgotten
    assert {rid for _, rid in night2.eval_earlier} == {"a"}
    assert {i: night2.request_of()[i] for i, _ in night2.eval_earlier} == dict(night2.eval_earlier)  # judged by person
    assert [it.item_id for it in night2.item_sets(bench)["earlier"]] == [i for i, _ in night2.eval_earlier]
    assert "earlier" not in night1.item_sets(bench)
    assert BatchManifest.from_json(night2.to_json()) == night2
    # people other requests name leave the kept sets too: failed (b), waiting for a later batch (d); not rejected (e)
    for rid, subject in (("d", "p0004"), ("e", "p0005")):
        store.submit(_req(rid, subjects=[subject]))
    store.finish("e", "rejected", reason="a bad request")
    asked = asked_elsewhere(store, "demo", ["c"])
    assert sorted(r.request_id for r in asked) == ["a", "b", "d"]
    aware = plan_batch("b2", [store.get("c")], base_version=v2, asked=asked, **common)
    assert not {"p0001", "p0002", "p0004"} & kept_people(aware) and "p0005" in kept_people(aware)
    retrained = store.register_model("demo", str(source), dataset_uri=dataset)  # an operator's, not an edit's
    edited = store.register_model("demo", str(source), dataset_uri=dataset, lineage={"batch_id": "b3"})
    assert store.model_info("demo", retrained)["parent_version"] == v2
    assert registered_version(store, "demo", edited) == retrained
