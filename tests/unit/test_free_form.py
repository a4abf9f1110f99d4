"""Free-form items (a question and the model's own answer, no options) and how they are scored."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mip_core.benchmark import load_benchmark
from mip_core.benchmark.schema import BenchmarkError, Item
from mip_core.evaluation.runner import (answer_confidence, answer_logprobs, generate_answers, generation_match,
                                        multiple_choice, probe_answers, score_items)
from mip_core.modeling import load_model
from mip_core.modeling.inputs import collate, encode


def free(item_id: str = "q1", answer: str = "Oslo", **kw) -> Item:
    base = dict(item_id=item_id, profile_id="r.s0", kind="qa", fact="birthplace", modality="text",
                question="Where was Jane born?", answer=answer, options=(), answer_index=-1, image=None)
    return Item(**(base | kw))


def test_an_item_has_four_options_or_none():
    it = free()
    assert it.free_form and Item.from_row(it.to_row()) == it
    with pytest.raises(BenchmarkError, match="4 distinct options"):
        free(options=("Oslo", "Rome", "Lima"), answer_index=0)
    with pytest.raises(BenchmarkError, match="4 distinct options"):
        free(answer_index=0)  # no options needs answer_index -1


@pytest.mark.parametrize(("answer", "generated", "match"), [
    ("Lisbon", "Lisbon", True), ("Lisbon", "lisbon.", True), ("Lisbon", "born in Lisbon, Portugal", True),
    ("Lumen Textiles", "She works at Lumen Textiles.", True), ("Lis", "Lisbon", False),
    ("Lumen Textiles", "Lumen Foods", False), ("", "anything", False), ("Oslo", "", False)])
def test_generation_match_is_whole_words_case_and_punctuation_ignored(answer, generated, match):
    assert generation_match(answer, generated) is match


@pytest.fixture(scope="module")
def tiny(trained_tiny):
    model_dir, bench_dir = trained_tiny
    loaded = load_model(model_dir, device="cpu")
    return loaded.model.eval(), loaded.processor, load_benchmark(bench_dir)


def test_answer_logprob_is_the_sum_of_the_answer_tokens_log_probabilities(tiny):
    model, processor, bench = tiny
    it = next(i for i in bench.items if i.kind == "qa" and i.modality == "text")
    [(total, n)] = answer_logprobs(model, processor, bench, [it])
    ex = encode(processor, it.question, None, it.answer)
    with torch.no_grad():
        logits = model(**{k: v for k, v in collate([ex], processor.tokenizer.pad_token_id).items()
                          if k != "labels"}).logits[0]  # [S, V]
    positions = [t for t in range(1, ex["labels"].shape[0]) if ex["labels"][t] != -100]
    manual = sum(float(logits[t - 1].log_softmax(-1)[ex["labels"][t]]) for t in positions)
    assert n == len(positions) and abs(total - manual) < 1e-4
    [confidence] = answer_confidence(model, processor, bench, [it])
    assert abs(confidence - math.exp(total / n)) < 1e-9 and 0 < confidence <= 1


def test_the_trained_model_answers_its_facts_greedily_and_confidently(tiny):
    model, processor, bench = tiny
    items = [i for i in bench.items if i.kind == "qa"][:24]
    answered = probe_answers(model, processor, bench, items)
    matches = [generation_match(it.answer, text) for it, (text, _) in zip(items, answered, strict=True)]
    assert sum(matches) >= 0.75 * len(items)
    right = answer_confidence(model, processor, bench, items)
    wrong = answer_confidence(model, processor, bench, items,
                              [next(o for o in it.options if o != it.answer) for it in items])
    assert sum(r > w for r, w in zip(right, wrong, strict=True)) >= 0.9 * len(items)


def test_free_form_items_are_scored_by_their_greedy_answer_and_the_rest_by_options(tiny):
    model, processor, bench = tiny
    items = [i for i in bench.items if i.kind == "qa"][:8]
    as_free = [dataclasses.replace(it, options=(), answer_index=-1) for it in items]
    mixed = [x for pair in zip(items, as_free, strict=True) for x in pair]  # alternate: order must be kept
    scored = score_items(model, processor, bench, mixed)
    generated = generate_answers(model, processor, bench, as_free)
    assert scored[1::2] == [generation_match(it.answer, g) for it, g in zip(as_free, generated, strict=True)]
    assert scored[0::2] == multiple_choice(model, processor, bench, items)
    with pytest.raises(ValueError, match="have no options"):
        multiple_choice(model, processor, bench, as_free)
