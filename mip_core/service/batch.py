"""A batch: the claimed requests of one target model, resolved into the items to attribute, edit and evaluate.

The manifest is written once when the batch is planned and is the only input the later steps need besides the
storage root, so any step can be rerun from it. It holds ids, never the personal data being forgotten.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

from mip_core.benchmark import Benchmark, Item
from mip_core.errors import InputError
from mip_core.service.resolve import kept_split, resolve_requests, retain_items, seeded_sample_by

MANIFEST_VERSION = 1
#: Earlier-forgotten items the gate re-checks per batch, spread evenly over the people (a sample: the gate's and the
#: edit's checks grow with it, not with the lineage). Each person is judged on their own items, so they need
#: several: all 11 of each of 10 people, about 4 each for the 31 of a night of 32 one-person requests. With 60
#: (2 to 6 a person on the fifth night of 4), a person answered again on 7 of 11 items passed (BENCHMARKS.md
#: section 10).
EARLIER_LIMIT = 120


@dataclass(frozen=True)
class BatchManifest:
    batch_id: str
    target_model: str
    base_version: str  # the published version the edit starts from
    base_uri: str  # its weights
    dataset_uri: str  # the benchmark the model was trained on (items, images)
    requests: tuple[str, ...]  # every claimed request, rejected ones included
    rejected: dict[str, str]  # request id -> why it cannot be processed (marked failed at once)
    forget: tuple[tuple[str, str], ...]  # (item_id, request_id) to attribute and edit; a shared item once
    items_of: dict[str, tuple[str, ...]]  # request id -> all its item ids, shared ones included
    edit_retain: tuple[str, ...]  # other people's and general-knowledge items the edit holds against
    eval_retain: tuple[str, ...]  # other people's items the gate scores (disjoint from edit_retain)
    eval_utility: tuple[str, ...]  # general-knowledge items the gate scores (disjoint from edit_retain)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    version: int = MANIFEST_VERSION
    eval_test: tuple[str, ...] = ()  # the forget facts asked another way (held out): does forgetting generalise
    held_out: tuple[tuple[str, str], ...] = ()  # (eval_test item id, request id): held-out figures per request
    scores_dataset: str = ""  # what cached per-version scores are keyed on (default: dataset_uri)
    #: (item id, request id) of people earlier versions of the lineage forgot: the gate checks they stay forgotten
    eval_earlier: tuple[tuple[str, str], ...] = ()

    @property
    def accepted(self) -> list[str]:
        """Requests with at least one item to forget, in claim order."""
        return [r for r in self.requests if r not in self.rejected]

    def request_of(self) -> dict[str, str]:
        """item id -> request id, for the forget items and the held-out ones, and for the earlier-forgotten items
        the request an earlier batch closed (the gate judges those people one by one)."""
        return dict(self.eval_earlier) | dict(self.held_out) | dict(self.forget)

    @property
    def scores_key(self) -> str:
        return self.scores_dataset or self.dataset_uri

    def item_sets(self, bench: Benchmark) -> dict[str, list[Item]]:
        """The gate's item sets, as benchmark items."""
        by_id = {it.item_id: it for it in bench.items}
        sets = {"forget": [by_id[i] for i, _ in self.forget], "test": [by_id[i] for i in self.eval_test],
                "retain": [by_id[i] for i in self.eval_retain], "utility": [by_id[i] for i in self.eval_utility],
                "earlier": [by_id[i] for i, _ in self.eval_earlier]}
        return {name: items for name, items in sets.items() if items or name not in ("test", "earlier")}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> BatchManifest:
        data = json.loads(text)
        if data.get("version") != MANIFEST_VERSION:
            raise InputError(f"batch manifest version {data.get('version')!r} is not {MANIFEST_VERSION}; "
                             "re-plan the batch with this release")
        data["requests"] = tuple(data["requests"])
        data["forget"] = tuple(tuple(p) for p in data["forget"])
        data["held_out"] = tuple(tuple(p) for p in data.get("held_out", ()))
        data["eval_earlier"] = tuple(tuple(p) for p in data.get("eval_earlier", ()))
        for name in ("edit_retain", "eval_retain", "eval_utility", "eval_test"):
            data[name] = tuple(data.get(name, ()))  # eval_test: absent from manifests written before it
        data["items_of"] = {k: tuple(v) for k, v in data["items_of"].items()}
        return cls(**data)


def unknown_versions(requests: Sequence[Any], target_model: str, versions: Sequence[str] | None
                     ) -> dict[str, str]:
    """Requests naming a ``target_version`` the model does not have -> why they are rejected."""
    return {r.request_id: (f"target_version {r.target_version!r} is not a version of {target_model} (versions: "
                           f"{', '.join(versions or [])}); resubmit without it (the current version) or with one "
                           "of those")
            for r in requests if versions is not None and r.target_version not in (None, *versions)}


def plan_batch(batch_id: str, request_records: Sequence[Any], *, target_model: str, base_version: str,
               base_uri: str, dataset_uri: str, bench: Benchmark, retain_limit: int = 120,
               edit_retain_limit: int | None = None,
               utility_limit: int = 50, seed: int = 0, versions: Sequence[str] | None = None,
               forgotten: Sequence[tuple[str, str]] = (), earlier_limit: int = EARLIER_LIMIT,
               asked: Sequence[Any] = ()) -> BatchManifest:
    """Resolve claimed requests against the model's dataset; unresolvable ones are rejected, never dropped.

    ``versions``: the model's published versions; a request naming another ``target_version`` is rejected.
    ``forgotten``: (item id, request id) that earlier versions of the lineage forgot: their people leave the kept
    sets, and a seeded sample of ``earlier_limit`` of them is what the gate re-checks (``service.forgotten``).
    ``retain_limit``: other people's items the gate scores; ``edit_retain_limit``: how many others the edit holds
    against (None: as many; ``resolve.kept_split``). ``asked``: the model's other requests
    (``forgotten.asked_elsewhere``): their people leave the kept sets too."""
    requests = [rec.request for rec in request_records]
    unknown_version = unknown_versions(requests, target_model, versions)
    resolved = resolve_requests([r for r in requests if r.request_id not in unknown_version], bench)
    by_id = {it.item_id: it for it in bench.items}
    earlier = [(i, rid) for i, rid in forgotten if i in by_id]
    gone = {by_id[i].profile_id for i, _ in earlier} - {None}
    gone |= {s for r in asked for s in r.subjects if isinstance(s, str)}  # profile ids other requests name
    # Held-out evaluation: the gate scores other people's and general-knowledge items the edit never saw, so a
    # retention measured on what RMisU was told to keep cannot flatter the edit.
    held, scored = kept_split(retain_items(bench, set(resolved.forget_profiles) | gone, None, seed), retain_limit,
                              edit_retain_limit, seed)
    utility = [it.item_id for it in bench.items if it.kind == "utility"][: 2 * utility_limit]
    facts: dict[tuple[str | None, str, str], str] = {}  # a forget fact -> the request that asked for it first
    for it, rid in resolved.forget:
        facts.setdefault((it.profile_id, it.fact, it.modality), rid)
    held_out = [(it.item_id, facts[key]) for it in bench.items
                if it.kind == "test" and (key := (it.profile_id, it.fact, it.modality)) in facts]
    facts_ids = {it.item_id for it, _ in resolved.forget} | {i for i, _ in held_out}  # forgotten again here
    return BatchManifest(
        batch_id=batch_id, target_model=target_model, base_version=base_version, base_uri=base_uri,
        dataset_uri=dataset_uri, requests=tuple(r.request_id for r in requests),
        rejected={**unknown_version, **resolved.rejected},
        forget=tuple((it.item_id, rid) for it, rid in resolved.forget),
        items_of={rid: tuple(ids) for rid, ids in resolved.items_of.items() if rid not in resolved.rejected},
        edit_retain=tuple([it.item_id for it in held] + utility[0::2]),
        eval_retain=tuple(it.item_id for it in scored), eval_utility=tuple(utility[1::2]),
        eval_test=tuple(i for i, _ in held_out), held_out=tuple(held_out),
        # spread over the requests that forgot them: each person is judged on their own items
        eval_earlier=tuple(seeded_sample_by([p for p in earlier if p[0] not in facts_ids], itemgetter(1),
                                            earlier_limit, seed)))


__all__ = ["EARLIER_LIMIT", "MANIFEST_VERSION", "BatchManifest", "plan_batch", "unknown_versions"]
