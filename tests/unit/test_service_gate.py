"""The publication gate on hand-written correctness tables, and the batch report that shows it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from mip_core.errors import InputError
from mip_core.service.batch import BatchManifest
from mip_core.service.gate import (GateConfig, RegisteredReference, answer_rouge, decide, format_decision,
                                   lineage_spent, with_answer_logprobs)
from mip_core.service.html_report import batch_html
from mip_core.service.report import batch_report, unplanned_report
from mip_core.service.requests import ForgetItem, ForgetRequest, KnownFact, Person, RequestRecord


def item(item_id: str, modality: str, options: tuple[str, ...] = ()) -> SimpleNamespace:
    return SimpleNamespace(item_id=item_id, modality=modality, options=options)


SETS = {"forget": [item("f1", "text"), item("f2", "text"), item("f3", "multimodal"), item("f4", "multimodal")],
        "retain": [item("r1", "text"), item("r2", "text"), item("r3", "multimodal"), item("r4", "multimodal")],
        "utility": [item("u1", "text")]}
ALL_RIGHT = {name: {it.item_id: True for it in items} for name, items in SETS.items()}


def after(**changes: bool) -> dict[str, dict[str, bool]]:
    out = {name: dict(v) for name, v in ALL_RIGHT.items()}
    for item_id, value in changes.items():
        out[{"f": "forget", "r": "retain", "u": "utility"}[item_id[0]]][item_id] = value
    return out


def test_forgetting_everything_and_keeping_the_rest_passes():
    d = decide(SETS, ALL_RIGHT, after(f1=False, f2=False, f3=False, f4=False), GateConfig(),
               request_of={"f1": "a", "f2": "a", "f3": "b", "f4": "b"})
    assert d.passed and d.reasons == ()
    forget_text = d.metric("forget", "text")
    assert (forget_text.before, forget_text.after, forget_text.relative) == (1.0, 0.0, 1.0)
    figures = {"n": 2, "before": 1.0, "after": 0.0, "forgetting": 1.0, "passed": 1.0}
    assert d.per_request == {"a": figures, "b": figures} and d.request_reasons == {}
    assert "gate PASSED" in format_decision(d)


def test_each_modality_is_gated_on_its_own():
    # text forgotten, the image questions not: the mean over modalities (0.5) would pass, the gate must not
    d = decide(SETS, ALL_RIGHT, after(f1=False, f2=False), GateConfig(min_forgetting=0.5))
    assert not d.passed
    assert d.reasons == ("forget multimodal: forgetting rate 0.000 < 0.500 on the request's own 2 items (accuracy "
                         "1.000 -> 1.000): the model still knows them",)


def test_collateral_damage_fails_the_retention_floor():
    d = decide(SETS, ALL_RIGHT, after(f1=False, f2=False, f3=False, f4=False, r3=False), GateConfig())
    assert not d.passed and len(d.reasons) == 1 and d.reasons[0].startswith("retain multimodal: retention 0.500")
    relaxed = decide(SETS, ALL_RIGHT, after(f1=False, f2=False, f3=False, f4=False, r3=False),
                     GateConfig(min_retention=0.5))
    assert relaxed.passed


def test_relative_figures_count_only_what_the_starting_model_knew():
    before = after(f3=False, f4=False, r1=False)  # never knew the image facts nor r1
    d = decide(SETS, before, after(f1=False, f2=False, r1=False, f3=False, f4=False), GateConfig())
    assert math.isnan(d.metric("forget", "multimodal").relative)
    assert d.metric("retain", "text").relative == 1.0  # r1 wrong before and after: no blame
    assert d.reasons == ("forget multimodal: the starting model answers none of the request's 2 forget items "
                         "correctly, so forgetting cannot be measured",)


def test_no_forget_items_cannot_pass():
    d = decide({"retain": SETS["retain"]}, ALL_RIGHT, ALL_RIGHT, GateConfig())
    assert not d.passed and d.reasons == ("no forget items were evaluated",)


def test_thresholds_are_validated_with_the_field_name():
    with pytest.raises(InputError, match="min_retention"):
        GateConfig(min_retention=1.5)


#: What the requests below say about the people: none of it may reach a report, a log table or the manifest.
PERSONAL = ("Marisol Quintero-Vasz", "Mari QV", "s3://uploads/marisol-at-the-beach.jpg", "marisol-at-the-beach",
            "Which street is her flat on?", "Rua das Flores 12", "What is her blood type?", "AB negative",
            "images/p0042.png", "Teodor Brankovic", "file:///inbox/teodor.png", "she phoned from Porto")


def _personal_records() -> list[RequestRecord]:
    """Request ``a`` (done) names a person, a photo, a known fact and a question; ``x`` (rejected) another person."""
    marisol = Person(name="Marisol Quintero-Vasz", aliases=["Mari QV"],
                     photos=["s3://uploads/marisol-at-the-beach.jpg"],
                     facts=[KnownFact(question="Which street is her flat on?", answer="Rua das Flores 12")])
    item = ForgetItem(question="What is her blood type?", answer="AB negative", image="images/p0042.png")
    a = ForgetRequest(request_id="a", target_model="demo", subjects=[marisol], items=[item], requester="dpo",
                      reason="privacy", note="she phoned from Porto")
    x = ForgetRequest(request_id="x", target_model="demo", requester="dpo", reason="privacy",
                      subjects=[Person(name="Teodor Brankovic", photos=["file:///inbox/teodor.png"])])
    return [RequestRecord(request=a, state="done", batch_id="b1", model_version="v0002"),
            RequestRecord(request=x, state="rejected", batch_id="b1", reason="subjects[0]: no probe answered")]


def test_reports_name_requests_and_metrics_but_no_personal_data():
    m = BatchManifest(batch_id="b1", target_model="demo", base_version="v0001", base_uri="/m/v0001",
                      dataset_uri="/d", requests=("a", "x"), rejected={"x": "subjects[0]: no probe answered"},
                      forget=(("f1", "a"),), items_of={"a": ("f1",)}, edit_retain=("r0",), eval_retain=("r1",),
                      eval_utility=())
    decision = decide({"forget": [item("f1", "text")], "retain": [item("r1", "text")]},
                      {"forget": {"f1": True}, "retain": {"r1": True}},
                      {"forget": {"f1": False}, "retain": {"r1": True}}, GateConfig(), request_of={"f1": "a"})
    d = decision.to_dict()
    records = _personal_records()
    text = batch_report(m, records, gate=d, version="v0002", error=None, timings={"plan": 0.5, "edit": 12.25},
                        links={"manifest.json": "/s/b1/manifest.json"})
    assert "**published** `demo` `v0002` (from `v0001`)" in text
    assert "| `a` | done | 1.000 | 0.000 | - | - | - | - |  |" in text
    assert "| `x` | rejected | - | - | - | - | - | - | subjects[0]: no probe answered |" in text
    assert "| forget | text | 1 | 1.000 | 0.000 | 1.000 |" in text and "| edit | 12.2 |" in text
    assert BatchManifest.from_json(m.to_json()) == m
    written = "\n".join([text, batch_html(m, records, gate=d, version="v0002", error=None, timings={}),
                         unplanned_report("b1", "demo", records, "no model registered"), format_decision(decision),
                         json.dumps(d), m.to_json()])
    assert [s for s in PERSONAL if s.casefold() in written.casefold()] == []
    assert all(f"`{rid}`" in text and f"<td>{rid}</td>" in written for rid in ("a", "x"))  # ids, in both reports
    assert "`b1`" in text and "v0002" in text


def test_held_out_phrasings_are_reported_as_forgetting_but_not_gated():
    sets = {**SETS, "test": [item("t1", "text"), item("t2", "text")]}
    before = {**ALL_RIGHT, "test": {"t1": True, "t2": True}}
    edited = after(f1=False, f2=False, f3=False, f4=False) | {"test": {"t1": True, "t2": True}}  # not generalised
    d = decide(sets, before, edited, GateConfig())
    assert d.passed  # the test set has no floor: the method does not promise generalisation, the report shows it
    held_out = d.metric("test", "text")
    assert (held_out.n, held_out.before, held_out.after, held_out.relative) == (2, 1.0, 1.0, 0.0)
    assert [s.items for s in d.scores] == ["forget", "forget", "test", "retain", "retain", "utility"]


def test_the_log_table_names_the_held_out_set_as_the_report_does():
    sets = {**SETS, "test": [item("t1", "text")]}
    before = {**ALL_RIGHT, "test": {"t1": True}}
    d = decide(sets, before, {**after(f1=False, f2=False, f3=False, f4=False), "test": {"t1": False}}, GateConfig())
    table = format_decision(d)
    assert "held-out phrasings" in table and not any(line.startswith("test ") for line in table.splitlines())


def test_each_request_is_judged_on_its_own_items_whatever_the_batch_average():
    # a: both its facts forgotten; b: its image facts still known. The batch's pooled forgetting (0.75 text and
    # 0.5 image) would pass a 0.5 floor; b must not be done, and a must not be held back by b.
    sets = {**SETS, "forget": [item("f1", "text"), item("f2", "multimodal"), item("f3", "text"),
                               item("f4", "multimodal")]}
    d = decide(sets, ALL_RIGHT, after(f1=False, f2=False, f3=False), GateConfig(min_forgetting=0.5),
               request_of={"f1": "a", "f2": "a", "f3": "b", "f4": "b"})
    assert d.passed and d.request_passed("a") and not d.request_passed("b")
    assert d.request_reasons == {"b": "multimodal: forgetting rate 0.000 < 0.500 on the request's own 1 items "
                                      "(accuracy 1.000 -> 1.000): the model still knows them"}
    assert d.per_request["b"]["forgetting"] == 0.5  # its own figures, pooled over modalities, are reported
    nobody = decide(sets, ALL_RIGHT, after(f1=False), GateConfig(), request_of={"f1": "a", "f2": "a", "f3": "b",
                                                                                "f4": "b"})
    assert not nobody.passed and len(nobody.reasons) == 2  # no request forgotten: nothing to publish


def test_held_out_probes_are_reported_beside_their_request():
    sets = {**SETS, "test": [item("t1", "text"), item("t2", "text"), item("t3", "text")]}
    before = {**ALL_RIGHT, "test": {"t1": True, "t2": True, "t3": True}}
    edited = {**after(f1=False, f2=False, f3=False, f4=False), "test": {"t1": False, "t2": True, "t3": True}}
    d = decide(sets, before, edited, GateConfig(),
               request_of={"f1": "a", "f2": "a", "f3": "b", "f4": "b", "t1": "a", "t2": "a", "t3": "b"})
    assert (d.per_request["a"]["test_n"], d.per_request["a"]["test_after"]) == (2.0, 0.5)
    assert d.per_request["a"]["test_forgetting"] == 0.5 and d.per_request["b"]["test_forgetting"] == 0.0
    assert d.passed and d.request_reasons == {}  # held out: reported, not gated


def test_answer_log_probabilities_are_averaged_per_request_beside_the_verdict():
    sets = {"forget": [item("f1", "text"), item("f2", "text"), item("f3", "text")], "test": [item("t1", "text")]}
    correct = {"forget": {"f1": True, "f2": True, "f3": True}, "test": {"t1": True}}
    moved = {"forget": {"f1": False, "f2": False, "f3": False}, "test": {"t1": True}}
    request_of = {"f1": "a", "f2": "a", "f3": "b", "t1": "a"}
    d = decide(sets, correct, moved, GateConfig(), request_of=request_of)
    d = with_answer_logprobs(d, sets, {"f1": -0.1, "f2": -0.3, "t1": -0.2}, {"f1": -4.0, "f2": -6.0, "t1": -0.5},
                             request_of)  # f3 has options: no log-probability recorded
    assert (d.per_request["a"]["logprob_before"], d.per_request["a"]["logprob_after"]) == (-0.2, -5.0)
    assert (d.per_request["a"]["test_logprob_before"], d.per_request["a"]["test_logprob_after"]) == (-0.2, -0.5)
    assert "logprob_after" not in d.per_request["b"] and d.passed


def test_people_forgotten_earlier_who_come_back_hold_the_version_back():
    """Sustainability: the ``earlier`` set is judged on the rise of its accuracy (after - before), per modality,
    against ``max_relapse``; a version under which they are answered again is not published."""
    sets = SETS | {"earlier": [item(f"e{k}", "text") for k in range(20)] + [item("e-img", "multimodal")]}
    forgot_all = after(f1=False, f2=False, f3=False, f4=False)
    before = ALL_RIGHT | {"earlier": {it.item_id: False for it in sets["earlier"]}}

    def edited(*back: str) -> dict[str, dict[str, bool]]:
        return forgot_all | {"earlier": {it.item_id: it.item_id in back for it in sets["earlier"]}}

    one_back = decide(sets, before, edited("e0"), GateConfig())  # 1 of 20 text items: +0.05, at the ceiling
    assert one_back.passed and one_back.metric("earlier", "text").relative == pytest.approx(0.05)
    two_back = decide(sets, before, edited("e0", "e1"), GateConfig())
    assert not two_back.passed
    assert two_back.reasons == ("forgotten earlier text: accuracy rose 0.000 -> 0.100 (+0.100 over the higher of "
                                "before and chance 0.000, > 0.050, n=20): people earlier versions forgot come back",)
    image_back = decide(sets, before, edited("e-img"), GateConfig(max_relapse=0.5))
    assert not image_back.passed and image_back.reasons[0].startswith("forgotten earlier multimodal")
    assert "forgotten earlier" in format_decision(two_back)
    assert decide(sets, before, edited("e0", "e1"), GateConfig(max_relapse=0.1)).passed


def test_forgotten_people_moving_back_up_to_chance_are_not_coming_back():
    """Four options each: chance is 0.25. People an edit drove to 0 of 8 that the next edit leaves at 2 of 8 are
    answered like strangers (a model that never saw them guesses as well); 3 of 8 is 0.125 over chance."""
    four = ("a", "b", "c", "d")
    sets = SETS | {"earlier": [item(f"e{k}", "text", four) for k in range(8)]}
    before = ALL_RIGHT | {"earlier": {it.item_id: False for it in sets["earlier"]}}

    def edited(n_right: int) -> dict[str, dict[str, bool]]:
        return after(f1=False, f2=False, f3=False, f4=False) | {
            "earlier": {it.item_id: k < n_right for k, it in enumerate(sets["earlier"])}}

    at_chance = decide(sets, before, edited(2), GateConfig())
    assert at_chance.passed and at_chance.metric("earlier", "text").relative == 0.0
    above = decide(sets, before, edited(3), GateConfig())
    assert not above.passed and above.metric("earlier", "text").relative == pytest.approx(0.125)
    assert "over the higher of before and chance 0.250" in above.reasons[0]
    known = ALL_RIGHT | {"earlier": {it.item_id: k < 4 for k, it in enumerate(sets["earlier"])}}  # 0.5 before
    assert decide(sets, known, edited(5), GateConfig()).metric("earlier", "text").relative == pytest.approx(0.125)


#: A batch of one request on an edited version, for the reports' tests.
ONE_REQUEST_ON_V3 = BatchManifest(batch_id="b1", target_model="tiny", base_version="v0003", base_uri="/m",
                                  dataset_uri="/d", requests=("a",), rejected={}, forget=(("f1", "a"),),
                                  items_of={"a": ("f1",)}, edit_retain=(), eval_retain=("r1",), eval_utility=())


def test_one_person_answered_again_holds_the_version_back_while_the_pooled_figure_sits_under_chance():
    """Per person (the request that forgot them): a rise over ``max_relapse`` that guessing would reach with
    probability under ``relapse_alpha``. a's 12 items stay wrong and b's 4 come back 3 of 4: pooled 3 of 16 =
    0.1875, under chance 0.25, but guessing gets 3 of 4 with 4 (1/4)^3 (3/4) + (1/4)^4 = 13/256 = 0.051 < 0.1.
    2 of 4 is 67/256 = 0.262: one lucky pick, not a person back. A free-form item said again is never luck."""
    four = ("a", "b", "c", "d")
    earlier = [item(f"a{k}", "text", four) for k in range(12)] + [item(f"b{k}", "text", four) for k in range(4)]
    sets = SETS | {"earlier": earlier}
    request_of = {it.item_id: f"req-{it.item_id[0]}" for it in earlier}
    before = ALL_RIGHT | {"earlier": {it.item_id: False for it in earlier}}

    def edited(*back: str) -> dict[str, dict[str, bool]]:
        return FORGOT | {"earlier": {it.item_id: it.item_id in back for it in earlier}}

    three = decide(sets, before, edited("b0", "b1", "b2"), GateConfig(), request_of=request_of)
    assert three.metric("earlier", "text").relative == pytest.approx(0.1875 - 0.25)
    assert three.reasons == ("forgotten earlier (req-b): accuracy on 4 of their items rose 0.000 -> 0.750 (+0.500 "
                             "over the higher of before and chance 0.250, > 0.050; guessing scores that well with "
                             "p=0.051 < 0.100): this person comes back",)
    assert three.earlier_people["req-b"]["luck"] == pytest.approx(13 / 256)
    assert three.earlier_people["req-a"] == {"n": 12.0, "before": 0.0, "after": 0.0, "chance": 0.25, "rise": -0.25,
                                             "luck": 1.0}
    assert json.loads(json.dumps(three.to_dict()))["earlier_people"]["req-b"]["after"] == 0.75
    m = ONE_REQUEST_ON_V3
    text = batch_report(m, [], gate=three.to_dict(), version=None, error=None, timings={})
    assert "| `req-b` | 4 | 0.000 | 0.750 | 0.250 | 0.500 | 0.051 |" in text
    assert "each person too, unless guessing explains it: p >= 0.1" in text
    two = decide(sets, before, edited("b0", "b1"), GateConfig(), request_of=request_of)
    assert two.passed and two.earlier_people["req-b"]["luck"] == pytest.approx(67 / 256)
    assert decide(sets, before, edited("b0", "b1", "b2"), GateConfig(relapse_alpha=0.05), request_of=request_of
                  ).passed  # 0.051 is not under 0.05
    free = SETS | {"earlier": [*earlier, item("c0", "text")]}
    said = decide(free, before | {"earlier": before["earlier"] | {"c0": False}},
                  edited() | {"earlier": edited()["earlier"] | {"c0": True}}, GateConfig(),
                  request_of=request_of | {"c0": "req-c"})
    assert [r.split(":")[0] for r in said.reasons] == ["forgotten earlier (req-c)"]  # p = 0
    assert decide(sets, before, edited("b0", "b1", "b2"), GateConfig()).passed  # no request named: no one to judge


#: Per-item ROUGE-L of the edited model's answers against the starting model's: retain text (0.4 + 0.6) / 2 = 0.5,
#: retain multimodal 1.0, utility text 0.7.
ROUGE = {"r1": 0.4, "r2": 0.6, "r3": 1.0, "r4": 1.0, "u1": 0.7}
FORGOT = after(f1=False, f2=False, f3=False, f4=False)


def test_a_kept_set_that_no_longer_writes_sensible_answers_holds_the_batch_back():
    """Multiple choice all kept (retention 1.0 everywhere), but other people's text answers drifted: 0.5 < 0.6."""
    d = decide(SETS, ALL_RIGHT, FORGOT, GateConfig(min_generation=0.6), rouge=ROUGE)
    assert not d.passed and d.metric("retain", "text").relative == 1.0
    assert d.reasons == ("retain text: generation ROUGE-L 0.500 < 0.600 (the edited model's greedy answers "
                         "against the starting model's, n=2)",)
    assert [(g.items, g.modality, g.n, g.rouge_l) for g in d.generation] == [
        ("retain", "multimodal", 2, 1.0), ("retain", "text", 2, 0.5), ("utility", "text", 1, 0.7)]
    assert d.to_dict()["generation"][1] == {"items": "retain", "modality": "text", "n": 2, "rouge_l": 0.5}
    table = format_decision(d)
    assert "retain             text           2   0.500" in table and "generation ROUGE-L 0.500" in table


def test_a_kept_set_at_0_7_passes_and_a_floor_of_0_disables_the_check():
    assert decide(SETS, ALL_RIGHT, FORGOT, GateConfig(min_generation=0.6), rouge=ROUGE | {"r1": 0.8}).passed  # 0.7
    off = decide(SETS, ALL_RIGHT, FORGOT, GateConfig(min_generation=0.0), rouge={i: 0.0 for i in ROUGE})
    assert off.passed and [g.rouge_l for g in off.generation] == [0.0, 0.0, 0.0]  # measured, reported, not gated
    unmeasured = decide(SETS, ALL_RIGHT, FORGOT, GateConfig())  # no answers given: nothing to check
    assert unmeasured.passed and unmeasured.generation == () and unmeasured.to_dict()["generation"] == []


#: Retain text: the registered model knew r1..r8; the starting version (edits later) already lost r5; this edit
#: loses r6. Against the starting version 6 of 7 are kept (0.857, over the 0.8 floor); against the registered model
#: 6 of 8 (0.75): two losses each under the floor add up past it.
ERODED_SETS = {"forget": SETS["forget"], "retain": [item(f"r{i}", "text") for i in range(1, 9)]}
REGISTERED = {"retain": {f"r{i}": True for i in range(1, 9)}}


def _eroded() -> tuple[dict[str, dict[str, bool]], dict[str, dict[str, bool]]]:
    start = {"forget": {f"f{i}": True for i in range(1, 5)}, "retain": REGISTERED["retain"] | {"r5": False}}
    return start, {"forget": {f"f{i}": False for i in range(1, 5)}, "retain": start["retain"] | {"r6": False}}


def test_losses_each_under_the_floor_that_add_up_since_the_registered_model_hold_the_batch_back():
    start, edited = _eroded()
    alone = decide(ERODED_SETS, start, edited, GateConfig())  # against the starting version only: 0.8 passes
    assert alone.passed and alone.metric("retain", "text").relative == pytest.approx(6 / 7)
    d = decide(ERODED_SETS, start, edited, GateConfig(), registered=RegisteredReference("v0001", REGISTERED))
    assert not d.passed
    assert d.reasons == ("retain text: retention since the registered model v0001 0.750 < 0.800 (accuracy 1.000 -> "
                         "0.750, n=8)",)
    assert d.metric("retain", "text").relative == pytest.approx(6 / 7)  # the per-edit figure is unchanged
    assert d.to_dict()["registered"]["version"] == "v0001"
    assert d.to_dict()["registered"]["scores"][0]["relative"] == pytest.approx(0.75)
    assert "since the registered model v0001:" in format_decision(d)
    off = decide(ERODED_SETS, start, edited, GateConfig(against_registered=False),
                 registered=RegisteredReference("v0001", REGISTERED))
    assert off.passed and off.registered is not None  # measured and reported, not gated


def test_a_lineage_is_spent_when_one_request_alone_is_held_back_by_the_floors_against_the_registered_model_only():
    start, edited = _eroded()
    held = decide(ERODED_SETS, start, edited, GateConfig(), request_of={f"f{i}": "a" for i in range(1, 5)},
                  registered=RegisteredReference("v0001", REGISTERED)).to_dict()
    assert held["registered_reasons"] == held["reasons"]
    why = lineage_spent(held, 1)
    assert why is not None and why.startswith("not edited: ") and "registered v0001" in why
    assert "retention since the registered model v0001 0.750" in why
    assert lineage_spent(held, 2) is None  # several requests: the batch is split, smaller edits may fit
    own = decide(ERODED_SETS, start, start, GateConfig(), request_of={f"f{i}": "a" for i in range(1, 5)},
                 registered=RegisteredReference("v0001", REGISTERED)).to_dict()  # its own people not forgotten
    assert not own["passed"] and lineage_spent(own, 1) is None
    assert lineage_spent(decide(ERODED_SETS, start, edited, GateConfig()).to_dict(), 1) is None  # passed


def test_generation_is_held_to_its_floor_against_the_registered_models_answers_too():
    """Per-item ROUGE-L against the registered model's answers: (0.5 + 0.6) / 2 = 0.55 < 0.6 on retain text, while
    against the starting version's answers the same edit keeps 0.9."""
    sets = {"forget": SETS["forget"], "retain": SETS["retain"][:2]}
    known = {"forget": {f"f{i}": True for i in range(1, 5)}, "retain": {"r1": True, "r2": True}}
    forgot = {"forget": {f"f{i}": False for i in range(1, 5)}, "retain": {"r1": True, "r2": True}}
    d = decide(sets, known, forgot, GateConfig(), rouge={"r1": 0.9, "r2": 0.9},
               registered=RegisteredReference("v0001", {"retain": known["retain"]}, {"r1": 0.5, "r2": 0.6}))
    assert not d.passed and d.reasons == (
        "retain text: generation ROUGE-L 0.550 < 0.600 (the edited model's greedy answers against the registered "
        "model v0001's, n=2)",)
    assert [(g.items, g.rouge_l) for g in d.registered.generation] == [("retain", pytest.approx(0.55))]


def test_the_reports_show_the_kept_sets_against_the_registered_model():
    start, edited = _eroded()
    gate = decide(ERODED_SETS, start, edited, GateConfig(),
                  registered=RegisteredReference("v0001", REGISTERED, {"r1": 0.5})).to_dict()
    m = ONE_REQUEST_ON_V3
    text = batch_report(m, [], gate=gate, version=None, error=None, timings={})
    assert "Since the registered model `v0001`" in text
    assert "| retain | text | 8 | 1.000 | 0.750 | 0.750 | 0.500 |" in text  # ROUGE-L over the one answered item
    page = batch_html(m, [], gate=gate, version=None, error=None, timings={})
    # per edit everything passes; against v0001 retention 0.75 and ROUGE-L 0.5 fail
    assert "registered model v0001" in page and page.count("FAIL") == 2


#: One request, four multimodal forget items. The registered model knew all four; earlier edits of the night left
#: the starting version knowing two (f1, f2); this edit moves none of them.
PARTLY = {"forget": [item(f"f{i}", "multimodal") for i in range(1, 5)]}
PARTLY_START = {"forget": {"f1": True, "f2": True, "f3": False, "f4": False}}
ALL_KNOWN = {"forget": {f"f{i}": True for i in range(1, 5)}}
MINE = {f"f{i}": "a" for i in range(1, 5)}


def test_a_request_earlier_edits_took_part_of_the_way_is_forgotten_by_its_rate_since_the_registered_model():
    alone = decide(PARTLY, PARTLY_START, PARTLY_START, GateConfig(), request_of=MINE)
    assert alone.request_reasons == {"a": "multimodal: forgetting rate 0.000 < 0.500 on the request's own 4 items "
                                          "(accuracy 0.500 -> 0.500): the model still knows them"}
    d = decide(PARTLY, PARTLY_START, PARTLY_START, GateConfig(), request_of=MINE,
               registered=RegisteredReference("v0001", ALL_KNOWN))  # 1.0 -> 0.5: half of what it knew
    assert d.passed and d.request_reasons == {}
    assert d.per_request["a"] == {"n": 4.0, "before": 0.5, "after": 0.5, "forgetting": 0.0,
                                       "registered_before": 1.0, "registered_forgetting": 0.5, "passed": 1.0}
    off = decide(PARTLY, PARTLY_START, PARTLY_START, GateConfig(against_registered=False), request_of=MINE,
                 registered=RegisteredReference("v0001", ALL_KNOWN))
    assert not off.passed and "a" in off.request_reasons


def test_a_request_is_not_forgotten_unless_the_rate_since_the_registered_model_reaches_the_floor():
    edited = {"forget": PARTLY_START["forget"] | {"f3": True}}  # 3 of 4 right: 0.25 below the registered model
    start = {"forget": edited["forget"]}
    d = decide(PARTLY, start, edited, GateConfig(), request_of=MINE, registered=RegisteredReference("v0001", ALL_KNOWN))
    assert d.request_reasons == {"a": "multimodal: forgetting rate 0.000 < 0.500 on the request's own 4 items "
                                      "(accuracy 0.750 -> 0.750; 0.250 since the registered model): the model still "
                                      "knows them"}
    # the registered model scored on some of the items only: not judged against it
    some = RegisteredReference("v0001", {"forget": {"f1": True, "f2": True}})
    assert "registered_before" not in decide(PARTLY, PARTLY_START, PARTLY_START, GateConfig(), request_of=MINE,
                                             registered=some).per_request["a"]


def test_a_request_the_starting_version_answers_none_of_is_forgotten_when_the_registered_model_knew_them():
    none = {"forget": {f"f{i}": False for i in range(1, 5)}}
    assert "cannot be measured" in decide(PARTLY, none, none, GateConfig(), request_of=MINE).request_reasons["a"]
    d = decide(PARTLY, none, none, GateConfig(), request_of=MINE, registered=RegisteredReference("v0001", ALL_KNOWN))
    assert d.passed and d.per_request["a"]["registered_forgetting"] == 1.0


def test_answer_rouge_compares_the_edited_answer_with_the_starting_models():
    before = {"a": "born in Paris", "b": "", "c": "blue eyes", "only-before": "x"}
    got = answer_rouge(before, {"a": "Paris", "b": "", "c": "blue eyes", "only-after": "y"})
    # a: the one word is the reference's third: precision 1, recall 1/3, F = 2 * 1 * 1/3 / (1 + 1/3) = 0.5
    assert got == {"a": pytest.approx(0.5), "b": 1.0, "c": 1.0}  # the same text is 1.0, even an empty answer
    assert answer_rouge({"a": "blue eyes"}, {"a": "green"}) == {"a": 0.0}


def test_only_what_the_starting_model_said_right_is_held_to_the_generation_floor():
    """A wrong starting answer was never knowledge: its drift is neither loss nor kept (the relative figures'
    rule); an item with no known answer is not counted either."""
    before = {"a": "born in Paris", "b": "Rome", "c": "x"}
    got = answer_rouge(before, {"a": "Lyon", "b": "Milan", "c": "y"}, truth={"a": "Paris", "b": "Oslo"})
    assert got == {"a": 0.0}  # b answered wrong before the edit; c has no truth


def test_the_reports_show_the_generation_figures_and_their_floor():
    m = BatchManifest(batch_id="b1", target_model="demo", base_version="v0001", base_uri="/m/v0001",
                      dataset_uri="/d", requests=("a",), rejected={}, forget=(("f1", "a"),), items_of={"a": ("f1",)},
                      edit_retain=(), eval_retain=("r1", "r2"), eval_utility=("u1",))
    d = decide(SETS, ALL_RIGHT, FORGOT, GateConfig(), rouge=ROUGE).to_dict()
    text = batch_report(m, [], gate=d, version=None, error=None, timings={})
    assert "| retain | text | 2 | 0.500 |" in text and "| utility | text | 1 | 0.700 |" in text
    assert "generation (ROUGE-L) >= 0.6" in text and "**not published**: retain text: generation ROUGE-L" in text
    page = batch_html(m, [], gate=d, version=None, error=None, timings={})
    assert page.count("<td>FAIL</td>") == 1 and "ROUGE-L" in page
