"""Read and write neuron slices of ZeRO-3 partitioned weights without gathering whole matrices.

Under ZeRO-3 each rank holds a shard of every parameter (``p.ds_id`` exists, ``p.shape`` is empty outside a
gather): rank ``r`` of the parameter's group holds positions ``[r * n, (r + 1) * n)`` of the flattened tensor
in ``p.ds_tensor`` (the last rank's range padded). Editing code needs only the selected neurons' rows and
columns, so :func:`read_neurons` and :func:`write_neurons` touch just those positions, each in the rank that
holds it, and exchange the slices alone (kilobytes to megabytes) instead of all-gathering the matrices
(hundreds of megabytes each at 70B; on gloo the gather also holds a second full copy while it runs).
DeepSpeed has no such primitive (``GatheredParameters`` is whole tensors only), hence this module.
:func:`gather_params` (PEFT's ``gather_params_ctx``) remains for whole-tensor access. Without DeepSpeed (or
with unpartitioned parameters) every helper here works on the tensors in place and DeepSpeed is never imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn


def is_partitioned(param: nn.Parameter) -> bool:
    """True for a ZeRO-3 partitioned parameter (DeepSpeed tags those with ``ds_id``)."""
    return hasattr(param, "ds_id")


def full_numel(param: nn.Parameter) -> int:
    """The parameter's full size, also while only a shard of it is resident."""
    return int(getattr(param, "ds_numel", param.numel()))


def gather_params(params: Iterable[nn.Parameter | None], modifier_rank: int | None = None
                  ) -> AbstractContextManager[object]:
    """Full ``params`` inside the block: GatheredParameters if any is partitioned, else a no-op.

    ``modifier_rank=None`` gathers read-only (changes are discarded on exit); ``modifier_rank=0`` broadcasts
    rank 0's in-place changes to every rank and re-partitions them on exit. Every rank must enter the same
    gathers in the same order (they are collectives).
    """
    params = [p for p in params if p is not None]
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed  # lazily: only a ZeRO-3 run has partitioned parameters, and then DeepSpeed is loaded

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def read_neurons(param: nn.Parameter, index: Tensor, dim: int = 0) -> Tensor:
    """A copy of ``param[index]`` (``dim=0``: rows ``[n, ...]``) or ``param[:, index]`` (``dim=1``: ``[d_out, n]``).

    Partitioned: collective over the parameter's group (every rank calls it, in the same order); each rank
    contributes the positions it holds and the slice's raw bytes are gathered, so the result is bit-exact.
    """
    index = index.to("cpu", torch.long)
    if not _holds_partition(param):
        with torch.no_grad(), gather_params([param]):
            return _take(param.data, index.to(param.device), dim).clone()
    import torch.distributed as dist

    part, group = param.ds_tensor, param.ds_process_group
    positions, owner, mine, offset = _located(param, index, dim)
    local = torch.zeros(positions.numel(), dtype=part.dtype, device=part.device)
    local[mine] = part.data[positions[mine] - offset]
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather([p.view(torch.uint8) for p in pieces], local.view(torch.uint8), group=group)
    values = torch.stack(pieces)[owner, torch.arange(positions.numel(), device=part.device)]
    return values.view(_slice_shape(tuple(param.ds_shape), index, dim))


def write_neurons(param: nn.Parameter, index: Tensor, values: Tensor, dim: int = 0) -> None:
    """``param[index] = values`` (``dim=0``) or ``param[:, index] = values`` (``dim=1``), in place.

    Partitioned: collective; rank 0's ``values`` are broadcast (as a gather with ``modifier_rank=0`` would
    keep them), then every rank writes the positions its partition holds. Nothing is gathered.
    """
    index = index.to("cpu", torch.long)
    if not _holds_partition(param):
        with torch.no_grad(), gather_params([param], modifier_rank=0):
            target = param.data
            idx = index.to(target.device)
            if dim == 0:
                target[idx] = values.to(target.device, target.dtype)
            else:
                target[:, idx] = values.to(target.device, target.dtype)
        return
    import torch.distributed as dist

    part, group = param.ds_tensor, param.ds_process_group
    flat = values.detach().to(part.device, part.dtype, copy=True).reshape(-1)  # a copy: the broadcast writes it
    dist.broadcast(flat.view(torch.uint8), src=dist.get_global_rank(group, 0), group=group)
    positions, _, mine, offset = _located(param, index, dim)
    with torch.no_grad():
        part.data[positions[mine] - offset] = flat[mine]


def gather_in_place_on_gloo() -> bool:
    """On a gloo process group, make DeepSpeed's all-gathers write straight into their output; True if done.

    Why: gloo's ``all_gather_into_tensor`` stages the whole output in a second buffer and copies it over
    (``ProcessGroupGloo`` flattens every all-gather into a new tensor), so each ZeRO-3 gather on CPU ranks held
    the gathered matrix twice. One broadcast per rank into that rank's range of the output moves the same bytes
    with no second buffer. NCCL already gathers in place: other backends are left alone. DeepSpeed keeps the
    function it calls on its backend object (``all_gather_function``), which is replaced here, not torch's.
    """
    import torch.distributed as dist
    from deepspeed import comm

    backend = getattr(comm.comm, "cdb", None)
    if backend is None or not hasattr(backend, "all_gather_function") or dist.get_backend() != "gloo":
        return False
    backend.all_gather_function = _all_gather_by_broadcasts
    return True


class _Done:
    """The handle of a collective that already finished (what ``async_op=True`` callers ``wait()`` on)."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _all_gather_by_broadcasts(output_tensor: Tensor, input_tensor: Tensor, group: object = None,
                              async_op: bool = False) -> _Done | None:
    """``all_gather_into_tensor`` as one in-place broadcast per rank (see :func:`gather_in_place_on_gloo`)."""
    import torch.distributed as dist

    group = group or dist.group.WORLD
    out = output_tensor.view(-1)  # [world * n], contiguous
    n = input_tensor.numel()
    for r in range(dist.get_world_size(group)):
        piece = out.narrow(0, r * n, n)
        if r == dist.get_rank(group):
            piece.copy_(input_tensor.reshape(-1))
        dist.broadcast(piece, src=dist.get_global_rank(group, r), group=group)
    return _Done() if async_op else None


def _holds_partition(param: nn.Parameter) -> bool:
    """True for a ZeRO-3 parameter whose shard is in memory and is its only copy on this rank.

    Otherwise the whole-tensor path is taken: parameters ZeRO keeps whole (``ds_persist``) or that are
    gathered right now, hpZ's secondary copies (``ds_secondary_tensor``) and shards swapped out to NVMe.
    """
    if not is_partitioned(param) or getattr(param, "ds_persist", False):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    part = getattr(param, "ds_tensor", None)
    return (param.ds_status == ZeroParamStatus.NOT_AVAILABLE and part is not None
            and getattr(param, "ds_secondary_tensor", None) is None and part.numel() == part.ds_numel)


def _located(param: nn.Parameter, index: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Where a slice of a partitioned ``param`` lies: its flat positions (in the slice's order), the rank
    holding each, which of them this rank holds, and where this rank's range starts."""
    import torch.distributed as dist

    part = param.ds_tensor
    rank, size = dist.get_rank(param.ds_process_group), part.ds_numel
    positions = _positions(tuple(param.ds_shape), index, dim).to(part.device)  # [numel of the slice]
    owner = torch.div(positions, size, rounding_mode="floor")
    return positions, owner, owner == rank, rank * size


def _positions(shape: tuple[int, ...], index: Tensor, dim: int) -> Tensor:
    """Positions in the flattened (row-major) tensor of ``t[index]`` / ``t[:, index]``, in the slice's order."""
    if dim == 0:
        row = int(torch.Size(shape[1:]).numel())
        return (index[:, None] * row + torch.arange(row)).reshape(-1)  # [n, row] -> [n * row]
    if dim != 1 or len(shape) != 2:
        raise ValueError(f"neuron slices are rows (dim 0) or columns (dim 1) of a matrix; got dim {dim} "
                         f"of a tensor of shape {shape}")
    return (torch.arange(shape[0])[:, None] * shape[1] + index[None, :]).reshape(-1)  # [d_out, n] -> flat


def _slice_shape(shape: tuple[int, ...], index: Tensor, dim: int) -> tuple[int, ...]:
    return (index.numel(), *shape[1:]) if dim == 0 else (shape[0], index.numel())


def _take(tensor: Tensor, index: Tensor, dim: int) -> Tensor:
    return tensor[index] if dim == 0 else tensor[:, index]


__all__ = ["full_numel", "gather_in_place_on_gloo", "gather_params", "is_partitioned", "read_neurons", "write_neurons"]
