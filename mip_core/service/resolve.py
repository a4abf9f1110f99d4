"""Forget requests -> the benchmark items a batch edits and evaluates, and why a request cannot be processed.

The service only edits what it can evaluate: a subject must be a profile of the benchmark, and an explicit
item must be one of its items (by id, or by its question). A request with anything unresolvable is rejected
whole (never half-done behind the requester's back); the other requests of the batch proceed.

An item's ``image`` that is a file (the store's copy made at submit, or any URI/absolute path) is matched by
decoded pixels against the dataset's images; a dataset image name (``images/p0003.png``) is matched by name.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from mip_core.benchmark import Benchmark, Item
from mip_core.errors import InputError

from .images import REF_HINT, check_image_bytes, is_file_ref, pixel_digest, read_image_ref
from .requests import ForgetItem, ForgetRequest, norm_text

SUBJECT_KINDS: tuple[str, ...] = ("qa",)
"""Item kinds a subject resolves to: its ``qa`` items, i.e. exactly what the benchmark's forget split holds.

Its ``test`` items (paraphrased questions, transformed images) stay out of the edit so the release gate can
measure whether forgetting generalises; pass ``kinds=("qa", "test")`` to edit every non-utility item of the
subject.
"""
ITEM_KINDS: tuple[str, ...] = ("qa", "test")
"""Kinds an explicit item may name: facts about a person; utility items (general ability) are not."""

T = TypeVar("T")


@dataclass(frozen=True)
class ResolvedBatch:
    """What a batch edits: ``forget`` is (item, request_id) in request order then benchmark table order.

    An item asked for by several requests appears once, attributed to the first request (earlier submitted);
    the later request is still ``accepted`` (its facts are forgotten by the same edit), and ``items_of`` lists
    every item of each accepted request, shared ones included: judge a request's outcome on ``items_of``.
    """

    forget: tuple[tuple[Item, str], ...]
    rejected: dict[str, str] = field(default_factory=dict)  # request_id -> why it cannot be processed
    accepted: tuple[str, ...] = ()  # request ids that proceed, in request order
    items_of: dict[str, tuple[str, ...]] = field(default_factory=dict)  # accepted request_id -> its item ids

    @property
    def items(self) -> list[Item]:
        return [it for it, _ in self.forget]

    @property
    def request_of(self) -> dict[str, str]:
        """item_id -> request_id (what ``unlearn_data(requests=...)`` and attribution lineage take)."""
        return {it.item_id: rid for it, rid in self.forget}

    @property
    def forget_profiles(self) -> frozenset[str]:
        return frozenset(it.profile_id for it, _ in self.forget if it.profile_id is not None)


def _image_matches(wanted: str, image: str | None) -> bool:
    if image is None:
        return False
    w = wanted.removeprefix("file://").replace("\\", "/")
    return w == image or w.endswith("/" + image) or os.path.basename(w) == os.path.basename(image)


def _few(ids: Iterable[str], n: int = 5) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


class _Index:
    def __init__(self, bench: Benchmark, read_image: Callable[[str], bytes] | None = None) -> None:
        self.bench = bench
        self.read_image = read_image
        self.images = sorted({it.image for it in bench.items if it.image is not None})
        self._dataset_digests: dict[str, str] = {}  # dataset image path -> pixel digest, decoded once per call
        self._ref_digests: dict[tuple[str, str], tuple[str | None, str | None]] = {}  # -> (digest, problem)
        self.by_id = {it.item_id: it for it in bench.items}
        self.order = {it.item_id: i for i, it in enumerate(bench.items)}
        self.by_question: dict[str, list[Item]] = {}
        for it in bench.items:
            if it.kind in ITEM_KINDS:
                self.by_question.setdefault(norm_text(it.question), []).append(it)
        self.profiles = {p.profile_id for p in bench.profiles}

    def item(self, spec: ForgetItem, where: str) -> tuple[Item | None, str | None]:
        """The one item ``spec`` names, or an error saying why not."""
        if spec.item_id is not None:
            it = self.by_id.get(spec.item_id)
            if it is None:
                return None, (f"{where}: item_id {spec.item_id!r} is not in the dataset; give a known item "
                              "id or its question")
            if it.kind not in ITEM_KINDS:
                return None, (f"{where}: item {it.item_id!r} is a {it.kind} item (general ability), not a "
                              "fact about a person; only personal facts are forgotten")
            if spec.question is not None and norm_text(spec.question) != norm_text(it.question):
                return None, (f"{where}: item {it.item_id!r} asks {it.question!r}, not {spec.question!r}; "
                              "give one of them")
            return it, None
        assert spec.question is not None  # ForgetItem guarantees item_id or question
        candidates = self.by_question.get(norm_text(spec.question), [])
        if not candidates:
            return None, (f"{where}: question {spec.question!r} is not in the dataset (the service only "
                          "edits what it can evaluate); give the exact question or an item_id")
        if spec.image is not None:
            candidates, problem = self._by_image(spec.image, candidates, f"{where}.image")
            if problem is not None:
                return None, problem
        if spec.answer is not None:
            candidates = [c for c in candidates if norm_text(c.answer) == norm_text(spec.answer)]
        if not candidates:
            return None, (f"{where}: no item asks {spec.question!r} with that image/answer; check them or "
                          "give an item_id")
        if len(candidates) > 1:
            return None, (f"{where}: question {spec.question!r} matches {len(candidates)} items "
                          f"({_few(c.item_id for c in candidates)}); add `image` or `answer`, or give an "
                          "item_id")
        return candidates[0], None

    def _by_image(self, ref: str, candidates: list[Item], field: str) -> tuple[list[Item], str | None]:
        """The candidates showing image ``ref``: by pixels for a file, by name for a dataset image name."""
        if is_file_ref(ref, None):
            digest, problem = self._ref_digest(ref, field)
            if problem is not None:
                return [], problem
            return [c for c in candidates if c.image and self._dataset_digest(c.image) == digest], None
        if not any(_image_matches(ref, img) for img in self.images):
            example = next((c.image for c in candidates if c.image), self.images[0] if self.images else None)
            return [], (f"{field} {ref!r} is neither a readable image file nor an image of the dataset "
                        f"(e.g. {example or 'images/p0003.png'}); {REF_HINT}")
        return [c for c in candidates if _image_matches(ref, c.image)], None

    def _ref_digest(self, ref: str, field: str) -> tuple[str | None, str | None]:
        """Pixel digest of the image file ``ref``, or why it cannot be used (read, then validated as at submit)."""
        key = (ref, field)
        if key not in self._ref_digests:
            try:
                self._ref_digests[key] = (check_image_bytes(self._read(ref, field), field).pixel_sha256, None)
            except InputError as exc:
                self._ref_digests[key] = (None, str(exc))
        return self._ref_digests[key]

    def _read(self, ref: str, field: str) -> bytes:
        if self.read_image is None:
            return read_image_ref(ref, field)
        try:
            return self.read_image(ref)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise InputError(f"{field}: cannot read image {ref!r}: {type(exc).__name__}: {exc}; {REF_HINT}"
                             ) from None

    def _dataset_digest(self, image: str) -> str:
        if image not in self._dataset_digests:
            self._dataset_digests[image] = pixel_digest(self.bench.load_image(image))
        return self._dataset_digests[image]


def resolve_requests(
    requests: Sequence[ForgetRequest], bench: Benchmark, *, kinds: Sequence[str] = SUBJECT_KINDS,
    read_image: Callable[[str], bytes] | None = None,
) -> ResolvedBatch:
    """Resolve ``requests`` (in the order given: pass them oldest first) against ``bench``.

    A subject resolves to its items of ``kinds`` (``item.profile_id == subject``). Rejected: unknown subjects,
    unknown or ambiguous explicit items, image files that are missing, corrupt, oversized or in a wrong format,
    image names the dataset does not have, requests that resolve to no item at all. ``read_image`` reads an
    image file ref (default: :func:`~mip_core.service.images.read_image_ref`, S3 endpoint from the
    environment); a dataset image that fails its manifest check is a broken dataset, not a bad request: that
    error propagates.
    """
    index = _Index(bench, read_image)
    forget: list[tuple[Item, str]] = []
    taken: set[str] = set()
    rejected: dict[str, str] = {}
    accepted: list[str] = []
    items_of: dict[str, tuple[str, ...]] = {}
    by_profile: dict[str, list[Item]] = {}
    for it in bench.items:
        if it.profile_id is not None and it.kind in kinds:
            by_profile.setdefault(it.profile_id, []).append(it)

    for req in requests:
        rid = req.request_id
        if rid in rejected or rid in accepted:  # the same request twice: resolved once
            continue
        problems: list[str] = [
            f"subjects[{i}]: a person by name ({s.name!r}) needs the model registered with keep-sets (`mip models "
            "register --retain --utility`), which build probes from names and photos; this model was registered "
            "with its benchmark: name the benchmark's profile id, or register the model with keep-sets"
            for i, s in enumerate(req.subjects) if not isinstance(s, str)]
        ids = [s for s in req.subjects if isinstance(s, str)]
        unknown = [s for s in ids if s not in index.profiles]
        if unknown:
            problems.append(f"unknown subjects {unknown}: entity ids of this dataset are "
                            f"{_few(index.profiles)}")
        mine: dict[str, Item] = {}
        for s in ids:
            for it in by_profile.get(s, []):
                mine.setdefault(it.item_id, it)
        for k, spec in enumerate(req.items):
            it, problem = index.item(spec, f"items[{k}]")
            if problem is not None:
                problems.append(problem)
            elif it is not None:
                mine.setdefault(it.item_id, it)
        if not problems and not mine:
            problems.append("resolves to no item of the dataset (its subjects have no facts to forget)")
        if problems:
            rejected[rid] = "; ".join(problems)
            continue
        accepted.append(rid)
        ordered = sorted(mine.values(), key=lambda i: index.order[i.item_id])
        items_of[rid] = tuple(it.item_id for it in ordered)
        for it in ordered:
            if it.item_id not in taken:
                taken.add(it.item_id)
                forget.append((it, rid))
    return ResolvedBatch(forget=tuple(forget), rejected=rejected, accepted=tuple(accepted), items_of=items_of)


def retain_items(
    bench: Benchmark, forget_profiles: Iterable[str], limit: int | None, seed: int, *,
    kinds: Sequence[str] = SUBJECT_KINDS,
) -> list[Item]:
    """Up to ``limit`` items of ``kinds`` of every *other* profile: a seeded sample, in table order."""
    skip = set(forget_profiles)
    pool = [it for it in bench.items if it.profile_id is not None and it.profile_id not in skip
            and it.kind in kinds]
    return seeded_sample(pool, limit, seed)


def kept_split(pool: Sequence[T], eval_limit: int, edit_limit: int | None, seed: int) -> tuple[list[T], list[T]]:
    """``(what the edit holds against, what the gate scores)`` of a kept-set pool, disjoint, each in pool order.

    ``edit_limit`` None: a seeded sample of ``2 * eval_limit`` alternately to each (the gate's held-out items and
    the edit's are as many). Otherwise the gate's ``eval_limit`` items are drawn first and the edit holds against
    up to ``edit_limit`` of the rest: the gate's cost stays, and the edit protects more of the people it must keep
    (every step draws a few retain examples whatever the pool: a larger one costs the encoding and memory of its
    examples)."""
    if edit_limit is None:
        both = seeded_sample(pool, 2 * eval_limit, seed)
        return both[0::2], both[1::2]
    scored_at = set(seeded_sample(range(len(pool)), eval_limit, seed))  # positions: the same draw as the items'
    rest = [x for i, x in enumerate(pool) if i not in scored_at]
    return seeded_sample(rest, edit_limit, seed), [x for i, x in enumerate(pool) if i in scored_at]


def seeded_sample(pool: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """Up to ``limit`` of ``pool`` (None: all), drawn with ``seed``, in the pool's order."""
    if limit is None or limit >= len(pool):
        return list(pool)
    if limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 (or None for all)")
    keep = set(random.Random(seed).sample(range(len(pool)), limit))
    return [it for i, it in enumerate(pool) if i in keep]


def seeded_sample_by(pool: Sequence[T], group: Callable[[T], str], limit: int | None, seed: int) -> list[T]:
    """Up to ``limit`` of ``pool`` spread evenly over its groups (each group's share differs by at most one item;
    a group with fewer gives the rest to the others), drawn with ``seed``, in the pool's order.

    Why: whether one person came back is judged on their own items; a plain sample of the lineage's forgotten
    items gave the 16 people of a fifth night 2 to 6 items each (BENCHMARKS.md section 10)."""
    if limit is None or limit >= len(pool):
        return list(pool)
    if limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 (or None for all)")
    rng = random.Random(seed)
    members: dict[str, list[int]] = {}
    for i, it in enumerate(pool):
        members.setdefault(group(it), []).append(i)
    queues = [rng.sample(ids, len(ids)) for ids in members.values()]
    rng.shuffle(queues)  # which groups get the odd extra item
    keep: set[int] = set()
    while len(keep) < limit:
        for queue in queues:
            if queue and len(keep) < limit:
                keep.add(queue.pop())
    return [it for i, it in enumerate(pool) if i in keep]


__all__ = ["ITEM_KINDS", "SUBJECT_KINDS", "ResolvedBatch", "kept_split", "resolve_requests", "retain_items",
           "seeded_sample", "seeded_sample_by"]
