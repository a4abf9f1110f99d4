"""The publication gate's verdict on a batch, measured again by the test itself.

The service scores each model on a Ray actor (the starting version from its score cache) and applies
``mip_core.service.gate.decide``. Here the test loads the starting model and the batch's candidate (the edited
model, published or not) in its own process, scores the batch's item sets with the evaluation runner, generates
both models' greedy answers on the kept sets (retain, utility) and takes their ROUGE-L itself, and applies the
floors with its own arithmetic, so a wrong score, a wrong floor or a wrong verdict in the service shows up as a
difference, whichever way the gate went.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mip_core.evaluation.metrics import generation_match, rouge_l
from mip_core.evaluation.runner import generate_answers, score_items
from mip_core.modeling import load_model
from mip_core.modeling.io import localize
from mip_core.service.batch import BatchManifest
from mip_core.service.gate import GateConfig
from mip_core.service.items import load_items
from mip_core.service.store import ServiceStore


@dataclass
class Verdict:
    """What the floors say about the scores the test measured."""

    scores: dict[tuple[str, str], tuple[int, float, float]]  # (set, modality) -> (n, before, after)
    below: list[str] = field(default_factory=list)  # "retain text", ...: kept sets under their floor
    not_forgotten: dict[str, list[str]] = field(default_factory=dict)  # request -> its modalities under the floor
    published: bool = False
    generation: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)  # -> (n, mean ROUGE-L)
    low_generation: list[str] = field(default_factory=list)  # "retain text", ...: under min_generation


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs)


def measure(store: ServiceStore, batch_id: str, cfg: GateConfig | None = None) -> Verdict:
    """Score batch ``batch_id``'s gate items on its starting and candidate models and apply ``cfg``'s floors
    (the service's defaults unless given)."""
    cfg = cfg or GateConfig()
    m = BatchManifest.from_json(store.read_text(store.batch_key(batch_id, "manifest.json")))
    items = load_items(localize(m.dataset_uri, store.endpoint_url))
    sets = m.item_sets(items)
    correct: dict[str, dict[str, bool]] = {}
    said: dict[str, dict[str, str]] = {}  # greedy answers on the kept sets, in the order the service asks them
    kept = list({it.item_id: it for name in ("retain", "utility") for it in sets.get(name, ())}.values())
    for which, uri in (("before", m.base_uri), ("after", store.uri(store.batch_key(batch_id, "edited")))):
        loaded = load_model(uri, device="cpu", endpoint_url=store.endpoint_url)
        loaded.model.eval()
        flat = list({it.item_id: it for its in sets.values() for it in its}.values())
        correct[which] = dict(zip((it.item_id for it in flat),
                                  score_items(loaded.model, loaded.processor, items, flat), strict=True))
        said[which] = dict(zip((it.item_id for it in kept),
                               generate_answers(loaded.model, loaded.processor, items, kept), strict=True))
    v = Verdict(scores={})
    _generation(v, sets, said, cfg)
    floors = {"retain": cfg.min_retention, "utility": cfg.min_utility}
    for name, its in sets.items():
        for modality in sorted({it.modality for it in its}):
            ids = [it.item_id for it in its if it.modality == modality]
            b, a = _mean([correct["before"][i] for i in ids]), _mean([correct["after"][i] for i in ids])
            v.scores[(name, modality)] = (len(ids), b, a)
            if name in floors and b > 0 and a / b < floors[name]:
                v.below.append(f"{name} {modality}")
            chance = _mean([1 / len(it.options) if it.options else 0.0 for it in its if it.modality == modality])
            if name == "earlier" and a - max(b, chance) > cfg.max_relapse:  # back to chance is not coming back
                v.below.append(f"earlier {modality}")
    request_of = m.request_of()
    for request in m.accepted:
        mine = [it for it in sets["forget"] if request_of[it.item_id] == request]
        for modality in sorted({it.modality for it in mine}):
            ids = [it.item_id for it in mine if it.modality == modality]
            b, a = _mean([correct["before"][i] for i in ids]), _mean([correct["after"][i] for i in ids])
            if b == 0 or (b - a) / b < cfg.min_forgetting:
                v.not_forgotten.setdefault(request, []).append(modality)
    v.published = not v.below and not v.low_generation and len(v.not_forgotten) < len(m.accepted)
    return v


def _generation(v: Verdict, sets: dict[str, list[Any]], said: dict[str, dict[str, str]], cfg: GateConfig) -> None:
    """Each kept set's mean ROUGE-L per modality, the edited model's answers against the starting model's (the
    same text scores 1, even an empty answer), and which are under ``min_generation``."""
    for name in ("retain", "utility"):
        its = sets.get(name, [])
        for modality in sorted({it.modality for it in its}):
            figures = [1.0 if said["after"][it.item_id] == said["before"][it.item_id]
                       else rouge_l(said["after"][it.item_id], said["before"][it.item_id])
                       for it in its if it.modality == modality
                       and generation_match(it.answer, said["before"][it.item_id])]  # what it said right
            if not figures:
                continue
            v.generation[(name, modality)] = (len(figures), sum(figures) / len(figures))
            if v.generation[(name, modality)][1] < cfg.min_generation:
                v.low_generation.append(f"{name} {modality}")


def check(store: ServiceStore, batch_id: str, gate: dict[str, Any], v: Verdict, version: str) -> None:
    """The service's gate record and request records agree with ``v``: same scores, same verdict, each request
    ``done`` on ``version`` exactly when the batch was published and it forgot its own people, else ``failed``
    with the reason naming the floor it missed."""
    cfg = GateConfig()
    assert gate["config"] == cfg.to_dict(), gate["config"]  # the service's own floors, nothing overridden
    got = {(s["items"], s["modality"]): (s["n"], s["before"], s["after"]) for s in gate["scores"]}
    assert got.keys() == v.scores.keys(), (got, v.scores)
    for key, (n, b, a) in v.scores.items():
        assert got[key][0] == n and abs(got[key][1] - b) < 1e-9 and abs(got[key][2] - a) < 1e-9, (key, got[key],
                                                                                                  (n, b, a))
    gen = {(g["items"], g["modality"]): (g["n"], g["rouge_l"]) for g in gate["generation"]}
    assert gen.keys() == v.generation.keys(), (gen, v.generation)
    for key, (n, rouge) in v.generation.items():
        assert gen[key][0] == n and abs(gen[key][1] - rouge) < 1e-9, (key, gen[key], (n, rouge))
    assert gate["passed"] == v.published, (gate["reasons"], v)
    m = BatchManifest.from_json(store.read_text(store.batch_key(batch_id, "manifest.json")))
    for request in m.accepted:
        record = store.get(request)
        assert bool(gate["per_request"][request]["passed"]) == (request not in v.not_forgotten), (request, gate)
        if v.published and request not in v.not_forgotten:
            assert record.state == "done" and record.model_version == version, record
            continue
        assert record.state == "failed" and record.reason.startswith("gate: "), record
        if request in v.not_forgotten:  # the service names the first modality under the floor
            assert any(f"{modality}: forgetting rate" in record.reason for modality in v.not_forgotten[request])
            assert f"< {cfg.min_forgetting:.3f}" in record.reason, record.reason
        if not v.published:
            floors = {"retain": cfg.min_retention, "utility": cfg.min_utility}
            for kept in v.below:
                name, modality = kept.split()
                limit = (f"> {cfg.max_relapse:.3f}" if name == "earlier" else
                         f"{kept}: retention {got[(name, modality)][2] / got[(name, modality)][1]:.3f} < "
                         f"{floors[name]:.3f}")
                assert limit in record.reason, (limit, record.reason)
            for kept in v.low_generation:
                name, modality = kept.split()
                limit = f"{kept}: generation ROUGE-L {gen[(name, modality)][1]:.3f} < {cfg.min_generation:.3f}"
                assert limit in record.reason, (limit, record.reason)
    assert store.current_version(m.target_model) == (version if v.published else m.base_version)


__all__ = ["Verdict", "check", "measure"]
