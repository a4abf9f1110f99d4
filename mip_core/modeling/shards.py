"""Write an edited model as its base checkpoint's safetensors shards, rewriting only the shards it changed.

A path edit changes a few MLP linears of a model whose checkpoint may be 140 GB. Saving the whole model again
needs the full state dict in one process (under ZeRO-3: consolidated on rank 0) and writes every byte. Here:

- the edited parameters' checkpoint keys are found in the base's ``model.safetensors.index.json`` (a single
  ``model.safetensors`` is one shard), through transformers' own load-time renaming when the checkpoint uses
  the hub's original key format;
- each shard holding an edited tensor is rewritten by one rank (shard ``i`` by rank ``i % world``): the base
  file is copied by the kernel, then only the edited tensors' byte ranges are overwritten (same dtype and shape,
  so the header and every other tensor stay byte-identical). Its edited tensors are gathered one module at a
  time (ZeRO-3 collectives, read-only), in rounds of one shard per rank, so a rank holds at most one shard's
  edited tensors;
- every other file (untouched shards, the index, config, processor, tokenizer) is hard-linked, or copied
  server-side on S3 (:mod:`mip_core.transfer`).

Both the in-process edit and the DeepSpeed job use :func:`write_edited` for a plain ("full") version, so their
outputs have one layout. The default version format stores only the edited neurons' slices instead
(:mod:`mip_core.modeling.deltas`); this module also holds what both formats share: reading a checkpoint's
weight map (including a delta version's ``base-`` entry file) and each rank's slice of it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mip_core.parallel.zero3_slices import gather_params
from mip_core.adapters import ModelAdapter
from mip_core.errors import InputError, ModelLoadError
from mip_core.storage import filesystem, is_remote
from mip_core.transfer import place_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Records written per version (edit, publish); never carried from the base into a new version.
RECORD_FILES = frozenset({"unlearn.json", "edit_summary.json", "lineage.json", "model_card.md"})
#: A neuron-delta version (:mod:`mip_core.modeling.deltas`) keeps its base's weight entry file under this prefix,
#: so plain ``from_pretrained`` refuses it instead of loading the weights from before the edit.
BASE_PREFIX = "base-"
MANIFEST = "neuron_deltas.json"
MANIFEST_SCHEMA = "mip.neuron_deltas/1"
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: The weight dtypes the partition loader and the neuron deltas read and write.
FLOAT_DTYPES: dict[str, torch.dtype] = {k: _DTYPES[k] for k in ("BF16", "F16", "F32", "F64")}


@dataclass(frozen=True)
class ShardPlan:
    """What :func:`write_edited` rewrites and what it carries over unchanged."""

    base_dir: str  # a local folder with the base's files (the base itself, or a node's copy of a remote base)
    base_uri: str  # where the base lives: an object store's copies stay server-side
    rewrite: dict[str, dict[str, str]]  # shard file -> {checkpoint key: parameter name} of its edited tensors
    carry: tuple[str, ...]  # every other file (relative path), placed unchanged


# ---------------------------------------------------------------------------------------------- reading
def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (``{key: {dtype, shape, data_offsets}}``) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A neuron-delta version's manifest, or None for a plain checkpoint; another schema is refused."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("schema") != MANIFEST_SCHEMA:
        raise ModelLoadError(f"{path} has schema {doc.get('schema')!r}; this version reads {MANIFEST_SCHEMA!r}")
    return dict(doc)


def weight_map(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Checkpoint key -> file name of the base weights: from the index, or every key of a single
    ``model.safetensors``; in a neuron-delta version, of its ``base-`` entry file (deltas not included)."""
    folder = Path(folder)
    for prefix in ("", BASE_PREFIX):
        if (folder / (prefix + INDEX_FILE)).is_file():
            return dict(json.loads((folder / (prefix + INDEX_FILE)).read_text())["weight_map"])
        if (folder / (prefix + SINGLE_FILE)).is_file():
            single = prefix + SINGLE_FILE
            return {k: single for k in read_header(folder / single)[0] if k != "__metadata__"}
    raise InputError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}: the edit writes safetensors "
                     f"checkpoints only; re-save the base model with save_pretrained(safe_serialization=True)")


def checkpoint_keys(model: nn.Module, names: Iterable[str], keys: Iterable[str]) -> dict[str, str]:
    """Parameter name (``model.state_dict()`` naming) -> the checkpoint key that stores it.

    Checkpoints the project writes use the state-dict names; a hub checkpoint may use transformers' original
    key format, which ``from_pretrained`` renames on load: the same renaming is applied here. A name whose key is
    produced by a many-to-one conversion (fused tensors), or by none, is an :class:`InputError` naming it.
    """
    wanted, keys = list(names), list(keys)
    found = {n: n for n in wanted if n in set(keys)}
    if len(found) == len(wanted):
        return found
    known = dict.fromkeys((n for n, _ in model.named_parameters()), True)
    known.update(dict.fromkeys((n for n, _ in model.named_buffers()), True))
    for key, (renamed, converted) in _load_names(model, keys, known).items():
        if renamed in wanted and renamed not in found:
            if converted:
                raise InputError(f"parameter {renamed!r} is built from checkpoint key {key!r} by a tensor "
                                 f"conversion (fused or split weights); the shard writer only replaces tensors "
                                 f"stored one to one. Re-save the base with save_pretrained first")
            found[renamed] = key
    missing = [n for n in wanted if n not in found]
    if missing:
        raise InputError(f"parameter {missing[0]!r} (and {len(missing) - 1} more) has no key in the base "
                         f"checkpoint, neither by name nor through transformers' key renaming; is the checkpoint "
                         f"of this model's class? Re-save it with save_pretrained")
    return found


def _load_names(model: nn.Module, keys: list[str], known: dict[str, bool]) -> dict[str, tuple[str, bool]]:
    """Checkpoint key -> (its name after load-time renaming, whether a tensor conversion produced it)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = getattr(model, "_weight_conversions", None) or get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, tuple[str, bool]] = {}
    for key in keys:  # as from_pretrained does (core_model_loading.convert_and_load_state_dict_in_model)
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if renamed not in known and key in known:
            renamed, pattern = rename_source_key(key, [], [], prefix, known)
        out[key] = (renamed, pattern is not None)
    return out


# ---------------------------------------------------------------------------------------------- planning
def edited_parameters(model: nn.Module, adapter: ModelAdapter, details: Mapping[str, Any]) -> list[str]:
    """Names of the parameters an edit may have changed: every parameter of the edited sites' linears.

    The sites come from the edit summary's ``per_site`` (or ``per_request``) budgets; a method without them
    (a full fine-tune baseline) may have changed anything, so every parameter is listed.
    """
    per_site: dict[str, Any] = dict(details.get("per_site") or {})
    for budget in (details.get("per_request") or {}).values():
        per_site.update(budget)
    if not per_site:
        return [n for n, _ in model.named_parameters()]
    by_id = {id(p): n for n, p in model.named_parameters()}
    names: set[str] = set()
    for label in per_site:
        tower, layer = label.rsplit(".", 1)
        site = adapter.site(tower, int(layer))  # type: ignore[arg-type]
        for lin in (*adapter.neuron_inputs(site), adapter.down_proj(site)):
            names |= {by_id[id(p)] for p in lin.parameters()}
    return sorted(names)


def plan_shards(model: nn.Module, names: Iterable[str], base_dir: str, base_uri: str | None = None
                ) -> ShardPlan:
    """Which shards of the base at ``base_dir`` hold ``names``' tensors; every other file is carried."""
    shard_of = weight_map(base_dir)
    root = Path(base_dir)
    manifest = read_manifest(root) or {"deltas": []}
    names = set(names) | _delta_parameters(model, root, manifest["deltas"], shard_of)
    keys = checkpoint_keys(model, sorted(names), shard_of)
    rewrite: dict[str, dict[str, str]] = {}
    for name, key in sorted(keys.items()):
        rewrite.setdefault(shard_of[key], {})[key] = name
    skip = {MANIFEST, *manifest["deltas"]}
    carry = tuple(f for f in version_files(root) if f not in rewrite and f not in skip)
    return ShardPlan(str(root), base_uri or str(root), rewrite, carry)


def version_files(folder: str | os.PathLike[str]) -> list[str]:
    """A version folder's files (relative paths) that a new version carries: not its records, not temp files."""
    root = Path(folder)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                  and p.name not in RECORD_FILES and not p.name.startswith(".tmp-"))


def _delta_parameters(model: nn.Module, root: Path, deltas: list[str], shard_of: Mapping[str, str]) -> set[str]:
    """Parameters a delta version's deltas changed: a plain copy of it rewrites them whole (with the deltas
    applied, as the loaded model holds them), so the copy needs no deltas."""
    keys = {split_delta_entry(k)[0] for d in deltas for k in read_header(root / d)[0] if k != "__metadata__"}
    if not keys:
        return set()
    mapping = checkpoint_keys(model, [n for n, _ in model.named_parameters()], shard_of)
    return {name for name, key in mapping.items() if key in keys}


# ---------------------------------------------------------------------------------------------- writing
def write_edited(model: nn.Module, plan: ShardPlan, output_uri: str, *, rank: int = 0, world: int = 1
                 ) -> dict[str, list[str]]:
    """Write ``model``'s edited tensors into ``output_uri`` as the base's shards; every rank calls it.

    Collective under ZeRO-3 (every rank gathers the same modules in the same order). Returns what this rank
    did: ``{"rewritten": [...], "link": [...], "server-copy": [...], ...}`` (file names).
    """
    done: dict[str, list[str]] = {}
    params = dict(model.named_parameters())
    shards = sorted(plan.rewrite)
    for start in range(0, len(shards), world):  # one shard per rank per round: bounded memory per rank
        mine: dict[str, torch.Tensor] = {}
        for i, shard in enumerate(shards[start:start + world], start):
            for group in _by_module(plan.rewrite[shard]):
                with gather_params([params[n] for n in group.values()], modifier_rank=None):
                    if i % world == rank:
                        mine.update({k: params[n].detach().to("cpu").clone() for k, n in group.items()})
        if start + rank < len(shards):
            shard = shards[start + rank]
            _write_shard(Path(plan.base_dir) / shard, mine, output_uri, shard.removeprefix(BASE_PREFIX))
            done.setdefault("rewritten", []).append(shard)
    for i, rel in enumerate(plan.carry):
        if i % world == rank:
            how = place_file(_join(plan.base_uri, rel), _join(output_uri, rel.removeprefix(BASE_PREFIX)),
                             local_src=str(Path(plan.base_dir) / rel))
            done.setdefault(how, []).append(rel)
    return done


def _by_module(keys: Mapping[str, str]) -> list[dict[str, str]]:
    """``{key: name}`` split by owning module (the name without its last part), in a fixed order."""
    groups: dict[str, dict[str, str]] = {}
    for key, name in sorted(keys.items(), key=lambda kv: kv[1]):
        groups.setdefault(name.rsplit(".", 1)[0], {})[key] = name
    return [groups[m] for m in sorted(groups)]


def _write_shard(src: Path, tensors: Mapping[str, torch.Tensor], output_uri: str, name: str) -> None:
    """``src`` with ``tensors``' bytes put in place, written to ``output_uri/name``."""
    write_file(output_uri, name, lambda path: _patch_copy(src, tensors, path))


def write_file(output_uri: str, name: str, write: Callable[[Path], Any]) -> None:
    """Write ``output_uri/name`` with ``write(local_path)``: under a temporary name renamed into place locally
    (readers never see half a file), or written to a temporary folder and uploaded in one PUT to a store."""
    if is_remote(output_uri):
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(name).name
            write(local)
            fs, path = filesystem(_join(output_uri, name))
            fs.put_file(str(local), path)
        return
    dest = Path(output_uri.removeprefix("file://")) / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}")
    write(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def delta_entry(key: str, part: str) -> str:
    """A neuron-delta file's entry for checkpoint key ``key``: ``K::index``, ``K::rows`` or ``K::cols``."""
    return f"{key}::{part}"


def split_delta_entry(entry: str) -> tuple[str, str]:
    """``K::rows`` -> (``K``, ``rows``)."""
    key, _, part = entry.rpartition("::")
    return key, part


def _patch_copy(src: Path, tensors: Mapping[str, torch.Tensor], dest: Path) -> None:
    """Copy ``src`` (kernel-side) to ``dest``, then overwrite each tensor's byte range with the new values.

    Values are stored in the checkpoint's dtype (the header stays as it was); a shape that differs from the
    stored one is an :class:`InputError` (the model is not the checkpoint's).
    """
    header, start = read_header(src)
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as f:
        for key, value in sorted(tensors.items()):
            info = header[key]
            if list(value.shape) != list(info["shape"]):
                raise InputError(f"edited tensor {key!r} has shape {list(value.shape)} but the base checkpoint "
                                 f"stores {info['shape']}; was the model loaded from this checkpoint?")
            raw = value.to(_DTYPES[info["dtype"]]).contiguous().reshape(-1).view(torch.uint8).numpy()
            begin, end = info["data_offsets"]
            if raw.nbytes != end - begin:  # pragma: no cover - same shape and dtype give the same size
                raise RuntimeError(f"{key}: {raw.nbytes} bytes for a {end - begin}-byte slot")
            f.seek(start + begin)
            f.write(memoryview(raw))
        f.flush()
        os.fsync(f.fileno())


def _join(uri: str, rel: str) -> str:
    return f"{uri.rstrip('/')}/{rel}"


def fill_partitions(model: nn.Module, folder: str, rank: int) -> int:
    """Read into each ZeRO-3 partition of ``model`` its own slice of the checkpoint in ``folder``; bytes read.

    Why not ``from_pretrained`` under ZeRO-3: transformers materialises each weight on rank 0 and scatters it, so
    rank 0 peaked at the whole model (measured: 1.9 GiB on a 1 GB bf16 model, 2 ranks, against 0.9 GiB on the
    other rank). Here every rank reads, with plain file reads (no memory map), only the byte range of each
    tensor that its partition holds: ZeRO-3 partitions a parameter as contiguous ranges of its flattened
    tensor, rank r holding ``[r * n, (r + 1) * n)``. A parameter ZeRO keeps whole on every rank (below
    ``stage3_param_persistence_threshold``) is read whole.
    """
    params = dict(model.named_parameters())
    shard_of = weight_map(folder)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, key in checkpoint_keys(model, list(params), shard_of).items():
        by_file.setdefault(shard_of[key], []).append((key, name))
    read = 0
    for file, pairs in sorted(by_file.items()):
        header, data_start = read_header(Path(folder) / file)
        with open(Path(folder) / file, "rb") as f:
            for key, name in pairs:
                read += _fill_one(f, data_start, header[key], params[name], rank)
    return read


def _fill_one(f: Any, data_start: int, meta: Mapping[str, Any], param: nn.Parameter, rank: int) -> int:
    dtype = FLOAT_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise InputError(f"checkpoint tensor dtype {meta['dtype']} is not one of {sorted(FLOAT_DTYPES)}")
    size = torch.empty((), dtype=dtype).element_size()
    begin, end = meta["data_offsets"]
    numel = (end - begin) // size
    if getattr(param, "ds_persist", False) or not hasattr(param, "ds_tensor"):  # whole on every rank
        _read_as(f, data_start + begin, param.data.view(-1), dtype)
        return numel * size
    part = param.ds_tensor  # [n]: this rank's range of the flattened parameter (the last one padded)
    start = part.numel() * rank
    count = max(0, min(part.numel(), numel - start))
    if count:
        _read_as(f, data_start + begin + start * size, part[:count], dtype)
    return count * size


def _read_as(f: Any, offset: int, target: torch.Tensor, stored: torch.dtype) -> None:
    """Fill ``target`` from numbers stored as ``stored`` at ``offset`` (converted when the dtypes differ)."""
    with torch.no_grad():
        if target.dtype == stored:
            _read_into(f, offset, target)
        else:
            staged = torch.empty(target.numel(), dtype=stored)
            _read_into(f, offset, staged)
            target.copy_(staged.view(target.shape))


CHUNK_BYTES = 64 << 20  # staging buffer of a read into accelerator memory


def _read_into(f: Any, offset: int, target: torch.Tensor) -> None:
    """Read ``target.numel()`` numbers of ``target``'s dtype at ``offset`` straight into ``target``.

    A CPU tensor is filled by ``readinto`` on its own bytes: no temporary copy (``f.read`` plus a conversion
    held two transient copies of the largest partition slice, 124 MiB at the 1.5 B bench size); an
    accelerator tensor through a CPU buffer of at most :data:`CHUNK_BYTES`.
    """
    flat = target.reshape(-1)
    f.seek(offset)
    if flat.device.type == "cpu" and flat.is_contiguous():
        view = memoryview(flat.view(torch.uint8).numpy()).cast("B")  # bytes of target, shared
        if f.readinto(view) != len(view):
            raise InputError(f"checkpoint file {getattr(f, 'name', '?')} ends before offset {offset} + "
                             f"{len(view)} bytes: it is truncated; re-copy it")
        return
    step = max(1, CHUNK_BYTES // flat.element_size())
    for first in range(0, flat.numel(), step):
        chunk = torch.empty(min(step, flat.numel() - first), dtype=flat.dtype)
        _read_into(f, offset + first * flat.element_size(), chunk)
        flat[first:first + chunk.numel()].copy_(chunk)


__all__ = ["BASE_PREFIX", "FLOAT_DTYPES", "INDEX_FILE", "MANIFEST", "MANIFEST_SCHEMA", "RECORD_FILES", "SINGLE_FILE",
           "ShardPlan", "checkpoint_keys", "delta_entry", "edited_parameters", "fill_partitions", "plan_shards",
           "read_header", "read_manifest", "split_delta_entry", "version_files", "weight_map", "write_edited",
           "write_file"]
