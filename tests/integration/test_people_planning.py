"""Planning a batch of requests about people on a model registered with keep-sets (tiny trained model, no Ray).

The target model answers the probes in this process (the service does it on a Ray actor: same function), and
``MIP_NO_BENCHMARK=1`` is set while planning, so opening the benchmark anywhere would fail the test.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from mip_core.benchmark import load_benchmark
from mip_core.cli import main
from mip_core.modeling import load_model
from mip_core.modeling.io import localize
from mip_core.service.items import load_items
from mip_core.service.planning import plan_people_batch
from mip_core.service.probes import answers_by_id
from mip_core.service.requests import ForgetRequest
from mip_core.service.store import ServiceStore


@pytest.fixture(scope="module")
def registered(trained_tiny, tmp_path_factory):
    model_dir, bench_dir = trained_tiny
    tmp = tmp_path_factory.mktemp("people")
    keep, root = tmp / "keep", str(tmp / "store")
    assert main(["benchmark", "export", "--bench", bench_dir, "--out", str(keep)]) == 0
    assert main(["models", "register", "--root", root, "--name", "tiny", "--model", model_dir, "--retain",
                 str(keep / "retain.jsonl"), "--utility", str(keep / "utility.jsonl"), "--templates",
                 str(keep / "templates.jsonl")]) == 0
    return ServiceStore(root), load_benchmark(bench_dir), load_model(model_dir, device="cpu"), tmp


def test_people_named_by_name_and_photo_become_probes_the_model_answers(registered, monkeypatch):
    store, bench, loaded, tmp = registered
    alice, bob = bench.profiles[1], bench.profiles[2]
    photo = tmp / "alice.png"
    photo.write_bytes((bench.root / alice.image).read_bytes())
    requests = [ForgetRequest(request_id="r-alice", target_model="tiny", requester="t", reason="privacy",
                              subjects=[{"name": alice.name, "photos": [str(photo)]}]),
                ForgetRequest(request_id="r-bob", target_model="tiny", requester="t", reason="privacy",
                              subjects=[bob.profile_id]),  # an id of the registered retain set
                ForgetRequest(request_id="r-ghost", target_model="tiny", requester="t", reason="privacy",
                              subjects=["p0999"])]
    requests = [store.submit(r).request for r in requests]
    asked: list[int] = []

    def answer(table_uri, ids):
        asked.append(len(ids))
        return answers_by_id(loaded.model, loaded.processor, load_items(localize(table_uri)), ids)

    info = store.model_info("tiny")
    monkeypatch.setenv("MIP_NO_BENCHMARK", "1")
    m = plan_people_batch(store, "b1", requests, info["keepsets"], answer, target_model="tiny", base_version="v0001",
                          base_uri=info["uri"], rejected={}, retain_limit=10, utility_limit=4)

    assert list(m.rejected) == ["r-ghost"] and "p0999" in m.rejected["r-ghost"]
    table = load_items(localize(m.dataset_uri))
    by_id = {it.item_id: it for it in table.items}
    wanted = [i for i, _ in m.forget] + list(m.eval_test) + list(m.edit_retain + m.eval_retain + m.eval_utility)
    assert set(wanted) == set(by_id)  # the batch's table holds exactly what it edits and scores
    # alice: probes by name (text) and by photo (image), answered by the model itself, held-out ones beside
    mine = [by_id[i] for i in m.items_of["r-alice"]]
    assert mine and all(it.free_form and it.profile_id == "r-alice.s0" for it in mine)
    assert {it.modality for it in mine} == {"text", "multimodal"}
    assert any(alice.name in it.question for it in mine)
    assert sum(alice.facts[it.fact] == it.answer for it in mine if it.fact in alice.facts) >= len(mine) // 2
    assert {r for _, r in m.held_out} == {"r-alice"}
    # bob by id: his retain facts, with their options, are the edit items
    assert sorted(m.items_of["r-bob"]) == sorted(it.item_id for it in table.items if it.profile_id == bob.profile_id)
    # neither is in the retain sample the edit holds or the gate scores
    kept_people = {by_id[i].profile_id for i in m.edit_retain + m.eval_retain if by_id[i].kind == "qa"}
    assert kept_people and bob.profile_id not in kept_people and alice.profile_id not in kept_people
    # the audit table: every candidate with the model's answer and confidence, kept or not
    probes = pq.read_table(io.BytesIO(store.read_bytes(store.batch_key("b1", "probes.parquet")))).to_pylist()
    assert len(probes) == asked[0] and {p["request_id"] for p in probes} == {"r-alice"}
    assert all(p["confidence"] >= 0.5 for p in probes if p["kept"]) and all(p["why"] for p in probes if not p["kept"])
    edit_answers: dict[str, set[str]] = {}  # one answer per fact, by name and by photo alike
    for p in probes:
        if p["kept"] and p["use"] == "edit" and p["agrees"]:
            edit_answers.setdefault(p["fact"], set()).add(p["answer"].casefold().strip(" ."))
    assert all(len(said) == 1 for said in edit_answers.values())
    held = [p for p in probes if p["kept"] and p["use"] == "held_out"]
    assert held and all(p["answer"].casefold().strip(" .") in edit_answers[p["fact"]] for p in held)


def test_the_next_night_rechecks_people_the_lineage_forgot_from_their_own_batch_tables(registered, monkeypatch):
    """Night 1 forgets Carol by name and photo; the next night's batch copies a sample of her probes (and their
    photos) from night 1's item table into its own as the gate's ``earlier`` set, and keeps her out of the
    kept samples."""
    from mip_core.service.forgotten import asked_elsewhere, forgotten_before

    store, bench, loaded, tmp = registered
    carol, dave = bench.profiles[3], bench.profiles[4]
    photo = tmp / "carol.png"
    photo.write_bytes((bench.root / carol.image).read_bytes())
    night1 = store.submit(ForgetRequest(request_id="r-carol", target_model="tiny", requester="t", reason="privacy",
                                        subjects=[{"name": carol.name, "photos": [str(photo)]}])).request
    night2 = store.submit(ForgetRequest(request_id="r-dave", target_model="tiny", requester="t", reason="privacy",
                                        subjects=[dave.profile_id])).request

    def answer(table_uri, ids):
        return answers_by_id(loaded.model, loaded.processor, load_items(localize(table_uri)), ids)

    info = store.model_info("tiny")
    monkeypatch.setenv("MIP_NO_BENCHMARK", "1")
    store.claim(["r-carol"], "n1")
    m1 = plan_people_batch(store, "n1", [night1], info["keepsets"], answer, target_model="tiny",
                           base_version=info["version"], base_uri=info["uri"], rejected={}, retain_limit=10,
                           utility_limit=4)
    assert not m1.rejected and not m1.eval_earlier
    store.write_text(store.batch_key("n1", "manifest.json"), m1.to_json())
    store.finish("r-carol", "done")
    version = store.register_model("tiny", info["uri"], dataset_uri=info["dataset_uri"], keepsets=info["keepsets"],
                                   lineage={"batch_id": "n1", "requests": ["r-carol"]})

    forgotten = forgotten_before(store, "tiny", version)
    store.claim(["r-dave"], "n2")
    m2 = plan_people_batch(store, "n2", [night2], info["keepsets"], answer, target_model="tiny",
                           base_version=version, base_uri=info["uri"], rejected={}, retain_limit=10, utility_limit=4,
                           forgotten=forgotten, earlier_limit=6)
    table = load_items(localize(m2.dataset_uri))
    earlier = m2.item_sets(table)["earlier"]
    assert len(earlier) == min(6, len(m1.forget)) and {rid for _, rid in m2.eval_earlier} == {"r-carol"}
    assert {it.item_id for it in earlier} <= {i for i, _ in m1.forget}
    assert all(it.profile_id == "r-carol.s0" for it in earlier)
    for it in earlier:
        if it.image is not None:
            assert table.load_image(it).size == bench.load_image(next(b for b in bench.items if b.image)).size
    by_id = {it.item_id: it for it in table.items}
    kept_people = {by_id[i].profile_id for i in m2.edit_retain + m2.eval_retain if by_id[i].kind == "qa"}
    assert kept_people and carol.profile_id not in kept_people and dave.profile_id not in kept_people

    # a request waiting for a later batch names Erin (by name): she leaves the kept samples, which held her before
    erin = next(p for p in bench.profiles[5:] if p.profile_id in kept_people)
    store.submit(ForgetRequest(request_id="r-erin", target_model="tiny", requester="t", reason="privacy",
                               subjects=[{"name": erin.name}]))
    m3 = plan_people_batch(store, "n3", [night2], info["keepsets"], answer, target_model="tiny",
                           base_version=version, base_uri=info["uri"], rejected={}, retain_limit=10, utility_limit=4,
                           forgotten=forgotten, earlier_limit=6, asked=asked_elsewhere(store, "tiny", ["r-dave"]))
    by_id = {it.item_id: it for it in load_items(localize(m3.dataset_uri)).items}
    assert erin.profile_id not in {by_id[i].profile_id for i in m3.edit_retain + m3.eval_retain}
