"""Encode benchmark items for unlearning: forget and retain examples with their answers and modalities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mip_core.benchmark import Benchmark, Item
from torch import Tensor

from mip_core.editing.base import UnlearnData
from mip_core.errors import InputError
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
    return UnlearnData(forget=encode_items(processor, bench, both), retain=encode_items(processor, bench, retain),
                       pad_token_id=int(processor.tokenizer.pad_token_id),
                       forget_modality=[it.modality for it in both],
                       retain_modality=[it.modality for it in retain],
                       forget_requests=[(requests or {}).get(it.item_id) or request_of(it) for it in both],
                       forget_options=[encode_options(processor, bench, it) for it in both],
                       forget_earlier=[False] * len(forget) + [True] * len(earlier) if earlier else ())


def encode_options(processor: Any, bench: Benchmark, item: Item) -> tuple[list[dict[str, Tensor]], int]:
    """``item``'s options, each encoded as its answer, and the right one's index; ``([], -1)`` when free-form.

    The options share one image: the image tensors of the first encoding are reused by the others (same pixels),
    so a multimodal item holds its pixels once, not once per option.
    """
    if item.free_form:
        return [], -1
    image = bench.load_image(item) if item.image else None
    encoded = [encode(processor, item.question, image, option, item_id=item.item_id) for option in item.options]
    for other in encoded[1:]:
        other.update({k: v for k, v in encoded[0].items() if k not in SEQUENCE_KEYS})  # image tensors: same pixels
    return encoded, item.answer_index


def request_of(item: Item) -> str:
    """The benchmark's request id of a forget item: its person (``profile_id``), or the item itself."""
    return item.profile_id or item.item_id


__all__ = ["encode_options", "request_of", "unlearn_data"]
