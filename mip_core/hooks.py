"""Read and replace neuron activations through forward pre-hooks on the down projections.

A neuron activation is the *input* of a site's down projection (see :mod:`mip_core.types`), so both context
managers hook that module's forward pre-hook: no module is inserted into the model and nothing depends on the
architecture beyond ``adapter.down_proj(site)``. Every handle is removed in ``finally``, also when the forward
raises, so a failed item never leaves a hook behind on a shared model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mip_core.adapters.base import ModelAdapter
from mip_core.types import MLPSite

#: ``fn(site, activation) -> replacement``; the replacement must have the activation's shape.
Replacement = Callable[[MLPSite, Tensor], Tensor]


@contextmanager
def capture(adapter: ModelAdapter, sites: Iterable[MLPSite], *, detach: bool = True
            ) -> Iterator[dict[MLPSite, Tensor]]:
    """Record the neuron activations (the down projection's input) of each site during the forwards inside.

    Yields a dict filled as the model runs: ``store[site]`` is the activation of the *last* call, shaped as
    the architecture lays it out (``[batch, seq, d_mlp]`` for language, e.g. ``[n_patches, d_mlp]`` for a
    packed vision tower; split it with ``adapter.rows_per_example``). ``detach=False`` keeps the autograd
    graph so that gradients can be taken with respect to the stored tensors.
    """
    store: dict[MLPSite, Tensor] = {}
    handles: list[RemovableHandle] = []
    try:
        for site in sites:
            def hook(module: nn.Module, args: tuple[Any, ...], site: MLPSite = site) -> None:
                store[site] = args[0].detach() if detach else args[0]

            handles.append(adapter.down_proj(site).register_forward_pre_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def patch(adapter: ModelAdapter, fn_by_site: Mapping[MLPSite, Replacement]) -> Iterator[None]:
    """Replace each site's neuron activations with ``fn(site, activation)`` during the forwards inside.

    The replacement is what the down projection (and everything after it) sees; it may carry its own autograd
    graph, e.g. a leaf tensor that requires grad so that gradients at the replaced activation can be taken.
    """
    handles: list[RemovableHandle] = []
    try:
        for site, fn in fn_by_site.items():
            def hook(module: nn.Module, args: tuple[Any, ...], site: MLPSite = site, fn: Replacement = fn
                     ) -> tuple[Any, ...]:
                replaced = fn(site, args[0])
                if replaced.shape != args[0].shape:
                    raise ValueError(f"patch for {site}: replacement has shape {tuple(replaced.shape)}, the "
                                     f"activation {tuple(args[0].shape)}")
                return (replaced, *args[1:])

            handles.append(adapter.down_proj(site).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["Replacement", "capture", "patch"]
