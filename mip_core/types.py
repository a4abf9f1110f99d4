"""Canonical identifiers shared by every part of the library.

Everything outside ``mip_core.adapters`` speaks in these terms: a *site* is one MLP of one tower, a *neuron* is
one coordinate of that MLP's intermediate activation (the input of its down projection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Tower = Literal["vision", "language"]
TOWERS: tuple[Tower, ...] = ("vision", "language")
Modality = Literal["multimodal", "text"]
MODALITIES: tuple[Modality, ...] = ("multimodal", "text")


@dataclass(frozen=True, slots=True, order=True)
class MLPSite:
    """One MLP: ``(tower, layer)``, with ``d_mlp`` neurons (in_features of its down projection)."""

    tower: Tower
    layer: int
    d_mlp: int


@dataclass(frozen=True, slots=True, order=True)
class NeuronRef:
    """Neuron ``neuron`` of the MLP at ``(tower, layer)``."""

    tower: Tower
    layer: int
    neuron: int
