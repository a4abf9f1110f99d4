"""PEFT-style neuron slices: train only the selected neurons' parameters, then merge them into the weights.

A neuron ``j`` of a site is driven by row ``j`` (and bias entry ``j``) of each input linear (gate/up, or fc1)
and read by column ``j`` of the down projection (down_proj, or fc2); see ``ModelAdapter.neuron_parameters``.
:class:`NeuronEditor` keeps a trainable copy of exactly those slices for the selected neurons and adds the
difference to the frozen linears' outputs through forward hooks, so:

- the optimiser holds ``n * (n_inputs * (d_in + 1) + d_out)`` numbers per site, not whole matrices;
- the base weights stay untouched until :meth:`NeuronEditor.merge`, so the frozen model that RMisU compares
  against is the same model with the editor switched off (:meth:`NeuronEditor.disabled`), at no memory cost;
- biases stay in the forward pass: the frozen linear adds its bias, the slice adds only its bias *change*
  (the research code dropped biases while training and kept them at inference: defect 6 of docs/method.md);
- pruning is a column initialised to zero: the pruned neuron's activation still flows, but nothing reads it,
  which is what zeroing the activation at every position does, and it merges into plain weights (no hooks
  at inference).

Under DeepSpeed ZeRO-3 the editor never gathers a matrix: the slices are read out of the ranks' partitions
once (``mip_core.parallel.zero3_slices.read_neurons``), and :meth:`merge` writes rank 0's values back into them
(``write_neurons``). ZeRO-3 releases a linear's weight before later forward hooks run, so for partitioned
linears the frozen base slices are kept as copies (the hooks never read the weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mip_core.parallel.zero3_slices import is_partitioned, read_neurons, write_neurons
from mip_core.adapters.base import ModelAdapter
from mip_core.errors import InputError
from mip_core.types import MLPSite

#: Which neurons to edit: ascending, distinct neuron ids per site.
NeuronSelection = Mapping[MLPSite, Sequence[int]]


def check_selection(adapter: ModelAdapter, selection: NeuronSelection) -> dict[MLPSite, list[int]]:
    """Validate a selection against the model; returns it with sorted ids and empty sites dropped."""
    known = set(adapter.sites())
    out: dict[MLPSite, list[int]] = {}
    for site, ids in selection.items():
        if site not in known:
            raise InputError(f"selection names {site}, which this model does not have; its sites are "
                             f"{[(s.tower, s.layer, s.d_mlp) for s in adapter.sites()]}. Was the path graph "
                             f"computed on another model?")
        ids = sorted({int(i) for i in ids})
        if ids and (ids[0] < 0 or ids[-1] >= site.d_mlp):
            raise InputError(f"selection for {site.tower} layer {site.layer} has neuron {ids[-1]} outside "
                             f"0..{site.d_mlp - 1}; was the path graph computed on another model?")
        if ids:
            out[site] = ids
    return dict(sorted(out.items()))


class SiteSlices(nn.Module):
    """Trainable slices of one site: input-linear rows ``[n, d_in]`` (+ bias ``[n]``) and down columns ``[d_out, n]``."""

    def __init__(self, site: MLPSite, neurons: Sequence[int], inputs: Sequence[nn.Linear], down: nn.Linear, *,
                 prune: bool, train_rows: bool, train_columns: bool, train_biases: bool = True) -> None:
        super().__init__()
        self.site = site
        idx = torch.tensor(list(neurons), dtype=torch.long, device=down.weight.device)
        self.register_buffer("neurons", idx, persistent=False)
        linears = [*inputs, down]
        # ZeRO-3: the weights are shards outside a gather, and released again before our forward hooks run,
        # so the frozen base slices are copied once here; unpartitioned weights are read in place (no copies)
        self.keep_base = any(is_partitioned(lin.weight) for lin in linears)
        rows, biases, base_rows, base_biases = [], [], [], []
        with torch.no_grad():
            for lin in inputs:  # under ZeRO-3 read from the partitions: no matrix is gathered
                rows.append(nn.Parameter(read_neurons(lin.weight, idx), requires_grad=train_rows))  # [n, d_in]
                if self.keep_base:
                    base_rows.append(rows[-1].detach().clone())
                if lin.bias is not None:
                    biases.append(nn.Parameter(read_neurons(lin.bias, idx),
                                               requires_grad=train_rows and train_biases))
                    if self.keep_base:
                        base_biases.append(biases[-1].detach().clone())
            base_columns = read_neurons(down.weight, idx, dim=1)  # [d_out, n]
        self.rows = nn.ParameterList(rows)
        self.row_biases = nn.ParameterList(biases)
        start = torch.zeros_like(base_columns) if prune else base_columns.clone() if self.keep_base else base_columns
        self.columns = nn.Parameter(start, requires_grad=train_columns)  # [d_out, n]
        # frozen W[idx], b[idx], W_d[:, idx]: kept only when partitioned (unpartitioned weights are read in place)
        self.base_rows: list[Tensor] | None = base_rows if self.keep_base else None
        self.base_biases: list[Tensor] | None = base_biases if self.keep_base else None
        self.base_columns: Tensor | None = base_columns if self.keep_base else None
        self.has_bias = tuple(lin.bias is not None for lin in inputs)

    def row_delta(self, k: int, lin: nn.Linear, x: Tensor) -> Tensor:
        """Change of input linear ``k``'s selected outputs: ``x (R - W[idx])^T + (b_R - b[idx])`` -> ``[..., n]``."""
        kb = sum(self.has_bias[:k])
        if self.base_rows is not None and self.base_biases is not None:  # partitioned: the kept copies
            base_w, base_b = self.base_rows[k], self.base_biases[kb] if self.has_bias[k] else None
        else:
            base_w, base_b = lin.weight[self.neurons], lin.bias[self.neurons] if self.has_bias[k] else None
        weight = self.rows[k] - base_w
        bias = None
        if base_b is not None:
            bias = self.row_biases[kb] - base_b
        return nn.functional.linear(x, weight, bias)

    def column_delta(self, down: nn.Linear, h: Tensor) -> Tensor:
        """Change of the down projection's output: ``h[..., idx] (C - W_d[:, idx])^T`` -> ``[..., d_out]``."""
        base = self.base_columns if self.base_columns is not None else down.weight[:, self.neurons]
        return nn.functional.linear(h[..., self.neurons], self.columns - base)

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class NeuronEditor(nn.Module):
    """Edit only the selected neurons of a model: attach, train :meth:`parameters`, :meth:`merge`, detach.

    Use as a context manager; the hooks are always removed on exit, also when training raises::

        with NeuronEditor(adapter, selection, prune=True) as editor:
            optimiser = torch.optim.AdamW(editor.trainable_parameters(), lr=...)
            ...  # forwards of adapter.model now see the edited slices
            with editor.disabled():
                ...  # the unedited model
            editor.merge()  # write the slices into the weights (plain HF checkpoint from here on)
    """

    def __init__(self, adapter: ModelAdapter, selection: NeuronSelection, *, prune: bool = False,
                 train_rows: bool = True, train_columns: bool = True, train_biases: bool = True) -> None:
        super().__init__()
        self.adapter = adapter
        self.selection = check_selection(adapter, selection)
        if not self.selection:
            raise InputError("NeuronEditor got an empty selection: no neuron to edit. Check the path graph "
                             "(`mip paths show`) or the method's neuron budget")
        self.prune = prune
        self.slices = nn.ModuleList(
            SiteSlices(site, ids, adapter.neuron_inputs(site), adapter.down_proj(site), prune=prune,
                       train_rows=train_rows, train_columns=train_columns, train_biases=train_biases)
            for site, ids in self.selection.items())
        self._handles: list[RemovableHandle] = []
        self._enabled = True
        self._merged = False

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        if self._handles:
            return
        for sl in self.slices:
            site = sl.site
            for k, lin in enumerate(self.adapter.neuron_inputs(site)):
                self._handles.append(lin.register_forward_hook(self._row_hook(sl, k)))
            self._handles.append(self.adapter.down_proj(site).register_forward_hook(self._column_hook(sl)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> NeuronEditor:  # noqa: PYI034 - Self needs Python 3.11
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _row_hook(self, sl: SiteSlices, k: int) -> Callable[..., Tensor | None]:
        def hook(module: nn.Linear, args: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if not self._enabled:
                return None
            return out.index_add(out.dim() - 1, sl.neurons, sl.row_delta(k, module, args[0]))
        return hook

    def _column_hook(self, sl: SiteSlices) -> Callable[..., Tensor | None]:
        def hook(module: nn.Linear, args: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if not self._enabled:
                return None
            return out + sl.column_delta(module, args[0])
        return hook

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Forwards inside see the unedited model (the frozen reference of RMisU)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.slices.parameters() if p.requires_grad]

    def n_trainable(self) -> int:
        return sum(sl.n_trainable() for sl in self.slices)

    def n_neurons(self) -> int:
        return sum(len(ids) for ids in self.selection.values())

    @torch.no_grad()
    def merge(self) -> None:
        """Write the slices into the base weights and detach: the model is now a plain, edited HF model."""
        if self._merged:
            raise RuntimeError("NeuronEditor.merge() was already called; the slices are in the weights")
        self.detach()
        for sl in self.slices:
            site, idx = sl.site, sl.neurons
            inputs, down = self.adapter.neuron_inputs(site), self.adapter.down_proj(site)
            # ZeRO-3: every rank holds the same slices (averaged gradients); rank 0's are written, each rank
            # into its own partition (write_neurons), so no matrix is gathered
            bias_k = 0
            for k, lin in enumerate(inputs):
                write_neurons(lin.weight, idx, sl.rows[k])
                if lin.bias is not None:
                    write_neurons(lin.bias, idx, sl.row_biases[bias_k])
                    bias_k += 1
            write_neurons(down.weight, idx, sl.columns, dim=1)
        self._merged = True


def prune_columns(adapter: ModelAdapter, selection: NeuronSelection) -> int:
    """Zero the down-projection columns of the selected neurons in place; returns how many numbers changed.

    Equals zeroing the neurons' activations at every position (paper Eq. 10, docs/method.md section 5) and
    needs no inference hooks.
    """
    changed = 0
    with torch.no_grad():
        for site, ids in check_selection(adapter, selection).items():
            down = adapter.down_proj(site)
            idx = torch.tensor(ids, dtype=torch.long)
            d_out = int(getattr(down.weight, "ds_shape", down.weight.shape)[0])
            write_neurons(down.weight, idx, torch.zeros(d_out, len(ids)), dim=1)
            changed += d_out * len(ids)
    return changed


__all__ = ["NeuronEditor", "NeuronSelection", "SiteSlices", "check_selection", "prune_columns"]
