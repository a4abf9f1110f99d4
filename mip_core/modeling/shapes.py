"""Model shapes without weights: published checkpoints' configs, scaled-down variants, their parameter counts.

The shapes themselves are the adapters' (``mip_core.adapters.shapes``: only adapters name architectures); this
module is the generic door to them. Everything here runs on the meta device, so a 72B-parameter shape costs
a fraction of a second and a few MB: site resolution and memory planning can be checked without weights.

>>> config = shape_config(SHAPE_NAMES[0])
>>> param_count(config) > 70e9
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from mip_core.adapters import adapter_class
from mip_core.adapters.shapes import SCALERS, SHAPES
from mip_core.errors import InputError

SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
"""The named published shapes (the 72B shape first)."""


def shape_config(name: str) -> PretrainedConfig:
    """The config of the published checkpoint ``name`` (one of :data:`SHAPE_NAMES`)."""
    try:
        return SHAPES[name]()
    except KeyError:
        raise InputError(f"shape {name!r} is unknown; choose one of {', '.join(SHAPE_NAMES)}") from None


def scaled_config(model_type: str, hidden: int, intermediate: int, layers: int, vision_depth: int, vocab: int,
                  **options: Any) -> PretrainedConfig:
    """A ``model_type`` config of the given widths and depths, laid out like its published checkpoints.

    For benchmarks between the tiny demo models and the published ones; ``options`` go to the architecture's
    builder (e.g. ``heads``, ``vision_hidden``, ``tokenizer``; see ``mip_core.adapters.shapes``).
    """
    try:
        build = SCALERS[model_type]
    except KeyError:
        raise InputError(f"no scaled shapes for model_type {model_type!r}; available: "
                         f"{', '.join(sorted(SCALERS))}") from None
    return build(hidden, intermediate, layers, vision_depth, vocab, **options)


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on the meta device: every module and shape, no parameter storage."""
    model_class = adapter_class(getattr(config, "model_type", "<missing model_type>")).model_class
    with torch.device("meta"):
        return model_class(config)


def param_count(config: PretrainedConfig) -> int:
    """Parameters of a model of ``config``, counted on the meta device (what a checkpoint of it stores)."""
    return sum(p.numel() for p in meta_model(config).parameters())
