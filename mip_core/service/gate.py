"""Evaluate a batch edit against the model it started from, and decide whether it may be published.

The service cannot ask a person whether the model still knows them; it measures. Every batch is scored on its
item sets, before and after the edit, per modality: an item with options is correct when the option the model
finds most likely is the right one (chance 1/4); a free-form item (a probe the service built from the model's own
answer) is correct when the model's greedy answer still gives that answer:

- ``forget``: the batch's own items (what was requested);
- ``test``: the same facts asked another way (paraphrased questions, transformed images), held out from the edit:
  whether forgetting generalises. Reported, not gated (no floor): the method does not promise it;
- ``retain``: a fixed sample of the other people's items (what must be kept);
- ``utility``: general-knowledge items with no person in them;
- ``earlier``: a sample of the items of people earlier versions of the lineage forgot
  (``mip_core.service.forgotten``): they must stay forgotten.

Each request is judged on its own items: it is ``done`` only if the forgetting rate of *its* forget items reaches
``min_forgetting`` (its held-out probes reported beside them), whatever the batch average says. The edit is
published only if, in every modality that has items, the retention of both kept sets reaches its floor, and at
least one request passed, and no earlier-forgotten people come back: their accuracy, in every modality, rises by
at most ``max_relapse`` over their level right after the edit that forgot them (the service passes that level as
the set's ``before``; ``tasks.gate``), or over chance where that is higher (a difference, not a ratio: it starts
near zero). The same holds **per person** (the request that forgot them) on their own items in the sample,
where one lucky pick moves the figure by 0.12-0.25: a person counts as back when their rise exceeds
``max_relapse`` and guessing alone would score that well with probability under ``relapse_alpha``
(:func:`~mip_core.evaluation.metrics.guess_tail`). Pooled, one person answered again on 7 of 11 items hid among
fifteen at chance (BENCHMARKS.md section 10). Relative figures (``forgetting_rate``, ``retention``) are taken
against the same items on the starting model, so a question the model never knew is neither credit nor blame.

Multiple choice alone misses a model that still picks the right option but no longer writes a sensible answer
(whole-model RMU keeps its options while its ROUGE-L on other people's answers falls to 0.18-0.33, BENCHMARKS.md
section 9). So the kept sets (``retain``, ``utility``) also get a **generation score** per modality: the mean
ROUGE-L of the edited model's greedy answer against the starting model's greedy answer to the same question (1 when
it still says what it said), over the items the starting model answered right. The edit is held back when any is
below ``min_generation``.

Each kept-set floor applies twice: against the starting version (what this edit did) and, on an edited version,
against the **registered model** the lineage started from (what all its edits did together). Every edit of a night
of 32 kept at least 0.6 of its starting version's answers, yet after 14 versions other people's answers kept 0.398
of the registered model's (BENCHMARKS.md section 10): losses each under the floor add up, as relapse would if it
were measured from the starting version. The same reference judges a request the starting version does not find
forgotten enough: it is done when its forgetting rate *since the registered model* reaches ``min_forgetting``
(earlier edits of the night may have taken a person part of the way, as collateral, and the rest is then too
little to count as half). ``GateConfig.against_registered`` turns both off.

Everything here but :func:`correctness` and :func:`greedy_by_id` is pure. The service scores and answers each
model on a Ray actor (``tasks.gate``) and keeps a published version's scores and answers with it
(``mip_core.service.scores``), so a gate evaluates the edited model only, plus any items the starting version was
never scored or answered on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from mip_core.benchmark import Benchmark, Item
from mip_core.config import Share, config_class
from mip_core.errors import InputError
from mip_core.evaluation.metrics import forgetting_rate, generation_match, guess_tail, mean, retention, rouge_l
from mip_core.evaluation.runner import generate_answers, score_items

SETS = ("forget", "test", "retain", "utility", "earlier")
#: The sets whose answers must survive the edit: the generation check's (only these are answered, to keep it cheap).
KEPT = ("retain", "utility")
#: What people read for a set name (the log's table and the reports use the same words).
SET_LABELS = {"test": "held-out phrasings", "earlier": "forgotten earlier"}


@config_class
class GateConfig:
    """Publication thresholds; each applies to every modality that has items in the set."""

    # Defaults sit under what MIP-Editor achieves on the demo model (retention 0.84-0.94 over the sets,
    # BENCHMARKS.md section 6) by about the sampling error of the held-out sets (25-70 items per modality: one
    # item moves a figure by 0.015-0.04), so a batch clearly worse than the method's norm is held back.
    min_forgetting: Share = 0.5  # forget accuracy must fall by at least half of what the model knew (1 = all)
    min_retention: Share = 0.8  # other people's accuracy kept at >= 80 % of the starting model's
    min_utility: Share = 0.8  # general-knowledge accuracy kept at >= 80 %
    # People forgotten by earlier versions may not come back: their accuracy may rise by at most this much (MUSE's
    # sustainability; one item in 20 of a modality's sample)
    max_relapse: Share = 0.05
    # ... and per person, their rise counts only when guessing would score that well with less than this
    # probability: with 4-11 items a person, one lucky pick would otherwise hold an edit back
    relapse_alpha: Share = 0.1
    # Kept sets' mean ROUGE-L of the edited model's greedy answers against the starting model's (0 disables). 0.6
    # sits under what path-restricted MIP keeps (0.83-0.93) and above whole-model RMU's collapse (0.18-0.33), which
    # multiple choice does not see (BENCHMARKS.md section 9).
    min_generation: Share = 0.6
    # once the lineage has edited versions, judge against the registered model it started from too: the three
    # floors above hold against it as well, and a request is forgotten when min_forgetting holds against either
    against_registered: bool = True

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
    chance: float = 0.0  # accuracy of guessing among the options (free-form items: 0)

    @property
    def relative(self) -> float:
        """Forgetting rate for the forget sets, retention for the kept sets (NaN when ``before`` is 0); for the
        earlier-forgotten people, the rise of their accuracy over ``max(before, chance)``: an edit drives them
        below chance (a tell of its own), and the next edit's noise moving them back to chance is not them
        coming back (a model that never saw them scores about chance, BENCHMARKS.md section 10)."""
        if self.items in ("forget", "test"):
            return forgetting_rate(self.before, self.after)
        if self.items == "earlier":
            return self.after - max(self.before, self.chance)
        return retention(self.before, self.after)


@dataclass(frozen=True)
class GenerationScore:
    """A kept set's generation in one modality: mean ROUGE-L of the edited model's greedy answers against the
    starting model's (1 = it still says what it said; whole-model RMU falls to 0.18-0.33)."""

    items: str  # "retain" | "utility"
    modality: str
    n: int
    rouge_l: float


@dataclass(frozen=True)
class SinceRegistered:
    """The kept sets of an edited model against the registered model its lineage started from (``before`` is the
    registered model's accuracy, ``rouge_l`` against its answers): erosion across versions, which the figures
    against the starting version do not add up."""

    version: str  # the registered version
    scores: tuple[SetScore, ...]  # retain and utility only
    generation: tuple[GenerationScore, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "scores": [asdict(s) | {"relative": s.relative} for s in self.scores],
                "generation": [asdict(g) for g in self.generation]}


@dataclass(frozen=True)
class RegisteredReference:
    """What :func:`decide` compares with, beside the starting version: the registered model's correctness
    (``{set: {item_id: correct}}``: the kept sets, and ``forget`` items where it was scored on them) and the edited
    model's ROUGE-L against its answers."""

    version: str
    correct: Mapping[str, Mapping[str, bool]]
    rouge: Mapping[str, float] | None = None


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]  # one per failed check; empty when passed
    scores: tuple[SetScore, ...]
    per_request: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # request -> its own figures
    config: GateConfig = field(default_factory=GateConfig)
    request_reasons: Mapping[str, str] = field(default_factory=dict)  # request -> why it is not forgotten
    generation: tuple[GenerationScore, ...] = ()  # kept sets' ROUGE-L per modality; empty when not measured
    registered: SinceRegistered | None = None  # the kept sets against the registered model (edited versions only)
    registered_reasons: tuple[str, ...] = ()  # those of ``reasons`` that are floors against the registered model
    earlier_people: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # see :func:`earlier_people`

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "config": self.config.to_dict(),
                "scores": [asdict(s) | {"relative": s.relative} for s in self.scores],
                "per_request": {k: dict(v) for k, v in self.per_request.items()},
                "request_reasons": dict(self.request_reasons),
                "generation": [asdict(g) for g in self.generation],
                "registered": self.registered.to_dict() if self.registered else None,
                "registered_reasons": list(self.registered_reasons),
                "earlier_people": {k: dict(v) for k, v in self.earlier_people.items()}}

    def request_passed(self, request_id: str) -> bool:
        return bool(self.per_request.get(request_id, {}).get("passed"))

    def metric(self, items: str, modality: str) -> SetScore | None:
        return next((s for s in self.scores if s.items == items and s.modality == modality), None)


def correctness(model: nn.Module, processor: Any, bench: Benchmark, item_sets: Mapping[str, Sequence[Item]],
                ) -> dict[str, dict[str, bool]]:
    """``{set: {item_id: correct}}``: multiple choice where an item has options, else its greedy answer (the
    model is only read)."""
    model.eval()
    return {name: dict(zip((it.item_id for it in items), score_items(model, processor, bench, items),
                           strict=True)) for name, items in item_sets.items()}


def _items_by_id(bench: Benchmark, item_ids: Sequence[str]) -> list[Item]:
    """The benchmark's items with these ids, in order; unknown ids are named."""
    by_id = {it.item_id: it for it in bench.items}
    unknown = [i for i in item_ids if i not in by_id]
    if unknown:
        raise InputError(f"item ids {unknown[:5]} ({len(unknown)} in all) are not in the benchmark; the batch "
                         "was planned against another dataset")
    return [by_id[i] for i in item_ids]


def correct_by_id(model: nn.Module, processor: Any, bench: Benchmark, item_ids: Sequence[str]) -> dict[str, bool]:
    """``{item_id: correct}`` for benchmark items given by id (what a scoring actor returns: plain data)."""
    return correctness(model, processor, bench, {"items": _items_by_id(bench, item_ids)})["items"]


def greedy_by_id(model: nn.Module, processor: Any, bench: Benchmark, item_ids: Sequence[str]) -> dict[str, str]:
    """``{item_id: greedy answer}`` for benchmark items given by id: what the generation check compares (the
    starting model's answers are the reference for the edited model's; the model is only read)."""
    model.eval()
    return dict(zip(item_ids, generate_answers(model, processor, bench, _items_by_id(bench, item_ids)), strict=True))


def answer_rouge(before: Mapping[str, str], after: Mapping[str, str], truth: Mapping[str, str] | None = None
                 ) -> dict[str, float]:
    """Per item answered by both models, ROUGE-L of the edited model's answer (``after``) against the starting
    model's (``before``); 1.0 when they are the same text, even one ROUGE cannot tokenise (an empty answer).

    With ``truth`` (item -> its answer), only items whose starting answer gives the right answer count: what must
    survive the edit is what the model said right; a wrong answer was never knowledge, and it is the first to
    drift under any edit (on an edited version the kept sets hold a few), so it would be blame without loss."""
    return {i: 1.0 if after[i] == ref else rouge_l(after[i], ref) for i, ref in before.items()
            if i in after and (truth is None or (i in truth and generation_match(truth[i], ref)))}


def by_set(item_sets: Mapping[str, Sequence[Item]], correct: Mapping[str, bool]) -> dict[str, dict[str, bool]]:
    """Per-item correctness regrouped as ``{set: {item_id: correct}}``, the tables :func:`decide` takes."""
    return {name: {it.item_id: correct[it.item_id] for it in items} for name, items in item_sets.items()}


def _set_scores(item_sets: Mapping[str, Sequence[Item]], before: Mapping[str, Mapping[str, bool]],
                after: Mapping[str, Mapping[str, bool]]) -> list[SetScore]:
    """Accuracy before and after of every set, per modality."""
    scores = []
    for name in SETS:
        items = item_sets.get(name, ())
        for modality in sorted({it.modality for it in items}):
            mine = [it for it in items if it.modality == modality]
            scores.append(SetScore(name, modality, len(mine), mean([float(before[name][it.item_id]) for it in mine]),
                                   mean([float(after[name][it.item_id]) for it in mine]), chance_level(mine)))
    return scores


def chance_level(items: Sequence[Item]) -> float:
    """Expected accuracy of picking an option at random (a free-form item counts 0: nothing to pick)."""
    return mean([_item_chance(it) for it in items]) if items else 0.0


def _item_chance(it: Item) -> float:
    return 1 / len(it.options) if it.options else 0.0


def generation_scores(item_sets: Mapping[str, Sequence[Item]], rouge: Mapping[str, float]
                      ) -> list[GenerationScore]:
    """Mean ROUGE-L of each kept set, per modality, over its items that have a figure in ``rouge``."""
    scores = []
    for name in KEPT:
        items = [it for it in item_sets.get(name, ()) if it.item_id in rouge]
        for modality in sorted({it.modality for it in items}):
            figures = [rouge[it.item_id] for it in items if it.modality == modality]
            scores.append(GenerationScore(name, modality, len(figures), mean(figures)))
    return scores


def _generation_reasons(generation: Sequence[GenerationScore], cfg: GateConfig, against: str = "the starting model"
                        ) -> list[str]:
    """Kept sets the edited model still answers by option but no longer in words (a floor of 0 never fails)."""
    return [f"{g.items} {g.modality}: generation ROUGE-L {g.rouge_l:.3f} < {cfg.min_generation:.3f} (the edited "
            f"model's greedy answers against {against}'s, n={g.n})" for g in generation
            if g.rouge_l < cfg.min_generation]


def _kept_set_reasons(scores: Sequence[SetScore], cfg: GateConfig, since: str = "") -> list[str]:
    """The batch's checks: other people's and general items kept (they protect every request alike)."""
    floors = {"retain": cfg.min_retention, "utility": cfg.min_utility}
    return [f"{s.items} {s.modality}: retention{since} {s.relative:.3f} < {floors[s.items]:.3f} (accuracy "
            f"{s.before:.3f} -> {s.after:.3f}, n={s.n})" for s in scores
            if s.items in floors and s.relative == s.relative and s.relative < floors[s.items]]


def since_registered(item_sets: Mapping[str, Sequence[Item]], after: Mapping[str, Mapping[str, bool]],
                     reference: RegisteredReference) -> SinceRegistered:
    """The kept sets' accuracy and generation against the registered model instead of the starting version."""
    kept = {name: item_sets.get(name, ()) for name in KEPT}
    return SinceRegistered(reference.version, tuple(_set_scores(kept, reference.correct, after)),
                           tuple(generation_scores(kept, reference.rouge or {})))


def _since_registered_reasons(since: SinceRegistered | None, cfg: GateConfig) -> list[str]:
    """The kept-set floors against the registered model: what the lineage's edits lost together."""
    if since is None or not cfg.against_registered:
        return []
    return (_kept_set_reasons(since.scores, cfg, f" since the registered model {since.version}")
            + _generation_reasons(since.generation, cfg, f"the registered model {since.version}"))


def _relapse_reasons(scores: Sequence[SetScore], cfg: GateConfig) -> list[str]:
    """People earlier versions forgot, answered again: the check that keeps a lineage's forgetting forgotten."""
    return [f"forgotten earlier {s.modality}: accuracy rose {s.before:.3f} -> {s.after:.3f} (+{s.relative:.3f} over "
            f"the higher of before and chance {s.chance:.3f}, > {cfg.max_relapse:.3f}, n={s.n}): people earlier "
            "versions forgot come back" for s in scores if s.items == "earlier" and s.relative > cfg.max_relapse]


def earlier_people(items: Sequence[Item], before: Mapping[str, bool], after: Mapping[str, bool],
                   request_of: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Each earlier-forgotten person's figures on their items in the sample, by the request that forgot them:
    ``n``, ``before`` (their level right after that edit), ``after``, ``chance``, ``rise`` (over the higher of
    before and chance, as for the pooled set) and ``luck`` (how likely guessing scores ``after`` or better)."""
    people: dict[str, list[Item]] = {}
    for it in items:
        if request_of.get(it.item_id):  # an item no request names has no person to judge
            people.setdefault(request_of[it.item_id], []).append(it)
    figures = {}
    for request, mine in sorted(people.items()):
        b, a = (mean([float(table[it.item_id]) for it in mine]) for table in (before, after))
        chance = chance_level(mine)
        luck = guess_tail([(after[it.item_id], _item_chance(it)) for it in mine])
        figures[request] = {"n": float(len(mine)), "before": b, "after": a, "chance": chance,
                            "rise": a - max(b, chance), "luck": luck}
    return figures


def _person_relapse_reasons(people: Mapping[str, Mapping[str, float]], cfg: GateConfig) -> list[str]:
    """People earlier versions forgot whom this model answers again, one by one (the pooled figure averages a
    person answered again with the many still at chance)."""
    return [f"forgotten earlier ({request}): accuracy on {int(f['n'])} of their items rose {f['before']:.3f} -> "
            f"{f['after']:.3f} (+{f['rise']:.3f} over the higher of before and chance {f['chance']:.3f}, > "
            f"{cfg.max_relapse:.3f}; guessing scores that well with p={f['luck']:.3f} < {cfg.relapse_alpha:.3f}): "
            "this person comes back" for request, f in people.items()
            if f["rise"] > cfg.max_relapse and f["luck"] < cfg.relapse_alpha]


def _rates(items: Sequence[Item], before: Mapping[str, bool], after: Mapping[str, bool],
           group: Callable[[Item], str]) -> dict[str, tuple[int, float, float]]:
    """``{group: (n, accuracy before, accuracy after)}`` of ``items``."""
    sums: dict[str, list[float]] = {}
    for it in items:
        acc = sums.setdefault(group(it), [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += float(before[it.item_id])
        acc[2] += float(after[it.item_id])
    return {g: (int(n), b / n, a / n) for g, (n, b, a) in sums.items()}


def _request_verdict(items: Sequence[Item], before: Mapping[str, bool], after: Mapping[str, bool],
                     cfg: GateConfig, registered: Mapping[str, bool] | None = None) -> str | None:
    """Why a request's own forget items are not forgotten (checked per modality: a person still recognised from
    a photo is not forgotten because their name is), or None.

    With ``registered`` (the registered model's correctness on these items), a modality whose rate against the
    starting version falls short passes when its rate against the registered model reaches the floor: an earlier
    edit of the night may already have taken a person part of the way (0.667 on the starting version, where a
    model trained without them scores 0.5), and the rest can then be too little to measure as half."""
    for modality, (n, b, a) in sorted(_rates(items, before, after, lambda it: it.modality).items()):
        rate = forgetting_rate(b, a)
        _, since = _registered_rate([it for it in items if it.modality == modality], after, registered)
        if since >= cfg.min_forgetting:
            continue  # forgotten by the lineage's standard (also when the start knew none of them: NaN)
        if rate != rate:  # NaN: the starting model answered none of them
            return (f"{modality}: the starting model answers none of the request's {n} forget items correctly, so "
                    "forgetting cannot be measured")
        if rate < cfg.min_forgetting:
            return (f"{modality}: forgetting rate {rate:.3f} < {cfg.min_forgetting:.3f} on the request's own {n} "
                    f"items (accuracy {b:.3f} -> {a:.3f}"
                    + (f"; {since:.3f} since the registered model" if since == since else "")
                    + "): the model still knows them")
    return None


def _registered_rate(items: Sequence[Item], after: Mapping[str, bool], registered: Mapping[str, bool] | None
                      ) -> tuple[float, float]:
    """``(the registered model's accuracy on items, their forgetting rate against it)``; NaNs unless it was scored
    on all of them."""
    if not registered or not items or any(it.item_id not in registered for it in items):
        return float("nan"), float("nan")
    was = mean([float(registered[it.item_id]) for it in items])
    return was, forgetting_rate(was, mean([float(after[it.item_id]) for it in items]))


def _per_request(item_sets: Mapping[str, Sequence[Item]], before: Mapping[str, Mapping[str, bool]],
                 after: Mapping[str, Mapping[str, bool]], request_of: Mapping[str, str], cfg: GateConfig,
                 registered: Mapping[str, bool] | None = None
                 ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each request's own figures (``n``, ``before``, ``after``, ``forgetting``; its held-out probes beside them as
    ``test_*``; ``registered_before`` and ``registered_forgetting`` where the registered model was scored on its
    items; ``passed``) and, for those that did not pass, why."""
    figures: dict[str, dict[str, float]] = {}
    reasons: dict[str, str] = {}
    for name, prefix in (("forget", ""), ("test", "test_")):
        items = item_sets.get(name, ())
        if not items:
            continue
        for request, (n, b, a) in _rates(items, before[name], after[name],
                                         lambda it: request_of.get(it.item_id, "")).items():
            if name == "forget" or request in figures:  # held-out probes are reported beside forget items only
                figures.setdefault(request, {}).update({f"{prefix}n": float(n), f"{prefix}before": b,
                                                        f"{prefix}after": a,
                                                        f"{prefix}forgetting": forgetting_rate(b, a)})
    for request, fig in figures.items():
        mine = [it for it in item_sets.get("forget", ()) if request_of.get(it.item_id, "") == request]
        was, since = _registered_rate(mine, after["forget"], registered)
        if was == was:
            fig.update({"registered_before": was, "registered_forgetting": since})
        why = _request_verdict(mine, before["forget"], after["forget"], cfg,
                               registered if cfg.against_registered else None)  # off: reported, not judged
        if why is not None:
            reasons[request] = why
        fig["passed"] = float(why is None)
    return figures, reasons


def decide(item_sets: Mapping[str, Sequence[Item]], before: Mapping[str, Mapping[str, bool]],
           after: Mapping[str, Mapping[str, bool]], cfg: GateConfig, *,
           request_of: Mapping[str, str] | None = None, rouge: Mapping[str, float] | None = None,
           registered: RegisteredReference | None = None) -> GateDecision:
    """The gate over per-item correctness before and after (pure: no model, so it is tested on toy tables).

    Each request is judged on its own forget items, in every modality they have: it passes when their forgetting
    rate reaches ``min_forgetting``, whatever the batch average says. The edit is publishable when the kept sets
    hold (accuracy, and generation where ``rouge`` gives kept items' ROUGE-L, see :func:`answer_rouge`), no
    earlier-forgotten people come back (pooled per modality, and one by one: ``request_of`` names the request
    that forgot each ``earlier`` item), and at least one request passes; a request that does not pass is closed
    failed with its own figures. ``rouge`` None: generation not measured, so not checked. ``registered``: the
    registered model's figures, when the starting version is an edited one; the kept sets' floors then hold
    against them too."""
    scores = _set_scores(item_sets, before, after)
    generation = generation_scores(item_sets, rouge or {})
    since = since_registered(item_sets, after, registered) if registered else None
    lineage = _since_registered_reasons(since, cfg)
    people = earlier_people(item_sets.get("earlier", ()), before.get("earlier", {}), after.get("earlier", {}),
                            request_of or {})
    reasons = (_kept_set_reasons(scores, cfg) + _generation_reasons(generation, cfg) + lineage
               + _relapse_reasons(scores, cfg) + _person_relapse_reasons(people, cfg))
    per_request, request_reasons = _per_request(item_sets, before, after, request_of or {}, cfg,
                                                registered.correct.get("forget") if registered else None)
    if not per_request:
        reasons.append("no forget items were evaluated")
    elif len(request_reasons) == len(per_request):
        reasons += [f"forget{f' ({r})' if r else ''} {why}" for r, why in sorted(request_reasons.items())]
    return GateDecision(not reasons, tuple(reasons), tuple(scores), per_request, cfg, request_reasons,
                        tuple(generation), since, tuple(lineage), people)


def lineage_spent(gate: Mapping[str, Any] | None, n_requests: int) -> str | None:
    """Why the model's lineage is at the gate's floors in this run, or None: a batch of one request was held back
    by the floors against the registered model and nothing else (its own person forgotten, the per-edit floors
    met). Worded as the reason a request closed unedited gets (``ServiceSpec.when_spent="close"``).

    Splitting cannot shrink a batch of one, and every edit costs other people some of their answers (on the demo
    model 5-30 % ROUGE-L per version, BENCHMARKS.md section 10), so the next requests are edited one at a time
    (the default; on the night of 32 one of three then passed) or closed. Only a model retrained without the people
    forgotten so far, registered as the new reference, gives the room back."""
    if not gate or gate.get("passed") or n_requests != 1:
        return None
    lineage = gate.get("registered_reasons") or []
    if not lineage or set(gate.get("reasons", [])) - set(lineage):
        return None
    version = (gate.get("registered") or {}).get("version", "the registered model")
    return (f"not edited: the model's versions since the registered {version} have spent what the gate's floors "
            f"against it allow (a batch of one request was held back by them alone: {'; '.join(lineage)}). "
            "Retrain the model without the people forgotten so far, register it under the same name, and resubmit "
            "this request as it is")


def with_answer_logprobs(decision: GateDecision, item_sets: Mapping[str, Sequence[Item]],
                         before: Mapping[str, float], after: Mapping[str, float],
                         request_of: Mapping[str, str]) -> GateDecision:
    """``decision`` with each request's mean answer log-probability before and after the edit (``logprob_before``
    and ``logprob_after`` over its forget items, ``test_logprob_*`` over its held-out probes): a graded figure
    beside the greedy match, for items the starting model answered freely. ``before``/``after``: item -> mean
    per-token log p of the answer the starting model gave."""
    figures = {r: dict(f) for r, f in decision.per_request.items()}
    for name, prefix in (("forget", ""), ("test", "test_")):
        for request, fig in figures.items():
            ids = [it.item_id for it in item_sets.get(name, ()) if request_of.get(it.item_id) == request
                   and it.item_id in before and it.item_id in after]
            if ids:
                fig[f"{prefix}logprob_before"] = mean([before[i] for i in ids])
                fig[f"{prefix}logprob_after"] = mean([after[i] for i in ids])
    return replace(decision, per_request=figures)


def evaluate_and_gate(base: nn.Module, edited: nn.Module, processor: Any, bench: Benchmark,
                      item_sets: Mapping[str, Sequence[Item]], cfg: GateConfig, *,
                      request_of: Mapping[str, str] | None = None,
                      log: Callable[[str], None] = print) -> GateDecision:
    """Score ``item_sets`` on both models (and answer the kept sets, for the generation check); apply the gate."""
    kept = [it.item_id for name in KEPT for it in item_sets.get(name, ())]
    log(f"evaluating {', '.join(f'{len(v)} {k}' for k, v in item_sets.items())} items on the starting model")
    before, said = correctness(base, processor, bench, item_sets), greedy_by_id(base, processor, bench, kept)
    log("evaluating the edited model")
    after, says = correctness(edited, processor, bench, item_sets), greedy_by_id(edited, processor, bench, kept)
    truth = {it.item_id: it.answer for name in KEPT for it in item_sets.get(name, ())}
    return decide(item_sets, before, after, cfg, request_of=request_of, rouge=answer_rouge(said, says, truth))


def _score_line(s: SetScore) -> str:
    name = SET_LABELS.get(s.items, s.items)
    return f"{name:18s} {s.modality:11s} {s.n:4d} {s.before:7.3f} {s.after:7.3f} {s.relative:9.3f}"


def format_decision(decision: GateDecision) -> str:
    """A fixed-width table of the scores and the verdict, for logs and the batch report."""
    lines = [f"{'set':18s} {'modality':11s} {'n':>4s} {'before':>7s} {'after':>7s} {'relative':>9s}"]
    lines += [_score_line(s) for s in decision.scores]
    if decision.generation:  # ROUGE-L of the edited model's answers against the starting model's
        lines.append(f"{'generation':18s} {'modality':11s} {'n':>4s} {'ROUGE-L':>7s}")
        lines += [f"{g.items:18s} {g.modality:11s} {g.n:4d} {g.rouge_l:7.3f}" for g in decision.generation]
    if decision.registered:  # the same kept sets against the registered model
        since = decision.registered
        lines.append(f"since the registered model {since.version}:")
        lines += [_score_line(s) for s in since.scores]
        lines += [f"{g.items + ' ROUGE-L':18s} {g.modality:11s} {g.n:4d} {g.rouge_l:7.3f}" for g in since.generation]
    verdict = "PASSED" if decision.passed else "FAILED: " + "; ".join(decision.reasons)
    return "\n".join([*lines, f"gate {verdict}"])


__all__ = ["KEPT", "SETS", "GateConfig", "GateDecision", "GenerationScore", "RegisteredReference", "SetScore",
           "SinceRegistered", "answer_rouge", "by_set", "correct_by_id", "correctness", "decide", "earlier_people",
           "evaluate_and_gate", "format_decision", "generation_scores", "greedy_by_id", "lineage_spent",
           "since_registered", "with_answer_logprobs"]
