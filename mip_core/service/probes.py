"""Probes: the questions the service asks the target model about a requested person, and what it answered.

A request names a person (a name, maybe aliases, photos and known facts), not a dataset entry. The service turns
that into items it can edit and measure:

1. :func:`build_candidates`: the model's registered question templates filled with the name (text) or shown
   with each photo (image), split by the template's ``use`` into *edit* probes and *held-out* probes; held-out
   image probes show transformed copies of the photos (crop, colour shift), held-out text probes also ask by
   every alias. Known facts given in the request are edit probes with the given answer.
2. The target model answers every candidate greedily, with a confidence (the geometric mean of its answer's
   token probabilities); this runs where the model lives (``tasks.gate.probe_on_actor``).
3. :func:`select_probes`: a template probe is kept where the model is confident (``min_confidence``) and gives
   the person's answer to its fact: the one most of the fact's confident edit phrasings give, by name and by
   photo together. Known facts are kept whatever the model says (the
   requester says it states them). :func:`no_probe_reason` then decides whether the model knows the
   person at all: by name or by photo, at least ``MIN_CONSISTENT`` of the facts asked in several phrasings must
   get the same answer from each phrasing. Confidence alone does not tell knowledge from invention: asked about a
   name it never saw, the demo model answers at 0.8-1.0 confidence, but each phrasing differently.

Every candidate, kept or not, with its answer, confidence and why it was dropped, is written with the batch as
``probes.parquet`` (schema ``mip-probes/1``), so an auditor sees exactly what was asked.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mip_core.benchmark.images import transform_image
from mip_core.benchmark.schema import Item
from mip_core.errors import InputError
from mip_core.evaluation.metrics import answer_words
from mip_core.parquet_io import SCHEMA_KEY

from .images import check_image_bytes
from .items import image_relpath
from .requests import ForgetRequest, Person

PROBES = "mip-probes/1"
MIN_CONFIDENCE = 0.5
"""A probe is kept when the model's answer has a geometric-mean token probability of at least this: the answer is
the model's clear belief, so its disappearance after the edit is a measured fact, not noise."""
MIN_CONSISTENT = 0.4
"""A person is taken as known when at least this share of the facts asked in several phrasings gets the same
answer from each phrasing. On the demo model (``benches/probe_consistency.py``, text probes): the 100 trained
people average 0.66 and 5 of them fall under 0.4; invented names average 0.36, and 27 of 55 reach 0.4 (mostly
names recombined from trained people's first and last names). Set lower, real requests are refused; higher,
more guesses are edited."""
PHOTO_TRANSFORMS = ("crop", "colour_shift")
PLACEHOLDER = "?"  # the answer of a candidate before the model answered it

PROBES_V1 = pa.schema([pa.field(name, kind, nullable=nullable) for name, kind, nullable in (
    ("probe_id", pa.string(), False), ("request_id", pa.string(), False), ("subject", pa.string(), False),
    ("use", pa.string(), False), ("source", pa.string(), False), ("fact", pa.string(), False),
    ("modality", pa.string(), False), ("question", pa.string(), False), ("image", pa.string(), True),
    ("answer", pa.string(), False), ("confidence", pa.float64(), False), ("agrees", pa.bool_(), False),
    ("kept", pa.bool_(), False),
    ("why", pa.string(), True))], metadata={SCHEMA_KEY: PROBES})
"""One row per candidate probe: what was asked (question, image), what the model answered and how sure it was,
whether the answer agrees with the other phrasings of its fact, whether it was kept for the edit (``use`` edit)
or the gate's held-out check (``use`` held_out), and why not."""


class Template(Protocol):
    """A registered question template (``mip_core.service.keepsets.Template``)."""

    template: str  # "Where was {name} born?" (text) or "Who is this?" (image)
    modality: str  # "text" | "image"
    use: str  # "edit" | "held_out"
    fact: str


@dataclass(frozen=True)
class Probe:
    """One question about one requested person; ``answer``/``confidence`` are filled once the model answered."""

    probe_id: str
    request_id: str
    subject: str  # the person's name (or the profile id the request gave)
    person_key: str  # the person within the batch: ``<request_id>.s<i>``
    use: str  # "edit" | "held_out"
    source: str  # "template" | "fact"
    fact: str
    modality: str  # "text" | "multimodal"
    question: str
    image: str | None  # relative path in the batch's item table
    answer: str = PLACEHOLDER
    confidence: float = 0.0
    agrees: bool = False  # gives its fact's answer, pooled over name and photo (select_probes)
    kept: bool = False
    why: str | None = None

    def item(self) -> Item:
        """The probe as a free-form item: kind ``qa`` for edit probes, ``test`` for held-out ones."""
        return Item(item_id=self.probe_id, profile_id=self.person_key, kind="qa" if self.use == "edit" else "test",
                    fact=self.fact, modality=self.modality, question=self.question, answer=self.answer,
                    options=(), answer_index=-1, image=self.image)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def transformed_photos(data: bytes, seed: int) -> list[bytes]:
    """Identity-preserving variants of a photo for held-out probes: a crop resized back, and a colour shift."""
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    c = float(rng.uniform(0.82, 0.92))
    ch, cw = max(2, round(h * c)), max(2, round(w * c))
    oy, ox = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(img[oy:oy + ch, ox:ox + cw], "RGB").resize((w, h), Image.Resampling.BILINEAR)
    return [_png(np.asarray(crop, dtype=np.uint8)), _png(transform_image(img, "colour_shift", rng))]


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def person_key(request_id: str, index: int) -> str:
    return f"{request_id}.s{index}"


def build_candidates(request: ForgetRequest, index: int, person: Person, photos: Sequence[bytes],
                     templates: Sequence[Template]) -> tuple[list[Probe], dict[str, bytes]]:
    """The candidate probes about ``request.subjects[index]`` (``person``, its photos' bytes in order) and the
    images they show (``{relpath: bytes}``)."""
    key = person_key(request.request_id, index)
    images: dict[str, bytes] = {}
    shown: dict[str, list[str]] = {"edit": [], "held_out": []}  # use -> image relpaths
    for j, data in enumerate(photos):
        rel = image_relpath(data, check_image_bytes(data, f"subjects[{index}].photos[{j}]").ext)
        images[rel] = data
        shown["edit"].append(rel)
        for variant in transformed_photos(data, _seed(f"{key}/{j}")):
            images[image_relpath(variant, "png")] = variant
            shown["held_out"].append(image_relpath(variant, "png"))
    asked: list[tuple[str, str, str, str, str | None, str | None]] = []  # (use, source, fact, question, img, ans)
    for t in templates:
        if t.modality == "text":  # held out: its own phrasings by every name, and the edit phrasings by alias
            names = [person.name] + person.aliases if t.use == "held_out" else [person.name]
            asked += [(t.use, "template", t.fact, t.template.replace("{name}", n), None, None) for n in names]
            asked += [("held_out", "template", t.fact, t.template.replace("{name}", alias), None, None)
                      for alias in (person.aliases if t.use == "edit" else [])]
        else:
            asked += [(t.use, "template", t.fact, t.template, rel, None) for rel in shown[t.use]]
    asked += [("edit", "fact", "known_fact", f.question, None, f.answer) for f in person.facts]
    probes, seen = [], set()
    for use, source, fact, question, img, answer in asked:
        if (question, img) in seen:
            continue
        seen.add((question, img))
        probes.append(Probe(probe_id=f"{key}.{len(probes):03d}", request_id=request.request_id, subject=person.name,
                            person_key=key, use=use, source=source, fact=fact,
                            modality="text" if img is None else "multimodal", question=question, image=img,
                            answer=answer or PLACEHOLDER))
    return probes, images


def _agreed(answers: Sequence[str]) -> str | None:
    """The answer most of ``answers`` give (compared as words) if at least two give it and no other answer is given
    as often, else None: a tie is two beliefs, not one."""
    votes: dict[tuple[str, ...], list[str]] = {}
    for a in answers:
        if answer_words(a):
            votes.setdefault(tuple(answer_words(a)), []).append(a)
    ranked = sorted((len(said) for said in votes.values()), reverse=True)
    if not ranked or ranked[0] < 2 or (len(ranked) > 1 and ranked[1] == ranked[0]):
        return None
    return next(said[0] for said in votes.values() if len(said) == ranked[0])


def _fact_answers(probes: Sequence[Probe], key: Callable[[Probe], tuple[str, ...]],
                  min_confidence: float) -> dict[tuple[str, ...], str | None]:
    """``{key: the answer the confident edit phrasings in that group agree on}`` (one phrasing agrees with itself)."""
    said: dict[tuple[str, ...], list[str]] = {}
    for p in probes:
        if p.source != "fact" and p.use == "edit" and p.confidence >= min_confidence and p.answer != PLACEHOLDER:
            said.setdefault(key(p), []).append(p.answer)
    return {k: (_agreed(answers) if len(answers) > 1 else answers[0]) for k, answers in said.items()}


def _fact(p: Probe) -> tuple[str, str]:
    return (p.person_key, p.fact)


def _route(p: Probe) -> tuple[str, str, str]:
    return (p.person_key, p.fact, p.modality)


def select_probes(candidates: Sequence[Probe], answers: Mapping[str, tuple[str, float]],
                  min_confidence: float = MIN_CONFIDENCE) -> list[Probe]:
    """``candidates`` with the model's answers filled in, ``agrees``, ``kept`` and ``why`` decided.

    ``agrees``: the answer is the person's *fact answer*, the one most of the fact's confident edit phrasings give,
    asked by name and by photo together (at least two, and no other answer as often; a fact asked in one phrasing
    agrees with itself). A template probe is kept when it is confident and agrees: the model's stable belief
    about the person, which the edit removes and the gate checks, in every phrasing that states it. Pooling the
    routes matters on a small model: it often gives the trained answer to one phrasing of a fact and a guess to
    the other, and per route nothing of that fact would be kept although the model plainly holds it (BENCHMARKS.md
    section 8). Editing every confident answer, consistent or not, was measured too: it doubled the edit set for
    0.02 more forgetting and 0.09 less retention."""
    filled = [replace(p, answer=answers[p.probe_id][0].strip() or (p.answer if p.source == "fact" else PLACEHOLDER),
                      confidence=float(answers[p.probe_id][1])) for p in candidates]
    agreed = _fact_answers(filled, _fact, min_confidence)
    out = []
    for p in filled:
        fact_answer = agreed.get(_fact(p))
        agrees = fact_answer is not None and answer_words(p.answer) == answer_words(fact_answer)
        why = _why_not(p, fact_answer, agrees, min_confidence)
        out.append(replace(p, agrees=agrees, kept=why is None, why=why))
    return out


def _why_not(p: Probe, fact_answer: str | None, agrees: bool, min_confidence: float) -> str | None:
    if p.source == "fact":
        return None  # the requester says the model states it
    if p.answer == PLACEHOLDER:
        return "the model gave no answer"
    if p.confidence < min_confidence:
        return f"not confident: {p.confidence:.2f} < {min_confidence:.2f}"
    if fact_answer is None:
        return "the phrasings of this fact disagree: a guess, not knowledge"
    if not agrees:
        return f"does not give the answer the fact's edit phrasings agree on ({fact_answer!r})"
    return None


def answers_by_id(model: Any, processor: Any, bench: Any, item_ids: Sequence[str]) -> dict[str, tuple[str, float]]:
    """``{item_id: (answer, confidence)}`` of ``bench``'s items: the model's greedy answer where the item has none
    yet (``PLACEHOLDER``: a template probe), else the model's confidence in the given answer (a known fact)."""
    from mip_core.evaluation.runner import answer_confidence, probe_answers  # torch: only where a model is

    by_id = {it.item_id: it for it in bench.items}
    unknown = [i for i in item_ids if i not in by_id]
    if unknown:
        raise InputError(f"probe ids {unknown[:5]} ({len(unknown)} in all) are not in {bench.root}; the batch's "
                         "candidate table was written for other probes: plan the batch again")
    open_ = [by_id[i] for i in item_ids if by_id[i].answer == PLACEHOLDER]
    given = [by_id[i] for i in item_ids if by_id[i].answer != PLACEHOLDER]
    out = dict(zip((it.item_id for it in open_), probe_answers(model, processor, bench, open_), strict=True))
    confidence = answer_confidence(model, processor, bench, given, [it.answer for it in given])
    out.update({it.item_id: (it.answer, c) for it, c in zip(given, confidence, strict=True)})
    return out


def probe_logprobs(store: Any, batch_id: str) -> dict[str, float]:
    """``{probe_id: log(confidence)}`` of a batch's kept probes: the starting model's mean per-token log p of each
    answer, recorded at planning (no second scoring of the starting model)."""
    key = store.batch_key(batch_id, "probes.parquet")
    if not store.exists(key):
        return {}
    rows = pq.read_table(io.BytesIO(store.read_bytes(key)), columns=["probe_id", "confidence", "kept"]).to_pylist()
    return {r["probe_id"]: math.log(r["confidence"]) for r in rows if r["kept"] and r["confidence"] > 0}


def consistent_shares(probes: Sequence[Probe],
                      min_confidence: float = MIN_CONFIDENCE) -> dict[str, tuple[int, int]]:
    """``{modality: (facts whose confident phrasings agree, facts asked in several phrasings)}``, by route (name or
    photo) on its own: whether the model *knows* the person, as opposed to what is kept for the edit."""
    asked = [p for p in probes if p.source != "fact" and p.use == "edit"]
    multi = {g for g, n in Counter(map(_route, asked)).items() if n > 1}
    agreed = _fact_answers(asked, _route, min_confidence)
    same = {g for g in multi if agreed.get(g) is not None}
    return {m: (sum(g[2] == m for g in same), sum(g[2] == m for g in multi)) for m in sorted({g[2] for g in multi})}


def no_probe_reason(probes: Sequence[Probe], min_confidence: float = MIN_CONFIDENCE,
                    min_consistent: float = MIN_CONSISTENT) -> str | None:
    """Why a person cannot be forgotten measurably, or None: no kept edit probe, or, by name and by photo alike,
    too few of the facts asked in several phrasings answered the same way (the model guesses rather than knows).
    Knowing a person by name or by face is knowing them: one route reaching ``min_consistent`` is enough. The
    reason goes into the request's record and the batch report, so it names no question or answer: those stay
    in ``probes.parquet``."""
    asked = [p for p in probes if p.use == "edit"]
    if not asked:
        return ("no question could be asked: the model's templates need a photo for image questions; add photos or "
                "known facts")
    shares = consistent_shares(asked, min_confidence)
    if shares and all(ok < min_consistent * n for ok, n in shares.values()):
        found = " and ".join(f"{ok} of {n} {'by name' if m == 'text' else 'by photo'}" for m, (ok, n) in shares.items())
        return (f"the model answers only {found} of the facts asked in several phrasings the same way in each (at "
                f"least {min_consistent:.0%} of either needed): it guesses rather than knows this person; "
                "probes.parquet lists its answers")
    if any(p.kept for p in asked):
        return None
    best = max(p.confidence for p in asked)
    return (f"the model answers none of the {len(asked)} questions confidently (best confidence {best:.2f} < "
            f"{min_confidence:.2f}): no knowledge of this person the gate could see disappear; check the name, or "
            "add photos or known facts (probes.parquet lists its answers)")


def probes_table(probes: Sequence[Probe]) -> pa.Table:
    """The ``mip-probes/1`` audit table."""
    rows = [{k: v for k, v in asdict(p).items() if k != "person_key"} for p in probes]
    return pa.Table.from_pylist(rows, schema=PROBES_V1)


__all__ = ["MIN_CONFIDENCE", "MIN_CONSISTENT", "PROBES", "PROBES_V1", "Probe", "answers_by_id", "build_candidates",
           "consistent_shares", "no_probe_reason", "person_key", "probe_logprobs", "probes_table", "select_probes",
           "transformed_photos"]
