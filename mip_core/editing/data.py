"""Encode benchmark items for unlearning: forget and retain examples with their answers and modalities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mip_core.benchmark import Benchmark, Item
from mip_core.editing.base import UnlearnData
from mip_core.training import encode_items


def unlearn_data(processor: Any, bench: Benchmark, forget: Sequence[Item], retain: Sequence[Item]) -> UnlearnData:
    """Examples encoded once (answer span labelled), in item order, with each item's modality."""
    return UnlearnData(forget=encode_items(processor, bench, forget), retain=encode_items(processor, bench, retain),
                       pad_token_id=int(processor.tokenizer.pad_token_id),
                       forget_modality=[it.modality for it in forget],
                       retain_modality=[it.modality for it in retain])


__all__ = ["unlearn_data"]
