"""Planning a batch for a model registered with keep-sets: requests about people -> the batch's own item table.

No benchmark is read here. What the batch edits and measures comes from three places only:

- the requests: each person's probes (``probes``: the model's templates answered by the model itself), their
  known facts, explicit questions; a plain subject id names a person of the registered retain set, whose
  retain facts are then edited (the convenience the demo's benchmark ids rely on);
- the registered retain set: a seeded sample of *other* people's facts, half held against the edit, half scored
  by the gate (anyone named by a request of the batch is left out);
- the registered utility set: general questions, split the same way.

All of it is written as one item table (``mip-items/1``) under ``batches/<id>/items/``: attribution actors, the
edit job and the scoring actors read that, and nothing else. The candidate probes (``candidates/``) and the
audit table ``probes.parquet`` stay beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from mip_core.benchmark.schema import Item
from mip_core.errors import InputError
from mip_core.modeling.io import localize
from mip_core.parquet_io import parquet_bytes

from .batch import EARLIER_LIMIT, BatchManifest
from .images import check_image_bytes, read_image_ref
from .forgotten import Forgotten
from .items import ITEMSET_FILE, ItemTable, image_relpath, load_item_table, read_item_table, write_item_table
from .keepsets import keepset_subjects, read_templates
from .probes import MIN_CONFIDENCE, Probe, build_candidates, no_probe_reason, person_key, probes_table, select_probes
from .requests import ForgetRequest, Person, norm_text
from .resolve import kept_split, seeded_sample, seeded_sample_by
from .store import ServiceStore

Answerer = Callable[[str, Sequence[str]], Mapping[str, tuple[str, float]]]
"""``(item table URI, item ids) -> {item_id: (greedy answer, confidence)}``: the target model answering, where
it lives (a Ray actor in the service)."""


@dataclass(frozen=True)
class KeepSets:
    """A model version's registered keep-sets, opened: retain (other people's facts), utility, templates."""

    retain: ItemTable
    utility: ItemTable
    templates: tuple[Any, ...]
    people: Mapping[str, str]  # retain subject id -> name
    scores_key: str  # the cached scores of a version are valid for these keep-sets

    @classmethod
    def open(cls, keepsets: Mapping[str, str], endpoint_url: str | None) -> KeepSets:
        retain = load_item_table(localize(keepsets["retain"], endpoint_url))
        utility = load_item_table(localize(keepsets["utility"], endpoint_url))
        templates = tuple(read_templates(keepsets["templates"], endpoint_url))
        return cls(retain, utility, templates, keepset_subjects(retain),
                   f"{keepsets['retain']}|{keepsets['utility']}")


def _photos(store: ServiceStore, request: ForgetRequest, i: int, person: Person) -> list[bytes]:
    return [read_image_ref(ref, f"subjects[{i}].photos[{j}]", endpoint_url=store.endpoint_url)
            for j, ref in enumerate(person.photos)]


def _question_probes(request: ForgetRequest, store: ServiceStore) -> tuple[list[Probe], dict[str, bytes], list[str]]:
    """Explicit ``items``: a question (with its answer, or answered by the model) is a probe; item ids name
    benchmark entries this model has none of."""
    probes, images, problems = [], {}, []
    for k, spec in enumerate(request.items):
        if spec.item_id is not None or spec.question is None:
            problems.append(f"items[{k}].item_id: {spec.item_id!r} names a benchmark item, but this model is "
                            "registered with keep-sets, not a benchmark; give the question instead")
            continue
        rel = None
        if spec.image is not None:
            data = read_image_ref(spec.image, f"items[{k}].image", endpoint_url=store.endpoint_url)
            rel = image_relpath(data, check_image_bytes(data, f"items[{k}].image").ext)
            images[rel] = data
        probes.append(Probe(probe_id=f"{request.request_id}.q{k:03d}", request_id=request.request_id,
                            subject=spec.question, person_key=f"{request.request_id}.q{k}",
                            use="edit", source="fact" if spec.answer else "question", fact="question",
                            modality="text" if rel is None else "multimodal", question=spec.question, image=rel,
                            answer=spec.answer or "?"))
    return probes, images, problems


def candidates_for(request: ForgetRequest, store: ServiceStore, keep: KeepSets
                   ) -> tuple[list[Probe], dict[str, bytes], list[Item], list[str]]:
    """``(candidate probes, their images, retain facts of named subject ids, problems)`` of one request."""
    probes, images, problems = _question_probes(request, store)
    named: list[Item] = []
    for i, subject in enumerate(request.subjects):
        if isinstance(subject, str):
            own = [it for it in keep.retain.items if it.profile_id == subject]
            if not own:
                problems.append(f"subjects[{i}]: {subject!r} is not a person of the registered retain set; name the "
                                "person instead ({\"name\": ..., \"photos\": [...]})")
            named += own
            continue
        found, shown = build_candidates(request, i, subject, _photos(store, request, i, subject), keep.templates)
        probes += found
        images.update(shown)
    return probes, images, named, problems


def named_people(requests: Iterable[ForgetRequest], keep: KeepSets) -> set[str]:
    """Retain subject ids the requests name (by id, name or alias): kept out of the retain sample."""
    by_name: dict[str, set[str]] = {}
    for pid, name in keep.people.items():
        by_name.setdefault(norm_text(name), set()).add(pid)
    out: set[str] = set()
    for req in requests:
        for s in req.subjects:
            if isinstance(s, str):
                out.add(s)
            else:
                for name in (s.name, *s.aliases):
                    out |= by_name.get(norm_text(name), set())
    return out


def _image_bytes(table: ItemTable, items: Iterable[Item]) -> dict[str, bytes]:
    return {it.image: (table.root / it.image).read_bytes() for it in items if it.image is not None}


def plan_people_batch(store: ServiceStore, batch_id: str, requests: Sequence[ForgetRequest],
                      keepsets: Mapping[str, str], answer: Answerer, *, target_model: str, base_version: str,
                      base_uri: str, rejected: Mapping[str, str], retain_limit: int = 120,
                      edit_retain_limit: int | None = None,
                      utility_limit: int = 50, seed: int = 0,
                      min_confidence: float = MIN_CONFIDENCE, forgotten: Forgotten | None = None,
                      earlier_limit: int = EARLIER_LIMIT, asked: Sequence[ForgetRequest] = (),
                      log: Callable[[str], Any] = print) -> BatchManifest:
    """Probe, select and write the batch's item table; returns the manifest (not yet written).

    ``forgotten``: what earlier versions of the lineage forgot; their people leave the kept sets and a sample of
    ``earlier_limit`` of their forget items joins the gate (``mip_core.service.forgotten``). ``asked``: the
    model's other requests (``forgotten.asked_elsewhere``); their people leave the kept sets too."""
    keep = KeepSets.open(keepsets, store.endpoint_url)
    rejected = dict(rejected)
    todo = [r for r in requests if r.request_id not in rejected]
    candidates: list[Probe] = []
    images: dict[str, bytes] = {}
    named: dict[str, list[Item]] = {}
    for req in todo:
        found, shown, own, problems = candidates_for(req, store, keep)
        if problems:
            rejected[req.request_id] = "; ".join(problems)
            continue
        candidates += found
        images.update(shown)
        named[req.request_id] = own
    table_uri = write_item_table(store, store.batch_key(batch_id, "candidates"), [p.item() for p in candidates],
                                 images)
    log(f"plan: {len(candidates)} candidate probes about {sum(len(r.subjects) for r in todo)} subject(s); the "
        "target model answers them")
    answers = answer(table_uri, [p.probe_id for p in candidates]) if candidates else {}
    probes = select_probes(candidates, answers, min_confidence)
    store.write_bytes(store.batch_key(batch_id, "probes.parquet"), parquet_bytes(probes_table(probes), "zstd"))
    for req in todo:
        if req.request_id in rejected:
            continue
        for i, subject in enumerate(req.subjects):
            if isinstance(subject, str):
                continue
            mine = [p for p in probes if p.person_key == person_key(req.request_id, i)]
            why = no_probe_reason(mine, min_confidence)
            if why is not None:
                rejected[req.request_id] = f"subjects[{i}]: {why}"
        if req.request_id not in rejected and not named[req.request_id] and not any(
                p.kept and p.use == "edit" and p.request_id == req.request_id for p in probes):
            rejected[req.request_id] = ("none of the request's questions is answered confidently by the model "
                                        "(probes.parquet lists them): nothing measurable to forget")
    return _manifest(store, batch_id, requests, probes, named, keep, images, rejected,
                     target_model=target_model, base_version=base_version, base_uri=base_uri,
                     retain_limit=retain_limit, edit_retain_limit=edit_retain_limit, utility_limit=utility_limit,
                     seed=seed,
                     forgotten=forgotten or Forgotten((), ()), earlier_limit=earlier_limit, asked=asked)


def _manifest(store: ServiceStore, batch_id: str, requests: Sequence[ForgetRequest], probes: Sequence[Probe],
              named: Mapping[str, list[Item]], keep: KeepSets, images: Mapping[str, bytes],
              rejected: Mapping[str, str], *, target_model: str, base_version: str, base_uri: str,
              retain_limit: int, edit_retain_limit: int | None, utility_limit: int, seed: int, forgotten: Forgotten,
              earlier_limit: int,
              asked: Sequence[ForgetRequest] = ()) -> BatchManifest:
    """The batch's item table (kept probes, named subjects' facts, kept-set samples, earlier-forgotten people's
    items) and its manifest."""
    accepted = [r for r in requests if r.request_id not in rejected]
    kept = [p for p in probes if p.kept and p.request_id not in rejected]
    own = {r.request_id: [p.item() for p in kept if p.request_id == r.request_id and p.use == "edit"]
           + named[r.request_id] for r in accepted}  # every item of each request, shared ones included
    forget: dict[str, tuple[Item, str]] = {}  # item id -> (item, request); request order
    for rid, mine in own.items():  # an item two requests share (a retain fact named twice) goes to the first
        for it in mine:
            forget.setdefault(it.item_id, (it, rid))
    held_out = [(p.item(), p.request_id) for p in kept if p.use == "held_out"]
    skip = named_people([*accepted, *forgotten.requests, *asked], keep)  # to forget, forgotten, or asked about
    held, scored = kept_split([it for it in keep.retain.items if it.profile_id not in skip], retain_limit,
                              edit_retain_limit, seed)
    others = held + scored
    utility = seeded_sample(list(keep.utility.items), 2 * utility_limit, seed)
    named_items = [it for it, _ in forget.values() if it.profile_id in keep.people]  # retain facts, not probes
    taken = {it.item_id for it, _ in [*forget.values(), *held_out]}
    earlier, earlier_images = _earlier_items(store, forgotten, earlier_limit, seed, taken)
    items = [it for it, _ in forget.values()] + [it for it, _ in held_out] + others + utility + [
        it for it, _ in earlier]
    ids = [it.item_id for it in items]
    if len(set(ids)) != len(ids):
        raise InputError(f"batch {batch_id}: item ids repeat across probes and keep-sets "
                         f"({sorted({i for i in ids if ids.count(i) > 1})[:5]}); give the keep-set rows unique "
                         "item_id values that do not look like request ids")
    shown = {**_image_bytes(keep.retain, others + named_items),
             **_image_bytes(keep.utility, utility), **images, **earlier_images}
    used = {it.image for it in items if it.image is not None}
    dataset_uri = write_item_table(store, store.batch_key(batch_id, "items"), items,
                                   {rel: data for rel, data in shown.items() if rel in used})
    return BatchManifest(
        batch_id=batch_id, target_model=target_model, base_version=base_version, base_uri=base_uri,
        dataset_uri=dataset_uri, requests=tuple(r.request_id for r in requests), rejected=dict(rejected),
        forget=tuple((it.item_id, rid) for it, rid in forget.values()),
        items_of={rid: tuple(it.item_id for it in mine) for rid, mine in own.items()},
        edit_retain=tuple([it.item_id for it in held] + [it.item_id for it in utility[0::2]]),
        eval_retain=tuple(it.item_id for it in scored), eval_utility=tuple(it.item_id for it in utility[1::2]),
        eval_test=tuple(it.item_id for it, _ in held_out), held_out=tuple((it.item_id, r) for it, r in held_out),
        scores_dataset=keep.scores_key, eval_earlier=tuple((it.item_id, rid) for it, rid in earlier))


def _earlier_items(store: ServiceStore, forgotten: Forgotten, limit: int, seed: int, taken: set[str]
                   ) -> tuple[list[tuple[Item, str]], dict[str, bytes]]:
    """A seeded sample of the earlier-forgotten items, read back from their batches' item tables, with their
    images; items this batch forgets again are left to it."""
    picked = [(i, rid, batch) for i, rid, batch in forgotten.items if i not in taken]
    picked = seeded_sample_by(picked, itemgetter(1), limit, seed)  # per request: each person judged on their own
    out: list[tuple[Item, str]] = []
    images: dict[str, bytes] = {}
    for batch in dict.fromkeys(batch for _, _, batch in picked):
        key = store.batch_key(batch, "items")
        if not store.exists(f"{key}/{ITEMSET_FILE}"):  # a batch planned against a benchmark has no table
            continue
        table = read_item_table(store, key)
        by_id = {it.item_id: it for it in table.items}
        mine = [(by_id[i], rid) for i, rid, b in picked if b == batch and i in by_id]
        out += mine
        images.update(_image_bytes(table, [it for it, _ in mine]))
    return out, images


__all__ = ["Answerer", "KeepSets", "candidates_for", "named_people", "plan_people_batch"]
