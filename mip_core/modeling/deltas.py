"""Neuron-delta versions: a new model version stored as its base's files plus the edited neurons' slices.

Why: a path edit changes well under 1 % of the MLP neurons, but the paths run through every layer, so writing
the edited model as plain safetensors rewrites every gate, up and down matrix (79 % of a 72B MLLM's bytes)
and every shard holding one. What actually changed is, per edited neuron ``j`` of a site, row ``j`` (and bias
entry ``j``) of each input linear and column ``j`` of the down projection (:mod:`mip_core.editing.slices`). A
delta version stores just that, like a PEFT adapter stores its low-rank factors:

- every file of its base, hard-linked locally or copied server-side on S3 (no bytes through the process), except
  the base's weight entry file (``model.safetensors`` or ``model.safetensors.index.json``), which is placed as
  ``base-<name>``: ``from_pretrained`` on a delta version then fails loudly instead of silently loading the
  weights from before the edit, which for a forget request would serve the person's data;
- ``neuron_deltas.json`` (:data:`MANIFEST_SCHEMA`): the base entry file and the delta files in the order they
  apply (each nightly edit of a chain appends one);
- one ``neuron-delta-NNNN.safetensors`` per edit: for every edited tensor with checkpoint key ``K``,
  ``K::index`` (int64 neuron ids) and ``K::rows`` (``[n, ...]``: those rows) or ``K::cols`` (``[d_out, n]``:
  those columns), in the checkpoint's stored dtype, so applying it reproduces the edited weights bit for bit.

The project's loaders (:func:`mip_core.modeling.load_model`, ``load_zero3``) apply the deltas after reading the
base weights; :func:`export_plain` writes an ordinary checkpoint for serving, one tensor in memory at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mip_core.parallel.zero3_slices import read_neurons, write_neurons
from mip_core.adapters import ModelAdapter
from mip_core.errors import InputError, ModelLoadError
from mip_core.modeling.shards import (
    BASE_PREFIX, FLOAT_DTYPES, INDEX_FILE, MANIFEST, MANIFEST_SCHEMA, SINGLE_FILE, checkpoint_keys, delta_entry,
    read_header, read_manifest, split_delta_entry, version_files, weight_map, write_file,
)
from mip_core.transfer import link_or_copy, place_file

DELTA_PATTERN = "neuron-delta-{:04d}.safetensors"
DIM_OF = {"rows": 0, "cols": 1}  # which axis of the tensor a delta part indexes

# ---------------------------------------------------------------------------------------------- layout
def base_entry(folder: str | os.PathLike[str]) -> str:
    """The base weights' entry file of a plain checkpoint (index or single file), as named in ``folder``."""
    for name in (INDEX_FILE, SINGLE_FILE):
        if (Path(folder) / name).is_file():
            return name
    raise InputError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}: the edit writes safetensors "
                     f"checkpoints only; re-save the base model with save_pretrained(safe_serialization=True)")


@contextmanager
def plain_view(folder: str) -> Iterator[str]:
    """A temporary folder of symlinks in which a delta version's base weights have their plain names.

    For ``from_pretrained``, which only reads plain names; the deltas are applied afterwards
    (:func:`apply_deltas`). A plain checkpoint is yielded as it is.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        yield folder
        return
    view = Path(tempfile.mkdtemp(prefix="mip-view-"))
    try:
        for f in Path(folder).iterdir():
            if f.is_file():
                (view / f.name.removeprefix(BASE_PREFIX)).symlink_to(f.resolve())
        yield str(view)
    finally:
        shutil.rmtree(view, ignore_errors=True)  # loaded tensors keep their memory maps open


# ---------------------------------------------------------------------------------------------- writing
def delta_targets(model: nn.Module, adapter: ModelAdapter, neuron_ids: Mapping[str, list[int]]
                  ) -> list[tuple[str, str, list[int]]]:
    """(parameter name, ``rows`` | ``cols``, neuron ids) of every tensor an edit of ``neuron_ids`` changes."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = []
    for label, ids in sorted(neuron_ids.items()):
        tower, layer = label.rsplit(".", 1)
        site = adapter.site(tower, int(layer))  # type: ignore[arg-type]
        for lin in adapter.neuron_inputs(site):
            out += [(by_id[id(p)], "rows", sorted(ids)) for p in (lin.weight, lin.bias) if p is not None]
        out.append((by_id[id(adapter.down_proj(site).weight)], "cols", sorted(ids)))
    return out


def write_delta(model: nn.Module, adapter: ModelAdapter, neuron_ids: Mapping[str, list[int]], base_dir: str,
                output_uri: str, *, base_uri: str | None = None, rank: int = 0, world: int = 1
                ) -> dict[str, list[str]]:
    """Write ``model`` as a delta version of the checkpoint at ``base_dir``; every rank calls it.

    Collective under ZeRO-3: the edited neurons' slices are read out of the ranks' partitions
    (:func:`~mip_core.parallel.zero3_slices.read_neurons`, no matrix gathered) and rank 0 keeps them (under 1 % of
    the MLP at path-edit budgets); rank 0 writes the delta file and the manifest;
    the base's files are placed by the ranks in turn (links or server-side copies). Returns what this rank did.
    """
    targets = delta_targets(model, adapter, neuron_ids)
    params = dict(model.named_parameters())
    shard_of = weight_map(base_dir)
    keys = checkpoint_keys(model, [name for name, _, _ in targets], shard_of)
    slices: dict[str, torch.Tensor] = {}
    for name, kind, ids in targets:  # under ZeRO-3 read from the ranks' partitions (collective, no gather)
        index = torch.tensor(ids, dtype=torch.long)
        part = read_neurons(params[name], index, dim=DIM_OF[kind])  # [n, ...] or [d_out, n]
        if rank == 0:
            dtype = _stored_dtype(base_dir, shard_of[keys[name]], keys[name])
            slices[delta_entry(keys[name], "index")] = index
            slices[delta_entry(keys[name], kind)] = part.to("cpu", dtype).contiguous()
    base = read_manifest(base_dir)
    entry = base["base_weights"] if base else base_entry(base_dir)
    deltas = list(base["deltas"]) if base else []
    done: dict[str, list[str]] = {}
    if rank == 0:
        name = DELTA_PATTERN.format(len(deltas) + 1)
        write_file(output_uri, name, lambda p: save_file(slices, str(p), metadata={"schema": MANIFEST_SCHEMA}))
        manifest = {"schema": MANIFEST_SCHEMA, "base_weights": BASE_PREFIX + entry.removeprefix(BASE_PREFIX),
                    "deltas": [*deltas, name]}
        write_file(output_uri, MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
        done["delta"] = [name, MANIFEST]
    carry = [f for f in version_files(base_dir) if f != MANIFEST]
    for i, rel in enumerate(carry):
        if i % world == rank:
            dest = BASE_PREFIX + rel.removeprefix(BASE_PREFIX) if rel == entry else rel
            how = place_file(f"{(base_uri or base_dir).rstrip('/')}/{rel}", f"{output_uri.rstrip('/')}/{dest}",
                             local_src=str(Path(base_dir) / rel))
            done.setdefault(how, []).append(rel)
    return done


def _stored_dtype(folder: str, shard: str, key: str) -> torch.dtype:
    dtype = read_header(Path(folder) / shard)[0][key]["dtype"]
    if dtype not in FLOAT_DTYPES:
        raise InputError(f"checkpoint tensor {key!r} has dtype {dtype}; deltas are written for "
                         f"{sorted(FLOAT_DTYPES)} weights")
    return FLOAT_DTYPES[dtype]


# ---------------------------------------------------------------------------------------------- reading
def read_deltas(folder: str) -> list[dict[str, tuple[str, torch.Tensor, torch.Tensor]]]:
    """Each delta file of ``folder`` in order: ``{checkpoint key: (rows | cols, index, values)}``."""
    manifest = read_manifest(folder)
    out = []
    for name in (manifest or {}).get("deltas", []):
        with safe_open(str(Path(folder) / name), framework="pt") as f:
            names = list(f.keys())
            one: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
            for entry in names:
                key, kind = split_delta_entry(entry)
                if kind != "index":
                    one[key] = (kind, f.get_tensor(delta_entry(key, "index")), f.get_tensor(entry))
            out.append(one)
    return out


def apply_deltas(model: nn.Module, folder: str) -> int:
    """Apply ``folder``'s deltas in order to a model holding its base weights; returns the tensors changed.

    Works on a model on one device, spread by a device map, or partitioned by ZeRO-3 (each rank writes the
    positions its partitions hold: :func:`~mip_core.parallel.zero3_slices.write_neurons`).
    """
    deltas = read_deltas(folder)
    if not deltas:
        return 0
    params = dict(model.named_parameters())
    keys = checkpoint_keys(model, list(params), weight_map(folder))
    name_of = {key: name for name, key in keys.items()}
    changed = 0
    for delta in deltas:
        for key, (kind, index, values) in sorted(delta.items()):
            if key not in name_of:
                raise ModelLoadError(f"delta of {folder} edits {key!r}, which this model does not have")
            write_neurons(params[name_of[key]], index, values, dim=DIM_OF[kind])
            changed += 1
    return changed


# ---------------------------------------------------------------------------------------------- export
def export_plain(folder: str, out: str) -> dict[str, list[str]]:
    """Write the delta version at ``folder`` as a plain checkpoint in ``out`` (loads with transformers alone).

    Shards without an edited tensor are hard-linked (copied across filesystems); a shard with one is copied
    by the kernel and only its edited tensors are rewritten, one tensor in memory at a time. A plain
    checkpoint is linked as it is. Returns ``{"rewritten": [...], "link": [...], "copy": [...]}``.
    """
    manifest = read_manifest(folder)
    root, dest = Path(folder), Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    deltas = read_deltas(folder)
    shard_of = weight_map(folder)
    touched: dict[str, list[str]] = {}
    for key in sorted({k for d in deltas for k in d}):
        touched.setdefault(shard_of[key], []).append(key)
    done: dict[str, list[str]] = {}
    skip = {MANIFEST, *(manifest or {}).get("deltas", [])}
    for rel in version_files(folder):
        if rel in skip:
            continue
        target = dest / rel.removeprefix(BASE_PREFIX) if manifest else dest / rel
        if rel in touched:
            _rewrite_tensors(root / rel, target, touched[rel], deltas)
            done.setdefault("rewritten", []).append(rel)
        else:
            done.setdefault("link" if link_or_copy(root / rel, target) else "copy", []).append(rel)
    return done


def _rewrite_tensors(src: Path, dest: Path, keys: list[str], deltas: list[dict[str, Any]]) -> None:
    """Copy ``src`` to ``dest`` kernel-side, then apply every delta of ``keys`` in place, tensor by tensor."""
    header, start = read_header(src)
    tmp = dest.with_name(f".tmp-{dest.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, tmp)
    with open(tmp, "r+b") as f:
        for key in keys:
            info = header[key]
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            raw = bytearray(f.read(end - begin))
            tensor = torch.frombuffer(raw, dtype=FLOAT_DTYPES[info["dtype"]]).view(info["shape"])
            for delta in deltas:
                if key in delta:
                    kind, index, values = delta[key]
                    if kind == "rows":
                        tensor[index] = values.to(tensor.dtype)
                    else:
                        tensor[:, index] = values.to(tensor.dtype)
            f.seek(start + begin)
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


__all__ = ["DELTA_PATTERN", "apply_deltas", "base_entry", "delta_targets", "export_plain", "plain_view",
           "read_deltas", "write_delta"]
