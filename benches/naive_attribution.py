"""A straightforward reference path search: one item at a time, one interpolation step per forward, parameter
gradients on (as the research code computes them). Kept out of the library; ``attribution_bench.py`` times it
against ``mip_core.attribution.path_search`` and checks that both pick the same neurons.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mip_core.adapters import ModelAdapter
from mip_core.attribution import answer_logprob
from mip_core.hooks import capture, patch
from mip_core.modeling import collate
from mip_core.types import PathNode, Tower


def naive_path(model: nn.Module, adapter: ModelAdapter, example: Mapping[str, Tensor], tower: Tower,
               steps: int, top_k: int, pad_token_id: int) -> list[list[PathNode]]:
    batch = collate([dict(example)], pad_token_id)
    labels = batch.pop("labels")
    sites = adapter.sites(tower)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad(), capture(adapter, sites) as originals:
        model(**batch, use_cache=False)
    path: dict[int, list[int]] = {}
    result = []
    for site in sites:
        total = torch.zeros(site.d_mlp)
        for s in range(1, steps + 1):
            alpha = s / steps
            store: dict[str, Tensor] = {}

            def scale(sx, x, alpha=alpha, store=store, site=site):
                if sx.layer == site.layer:
                    leaf = (alpha * originals[sx]).clone().requires_grad_(True)
                    leaf.retain_grad()
                    store["leaf"] = leaf
                    return leaf
                x = x.clone()
                ids = path[sx.layer]
                x[..., ids] = alpha * originals[sx][..., ids]
                return x

            model.zero_grad(set_to_none=True)
            with patch(adapter, {sx: scale for sx in sites if sx.layer <= site.layer}):
                logits = model(**batch, use_cache=False).logits
            answer_logprob(logits, labels).sum().backward()  # parameter gradients are computed too
            grad = store["leaf"].grad.float()
            if tower == "vision":
                grad = grad * grad
            total += (originals[site].float() * grad).reshape(-1, site.d_mlp).sum(0)
        scores = total / steps
        order = sorted(range(site.d_mlp), key=lambda j: (-float(scores[j]), j))[:top_k]
        path[site.layer] = order
        result.append([PathNode(site.layer, r, j, float(scores[j])) for r, j in enumerate(order)])
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return result
