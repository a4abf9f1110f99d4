"""Which neurons an edit touches: the path graph, its controls, and MANU's point-wise importance.

Every rule returns a :data:`~mip_core.editing.slices.NeuronSelection` (``site -> neuron ids``), so the edit that
follows is the same code whatever chose the neurons. That is what makes the random-neuron control a control:
same count per site, same edit, same budget; only the choice of neurons differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mip_core.adapters.base import ModelAdapter
from mip_core.attribution.config import AttributionConfig
from mip_core.attribution.path_search import path_search
from mip_core.editing.slices import NeuronSelection, check_selection
from mip_core.errors import InputError
from mip_core.hooks import capture
from mip_core.modeling.inputs import collate
from mip_core.path_graph import PathGraph
from mip_core.types import MLPSite, Tower


def from_graph(adapter: ModelAdapter, graph: PathGraph, *, towers: Sequence[Tower] | None = None
               ) -> dict[MLPSite, list[int]]:
    """The path graph's neurons per site (optionally only ``towers``), checked against the model."""
    sel = {adapter.site(tower, layer): ids for (tower, layer), ids in graph.by_site().items()
           if towers is None or tower in towers}
    return check_selection(adapter, sel)


def random_like(adapter: ModelAdapter, selection: NeuronSelection, *, seed: int) -> dict[MLPSite, list[int]]:
    """As many uniformly random neurons per site as ``selection`` has there (the random-neuron control)."""
    rng = np.random.default_rng([seed, 7919])
    out = {}
    for site, ids in check_selection(adapter, selection).items():
        out[site] = sorted(int(j) for j in rng.choice(site.d_mlp, size=len(ids), replace=False))
    return out


def all_neurons(adapter: ModelAdapter, *, language_up_to: int) -> dict[MLPSite, list[int]]:
    """Every neuron of every vision site and of the language sites ``0..language_up_to`` (full-model RMisU).

    Those are all the MLPs below the RMisU layer's output; MLPs above it receive no gradient from the loss.
    """
    return {s: list(range(s.d_mlp)) for s in adapter.sites()
            if s.tower == "vision" or s.layer <= language_up_to}


def up_to_layer(selection: NeuronSelection, layer: int) -> dict[MLPSite, list[int]]:
    """Only the sites an RMisU loss at language layer ``layer`` can reach: vision sites and language ``<= layer``."""
    return {s: list(ids) for s, ids in selection.items() if s.tower == "vision" or s.layer <= layer}


# ---------------------------------------------------------------------------------------------- contrastive
def dense_scores(model: nn.Module, adapter: ModelAdapter, examples: Sequence[dict[str, Tensor]], tower: Tower,
                 cfg: AttributionConfig, pad_token_id: int) -> dict[MLPSite, Tensor]:
    """Every neuron's path-search score per example: ``{site: [n_examples, d_mlp]}`` for the sites of ``tower``.

    The same greedy search as the path graph (each example conditioned on its own top-k path below), keeping the
    scores of all neurons instead of the top k.
    """
    sites = adapter.sites(tower)
    per_site: dict[MLPSite, list[Tensor]] = {s: [] for s in sites}
    for start in range(0, len(examples), cfg.batch_items):
        layers: list[Tensor] = []
        path_search(model, adapter, examples[start:start + cfg.batch_items], tower, cfg,
                    pad_token_id=pad_token_id, scores_out=layers)
        for site, scores in zip(sites, layers, strict=True):
            per_site[site].append(scores)
    return {s: torch.cat(v) if v else torch.zeros(0, s.d_mlp) for s, v in per_site.items()}


def contrastive_scores(forget: Tensor, retain: Tensor) -> Tensor:
    """``mean_f s_hat - mean_r s_hat`` per neuron, ``s_hat = s / max_j |s_j|`` per example (``[n, d] -> [d]``).

    Scores shrink by orders of magnitude from item to item and layer to layer (docs/method.md section 2,
    BENCHMARKS.md 2), so each example's scores are scaled to [-1, 1] before averaging: every item gets one
    vote. A neuron that serves the forget items as much as the retain items scores about 0; one that serves
    only the forget items scores high.
    """
    def normalised_mean(s: Tensor) -> Tensor:
        if s.shape[0] == 0:
            return s.new_zeros(s.shape[1])
        return (s / s.abs().amax(1, keepdim=True).clamp(min=1e-30)).mean(0)

    return normalised_mean(forget.double()) - normalised_mean(retain.double())


def contrastive_selection(forget: dict[MLPSite, Tensor], retain: dict[MLPSite, Tensor], budget: dict[MLPSite, int]
                          ) -> dict[MLPSite, list[int]]:
    """Top ``budget[site]`` neurons per site by :func:`contrastive_scores` (ties to the lower id)."""
    out = {}
    for site, n in budget.items():
        if n <= 0 or site not in forget:
            continue
        score = contrastive_scores(forget[site], retain.get(site, forget[site].new_zeros(0, site.d_mlp)))
        out[site] = sorted(int(j) for j in torch.argsort(-score, stable=True)[:n])
    return out


# ---------------------------------------------------------------------------------------------- MANU
@torch.no_grad()
def activation_statistics(model: nn.Module, adapter: ModelAdapter, examples: Sequence[dict[str, Tensor]],
                          pad_token_id: int, *, batch_size: int = 16) -> dict[MLPSite, dict[str, Tensor]]:
    """Per site and neuron, over all real positions (tokens, patches) of ``examples``: the four MANU statistics.

    ``abs``: mean |a|; ``freq``: fraction of positions with a > 0; ``var``: variance of a; ``rms``: sqrt(mean a^2).
    Each ``[d_mlp]``, float64. Sites an example never reaches (the vision tower for text) get no positions.
    """
    sites = adapter.sites()
    sums = {s: {k: torch.zeros(s.d_mlp, dtype=torch.float64) for k in ("n", "abs", "pos", "sum", "sq")}
            for s in sites}
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_token_id)
        batch.pop("labels", None)
        with capture(adapter, sites) as acts:
            model(**batch)
        for site in sites:
            if site not in acts:
                continue
            rows = adapter.rows_per_example(site.tower, acts[site], batch)
            a = torch.cat([r.reshape(-1, site.d_mlp) for r in rows]).double()  # [positions, d_mlp]
            acc = sums[site]
            acc["n"] += a.shape[0]
            acc["abs"] += a.abs().sum(0)
            acc["pos"] += (a > 0).double().sum(0)
            acc["sum"] += a.sum(0)
            acc["sq"] += (a * a).sum(0)
    out: dict[MLPSite, dict[str, Tensor]] = {}
    for site, acc in sums.items():
        n = acc["n"].clamp(min=1)
        mean = acc["sum"] / n
        out[site] = {"abs": acc["abs"] / n, "freq": acc["pos"] / n, "var": (acc["sq"] / n - mean**2).clamp(min=0),
                     "rms": (acc["sq"] / n).sqrt(), "n": acc["n"]}
    return out


def manu_scores(forget: dict[MLPSite, dict[str, Tensor]], retain: dict[MLPSite, dict[str, Tensor]],
                eps: float = 1e-8) -> dict[MLPSite, Tensor]:
    """MANU's point-wise importance of each neuron for the forget set relative to the retain set.

    For each statistic ``I`` (abs, freq, var, rms): ``I_f / (I_r + eps)``, normalised by its mean over the site's
    neurons so the four are comparable; the score is their mean. Sites the forget set never reached score 0.
    """
    out = {}
    for site, f in forget.items():
        if float(f["n"][0]) == 0:
            out[site] = torch.zeros(site.d_mlp, dtype=torch.float64)
            continue
        r = retain.get(site)
        parts = []
        for key in ("abs", "freq", "var", "rms"):
            ratio = f[key] / ((r[key] if r is not None and float(r["n"][0]) > 0 else 0) + eps)
            parts.append(ratio / ratio.mean().clamp(min=eps))
        out[site] = torch.stack(parts).mean(0)
    return out


def manu_selection(scores_by_modality: Sequence[dict[MLPSite, Tensor]], budget: dict[MLPSite, int]
                   ) -> dict[MLPSite, list[int]]:
    """Top ``budget[site]`` neurons per site, ranked by the larger of the per-modality scores (modality-aware)."""
    out = {}
    for site, n in budget.items():
        if n <= 0:
            continue
        per_mod = [s[site] for s in scores_by_modality if site in s]
        if not per_mod:
            raise InputError(f"MANU has no scores for {site.tower} layer {site.layer}")
        score = torch.stack(per_mod).amax(0)
        top = torch.argsort(-score, stable=True)[:n]
        out[site] = sorted(int(j) for j in top)
    return out


__all__ = ["activation_statistics", "all_neurons", "contrastive_scores", "contrastive_selection", "dense_scores",
           "from_graph", "manu_scores", "manu_selection", "random_like", "up_to_layer"]
