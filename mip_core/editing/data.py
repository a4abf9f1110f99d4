"""Encode benchmark items for unlearning: forget and retain examples with their answers and modalities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mip_core.benchmark import Benchmark, Item
from mip_core.editing.base import UnlearnData
from mip_core.training import encode_items


def unlearn_data(processor: Any, bench: Benchmark, forget: Sequence[Item], retain: Sequence[Item], *,
                 requests: Mapping[str, str] | None = None) -> UnlearnData:
    """Examples encoded once (answer span labelled), in item order, with each item's modality and request id.

    ``requests`` maps forget item ids to request ids; by default each forget person (``profile_id``) is one
    request, the benchmark's stand-in for one "forget this person" request.
    """
    return UnlearnData(forget=encode_items(processor, bench, forget), retain=encode_items(processor, bench, retain),
                       pad_token_id=int(processor.tokenizer.pad_token_id),
                       forget_modality=[it.modality for it in forget],
                       retain_modality=[it.modality for it in retain],
                       forget_requests=[(requests or {}).get(it.item_id) or request_of(it) for it in forget])


def request_of(item: Item) -> str:
    """The benchmark's request id of a forget item: its person (``profile_id``), or the item itself."""
    return item.profile_id or item.item_id


__all__ = ["request_of", "unlearn_data"]
