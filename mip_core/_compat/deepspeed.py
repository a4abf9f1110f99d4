"""Gather ZeRO-3 partitioned weights only where an edit reads or writes them (PEFT's ``gather_params_ctx``).

Under ZeRO-3 each rank holds a shard of every parameter (``p.ds_id`` exists, ``p.shape`` is empty outside a
gather). Editing code reads the selected neurons' rows/columns once and writes them back once, so only the
edited sites' linears are ever gathered in full, for the length of one ``with`` block. Without DeepSpeed (or
with unpartitioned parameters) every helper here is a no-op and DeepSpeed is never imported.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

from torch import nn


@dataclass
class GatherLog:
    """What :func:`gather_params` gathered inside :func:`record_gathers` (full sizes, not shards)."""

    gathers: int = 0  # number of gather blocks that touched partitioned parameters
    parameters: int = 0  # parameter tensors gathered
    numel: int = 0  # numbers gathered
    bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"gathers": self.gathers, "parameters": self.parameters, "numel": self.numel,
                "bytes": self.bytes}


_LOG: contextvars.ContextVar[GatherLog | None] = contextvars.ContextVar("mip_gather_log", default=None)


def is_partitioned(param: nn.Parameter) -> bool:
    """True for a ZeRO-3 partitioned parameter (DeepSpeed tags those with ``ds_id``)."""
    return hasattr(param, "ds_id")


def full_numel(param: nn.Parameter) -> int:
    """The parameter's full size, also while only a shard of it is resident."""
    return int(getattr(param, "ds_numel", param.numel()))


@contextmanager
def record_gathers() -> Iterator[GatherLog]:
    """Count every :func:`gather_params` of partitioned parameters made inside (for run summaries)."""
    log = GatherLog()
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


def gather_params(params: Iterable[nn.Parameter | None], modifier_rank: int | None = None
                  ) -> AbstractContextManager[object]:
    """Full ``params`` inside the block: GatheredParameters if any is partitioned, else a no-op.

    ``modifier_rank=None`` gathers read-only (changes are discarded on exit); ``modifier_rank=0`` broadcasts
    rank 0's in-place changes to every rank and re-partitions them on exit. Every rank must enter the same
    gathers in the same order (they are collectives). Sizes are counted in an active :func:`record_gathers`.
    """
    params = [p for p in params if p is not None]
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    log = _LOG.get()
    if log is not None:
        log.gathers += 1
        log.parameters += len(partitioned)
        log.numel += sum(full_numel(p) for p in partitioned)
        log.bytes += sum(full_numel(p) * p.element_size() for p in partitioned)
    import deepspeed  # lazily: only a ZeRO-3 run has partitioned parameters, and then DeepSpeed is loaded

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


__all__ = ["GatherLog", "full_numel", "gather_params", "is_partitioned", "record_gathers"]
