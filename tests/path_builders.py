"""Hand-made per-item paths for the reduction and storage tests."""

from __future__ import annotations

from mip_core.types import ItemPath, PathNode


def item_path(item: str, request: str | None, tower: str, *layers: list[tuple[int, float]]) -> ItemPath:
    """A path with ``layers[l]`` = ``[(neuron, score), ...]`` in rank order; scores exact in float32."""
    nodes = tuple(
        PathNode(layer=li, rank=r, neuron=n, score=s)
        for li, layer in enumerate(layers)
        for r, (n, s) in enumerate(layer)
    )
    return ItemPath(item_id=item, request_id=request, tower=tower, nodes=nodes)  # type: ignore[arg-type]
