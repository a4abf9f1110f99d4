"""Evaluate a model on the benchmark: exact multiple choice (option log-likelihoods) and greedy generation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mip_core.benchmark import Benchmark, Item
from mip_core.evaluation.metrics import forgetting_rate, generation_match, mc_correct, mean, retention, rouge_l
from mip_core.modeling.inputs import IGNORE_INDEX, answer_logprob, collate, encode
from mip_core.types import MODALITIES
from mip_core.names import SPLITS  # defined with the CLI's names, which must not import torch
from mip_core.progress import Progress

#: Which headline figure each split gets against a reference evaluation (docs/method.md section 6).
RELATIVE_METRIC = {"forget": "forgetting_rate", "test": "forgetting_rate", "retain": "retention",
                   "utility": "retention"}


@dataclass(frozen=True, slots=True)
class EvalRow:
    """One tidy result row, the unit of the ``--json`` output."""

    split: str
    modality: str
    task: str  # "mc" | "gen"
    metric: str  # "accuracy" | "rougeL" | "forgetting_rate" | "retention"
    value: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "modality": self.modality, "task": self.task, "metric": self.metric,
                "value": self.value, "n": self.n}


@torch.no_grad()
def sequence_logprobs(model: nn.Module, examples: Sequence[dict[str, Tensor]], pad_id: int,
                      batch_size: int, device: torch.device | None = None) -> list[float]:
    """Summed log-probability of each example's labelled tokens (the answer and its end token).

    ``device``: where each batch goes (a model whose forward does not place its inputs, e.g. under ZeRO-3).
    """
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        out.extend(answer_logprob(model(**batch).logits, labels).tolist())
    return out


def multiple_choice(model: nn.Module, processor: Any, bench: Benchmark, items: Sequence[Item],
                    batch_size: int = 64, progress: bool = False) -> list[bool]:
    """For each item, whether the highest-likelihood option (as the answer) is the right one."""
    free = [it.item_id for it in items if it.free_form]
    if free:
        raise ValueError(f"multiple_choice: items {free[:5]} ({len(free)} in all) have no options; score them "
                         "with score_items (greedy answer match)")
    examples = []
    for it in items:
        image = bench.load_image(it) if it.image else None
        examples.extend(encode(processor, it.question, image, opt, item_id=it.item_id) for opt in it.options)
    scores = []
    pad_id = processor.tokenizer.pad_token_id
    with Progress(len(examples), "evaluation (multiple choice)", unit="option", bar=progress or None) as bar:
        for start in range(0, len(examples), batch_size * 8):
            chunk = examples[start : start + batch_size * 8]
            scores.extend(sequence_logprobs(model, chunk, pad_id, batch_size))
            bar.update(len(chunk))
    n_opt = len(items[0].options) if items else 0
    return [mc_correct(scores[k * n_opt : (k + 1) * n_opt], it.answer_index) for k, it in enumerate(items)]


@torch.no_grad()
def generate_answers(model: nn.Module, processor: Any, bench: Benchmark, items: Sequence[Item],
                     batch_size: int = 64, max_new_tokens: int = 16, progress: bool = False) -> list[str]:
    """Greedy, batched (left-padded) generation of each item's answer."""
    tokenizer = processor.tokenizer
    answers: list[str] = []
    with Progress(len(items), "evaluation (generation)", unit="item", bar=progress or None) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            encoded = [encode(processor, it.question, bench.load_image(it) if it.image else None,
                              item_id=it.item_id) for it in chunk]
            batch = collate(encoded, tokenizer.pad_token_id, padding_side="left")
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            answers.extend(s.strip() for s in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
            bar.update(len(chunk))
    return answers


def answer_logprobs(model: nn.Module, processor: Any, bench: Any, items: Sequence[Item],
                    answers: Sequence[str] | None = None, batch_size: int = 64) -> list[tuple[float, int]]:
    """Per item, ``(log p(answer + end | question, image), number of tokens scored)``; the answer is the item's
    own or ``answers[k]``. ``bench`` is anything with ``load_image(item)`` (a benchmark, an item table)."""
    answers = [it.answer for it in items] if answers is None else list(answers)
    examples = [encode(processor, it.question, bench.load_image(it) if it.image else None, answer,
                       item_id=it.item_id) for it, answer in zip(items, answers, strict=True)]
    counts = [int((ex["labels"][1:] != IGNORE_INDEX).sum()) for ex in examples]  # labels [seq]: answer + end
    sums = sequence_logprobs(model, examples, processor.tokenizer.pad_token_id, batch_size) if examples else []
    return list(zip(sums, counts, strict=True))


def answer_mean_logprobs(model: nn.Module, processor: Any, bench: Any, items: Sequence[Item],
                         answers: Sequence[str] | None = None, batch_size: int = 64) -> list[float]:
    """Mean per-token log-probability of each answer: comparable across answers of different lengths."""
    return [total / max(n, 1) for total, n in answer_logprobs(model, processor, bench, items, answers, batch_size)]


def answer_confidence(model: nn.Module, processor: Any, bench: Any, items: Sequence[Item],
                      answers: Sequence[str] | None = None, batch_size: int = 64) -> list[float]:
    """The geometric mean of the answer's token probabilities, ``exp(mean log p)``, in (0, 1]: how clearly the
    model says it, comparable across answers of different lengths."""
    return [math.exp(x) for x in answer_mean_logprobs(model, processor, bench, items, answers, batch_size)]


def probe_answers(model: nn.Module, processor: Any, bench: Any, items: Sequence[Item], max_new_tokens: int = 16,
                  batch_size: int = 64) -> list[tuple[str, float]]:
    """The model's greedy answer to each item's question and its confidence (0 for an empty answer)."""
    if not items:
        return []
    generated = generate_answers(model, processor, bench, items, batch_size, max_new_tokens)
    spoken = [k for k, text in enumerate(generated) if text]
    confidence = answer_confidence(model, processor, bench, [items[k] for k in spoken],
                                   [generated[k] for k in spoken], batch_size)
    by_index = dict(zip(spoken, confidence, strict=True))
    return [(text, by_index.get(k, 0.0)) for k, text in enumerate(generated)]


def score_items(model: nn.Module, processor: Any, bench: Any, items: Sequence[Item], batch_size: int = 64
                ) -> list[bool]:
    """Per item, in order: multiple-choice correctness where it has options, else whether the greedy answer still
    gives its answer (:func:`generation_match`)."""
    choice = [k for k, it in enumerate(items) if not it.free_form]
    free = [k for k, it in enumerate(items) if it.free_form]
    out: dict[int, bool] = {}
    if choice:
        out.update(zip(choice, multiple_choice(model, processor, bench, [items[k] for k in choice], batch_size),
                       strict=True))
    if free:
        generated = generate_answers(model, processor, bench, [items[k] for k in free], batch_size)
        out.update({k: generation_match(items[k].answer, text) for k, text in zip(free, generated, strict=True)})
    return [out[k] for k in range(len(items))]


def evaluate(model: nn.Module, processor: Any, bench: Benchmark, *, forget_pct: int = 5,
             splits: Sequence[str] = SPLITS, reference: Sequence[EvalRow] | None = None, batch_size: int = 64,
             progress: bool = False, log: Callable[[str], None] | None = None) -> list[EvalRow]:
    """Accuracy (MC) and ROUGE-L (generation) for each split x modality; relative figures against ``reference``."""
    model.eval()
    rows: list[EvalRow] = []
    for split in splits:
        for modality in MODALITIES:
            items = bench.split_items(split, forget_pct=forget_pct, modality=modality)
            if not items:
                continue
            correct = multiple_choice(model, processor, bench, items, batch_size, progress)
            predictions = generate_answers(model, processor, bench, items, batch_size, progress=progress)
            rows.append(EvalRow(split, modality, "mc", "accuracy", mean([float(c) for c in correct]), len(items)))
            rows.append(EvalRow(split, modality, "gen", "rougeL",
                                mean([rouge_l(p, it.answer) for p, it in zip(predictions, items)]), len(items)))
            if log:
                log(f"{split:8s} {modality:10s} mc={rows[-2].value:.3f} rougeL={rows[-1].value:.3f} n={len(items)}")
    if reference is not None:
        rows.extend(relative_rows(rows, reference))
    return rows


def relative_rows(rows: Sequence[EvalRow], reference: Sequence[EvalRow]) -> list[EvalRow]:
    """Forgetting rate (forget, test) and retention (retain, utility) of each absolute row against its twin."""
    ref = {(r.split, r.modality, r.task, r.metric): r.value for r in reference}
    out = []
    for row in rows:
        key = (row.split, row.modality, row.task, row.metric)
        if row.metric not in ("accuracy", "rougeL") or key not in ref:
            continue
        kind = RELATIVE_METRIC[row.split]
        fn = forgetting_rate if kind == "forgetting_rate" else retention
        out.append(EvalRow(row.split, row.modality, row.task, kind, fn(ref[key], row.value), row.n))
    return out
