"""The research code's path search as it ships, re-written here as a speed and fidelity reference.

Not the method this project runs (docs/method.md section 7 lists why each point below is a defect); it exists
so that ``attribution_bench.py`` can time the project against what the published script actually computes:

- objective: the mean cross-entropy over the whole sequence (prompt and answer), i.e. the loss, not the answer's
  log-probability; gradients are taken of the loss;
- positions: token position 0 (language) or the first patch row of each copy (vision) only;
- interpolation: the left Riemann sum, copies at ``alpha = 0, 1/m, ..., (m-1)/m`` (never 1), all ``m`` copies of
  one item in one pass, one item at a time, parameter gradients on (the backward runs to the embeddings);
- earlier path: the previous layer's activations are pinned to their original values except the *last* of its
  ``k`` path neurons, scaled with the copies; its gradient sum and step enter every candidate's text score as
  the same constants, ``score_j = (sum_s g_sj + C1) * (a_j / m + C2)``;
- vision score: ``sum_s z_sj ** 2 * a_j`` with ``z`` the z-score of the gradients across the ``m`` copies.

One deliberate departure, which does not change the cost: the vision copies repeat whole images (the script
repeats packed patch rows, which scrambles each copy's image but runs the same number of patches).

``completeness`` measures this reference's own quadrature against its own objective, over the neurons it scales,
so the bench can compare the gap of both implementations as each defines its integral.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mip_core.adapters import ModelAdapter
from mip_core.hooks import capture, patch
from mip_core.modeling import collate
from mip_core.types import MLPSite, PathNode, Tower


def _batch(example: Mapping[str, Tensor], copies: int, pad_token_id: int) -> tuple[dict[str, Tensor], Tensor]:
    """``copies`` rows of one item, and whole-sequence labels (every real token; padding has none here)."""
    batch = collate([dict(example) for _ in range(copies)], pad_token_id)
    batch.pop("labels")
    return batch, batch["input_ids"].clone()


def _loss_per_row(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each row over the whole sequence, [R]."""
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")  # [R, S-1]
    return ce.mean(1)


def _first_rows(adapter: ModelAdapter, tower: Tower, activation: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Flat index of each row's position 0 (language) or first patch row (vision), [R]."""
    flat_ids = torch.arange(activation[..., 0].numel()).reshape(*activation.shape[:-1], 1)
    return torch.stack([rows.reshape(-1)[0] for rows in adapter.rows_per_example(tower, flat_ids, batch)])


class _Layer:
    """One layer's pass: copies at the left-Riemann nodes, position 0 of layer ``l`` (and of the previous
    layer's last path neuron) scaled, every other value of the previous layer pinned to the original."""

    def __init__(self, adapter: ModelAdapter, tower: Tower, batch: Mapping[str, Tensor],
                 originals: Mapping[MLPSite, Tensor], site: MLPSite, previous: tuple[MLPSite, int] | None,
                 alphas: Tensor) -> None:
        self.originals, self.site, self.previous, self.alphas = originals, site, previous, alphas  # alphas: [m]
        # every site of a tower lays its activation out alike: the copies' first rows, once per pass, [m]
        self.first = _first_rows(adapter, tower, originals[site], batch)
        self.leaf: Tensor | None = None
        self.prev_leaf: Tensor | None = None

    def original_first(self, s: MLPSite) -> Tensor:
        """The unscaled activation of ``s`` at position 0 of the first copy, [d_mlp]."""
        return self.originals[s].reshape(-1, s.d_mlp)[self.first[0]]

    def __call__(self, s: MLPSite, x: Tensor) -> Tensor:
        original = self.originals[s].reshape(-1, x.shape[-1])  # [N, d_mlp]
        first = self.first
        if s == self.site:
            self.leaf = (self.alphas[:, None] * original[first]).detach().requires_grad_(True)  # [m, d_mlp]
            return x.reshape(-1, x.shape[-1]).index_put((first,), self.leaf).reshape(x.shape)
        neuron = self.previous[1]  # type: ignore[index]
        self.prev_leaf = (self.alphas * original[first, neuron]).detach().requires_grad_(True)  # [m]
        column = original[:, neuron].index_put((first,), self.prev_leaf)  # the rest of the layer stays pinned
        return original.index_copy(1, torch.tensor([neuron]), column[:, None]).reshape(x.shape)


def _pass(model: nn.Module, adapter: ModelAdapter, batch: Mapping[str, Tensor], labels: Tensor,
          originals: Mapping[MLPSite, Tensor], site: MLPSite, previous: tuple[MLPSite, int] | None,
          steps: int) -> tuple[_Layer, Tensor]:
    """Forward + backward (parameter gradients included) of the ``m`` copies; returns the hook and the loss."""
    alphas = torch.arange(steps, dtype=torch.float32) / steps  # left Riemann: 0, 1/m, ..., (m-1)/m
    layer = _Layer(adapter, site.tower, batch, originals, site, previous, alphas)
    hooks = {site: layer} | ({previous[0]: layer} if previous else {})
    model.zero_grad(set_to_none=True)
    with patch(adapter, hooks):
        loss = _loss_per_row(model(**batch, use_cache=False).logits, labels).mean()
    loss.backward()  # parameter gradients too, as the script computes them
    return layer, loss


def research_path(model: nn.Module, adapter: ModelAdapter, example: Mapping[str, Tensor], tower: Tower,
                  steps: int, top_k: int, pad_token_id: int) -> list[list[PathNode]]:
    """The script's greedy search for one item: per layer, ``top_k`` neurons by its score, best first."""
    batch, labels = _batch(example, steps, pad_token_id)
    sites = adapter.sites(tower)
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.no_grad(), capture(adapter, sites) as originals:
        model(**batch, use_cache=False)
    result: list[list[PathNode]] = []
    try:
        for site in sites:
            previous = (sites[site.layer - 1], result[-1][-1].neuron) if result else None
            layer, _ = _pass(model, adapter, batch, labels, originals, site, previous, steps)
            scores = _score(layer, tower, steps, previous)
            order = torch.sort(scores, descending=True, stable=True).indices[:top_k]
            result.append([PathNode(site.layer, r, int(j), float(scores[j])) for r, j in enumerate(order)])
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    return result


def _score(layer: _Layer, tower: Tower, steps: int, previous: tuple[MLPSite, int] | None) -> Tensor:
    grad = layer.leaf.grad.float()  # type: ignore[union-attr]  # [m, d_mlp]
    original = layer.original_first(layer.site).float()  # [d_mlp]: a at position 0
    if tower == "vision":
        z = (grad - grad.mean(0)) / grad.std(0).clamp_min(1e-12)  # z-score across the m copies
        return (z * z).sum(0) * original
    c1 = c2 = 0.0
    if layer.prev_leaf is not None:  # the previous path neuron's gradient sum and step, the same for every j
        c1 = float(layer.prev_leaf.grad.sum())  # type: ignore[union-attr]
        c2 = float(layer.original_first(previous[0])[previous[1]]) / steps  # type: ignore[index]
    return (grad.sum(0) + c1) * (original / steps + c2)


def completeness(model: nn.Module, adapter: ModelAdapter, example: Mapping[str, Tensor], tower: Tower,
                 steps: int, path: list[list[PathNode]], pad_token_id: int) -> list[tuple[float, float]]:
    """Per layer ``(sum, L(a) - L(0))``: the left sum of ``a * g`` over the neurons scaled (layer ``l`` at
    position 0, the previous layer's last path neuron) against the change of the loss between the original
    values and those neurons at zero. ``g`` is the gradient of the batch's mean loss, which already carries the
    ``1/m`` of the Riemann sum."""
    batch, labels = _batch(example, steps, pad_token_id)
    sites = adapter.sites(tower)
    with torch.no_grad(), capture(adapter, sites) as originals:
        model(**batch, use_cache=False)
    out = []
    for site in sites:
        previous = (sites[site.layer - 1], path[site.layer - 1][-1].neuron) if site.layer > 0 else None
        layer, _ = _pass(model, adapter, batch, labels, originals, site, previous, steps)
        total = float((layer.leaf.grad.float() * layer.original_first(site).float()).sum())  # type: ignore[union-attr]
        if layer.prev_leaf is not None:
            a_prev = layer.original_first(previous[0])[previous[1]]  # type: ignore[index]
            total += float((layer.prev_leaf.grad.float() * a_prev.float()).sum())  # type: ignore[union-attr]
        out.append((total, _loss_change(model, adapter, batch, labels, originals, site, previous, steps)))
    model.zero_grad(set_to_none=True)
    return out


def _loss_change(model: nn.Module, adapter: ModelAdapter, batch: Mapping[str, Tensor], labels: Tensor,
                 originals: Mapping[MLPSite, Tensor], site: MLPSite, previous: tuple[MLPSite, int] | None,
                 steps: int) -> float:
    """``L(original) - L(scaled neurons at zero)``: every copy at the same ``alpha``, so the mean is one copy's."""
    losses = []
    for alpha in (1.0, 0.0):
        layer = _Layer(adapter, site.tower, batch, originals, site, previous, torch.full((steps,), alpha))
        hooks = {site: layer} | ({previous[0]: layer} if previous else {})
        with torch.no_grad(), patch(adapter, hooks):
            losses.append(float(_loss_per_row(model(**batch, use_cache=False).logits, labels).mean()))
    return losses[0] - losses[1]
