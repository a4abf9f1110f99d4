"""Encode benchmark items for unlearning: forget and retain examples with their answers and modalities."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from mip_core.benchmark import Benchmark, Item
from torch import Tensor

from mip_core.editing.base import UnlearnData
from mip_core.errors import InputError
from mip_core.evaluation.metrics import answer_words
from mip_core.modeling.inputs import SEQUENCE_KEYS, encode
from mip_core.training import encode_items


def unlearn_data(processor: Any, bench: Benchmark, forget: Sequence[Item], retain: Sequence[Item], *,
                 requests: Mapping[str, str] | None = None, earlier: Sequence[Item] = ()) -> UnlearnData:
    """Examples encoded once (answer span labelled), in item order, with each item's modality and request id.

    ``requests`` maps forget item ids to request ids; by default each forget person (``profile_id``) is one
    request, the benchmark's stand-in for one "forget this person" request.
    ``earlier``: forget items of people an earlier edit forgot, kept forgotten (``UnlearnData.forget_earlier``);
    they follow ``forget``.
    """
    if not forget:
        raise InputError("nothing to forget: the forget set is empty (people forgotten earlier are only kept "
                         "forgotten); pick a forget split or request items")
    both = [*forget, *earlier]
    options = [encode_options(processor, bench, it) for it in both]
    return UnlearnData(forget=encode_items(processor, bench, both), retain=encode_items(processor, bench, retain),
                       pad_token_id=int(processor.tokenizer.pad_token_id),
                       forget_modality=[it.modality for it in both],
                       retain_modality=[it.modality for it in retain],
                       forget_requests=[(requests or {}).get(it.item_id) or request_of(it) for it in both],
                       forget_options=options,
                       forget_earlier=[False] * len(forget) + [True] * len(earlier) if earlier else (),
                       forget_wrong=[[ex for k, ex in enumerate(opts) if k != right] if opts
                                     # earlier people's answers are not kept (rmisu._wrong_answers): not encoded
                                     else [] if k >= len(forget)
                                     else encode_answers(processor, bench, it, distractors(it, retain))
                                     for k, (it, (opts, right)) in enumerate(zip(both, options, strict=True))])


def encode_options(processor: Any, bench: Benchmark, item: Item) -> tuple[list[dict[str, Tensor]], int]:
    """``item``'s options, each encoded as its answer, and the right one's index; ``([], -1)`` when free-form.

    The options share one image: the image tensors of the first encoding are reused by the others (same pixels),
    so a multimodal item holds its pixels once, not once per option.
    """
    if item.free_form:
        return [], -1
    return encode_answers(processor, bench, item, item.options), item.answer_index


def encode_answers(processor: Any, bench: Benchmark, item: Item, answers: Sequence[str]) -> list[dict[str, Tensor]]:
    """``item``'s question (and image) encoded once per answer in ``answers``, each as the labelled answer."""
    image = bench.load_image(item) if item.image and answers else None
    encoded = [encode(processor, item.question, image, answer, item_id=item.item_id) for answer in answers]
    for other in encoded[1:]:
        other.update({k: v for k, v in encoded[0].items() if k not in SEQUENCE_KEYS})  # image tensors: same pixels
    return encoded


N_WRONG = 3
"""Wrong answers taken per free-form forget item: as many as a benchmark question's wrong options."""


def distractors(item: Item, pool: Sequence[Item], n: int = N_WRONG) -> list[str]:
    """Up to ``n`` answers other people in ``pool`` (the people the edit keeps) give to ``item``'s fact: what a
    model that never knew the person might say instead, for the plausibility term of a question without options.

    Distinct (compared as words, like the check compares answers), never the item's own answer; picked by a hash
    of the item id and the answer, whatever the pool's order, so every process of an edit and every rerun picks
    the same ones. A keep set without facts (all ``"fact"``) gives answers of any kind: the frozen model finds
    those unlikely already, so their floors sit low and the term seldom pulls on them.
    """
    own = tuple(answer_words(item.answer))
    spellings: dict[tuple[str, ...], set[str]] = {}
    for other in pool:
        words = tuple(answer_words(other.answer))
        if other.kind == "qa" and other.fact == item.fact and other.profile_id != item.profile_id and words != own:
            spellings.setdefault(words, set()).add(other.answer)
    spellings.pop((), None)  # an empty answer says nothing

    def order(words: tuple[str, ...]) -> bytes:
        return hashlib.sha256("\0".join((item.item_id, *words)).encode()).digest()

    return [min(spellings[words]) for words in sorted(spellings, key=order)[:n]]


def request_of(item: Item) -> str:
    """The benchmark's request id of a forget item: its person (``profile_id``), or the item itself."""
    return item.profile_id or item.item_id


__all__ = ["N_WRONG", "distractors", "encode_answers", "encode_options", "request_of", "unlearn_data"]
