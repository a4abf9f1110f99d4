"""Evaluate a batch edit against the model it started from, and decide whether it may be published.

The service cannot ask a person whether the model still knows them; it measures. Every batch is scored on three
item sets, before and after the edit, per modality, with multiple-choice accuracy (the option the model finds most
likely is the right one; chance is 1/4):

- ``forget``: the batch's own items (what was requested);
- ``test``: the same facts asked another way (paraphrased questions, transformed images), held out from the edit:
  whether forgetting generalises. Reported, not gated (no floor): the method does not promise it;
- ``retain``: a fixed sample of the other people's items (what must be kept);
- ``utility``: general-knowledge items with no person in them.

The gate publishes only if, in every modality that has items, the forgetting rate reaches ``min_forgetting`` and
the retention of both kept sets reaches its floor. Relative figures (``forgetting_rate``, ``retention``) are taken
against the same items on the starting model, so a question the model never knew is neither credit nor blame.

Everything here but :func:`correctness` is pure. The service scores each model on a Ray actor (``tasks.gate``) and
keeps a published version's scores with it (``mip_core.service.scores``), so a gate evaluates the edited model
only, plus any items the starting version was never scored on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from mip_core.benchmark import Benchmark, Item
from mip_core.errors import InputError
from mip_core.evaluation.metrics import forgetting_rate, mean, retention
from mip_core.evaluation.runner import multiple_choice

SETS = ("forget", "test", "retain", "utility")
#: What people read for a set name (the log's table and the reports use the same words).
SET_LABELS = {"test": "held-out phrasings"}


@dataclass(frozen=True)
class GateConfig:
    """Publication thresholds; each applies to every modality that has items in the set."""

    # Defaults sit under what MIP-Editor achieves on the demo model (retention 0.84-0.94 over the sets,
    # BENCHMARKS.md section 6) by about the sampling error of the held-out sets (25-70 items per modality: one
    # item moves a figure by 0.015-0.04), so a batch clearly worse than the method's norm is held back.
    min_forgetting: float = 0.5  # forget accuracy must fall by at least half of what the model knew (1 = all)
    min_retention: float = 0.8  # other people's accuracy kept at >= 80 % of the starting model's
    min_utility: float = 0.8  # general-knowledge accuracy kept at >= 80 %

    def __post_init__(self) -> None:
        for name in ("min_forgetting", "min_retention", "min_utility"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise InputError(f"GateConfig.{name}={value!r} must be within [0, 1]")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class SetScore:
    """Accuracy of one item set in one modality, before and after the edit."""

    items: str  # "forget" | "test" | "retain" | "utility"
    modality: str
    n: int
    before: float
    after: float

    @property
    def relative(self) -> float:
        """Forgetting rate for the forget sets, retention for the kept sets (NaN when ``before`` is 0)."""
        if self.items in ("forget", "test"):
            return forgetting_rate(self.before, self.after)
        return retention(self.before, self.after)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]  # one per failed check; empty when passed
    scores: tuple[SetScore, ...]
    per_request: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # request -> before/after acc
    config: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "config": self.config.to_dict(),
                "scores": [asdict(s) | {"relative": s.relative} for s in self.scores],
                "per_request": {k: dict(v) for k, v in self.per_request.items()}}

    def metric(self, items: str, modality: str) -> SetScore | None:
        return next((s for s in self.scores if s.items == items and s.modality == modality), None)


def correctness(model: nn.Module, processor: Any, bench: Benchmark, item_sets: Mapping[str, Sequence[Item]],
                ) -> dict[str, dict[str, bool]]:
    """``{set: {item_id: correct}}``: one multiple-choice pass per set (the model is only read)."""
    model.eval()
    return {name: dict(zip((it.item_id for it in items), multiple_choice(model, processor, bench, items),
                           strict=True)) for name, items in item_sets.items()}


def correct_by_id(model: nn.Module, processor: Any, bench: Benchmark, item_ids: Sequence[str]) -> dict[str, bool]:
    """``{item_id: correct}`` for benchmark items given by id (what a scoring actor returns: plain data)."""
    by_id = {it.item_id: it for it in bench.items}
    unknown = [i for i in item_ids if i not in by_id]
    if unknown:
        raise InputError(f"item ids {unknown[:5]} ({len(unknown)} in all) are not in the benchmark; the batch "
                         "was planned against another dataset")
    return correctness(model, processor, bench, {"items": [by_id[i] for i in item_ids]})["items"]


def by_set(item_sets: Mapping[str, Sequence[Item]], correct: Mapping[str, bool]) -> dict[str, dict[str, bool]]:
    """Per-item correctness regrouped as ``{set: {item_id: correct}}``, the tables :func:`decide` takes."""
    return {name: {it.item_id: correct[it.item_id] for it in items} for name, items in item_sets.items()}


def decide(item_sets: Mapping[str, Sequence[Item]], before: Mapping[str, Mapping[str, bool]],
           after: Mapping[str, Mapping[str, bool]], cfg: GateConfig, *,
           request_of: Mapping[str, str] | None = None) -> GateDecision:
    """The gate over per-item correctness before and after (pure: no model, so it is tested on toy tables)."""
    scores: list[SetScore] = []
    reasons: list[str] = []
    floors = {"forget": cfg.min_forgetting, "retain": cfg.min_retention, "utility": cfg.min_utility}
    for name in SETS:
        items = item_sets.get(name, ())
        for modality in sorted({it.modality for it in items}):
            ids = [it.item_id for it in items if it.modality == modality]
            score = SetScore(name, modality, len(ids), mean([float(before[name][i]) for i in ids]),
                             mean([float(after[name][i]) for i in ids]))
            scores.append(score)
            rel = score.relative
            if rel != rel:  # NaN: the starting model knew none of these items, so there is nothing to measure
                if name == "forget":
                    reasons.append(f"forget {modality}: the starting model answers none of the {len(ids)} items "
                                   "correctly, so forgetting cannot be measured")
                continue
            if name in floors and rel < floors[name]:
                label = "forgetting rate" if name == "forget" else "retention"
                reasons.append(f"{name} {modality}: {label} {rel:.3f} < {floors[name]:.3f} "
                               f"(accuracy {score.before:.3f} -> {score.after:.3f}, n={len(ids)})")
    if not any(s.items == "forget" for s in scores):
        reasons.append("no forget items were evaluated")
    per_request: dict[str, dict[str, float]] = {}
    for it in item_sets.get("forget", ()):
        request = (request_of or {}).get(it.item_id, "")
        acc = per_request.setdefault(request, {"n": 0.0, "before": 0.0, "after": 0.0})
        acc["n"] += 1
        acc["before"] += float(before["forget"][it.item_id])
        acc["after"] += float(after["forget"][it.item_id])
    for acc in per_request.values():
        acc["before"] /= acc["n"]
        acc["after"] /= acc["n"]
    return GateDecision(not reasons, tuple(reasons), tuple(scores), per_request, cfg)


def evaluate_and_gate(base: nn.Module, edited: nn.Module, processor: Any, bench: Benchmark,
                      item_sets: Mapping[str, Sequence[Item]], cfg: GateConfig, *,
                      request_of: Mapping[str, str] | None = None,
                      log: Callable[[str], None] = print) -> GateDecision:
    """Score ``item_sets`` on both models and apply the gate."""
    log(f"evaluating {', '.join(f'{len(v)} {k}' for k, v in item_sets.items())} items on the starting model")
    before = correctness(base, processor, bench, item_sets)
    log("evaluating the edited model")
    after = correctness(edited, processor, bench, item_sets)
    return decide(item_sets, before, after, cfg, request_of=request_of)


def format_decision(decision: GateDecision) -> str:
    """A fixed-width table of the scores and the verdict, for logs and the batch report."""
    lines = [f"{'set':18s} {'modality':11s} {'n':>4s} {'before':>7s} {'after':>7s} {'relative':>9s}"]
    for s in decision.scores:
        name = SET_LABELS.get(s.items, s.items)
        lines.append(f"{name:18s} {s.modality:11s} {s.n:4d} {s.before:7.3f} {s.after:7.3f} {s.relative:9.3f}")
    verdict = "PASSED" if decision.passed else "FAILED: " + "; ".join(decision.reasons)
    return "\n".join([*lines, f"gate {verdict}"])


__all__ = ["SETS", "GateConfig", "GateDecision", "SetScore", "by_set", "correct_by_id", "correctness", "decide",
           "evaluate_and_gate", "format_decision"]
