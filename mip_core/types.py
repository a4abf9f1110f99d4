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


@dataclass(frozen=True, slots=True)
class PathNode:
    """One kept neuron of an item's path: ``rank`` 0 is the layer's top-scoring neuron."""

    layer: int
    rank: int
    neuron: int
    score: float


@dataclass(frozen=True, slots=True)
class ItemPath:
    """The influential neuron path of one item in one tower: ``top_k`` nodes per layer, layers ascending."""

    item_id: str
    request_id: str | None  # the forget request the item belongs to (lineage); None outside the service
    tower: Tower
    nodes: tuple[PathNode, ...]

    @property
    def score(self) -> float:
        """The path's total score: the sum of its neurons' scores (docs/method.md section 2)."""
        return float(sum(n.score for n in self.nodes))


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """An item that could not be attributed, and why; the rest of its shard still completes."""

    item_id: str
    reason: str
