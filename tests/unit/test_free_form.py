"""Free-form items (a question and the model's own answer, no options) and how they are scored."""

from __future__ import annotations

import dataclasses
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mip_core.benchmark import load_benchmark
from mip_core.benchmark.schema import ITEMS_SCHEMA, BenchmarkError, Item
from mip_core.evaluation.runner import (answer_confidence, answer_logprobs, generate_answers, generation_match,
                                        multiple_choice, probe_answers, score_items)
from mip_core.modeling import load_model
from mip_core.modeling.inputs import IGNORE_INDEX, collate, encode


def free(item_id: str = "q1", answer: str = "Oslo", **kw) -> Item:
    base = dict(item_id=item_id, profile_id="r.s0", kind="qa", fact="birthplace", modality="text",
                question="Where was Jane born?", answer=answer, options=(), answer_index=-1, image=None)
    return Item(**(base | kw))


def test_an_item_has_four_options_or_none():
    it = free()
    assert it.free_form and it.options == () and it.answer_index == -1
    choice = free("q2", options=("Rome", "Oslo", "Lima", "Kyiv"), answer_index=1)
    assert not choice.free_form
    with pytest.raises(BenchmarkError, match=r"item 'q3'.*4 distinct options.*answer_index -1 for a free-form"):
        free("q3", options=("Oslo", "Rome", "Lima"), answer_index=0)
    with pytest.raises(BenchmarkError, match=r"item 'q4'.*4 distinct options"):
        free("q4", answer_index=0)  # no options needs answer_index -1
    with pytest.raises(BenchmarkError, match=r"item 'q5'.*answer_index=-1 must index one of its 4 options"):
        free("q5", options=("Rome", "Oslo", "Lima", "Kyiv"), answer_index=-1)  # options need a real index
    with pytest.raises(BenchmarkError, match=r"item 'q6'.*options\[0\] is not the answer 'Oslo'"):
        free("q6", options=("Rome", "Oslo", "Lima", "Kyiv"), answer_index=0)


def test_both_kinds_round_trip_through_rows_and_the_parquet_schema(tmp_path):
    items = [free(), free("q2", options=("Rome", "Oslo", "Lima", "Kyiv"), answer_index=1),
             free("q3", modality="multimodal", image="images/a.png", question="Who is this?", answer="Jane Roe")]
    assert [Item.from_row(it.to_row()) for it in items] == items
    path = tmp_path / "items.parquet"
    pq.write_table(pa.Table.from_pylist([it.to_row() for it in items], schema=ITEMS_SCHEMA), path)
    assert pq.read_schema(path).equals(ITEMS_SCHEMA, check_metadata=False)  # the benchmark reader's check
    back = [Item.from_row(row) for row in pq.read_table(path).to_pylist()]
    assert back == items and [it.free_form for it in back] == [True, False, True]


@pytest.mark.parametrize(("answer", "generated", "match"), [
    ("Lisbon", "Lisbon", True), ("Lisbon", "lisbon.", True), ("Lisbon", "born in Lisbon, Portugal", True),
    ("Lumen Textiles", "She works at Lumen Textiles.", True), ("Lumen  Textiles", "lumen\ntextiles", True),
    ('"Lisbon"', "(Lisbon)", True), ("Lis", "Lisbon", False), ("Lisbon", "Lisboa", False),
    ("Lumen Textiles", "Lumen Foods", False), ("Lumen Textiles", "Textiles Lumen", False),
    ("", "anything", False), ("  .", "anything.", False), ("Oslo", "", False)])
def test_generation_match_is_whole_words_case_and_punctuation_ignored(answer, generated, match):
    assert generation_match(answer, generated) is match


@pytest.fixture(scope="module")
def tiny(trained_tiny):
    model_dir, bench_dir = trained_tiny
    loaded = load_model(model_dir, device="cpu")
    return loaded.model.eval(), loaded.processor, load_benchmark(bench_dir)


@pytest.mark.parametrize("modality", ["text", "multimodal"])
def test_answer_logprob_is_the_sum_of_the_answer_tokens_log_probabilities(tiny, modality):
    model, processor, bench = tiny
    it = next(i for i in bench.items if i.kind == "qa" and i.modality == modality)
    [(total, n)] = answer_logprobs(model, processor, bench, [it])
    ex = encode(processor, it.question, bench.load_image(it) if it.image else None, it.answer)
    batch = collate([ex], processor.tokenizer.pad_token_id)
    labels = batch.pop("labels")[0]  # [S]
    with torch.no_grad():
        logits = model(**batch).logits[0].float()  # [S, V]
    logp = logits[:-1].log_softmax(-1)  # [S-1, V]: position t predicts token t+1
    targets = labels[1:]  # [S-1]
    scored = targets != IGNORE_INDEX
    per_token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [S-1]
    manual = float(per_token[scored].sum())
    eos = processor.tokenizer.eos_token
    assert n == int(scored.sum()) == len(processor.tokenizer(it.answer + eos)["input_ids"])  # answer + end
    assert abs(total - manual) < 1e-5
    [confidence] = answer_confidence(model, processor, bench, [it])
    assert abs(confidence - math.exp(total / n)) < 1e-9 and 0 < confidence <= 1


def test_confidence_is_the_geometric_mean_token_probability_of_the_given_answers(tiny):
    model, processor, bench = tiny
    items = [i for i in bench.items if i.kind == "qa"][:6]
    answers = [it.options[(it.answer_index + 1) % 4] for it in items]  # a wrong option each
    sums = answer_logprobs(model, processor, bench, items, answers, batch_size=4)
    confidence = answer_confidence(model, processor, bench, items, answers, batch_size=4)
    assert all(n >= 2 for _, n in sums)  # at least one answer token and the end token
    assert confidence == pytest.approx([math.exp(total / n) for total, n in sums], abs=1e-9)
    assert all(0 < c <= 1 for c in confidence)
    for fn in (answer_logprobs, answer_confidence, probe_answers, score_items):
        assert fn(model, processor, bench, []) == []


def test_the_trained_model_answers_its_facts_greedily_and_confidently(tiny):
    model, processor, bench = tiny
    items = [i for i in bench.items if i.kind == "qa"][:24]
    answered = probe_answers(model, processor, bench, items)
    texts = [text for text, _ in answered]
    assert texts == generate_answers(model, processor, bench, items)
    matches = [generation_match(it.answer, text) for it, text in zip(items, texts, strict=True)]
    assert sum(matches) >= 0.75 * len(items)
    spoken = [k for k, text in enumerate(texts) if text]
    assert all(answered[k][1] == 0.0 for k in range(len(items)) if k not in spoken)
    again = answer_confidence(model, processor, bench, [items[k] for k in spoken], [texts[k] for k in spoken])
    assert [answered[k][1] for k in spoken] == pytest.approx(again, abs=1e-6)
    right = answer_confidence(model, processor, bench, items)
    wrong = answer_confidence(model, processor, bench, items,
                              [next(o for o in it.options if o != it.answer) for it in items])
    assert sum(r > w for r, w in zip(right, wrong, strict=True)) >= 0.9 * len(items)


def test_free_form_items_are_scored_by_their_greedy_answer_and_the_rest_by_options(tiny):
    model, processor, bench = tiny
    items = [i for i in bench.items if i.kind == "qa"][:8]
    as_free = [dataclasses.replace(it, options=(), answer_index=-1) for it in items]
    assert all(it.free_form for it in as_free)
    mixed = [x for pair in zip(items, as_free, strict=True) for x in pair]  # alternate: order must be kept
    scored = score_items(model, processor, bench, mixed)
    generated = generate_answers(model, processor, bench, as_free)
    assert scored[1::2] == [generation_match(it.answer, g) for it, g in zip(as_free, generated, strict=True)]
    assert scored[0::2] == multiple_choice(model, processor, bench, items)
    with pytest.raises(ValueError, match=re.escape(repr(items[0].item_id)) + ".*have no options.*score_items"):
        multiple_choice(model, processor, bench, [items[1], as_free[0]])
