"""Metric functions on plain values: no model, so each can be checked by hand."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (``rouge-score``; lower-cased, alphanumeric tokens) of one prediction."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def mc_correct(option_scores: Sequence[float], answer_index: int) -> bool:
    """Exact multiple-choice scoring: the option with the highest log-likelihood must be the answer.

    Ties count as wrong unless the answer is the first of the tied maxima (``argmax`` order), which makes a
    model that scores every option equally no better than always picking option 0.
    """
    best = max(range(len(option_scores)), key=lambda i: option_scores[i])
    return best == answer_index


def forgetting_rate(reference: float, current: float) -> float:
    """``(ref - current) / ref``: 1 means everything the reference knew is gone, 0 nothing forgotten."""
    return (reference - current) / reference if reference > 0 else float("nan")


def retention(reference: float, current: float) -> float:
    """``current / ref``: 1 means the reference's knowledge is fully kept."""
    return current / reference if reference > 0 else float("nan")


def guess_tail(outcomes: Sequence[tuple[bool, float]]) -> float:
    """How likely guessing alone scores at least as many right as ``outcomes`` do: ``outcomes`` are
    ``(correct, chance)`` per item, and the count of right guesses is a sum of independent Bernoulli(chance)
    (Poisson binomial); returns ``P(right >= observed)``. 1 for no items.

    Why: whether one person is answered again is judged on a handful of their items (4-8), where one lucky pick
    moves the accuracy by 0.12-0.25 and a model that never saw them scores about chance. A tail probability
    says when that many right answers is more than luck (a person's free-form items alone, chance 0, answered
    again never are)."""
    right = sum(bool(c) for c, _ in outcomes)
    dist = [1.0]  # dist[k] = P(k right among the items so far)
    for _, p in outcomes:
        dist = [(dist[k] if k < len(dist) else 0.0) * (1 - p) + (dist[k - 1] * p if k else 0.0)
                for k in range(len(dist) + 1)]
    return min(1.0, sum(dist[right:]))


_EDGE_PUNCTUATION = " \t\n.,;:!?\"'()[]"


def answer_words(text: str) -> list[str]:
    """``text`` as casefolded words without surrounding punctuation: what two answers are compared on."""
    return [w.strip(_EDGE_PUNCTUATION) for w in text.casefold().split() if w.strip(_EDGE_PUNCTUATION)]


def generation_match(answer: str, generated: str) -> bool:
    """Whether a greedy generation gives ``answer``: its words (case and surrounding punctuation ignored) appear
    in the generation as a run of whole words ("Lisbon" matches "Lisbon." and "born in Lisbon", not "Lis")."""
    want, got = answer_words(answer), answer_words(generated)
    if not want:
        return False
    return any(got[k:k + len(want)] == want for k in range(len(got) - len(want) + 1))
