"""Greedy influential-neuron path search: IGI on the language tower, IFI on the vision tower.

Method: docs/method.md sections 2 and 3; quadrature rules and completeness: docs/attribution.md.

At layer ``l`` of a tower, ``m`` interpolated copies of each example run in one batch. In copy ``s`` (node
``alpha_s`` of the quadrature rule, weight ``w_s``; by default ``alpha_s = s/m``, ``w_s = 1/m``, the right
Riemann sum) every neuron of layer ``l`` and every path neuron already selected in layers ``< l`` is set to
``alpha_s`` times its original activation at every position (zero baseline); all other neurons are computed by
the forward as usual. One backward from the summed answer log-probability ``F`` gives ``g``, the gradient at
layer ``l``'s interpolated activation, and

    IG_l(j)  = sum_p a_{l,p,j} * sum_s w_s * g_{s,l,p,j}        (language, "ig")
    IFI_l(j) = sum_p a_{l,p,j} * sum_s w_s * g_{s,l,p,j} ** 2   (vision, "fisher")

with ``a`` the original activation. The top ``k`` neurons join the path and the search moves up one layer.

"Original activation" is meant literally: a scaled neuron is *set* to ``alpha_s * a`` (the value it has in
the unscaled forward), not multiplied in place, so layer ``l``'s interpolation point is ``alpha_s * a_l`` even
though earlier path neurons are scaled too. That makes the score the textbook joint integrated gradient of the
straight line from zero to the original values of all scaled neurons, and keeps the ``a`` in the formula
consistent with the point where ``g`` is taken. With a rule whose last node is 1 the original values are read
inside the hook from that copy, whose forward is exactly the unscaled one; otherwise (Gauss-Legendre) from one
forward of the items alone, stopped after the tower's last layer. The earlier scaling still reaches layer ``l``
and ``F`` through everything else (residual stream, attention, other neurons).

Only activation gradients are computed: parameters are frozen for the duration and layer ``l``'s replaced
activation is a leaf that requires grad, so the backward stops there (nothing below it is in the graph).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from mip_core.adapters.base import ModelAdapter
from mip_core.attribution.config import AttributionConfig
from mip_core.errors import InputError
from mip_core.attribution.quadrature import Rule, nodes_and_weights, reads_originals_from_last_copy
from mip_core.hooks import capture, patch
from mip_core.modeling.inputs import IGNORE_INDEX, answer_logprob, answer_positions, collate
from mip_core.types import MLPSite, PathNode, Tower

Method = Literal["ig", "fisher"]
#: The paper's pairing: gradients x activations on the language tower, squared gradients on the vision tower.
METHOD_BY_TOWER: dict[Tower, Method] = {"language": "ig", "vision": "fisher"}
#: Per example, the path neurons of earlier layers: ``{layer: neuron ids}``.
EarlierPath = Mapping[int, Sequence[int]]


def check_example(adapter: ModelAdapter, example: Mapping[str, Tensor], tower: Tower, item_id: str) -> None:
    """Raise ``InputError`` naming ``item_id`` when ``example`` cannot be attributed on ``tower``."""
    labels = example.get("labels")
    if labels is None or not bool((labels != IGNORE_INDEX).any()):
        raise InputError(f"item {item_id!r} has no answer span (no labelled tokens); the objective is the "
                         "answer's log-probability, so encode the item with its answer")
    if tower == "vision":
        n_images = adapter.images_per_example(example["input_ids"].reshape(1, -1))[0]
        if n_images == 0 or "pixel_values" not in example:
            raise InputError(f"item {item_id!r} has no image; the vision branch needs a multimodal item")


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter requiring grad, grad mode on; all restored afterwards, also on error.

    With every parameter frozen, a backward computes activation gradients only (research-code defect 9).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _example_rows(adapter: ModelAdapter, tower: Tower, lead: torch.Size, batch: Mapping[str, Tensor],
                  device: torch.device) -> list[Tensor]:
    """Per batch row, the flat indices of its real positions in a ``[*lead, d_mlp]`` activation reshaped to 2-D."""
    flat_ids = torch.arange(lead.numel(), device=device).reshape(*lead, 1)  # [..., 1]: each position's flat index
    return [t.reshape(-1) for t in adapter.rows_per_example(tower, flat_ids, batch)]


@dataclass(frozen=True)
class _Positions:
    """Where each example's real positions (tokens or patches) sit in a flattened ``[N, d_mlp]`` activation.

    Rows of the copy batch are example-major: row ``r = b * m + s`` is copy ``s`` (node ``alphas[s]``) of
    example ``b``.
    """

    rows: list[Tensor]  # per batch row: flat indices of its real positions, [n_b]
    real: Tensor  # [N] bool: a real position (not padding)
    example: Tensor  # [N] long: the example a position belongs to (0 where not real)
    alpha: Tensor  # [N]: the interpolation coefficient of the position's copy (0 where not real)
    weight: Tensor  # [N]: the quadrature weight of the position's copy (0 where not real)
    source: Tensor  # [N] long: where the position's original value is (in copy m, or in the unscaled batch)

    @classmethod
    def build(cls, adapter: ModelAdapter, tower: Tower, lead: torch.Size, batch: Mapping[str, Tensor],
              n_examples: int, rule: tuple[tuple[float, ...], tuple[float, ...]], device: torch.device,
              base_rows: Sequence[Tensor] | None = None) -> _Positions:
        """``base_rows``: each example's positions in the unscaled batch; without it, copy ``m`` (alpha 1)."""
        alphas, weights = rule
        steps, n = len(alphas), lead.numel()
        rows = _example_rows(adapter, tower, lead, batch, device)
        if len(rows) != n_examples * steps:
            raise RuntimeError(f"{tower}: {len(rows)} batch rows for {n_examples} examples x {steps} copies")
        real = torch.zeros(n, dtype=torch.bool, device=device)
        example = torch.zeros(n, dtype=torch.long, device=device)
        alpha, weight = torch.zeros(n, device=device), torch.zeros(n, device=device)
        # padding keeps its own index in copy m's layout, and 0 in the unscaled batch's (it is never scaled)
        source = torch.arange(n, device=device) if base_rows is None else torch.zeros(n, dtype=torch.long,
                                                                                       device=device)
        for r, idx in enumerate(rows):
            b, s = divmod(r, steps)
            origin = rows[b * steps + steps - 1] if base_rows is None else base_rows[b].reshape(-1).to(device)
            if idx.numel() != origin.numel():
                raise RuntimeError(f"{tower}: copies of example {b} have {idx.numel()} and {origin.numel()} "
                                   "positions; copies must be identical")
            real[idx], example[idx], source[idx] = True, b, origin
            alpha[idx], weight[idx] = alphas[s], weights[s]
        return cls(rows, real, example, alpha, weight, source)


class _TowerRead(Exception):
    """Stops the capture forward once the tower's last site has been read."""


@dataclass(frozen=True)
class _Originals:
    """Unscaled activations of every site of a tower, from one forward of the items without copies.

    Needed when no copy sits at ``alpha = 1`` (e.g. Gauss-Legendre): the scaled values are ``alpha`` times
    these. One forward of ``B`` rows, no backward, against ``L`` forward+backward passes of ``B * m`` rows.
    """

    by_layer: dict[int, Tensor]  # layer -> [N0, d_mlp], the unscaled batch's flattened activation
    rows: list[Tensor]  # per example: flat indices of its real positions in ``by_layer[...]``

    @classmethod
    def capture(cls, model: nn.Module, adapter: ModelAdapter, tower: Tower,
                examples: Sequence[Mapping[str, Tensor]], pad_token_id: int, device: torch.device) -> _Originals:
        batch = {k: v.to(device) for k, v in collate([dict(e) for e in examples], pad_token_id).items()}
        batch.pop("labels")
        sites = adapter.sites(tower)

        def stop(module: nn.Module, args: tuple[object, ...]) -> None:
            raise _TowerRead  # every site is read: the rest of the forward (for vision, the whole LLM) is not needed

        with torch.no_grad(), capture(adapter, sites) as store:
            handle = adapter.down_proj(sites[-1]).register_forward_pre_hook(stop)  # runs after capture's hook
            try:
                model(**batch, use_cache=False)
            except _TowerRead:
                pass
            finally:
                handle.remove()
        rows = _example_rows(adapter, tower, store[sites[0]].shape[:-1], batch, device)
        return cls({s.layer: store[s].reshape(-1, s.d_mlp) for s in sites}, rows)


@dataclass(frozen=True)
class _Pass:
    """What one layer's pass needs besides the batch: the rule's nodes and weights, and where originals are."""

    name: Rule  # the quadrature rule
    rule: tuple[tuple[float, ...], tuple[float, ...]]  # its (alphas, weights)
    method: Method
    originals: _Originals | None = None  # None: read them from copy m (alpha = 1)
    completeness: bool = False  # also return each example's quadrature sum over every scaled neuron
    #: ``_Positions`` by activation shape: every layer's pass runs the same batch, so they are built once
    positions: dict[tuple[int, ...], _Positions] = field(default_factory=dict)


def _scores(model: nn.Module, adapter: ModelAdapter, batch: Mapping[str, Tensor], labels: Tensor,
            site: MLPSite, path_masks: Mapping[int, Tensor], n_examples: int, how: _Pass
            ) -> tuple[Tensor, Tensor | None]:
    """One forward + backward over the copy batch: the scores of all neurons of ``site``, [B, d_mlp].

    ``path_masks[layer]`` is ``[B, d_mlp]`` bool, the path neurons of an earlier layer of the same tower. With
    ``how.completeness``, also ``[B]``: ``sum_i a_i sum_s w_s g_s,i`` over every scaled neuron and position
    (layer ``l``'s and the earlier path's), which equals ``F(a) - F(0)`` for an exact quadrature.
    """
    tower = site.tower
    state: dict[str, object] = {"earlier": []}

    def positions(x: Tensor) -> _Positions:
        lead = tuple(x.shape[:-1])
        if lead not in how.positions:
            base = how.originals.rows if how.originals is not None else None
            how.positions[lead] = _Positions.build(adapter, tower, x.shape[:-1], batch, n_examples, how.rule,
                                                   x.device, base)
        state["positions"] = how.positions[lead]
        return how.positions[lead]

    def interpolate(s: MLPSite, x: Tensor) -> Tensor:
        pos = positions(x)
        flat = x.reshape(-1, x.shape[-1])  # [N, d_mlp]
        origin = flat if how.originals is None else how.originals.by_layer[s.layer].to(flat.dtype)
        alpha = pos.alpha.to(flat.dtype)[:, None]  # [N, 1]
        if s.layer != site.layer:  # an earlier layer: only its path neurons, each example its own
            neurons = path_masks[s.layer].to(x.device)  # [B, d_mlp]
            cols = neurons.any(0).nonzero().squeeze(1)  # [n_cols]: the union of the examples' path neurons
            mask = pos.real[:, None] & neurons[pos.example][:, cols]  # [N, n_cols]
            scaled = alpha * origin[pos.source][:, cols]  # alpha_s * the unscaled value at the same position
            if how.completeness:
                scaled = scaled.detach().requires_grad_(True)
                state["earlier"].append((scaled, mask, origin[pos.source][:, cols].detach()))  # type: ignore
            return flat.index_copy(1, cols, torch.where(mask, scaled, flat[:, cols])).reshape(x.shape)
        # layer l: every neuron at every real position; the result is the leaf the backward stops at
        leaf = torch.where(pos.real[:, None], alpha * origin[pos.source], flat).detach().requires_grad_(True)
        state["leaf"], state["original"] = leaf, origin.detach()
        return leaf.reshape(x.shape)

    scaled_sites = [s for s in adapter.sites(tower) if s.layer == site.layer or s.layer in path_masks]
    kept = answer_positions(labels).to(labels.device)  # the LM head projects only what predicts an answer
    with patch(adapter, {s: interpolate for s in scaled_sites}):
        logits = model(**batch, use_cache=False, logits_to_keep=kept).logits  # [B*m, K, V]
    if "leaf" not in state:
        raise RuntimeError(f"{site} never ran in the forward; the batch does not reach the {tower} tower")
    kept_only = kept if logits.shape[1] != labels.shape[1] else None  # a model may ignore logits_to_keep
    objective = answer_logprob(logits, labels, kept_only).sum()  # rows independent: d(sum)/d(row) = d(row's F)
    earlier: list[tuple[Tensor, Tensor, Tensor]] = state["earlier"]  # type: ignore[assignment]
    leaves = [state["leaf"]] + [e[0] for e in earlier]
    grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    # a site that does not influence the output (e.g. a vision block whose output is unused) gets no gradient
    grad = (grads[0] if grads[0] is not None else torch.zeros_like(leaves[0])).float()
    pos: _Positions = state["positions"]  # type: ignore[assignment]
    original: Tensor = state["original"].float()  # type: ignore[attr-defined]
    totals = _quadrature_sums(grad, original, grads[1:], earlier, pos, n_examples) if how.completeness else None
    if how.method == "fisher":
        grad = grad * grad
    return _combine(grad, original, pos, n_examples, how.rule[1], legacy=how.name == "right"), totals


def _quadrature_sums(grad: Tensor, original: Tensor, earlier_grads: Sequence[Tensor | None],
                     earlier: Sequence[tuple[Tensor, Tensor, Tensor]], pos: _Positions, n_examples: int) -> Tensor:
    """Per example, ``sum_i a_i sum_s w_s g_s,i`` over layer ``l``'s neurons and the earlier path's, [B] on the CPU.

    ``earlier``: per earlier layer, (its scaled leaf, ``[N, n_cols]`` mask of path positions, unscaled values).
    """
    terms = [(grad * original[pos.source]).sum(1)]  # [N]: layer l, per position
    for (_, mask, values), g in zip(earlier, earlier_grads, strict=True):
        if g is not None:
            terms.append((g.float() * values.float() * mask).sum(1))
    per_position = torch.stack(terms).sum(0) * pos.weight * pos.real  # [N]
    return per_position.new_zeros(n_examples).index_add(0, pos.example, per_position).cpu()


def _combine(grad: Tensor, original: Tensor, pos: _Positions, n_examples: int, weights: Sequence[float], *,
             legacy: bool) -> Tensor:
    """``score[b, j] = sum_p a_pj sum_s w_s grad_spj`` from the per-position gradients, [B, d_mlp] on the CPU.

    ``legacy``: the right Riemann sum's arithmetic as it has always been done (per example, sum over copies, then
    one division), so that the default's scores stay bit for bit what they were; other rules take one
    weighted scatter-add over all positions.
    """
    if not legacy:
        real = pos.real.nonzero().squeeze(1)  # [n_real]
        weighted = original[pos.source[real]] * grad[real] * pos.weight[real, None]  # [n_real, d_mlp]
        return grad.new_zeros(n_examples, grad.shape[-1]).index_add_(0, pos.example[real], weighted).cpu()
    steps = len(weights)
    scores = grad.new_zeros(n_examples, grad.shape[-1])
    for b in range(n_examples):
        copies = pos.rows[b * steps:(b + 1) * steps]
        by_copy = torch.stack([grad[idx] for idx in copies])  # [m, n_b, d_mlp]
        values = original[pos.source[copies[0]]]  # [n_b, d_mlp]: the unscaled activation
        scores[b] = (values * by_copy.sum(0)).sum(0) / steps
    return scores.cpu()


def _copy_batch(examples: Sequence[Mapping[str, Tensor]], steps: int, pad_token_id: int, device: torch.device
                ) -> tuple[dict[str, Tensor], Tensor]:
    """``m`` copies of every *whole* example (image included), example-major, right-padded; and the labels.

    Copying at the example level repeats a packed vision tower's per-image patch block and its grid rows as a
    unit (research-code defect 4 repeated patch rows instead).
    """
    copies = [dict(e) for e in examples for _ in range(steps)]
    batch = {k: v.to(device) for k, v in collate(copies, pad_token_id).items()}  # [B*m, S] per-token keys
    return batch, batch.pop("labels")


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _prepare(model: nn.Module, adapter: ModelAdapter, examples: Sequence[Mapping[str, Tensor]], tower: Tower,
             rule: Rule, steps: int, pad_token_id: int) -> tuple[dict[str, Tensor], Tensor, _Originals | None]:
    """The copy batch and its labels, and the unscaled activations when no copy sits at ``alpha = 1``."""
    device = _device(model)
    batch, labels = _copy_batch(examples, steps, pad_token_id, device)
    batch |= adapter.fixed_inputs(batch)  # computed once for the L passes over this batch
    originals = None if reads_originals_from_last_copy(rule) else _Originals.capture(
        model, adapter, tower, examples, pad_token_id, device)
    return batch, labels, originals


def layer_scores(model: nn.Module, adapter: ModelAdapter, examples: Sequence[Mapping[str, Tensor]],
                 site: MLPSite, *, steps: int, path: Sequence[EarlierPath] | None = None,
                 method: Method | None = None, pad_token_id: int = 0, rule: Rule = "right") -> Tensor:
    """Scores of every neuron of ``site`` for each example, given a fixed path in the earlier layers.

    Args:
        examples: encoded examples with ``labels`` on the answer span (``modeling.encode``).
        site: the layer scored; ``path[b]`` maps earlier layers of the same tower to example ``b``'s path
            neurons, which are interpolated jointly with the layer.
        method: ``"ig"`` (``sum_p a * sum_s w_s g``) or ``"fisher"`` (``sum_p a * sum_s w_s g**2``); by default
            the tower's (``METHOD_BY_TOWER``).
        rule: the quadrature rule placing the ``steps`` copies (``attribution/quadrature.py``).

    Returns:
        float32 ``[B, d_mlp]`` on the CPU.
    """
    return _layer_pass(model, adapter, examples, site, steps, path, method, pad_token_id, rule, False)[0]


def completeness(model: nn.Module, adapter: ModelAdapter, examples: Sequence[Mapping[str, Tensor]],
                 site: MLPSite, *, steps: int, rule: Rule = "right", path: Sequence[EarlierPath] | None = None,
                 pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """How far the quadrature is from the integral it estimates, per example: ``(sum, F(a) - F(0))``, each [B].

    ``sum`` adds ``a * sum_s w_s g_s`` over every neuron the pass scales (all of ``site``'s and the earlier path
    neurons) and every position; integrated gradients are *complete* when it equals the change of the answer
    log-probability between the original activations and all scaled neurons at zero. The gradient is the plain
    one on both towers (the vision score squares the same gradients at the same nodes).
    """
    masks_path = path if path is not None else [{} for _ in examples]
    _, totals = _layer_pass(model, adapter, examples, site, steps, masks_path, "ig", pad_token_id, rule, True)
    masks = _path_masks(adapter, site.tower, masks_path, below=site.layer)
    deltas = torch.zeros(len(examples))
    with torch.no_grad():
        for b, example in enumerate(examples):
            batch = {k: v.to(_device(model)) for k, v in collate([dict(example)], pad_token_id).items()}
            labels = batch.pop("labels")
            zeroed = {site: lambda s, x: torch.zeros_like(x)}
            for layer, mask in masks.items():
                neurons = mask[b].to(batch["input_ids"].device)
                zeroed[adapter.site(site.tower, layer)] = lambda s, x, n=neurons: x * ~n
            full = answer_logprob(model(**batch, use_cache=False).logits, labels)[0]
            with patch(adapter, zeroed):
                deltas[b] = full - answer_logprob(model(**batch, use_cache=False).logits, labels)[0]
    return totals, deltas  # type: ignore[return-value]


def _layer_pass(model: nn.Module, adapter: ModelAdapter, examples: Sequence[Mapping[str, Tensor]],
                site: MLPSite, steps: int, path: Sequence[EarlierPath] | None, method: Method | None,
                pad_token_id: int, rule: Rule, with_completeness: bool) -> tuple[Tensor, Tensor | None]:
    path = path if path is not None else [{} for _ in examples]
    if len(path) != len(examples):
        raise ValueError(f"path has {len(path)} entries for {len(examples)} examples")
    for i, e in enumerate(examples):
        check_example(adapter, e, site.tower, f"#{i}")
    masks = _path_masks(adapter, site.tower, path, below=site.layer)
    with frozen(model):
        batch, labels, originals = _prepare(model, adapter, examples, site.tower, rule, steps, pad_token_id)
        how = _Pass(rule, nodes_and_weights(rule, steps), method or METHOD_BY_TOWER[site.tower], originals,
                    with_completeness)
        return _scores(model, adapter, batch, labels, site, masks, len(examples), how)


def _path_masks(adapter: ModelAdapter, tower: Tower, path: Sequence[EarlierPath], below: int
                ) -> dict[int, Tensor]:
    """``{layer: [B, d_mlp] bool}`` for earlier layers (``< below``) where some example has path neurons."""
    masks: dict[int, Tensor] = {}
    for s in adapter.sites(tower):
        if s.layer >= below or not any(p.get(s.layer) for p in path):
            continue
        mask = torch.zeros(len(path), s.d_mlp, dtype=torch.bool)
        for b, p in enumerate(path):
            mask[b, list(p.get(s.layer, ()))] = True
        masks[s.layer] = mask
    return masks


def top_k(scores: Tensor, k: int, layer: int) -> list[PathNode]:
    """The ``k`` best neurons of one layer, best first; ties go to the lower neuron id (stable sort)."""
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError(f"non-finite attribution scores at layer {layer}")
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return [PathNode(layer=layer, rank=rank, neuron=int(j), score=float(scores[j]))
            for rank, j in enumerate(order)]


def path_search(model: nn.Module, adapter: ModelAdapter, examples: Sequence[Mapping[str, Tensor]],
                tower: Tower, cfg: AttributionConfig, *, pad_token_id: int = 0,
                scores_out: list[Tensor] | None = None) -> list[list[PathNode]]:
    """Greedy path search over all layers of ``tower``, first layer upward, for a batch of examples.

    Each example keeps its own path; all of them run together (``B * cfg.steps`` rows per pass, one pass per
    layer). The method follows the tower (``METHOD_BY_TOWER``).

    Returns:
        per example, ``cfg.top_k`` nodes per layer, layers ascending, rank 0 first in each layer.
        With ``scores_out``, every layer's scores of every neuron (``[B, d_mlp]``, conditioned on the greedy
        path below) are appended to it, layers ascending: what continuous (contrastive) selection needs.

    Raises:
        InputError: an example has no answer span, or no image on the vision tower.
    """
    sites = adapter.sites(tower)
    for s in sites:
        if cfg.top_k > s.d_mlp:
            raise ValueError(f"AttributionConfig.top_k={cfg.top_k} exceeds the {s.d_mlp} neurons of {s}")
    for i, e in enumerate(examples):
        check_example(adapter, e, tower, f"#{i}")
    method = METHOD_BY_TOWER[tower]
    nodes: list[list[PathNode]] = [[] for _ in examples]
    masks: dict[int, Tensor] = {}
    with frozen(model):
        batch, labels, originals = _prepare(model, adapter, examples, tower, cfg.rule, cfg.steps, pad_token_id)
        how = _Pass(cfg.rule, nodes_and_weights(cfg.rule, cfg.steps), method, originals)
        for site in sites:
            scores, _ = _scores(model, adapter, batch, labels, site, masks, len(examples), how)
            if scores_out is not None:
                scores_out.append(scores)
            mask = torch.zeros(len(examples), site.d_mlp, dtype=torch.bool)
            for b in range(len(examples)):
                picked = top_k(scores[b], cfg.top_k, site.layer)
                nodes[b].extend(picked)
                mask[b, [n.neuron for n in picked]] = True
            masks[site.layer] = mask
    return nodes
