"""Data parallelism over ``torch.distributed`` when a launcher started several ranks; one process otherwise.

Every rank draws the same batch (same seed), keeps its share (:func:`rank_slice`), and gradients are averaged
(:func:`average_gradients`) before clipping and the optimiser step, so the trainable copies stay identical on
every rank without an optimiser wrapper. With one process all are no-ops, so single-device runs are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, size)`` of the default process group; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rank_slice(seq: Sequence[T]) -> list[T]:
    """This rank's share of ``seq``: every ``size``-th element from position ``rank`` (all on one rank)."""
    rank, size = world()
    return list(seq[rank::size])


def global_share(local_count: float) -> float:
    """Weight turning this rank's mean over ``local_count`` items into its part of the mean over all ranks.

    ``size * local / total``: the average over ranks of ``weight * grad(local mean)`` is the gradient of the
    mean over every item of the batch, whatever the ranks' item counts (token counts differ between shares).
    Collective when there are several ranks; 1 on one process.
    """
    rank, size = world()
    if size == 1:
        return 1.0
    total = torch.tensor([float(local_count)], dtype=torch.float64)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return size * float(local_count) / max(float(total.item()), 1.0)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (all-reduce SUM, then divide); a missing one counts as 0.

    Collective: every rank must call it with the same parameters in the same order.
    """
    rank, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad.div_(size)


__all__ = ["average_gradients", "global_share", "rank_slice", "world"]
