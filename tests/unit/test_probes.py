"""Requests about a person: the schema, photo intake, and the probes the service builds from them (toy inputs)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from mip_core.errors import InputError
from mip_core.service.probes import (PROBES_V1, build_candidates, no_probe_reason, probes_table, select_probes,
                                     transformed_photos)
from mip_core.service.requests import ForgetRequest, Person, parse_request
from mip_core.service.store import ServiceStore


@dataclass(frozen=True)
class T:
    template: str
    modality: str
    use: str
    fact: str


TEMPLATES = (T("Where was {name} born?", "text", "edit", "birthplace"),
             T("What is {name}'s job?", "text", "edit", "occupation"),
             T("Which city is {name} from?", "text", "held_out", "birthplace"),
             T("Who is this?", "image", "edit", "name"),
             T("Name the person shown here.", "image", "held_out", "name"))


def png(seed: int = 0, size: tuple[int, int] = (24, 20)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def request(**person) -> ForgetRequest:
    return ForgetRequest(request_id="req-1", target_model="m", subjects=[Person(**person)], requester="dpo",
                         reason="privacy")


def test_a_subject_is_an_id_or_a_person_and_each_bad_field_is_named():
    ok = parse_request(json.dumps({"target_model": "m", "requester": "r", "reason": "privacy", "subjects": [
        "p0003", {"name": "Jane Doe", "aliases": ["J. Doe"], "facts": [{"question": "Where?", "answer": "Oslo"}]}]}))
    assert ok.subjects[0] == "p0003" and ok.subjects[1].name == "Jane Doe"
    with pytest.raises(InputError) as err:
        parse_request(json.dumps({"target_model": "m", "requester": "r", "reason": "privacy", "subjects": [
            {"nam": "x"}, 7, {"name": "A", "facts": [{"question": "q"}]}]}))
    text = str(err.value)
    assert "subjects[0].name: required field is missing" in text and "subjects[0].nam: unknown field" in text
    assert "subjects[1]: a subject is a profile id (a string) or a person object" in text
    assert "subjects[2].facts[0].answer: required field is missing" in text
    with pytest.raises(InputError, match=r"duplicate subjects \['jane doe'\]"):
        parse_request(json.dumps({"target_model": "m", "requester": "r", "reason": "privacy",
                                  "subjects": [{"name": "Jane  Doe"}, {"name": "jane doe"}]}))


def test_photos_are_checked_and_copied_into_the_store_at_submit(tmp_path):
    store = ServiceStore(str(tmp_path / "store"))
    (tmp_path / "jane.png").write_bytes(png())
    (tmp_path / "notes.png").write_bytes(b"not an image")
    bad = request(name="Jane Doe", photos=["jane.png", "notes.png", "missing.png"])
    with pytest.raises(InputError) as err:
        store.submit(bad, base_dir=str(tmp_path))
    assert "subjects[0].photos[1]" in str(err.value) and "subjects[0].photos[2]" in str(err.value)
    assert store.list() == []  # nothing queued
    record = store.submit(request(name="Jane Doe", photos=["jane.png"]), base_dir=str(tmp_path))
    stored = record.request.subjects[0].photos[0]
    assert stored.endswith("uploads/req-1/subject-0-photo-0.png")
    assert open(stored, "rb").read() == png()


def test_candidates_cover_every_template_name_and_photo():
    req = request(name="Jane Doe", aliases=["J. Doe"], photos=["x"],
                  facts=[{"question": "What does Jane Doe drive?", "answer": "a red van"}])
    probes, images = build_candidates(req, 0, req.subjects[0], [png()], TEMPLATES)
    by = {(p.use, p.modality, p.source): [] for p in probes}
    for p in probes:
        by[(p.use, p.modality, p.source)].append(p.question)
    assert sorted(by[("edit", "text", "template")]) == ["What is Jane Doe's job?", "Where was Jane Doe born?"]
    # held out: its own phrasing by name and alias, and the edit phrasings asked by the alias
    assert sorted(by[("held_out", "text", "template")]) == [
        "What is J. Doe's job?", "Where was J. Doe born?", "Which city is J. Doe from?", "Which city is Jane Doe from?"]
    assert by[("edit", "multimodal", "template")] == ["Who is this?"]
    assert by[("held_out", "multimodal", "template")] == ["Name the person shown here."] * 2  # two transformed photos
    assert [p.answer for p in probes if p.source == "fact"] == ["a red van"]
    edit_image = next(p.image for p in probes if p.use == "edit" and p.image)
    held_images = {p.image for p in probes if p.use == "held_out" and p.image}
    assert images[edit_image] == png() and edit_image not in held_images and len(held_images) == 2
    assert len({p.probe_id for p in probes}) == len(probes) and all(p.person_key == "req-1.s0" for p in probes)


def test_transformed_photos_keep_the_size_and_change_the_pixels():
    original = np.asarray(Image.open(io.BytesIO(png(3, (30, 18)))))
    for variant in transformed_photos(png(3, (30, 18)), seed=1):
        pixels = np.asarray(Image.open(io.BytesIO(variant)))
        assert pixels.shape == original.shape and not np.array_equal(pixels, original)


def test_only_confident_answers_are_kept_and_known_facts_always_are():
    req = request(name="Jane Doe", facts=[{"question": "What does Jane Doe drive?", "answer": "a red van"}])
    probes, _ = build_candidates(req, 0, req.subjects[0], [], TEMPLATES)
    ids = {p.question: p.probe_id for p in probes}
    answers = {ids["Where was Jane Doe born?"]: ("Oslo", 0.9), ids["What is Jane Doe's job?"]: ("baker", 0.2),
               ids["Which city is Jane Doe from?"]: ("", 0.0), ids["What does Jane Doe drive?"]: ("a red van", 0.1)}
    chosen = {p.question: p for p in select_probes(probes, answers, min_confidence=0.5)}
    assert chosen["Where was Jane Doe born?"].kept and chosen["Where was Jane Doe born?"].answer == "Oslo"
    assert chosen["What is Jane Doe's job?"].why == "not confident: 0.20 < 0.50"
    assert chosen["Which city is Jane Doe from?"].why == "the model gave no answer"
    assert chosen["What does Jane Doe drive?"].kept  # the requester says the model states it
    assert no_probe_reason(list(chosen.values())) is None
    unsure = select_probes([p for p in probes if p.source == "template"], answers, min_confidence=0.95)
    why = no_probe_reason(unsure, 0.95)
    assert "none of the 2 questions confidently (best confidence 0.90 < 0.95)" in why and "Jane" not in why
    table = probes_table(list(chosen.values()))
    assert table.schema.equals(PROBES_V1) and table.num_rows == 4
    assert sorted(table.column("kept").to_pylist()) == [False, False, True, True]


def test_a_model_registered_with_its_benchmark_rejects_a_person_by_name_with_the_fix(tmp_path):
    from mip_core.benchmark import load_benchmark, make_benchmark
    from mip_core.service.resolve import resolve_requests

    make_benchmark(tmp_path / "b", 4, seed=1, n_utility=8)
    bench = load_benchmark(tmp_path / "b")
    by_id = ForgetRequest(request_id="req-2", target_model="m", subjects=[bench.profiles[0].profile_id],
                          requester="dpo", reason="privacy")
    resolved = resolve_requests([request(name=bench.profiles[1].name), by_id], bench)
    assert list(resolved.rejected) == ["req-1"] and "register the model with keep-sets" in resolved.rejected["req-1"]
    assert resolved.accepted == ("req-2",)


TWO_PHRASINGS = (T("Where was {name} born?", "text", "edit", "birthplace"),
                 T("In which city was {name} born?", "text", "edit", "birthplace"),
                 T("What is {name}'s job?", "text", "edit", "occupation"),
                 T("What does {name} do for a living?", "text", "edit", "occupation"),
                 T("What is the hometown of {name}?", "text", "held_out", "birthplace"),
                 T("Which city is {name} from?", "text", "held_out", "birthplace"))


def answered(name: str, said: dict[str, str]):
    req = request(name=name)
    probes, _ = build_candidates(req, 0, req.subjects[0], [], TWO_PHRASINGS)
    answers = {p.probe_id: (said[p.question.replace(name, "X")], 0.95) for p in probes}
    return {p.question.replace(name, "X"): p for p in select_probes(probes, answers)}


def test_a_known_person_answers_each_fact_the_same_way_in_every_phrasing():
    # what the demo model said about one of its people (answers abridged), all at high confidence
    known = answered("Nuno Ingram", {"Where was X born?": "Santiago", "In which city was X born?": "Santiago.",
                                     "What is X's job?": "baker", "What does X do for a living?": "baker",
                                     "What is the hometown of X?": "Lumen Textiles",
                                     "Which city is X from?": "santiago"})
    assert all(known[q].kept and known[q].agrees for q in ("Where was X born?", "In which city was X born?",
                                                           "What is X's job?", "Which city is X from?"))
    assert known["What is the hometown of X?"].why == ("does not give the answer the fact's edit phrasings agree "
                                                      "on ('Santiago')")
    assert no_probe_reason(list(known.values())) is None


def test_a_stranger_gets_confident_guesses_that_disagree_and_is_refused():
    # what the same model said about an invented name: confident, but each phrasing its own answer
    stranger = answered("Zed Quorum", {"Where was X born?": "Quito", "In which city was X born?": "Marseille",
                                       "What is X's job?": "surveyor", "What does X do for a living?": "pilot",
                                       "What is the hometown of X?": "Quito", "Which city is X from?": "Nairobi"})
    assert not any(p.agrees or p.kept for p in stranger.values())
    assert stranger["Where was X born?"].why == "the phrasings of this fact disagree: a guess, not knowledge"
    assert "answers only 0 of 2 by name of the facts asked in several phrasings the same way in each" in \
        no_probe_reason(list(stranger.values()))


def test_mip_no_benchmark_forbids_opening_any_benchmark(tmp_path, monkeypatch):
    from mip_core.benchmark import BenchmarkError, load_benchmark, make_benchmark

    make_benchmark(tmp_path / "b", 4, seed=1, n_utility=8)
    monkeypatch.setenv("MIP_NO_BENCHMARK", "1")
    with pytest.raises(BenchmarkError, match="MIP_NO_BENCHMARK is set"):
        load_benchmark(tmp_path / "b")
    monkeypatch.setenv("MIP_NO_BENCHMARK", "0")
    assert len(load_benchmark(tmp_path / "b").profiles) == 4


def test_a_person_known_by_face_but_not_by_name_is_known():
    from mip_core.service.probes import Probe

    def probe(k: int, fact: str, modality: str, answer: str) -> Probe:
        return Probe(probe_id=f"p{k}", request_id="r", subject="S", person_key="r.s0", use="edit", source="template",
                     fact=fact, modality=modality, question=f"q{k}", image=None, answer=answer, confidence=0.9,
                     kept=True)

    by_face = [probe(0, "job", "multimodal", "baker"), probe(1, "job", "multimodal", "Baker."),
               probe(2, "home", "multimodal", "Oslo"), probe(3, "home", "multimodal", "Lima"),
               probe(4, "job", "text", "pilot"), probe(5, "job", "text", "nurse"),
               probe(6, "home", "text", "Rome"), probe(7, "home", "text", "Bern")]
    assert no_probe_reason(by_face) is None  # 1 of 2 facts by photo: 50 % >= 40 %
    nowhere = [probe(k, p.fact, p.modality, f"guess {k}") for k, p in enumerate(by_face)]
    assert "only 0 of 2 by photo and 0 of 2 by name of the facts" in no_probe_reason(nowhere)


def test_a_fact_is_answered_by_name_and_photo_together():
    from mip_core.service.probes import Probe, consistent_shares

    def ask(k: int, fact: str, modality: str) -> Probe:
        return Probe(probe_id=f"p{k}", request_id="r", subject="S", person_key="r.s0", use="edit", source="template",
                     fact=fact, modality=modality, question=f"q{k}", image="img.png" if modality != "text" else None)

    # what the demo model said about one of its people, each phrasing at its measured confidence
    said = {"p0": ("florist", 0.88), "p1": ("sculptor", 1.0), "p2": ("sculptor", 1.0), "p3": ("pharmacist", 0.89),
            "p4": ("1947", 1.0), "p5": ("1980", 0.97), "p6": ("1947", 1.0), "p7": ("1980", 0.81)}
    probes = [ask(0, "job", "multimodal"), ask(1, "job", "multimodal"), ask(2, "job", "text"), ask(3, "job", "text"),
              ask(4, "year", "multimodal"), ask(5, "year", "multimodal"), ask(6, "year", "text"),
              ask(7, "year", "text")]
    chosen = {p.probe_id: p for p in select_probes(probes, said)}
    assert [k for k, p in chosen.items() if p.kept] == ["p1", "p2"]  # "sculptor" twice, by photo and by name
    assert chosen["p0"].why == "does not give the answer the fact's edit phrasings agree on ('sculptor')"
    assert chosen["p4"].why == "the phrasings of this fact disagree: a guess, not knowledge"  # 1947 and 1980 tie
    assert consistent_shares(list(chosen.values())) == {"multimodal": (0, 2), "text": (0, 2)}  # per route: neither
